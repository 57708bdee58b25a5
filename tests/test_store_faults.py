"""Stores that fail under a run: a full disk, a store deleted mid-run, many processes creating one store.

Real SQLite files on real filesystems (a 3 MB tmpfs for the full disk,
mounted here: the tests run as root; skipped with the reason where mounting is
not allowed), real worker processes, real `wfaas-local` processes.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from wfaas import (
    InMemoryStore,
    InvalidStateTransition,
    NotFound,
    ShuttingDown,
    SqliteStore,
    StepDefinition,
    StepStatus,
    StoreError,
    WorkflowDefinition,
    WorkflowEngine,
    WorkflowStatus,
)
from wfaas.store import Checkpoint

from conftest import Data, wait_for, wait_until

pytestmark = pytest.mark.usefixtures("no_leftovers")
S, W = StepStatus, WorkflowStatus
CLI = [sys.executable, "-m", "wfaas.command_line"]
STEPS = 30
CHUNK = 200_000  # bytes each step adds: 30 steps need about 6 MB, the disk has 3


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MB tmpfs of our own (mode 0700, as a private store folder must be), unmounted afterwards."""
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def grow(disk: Path, size: str = "64m") -> None:
    """Free space: the same tmpfs, made larger (its files stay)."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)


def add_chunk(ctx: Any) -> None:
    ctx.data.items[ctx.step_id] = os.urandom(CHUNK)


def chain(name: str = "filler") -> WorkflowDefinition:
    wf = WorkflowDefinition(name, data_type=Data)
    previous = None
    for i in range(STEPS):
        sid = f"s{i:02d}"
        step = StepDefinition(sid, sid, add_chunk)
        wf.add_step(step.depends_on([previous]) if previous else step)
        previous = sid
    return wf


def test_a_full_disk_stops_the_run_with_a_store_error_and_resume_completes_it(small_disk: Path) -> None:
    path = small_disk / "runs.sqlite"
    engine = WorkflowEngine(store=SqliteStore(path), max_workers=2, grace_period=1.0)
    try:
        engine.register_workflow(chain())
        iid = engine.start_workflow("filler", Data())
        began = time.monotonic()
        # Before the fix: sqlitedict's writer thread died on the failed commit and this timed out ("it goes on").
        with pytest.raises(StoreError) as caught:
            engine.wait_for_completion(iid, timeout=60)
        stopped_after = time.monotonic() - began
        message = str(caught.value)
        assert str(path) in message and "full" in message and iid in message, message
        # Nothing hangs on the store that cannot commit: cancel answers at once, close returns.
        with pytest.raises(InvalidStateTransition):
            engine.cancel_workflow(iid)
    finally:
        closing = time.monotonic()
        engine.close()
        engine.store.close()
        assert time.monotonic() - closing < 15, "closing the engine on a full disk took too long"
    assert stopped_after < 30, f"the run took {stopped_after:.1f} s to stop on a full disk"

    # What was committed is there, and a fresh process's view of it is sound.
    grow(small_disk)
    store = SqliteStore(path)
    try:
        assert store.integrity_check() == "ok"
        before = store.load(iid)
        done_before = [sid for sid, s in before.step_states.items() if s.status is S.SUCCEEDED]
        assert 3 <= len(done_before) < STEPS, done_before
        assert set(before.data.items) >= set(done_before)
        with WorkflowEngine(store=store, max_workers=2) as again:
            again.register_workflow(chain())
            again.resume(iid)
            again.wait_for_completion(iid, timeout=60)
            after = again.get_status(iid)
        assert after.status is W.COMPLETED
        assert sorted(after.data.items) == [f"s{i:02d}" for i in range(STEPS)]
        assert all(len(v) == CHUNK for v in after.data.items.values())
        # Steps committed before the disk filled did not run again.
        assert all(after.step_states[sid].attempts == 1 for sid in done_before)
    finally:
        store.close()


FILLER = textwrap.dedent(
    f"""
    import os
    from dataclasses import dataclass, field
    from wfaas import StepDefinition, WorkflowData, WorkflowDefinition

    @dataclass
    class D(WorkflowData):
        items: dict = field(default_factory=dict)

    def add_chunk(ctx):
        ctx.data.items[ctx.step_id] = os.urandom({CHUNK})

    workflow = WorkflowDefinition("filler", data_type=D)
    previous = None
    for i in range({STEPS}):
        sid = f"s{{i:02d}}"
        step = StepDefinition(sid, sid, add_chunk)
        workflow.add_step(step.depends_on([previous]) if previous else step)
        previous = sid
    """
)


def cli(
    *args: str, cwd: Path, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})}
    )


def test_wfaas_local_run_on_a_full_disk_prints_one_line_and_resume_completes_it(
    small_disk: Path, tmp_path: Path
) -> None:
    (tmp_path / "filler.py").write_text(FILLER)
    store = str(small_disk / "runs.sqlite")
    ran = cli("run", "filler.py:workflow", "--store", store, "--workers", "2", "--quiet", cwd=tmp_path)
    assert ran.returncode == 1, (ran.returncode, ran.stderr)
    assert "Traceback" not in ran.stderr, ran.stderr
    lines = [line for line in ran.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, ran.stderr
    iid = ran.stdout.split()[1]  # "run ID"
    assert lines[0].startswith("STOPPED:"), lines[0]
    assert store in lines[0] and "full" in lines[0] and f"wfaas-local resume {iid}" in lines[0], lines[0]

    grow(small_disk)
    resumed = cli("resume", iid, "--store", store, "--workers", "2", "--quiet", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    st = SqliteStore(store, readonly=True)
    try:  # the data class lives in filler.py: look at the records, not the decoded data
        record = st.read(iid)
        assert record is not None and record.meta["status"] == W.COMPLETED.value
        assert all(rec["status"] == S.SUCCEEDED.value for rec in record.steps.values())
        assert len(record.deltas.get("items", {})) + len(record.fields) > 0
    finally:
        st.close()


# -- the store deleted while a run writes it --------------------------------------------------


def gate(ctx: Any) -> None:
    Path(ctx.data.value + ".started").touch()
    wait_for(ctx.data.value)
    ctx.data.n += 1


def test_a_store_deleted_while_a_run_writes_stops_that_run_with_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "runs.sqlite"
    release = tmp_path / "release"
    wf = WorkflowDefinition("deleted", data_type=Data)
    wf.add_step(StepDefinition("first", "first", add_chunk))
    wf.add_step(StepDefinition("gate", "gate", gate).depends_on(["first"]))
    wf.add_step(StepDefinition("after", "after", add_chunk).depends_on(["gate"]))
    with WorkflowEngine(store=SqliteStore(path), max_workers=2, grace_period=1.0) as engine:
        engine.register_workflow(wf)
        iid = engine.start_workflow("deleted", Data(value=str(release)))
        wait_until(Path(f"{release}.started").exists, 30, "the gate step to start")
        path.unlink()
        release.touch()
        # Before the fix: the run completed, every checkpoint going into the deleted file.
        with pytest.raises(StoreError, match="deleted") as caught:
            engine.wait_for_completion(iid, timeout=60)
        assert str(path) in str(caught.value) and iid in str(caught.value)
    assert not path.exists(), "a new store file was made in place of the deleted one"


# -- many processes creating one store at once ---------------------------------------------

CREATOR = textwrap.dedent(
    """
    import sys
    from datetime import UTC, datetime
    path, go, me = sys.argv[1], sys.argv[2], sys.argv[3]
    from wfaas import SqliteStore, WorkflowState, WorkflowStatus
    from conftest import Data
    open(f"{go}.ready.{me}", "w").close()
    sys.stdin.read()  # blocks until the test closes our stdin: all start opening at the same moment
    for j in range(int(sys.argv[4])):  # the same new stores in the same order: every process races every other
        store = SqliteStore(f"{path}{j}")
        store.save(WorkflowState(instance_id=me, workflow_id="wf", status=WorkflowStatus.COMPLETED, data=Data(n=1),
                                 created_at=datetime.now(UTC)))
        store.close()
    print("ok")
    """
)


@pytest.mark.slow  # a crowd of Python processes racing to create one store
def test_many_processes_creating_one_new_store_at_once_all_open_it(tmp_path: Path) -> None:
    script = tmp_path / "creator.py"
    script.write_text(CREATOR)
    path, go = tmp_path / "new" / "runs.sqlite", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    count, stores = 8, 40
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(path), str(go), f"p{i:02d}", str(stores)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(count)
    ]
    try:
        wait_until(lambda: len(list(tmp_path.glob("go.ready.*"))) == count, 60, "every process to be ready")
        for p in procs:
            assert p.stdin is not None
            p.stdin.close()
        for p in procs:
            p.wait(timeout=60)  # each prints a line or a traceback: far less than a pipe holds
        results = [(p.stdout.read(), p.stderr.read()) for p in procs if p.stdout and p.stderr]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            for pipe in (p.stdout, p.stderr):
                if pipe is not None:
                    pipe.close()
    failures = [(p.returncode, err) for p, (out, err) in zip(procs, results, strict=True) if p.returncode != 0]
    # Before the fix: FileExistsError from some of them.
    assert not failures, failures[0]
    for j in range(stores):
        store = SqliteStore(f"{path}{j}", readonly=True)
        try:
            assert sorted(store.ids()) == [f"p{i:02d}" for i in range(count)]
            assert store.integrity_check() == "ok"
        finally:
            store.close()


# -- a failed checkpoint is reported once, where it is handled ------------------------------------


class FailingStore(InMemoryStore):
    """An in-memory store whose commits fail once ``broken`` is set (as a full disk would)."""

    def __init__(self) -> None:
        super().__init__()
        self.broken = threading.Event()

    def write(self, checkpoints: list[Checkpoint]) -> None:
        if self.broken.is_set():
            raise OSError(28, "No space left on device")
        super().write(checkpoints)


def test_a_failed_checkpoint_is_logged_in_one_line_and_its_traceback_only_at_debug(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = FailingStore()
    release = tmp_path / "release"
    wf = WorkflowDefinition("logged", data_type=Data)
    wf.add_step(StepDefinition("gate", "gate", gate))
    wf.add_step(StepDefinition("after", "after", add_chunk).depends_on(["gate"]))
    caplog.set_level(logging.DEBUG, logger="wfaas")
    with WorkflowEngine(store=store, max_workers=2, grace_period=1.0) as engine:
        engine.register_workflow(wf)
        iid = engine.start_workflow("logged", Data(value=str(release)))
        wait_until(Path(f"{release}.started").exists, 30, "the gate step to start")
        store.broken.set()
        release.touch()
        with pytest.raises(StoreError, match="No space left") as caught:
            engine.wait_for_completion(iid, timeout=60)
        assert iid in str(caught.value)
    about = [r for r in caplog.records if "checkpoint" in r.getMessage()]
    shown = [r for r in about if r.levelno > logging.DEBUG]
    # Before the fix: one ERROR record with the traceback (exc_info), which a CLI prints whole.
    assert shown, "the failure was not logged at all"
    assert all(r.exc_info is None and "\n" not in r.getMessage() for r in shown), [r.getMessage() for r in shown]
    assert all(r.levelno < logging.WARNING for r in shown), "a handled error is not a warning to whoever runs it"
    assert any(r.exc_info for r in about if r.levelno == logging.DEBUG), "the traceback is kept for debugging"


# -- the engine and its store agree about runs that are gone -----------------------------------


def test_the_cleanup_task_stops_at_shutdown_and_runs_finishing_later_stay(
    engine: WorkflowEngine, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    engine.register_workflow(WorkflowDefinition("late", data_type=Data).add_step(StepDefinition("gate", "gate", gate)))
    iid = engine.start_workflow("late", Data(value=str(release)))
    handle = engine.start_cleanup_task(ttl=0, interval=0.01)
    engine.shutdown()
    # Before the fix: the thread went on sweeping, and removed the run once it finished.
    handle._thread.join(timeout=5)
    assert not handle._thread.is_alive(), "the cleanup task still runs after shutdown()"
    release.touch()
    engine.wait_for_completion(iid, timeout=30)
    assert engine.get_status(iid).status is W.COMPLETED
    with pytest.raises(ShuttingDown):
        engine.start_cleanup_task(ttl=0, interval=0.01)


def test_a_run_removed_from_the_store_is_unknown_to_wait_for_completion_as_to_get_status(
    engine: WorkflowEngine,
) -> None:
    engine.register_workflow(WorkflowDefinition("gone", data_type=Data).add_step(StepDefinition("a", "a", add_chunk)))
    iid = engine.start_workflow("gone", Data())
    engine.wait_for_completion(iid, timeout=30)
    assert engine.store.cleanup_old_workflows(0) == 1
    with pytest.raises(NotFound):
        engine.get_status(iid)
    # Before the fix: "completed successfully" for a run get_status says does not exist.
    with pytest.raises(NotFound, match=iid):
        engine.wait_for_completion(iid, timeout=30)


GATED = textwrap.dedent(
    """
    import os, time
    from dataclasses import dataclass
    from wfaas import StepDefinition, WorkflowData, WorkflowDefinition

    @dataclass
    class D(WorkflowData):
        release: str = ""
        n: int = 0

    def gate(ctx):
        open(ctx.data.release + ".started", "w").close()
        deadline = time.monotonic() + 60
        while not os.path.exists(ctx.data.release) and time.monotonic() < deadline:
            time.sleep(0.01)
        ctx.data.n = 1

    def after(ctx):
        ctx.data.n = 2

    workflow = WorkflowDefinition("gated", data_type=D)
    workflow.add_step(StepDefinition("gate", "gate", gate))
    workflow.add_step(StepDefinition("after", "after", after).depends_on(["gate"]))
    """
)


def test_wfaas_local_run_whose_store_is_deleted_stops_with_one_line_and_exit_1(tmp_path: Path) -> None:
    (tmp_path / "gated.py").write_text(GATED)
    store, release = tmp_path / "runs.sqlite", tmp_path / "release"
    proc = subprocess.Popen(
        [*CLI, "run", "gated.py:workflow", "--store", str(store), "--quiet", "--data", f'{{"release": "{release}"}}'],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(Path(f"{release}.started").exists, 60, "the gate step to start")
        store.unlink()
        release.touch()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, (proc.returncode, err)
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("STOPPED:"), err
    assert "deleted" in lines[0] and str(store) in lines[0], lines[0]
    assert "wfaas-local resume" not in lines[0], "a run whose store is gone cannot be resumed"
    assert not store.exists()
