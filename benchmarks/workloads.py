"""The benchmark workloads, each on wfaas and on a bare ProcessPoolExecutor driven by a loop.

Every function runs one repetition in the current (fresh) interpreter and
returns a dict of figures. Engines and pools are warmed before timing: what is
measured is the per-step cost, not process start-up (reported separately).
"""

from __future__ import annotations

import os
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psutil
from wfaas import SqliteStore, StepDefinition, WorkflowData, WorkflowDefinition, WorkflowEngine

WORKERS = 2
PAYLOAD = 5 * 2**20


@dataclass
class BenchData(WorkflowData):
    results: dict[int, int] = field(default_factory=dict)
    x: int = 0
    total: int = 0
    blob: bytes = b""
    first: float = 0.0


# -- step bodies (module level, so both systems import them by name) -----------------


def mod7(i: int) -> int:
    return i % 7


def inc(x: int) -> int:
    return x + 1


def spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i % 7
    return total


def touch(blob: bytes) -> bytes:
    return blob[1:] + blob[:1]


def fan_step(i: int) -> Any:
    def body(ctx: Any) -> None:
        ctx.data.results[i] = i % 7

    return body


def join_step(ctx: Any) -> None:
    ctx.data.total = sum(ctx.data.results.values())


def inc_step(ctx: Any) -> None:
    ctx.data.x += 1


def spin_step(n: int) -> Any:
    def body(ctx: Any) -> None:
        spin(n)

    return body


def touch_step(ctx: Any) -> None:
    ctx.data.blob = touch(ctx.data.blob)


def first_step(ctx: Any) -> None:
    ctx.data.first = time.time()


# -- workflow builders --------------------------------------------------------------


def fanout_workflow(n: int, wid: str = "fanout") -> WorkflowDefinition:
    wf = WorkflowDefinition(wid, data_type=BenchData)
    for i in range(n):
        wf.add_step(StepDefinition(f"s{i}", "s", fan_step(i)))
    return wf.add_step(StepDefinition("join", "join", join_step).depends_on([f"s{i}" for i in range(n)]))


def chain_workflow(n: int, body: Any = inc_step, wid: str = "chain") -> WorkflowDefinition:
    wf = WorkflowDefinition(wid, data_type=BenchData)
    for i in range(n):
        step = StepDefinition(f"s{i}", "s", body)
        if i:
            step.depends_on([f"s{i - 1}"])
        wf.add_step(step)
    return wf


def cpu_workflow(n_steps: int, loops: int) -> WorkflowDefinition:
    wf = WorkflowDefinition("cpu", data_type=BenchData)
    for i in range(n_steps):
        wf.add_step(StepDefinition(f"s{i}", "s", spin_step(loops)))
    return wf.add_step(StepDefinition("join", "join", join_step).depends_on([f"s{i}" for i in range(n_steps)]))


def _run(engine: WorkflowEngine, wid: str, data: BenchData) -> tuple[float, Any]:
    start = time.perf_counter()
    iid = engine.start_workflow(wid, data)
    engine.wait_for_completion(iid, timeout=3600)
    return time.perf_counter() - start, engine.get_status(iid).data


def _engine(store: Any = None) -> WorkflowEngine:
    engine = WorkflowEngine(store=store, max_workers=WORKERS)
    engine.register_workflow(chain_workflow(2, wid="warm"))
    _run(engine, "warm", BenchData())
    return engine


def _pool() -> ProcessPoolExecutor:
    pool = ProcessPoolExecutor(max_workers=WORKERS)
    list(pool.map(mod7, range(WORKERS * 2)))
    return pool


# -- workloads: each returns figures for one repetition --------------------------------


def fanout(system: str, n: int = 500, durable: bool = False) -> dict[str, float]:
    if system == "baseline":
        with _pool() as pool:
            start = time.perf_counter()
            futures = [pool.submit(mod7, i) for i in range(n)]
            total = sum(f.result() for f in futures)
            wall = time.perf_counter() - start
        assert total == sum(i % 7 for i in range(n))
        return {"wall": wall, "per_step_us": wall / n * 1e6}
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore(os.path.join(tmp, "b.sqlite")) if durable else None
        with _engine(store) as engine:
            engine.register_workflow(fanout_workflow(n))
            wall, data = _run(engine, "fanout", BenchData())
        if store is not None:
            store.close()
    assert data.total == sum(i % 7 for i in range(n))
    return {"wall": wall, "per_step_us": wall / n * 1e6}


