"""What each attempt cost, as ``StepState.history``, events and ``status --json`` show it.

CPU and memory are measured in the worker (the step's child processes
included); waits on the virtual clock, so a backoff of hours takes no time
and its figure is exact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from wfaas import (
    Attempt,
    Backoff,
    FailureAction,
    RetryPolicy,
    SqliteStore,
    StepDefinition,
    WorkflowDefinition,
    WorkflowEngine,
    events,
)
from wfaas.command_line import main
from wfaas.testing import VirtualClock

from conftest import Data

MB = 1_000_000


def burn(seconds: float) -> None:
    """Pure-Python CPU work for ``seconds`` of this process's CPU time."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def run_one(engine: WorkflowEngine, *steps: StepDefinition) -> Any:
    wf = WorkflowDefinition("figures", data_type=Data)
    for step in steps:
        wf.add_step(step)
    engine.register_workflow(wf)
    iid = engine.start_workflow("figures", Data())
    engine.wait_for_completion(iid, timeout=60)
    return engine.get_status(iid)


def only(state: Any, sid: str) -> Attempt:
    (attempt,) = state.step_states[sid].history
    return attempt


def test_a_cpu_bound_step_reports_its_cpu_time(engine: WorkflowEngine) -> None:
    state = run_one(engine, StepDefinition("cpu", "cpu", lambda ctx: burn(0.5)))
    attempt = only(state, "cpu")
    assert attempt.outcome == "succeeded" and attempt.number == 1
    assert attempt.cpu is not None and attempt.cpu >= 0.4
    assert attempt.wall is not None and attempt.wall >= attempt.cpu * 0.9
    assert attempt.started_at is not None and attempt.finished_at is not None


def test_cpu_of_the_steps_child_processes_counts(engine: WorkflowEngine) -> None:
    code = "import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass"

    def step(ctx: Any) -> None:
        subprocess.run([sys.executable, "-c", code], check=True)

    attempt = only(run_one(engine, StepDefinition("child", "child", step)), "child")
    assert attempt.cpu is not None and attempt.cpu >= 0.35


def test_peak_memory_is_per_attempt(tmp_path: Path) -> None:
    def big(ctx: Any) -> None:
        block = bytearray(200 * MB)
        block[::4096] = b"x" * len(block[::4096])  # touch every page: resident, not just reserved
        ctx.data.n = len(block)

    def small(ctx: Any) -> None:
        ctx.data.value = "small"

    # One worker, so the small step runs in the process the big one grew.
    with WorkflowEngine(max_workers=1) as engine:
        state = run_one(
            engine, StepDefinition("big", "big", big), StepDefinition("small", "small", small).depends_on("big")
        )
    big_rss, small_rss = only(state, "big").max_rss, only(state, "small").max_rss
    assert big_rss is not None and big_rss >= 200 * MB
    assert small_rss is not None and small_rss < 150 * MB


def test_backoff_and_delay_are_waits_with_their_kind(
    vengine: WorkflowEngine, clock: VirtualClock, tmp_path: Path
) -> None:
    marker = tmp_path / "failed-once"

    def flaky(ctx: Any) -> None:
        if not marker.exists():
            marker.touch()
            raise RuntimeError("first attempt fails")

    policy = RetryPolicy(max_attempts=3, backoff=Backoff.fixed(3600))
    state = run_one(
        vengine,
        StepDefinition("flaky", "flaky", flaky).with_retry(policy),
        StepDefinition("later", "later", lambda ctx: None).with_delay(timedelta(minutes=10)),
    )
    first, second = state.step_states["flaky"].history
    assert (first.outcome, first.wait_kind, first.waited) == ("failed", None, 0.0)
    assert "first attempt fails" in (first.error or "")
    assert second.outcome == "succeeded" and second.number == 2
    assert second.wait_kind == "backoff" and second.waited == pytest.approx(3600, abs=1)
    later = only(state, "later")
    assert later.wait_kind == "delay" and later.waited == pytest.approx(600, abs=1)


