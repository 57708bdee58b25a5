"""One crash trial: run, SIGKILL the engine process at a chosen moment, recover, compare.

Used by tests/test_durability.py (a few trials) and benchmarks/kill_trials.py (many).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

RUNNER = str(Path(__file__).with_name("crash_runner.py"))


@dataclass
class Trial:
    """What one trial saw."""

    kill_after: float
    committed_succeeded: set[str] = field(default_factory=set)
    reruns_of_succeeded: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    integrity: str = ""
    data_matches: bool = False
    finished_before_kill: bool = False


def _run(mode: str, store: Path, log: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, RUNNER, mode, str(store), str(log)], capture_output=True, text=True, timeout=180, check=True
    )


def reference(workdir: Path) -> dict[str, object]:
    """The final data of an uninterrupted run (the log path aside)."""
    out = _run("fresh", workdir / "fresh.sqlite", workdir / "fresh.log")
    data: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    data.pop("log")
    return data


def counts(log: Path) -> collections.Counter[str]:
    return collections.Counter(log.read_text().split()) if log.exists() else collections.Counter()


def trial(workdir: Path, kill_after: float, expected: dict[str, object]) -> Trial:
    from wfaas import SqliteStore, StepStatus

    workdir.mkdir(parents=True, exist_ok=True)
    store, log = workdir / "runs.sqlite", workdir / "steps.log"
    result = Trial(kill_after)
    proc = subprocess.Popen([sys.executable, RUNNER, "run", str(store), str(log)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    proc.stdout.readline()  # the instance id: the run has started
    deadline = time.monotonic() + kill_after
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.002)  # the moment of the kill is the trial's random variable
    tree = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    else:
        result.finished_before_kill = True
    proc.wait(timeout=30)
    proc.stdout.close()
    # Workers notice their engine died and stop; wait for them before reading the log.
    psutil.wait_procs(tree, timeout=10)

    reader = SqliteStore(store, readonly=True)
    (iid,) = reader.ids()
    before = reader.load(iid)
    reader.close()
    result.committed_succeeded = {sid for sid, s in before.step_states.items() if s.status is StepStatus.SUCCEEDED}
    ran_before = counts(log)

    out = _run("recover", store, log)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    final = SqliteStore(store)
    after = final.load(iid)
    result.integrity = final.integrity_check()
    final.close()
    ran_after = counts(log)
    result.reruns_of_succeeded = sorted(s for s in result.committed_succeeded if ran_after[s] > ran_before[s])
    result.lost = sorted(
        s for s in result.committed_succeeded if after.step_states[s].status is not StepStatus.SUCCEEDED
    )
    data = json.loads(lines[-1]) if lines else {k: v for k, v in vars(after.data).items()}
    data.pop("log", None)
    result.data_matches = data == expected and after.status.name == "COMPLETED"
    return result