def chain(system: str, n: int = 100, durable: bool = False) -> dict[str, float]:
    if system == "baseline":
        with _pool() as pool:
            x = 0
            start = time.perf_counter()
            for _ in range(n):
                x = pool.submit(inc, x).result()
            wall = time.perf_counter() - start
        assert x == n
        return {"wall": wall, "per_step_ms": wall / n * 1e3}
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore(os.path.join(tmp, "b.sqlite")) if durable else None
        with _engine(store) as engine:
            engine.register_workflow(chain_workflow(n))
            wall, data = _run(engine, "chain", BenchData())
        if store is not None:
            store.close()
    assert data.x == n
    return {"wall": wall, "per_step_ms": wall / n * 1e3}


def calibrate(seconds: float = 0.5) -> int:
    loops = 200_000
    while True:
        start = time.perf_counter()
        spin(loops)
        took = time.perf_counter() - start
        if took > 0.05:
            return int(loops * seconds / took)
        loops *= 4


def cpu(system: str, n: int = 8) -> dict[str, float]:
    loops = calibrate()
    start = time.perf_counter()
    spin(loops)
    single = time.perf_counter() - start
    if system == "baseline":
        with _pool() as pool:
            start = time.perf_counter()
            list(pool.map(spin, [loops] * n))
            wall = time.perf_counter() - start
    else:
        with _engine() as engine:
            engine.register_workflow(cpu_workflow(n, loops))
            wall, _ = _run(engine, "cpu", BenchData())
    return {"wall": wall, "single": single, "efficiency": n * single / WORKERS / wall}


def payload(system: str, n: int = 20) -> dict[str, float]:
    blob = os.urandom(PAYLOAD)
    if system == "baseline":
        with _pool() as pool:
            start = time.perf_counter()
            for _ in range(n):
                blob = pool.submit(touch, blob).result()
            wall = time.perf_counter() - start
        return {"wall": wall, "per_step_ms": wall / n * 1e3}
    with _engine() as engine:
        engine.register_workflow(chain_workflow(n, touch_step, wid="payload"))
        wall, data = _run(engine, "payload", BenchData(blob=blob))
    assert len(data.blob) == PAYLOAD
    return {"wall": wall, "per_step_ms": wall / n * 1e3}


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def scale(system: str, n: int = 1000, shape: str = "chain", durable: bool = False) -> dict[str, float]:
    """Engine-process CPU time per step (the workers are other processes)."""
    wf = chain_workflow(n, wid="scale") if shape == "chain" else fanout_workflow(n, wid="scale")
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore(os.path.join(tmp, "b.sqlite")) if durable else None
        with _engine(store) as engine:
            engine.register_workflow(wf)
            cpu0 = _cpu_seconds()
            wall, _ = _run(engine, "scale", BenchData())
            cpu_used = _cpu_seconds() - cpu0
        if store is not None:
            store.close()
    return {"wall": wall, "cpu_per_step_us": cpu_used / n * 1e6, "wall_per_step_us": wall / n * 1e6}


def fixed(system: str) -> dict[str, float]:
    """Cold start: engine creation, start_workflow to the first step running, memory."""
    start = time.perf_counter()
    engine = WorkflowEngine(max_workers=WORKERS)
    created = time.perf_counter() - start
    engine.register_workflow(chain_workflow(1, first_step, wid="first"))
    t0 = time.time()
    iid = engine.start_workflow("first", BenchData())
    engine.wait_for_completion(iid, timeout=60)
    first = engine.get_status(iid).data.first - t0
    engine.register_workflow(fanout_workflow(500))
    _run(engine, "fanout", BenchData())
    me = psutil.Process()
    workers = [s.pid for s in engine._pool.slots if s.pid]
    worker_rss = max(psutil.Process(p).memory_info().rss for p in workers)
    engine_rss = me.memory_info().rss
    engine.close()
    return {
        "engine_start_s": created,
        "first_step_s": first,
        "engine_rss_mb": engine_rss / 2**20,
        "worker_rss_mb": worker_rss / 2**20,
    }