def test_queued_is_the_time_waiting_for_a_free_worker(tmp_path: Path) -> None:
    with WorkflowEngine(max_workers=1) as engine:
        state = run_one(engine, *(StepDefinition(s, s, lambda ctx: burn(0.3)) for s in ("a", "b")))
    first, second = sorted((only(state, s) for s in "ab"), key=lambda a: a.queued)
    assert first.queued < 0.2
    assert second.queued >= 0.25  # it waited for the other's 0.3 s of CPU


def test_killed_attempts_say_how_the_worker_ended(engine: WorkflowEngine) -> None:
    def crash(ctx: Any) -> None:
        os._exit(3)

    go_on = FailureAction.CONTINUE_NEXT_STEP  # so that one failure does not cancel the other
    state = run_one(
        engine,
        StepDefinition("hang", "hang", lambda ctx: time.sleep(60)).with_timeout(0.5).with_failure_action(go_on),
        StepDefinition("crash", "crash", crash).with_failure_action(go_on),
    )
    hang, crashed = only(state, "hang"), only(state, "crash")
    assert hang.outcome == "timed_out" and hang.signal in ("SIGTERM", "SIGKILL") and hang.cpu is None
    assert hang.wall is not None and hang.wall >= 0.5
    assert crashed.outcome == "crashed" and crashed.exitcode == 3 and crashed.signal is None
    assert "exited with code 3" in (crashed.error or "")


def test_events_carry_the_figures(engine: WorkflowEngine) -> None:
    seen: list[events.WorkflowEvent] = []
    engine.event_bus.subscribe(seen.append)
    run_one(engine, StepDefinition("cpu", "cpu", lambda ctx: burn(0.2)))
    engine.event_bus.flush()
    (done,) = [e for e in seen if isinstance(e, events.StepSucceeded)]
    assert done.usage is not None and done.usage["cpu"] >= 0.15 and done.usage["max_rss"] > 0
    assert done.usage["queued"] >= 0.0 and done.usage["wait_kind"] is None


def test_history_is_checkpointed_and_shown_by_status_json(tmp_path: Path) -> None:
    path = tmp_path / "runs.sqlite"
    marker = tmp_path / "failed-once"

    def flaky(ctx: Any) -> None:
        if not marker.exists():
            marker.touch()
            raise RuntimeError("boom")
        burn(0.2)

    store = SqliteStore(path)
    try:
        with WorkflowEngine(max_workers=1, store=store) as engine:
            policy = RetryPolicy(max_attempts=2, backoff=Backoff.fixed(0.05))
            state = run_one(engine, StepDefinition("flaky", "flaky", flaky).with_retry(policy))
    finally:
        store.close()
    result = CliRunner().invoke(main, ["status", state.instance_id, "--store", str(path), "--json"])
    assert result.exit_code == 0, result.output
    history = json.loads(result.output)["steps"]["flaky"]["history"]
    assert [a["outcome"] for a in history] == ["failed", "succeeded"]
    assert history[1]["cpu"] >= 0.15 and history[1]["wait_kind"] == "backoff"
    assert "boom" in history[0]["error"]
    text = CliRunner().invoke(main, ["status", state.instance_id, "--store", str(path)]).output
    assert "cpu" in text and "peak RSS" in text


def test_a_step_keeps_its_last_hundred_attempts(vengine: WorkflowEngine, tmp_path: Path) -> None:
    def fails_until_attempt_105(ctx: Any) -> None:
        if ctx.attempt < 105:
            raise RuntimeError(f"attempt {ctx.attempt}")

    policy = RetryPolicy(max_attempts=105, backoff=Backoff.fixed(1))
    state = run_one(vengine, StepDefinition("many", "many", fails_until_attempt_105).with_retry(policy))
    history = state.step_states["many"].history
    assert state.step_states["many"].attempts == 105
    assert len(history) == 100 and history[0].number == 6 and history[-1].outcome == "succeeded"
