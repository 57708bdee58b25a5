"""Scheduler cost per step at 1,000 and 10,000 steps, chain and fan-out (issue 2 wants a ratio <= 1.5).

    python benchmarks/scale.py [--reps 3] [--sizes 1000,10000] [--store memory|sqlite]

Each repetition is a fresh interpreter running ``run.py``'s chain or fan-out
workload (``x + 1`` steps in a line; ``i % 7`` steps side by side plus a join)
on a warmed ``WorkflowEngine(max_workers=2)``. The figure that decides is the
scheduler thread's own CPU time per step (read from its CPU clock, so neither
the workers nor time spent waiting count); the engine process's CPU and the
wall time per step are printed beside it. Exits 1 if a ratio is over 1.5.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import run_child  # run.py sits next to this file

TARGET = 1.5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3, help="fresh interpreters per size and shape (median)")
    parser.add_argument("--sizes", default="1000,10000", help="two step counts, small then large")
    parser.add_argument("--store", choices=("memory", "sqlite"), default="memory")
    args = parser.parse_args()
    small, large = (int(s) for s in args.sizes.split(","))
    print(f"scheduler CPU per step, {args.reps} fresh interpreter(s) each, {args.store} store, medians")
    print(
        f"{'shape':<7} {'steps':>6} {'scheduler µs/step':>18} {'engine CPU µs/step':>19} {'wall µs/step':>13} "
        f"{'register s':>11}"
    )
    failed = False
    for shape in ("chain", "fanout"):
        sched: dict[int, float] = {}
        for n in (small, large):
            reps = [run_child(shape, "wfaas", {"n": n, "store": args.store}, 3600) for _ in range(args.reps)]

            def med(key: str, reps: list[dict[str, float]] = reps) -> float:
                return statistics.median(r[key] for r in reps)

            sched[n] = med("sched_cpu_us_per_step")
            print(
                f"{shape:<7} {n:>6} {sched[n]:>18.1f} {med('engine_cpu_us_per_step'):>19.1f} "
                f"{med('per_step_us'):>13.1f} {med('register_s'):>11.2f}"
            )
        ratio = sched[large] / sched[small]
        ok = ratio <= TARGET
        failed |= not ok
        print(f"{shape:<7} ratio {large} ÷ {small}: {ratio:.2f} ({'met' if ok else 'MISSED'}: target ≤ {TARGET})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
