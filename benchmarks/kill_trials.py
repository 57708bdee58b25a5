"""Many crash trials: SIGKILL the engine process at random moments of a 12-step run, recover, check.

    python benchmarks/kill_trials.py [--trials 50] [--seed 1]

For each trial: the steps whose SUCCEEDED was committed before the kill must
not run again after `recover()`, none may be lost, the final data must equal
an uninterrupted run's, and the file must pass `PRAGMA integrity_check`.
Exits 1 on any failure. (The same trial runs 6 times in tests/test_durability.py.)
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from trials import reference, trial


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        expected = reference(workdir / "reference")
        interrupted = reruns = lost = bad_files = wrong_data = committed_total = 0
        for n in range(args.trials):
            r = trial(workdir / f"trial{n}", rng.uniform(0.1, 0.7), expected)
            interrupted += not r.finished_before_kill
            committed_total += len(r.committed_succeeded)
            reruns += len(r.reruns_of_succeeded)
            lost += len(r.lost)
            bad_files += r.integrity != "ok"
            wrong_data += not r.data_matches
            print(
                f"trial {n:2d}: killed at {r.kill_after:.2f}s, {len(r.committed_succeeded):2d}/12 steps committed, "
                f"re-run {r.reruns_of_succeeded or 0}, lost {r.lost or 0}, integrity {r.integrity}, "
                f"data {'same' if r.data_matches else 'DIFFERENT'}",
                flush=True,
            )
    print(
        f"\n{args.trials} trials ({interrupted} interrupted mid-run, {committed_total} committed steps in all) in "
        f"{time.monotonic() - started:.0f} s: {lost} lost committed steps, {reruns} re-runs of succeeded steps, "
        f"{bad_files} integrity failures, {wrong_data} runs with different final data"
    )
    sys.exit(1 if lost or reruns or bad_files or wrong_data else 0)


if __name__ == "__main__":
    main()
