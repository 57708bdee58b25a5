"""Chaos: a 200-step workflow while random busy workers are killed at random (seeded) moments.

Every step must end SUCCEEDED through retries; no step is lost or runs again
after the attempt the engine recorded as its success; no process is left.
The run is ``wfaas.chaos.run_chaos``, the same code ``python -m wfaas.chaos``
runs on a user's machine; the checks it reports are also checked here against
the step logs it leaves in ``tmp_path``.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from wfaas import StepState, StepStatus, WorkflowState, WorkflowStatus
from wfaas.chaos import ChaosData, ChaosReport, _check, build_workflow, run_chaos

from conftest import descendants

pytestmark = pytest.mark.usefixtures("no_leftovers")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_200_steps_survive_random_worker_kills(tmp_path: Path, seed: int) -> None:
    report = run_chaos(steps=200, seed=seed, workers=2, kill_every=0.05, timeout=120, workdir=tmp_path)
    assert report.ok, report.summary()
    assert report.status == WorkflowStatus.COMPLETED.name
    assert report.succeeded == 200 and report.lost == 0 and report.duplicates == 0
    assert report.leftover_processes == 0
    # The chaos really happened: workers were killed and steps retried because of it.
    assert report.kills >= 10, report.summary()
    assert report.crashed_attempts >= 5 and report.retries >= 5, report.summary()
    assert report.elapsed < 60

    # Cross-check the report against the step logs: one log per step, named by its idempotency key;
    # the last line of each is the successful attempt's "done", and nothing started after it.
    logs = sorted(tmp_path.glob("*.log"))
    assert len(logs) == 200
    assert len({p.name.split(":")[0] for p in logs}) == 1  # one instance id
    restarted = 0
    for log in logs:
        lines = log.read_text().splitlines()
        sid = log.name.split(":")[1].removesuffix(".log")
        assert all(line.split()[0] == sid for line in lines)
        last = lines[-1].split()
        assert last[1] == "done", f"{sid}: the log ends with {lines[-1]!r}"
        assert lines[-2].split()[:3] == [sid, "start", last[2]], f"{sid}: {lines[-2:]}"
        restarted += sum(1 for line in lines if line.split()[1] == "start") - 1
    assert restarted >= 5  # killed attempts show up as earlier starts in the logs
    assert descendants() == []


def _report() -> ChaosReport:
    return ChaosReport(steps=3, seed=0, workers=2, kill_every=0.05)


def _state(wf_steps: list[str], attempts: dict[str, int], done: dict[str, int]) -> WorkflowState[ChaosData]:
    return WorkflowState(
        instance_id="i",
        workflow_id="wfaas_chaos",
        status=WorkflowStatus.COMPLETED,
        data=ChaosData(done=dict(done)),
        step_states={s: StepState(status=StepStatus.SUCCEEDED, attempts=attempts[s]) for s in wf_steps},
    )


def test_the_checks_catch_duplicates_lost_results_and_count_redone_work(tmp_path: Path) -> None:
    """The self-test's checks themselves can fail: feed them logs of a broken run."""
    wf = build_workflow(3, seed=0, workdir=str(tmp_path))
    ids = [s.id for s in wf.steps]
    a, b, c = ids
    logs = {
        # started again after the attempt recorded as its success: a duplicate
        a: f"{a} start 1 10\n{a} done 1\n{a} start 2 11\n",
        # success recorded for attempt 2, but attempt 2 never finished: lost
        b: f"{b} start 1 10\n{b} start 2 11\n",
        # attempt 1 finished but was killed before reporting; attempt 2 is the success: re-done, fine
        c: f"{c} start 1 10\n{c} done 1\n{c} start 2 11\n{c} done 2\n",
    }
    for sid, text in logs.items():
        (tmp_path / f"i:{sid}.log").write_text(text)
    state = _state(ids, {a: 1, b: 2, c: 2}, {a: 1, b: 2, c: 2})
    report = _report()
    _check(report, wf, state, tmp_path, "i", Counter({a: 1, b: 1, c: 1}), set())
    assert report.duplicates == 1 and report.lost == 1 and report.redone == 1
    assert any(a in p for p in report.problems) and any(b in p for p in report.problems)
    assert not report.ok

    # And a step reported succeeded twice is a duplicate even when its log looks clean.
    report = _report()
    (tmp_path / f"i:{a}.log").write_text(f"{a} start 1 10\n{a} done 1\n")
    (tmp_path / f"i:{b}.log").write_text(f"{b} start 1 10\n{b} start 2 11\n{b} done 2\n")
    _check(report, wf, state, tmp_path, "i", Counter({a: 2, b: 1, c: 1}), set())
    assert (report.duplicates, report.lost) == (1, 0)


def test_command_line_reports_and_exits_0(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "wfaas.chaos", "--steps", "40", "--seed", "7", "--workers", "2", "--kill-every", "0.05"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for line in (
        "steps succeeded     40/40",
        "lost                0",
        "duplicates          0",
        "leftover processes  0",
    ):
        assert line in out, out
    assert "kills" in out and "retries" in out and out.rstrip().endswith("OK")


def test_command_line_exits_1_when_steps_are_lost(tmp_path: Path) -> None:
    """No retries and a kill every ~5 ms: some step dies for good, and the self-test must say so."""
    args = ["--steps", "40", "--seed", "3", "--kill-every", "0.005", "--max-attempts", "1"]
    proc = subprocess.run(
        [sys.executable, "-m", "wfaas.chaos", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED" in proc.stdout and "WorkerCrashed" in proc.stdout, proc.stdout


def test_command_line_rejects_bad_arguments(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "wfaas.chaos", "--steps", "0"], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert proc.returncode == 2 and "--steps" in proc.stderr
