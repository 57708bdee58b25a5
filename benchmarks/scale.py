"""Scheduler cost per step at 1,000 and 10,000 steps, chain and fan-out (issue 2 wants a ratio <= 1.5).

    python benchmarks/scale.py [--reps 3]

Each run is a fresh interpreter; the figure is the engine process's CPU time
per step (the steps themselves run in worker processes).
"""

from __future__ import annotations

import argparse
import statistics

from compare import rep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    for shape in ("chain", "fanout"):
        per_step = {}
        for n in (1000, 10000):
            runs = [rep("scale", "wfaas", {"n": n, "shape": shape})["cpu_per_step_us"] for _ in range(args.reps)]
            per_step[n] = statistics.median(runs)
        ratio = per_step[10000] / per_step[1000]
        print(
            f"{shape:6s}: {per_step[1000]:7.1f} µs/step at 1k, {per_step[10000]:7.1f} µs/step at 10k, "
            f"ratio {ratio:.2f} ({'met' if ratio <= 1.5 else 'MISSED'}: target <= 1.5)"
        )


if __name__ == "__main__":
    main()
