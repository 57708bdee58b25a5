"""Crash trials: SIGKILL a runner at random points of a 12-step run on SQLite, resume, check what was kept.

    python benchmarks/crash_trials.py [--trials 50] [--seed 1]

Each trial (the same as tests/test_crash_resume.py, which runs 5) starts a
runner process on a fresh store, SIGKILLs it after a random number of step
starts plus a random few milliseconds, and resumes the instance in a fresh
process (``recover()`` or ``resume(iid)``, chosen at random). It counts:

- lost committed steps: SUCCEEDED in the file at the kill, not SUCCEEDED at the end;
- re-runs of succeeded steps: executions, after the kill, of steps committed SUCCEEDED;
- integrity failures: ``PRAGMA integrity_check`` not "ok";
- runs whose final data differ from an uninterrupted run's, or that did not complete;
- processes of the killed runner that outlived it.

Exits 1 if any of these is not zero.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_crash_resume import STEPS, crash_trial, reference_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    began = time.monotonic()
    print(f"crash trials: {args.trials} trials, seed {args.seed}, {len(STEPS)} steps per run", flush=True)
    with tempfile.TemporaryDirectory(prefix="wfaas-crash-") as tmp:
        work = Path(tmp)
        expected = reference_data(work / "reference")
        results = []
        for n in range(args.trials):
            r = crash_trial(work / f"trial{n}", n, rng, expected)
            results.append(r)
            print(r.line(), flush=True)
    interrupted = sum(r.interrupted for r in results)
    committed = sum(len(r.committed) for r in results)
    lost = sum(len(r.lost) for r in results)
    reruns = sum(len(r.reruns_of_succeeded) for r in results)
    interrupted_again = sum(len(r.ran_again) for r in results)
    integrity_failures = sum(r.integrity != "ok" for r in results)
    wrong = sum(not r.data_matches or r.final_status != "COMPLETED" or bool(r.never_ran) for r in results)
    orphans = sum(len(r.orphans) for r in results)
    print()
    elapsed = time.monotonic() - began
    print(f"trials:                        {len(results)} ({interrupted} killed mid-run) in {elapsed:.0f} s")
    print(f"committed SUCCEEDED at kill:   {committed} steps in all")
    print(f"lost committed steps:          {lost}")
    print(f"re-runs of succeeded steps:    {reruns}")
    print(f"integrity failures:            {integrity_failures}")
    print(f"wrong or unfinished results:   {wrong}")
    print(f"orphaned processes:            {orphans}")
    print(f"interrupted steps run again:   {interrupted_again} (at-least-once: expected, not a failure)")
    failed = lost or reruns or integrity_failures or wrong or orphans
    print("RESULT: " + ("FAIL" if failed else "OK: nothing committed was lost or run again"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
