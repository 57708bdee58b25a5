"""Large values (issue 15): a 200 MB array read by 4 steps, against plain Python reading it from a file.

    python benchmarks/large_values.py [--mb 200] [--reps 3] [--bytearray]

wfaas: ``make`` sets a field of ``--mb`` MB (a numpy float64 array, or a
bytearray where numpy is not installed), then either 4 steps that read it
(each sums it and stores the sum in a small field) or 4 steps that never
touch it. Each figure is the time from ``make``'s end to the last step's end
(dispatch, the worker's load, the step, the change check and the checkpoint
included), on a ``SqliteStore`` in a temporary folder, one worker.

Plain Python: the same value saved once to a file (``numpy.save`` or raw
bytes); then 4 times: read it back from the file and sum it, in one process.

Targets (issue 15): 4 reading steps at most 1.5x plain; a step that does
not read the field at most 0.1 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wfaas import SqliteStore, StepDefinition, WorkflowData, WorkflowDefinition, WorkflowEngine

try:
    import numpy
except ImportError:  # the benchmark's bytearray case
    numpy = None

STEPS = 4
MB = 200


@dataclass
class Big(WorkflowData):
    value: Any = None
    sums: list[float] | None = None
    n: int = 0


def make_value(mb: int) -> Any:
    if numpy is not None:
        return numpy.arange(mb * (1 << 20) // 8, dtype=numpy.float64)
    return bytearray(os.urandom(1 << 20)) * mb


def total(value: Any) -> float:
    if numpy is not None:
        return float(value.sum())
    return float(sum(memoryview(value)[:: 1 << 12]))  # a bytearray: touch every page


def make(ctx: Any) -> None:
    ctx.data.value = make_value(MB)


def read(ctx: Any) -> None:
    ctx.data.sums = [*(ctx.data.sums or []), total(ctx.data.value)]


def skip(ctx: Any) -> None:
    ctx.data.n += 1


def definition(wid: str, body: Any) -> WorkflowDefinition:
    wf = WorkflowDefinition(wid, wid, data_type=Big)
    wf.add_step(StepDefinition("make", "make", make))
    for i in range(STEPS):
        wf.add_step(StepDefinition(f"s{i}", body.__name__, body).depends_on(["make" if i == 0 else f"s{i - 1}"]))
    return wf


def wfaas_seconds(engine: WorkflowEngine, wid: str) -> float:
    iid = engine.start_workflow(wid, Big())
    engine.wait_for_completion(iid, timeout=600)
    steps = engine.get_status(iid).step_states
    end = steps[f"s{STEPS - 1}"].finished_at
    start = steps["make"].finished_at
    assert end is not None and start is not None
    return (end - start).total_seconds()


def plain_seconds(path: Path) -> float:
    started = time.perf_counter()
    for _ in range(STEPS):
        if numpy is not None:
            value = numpy.load(path)
        else:  # one copy, as numpy.load makes
            value = bytearray(path.stat().st_size)
            with open(path, "rb", buffering=0) as f:
                f.readinto(value)
        total(value)
        del value
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=MB)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--bytearray", action="store_true", help="a bytearray even where numpy is installed")
    args = parser.parse_args()
    if args.bytearray:
        globals()["numpy"] = None  # read by the step bodies, which travel by value from __main__
    globals()["MB"] = args.mb  # read by the step bodies, which travel by value from __main__
    kind = "numpy float64 array" if numpy is not None else "bytearray"
    reading, skipping, plain = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("value.npy" if numpy is not None else "value.bin")
        value = make_value(args.mb)
        if numpy is not None:
            numpy.save(path, value)
        else:
            path.write_bytes(value)
        del value
        store = SqliteStore(Path(tmp) / "runs.sqlite")
        with WorkflowEngine(store, max_workers=1) as engine:
            engine.register_workflow(definition("read", read))
            engine.register_workflow(definition("skip", skip))
            for _ in range(args.reps):
                reading.append(wfaas_seconds(engine, "read"))
                skipping.append(wfaas_seconds(engine, "skip"))
                plain.append(plain_seconds(path))
        size = sum(p.stat().st_size for p in Path(tmp).iterdir() if p.name.startswith("runs.sqlite") and p.is_file())
        store.close()
    r, s, p = statistics.median(reading), statistics.median(skipping), statistics.median(plain)
    print(f"{args.mb} MB {kind}, {STEPS} steps after the one that makes it, median of {args.reps}")
    print(f"  plain Python, {STEPS} x (read the file + sum):  {p:6.2f} s")
    print(f"  wfaas, {STEPS} steps that read it (sum):        {r:6.2f} s   ratio {r / p:4.2f} (target <= 1.5)")
    print(f"  wfaas, {STEPS} steps that do not read it:       {s:6.2f} s   {s / STEPS:5.3f} s/step (target <= 0.1)")
    print(f"  SQLite file after {3 * args.reps} runs: {size / 1e6:.2f} MB")
    runs = f"read {[round(x, 2) for x in reading]}, skip {[round(x, 2) for x in skipping]}"
    print(f"  all runs (s): {runs}, plain {[round(x, 2) for x in plain]}")


if __name__ == "__main__":
    main()
