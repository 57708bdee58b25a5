"""Does a long-lived engine grow with every run? RSS after 10 runs and after 1,000, both stores (issue 14).

    python benchmarks/memory_over_runs.py [--runs 1000] [--store sqlite,memory] [--allocator wfaas|glibc]

One ``WorkflowEngine(max_workers=2)`` in a fresh interpreter runs the same
5-step chain again and again, one instance after the other; each step sets a
field of its own to fresh random bytes (``--field-kib``, 5 MiB by default, as
in the issue). The engine process's RSS (``VmRSS``) is read after run 10 and
after the last run, with the workers' beside it, and the Python objects it
still holds (``tracemalloc`` is too slow for 1,000 runs: the growth of
``sys.getallocatedblocks()`` is shown instead).

* **SqliteStore**: the store keeps nothing in memory, so the target is
  RSS(last) - RSS(10) <= 50 MB. Each finished run is removed from the file
  once the next one has finished (``--keep`` keeps them: 1,000 runs of 25 MiB
  would need 25 GB of disk); removing is not what is measured.
* **In-memory store**: it must keep every run's final data, so the figure is
  the growth beyond the bytes the store holds, with the same 50 MB target.
  Its fields are smaller (``--memory-field-kib``, 200 KiB: 1 GiB held after
  1,000 runs).

``--allocator glibc`` shows the "before" of the allocator fix: the engine does
not fix malloc's mmap threshold (see ``wfaas/_malloc.py``). ``--runs 30`` is a
short run (RSS after 10 and after 30). Exits 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wfaas import SqliteStore, StepDefinition, WorkflowData, WorkflowDefinition, WorkflowEngine, _malloc

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TARGET_MB = 50.0
STEPS = "abcde"
FIRST = 10  # the run after which the baseline RSS is read


@dataclass
class Fields(WorkflowData):
    a: bytes = b""
    b: bytes = b""
    c: bytes = b""
    d: bytes = b""
    e: bytes = b""


def fill(ctx: Any) -> None:
    setattr(ctx.data, ctx.step_id, os.urandom(int(os.environ["MEMORY_BENCH_FIELD_BYTES"])))


def rss_mib(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def child(store_kind: str, runs: int, allocator: str, keep: bool, folder: str) -> dict[str, Any]:
    """Runs in the fresh interpreter: one engine, ``runs`` instances in turn; prints the figures."""
    if allocator == "glibc":
        _malloc._tuned = False  # the engine then leaves malloc as glibc sets it
    store = SqliteStore(Path(folder) / "runs.sqlite") if store_kind == "sqlite" else None
    wf = WorkflowDefinition("memory_over_runs", data_type=Fields)
    for i, sid in enumerate(STEPS):
        step = StepDefinition(sid, sid, fill)
        wf.add_step(step.depends_on([STEPS[i - 1]]) if i else step)
    figures: dict[str, Any] = {"store": store_kind, "allocator": allocator, "runs": runs}
    with WorkflowEngine(store=store, max_workers=2) as engine:
        engine.register_workflow(wf)
        started = time.monotonic()
        previous = None
        for n in range(1, runs + 1):
            iid = engine.start_workflow("memory_over_runs", Fields())
            engine.wait_for_completion(iid)
            if store_kind == "sqlite" and previous is not None and not keep:
                engine.store.remove(previous)
            previous = iid
            if n in (FIRST, runs):
                held = 0
                if store_kind == "memory":
                    held = sum(len(b) for i in engine.store.ids() for b in engine.store.read(i).fields.values())
                workers = sum(rss_mib(s.pid) for s in engine._pool.slots if s.pid)
                figures[f"rss_{n}"] = rss_mib()
                figures[f"workers_rss_{n}"] = workers
                figures[f"held_mib_{n}"] = held / 2**20
                figures[f"blocks_{n}"] = sys.getallocatedblocks()
        figures["seconds_per_run"] = (time.monotonic() - started) / runs
    if store is not None:
        store.close()
    return figures


def measure(store_kind: str, runs: int, allocator: str, keep: bool, field_kib: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="wfaas-memory-") as folder:
        env = {**os.environ, "MEMORY_BENCH_FIELD_BYTES": str(field_kib * 1024)}
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
        cmd = [sys.executable, __file__, "--child", json.dumps([store_kind, runs, allocator, keep, folder])]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, check=False, timeout=6 * 3600)
    if out.returncode != 0:
        raise RuntimeError(f"{store_kind}/{allocator} exited {out.returncode}:\n{out.stderr[-4000:]}")
    figures: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    figures["field_kib"] = field_kib
    return figures


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(*json.loads(sys.argv[2]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1000, help=f"instances in turn (> {FIRST}); 30 for a short run")
    parser.add_argument("--store", default="sqlite,memory", help="sqlite, memory or both (comma-separated)")
    parser.add_argument("--allocator", choices=("wfaas", "glibc"), default="wfaas", help="glibc: without the fix")
    parser.add_argument("--field-kib", type=int, default=5120, help="bytes each step writes, SqliteStore")
    parser.add_argument("--memory-field-kib", type=int, default=200, help="bytes each step writes, in-memory store")
    parser.add_argument("--keep", action="store_true", help="keep finished runs in the SQLite file")
    args = parser.parse_args()
    if args.runs <= FIRST:
        parser.error(f"--runs must be more than {FIRST}")
    print(f"RSS of one engine (MiB) after run {FIRST} and run {args.runs}, 5-step chain, allocator: {args.allocator}")
    print(
        f"{'store':<7} {'field':>8} {f'rss@{FIRST}':>8} {f'rss@{args.runs}':>9} {'growth':>7} {'store holds':>12} "
        f"{'excess':>7} {'workers':>15} {'py blocks':>10} {'s/run':>6}  verdict"
    )
    missed = False
    for kind in args.store.split(","):
        field_kib = args.field_kib if kind == "sqlite" else args.memory_field_kib
        f = measure(kind, args.runs, args.allocator, args.keep, field_kib)
        last = args.runs
        growth = f[f"rss_{last}"] - f[f"rss_{FIRST}"]
        held = f[f"held_mib_{last}"] - f[f"held_mib_{FIRST}"]
        excess = growth - held
        ok = excess <= TARGET_MB
        missed |= not ok
        workers = f"{f[f'workers_rss_{FIRST}']:.0f} → {f[f'workers_rss_{last}']:.0f}"
        print(
            f"{kind:<7} {field_kib:>5}KiB {f[f'rss_{FIRST}']:>8.0f} {f[f'rss_{last}']:>9.0f} {growth:>+7.0f} "
            f"{held:>+12.0f} {excess:>+7.0f} {workers:>15} {f[f'blocks_{last}'] - f[f'blocks_{FIRST}']:>+10} "
            f"{f['seconds_per_run']:>6.2f}  {'met' if ok else 'MISSED'} (target: excess ≤ {TARGET_MB:.0f} MB)"
        )
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
