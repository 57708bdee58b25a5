"""The Dask backend against the local one: fan-out, cpu and a 5 MiB field, in the same run.

    python benchmarks/on_dask.py [--reps N] [--quick] [--out benchmarks/RESULTS.md]

Local: ``WorkflowEngine(max_workers=2)``. Dask: ``WorkflowEngine(backend=
DaskBackend(client))`` on a ``LocalCluster(n_workers=2, threads_per_worker=1,
processes=True)`` started once for the whole run (its start-up is reported on
its own). Repetitions alternate between the two (local, dask, dask, local, ...)
so that load on the machine hits both alike; each engine is warmed (one
trivial run) before timing. The section between the ``dask`` markers of
``--out`` is replaced; the rest of the file is left as it is.

Workloads:

* fanout: 500 trivial independent steps and a join;
* cpu: 8 steps of 0.5 s CPU each on 2 workers (efficiency = 2.0 s ÷ wall);
* payload: a chain of 10 steps that each read a data field and bump a counter,
  with that field 5 MiB and with it empty: the difference, per step, is what
  a 5 MiB field costs a step.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from wfaas import WorkflowData

HERE = Path(__file__).resolve().parent
START, END = "<!-- dask:start -->", "<!-- dask:end -->"


@dataclass
class BenchData(WorkflowData):
    parts: dict[int, int] = field(default_factory=dict)
    blob: bytes = b""
    n: int = 0


def fan_body(i: int) -> Any:
    def body(ctx: Any) -> None:
        ctx.data.parts[i] = i

    return body


def join(ctx: Any) -> None:
    ctx.data.n = len(ctx.data.parts)


def spin(ctx: Any) -> None:
    end = time.process_time() + 0.5
    while time.process_time() < end:
        pass


def read_blob(ctx: Any) -> None:
    ctx.data.n += len(ctx.data.blob) > -1


def definitions() -> dict[str, Any]:
    from wfaas import StepDefinition, WorkflowDefinition

    fan = WorkflowDefinition("fanout", "fanout", data_type=BenchData)
    for i in range(500):
        fan.add_step(StepDefinition(f"s{i}", "s", fan_body(i)))
    fan.add_step(StepDefinition("join", "join", join).depends_on([f"s{i}" for i in range(500)]))
    cpu = WorkflowDefinition("cpu", "cpu", data_type=BenchData)
    for i in range(8):
        cpu.add_step(StepDefinition(f"c{i}", "c", spin))
    chain = WorkflowDefinition("payload", "payload", data_type=BenchData)
    for i in range(10):
        step = StepDefinition(f"p{i}", "p", read_blob)
        chain.add_step(step.depends_on([f"p{i - 1}"]) if i else step)
    warm = WorkflowDefinition("warm", "warm", data_type=BenchData).add_step(StepDefinition("w", "w", join))
    return {"fanout": fan, "cpu": cpu, "payload": chain, "warm": warm}


def timed(engine: Any, wid: str, data: BenchData) -> float:
    started = time.perf_counter()
    iid = engine.start_workflow(wid, data)
    engine.wait_for_completion(iid, timeout=600)
    return time.perf_counter() - started


def measure(engine: Any) -> dict[str, float]:
    mib5 = b"x" * (5 * 2**20)
    out = {
        "fanout": timed(engine, "fanout", BenchData()) / 501,
        "cpu": 2.0 / timed(engine, "cpu", BenchData()),
        "payload_big": timed(engine, "payload", BenchData(blob=mib5)) / 10,
        "payload_empty": timed(engine, "payload", BenchData()) / 10,
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one repetition, written nowhere unless --out")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    reps = 1 if args.quick else args.reps
    out = args.out or (None if args.quick else HERE / "RESULTS.md")

    import dask
    import distributed
    from wfaas import DaskBackend, WorkflowEngine

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = distributed.Client(cluster)
    cluster_start = time.perf_counter() - t0
    defs = definitions()
    results: dict[str, list[dict[str, float]]] = {"local": [], "dask": []}
    engines: dict[str, Any] = {}
    try:
        t0 = time.perf_counter()
        engines["dask"] = WorkflowEngine(backend=DaskBackend(client))
        dask_engine_start = time.perf_counter() - t0
        engines["local"] = WorkflowEngine(max_workers=2)
        for engine in engines.values():
            for definition in defs.values():
                engine.register_workflow(definition)
            timed(engine, "warm", BenchData())
        order = ["local", "dask"]
        for rep in range(reps):
            for system in order if rep % 2 == 0 else order[::-1]:
                figures = measure(engines[system])
                results[system].append(figures)
                print(system, {k: round(v, 5) for k, v in figures.items()}, flush=True)
    finally:
        for engine in engines.values():
            engine.close()
        client.close()
        cluster.close()
    load_after = os.getloadavg()
    report = render(results, reps, cluster_start, dask_engine_start, load_before, load_after)
    print(report)
    if out is not None:
        write_section(out, report)


def med(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def render(
    results: dict[str, list[dict[str, float]]],
    reps: int,
    cluster_start: float,
    engine_start: float,
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
) -> str:
    def cell(system: str, key: str, scale: float, fmt: str) -> str:
        m, lo, hi = med([r[key] * scale for r in results[system]])
        return f"{m:{fmt}} ({lo:{fmt}}–{hi:{fmt}})"

    def ratio(key: str) -> str:
        a = statistics.median(r[key] for r in results["dask"])
        b = statistics.median(r[key] for r in results["local"])
        return f"{a / b:.2f}×"

    def cost(system: str) -> str:
        per = [(r["payload_big"] - r["payload_empty"]) * 1000 for r in results[system]]
        m, lo, hi = med(per)
        return f"{m:.1f} ({lo:.1f}–{hi:.1f})"

    import distributed
    from wfaas import __version__

    lines = [
        START,
        "## Dask backend against the local one (issue 7)",
        "",
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: nproc {os.cpu_count()}, {platform.platform()}",
        f"- Python {platform.python_version()}, wfaas {__version__}, distributed {distributed.__version__}",
        f"- load average (1, 5, 15 min): before {', '.join(f'{x:.2f}' for x in load_before)}, "
        f"after {', '.join(f'{x:.2f}' for x in load_after)}",
        f"- command: `python benchmarks/on_dask.py --reps {reps}` — {reps} repetition(s) per backend, alternating, "
        "in one process",
        "- local: `WorkflowEngine(max_workers=2)`; dask: `WorkflowEngine(backend=DaskBackend(client))` on "
        "`LocalCluster(n_workers=2, threads_per_worker=1, processes=True)` (2 steps in flight); both warmed",
        f"- fixed costs: LocalCluster start {cluster_start:.2f} s; DaskBackend connect + version check "
        f"{engine_start:.2f} s",
        "- figures: median (min–max); ratio = dask ÷ local",
        "",
        "| workload | local | dask | ratio |",
        "|---|---|---|---|",
        f"| fanout: 500 trivial steps + join, ms/step | {cell('local', 'fanout', 1000, '.2f')} | "
        f"{cell('dask', 'fanout', 1000, '.2f')} | {ratio('fanout')} |",
        f"| cpu: 8 × 0.5 s on 2 workers, efficiency | {cell('local', 'cpu', 1, '.2f')} | "
        f"{cell('dask', 'cpu', 1, '.2f')} | {ratio('cpu')} |",
        f"| chain step reading an empty field, ms/step | {cell('local', 'payload_empty', 1000, '.1f')} | "
        f"{cell('dask', 'payload_empty', 1000, '.1f')} | {ratio('payload_empty')} |",
        f"| chain step reading a 5 MiB field, ms/step | {cell('local', 'payload_big', 1000, '.1f')} | "
        f"{cell('dask', 'payload_big', 1000, '.1f')} | {ratio('payload_big')} |",
        f"| what the 5 MiB field adds to a step, ms | {cost('local')} | {cost('dask')} | |",
        "",
        END,
    ]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else ""
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    main()
