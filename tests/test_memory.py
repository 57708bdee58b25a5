"""A long-lived engine does not grow with every run (issue 14, item 9).

Python level: a finished run leaves no Run, step, snapshot or checkpoint
batch behind, nor a per-run entry in the worker slots; what grows per run is
measured with tracemalloc, not RSS, so the tests do not depend on the
allocator or the machine's load. Allocator level: with glibc, the engine fixes
the mmap threshold (128 KiB), so a freed large buffer goes back to the system instead of
staying in the heap (checked where the next large block lands, not by RSS).
See ``benchmarks/memory_over_runs.py`` for RSS over 1,000 runs.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from wfaas import SqliteStore, StepDefinition, WorkflowDefinition, WorkflowEngine, commits, rundata, runs

from conftest import Data, Ticker, collect, wait_until

pytestmark = pytest.mark.usefixtures("no_leftovers")

BIG = 1 << 20


def write_big(ctx: Any) -> None:
    ctx.data.items[ctx.step_id] = os.urandom(BIG)


def bump(ctx: Any) -> None:
    ctx.data.n += 1


def chain(name: str, body: Any, n: int = 3) -> WorkflowDefinition:
    wf = WorkflowDefinition(name, data_type=Data)
    for i in range(n):
        step = StepDefinition(f"s{i}", f"s{i}", body)
        wf.add_step(step.depends_on([f"s{i - 1}"]) if i else step)
    return wf


# The scheduler's records of runs, where they live (issue 16 split them out of scheduler.py).
_CLASSES = {
    "Run": runs.Run,
    "StepRun": runs.StepRun,
    "Snapshot": rundata.Snapshot,
    "Task": runs.Task,
    "Batch": commits.Batch,
}


def leftovers() -> dict[str, int]:
    """Live scheduler objects of runs (Run, StepRun, Snapshot, Task, a Batch still holding runs)."""
    gc.collect()
    counts = {"Run": 0, "StepRun": 0, "Snapshot": 0, "Task": 0, "Batch": 0}
    for obj in gc.get_objects():
        name = type(obj).__name__
        if name not in counts or type(obj) is not _CLASSES[name]:
            continue
        if name != "Batch" or obj.runs or obj.finished:
            counts[name] += 1
    return {k: v for k, v in counts.items() if v}


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_finished_run_leaves_no_scheduler_objects_behind(tmp_path: Path, kind: str) -> None:
    store = SqliteStore(tmp_path / "runs.sqlite") if kind == "sqlite" else None
    with WorkflowEngine(store=store, max_workers=2) as engine:
        collect(engine)  # with a subscriber, so that events are made and delivered too
        engine.register_workflow(chain("big", write_big))
        for _ in range(3):
            engine.wait_for_completion(engine.start_workflow("big", Data()), timeout=60)
        engine.event_bus.flush()
        wait_until(lambda: not leftovers(), 10, "the finished runs' objects to be released")
        assert not engine._scheduler.runs
    if store is not None:
        store.close()


@pytest.mark.slow  # 230 runs through real workers and a SQLite file
def test_memory_per_run_stays_flat_with_sqlite(tmp_path: Path) -> None:
    """The engine keeps nothing per finished run: tracemalloc growth per run is a few bytes, not ~1.6 KB."""
    store = SqliteStore(tmp_path / "runs.sqlite")
    with WorkflowEngine(store=store, max_workers=2) as engine:
        engine.register_workflow(chain("small", bump, 2))
        for _ in range(30):  # warm: caches, the workers' first messages, the store's statements
            engine.wait_for_completion(engine.start_workflow("small", Data()), timeout=60)
        runs = 200
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(runs):
                engine.wait_for_completion(engine.start_workflow("small", Data()), timeout=60)
            gc.collect()
            per_run = (tracemalloc.get_traced_memory()[0] - before) / runs
        finally:
            tracemalloc.stop()
    store.close()
    assert per_run < 300, f"{per_run:.0f} bytes kept per finished run"


def test_a_worker_keeps_one_copy_of_a_data_class_however_many_runs_use_it(engine: WorkflowEngine) -> None:
    engine.register_workflow(chain("small", bump, 2))
    for _ in range(12):
        engine.wait_for_completion(engine.start_workflow("small", Data()), timeout=60)
    held = [len(slot.classes) for slot in engine._pool.slots]
    assert max(held) == 1, f"the worker slots hold {held} data classes for 12 runs of one class"


@pytest.mark.skipif(
    not hasattr(os, "confstr") or "glibc" not in (os.confstr("CS_GNU_LIBC_VERSION") or ""), reason="glibc only"
)
def test_freed_large_buffers_go_back_to_the_system() -> None:
    """glibc raises its mmap threshold to the size of a freed mmapped block, so the next large block comes
    from the heap and stays there when freed; an engine fixes the threshold at 128 KiB. Measured where the
    next 3 MiB block lands: in the heap ([heap] in /proc/self/maps) or a mapping of its own."""
    script = textwrap.dedent(
        """
        import ctypes, sys
        from wfaas import WorkflowEngine

        engine = WorkflowEngine(max_workers=1) if sys.argv[1] == "engine" else None
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        libc.free(libc.malloc(4 << 20))  # an mmapped block freed: glibc would raise its threshold to 4 MiB
        block = libc.malloc(3 << 20)
        for line in open("/proc/self/maps"):
            low, high = (int(x, 16) for x in line.split()[0].split("-"))
            if line.rstrip().endswith("[heap]"):
                print("heap" if low <= block < high else "own mapping")
                break
        else:
            print("own mapping")
        libc.free(block)
        if engine is not None:
            engine.close()
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}

    def where(mode: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=120, env=env
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert where("plain") == "heap"  # glibc's own behaviour, which the engine changes
    assert where("engine") == "own mapping"


def test_a_finished_run_frees_its_data_without_waiting_for_the_cyclic_gc(tmp_path: Path) -> None:
    """The cyclic GC counts objects, not bytes: a run's data kept in a reference cycle (Run <-> its steps),
    or by a timer that outlives its step, would stay for hundreds of runs. With the GC off, what is
    still allocated after 5 runs of 3 MiB each must be about one run's worth at most (the store's
    last statement), not 5."""
    store = SqliteStore(tmp_path / "runs.sqlite")
    with WorkflowEngine(store=store, max_workers=2) as engine:
        wf = chain("timed", write_big)
        for step in wf.steps:
            step.with_timeout(3600)  # a timer per attempt, alive in the heap for an hour
        engine.register_workflow(wf)
        engine.wait_for_completion(engine.start_workflow("timed", Data()), timeout=60)
        gc.collect()
        gc.disable()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(5):
                engine.wait_for_completion(engine.start_workflow("timed", Data()), timeout=60)
            kept = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
            gc.enable()
    store.close()
    assert kept < 5 * BIG, f"{kept / BIG:.1f} MiB still allocated after 5 runs of 3 MiB (GC off)"


def test_a_running_chain_keeps_only_the_snapshots_of_steps_in_flight(ticker: Ticker) -> None:
    """Issue 17 (engine peak RSS): each finished step kept the snapshot it started from (the fields
    and their pickled blob), so a chain passing a 5 MB value held 10 MB per finished step until
    the run ended. Mid-run, only the data of the step in flight may be alive."""
    iid = ticker.start(chain("bumps", bump, 5))
    for sid in ("s0", "s1", "s2", "s3"):
        ticker.run(sid)
    assert ticker.busy() == {"s4"}
    gc.collect()
    mine = [o for o in gc.get_objects() if type(o) is rundata.Snapshot and o.key[0] == iid]
    assert len(mine) == 1, f"{len(mine)} snapshots alive with one step in flight"
