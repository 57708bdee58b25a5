"""Retries, backoff, hooks and waiting, on a virtual clock: hours of backoff and delay take no real time.

Attempts and hook calls are counted in files under ``tmp_path`` (steps and
hooks run in worker processes); backoff is read from ``StepRetrying`` events
and from the virtual timestamps the scheduler records.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from wfaas import (
    Backoff,
    FailureAction,
    FunctionStep,
    RetryPolicy,
    StepDefinition,
    StepExecutor,
    StepFailed,
    StepResult,
    StepStatus,
    WorkflowDefinition,
    WorkflowEngine,
    WorkflowStatus,
    events,
)
from wfaas.testing import VirtualClock

from conftest import Data, collect


def append(path: str | Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text + "\n")


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def of(seen: list[events.WorkflowEvent], kind: type, step: str | None = None) -> list[Any]:
    return [e for e in seen if isinstance(e, kind) and (step is None or getattr(e, "step_id", None) == step)]


def fails_until(success_at: int, log: str, *, how: str = "raise") -> Any:
    """A body that records each attempt and fails (raising or returning FAILURE) before ``success_at``."""

    def body(ctx: Any) -> StepResult:
        append(log, f"attempt{ctx.attempt}")
        if ctx.attempt < success_at:
            if how == "raise":
                raise ConnectionError(f"flaky service, attempt {ctx.attempt}")
            return StepResult.FAILURE
        ctx.data.n = ctx.attempt
        return StepResult.SUCCESS

    return body


def one_step(step: StepDefinition, wid: str = "w") -> WorkflowDefinition:
    return WorkflowDefinition(wid, data_type=Data).add_step(step)


# -- attempts and backoff -----------------------------------------------------------------------------


def test_no_retry_unless_configured(vengine: WorkflowEngine, tmp_path: Path) -> None:
    log = tmp_path / "attempts"
    vengine.register_workflow(one_step(StepDefinition("s", "s", fails_until(2, str(log)))))
    iid = vengine.start_workflow("w", Data())
    with pytest.raises(StepFailed):
        vengine.wait_for_completion(iid, timeout=30)
    assert lines(log) == ["attempt1"]


def test_default_retry_applies_to_steps_without_their_own(vengine: WorkflowEngine, tmp_path: Path) -> None:
    wf = WorkflowDefinition("w", data_type=Data).with_default_retry(RetryPolicy(max_attempts=3))
    wf.add_step(StepDefinition("inherits", "i", fails_until(3, str(tmp_path / "i"))))
    wf.add_step(
        StepDefinition("own", "o", fails_until(2, str(tmp_path / "o")))
        .with_retry(RetryPolicy(max_attempts=1))
        .with_failure_action(FailureAction.CONTINUE_NEXT_STEP)
    )
    vengine.register_workflow(wf)
    iid = vengine.start_workflow("w", Data())
    vengine.wait_for_completion(iid, timeout=30)
    state = vengine.get_status(iid)
    assert state.step_states["inherits"].status is StepStatus.SUCCEEDED
    assert state.step_states["inherits"].attempts == 3
    assert state.step_states["own"].status is StepStatus.FAILED
    assert state.step_states["own"].attempts == 1


class Picky(StepExecutor[Data]):
    """Raises ConnectionError on attempt 1, ValueError after; only ConnectionError is worth a retry."""

    def __init__(self, log: str) -> None:
        self.log = log

    def execute(self, ctx: Any) -> None:
        append(self.log, f"attempt{ctx.attempt}")
        if ctx.attempt == 1:
            raise ConnectionError("temporary")
        raise ValueError("bad input, retrying will not help")

    def is_retryable(self, error: BaseException) -> bool:
        append(self.log, f"asked:{type(error).__name__}")
        return isinstance(error, ConnectionError)


def test_is_retryable_sees_a_returned_failure_too(vengine: WorkflowEngine, tmp_path: Path) -> None:
    log = tmp_path / "log"

    class NeverAgain(StepExecutor[Data]):
        def execute(self, ctx: Any) -> StepResult:
            append(str(log), f"attempt{ctx.attempt}")
            return StepResult.FAILURE

        def is_retryable(self, error: BaseException) -> bool:
            append(str(log), f"asked:{type(error).__name__}")
            return False

    vengine.register_workflow(one_step(StepDefinition("s", "s", NeverAgain()).with_retry(RetryPolicy(max_attempts=3))))
    with pytest.raises(StepFailed):
        vengine.wait_for_completion(vengine.start_workflow("w", Data()), timeout=30)
    assert lines(log) == ["attempt1", "asked:StepFailed"]


def test_retry_indefinitely_keeps_going_until_success(
    vengine: WorkflowEngine, clock: VirtualClock, tmp_path: Path
) -> None:
    log = tmp_path / "attempts"
    seen = collect(vengine)
    step = (
        StepDefinition("s", "s", fails_until(12, str(log)))
        .with_retry(RetryPolicy(max_attempts=2, backoff=Backoff.exponential(base=60, max=3600)))
        .with_failure_action(FailureAction.RETRY_INDEFINITELY)
    )
    vengine.register_workflow(one_step(step))
    before = clock.monotonic()
    iid = vengine.start_workflow("w", Data())
    vengine.wait_for_completion(iid, timeout=60)
    state = vengine.get_status(iid)
    assert state.status is WorkflowStatus.COMPLETED
    assert state.step_states["s"].attempts == 12  # well past max_attempts=2
    assert lines(log) == [f"attempt{i}" for i in range(1, 13)]
    vengine.event_bus.flush()
    delays = [e.delay for e in of(seen, events.StepRetrying)]
    assert delays == [60, 120, 240, 480, 960, 1920, 3600, 3600, 3600, 3600, 3600]  # the backoff still applies
    assert clock.monotonic() - before >= sum(delays)


# -- hooks --------------------------------------------------------------------------------------------


class Hooks(StepExecutor[Data]):
    """Succeeds on attempt ``success_at`` (never if 0); every call is appended to ``log``."""

    def __init__(self, log: str, success_at: int, *, hook_raises: bool = False) -> None:
        self.log = log
        self.success_at = success_at
        self.hook_raises = hook_raises

    def execute(self, ctx: Any) -> None:
        append(self.log, f"attempt{ctx.attempt}")
        ctx.data.n = ctx.attempt
        if ctx.attempt != self.success_at:
            raise ConnectionError(f"down on attempt {ctx.attempt}")

    def on_success(self, ctx: Any) -> None:
        append(self.log, f"on_success:attempt{ctx.attempt}:n={ctx.data.n}")
        if self.hook_raises:
            raise RuntimeError("on_success hook is broken")

    def on_failure(self, ctx: Any, error: BaseException) -> None:
        append(self.log, f"on_failure:{type(error).__name__}:n={ctx.data.n}")
        if self.hook_raises:
            raise RuntimeError("on_failure hook is broken")


def test_on_success_runs_once_after_the_successful_attempt(vengine: WorkflowEngine, tmp_path: Path) -> None:
    log = tmp_path / "log"
    step = StepDefinition("s", "s", Hooks(str(log), success_at=3)).with_retry(RetryPolicy(max_attempts=5))
    vengine.register_workflow(one_step(step))
    iid = vengine.start_workflow("w", Data())
    vengine.wait_for_completion(iid, timeout=30)
    assert lines(log) == ["attempt1", "attempt2", "attempt3", "on_success:attempt3:n=3"]
    assert vengine.get_status(iid).data.n == 3


def test_on_failure_runs_once_after_the_step_failed_for_good(vengine: WorkflowEngine, tmp_path: Path) -> None:
    log = tmp_path / "log"
    step = StepDefinition("s", "s", Hooks(str(log), success_at=0)).with_retry(RetryPolicy(max_attempts=3))
    vengine.register_workflow(one_step(step))
    iid = vengine.start_workflow("w", Data())
    with pytest.raises(StepFailed, match="down on attempt 3"):
        vengine.wait_for_completion(iid, timeout=30)
    # once, after the last attempt, with the error that ended the step; the failed writes are not in its data
    assert lines(log) == ["attempt1", "attempt2", "attempt3", "on_failure:StepFailed:n=0"]
    state = vengine.get_status(iid)
    assert state.step_states["s"].status is StepStatus.FAILED
    assert state.data.n == 0


def test_on_failure_error_names_the_cause(vengine: WorkflowEngine, tmp_path: Path) -> None:
    log = tmp_path / "log"

    class Tells(StepExecutor[Data]):
        def execute(self, ctx: Any) -> None:
            raise KeyError("no such customer")

        def on_failure(self, ctx: Any, error: BaseException) -> None:
            append(str(log), "saw:" + str(error).replace(" ", "_"))

    vengine.register_workflow(one_step(StepDefinition("s", "s", Tells())))
    with pytest.raises(StepFailed):
        vengine.wait_for_completion(vengine.start_workflow("w", Data()), timeout=30)
    (text,) = lines(log)
    assert "no_such_customer" in text and "KeyError" in text


def test_a_raising_on_success_hook_changes_nothing(
    vengine: WorkflowEngine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = tmp_path / "log"
    wf = WorkflowDefinition("w", data_type=Data)
    wf.add_step(StepDefinition("s", "s", Hooks(str(log), success_at=1, hook_raises=True)))
    wf.add_step(StepDefinition("next", "next", lambda ctx: setattr(ctx.data, "value", "next ran")).depends_on(["s"]))
    vengine.register_workflow(wf)
    with caplog.at_level(logging.ERROR, logger="wfaas"):
        iid = vengine.start_workflow("w", Data())
        assert vengine.wait_for_completion(iid, "w", timeout=30) == "w completed successfully via workflow"
        vengine.event_bus.flush()
    state = vengine.get_status(iid)
    assert state.step_states["s"].status is StepStatus.SUCCEEDED
    assert state.step_states["s"].attempts == 1
    assert state.data.n == 1 and state.data.value == "next ran"
    assert lines(log) == ["attempt1", "on_success:attempt1:n=1"]
    assert "on_success hook is broken" in caplog.text  # logged, through logger `wfaas`


@pytest.mark.parametrize("action", [FailureAction.FAIL_WORKFLOW, FailureAction.CONTINUE_NEXT_STEP])
def test_a_raising_on_failure_hook_changes_nothing(
    vengine: WorkflowEngine, tmp_path: Path, caplog: pytest.LogCaptureFixture, action: FailureAction
) -> None:
    log = tmp_path / "log"
    wf = WorkflowDefinition("w", data_type=Data)
    wf.add_step(
        StepDefinition("s", "s", Hooks(str(log), success_at=0, hook_raises=True))
        .with_retry(RetryPolicy(max_attempts=2))
        .with_failure_action(action)
    )
    wf.add_step(StepDefinition("next", "next", lambda ctx: setattr(ctx.data, "value", "next ran")).depends_on(["s"]))
    vengine.register_workflow(wf)
    with caplog.at_level(logging.ERROR, logger="wfaas"):
        iid = vengine.start_workflow("w", Data())
        if action is FailureAction.FAIL_WORKFLOW:
            with pytest.raises(StepFailed, match="down on attempt 2") as info:
                vengine.wait_for_completion(iid, timeout=30)
            assert isinstance(info.value.__cause__, ConnectionError)  # the step's error, not the hook's
        else:
            vengine.wait_for_completion(iid, timeout=30)
        vengine.event_bus.flush()
    state = vengine.get_status(iid)
    assert state.step_states["s"].status is StepStatus.FAILED
    assert state.step_states["s"].attempts == 2
    assert lines(log) == ["attempt1", "attempt2", "on_failure:StepFailed:n=0"]
    assert "on_failure hook is broken" in caplog.text
    if action is FailureAction.FAIL_WORKFLOW:
        assert state.status is WorkflowStatus.FAILED
        assert state.error is not None and "down on attempt 2" in state.error
        assert "hook is broken" not in state.error
        assert state.step_states["next"].status is StepStatus.PENDING
    else:
        assert state.status is WorkflowStatus.COMPLETED
        assert state.data.value == "next ran"


def test_function_step_has_no_hooks_and_retries_like_a_function(vengine: WorkflowEngine, tmp_path: Path) -> None:
    log = tmp_path / "attempts"
    step = StepDefinition("s", "s", FunctionStep(fails_until(2, str(log)))).with_retry(RetryPolicy(max_attempts=2))
    vengine.register_workflow(one_step(step))
    iid = vengine.start_workflow("w", Data())
    vengine.wait_for_completion(iid, timeout=30)
    assert lines(log) == ["attempt1", "attempt2"]


# -- a failed attempt changes nothing -------------------------------------------------------------------


@pytest.mark.parametrize("how", ["raise", "return"])
def test_a_failed_attempts_writes_are_discarded(vengine: WorkflowEngine, how: str) -> None:
    def half_done(ctx: Any) -> StepResult:
        if ctx.attempt == 1:
            ctx.data.n = 999
            ctx.data.items["partial"] = True
            ctx.data.log.append("partial")
            ctx.set("partial", "yes")
            if how == "raise":
                raise RuntimeError("failed half-way")
            return StepResult.FAILURE
        ctx.data.value = {
            "n": ctx.data.n,
            "items": dict(ctx.data.items),
            "log": list(ctx.data.log),
            "ctx": ctx.get("partial", None),
        }
        return StepResult.SUCCESS

    vengine.register_workflow(
        one_step(StepDefinition("s", "s", half_done).with_retry(RetryPolicy(max_attempts=2, backoff=Backoff.fixed(5))))
    )
    iid = vengine.start_workflow("w", Data(items={"kept": 1}))
    vengine.wait_for_completion(iid, timeout=30)
    state = vengine.get_status(iid)
    # the second attempt started from the data as it was before the first
    assert state.data.value == {"n": 0, "items": {"kept": 1}, "log": [], "ctx": None}
    assert state.data.n == 0 and state.data.items == {"kept": 1} and state.data.log == []
    assert "partial" not in state.context


# -- waiting: delay, scheduled_at, backoff -----------------------------------------------------------------


def stamp(ctx: Any) -> None:
    ctx.data.items[ctx.step_id] = True


@pytest.mark.parametrize(
    ("delay", "at", "earliest"),
    [
        (timedelta(0), timedelta(days=2), timedelta(days=2)),
        (timedelta(hours=3), timedelta(hours=1), timedelta(hours=3)),
        (timedelta(hours=1), timedelta(hours=5), timedelta(hours=5)),
    ],
    ids=["schedule-only", "delay-later", "schedule-later"],
)
def test_scheduled_at_and_delay_wait_for_both(
    vengine: WorkflowEngine, clock: VirtualClock, delay: timedelta, at: timedelta, earliest: timedelta
) -> None:
    t0 = clock.now()
    wf = WorkflowDefinition("w", data_type=Data).add_step(
        StepDefinition("s", "s", stamp).with_delay(delay).scheduled_at(t0 + at)
    )
    vengine.register_workflow(wf)
    iid = vengine.start_workflow("w", Data())
    vengine.wait_for_completion(iid, timeout=30)
    step = vengine.get_status(iid).step_states["s"]
    assert step.status is StepStatus.SUCCEEDED
    assert step.started_at >= t0 + earliest


def test_retry_indefinitely_still_asks_is_retryable(vengine: WorkflowEngine, tmp_path: Path) -> None:
    """RETRY_INDEFINITELY lifts the attempt limit, nothing else."""
    log = tmp_path / "log"
    step = StepDefinition("s", "s", Picky(str(log))).with_failure_action(FailureAction.RETRY_INDEFINITELY)
    vengine.register_workflow(one_step(step))
    iid = vengine.start_workflow("w", Data())
    with pytest.raises(StepFailed, match="bad input"):
        vengine.wait_for_completion(iid, timeout=30)
    assert lines(log) == ["attempt1", "asked:ConnectionError", "attempt2", "asked:ValueError"]
    assert vengine.get_status(iid).step_states["s"].attempts == 2


def test_hooks_run_in_a_worker(vengine: WorkflowEngine, tmp_path: Path) -> None:
    log = tmp_path / "log"

    class WherePid(StepExecutor[Data]):
        def execute(self, ctx: Any) -> None:
            if ctx.step_id == "bad":
                raise ValueError("no")

        def on_success(self, ctx: Any) -> None:
            append(str(log), f"on_success:{os.getpid()}")

        def on_failure(self, ctx: Any, error: BaseException) -> None:
            append(str(log), f"on_failure:{os.getpid()}")

    wf = WorkflowDefinition("w", data_type=Data)
    wf.add_step(StepDefinition("good", "good", WherePid()))
    wf.add_step(
        StepDefinition("bad", "bad", WherePid())
        .depends_on(["good"])
        .with_failure_action(FailureAction.CONTINUE_NEXT_STEP)
    )
    vengine.register_workflow(wf)
    vengine.wait_for_completion(vengine.start_workflow("w", Data()), timeout=30)
    calls = dict(line.split(":") for line in lines(log))
    assert set(calls) == {"on_success", "on_failure"}
    assert str(os.getpid()) not in calls.values()
