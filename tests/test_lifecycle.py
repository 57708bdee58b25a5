"""The engine's life and the readiness rules: events, waiting, shutdown, cleanup, hooks, context, clock."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from wfaas import (
    ContextValueNotFound,
    DefinitionNotFound,
    InvalidStateTransition,
    LoggingSubscriber,
    NotFound,
    RetryPolicy,
    ShuttingDown,
    StepDefinition,
    StepExecutor,
    StepFailed,
    StepResult,
    StepStatus,
    TypeMismatch,
    WorkflowData,
    WorkflowDefinition,
    WorkflowEngine,
    WorkflowStatus,
    events,
    transient,
)
from wfaas.readiness import TRUTH_TABLE, Decision, Gate, Outcome, decide
from wfaas.states import check_step_transition

from conftest import Data, wait_until


def noop(ctx: Any) -> None:
    ctx.data.log.append(ctx.step_id)


def block_until(path: Path, timeout: float = 60) -> Any:
    def body(ctx: Any) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)

    return body


# -- the truth table, without processes -----------------------------------------------------


def test_truth_table_rows() -> None:
    assert TRUTH_TABLE[Outcome.SUCCEEDED].satisfies_any
    assert not TRUTH_TABLE[Outcome.SKIPPED].satisfies_any
    assert not TRUTH_TABLE[Outcome.FAILED_CONTINUE].satisfies_any
    assert all(c.finishes for c in TRUTH_TABLE.values())


def test_gate_for_depends_on_any_waits_for_a_success_or_all() -> None:
    gate = Gate(all_pending=1, any_total=2)
    assert not gate.record(Outcome.SUCCEEDED, via_any=False)  # the `all` part is done, `any` is not
    assert not gate.record(Outcome.SKIPPED, via_any=True)  # a skipped alternative does not open it
    assert gate.record(Outcome.FAILED_CONTINUE, via_any=True)  # all alternatives finished: run anyway
    assert not gate.check()  # opens exactly once

    gate = Gate(all_pending=0, any_total=3)
    assert gate.record(Outcome.SUCCEEDED, via_any=True)


def test_decide_waits_then_asks_the_condition() -> None:
    asked: list[int] = []

    def condition() -> bool:
        asked.append(1)
        return False

    assert decide(condition, ready_at=10.0, now=5.0, not_before=None) == (Decision.WAIT, 10.0)
    assert decide(condition, ready_at=10.0, now=5.0, not_before=20.0) == (Decision.WAIT, 20.0)
    assert asked == []  # not asked while waiting
    assert decide(condition, ready_at=10.0, now=20.0, not_before=20.0) == (Decision.SKIP, 20.0)
    assert decide(None, ready_at=0.0, now=1.0, not_before=None) == (Decision.RUN, 1.0)


def test_transition_table_names_both_states() -> None:
    with pytest.raises(InvalidStateTransition, match="SUCCEEDED to RUNNING"):
        check_step_transition("iid", "s", StepStatus.SUCCEEDED, StepStatus.RUNNING)


# -- events ---------------------------------------------------------------------------------------


def test_events_arrive_in_order(engine: WorkflowEngine) -> None:
    seen: list[events.WorkflowEvent] = []
    engine.event_bus.subscribe(seen.append)

    def fail_once(ctx: Any) -> StepResult:
        return StepResult.FAILURE if ctx.attempt == 1 else StepResult.SUCCESS

    wf = WorkflowDefinition("ev", data_type=Data)
    wf.add_step(StepDefinition("a", "a", noop))
    wf.add_step(StepDefinition("b", "b", fail_once).depends_on(["a"]).with_retry(RetryPolicy(max_attempts=2)))
    wf.add_step(StepDefinition("skip", "skip", noop).depends_on(["b"]).run_if(lambda ctx: False))
    engine.register_workflow(wf)
    iid = engine.start_workflow("ev", Data())
    engine.wait_for_completion(iid, timeout=30)
    assert engine.event_bus.flush()
    kinds = [(type(e).__name__, getattr(e, "step_id", None)) for e in seen if e.instance_id == iid]
    assert kinds == [
        ("WorkflowStarted", None),
        ("StepStarted", "a"),
        ("StepSucceeded", "a"),
        ("StepStarted", "b"),
        ("StepFailed", "b"),
        ("StepRetrying", "b"),
        ("StepStarted", "b"),
        ("StepSucceeded", "b"),
        ("StepSkipped", "skip"),
        ("WorkflowCompleted", None),
    ]
    failed = next(e for e in seen if isinstance(e, events.StepFailed))
    assert failed.will_retry and failed.attempt == 1
    skipped = next(e for e in seen if isinstance(e, events.StepSkipped))
    assert "run_if" in skipped.reason


def test_a_raising_subscriber_stalls_nothing(engine: WorkflowEngine, caplog: pytest.LogCaptureFixture) -> None:
    later: list[events.WorkflowEvent] = []

    def bad(event: events.WorkflowEvent) -> None:
        raise RuntimeError("subscriber bug")

    engine.event_bus.subscribe(bad)
    engine.event_bus.subscribe(later.append)
    engine.event_bus.subscribe(LoggingSubscriber())
    engine.register_workflow(WorkflowDefinition("sub", data_type=Data).add_step(StepDefinition("a", "a", noop)))
    with caplog.at_level(logging.INFO, logger="wfaas"):
        iid = engine.start_workflow("sub", Data())
        engine.wait_for_completion(iid, timeout=30)
        engine.event_bus.flush()
    assert any(isinstance(e, events.WorkflowCompleted) for e in later)
    assert "subscriber bug" in caplog.text
    assert f"WorkflowCompleted sub/{iid}" in caplog.text


def test_workflow_failed_event_names_the_step(engine: WorkflowEngine) -> None:
    seen: list[events.WorkflowEvent] = []
    engine.event_bus.subscribe(seen.append)

    def boom(ctx: Any) -> None:
        raise ValueError("bad input")

    engine.register_workflow(WorkflowDefinition("f", data_type=Data).add_step(StepDefinition("x", "x", boom)))
    iid = engine.start_workflow("f", Data())
    with pytest.raises(StepFailed, match="bad input"):
        engine.wait_for_completion(iid, timeout=30)
    engine.event_bus.flush()
    failed = [e for e in seen if isinstance(e, events.WorkflowFailed)]
    assert len(failed) == 1 and failed[0].failed_step == "x" and "bad input" in failed[0].error


# -- waiting, errors, shutdown ----------------------------------------------------------------------


def test_unknown_ids_and_shutdown(engine: WorkflowEngine) -> None:
    with pytest.raises(NotFound):
        engine.get_status("nope")
    with pytest.raises(DefinitionNotFound, match="'nope'"):
        engine.start_workflow("nope", Data())
    engine.register_workflow(WorkflowDefinition("w", data_type=Data).add_step(StepDefinition("a", "a", noop)))
    with pytest.raises(TypeError, match="must be a Data"):
        engine.start_workflow("w", object())
    engine.shutdown()
    with pytest.raises(ShuttingDown):
        engine.start_workflow("w", Data())


def test_wait_timeout_leaves_the_run_going(engine: WorkflowEngine, tmp_path: Path) -> None:
    go = tmp_path / "go"
    engine.register_workflow(
        WorkflowDefinition("w", data_type=Data).add_step(StepDefinition("b", "b", block_until(go)))
    )
    iid = engine.start_workflow("w", Data())
    with pytest.raises(TimeoutError):
        engine.wait_for_completion(iid, timeout=0.2)
    assert engine.get_status(iid).status is WorkflowStatus.RUNNING
    go.touch()
    assert engine.wait_for_completion(iid, "w", timeout=30) == "w completed successfully via workflow"
    with pytest.raises(InvalidStateTransition, match="already finished"):
        engine.cancel_workflow(iid)


def test_wait_for_shutdown_and_force_cancel_all(tmp_path: Path) -> None:
    go = tmp_path / "go"
    engine = WorkflowEngine(max_workers=2, grace_period=0.5)
    try:
        wf = WorkflowDefinition("w", data_type=Data).add_step(StepDefinition("b", "b", block_until(go)))
        engine.register_workflow(wf)
        ids = [engine.start_workflow("w", Data()) for _ in range(2)]
        assert engine.wait_for_shutdown(timeout=0.3) is False
        assert engine.force_cancel_all() == 2
        assert [engine.get_status(i).status for i in ids] == [WorkflowStatus.CANCELLED] * 2
        assert engine.wait_for_shutdown(timeout=10) is True
    finally:
        engine.close()


def test_cleanup_task_removes_finished_instances(engine: WorkflowEngine) -> None:
    engine.register_workflow(WorkflowDefinition("w", data_type=Data).add_step(StepDefinition("a", "a", noop)))
    iid = engine.start_workflow("w", Data())
    engine.wait_for_completion(iid, timeout=30)
    handle = engine.start_cleanup_task(ttl=0, interval=0.05)
    try:
        wait_until(lambda: iid not in engine.store.ids(), 10, "the cleanup")
    finally:
        handle.stop()
    assert handle.removed >= 1
    with pytest.raises(NotFound):
        engine.get_status(iid)


def test_exiting_the_context_with_an_error_cancels_runs(tmp_path: Path) -> None:
    go = tmp_path / "go"
    with pytest.raises(RuntimeError, match="user code"), WorkflowEngine(max_workers=2, grace_period=0.5) as engine:
        engine.register_workflow(
            WorkflowDefinition("w", data_type=Data).add_step(StepDefinition("b", "b", block_until(go)))
        )
        iid = engine.start_workflow("w", Data())
        wait_until(lambda: engine.get_status(iid).step_states["b"].status is StepStatus.RUNNING, 30, "start")
        raise RuntimeError("user code")
    assert engine.get_status(iid).status is WorkflowStatus.CANCELLED


# -- hooks, context, data ---------------------------------------------------------------------------


class Hooked(StepExecutor[Data]):
    def __init__(self, marks: str) -> None:
        self.marks = marks

    def execute(self, ctx: Any) -> StepResult:
        with open(self.marks, "a") as f:
            f.write(f"attempt{ctx.attempt}\n")
        return StepResult.FAILURE

    def is_retryable(self, error: BaseException) -> bool:
        return True

    def on_failure(self, ctx: Any, error: BaseException) -> None:
        with open(self.marks, "a") as f:
            f.write(f"on_failure:{type(error).__name__}\n")


class Succeeds(StepExecutor[Data]):
    def __init__(self, marks: str) -> None:
        self.marks = marks

    def execute(self, ctx: Any) -> None:
        ctx.data.n = 1

    def on_success(self, ctx: Any) -> None:
        with open(self.marks, "a") as f:
            f.write(f"on_success:{ctx.data.n}\n")
        raise RuntimeError("a raising hook changes nothing")


def test_hooks_run_once(engine: WorkflowEngine, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    wf = WorkflowDefinition("h", data_type=Data)
    wf.add_step(StepDefinition("ok", "ok", Succeeds(str(marks))))
    wf.add_step(
        StepDefinition("bad", "bad", Hooked(str(marks))).depends_on(["ok"]).with_retry(RetryPolicy(max_attempts=3))
    )
    engine.register_workflow(wf)
    iid = engine.start_workflow("h", Data())
    with pytest.raises(StepFailed):
        engine.wait_for_completion(iid, timeout=30)
    assert marks.read_text().split() == ["on_success:1", "attempt1", "attempt2", "attempt3", "on_failure:StepFailed"]
    assert engine.get_status(iid).data.n == 1


def test_context_values_and_their_errors(engine: WorkflowEngine) -> None:
    def writer(ctx: Any) -> None:
        ctx.set("rows", 42)
        ctx.set("name", "x")

    def reader(ctx: Any) -> None:
        ctx.data.n = ctx.get("rows", type=int) + ctx.get("missing", 0)
        try:
            ctx.get("missing")
        except ContextValueNotFound as exc:
            ctx.data.log.append(type(exc).__name__)
        try:
            ctx.get("name", type=int)
        except TypeMismatch as exc:
            ctx.data.log.append(type(exc).__name__)
        ctx.data.value = ctx.idempotency_key

    wf = WorkflowDefinition("c", data_type=Data)
    wf.add_step(StepDefinition("w", "w", writer)).add_step(StepDefinition("r", "r", reader).depends_on(["w"]))
    engine.register_workflow(wf)
    iid = engine.start_workflow("c", Data())
    engine.wait_for_completion(iid, timeout=30)
    state = engine.get_status(iid)
    assert state.data.n == 42
    assert state.data.log == ["ContextValueNotFound", "TypeMismatch"]
    assert state.data.value == f"{iid}:r"
    assert state.context == {"rows": 42, "name": "x"}


@dataclass
class WithConnection(WorkflowData):
    url: str = "db://x"
    conn: Any = transient()
    seen: str = ""

    def restore(self) -> None:
        self.conn = threading.Lock()  # stands in for a connection: it cannot be pickled


def test_transient_fields_are_recreated_in_the_worker(engine: WorkflowEngine) -> None:
    def use(ctx: Any) -> None:
        ctx.data.seen = f"{type(ctx.data.conn).__name__} in {os.getpid()}"

    wf = WorkflowDefinition("t", data_type=WithConnection).add_step(StepDefinition("u", "u", use))
    engine.register_workflow(wf)
    data = WithConnection()
    data.restore()
    iid = engine.start_workflow("t", data)
    engine.wait_for_completion(iid, timeout=30)
    assert engine.get_status(iid).data.seen.startswith("lock in ")
    assert str(os.getpid()) not in engine.get_status(iid).data.seen


# -- time ------------------------------------------------------------------------------------------
