"""Where wfaas spends its per-step time: cProfile on the engine's threads and in its workers.

    python benchmarks/profile_step.py [--workload fanout,chain] [--n N] [--store memory|sqlite]
                                      [--top 25] [--no-workers] [--sort cumulative,tottime]

Runs each workload (the ones of ``run.py``: a fan-out of trivial ``i % 7``
steps plus a join, and a chain of ``x + 1`` steps) once on a warmed
``WorkflowEngine(max_workers=2)`` and prints, per workload:

* the scheduler thread's profile (it is a thread: ``cProfile`` only sees the
  thread that enabled it, so every thread started by the engine profiles
  itself from its first instruction),
* the other engine threads (main thread in ``start_workflow`` /
  ``wait_for_completion``, events, SQLite committer and sqlitedict's thread),
* the worker processes' profile (unless ``--no-workers``): the workers run
  ``profile_step.worker_main``, which wraps ``wfaas._worker.main`` in cProfile
  and dumps its stats when the engine stops it,

each as the top ``--top`` functions by cumulative and by total (own) time,
with the profiled time per step. cProfile's own overhead inflates functions
that are called very often; compare shares, not absolute times, with
``run.py``'s figures.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402 - the workloads' bodies and builders, shared with run.py

_PROFILE_DIR_ENV = "WFAAS_PROFILE_DIR"
_TIMER_ENV = "WFAAS_PROFILE_TIMER"


def new_profile() -> cProfile.Profile:
    """A profiler timing with this thread's CPU clock ("cpu", the default) or the wall clock ("wall")."""
    if os.environ.get(_TIMER_ENV, "cpu") == "wall":
        return cProfile.Profile()
    return cProfile.Profile(time.thread_time)


def worker_main(conn: Any, *args: Any) -> None:
    """``wfaas._worker.main`` under cProfile; stats land in $WFAAS_PROFILE_DIR/worker-PID.prof.

    Runs in a worker process: it reaches there by name (this module is on the
    engine's ``sys.path``, which forkserver hands to its children).
    """
    from wfaas import _worker

    profile = new_profile()
    profile.enable()
    try:
        _worker.main(conn, *args)
    finally:
        profile.disable()
        out = os.environ.get(_PROFILE_DIR_ENV)
        if out:
            profile.dump_stats(os.path.join(out, f"worker-{os.getpid()}.prof"))


class ThreadProfiles:
    """Every thread started while installed profiles itself; profiles are kept by thread name."""

    def __init__(self) -> None:
        self.profiles: dict[str, list[cProfile.Profile]] = {}
        self._lock = threading.Lock()
        self._original: Callable[..., None] | None = None
        self.enabled = False

    def install(self) -> None:
        original = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]
        self._original = original
        profiles = self

        def bootstrap(thread: threading.Thread) -> None:
            profile = new_profile()
            name = thread.name.split(" ")[0].rstrip("0123456789-") or "thread"
            if name == "Thread":
                name = "unnamed (sqlitedict)"
            with profiles._lock:
                profiles.profiles.setdefault(name, []).append(profile)
            profile.enable()
            try:
                original(thread)
            finally:
                profile.disable()

        threading.Thread._bootstrap_inner = bootstrap  # type: ignore[attr-defined]

    def uninstall(self) -> None:
        if self._original is not None:
            threading.Thread._bootstrap_inner = self._original  # type: ignore[attr-defined]

    def reset(self) -> None:
        """Forget what was recorded so far (the warm-up); the threads keep profiling."""
        with self._lock:
            for profiles in self.profiles.values():
                for p in profiles:
                    p.clear()  # safe on a profiler running in another thread (it drops its call stack)

    def snapshot(self, names: Callable[[str], bool]) -> pstats.Stats | None:
        """The merged stats so far of the threads whose name matches, without stopping them.

        (``Profile.disable`` and ``create_stats`` act on the calling thread, not on the profiled one.)
        """
        stats: pstats.Stats | None = None
        with self._lock:
            for name, profiles in self.profiles.items():
                if not names(name):
                    continue
                for p in profiles:
                    p.snapshot_stats()
                    if not p.stats:  # type: ignore[attr-defined]
                        continue
                    snap = _Snapshot(p.stats)  # type: ignore[attr-defined]
                    if stats is None:
                        stats = pstats.Stats(snap)  # type: ignore[arg-type]
                    else:
                        stats.add(snap)
        return stats


class _Snapshot:
    """What pstats.Stats accepts: an object with ``create_stats()`` and ``stats``."""

    def __init__(self, stats: dict[Any, Any]) -> None:
        self.stats = stats

    def create_stats(self) -> None:
        pass


def stats_text(stats: pstats.Stats, sort: str, top: int) -> str:
    buf = io.StringIO()
    stats.stream = buf  # type: ignore[attr-defined]
    stats.sort_stats(sort).print_stats(top)
    text = buf.getvalue()
    # Drop pstats' preamble up to the table header; keep the totals line.
    lines = text.splitlines()
    keep = [line for line in lines if "function calls" in line]
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
    return "\n".join([*keep, "", *lines[start:]])


