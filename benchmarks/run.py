"""wfaas against a bare ProcessPoolExecutor: the workloads and targets of issue 6, side by side.

    python benchmarks/run.py [--reps N] [--quick] [--only W,...] [--out benchmarks/RESULTS.md]

Every workload runs on wfaas (``WorkflowEngine(max_workers=2)``) and on a bare
``concurrent.futures.ProcessPoolExecutor(max_workers=2)`` driven by a loop in
the parent, in the same run. Each repetition is a fresh interpreter
(``run.py --child WORKLOAD SYSTEM PARAMS`` prints one JSON line), and the
repetitions of the two systems alternate (wfaas, baseline, baseline, wfaas, ...)
so that load on the machine hits both alike. The report gives medians with
min and max, ratios of medians, the targets of issue 6 and whether each is met.

``--only`` takes case names or groups (fanout, chain, cpu, payload, durable,
scale, fixed, big, cli, dask, for_each). ``--quick`` is CI's smoke test: one repetition of small sizes,
written to a temporary file unless ``--out`` is given; it checks that
everything runs, never the figures.

Both systems are warmed before timing (workers started, one round trip each),
so per-step figures are per-step costs; start-up is reported under fixed costs.
The scheduler's CPU time is read from the scheduler thread's own CPU clock
(``pthread_getcpuclockid``); "engine CPU" is the whole engine process
(``getrusage(RUSAGE_SELF)``: every thread, no worker).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKERS = 2
SYSTEMS = ("wfaas", "baseline")

# --------------------------------------------------------------------------------------
# The cases. ``params`` for a full run, ``quick`` for --quick; ``baseline`` False: wfaas only.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    group: str
    workload: str
    params: dict[str, Any]
    quick: dict[str, Any]
    baseline: bool = True


CASES = [
    Case("fanout", "fanout", "fanout", {"n": 500}, {"n": 100}),
    Case("chain", "chain", "chain", {"n": 100}, {"n": 20}),
    Case("cpu", "cpu", "cpu", {"n": 8, "seconds": 0.5}, {"n": 2, "seconds": 0.05}),
    Case("payload", "payload", "payload", {"n": 20, "mib": 5}, {"n": 3, "mib": 5}),
    Case("fanout_sqlite", "durable", "fanout", {"n": 500, "store": "sqlite"}, {"n": 100, "store": "sqlite"}),
    Case("chain_sqlite", "durable", "chain", {"n": 100, "store": "sqlite"}, {"n": 20, "store": "sqlite"}),
    Case("scale_chain_1k", "scale", "chain", {"n": 1000}, {"n": 100}),
    Case("scale_chain_10k", "scale", "chain", {"n": 10000}, {"n": 500}),
    Case("scale_fanout_1k", "scale", "fanout", {"n": 1000}, {"n": 100}),
    Case("scale_fanout_10k", "scale", "fanout", {"n": 10000}, {"n": 500}),
    Case("durable_chain_1k", "durable", "chain", {"n": 1000, "store": "sqlite"}, {"n": 100, "store": "sqlite"}, False),
    Case(
        "durable_chain_10k", "durable", "chain", {"n": 10000, "store": "sqlite"}, {"n": 500, "store": "sqlite"}, False
    ),
    Case("fixed", "fixed", "fixed", {"n": 500}, {"n": 50}),
    Case("import", "fixed", "import", {"n": 10}, {"n": 3}),
    # Issue 17: flat at 100k (per-step cost against scale_*_1k, memory per step), the CLI on a
    # 20,000-step SqliteStore run, and Dask's per-task overhead against plain Dask tasks.
    Case("scale_fanout_100k", "big", "fanout", {"n": 100_000}, {"n": 1000}, False),
    Case("scale_chain_20k", "big", "chain", {"n": 20_000}, {"n": 500}, False),
    Case("cli_20k", "cli", "cli", {"n": 20_000}, {"n": 500}, False),
    Case("dask", "dask", "dask", {"n": 300}, {"n": 20}, False),
    # Issue 12/17: 10,000 for_each items against scale_fanout_10k's steps (at most 1.5 times per unit).
    Case("for_each_10k", "for_each", "for_each", {"n": 10_000}, {"n": 500}, False),
]

# --------------------------------------------------------------------------------------
# Step bodies. They live in this script's __main__, as a user's would: wfaas sends
# them by value (dill); the baseline's forked workers find them by name.
# --------------------------------------------------------------------------------------


def mod7(i: int) -> int:
    return i % 7


def inc(x: int) -> int:
    return x + 1


def spin(loops: int) -> int:
    total = 0
    for i in range(loops):
        total += i % 7
    return total


def touch(blob: bytes) -> bytes:
    """A new 5 MB value each step (rotated by one byte), so it must travel back every time."""
    return blob[1:] + blob[:1]


def stamp() -> float:
    return time.time()


def fan_body(i: int) -> Callable[[Any], None]:
    def body(ctx: Any) -> None:
        ctx.data.results[i] = i % 7

    return body


def spin_body(i: int, loops: int) -> Callable[[Any], None]:
    def body(ctx: Any) -> None:
        ctx.data.results[i] = spin(loops)

    return body


def item_body(ctx: Any) -> None:
    ctx.data.results[ctx.item] = ctx.item % 7


def fan_items(data: Any) -> range:
    return range(data.x)


def join_body(ctx: Any) -> None:
    ctx.data.total = sum(ctx.data.results.values())


def inc_body(ctx: Any) -> None:
    ctx.data.x = ctx.data.x + 1


def touch_body(ctx: Any) -> None:
    ctx.data.blob = touch(ctx.data.blob)


def stamp_body(ctx: Any) -> None:
    ctx.data.first = time.time()


_W: SimpleNamespace | None = None


def w() -> SimpleNamespace:
    """wfaas and the benchmark's data class, imported only in wfaas children.

    (The baseline's workers are forked from its child; they should not carry wfaas.)
    """
    global _W
    if _W is None:
        import wfaas

        @dataclass
        class BenchData(wfaas.WorkflowData):
            results: dict[int, int] = field(default_factory=dict)
            x: int = 0
            total: int = 0
            blob: bytes = b""
            first: float = 0.0

        _W = SimpleNamespace(wfaas=wfaas, BenchData=BenchData)
    return _W


def fanout_def(wid: str, bodies: list[Callable[[Any], None]]) -> Any:
    m = w()
    wf = m.wfaas.WorkflowDefinition(wid, wid, data_type=m.BenchData)
    for i, body in enumerate(bodies):
        wf.add_step(m.wfaas.StepDefinition(f"s{i}", f"s{i}", body))
    join = m.wfaas.StepDefinition("join", "join", join_body).depends_on([f"s{i}" for i in range(len(bodies))])
    return wf.add_step(join)


def chain_def(wid: str, n: int, body: Callable[[Any], None]) -> Any:
    m = w()
    wf = m.wfaas.WorkflowDefinition(wid, wid, data_type=m.BenchData)
    for i in range(n):
        step = m.wfaas.StepDefinition(f"s{i}", f"s{i}", body)
        if i:
            step.depends_on([f"s{i - 1}"])
        wf.add_step(step)
    return wf


# --------------------------------------------------------------------------------------
# Measuring helpers (child side)
# --------------------------------------------------------------------------------------


def proc_cpu() -> float:
    """CPU seconds of this process, all threads, no children (the workers are other processes)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def workers_cpu(pids: list[int]) -> float:
    """CPU seconds used so far by these processes, every thread, from /proc/PID/task/*/schedstat (ns)."""
    total = 0
    for pid in pids:
        for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
            try:
                total += int(stat.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue  # the thread ended meanwhile
    return total / 1e9


def engine_workers(engine: Any) -> list[int]:
    return [s.pid for s in engine._pool.slots if s.pid]  # no public way to list them


def pool_workers(pool: ProcessPoolExecutor) -> list[int]:
    return list(pool._processes or {})  # no public way to list them


def peak_rss_mib(pid: int) -> float:
    """A process's peak RSS (VmHWM), MiB; 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def own_peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def own_rss_mib() -> float:
    """This process's resident memory now (VmRSS), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def growth(rss_before: float, n: int) -> dict[str, float]:
    """The engine process's peak RSS above ``rss_before`` (a warmed engine, before register_workflow), per step.

    It counts the definition, the run's state and everything the engine held at its
    peak; the figure of a small run is dominated by allocator noise.
    """
    peak = own_peak_rss_mib()
    return {
        "rss_before_mib": rss_before,
        "rss_growth_mib": peak - rss_before,
        "kib_per_step": (peak - rss_before) * 1024 / n,
    }


def new_engine(store: str, tmp: str) -> Any:
    """A warmed engine: both workers started and through one round trip."""
    m = w()
    st = m.wfaas.SqliteStore(os.path.join(tmp, "bench.sqlite")) if store == "sqlite" else None
    engine = m.wfaas.WorkflowEngine(store=st, max_workers=WORKERS)
    engine.register_workflow(fanout_def("warm", [fan_body(i) for i in range(2 * WORKERS)]))
    iid = engine.start_workflow("warm", m.BenchData())
    engine.wait_for_completion(iid, timeout=120)
    return engine


def close_engine(engine: Any) -> None:
    store = engine.store
    engine.close()
    close = getattr(store, "close", None)
    if close is not None:
        close()


def threads_cpu() -> dict[str, float]:
    """CPU seconds used so far by each live thread of this process, by thread name."""
    out: dict[str, float] = {}
    for t in threading.enumerate():
        if t.ident is None:
            continue
        try:
            seconds = time.clock_gettime(time.pthread_getcpuclockid(t.ident))
        except (OSError, ValueError):
            continue  # it ended meanwhile
        name = "main" if t is threading.main_thread() else t.name.rstrip("0123456789-")
        out[name] = out.get(name, 0.0) + seconds
    return out


def timed_run(engine: Any, wid: str, data: Any) -> tuple[dict[str, float], Any]:
    """Run one instance from start_workflow to wait_for_completion; wall and CPU figures.

    ``sched_cpu_s`` is the scheduler thread's CPU time, ``engine_cpu_s`` the
    whole process's; ``thread:<name>`` keys break the latter down by thread
    (threads that ended during the run are missing from the breakdown).
    """
    workers = engine_workers(engine)
    before = threads_cpu()
    w0, c0, t0 = workers_cpu(workers), proc_cpu(), time.perf_counter()
    iid = engine.start_workflow(wid, data)
    engine.wait_for_completion(iid, timeout=3600)
    wall = time.perf_counter() - t0
    engine_cpu, workers_used = proc_cpu() - c0, workers_cpu(workers) - w0
    after = threads_cpu()
    per_thread = {f"thread:{k}": v - before.get(k, 0.0) for k, v in after.items()}
    figures = {
        "wall_s": wall,
        "sched_cpu_s": per_thread.get("thread:wfaas-scheduler", 0.0),
        "engine_cpu_s": engine_cpu,
        "workers_cpu_s": workers_used,
    }
    return {**figures, **per_thread}, engine.get_status(iid).data


def new_pool() -> ProcessPoolExecutor:
    """A warmed bare pool: both workers started and through a round trip."""
    pool = ProcessPoolExecutor(max_workers=WORKERS)
    list(pool.map(mod7, range(4 * WORKERS)))
    return pool


def baseline_figures(t0: float, c0: float, w0: float, pids: list[int]) -> dict[str, float]:
    return {
        "wall_s": time.perf_counter() - t0,
        "engine_cpu_s": proc_cpu() - c0,
        "workers_cpu_s": workers_cpu(pids) - w0,
    }


def per_step(figures: dict[str, float], n: int) -> dict[str, float]:
    out = dict(figures)
    out["per_step_us"] = figures["wall_s"] / n * 1e6
    out["per_step_ms"] = figures["wall_s"] / n * 1e3
    for key in ("sched_cpu_s", "engine_cpu_s", "workers_cpu_s"):
        if key in figures:
            out[key.replace("_s", "_us_per_step")] = figures[key] / n * 1e6
    return out


# --------------------------------------------------------------------------------------
# Workloads: one repetition each, in the current (fresh) interpreter
# --------------------------------------------------------------------------------------


def wl_fanout(system: str, n: int, store: str = "memory") -> dict[str, float]:
    """n independent trivial steps (i % 7), then a join summing them."""
    expected = sum(i % 7 for i in range(n))
    if system == "baseline":
        with new_pool() as pool:
            pids = pool_workers(pool)
            w0, c0, t0 = workers_cpu(pids), proc_cpu(), time.perf_counter()
            futures = [pool.submit(mod7, i) for i in range(n)]
            total = sum(f.result() for f in futures)
            figures = baseline_figures(t0, c0, w0, pids)
        assert total == expected, total
        return per_step(figures, n)
    m = w()
    with tempfile.TemporaryDirectory() as tmp:
        engine = new_engine(store, tmp)
        rss_before = own_rss_mib()
        t0 = time.perf_counter()
        engine.register_workflow(fanout_def("fanout", [fan_body(i) for i in range(n)]))
        register = time.perf_counter() - t0
        figures, data = timed_run(engine, "fanout", m.BenchData())
        figures.update(growth(rss_before, n))
        close_engine(engine)
    assert data.total == expected, data.total
    return {**per_step(figures, n), "register_s": register}


def wl_for_each(system: str, n: int) -> dict[str, float]:
    """One for_each step over n items (i % 7 each), then the join: the same work as wl_fanout's n steps."""
    if system == "baseline":
        return wl_fanout(system, n)
    m = w()
    wf = m.wfaas.WorkflowDefinition("for_each", "for_each", data_type=m.BenchData)
    wf.add_step(m.wfaas.StepDefinition("each", "each", item_body).for_each(fan_items))
    wf.add_step(m.wfaas.StepDefinition("join", "join", join_body).depends_on(["each"]))
    with tempfile.TemporaryDirectory() as tmp:
        engine = new_engine("memory", tmp)
        rss_before = own_rss_mib()
        engine.register_workflow(wf)
        figures, data = timed_run(engine, "for_each", m.BenchData(x=n))
        figures.update(growth(rss_before, n))
        close_engine(engine)
    assert data.total == sum(i % 7 for i in range(n)), data.total
    return per_step(figures, n)


def wl_chain(system: str, n: int, store: str = "memory") -> dict[str, float]:
    """n dependent trivial steps (x + 1), the value threaded through."""
    if system == "baseline":
        with new_pool() as pool:
            x = 0
            pids = pool_workers(pool)
            w0, c0, t0 = workers_cpu(pids), proc_cpu(), time.perf_counter()
            for _ in range(n):
                x = pool.submit(inc, x).result()
            figures = baseline_figures(t0, c0, w0, pids)
        assert x == n, x
        return per_step(figures, n)
    m = w()
    with tempfile.TemporaryDirectory() as tmp:
        engine = new_engine(store, tmp)
        rss_before = own_rss_mib()
        t0 = time.perf_counter()
        engine.register_workflow(chain_def("chain", n, inc_body))
        register = time.perf_counter() - t0
        figures, data = timed_run(engine, "chain", m.BenchData())
        figures.update(growth(rss_before, n))
        close_engine(engine)
    assert data.x == n, data.x
    return {**per_step(figures, n), "register_s": register}


def calibrate(seconds: float) -> int:
    loops = 100_000
    while True:
        t0 = time.perf_counter()
        spin(loops)
        took = time.perf_counter() - t0
        if took > 0.05:
            return max(1, int(loops * seconds / took))
        loops *= 4


def time_spin(loops: int) -> float:
    t0 = time.perf_counter()
    spin(loops)
    return time.perf_counter() - t0


def wl_cpu(system: str, n: int, seconds: float) -> dict[str, float]:
    """n independent pure-Python CPU steps of ~``seconds`` each, then a join.

    efficiency = (n * single-step time / workers) / wall, the single-step time
    measured in this same process just before and just after the run (mean).
    """
    loops = calibrate(seconds)
    before = time_spin(loops)
    expected = n * ((loops // 7) * 21 + sum(range(loops % 7)))  # n * spin(loops), without spinning
    if system == "baseline":
        with new_pool() as pool:
            t0 = time.perf_counter()
            futures = [pool.submit(spin, loops) for _ in range(n)]
            total = sum(f.result() for f in futures)
            wall = time.perf_counter() - t0
    else:
        m = w()
        with tempfile.TemporaryDirectory() as tmp:
            engine = new_engine("memory", tmp)
            engine.register_workflow(fanout_def("cpu", [spin_body(i, loops) for i in range(n)]))
            figures, data = timed_run(engine, "cpu", m.BenchData())
            close_engine(engine)
        wall, total = figures["wall_s"], data.total
    after = time_spin(loops)
    assert total == expected, total
    single = (before + after) / 2
    return {"wall_s": wall, "single_s": single, "efficiency": n * single / WORKERS / wall}


def wl_payload(system: str, n: int, mib: int) -> dict[str, float]:
    """n dependent steps each replacing a field holding a ``mib`` MiB bytes value."""
    blob = os.urandom(mib * 2**20)
    k = n % len(blob)
    expected = blob[k:] + blob[:k]
    if system == "baseline":
        with new_pool() as pool:
            pids = pool_workers(pool)
            w0, c0, t0 = workers_cpu(pids), proc_cpu(), time.perf_counter()
            for _ in range(n):
                blob = pool.submit(touch, blob).result()
            figures = baseline_figures(t0, c0, w0, pids)
        assert blob == expected
        return per_step(figures, n)
    m = w()
    with tempfile.TemporaryDirectory() as tmp:
        engine = new_engine("memory", tmp)
        engine.register_workflow(chain_def("payload", n, touch_body))
        figures, data = timed_run(engine, "payload", m.BenchData(blob=blob))
        close_engine(engine)
    assert data.blob == expected
    return per_step(figures, n)


def wl_fixed(system: str, n: int) -> dict[str, float]:
    """Cold start and memory.

    wfaas: engine creation; start_workflow to the first step running on that
    cold engine (the step records time.time()); then an n-step fan-out, and the
    peak RSS of the engine process and of its workers. Baseline: the same on a
    fresh pool (its first submit also starts the workers).
    """
    if system == "baseline":
        t0 = time.perf_counter()
        pool = ProcessPoolExecutor(max_workers=WORKERS)
        created = time.perf_counter() - t0
        t1 = time.time()
        first = pool.submit(stamp).result() - t1
        total = sum(f.result() for f in [pool.submit(mod7, i) for i in range(n)])
        assert total == sum(i % 7 for i in range(n))
        workers = pool_workers(pool)
        figures = {
            "create_s": created,
            "first_step_s": first,
            "engine_peak_rss_mib": own_peak_rss_mib(),
            "worker_peak_rss_mib": max(peak_rss_mib(p) for p in workers),
            "helpers_rss_mib": 0.0,
        }
        pool.shutdown()
        return figures
    import psutil

    m = w()
    t0 = time.perf_counter()
    engine = m.wfaas.WorkflowEngine(max_workers=WORKERS)
    created = time.perf_counter() - t0
    engine.register_workflow(chain_def("first", 1, stamp_body))
    t1 = time.time()
    iid = engine.start_workflow("first", m.BenchData())
    engine.wait_for_completion(iid, timeout=60)
    first = engine.get_status(iid).data.first - t1
    engine.register_workflow(fanout_def("fanout", [fan_body(i) for i in range(n)]))
    iid = engine.start_workflow("fanout", m.BenchData())
    engine.wait_for_completion(iid, timeout=600)
    workers = engine_workers(engine)
    helpers = [p for p in psutil.Process().children(recursive=True) if p.pid not in workers]
    helpers_rss = sum(p.memory_info().rss for p in helpers if p.is_running()) / 2**20
    figures = {
        "create_s": created,
        "first_step_s": first,
        "engine_peak_rss_mib": own_peak_rss_mib(),
        "worker_peak_rss_mib": max(peak_rss_mib(p) for p in workers),
        "helpers_rss_mib": helpers_rss,
    }
    engine.close()
    return figures


def wl_cli(system: str, n: int) -> dict[str, float]:
    """``wfaas-local status`` and ``report`` of an n-step run in a SqliteStore, each the best of 3, seconds.

    The run is an n-step fan-out and its join, finished; each command is a fresh
    interpreter, as a user's (``python -c "from wfaas.command_line import main; main()"``:
    the console script without the pyenv/venv shim in front of it).
    """
    m = w()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.sqlite")
        engine = new_engine("sqlite", tmp)
        engine.register_workflow(fanout_def("cli", [fan_body(i) for i in range(n)]))
        iid = engine.start_workflow("cli", m.BenchData())
        engine.wait_for_completion(iid, timeout=3600)
        close_engine(engine)
        cli = [sys.executable, "-c", "from wfaas.command_line import main; main()"]
        html = os.path.join(tmp, "report.html")
        figures: dict[str, float] = {}
        for name, args in (("status", ["status", iid]), ("report", ["report", iid, "-o", html])):
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                subprocess.run([*cli, *args, "--store", path], capture_output=True, check=True)
                times.append(time.perf_counter() - t0)
            figures[f"{name}_s"] = min(times)
        figures["report_kib"] = os.path.getsize(html) / 1024
        figures["store_mib"] = os.path.getsize(path) / 2**20
    return figures


def wl_dask(system: str, n: int) -> dict[str, float]:
    """Per-task overhead on one LocalCluster (2 worker processes, 1 thread each): wfaas's DaskBackend
    running an n-step fan-out and its join, against plain Dask running n trivial tasks (submit all,
    gather), in the same child and on the same cluster, alternating plain, wfaas, wfaas, plain.
    """
    import dask
    import distributed

    m = w()
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = distributed.Client(cluster)
    engine = m.wfaas.WorkflowEngine(backend=m.wfaas.DaskBackend(client))
    try:
        engine.register_workflow(fanout_def("fanout", [fan_body(i) for i in range(n)]))
        engine.register_workflow(fanout_def("warm", [fan_body(i) for i in range(4)]))
        engine.wait_for_completion(engine.start_workflow("warm", m.BenchData()), timeout=600)
        client.gather([client.submit(mod7, i, pure=False) for i in range(4)])
        expected = sum(i % 7 for i in range(n))

        def plain() -> float:
            t0 = time.perf_counter()
            total = sum(client.gather([client.submit(mod7, i, pure=False) for i in range(n)]))
            assert total == expected, total
            return (time.perf_counter() - t0) / n * 1e3

        def on_wfaas() -> float:
            t0 = time.perf_counter()
            iid = engine.start_workflow("fanout", m.BenchData())
            engine.wait_for_completion(iid, timeout=3600)
            took = time.perf_counter() - t0
            assert engine.get_status(iid).data.total == expected
            return took / (n + 1) * 1e3

        def plain_in_flight() -> float:
            """Plain Dask with as many tasks in flight as wfaas keeps (one per worker thread)."""
            todo = iter(range(n))
            t0 = time.perf_counter()
            pending = distributed.as_completed([client.submit(mod7, next(todo), pure=False) for _ in range(2)])
            total = 0
            for future in pending:
                total += future.result()
                for i in todo:
                    pending.add(client.submit(mod7, i, pure=False))
                    break
            assert total == expected, total
            return (time.perf_counter() - t0) / n * 1e3

        plains, ours = [plain()], [on_wfaas()]
        ours.append(on_wfaas())
        plains.append(plain())
        in_flight = plain_in_flight()
    finally:
        engine.close()
        client.close()
        cluster.close()
    return {
        "plain_ms_per_task": statistics.mean(plains),
        "wfaas_ms_per_step": statistics.mean(ours),
        "plain_2_in_flight_ms_per_task": in_flight,
    }


IMPORTS = {
    # (the module, what a program running steps imports from it)
    "wfaas": ("import wfaas", "from wfaas import WorkflowEngine, WorkflowDefinition, StepDefinition, WorkflowData"),
    "baseline": ("import concurrent.futures", "from concurrent.futures import ProcessPoolExecutor"),
}


def time_import(statement: str) -> float:
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout)


def wl_import(system: str, n: int = 10) -> dict[str, float]:
    """``import wfaas`` (baseline: ``import concurrent.futures``), best of ``n`` fresh interpreters, seconds.

    ``import_s`` is the module alone (both load what they run lazily, on first use of
    the name); ``import_use_s`` the names a program needs to run steps.
    """
    if system == "wfaas":
        # As installed by pip: bytecode compiled. An editable checkout run with
        # PYTHONDONTWRITEBYTECODE=1 (as here) would otherwise time the compiler.
        import compileall

        compileall.compile_dir(str(Path(__file__).resolve().parent.parent / "wfaas"), quiet=1)
    bare, use = IMPORTS[system]
    return {
        "import_s": min(time_import(bare) for _ in range(n)),
        "import_use_s": min(time_import(use) for _ in range(n)),
    }


WORKLOADS: dict[str, Callable[..., dict[str, float]]] = {
    "fanout": wl_fanout,
    "chain": wl_chain,
    "cpu": wl_cpu,
    "payload": wl_payload,
    "fixed": wl_fixed,
    "import": wl_import,
    "cli": wl_cli,
    "dask": wl_dask,
    "for_each": wl_for_each,
}

# --------------------------------------------------------------------------------------
# The driver (parent side)
# --------------------------------------------------------------------------------------


def run_child(workload: str, system: str, params: dict[str, Any], timeout: float) -> dict[str, float]:
    """One repetition in a fresh interpreter; its figures."""
    if workload == "import":
        return wl_import(system, **params)  # fresh interpreters of its own
    cmd = [sys.executable, __file__, "--child", workload, system, json.dumps(params)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{workload}/{system} {params} exited {out.returncode}:\n{out.stderr[-4000:]}")
    lines = out.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"{workload}/{system} {params} printed nothing:\n{out.stderr[-4000:]}")
    figures: dict[str, float] = json.loads(lines[-1])
    return figures


def summarize(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def summarize_reps(reps: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Per figure: median, min, max and every value (a figure missing from a repetition counts 0)."""
    keys = dict.fromkeys(k for rep in reps for k in rep)
    return {k: summarize([rep.get(k, 0.0) for rep in reps]) for k in keys}


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) / 2**20
    except OSError:
        pass
    try:
        nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        nproc = str(len(os.sched_getaffinity(0)))
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "nproc": nproc,
        "cpu": cpu,
        "ram_gib": round(ram, 1),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "os": f"{platform.system()} {platform.release()}",
        "commit": commit,
    }


def selected(only: set[str]) -> list[Case]:
    if not only:
        return list(CASES)
    known = {c.name for c in CASES} | {c.group for c in CASES}
    unknown = only - known
    if unknown:
        raise SystemExit(f"--only: unknown {', '.join(sorted(unknown))}; choose from {', '.join(sorted(known))}")
    return [c for c in CASES if c.name in only or c.group in only]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5, help="repetitions per system and case (default 5)")
    parser.add_argument("--quick", action="store_true", help="CI smoke test: 1 repetition of small sizes")
    parser.add_argument("--only", default="", help="comma-separated case names or groups")
    parser.add_argument("--out", help="report path (default benchmarks/RESULTS.md; a temp file with --quick)")
    parser.add_argument("--child", nargs=3, metavar=("WORKLOAD", "SYSTEM", "PARAMS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        workload, system, params = args.child
        figures = WORKLOADS[workload](system, **json.loads(params))
        # Every child's peak: the engine's on the harness against the baseline's parent (issue 17).
        figures.setdefault("peak_rss_mib", own_peak_rss_mib())
        print(json.dumps(figures))
        return 0

    reps = 1 if args.quick else max(1, args.reps)
    cases = selected(set(filter(None, args.only.split(","))))
    if args.out:
        out = Path(args.out)
    elif args.quick:
        out = Path(tempfile.mkdtemp(prefix="wfaas-bench-")) / "RESULTS.md"
    else:
        out = HERE / "RESULTS.md"
    json_out = out.with_name("results.json") if out.name == "RESULTS.md" else out.with_suffix(".json")
    timeout = 300.0 if args.quick else 1800.0
    command = " ".join(["python", "benchmarks/run.py", *sys.argv[1:]])

    info = machine()
    info["load_before"] = os.getloadavg()
    started = time.perf_counter()
    results: dict[str, Any] = {}
    failures: list[str] = []
    for case in cases:
        if case.workload == "dask" and importlib.util.find_spec("distributed") is None:
            print(f"{case.name}: skipped (no distributed: pip install 'wfaas[dask]')", file=sys.stderr)
            continue
        params = case.quick if args.quick else case.params
        systems = SYSTEMS if case.baseline else ("wfaas",)
        n_reps = reps
        runs: dict[str, list[dict[str, float]]] = {s: [] for s in systems}
        t_case = time.perf_counter()
        try:
            for r in range(n_reps):
                # Alternate which system goes first, so drift in the machine's load hits both alike.
                for system in systems if r % 2 == 0 else tuple(reversed(systems)):
                    runs[system].append(run_child(case.workload, system, params, timeout))
        except (RuntimeError, subprocess.TimeoutExpired, AssertionError, ValueError) as exc:
            failures.append(f"{case.name}: {exc}")
            print(f"{case.name}: FAILED\n{exc}", file=sys.stderr)
            continue
        results[case.name] = {
            "params": params,
            "reps": n_reps,
            **{s: summarize_reps(rs) for s, rs in runs.items()},
        }
        print(f"{case.name:<18} {time.perf_counter() - t_case:6.1f} s  {headline(case.name, results[case.name])}")
        sys.stdout.flush()
    info["load_after"] = os.getloadavg()
    elapsed = time.perf_counter() - started

    verdicts = evaluate(results)
    report = render(results, verdicts, info, command, reps, elapsed, failures, args.quick, json_out.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    payload = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": info,
        "command": command,
        "reps": reps,
        "quick": args.quick,
        "seconds": elapsed,
        "results": results,
        "targets": verdicts,
        "failures": failures,
    }
    json_out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out} and {json_out} ({elapsed:.0f} s)")
    return 1 if failures else 0


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------

HEADLINE_KEYS = {
    "fanout": "per_step_us",
    "chain": "per_step_ms",
    "cpu": "efficiency",
    "payload": "per_step_ms",
    "fixed": "first_step_s",
    "import": "import_s",
    "cli": "report_s",
    "dask": "wfaas_ms_per_step",
    "for_each": "per_step_us",
}


def headline(name: str, result: dict[str, Any]) -> str:
    case = next(c for c in CASES if c.name == name)
    key = "sched_cpu_us_per_step" if case.group == "scale" else HEADLINE_KEYS[case.workload]
    keys = [key, "kib_per_step"] if case.group == "big" else [key]
    keys += ["status_s"] if case.workload == "cli" else ["plain_ms_per_task"] if case.workload == "dask" else []
    parts = []
    for system in SYSTEMS:
        for k in keys:
            if system in result and k in result[system]:
                parts.append(f"{system} {k}={result[system][k]['median']:.4g}")
    return ", ".join(parts)


def med(results: dict[str, Any], case: str, system: str, key: str) -> float | None:
    try:
        return float(results[case][system][key]["median"])
    except KeyError:
        return None


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None where either figure is missing (a case not run)."""
    return a / b if a and b else None


def spread(results: dict[str, Any], case: str, system: str, key: str, fmt: str = ".3g") -> str:
    try:
        s = results[case][system][key]
    except KeyError:
        return "–"
    if len(s["values"]) == 1:
        return f"{s['median']:{fmt}}"
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}–{s['max']:{fmt}})"


def scaled(results: dict[str, Any], case: str, system: str, key: str, factor: float) -> str:
    try:
        v = results[case][system][key]["median"] * factor
    except KeyError:
        return "–"
    return f"{v:.3g}"


# (target id, label, case, metric, unit, comparison, threshold); comparison "le": wfaas/baseline ≤ threshold.
# The thresholds are issue 17's (issue 6's were 1.3, 2.0, 2.0, 1.3, 0.97); SqliteStore's own target is
# against the in-memory engine (DURABLE_TARGETS), so its ratio to the baseline is shown without one.
RATIO_TARGETS = [
    ("fanout", "fanout, in-memory: {n} trivial steps + join", "fanout", "per_step_us", "µs/step", "le", 1.0),
    (
        "fanout_sqlite",
        "fanout, SqliteStore: {n} steps (no target)",
        "fanout_sqlite",
        "per_step_us",
        "µs/step",
        None,
        None,
    ),
    ("chain", "chain, in-memory: {n} dependent steps", "chain", "per_step_ms", "ms/step", "le", 0.6),
    ("chain_sqlite", "chain, SqliteStore: {n} steps (no target)", "chain_sqlite", "per_step_ms", "ms/step", None, None),
    ("payload", "payload: {n} dependent steps passing {mib} MiB", "payload", "per_step_ms", "ms/step", "le", 1.0),
    ("cpu", "cpu: {n} × {seconds} s on 2 workers, efficiency", "cpu", "efficiency", "", "ge", 0.97),
]

# (target id, label, SqliteStore case, in-memory case, metric, threshold): wfaas ÷ wfaas, same run.
DURABLE_TARGETS = [
    ("durable_fanout", "fanout, SqliteStore ÷ in-memory engine, wall per step", "fanout_sqlite", "fanout", 1.3),
    ("durable_chain", "chain, SqliteStore ÷ in-memory engine, wall per step", "chain_sqlite", "chain", 1.5),
]

# (target id, label, large case, its 1,000-step case): wall per step, large ÷ small, ≤ 1.5.
FLAT_TARGETS = [
    ("flat_fanout", "fan-out of {n:,}: wall per step ÷ {small:,} steps'", "scale_fanout_100k", "scale_fanout_1k"),
    ("flat_chain", "chain of {n:,}: wall per step ÷ {small:,} steps'", "scale_chain_20k", "scale_chain_1k"),
]

# The workloads whose engine peak RSS is compared with the baseline parent's (the harness).
HARNESS = ("fanout", "chain", "cpu", "payload")


def verdict(value: float, comparison: str | None, threshold: float | None) -> str:
    if comparison is None or threshold is None:
        return "–"
    ok = value <= threshold if comparison == "le" else value >= threshold
    return "met" if ok else "**missed**"


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of issue 6 (and issue 4's "must not grow") with its figure and verdict."""
    out: list[dict[str, Any]] = []
    for tid, label, case, key, _unit, cmp, threshold in RATIO_TARGETS:
        wv, bv = med(results, case, "wfaas", key), med(results, case, "baseline", key)
        if wv is None or bv is None or cmp is None:
            continue
        ratio = wv / bv
        text = label.format(**results[case]["params"])
        out.append({"target": tid, "label": text, "value": ratio, "cmp": cmp, "threshold": threshold})
    for shape in ("chain", "fanout"):
        one = med(results, f"scale_{shape}_1k", "wfaas", "sched_cpu_us_per_step")
        ten = med(results, f"scale_{shape}_10k", "wfaas", "sched_cpu_us_per_step")
        if one and ten:
            label = f"scale, {shape}: scheduler CPU per step, 10k ÷ 1k"
            out.append({"target": f"scale_{shape}", "label": label, "value": ten / one, "cmp": "le", "threshold": 1.5})
    one = med(results, "durable_chain_1k", "wfaas", "per_step_us")
    ten = med(results, "durable_chain_10k", "wfaas", "per_step_us")
    if one and ten:
        label = "durable chain (SqliteStore): wall per step, 10k ÷ 1k (issue 4: must not grow)"
        out.append({"target": "durable_growth", "label": label, "value": ten / one, "cmp": "le", "threshold": 1.5})
    out += evaluate_17(results)
    first = med(results, "fixed", "wfaas", "first_step_s")
    if first is not None:
        label = "start_workflow → first step running, cold engine, s"
        out.append({"target": "first_step", "label": label, "value": first, "cmp": "le", "threshold": 0.3})
    for v in out:
        v["verdict"] = verdict(v["value"], v["cmp"], v["threshold"]).strip("*")
    return out


def evaluate_17(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 17's targets beyond the ratios to the baseline."""
    out: list[dict[str, Any]] = []

    def add(tid: str, label: str, value: float | None, cmp: str, threshold: float) -> None:
        if value is not None:
            out.append({"target": tid, "label": label, "value": value, "cmp": cmp, "threshold": threshold})

    for tid, label, durable, memory, threshold in DURABLE_TARGETS:
        a, b = med(results, durable, "wfaas", "per_step_us"), med(results, memory, "wfaas", "per_step_us")
        add(tid, label, ratio(a, b), "le", threshold)
    for tid, label, large, small in FLAT_TARGETS:
        a, b = med(results, large, "wfaas", "per_step_us"), med(results, small, "wfaas", "per_step_us")
        if a and b:
            text = label.format(n=results[large]["params"]["n"], small=results[small]["params"]["n"])
            add(tid, text, a / b, "le", 1.5)
    a, b = (
        med(results, "for_each_10k", "wfaas", "per_step_us"),
        med(results, "scale_fanout_10k", "wfaas", "per_step_us"),
    )
    add(
        "for_each",
        "10,000 for_each items: wall per item ÷ a static fan-out's per step",
        ratio(a, b),
        "le",
        1.5,
    )
    for key, what in (("status_s", "status"), ("report_s", "report")):
        if "cli_20k" in results:
            n = results["cli_20k"]["params"]["n"]
            add(
                f"cli_{what}",
                f"`wfaas-local {what}` of a {n:,}-step SqliteStore run, s",
                med(results, "cli_20k", "wfaas", key),
                "le",
                1.0,
            )
    a, b = med(results, "import", "wfaas", "import_s"), med(results, "import", "baseline", "import_s")
    add(
        "import",
        "`import wfaas` ÷ `import concurrent.futures` (best of N fresh interpreters)",
        ratio(a, b),
        "le",
        3.0,
    )
    a, b = med(results, "dask", "wfaas", "wfaas_ms_per_step"), med(results, "dask", "wfaas", "plain_ms_per_task")
    add(
        "dask",
        "Dask backend: wall per step ÷ plain Dask tasks' on the same LocalCluster",
        ratio(a, b),
        "le",
        2.0,
    )
    peaks = {s: [med(results, c, s, "peak_rss_mib") for c in HARNESS] for s in SYSTEMS}
    ours, theirs = [v for v in peaks["wfaas"] if v], [v for v in peaks["baseline"] if v]
    if ours and theirs:
        add(
            "peak_rss",
            "engine peak RSS on the harness ÷ the baseline parent's (max over " + ", ".join(HARNESS) + ")",
            max(ours) / max(theirs),
            "le",
            2.0,
        )
    return out


def render(
    results: dict[str, Any],
    verdicts: list[dict[str, Any]],
    info: dict[str, Any],
    command: str,
    reps: int,
    elapsed: float,
    failures: list[str],
    quick: bool,
    json_name: str,
) -> str:
    lines = [
        "# wfaas benchmark results" + (" (quick smoke run: sizes reduced, figures meaningless)" if quick else ""),
        "",
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: nproc {info['nproc']}, {info['cpu']}, {info['ram_gib']} GiB RAM, {info['os']}",
        f"- Python: {info['python']}; wfaas at `{info['commit']}`",
        f"- load average (1, 5, 15 min): before {fmt_load(info['load_before'])}, after {fmt_load(info['load_after'])}",
        f"- command: `{command}` — {reps} repetition(s) per system and case, each in a fresh interpreter, "
        f"wfaas and baseline alternating; {elapsed:.0f} s in all",
        f"- baseline: a bare `concurrent.futures.ProcessPoolExecutor(max_workers={WORKERS})` (default start method) "
        f"driven by a loop in the parent; wfaas: `WorkflowEngine(max_workers={WORKERS})`, InMemoryStore unless "
        "stated, SqliteStore in a temp dir; both warmed (workers started) before timing",
        "- figures: median (min–max); ratio = wfaas median ÷ baseline median",
        "",
    ]
    if failures:
        lines += ["## Failed cases", "", *[f"- {f.splitlines()[0]}" for f in failures], ""]

    lines += ["## Targets (issues 6 and 17)", "", "| target | figure | goal | |", "|---|---|---|---|"]
    for v in verdicts:
        goal = f"{'≤' if v['cmp'] == 'le' else '≥'} {v['threshold']}"
        mark = "met" if v["verdict"] == "met" else "**missed**"
        lines.append(f"| {v['label']} | {v['value']:.3g} | {goal} | {mark} |")
    lines.append("")

    lines += [
        "## wfaas against the baseline",
        "",
        "| workload | wfaas | baseline | ratio | target | |",
        "|---|---|---|---|---|---|",
    ]
    for _tid, label, case, key, unit, cmp, threshold in RATIO_TARGETS:
        wv, bv = med(results, case, "wfaas", key), med(results, case, "baseline", key)
        if wv is None or bv is None:
            continue
        goal = "–" if cmp is None else f"{'≤' if cmp == 'le' else '≥'} {threshold}×"
        text = label.format(**results[case]["params"])
        lines.append(
            f"| {text} | {spread(results, case, 'wfaas', key)} {unit} | {spread(results, case, 'baseline', key)} "
            f"{unit} | {wv / bv:.2f}× | {goal} | {verdict(wv / bv, cmp, threshold)} |"
        )
    if "cpu" in results:
        lines.append(
            f"\ncpu: single-step time measured in each child: wfaas {spread(results, 'cpu', 'wfaas', 'single_s')} s, "
            f"baseline {spread(results, 'cpu', 'baseline', 'single_s', '.3g')} s; wall wfaas "
            f"{spread(results, 'cpu', 'wfaas', 'wall_s')} s, baseline {spread(results, 'cpu', 'baseline', 'wall_s')} s."
        )
    lines.append("")

    lines += [
        "## CPU per step, by process",
        "",
        "Engine: the process running the engine (baseline: the parent running the loop), every thread; "
        "workers: the worker processes, from /proc/PID/task/*/schedstat.",
        "",
        "| workload | wfaas scheduler thread | wfaas engine | wfaas workers | baseline parent | baseline workers |",
        "|---|---|---|---|---|---|",
    ]
    for case in ("fanout", "chain", "payload", "fanout_sqlite", "chain_sqlite"):
        if case not in results:
            continue
        unit = "ms" if case == "payload" else "µs"
        scale = 1e-3 if case == "payload" else 1.0
        cells = [
            scaled(results, case, system, key, scale)
            for system, key in (
                ("wfaas", "sched_cpu_us_per_step"),
                ("wfaas", "engine_cpu_us_per_step"),
                ("wfaas", "workers_cpu_us_per_step"),
                ("baseline", "engine_cpu_us_per_step"),
                ("baseline", "workers_cpu_us_per_step"),
            )
        ]
        lines.append(f"| {case} ({unit}/step) | " + " | ".join(cells) + " |")
    lines.append("")

    lines += [
        "## Scale: scheduler cost as runs grow",
        "",
        "| shape | steps | wall µs/step | scheduler thread CPU µs/step | engine CPU µs/step | "
        "baseline wall µs/step | baseline parent CPU µs/step | register_workflow s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for shape in ("chain", "fanout"):
        for size in ("1k", "10k"):
            case = f"scale_{shape}_{size}"
            if case not in results:
                continue
            lines.append(
                f"| {shape} | {results[case]['params']['n']} | {spread(results, case, 'wfaas', 'per_step_us')} | "
                f"{spread(results, case, 'wfaas', 'sched_cpu_us_per_step')} | "
                f"{spread(results, case, 'wfaas', 'engine_cpu_us_per_step')} | "
                f"{spread(results, case, 'baseline', 'per_step_us')} | "
                f"{spread(results, case, 'baseline', 'engine_cpu_us_per_step')} | "
                f"{spread(results, case, 'wfaas', 'register_s')} |"
            )
    for v in verdicts:
        if v["target"].startswith("scale_"):
            lines.append(f"\n{v['label']}: {v['value']:.2f} (target ≤ 1.5: {v['verdict']})")
    lines.append("")

    lines += [
        "## Durable: SqliteStore checkpoint cost per step (issue 4)",
        "",
        "Checkpoint cost = SqliteStore figure − InMemoryStore figure, same workload, medians.",
        "",
        "| run | in-memory wall µs/step | SqliteStore wall µs/step | cost, wall µs/step | "
        "in-memory engine CPU µs/step | SqliteStore engine CPU µs/step | cost, CPU µs/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, mem, dur in (
        ("fan-out, 500 steps", "fanout", "fanout_sqlite"),
        ("chain, 100 steps", "chain", "chain_sqlite"),
        ("chain, 1,000 steps", "scale_chain_1k", "durable_chain_1k"),
        ("chain, 10,000 steps", "scale_chain_10k", "durable_chain_10k"),
    ):
        if mem not in results or dur not in results:
            continue
        size = results[dur]["params"]["n"]
        row = [f"{label.split(',')[0]}, {size:,} steps"]
        for key in ("per_step_us", "engine_cpu_us_per_step"):
            a, b = med(results, mem, "wfaas", key), med(results, dur, "wfaas", key)
            row += [spread(results, mem, "wfaas", key), spread(results, dur, "wfaas", key)]
            row.append(f"{b - a:.3g}" if a is not None and b is not None else "–")
        lines.append("| " + " | ".join(row) + " |")
    for v in verdicts:
        if v["target"] == "durable_growth":
            lines.append(f"\n{v['label']}: {v['value']:.2f} ({v['verdict']} at ≤ 1.5)")
    lines.append("")

    lines += ["## Fixed costs", "", "| figure | wfaas | baseline | target |", "|---|---|---|---|"]
    if "import" in results:
        a = med(results, "import", "wfaas", "import_s") or 0.0
        b = med(results, "import", "baseline", "import_s") or 1.0
        lines.append(
            f"| `import wfaas` / `import concurrent.futures`, best of {results['import']['params']['n']}, s | "
            f"{spread(results, 'import', 'wfaas', 'import_s')} | {spread(results, 'import', 'baseline', 'import_s')} "
            f"| ≤ 3× ({a / b:.2g}×): {verdict(a / b, 'le', 3.0)} |"
        )
        lines.append(
            f"| what a program running steps imports (`{IMPORTS['wfaas'][1]}` / "
            f"`{IMPORTS['baseline'][1]}`), s | {spread(results, 'import', 'wfaas', 'import_use_s')} | "
            f"{spread(results, 'import', 'baseline', 'import_use_s')} | – |"
        )
    if "fixed" in results:
        first = med(results, "fixed", "wfaas", "first_step_s") or 0.0
        rows = [
            ("engine / pool creation, s", "create_s", "–"),
            (
                "`start_workflow` (baseline: first `submit`) → first step running, cold, s",
                "first_step_s",
                f"≤ 0.3: {verdict(first, 'le', 0.3)}",
            ),
            ("engine process peak RSS, MiB", "engine_peak_rss_mib", "–"),
            ("one worker's peak RSS, MiB", "worker_peak_rss_mib", "–"),
            ("other helper processes (forkserver, resource tracker, guard) RSS, MiB", "helpers_rss_mib", "–"),
        ]
        for label, key, target in rows:
            lines.append(
                f"| {label} | {spread(results, 'fixed', 'wfaas', key)} | "
                f"{spread(results, 'fixed', 'baseline', key)} | {target} |"
            )
        lines.append(
            f"\nMemory after a cold start and a {results['fixed']['params']['n']}-step fan-out. The engine process "
            "figure includes this benchmark's own interpreter."
        )
    lines.append("")
    lines += render_17(results)
    lines += [
        "## Raw figures",
        "",
        f"Every repetition's figures are in `{json_name}` next to this file.",
        "",
    ]
    return "\n".join(drop_empty_sections(lines))


def render_17(results: dict[str, Any]) -> list[str]:
    """Issue 17's sections: flat at 100k, the CLI on a large run, Dask, peak RSS."""
    lines = [
        "## Flat at 100k (issue 17): wall per step and memory per step as runs grow",
        "",
        "Memory per step: the engine process's peak RSS above a warmed engine's before `register_workflow`, "
        "÷ steps (it counts the definition and the run's state).",
        "",
        "| shape | steps | wall µs/step | scheduler thread CPU µs/step | engine peak RSS growth, MiB | KiB/step | "
        "register_workflow s |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in ("scale_fanout_1k", "scale_fanout_10k", "scale_fanout_100k", "scale_chain_1k", "scale_chain_20k"):
        if case not in results:
            continue
        cells = [spread(results, case, "wfaas", k) for k in FLAT_KEYS]
        shape = case.split("_")[1]
        lines.append(f"| {shape} | {results[case]['params']['n']:,} | " + " | ".join(cells) + " |")
    lines.append("")
    if "cli_20k" in results:
        n = results["cli_20k"]["params"]["n"]
        lines += [
            f"## The CLI on a {n:,}-step SqliteStore run (issue 17)",
            "",
            "Each command in a fresh interpreter, best of 3 per repetition; target ≤ 1 s.",
            "",
            "| command | s | |",
            "|---|---|---|",
        ]
        for what in ("status", "report"):
            value = med(results, "cli_20k", "wfaas", f"{what}_s") or 0.0
            lines.append(
                f"| `wfaas-local {what} ID` | {spread(results, 'cli_20k', 'wfaas', f'{what}_s')} | "
                f"{verdict(value, 'le', 1.0)} |"
            )
        lines += [
            f"\nreport size {spread(results, 'cli_20k', 'wfaas', 'report_kib')} KiB; store file "
            f"{spread(results, 'cli_20k', 'wfaas', 'store_mib')} MiB.",
            "",
        ]
    if "dask" in results:
        n = results["dask"]["params"]["n"]
        a = med(results, "dask", "wfaas", "wfaas_ms_per_step") or 0.0
        b = med(results, "dask", "wfaas", "plain_ms_per_task") or 1.0
        lines += [
            "## Dask: per-task overhead against plain Dask (issue 17)",
            "",
            "One `LocalCluster(n_workers=2, threads_per_worker=1, processes=True)` per repetition; plain Dask "
            f"submits {n} trivial tasks and gathers them, wfaas's `DaskBackend` runs a {n}-step fan-out and its "
            "join; alternating in the same child (plain, wfaas, wfaas, plain), then plain Dask again with at most "
            "2 tasks in flight, as wfaas keeps (one per worker thread).",
            "",
            "| plain Dask, ms/task | plain Dask, 2 in flight, ms/task | wfaas DaskBackend, ms/step | ratio | target |",
            "|---|---|---|---|---|",
            f"| {spread(results, 'dask', 'wfaas', 'plain_ms_per_task')} | "
            f"{spread(results, 'dask', 'wfaas', 'plain_2_in_flight_ms_per_task')} | "
            f"{spread(results, 'dask', 'wfaas', 'wfaas_ms_per_step')} | {a / b:.2f}× | "
            f"≤ 2×: {verdict(a / b, 'le', 2.0)} |",
            "",
        ]
    rows = [c for c in HARNESS if c in results]
    if rows:
        lines += [
            "## Peak RSS of the engine process against the baseline's parent (issue 17)",
            "",
            "`ru_maxrss` of each child at its end: wfaas's holds the engine (and this benchmark's interpreter), "
            "the baseline's the loop driving its pool.",
            "",
            "| workload | wfaas MiB | baseline MiB | ratio |",
            "|---|---|---|---|",
        ]
        for case in rows:
            a = med(results, case, "wfaas", "peak_rss_mib")
            b = med(results, case, "baseline", "peak_rss_mib")
            ratio = f"{a / b:.2f}×" if a and b else "–"
            lines.append(
                f"| {case} | {spread(results, case, 'wfaas', 'peak_rss_mib')} | "
                f"{spread(results, case, 'baseline', 'peak_rss_mib')} | {ratio} |"
            )
        lines.append("")
    return lines


FLAT_KEYS = ("per_step_us", "sched_cpu_us_per_step", "rss_growth_mib", "kib_per_step", "register_s")


def drop_empty_sections(lines: list[str]) -> list[str]:
    """Leave out sections whose table has no rows (cases not selected with --only)."""
    sections: list[list[str]] = [[]]
    for line in lines:
        if line.startswith("## "):
            sections.append([])
        sections[-1].append(line)
    out: list[str] = []
    for section in sections:
        rule = next((i for i, line in enumerate(section) if line.startswith("|---")), None)
        if rule is not None and not any(line.startswith("| ") for line in section[rule + 1 :]):
            continue
        out += section
    return out


def fmt_load(load: Any) -> str:
    return ", ".join(f"{x:.2f}" for x in load)


if __name__ == "__main__":
    sys.exit(main())
