"""``for_each`` over N items against a static N-step fan-out, side by side (issue 12 wants a ratio <= 1.5).

    python benchmarks/for_each.py [--n 10000] [--reps 3] [--store memory,sqlite]

Both shapes do the same work: N trivial bodies writing ``results[i] = i % 7``
(a dict field, merged key by key), then a join summing them. The fan-out is
``run.py``'s: N steps written out by hand; the other is one step
``.for_each(lambda data: data.ids)`` over ``range(N)``. Each repetition is a
fresh interpreter with a warmed ``WorkflowEngine(max_workers=2)``, timed from
``start_workflow`` to ``wait_for_completion`` (``run.py``'s ``timed_run``).
The ratio that decides is the engine process's CPU time per item over its
CPU time per step (all its threads: scheduler, store writer, event bus; not
the workers), the figure least moved by other load on the machine; the
ratio of wall times is printed beside it. Exits 1 if a ratio is over 1.5.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # run.py sits next to this file

TARGET = 1.5


def item_body(ctx: Any) -> None:
    ctx.data.results[ctx.item] = ctx.item % 7


def ids(data: Any) -> list[int]:
    return list(range(data.x))


def for_each_def(wid: str) -> Any:
    m = bench.w()
    wf = m.wfaas.WorkflowDefinition(wid, wid, data_type=m.BenchData)
    wf.add_step(m.wfaas.StepDefinition("each", "each", item_body).for_each(ids))
    return wf.add_step(m.wfaas.StepDefinition("join", "join", bench.join_body).depends_on(["each"]))


def child(shape: str, n: int, store: str) -> dict[str, float]:
    """One repetition in this (fresh) interpreter: the figures per step or per item."""
    m = bench.w()
    with tempfile.TemporaryDirectory() as tmp:
        engine = bench.new_engine(store, tmp)
        if shape == "fanout":
            engine.register_workflow(bench.fanout_def("fanout", [bench.fan_body(i) for i in range(n)]))
            figures, data = bench.timed_run(engine, "fanout", m.BenchData())
        else:
            engine.register_workflow(for_each_def("for_each"))
            figures, data = bench.timed_run(engine, "for_each", m.BenchData(x=n))
        bench.close_engine(engine)
    assert data.total == sum(i % 7 for i in range(n)), data.total
    return bench.per_step(figures, n)


def run_child(shape: str, n: int, store: str) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", shape, str(n), store]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False, cwd=bench.ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{shape} n={n} {store} exited {out.returncode}:\n{out.stderr[-4000:]}")
    figures: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000, help="steps in the fan-out, items in the for_each")
    parser.add_argument("--reps", type=int, default=3, help="fresh interpreters per shape and store (median)")
    parser.add_argument("--store", default="memory,sqlite", help="memory, sqlite or both")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        shape, n, store = args.child
        print(json.dumps(child(shape, int(n), store)))
        return 0
    print(f"{args.n} steps (fan-out) vs {args.n} items (for_each), {args.reps} fresh interpreter(s) each, medians")
    print(f"{'store':<7} {'shape':<9} {'wall µs/unit':>13} {'scheduler µs/unit':>18} {'engine CPU µs/unit':>19}")
    failed = False
    for store in args.store.split(","):
        wall: dict[str, float] = {}
        cpu: dict[str, float] = {}
        for shape in ("fanout", "for_each"):
            reps = [run_child(shape, args.n, store) for _ in range(args.reps)]

            def med(key: str, reps: list[dict[str, float]] = reps) -> float:
                return statistics.median(r[key] for r in reps)

            wall[shape], cpu[shape] = med("per_step_us"), med("engine_cpu_us_per_step")
            print(
                f"{store:<7} {shape:<9} {wall[shape]:>13.1f} {med('sched_cpu_us_per_step'):>18.1f} "
                f"{med('engine_cpu_us_per_step'):>19.1f}"
            )
        ratio = cpu["for_each"] / cpu["fanout"]
        ok = ratio <= TARGET
        failed |= not ok
        verdict = f"{'met' if ok else 'MISSED'}: target ≤ {TARGET}"
        print(f"{store:<7} engine CPU per item ÷ per step: {ratio:.2f} ({verdict})")
        print(f"{store:<7} wall per item ÷ per step: {wall['for_each'] / wall['fanout']:.2f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