def total_time(stats: pstats.Stats) -> float:
    return float(stats.total_tt)  # type: ignore[attr-defined]


def show(title: str, stats: pstats.Stats | None, n: int, sorts: list[str], top: int) -> None:
    if stats is None:
        print(f"\n=== {title}: nothing recorded")
        return
    stats.strip_dirs()
    tt = total_time(stats)
    print(f"\n=== {title}: {tt:.3f} s profiled, {tt / n * 1e6:.1f} µs per step")
    for sort in sorts:
        print(f"\n--- top {top} by {sort} ---")
        print(stats_text(stats, sort, top))


def as_script(*functions: Callable[..., Any]) -> None:
    """Make run.py's module-level bodies travel as a user's script's do: by value (dill), not by name."""
    for fn in functions:
        fn.__module__ = "__main__"


def build(workload: str, n: int) -> Any:
    if workload == "fanout":
        return bench.fanout_def("fanout", [bench.fan_body(i) for i in range(n)])
    if workload == "chain":
        return bench.chain_def("chain", n, bench.inc_body)
    raise SystemExit(f"unknown workload {workload!r}: fanout or chain")


def worker_stats(prof_dir: Path, pids: list[int]) -> tuple[pstats.Stats | None, int]:
    """The merged profiles the given workers dumped when the engine stopped them (files removed)."""
    deadline = time.monotonic() + 5.0
    files = [prof_dir / f"worker-{pid}.prof" for pid in pids]
    while not all(f.exists() for f in files) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.05)  # let the last write finish
    found = [str(f) for f in files if f.exists()]
    stats = pstats.Stats(*found) if found else None
    for f in files:
        f.unlink(missing_ok=True)
    return stats, len(found)


def profile_workload(workload: str, n: int, store: str, prof_dir: Path | None, sorts: list[str], top: int) -> None:
    m = bench.w()
    threads = ThreadProfiles()
    threads.install()
    main_profile = new_profile()
    with tempfile.TemporaryDirectory() as tmp:
        from wfaas import _worker

        original_main = _worker.main
        if prof_dir is not None:
            import profile_step  # this file as an importable module, so workers find worker_main by name

            _worker.main = profile_step.worker_main  # type: ignore[assignment]
        try:
            engine = bench.new_engine(store, tmp)
        finally:
            _worker.main = original_main  # type: ignore[assignment]
        workers = bench.engine_workers(engine)
        engine.register_workflow(build(workload, n))
        # Only the measured run counts: the engine's threads forget the warm-up.
        threads.reset()
        t0 = time.perf_counter()
        main_profile.enable()
        iid = engine.start_workflow(workload, m.BenchData())
        engine.wait_for_completion(iid, timeout=600)
        main_profile.disable()
        wall = time.perf_counter() - t0
        scheduler = threads.snapshot(lambda name: name == "wfaas-scheduler")
        others = threads.snapshot(lambda name: name != "wfaas-scheduler")
        bench.close_engine(engine)
        threads.uninstall()
    timer = os.environ.get(_TIMER_ENV, "cpu")
    print(
        f"\n######## {workload}: {n} steps, {store} store: {wall:.3f} s wall under the profiler; "
        f"times below are {'CPU' if timer == 'cpu' else 'wall'} time ########"
    )
    show("scheduler thread (wfaas-scheduler)", scheduler, n, sorts, top)
    show("main thread (start_workflow, wait_for_completion)", pstats.Stats(main_profile), n, sorts[:1], 12)
    show("other engine threads, together", others, n, sorts[-1:], min(top, 15))
    if prof_dir is not None:
        stats, count = worker_stats(prof_dir, workers)
        show(f"worker processes ({count} profiles, warm-up included)", stats, n, sorts, top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="fanout,chain", help="comma-separated: fanout, chain")
    parser.add_argument("--n", type=int, help="steps (default: 500 for fanout, 100 for chain)")
    parser.add_argument("--store", choices=("memory", "sqlite"), default="memory")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--sort", default="cumulative,tottime", help="pstats sort keys, comma-separated")
    parser.add_argument("--no-workers", action="store_true", help="do not profile the worker processes")
    parser.add_argument(
        "--timer",
        choices=("cpu", "wall"),
        default="cpu",
        help="cpu (default): each thread's own CPU time, so blocking in poll/recv is not counted; "
        "wall: elapsed time, which also shows where a thread waits",
    )
    args = parser.parse_args()
    sorts = [s for s in args.sort.split(",") if s]
    as_script(bench.inc_body, bench.join_body)
    with tempfile.TemporaryDirectory(prefix="wfaas-profile-") as tmp:
        # Set once, before the first engine starts the forkserver: its children (the
        # workers of every engine in this process) inherit the forkserver's environment.
        os.environ[_TIMER_ENV] = args.timer
        os.environ[_PROFILE_DIR_ENV] = tmp
        prof_dir = None if args.no_workers else Path(tmp)
        for workload in filter(None, args.workload.split(",")):
            n = args.n or {"fanout": 500, "chain": 100}.get(workload, 100)
            profile_workload(workload, n, args.store, prof_dir, sorts, args.top)


if __name__ == "__main__":
    main()
