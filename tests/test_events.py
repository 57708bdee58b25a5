"""Lifecycle events (API.md section 7): what is published, in which order, and how subscribers are called."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from wfaas import (
    Backoff,
    Cancelled,
    EventSubscriber,
    FailureAction,
    LoggingSubscriber,
    RetryPolicy,
    StepDefinition,
    StepFailed,
    StepResult,
    StepStatus,
    StepTimeout,
    WorkflowDefinition,
    WorkflowEngine,
    events,
)
from wfaas.events import WorkflowEvent
from wfaas.testing import VirtualClock

from conftest import Data, wait_for, wait_for_text, wait_until, write_atomic


def record(ctx: Any) -> None:
    ctx.data.items[ctx.step_id] = True  # distinct keys: parallel steps never conflict


class Recorder:
    """A subscriber object (``on_event``) that keeps every event it is given."""

    def __init__(self) -> None:
        self.events: list[WorkflowEvent] = []
        self.lock = threading.Lock()

    def on_event(self, event: WorkflowEvent) -> None:
        with self.lock:
            self.events.append(event)

    def of(self, iid: str) -> list[WorkflowEvent]:
        with self.lock:
            return [e for e in self.events if e.instance_id == iid]


def kinds(evs: list[WorkflowEvent]) -> list[tuple[str, str | None]]:
    return [(type(e).__name__, getattr(e, "step_id", None)) for e in evs]


def index(evs: list[WorkflowEvent], kind: type, step: str | None = None, attempt: int | None = None) -> int:
    for i, e in enumerate(evs):
        if (
            type(e) is kind
            and (step is None or getattr(e, "step_id", None) == step)
            and (attempt is None or getattr(e, "attempt", None) == attempt)
        ):
            return i
    raise AssertionError(f"no {kind.__name__} {step or ''} {attempt or ''} in {kinds(evs)}")


def diamond(wid: str = "diamond") -> WorkflowDefinition:
    wf = WorkflowDefinition(wid, wid, data_type=Data)
    wf.add_step(StepDefinition("a", "a", record))
    wf.add_step(StepDefinition("b", "b", record).depends_on(["a"]))
    wf.add_step(StepDefinition("c", "c", record).depends_on(["a"]))
    wf.add_step(StepDefinition("d", "d", record).depends_on(["b", "c"]))
    return wf


# -- order ----------------------------------------------------------------------------------------


def test_events_of_a_dag_arrive_in_a_sensible_order_per_instance(engine: WorkflowEngine) -> None:
    rec = Recorder()
    engine.event_bus.subscribe(rec)
    engine.register_workflow(diamond())
    ids = [engine.start_workflow("diamond", Data()) for _ in range(3)]
    for iid in ids:
        engine.wait_for_completion(iid, timeout=30)
    assert engine.event_bus.flush()

    for iid in ids:
        evs = rec.of(iid)
        assert isinstance(evs[0], events.WorkflowStarted), kinds(evs)
        assert isinstance(evs[-1], events.WorkflowCompleted), kinds(evs)
        assert sum(isinstance(e, events.WorkflowStarted) for e in evs) == 1
        assert sum(isinstance(e, events.WorkflowCompleted) for e in evs) == 1
        assert len(evs) == 2 + 2 * 4, kinds(evs)
        for step in "abcd":
            assert index(evs, events.StepStarted, step) < index(evs, events.StepSucceeded, step), kinds(evs)
        # a dependent starts only after what it depends on succeeded
        for dep, step in (("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")):
            assert index(evs, events.StepSucceeded, dep) < index(evs, events.StepStarted, step), kinds(evs)
        # the timestamps follow the order of delivery
        stamps = [e.timestamp for e in evs]
        assert stamps == sorted(stamps)
        for e in evs:
            assert e.workflow_id == "diamond"
            assert isinstance(e.timestamp, datetime) and e.timestamp.tzinfo is not None
        for e in evs:
            if isinstance(e, (events.StepStarted, events.StepSucceeded)):
                assert e.attempt == 1
            if isinstance(e, events.StepSucceeded):
                assert e.duration >= 0
        completed = evs[-1]
        assert isinstance(completed, events.WorkflowCompleted) and completed.duration >= 0


def test_events_are_frozen_dataclasses(engine: WorkflowEngine) -> None:
    rec = Recorder()
    engine.event_bus.subscribe(rec)
    engine.register_workflow(diamond())
    engine.wait_for_completion(engine.start_workflow("diamond", Data()), timeout=30)
    engine.event_bus.flush()
    assert rec.events
    for e in rec.events:
        assert dataclasses.is_dataclass(e) and isinstance(e, WorkflowEvent)
        with pytest.raises(dataclasses.FrozenInstanceError):
            e.instance_id = "changed"  # type: ignore[misc]


def test_retried_step_fails_retries_then_succeeds(engine: WorkflowEngine) -> None:
    rec = Recorder()
    engine.event_bus.subscribe(rec)

    def flaky(ctx: Any) -> None:
        if ctx.attempt < 3:
            raise RuntimeError(f"flaky attempt {ctx.attempt}")

    wf = WorkflowDefinition("retry", data_type=Data).add_step(
        StepDefinition("f", "f", flaky).with_retry(RetryPolicy(max_attempts=3, backoff=Backoff.fixed(0.01)))
    )
    engine.register_workflow(wf)
    iid = engine.start_workflow("retry", Data())
    engine.wait_for_completion(iid, timeout=30)
    engine.event_bus.flush()
    evs = rec.of(iid)
    assert kinds(evs) == [
        ("WorkflowStarted", None),
        ("StepStarted", "f"),
        ("StepFailed", "f"),
        ("StepRetrying", "f"),
        ("StepStarted", "f"),
        ("StepFailed", "f"),
        ("StepRetrying", "f"),
        ("StepStarted", "f"),
        ("StepSucceeded", "f"),
        ("WorkflowCompleted", None),
    ]
    failed = [e for e in evs if isinstance(e, events.StepFailed)]
    assert [(e.attempt, e.will_retry) for e in failed] == [(1, True), (2, True)]
    assert "flaky attempt 1" in failed[0].error and "flaky attempt 2" in failed[1].error
    retrying = [e for e in evs if isinstance(e, events.StepRetrying)]
    assert [e.attempt for e in retrying] == [2, 3]
    assert [e.delay for e in retrying] == pytest.approx([0.01, 0.01])
    assert [e.attempt for e in evs if isinstance(e, events.StepStarted)] == [1, 2, 3]
    succeeded = [e for e in evs if isinstance(e, events.StepSucceeded)]
    assert [e.attempt for e in succeeded] == [3]


def test_last_attempt_failure_does_not_retry(engine: WorkflowEngine) -> None:
    rec = Recorder()
    engine.event_bus.subscribe(rec)

    def always(ctx: Any) -> StepResult:
        return StepResult.FAILURE

    wf = WorkflowDefinition("fails", data_type=Data).add_step(
        StepDefinition("f", "f", always).with_retry(RetryPolicy(max_attempts=2))
    )
    engine.register_workflow(wf)
    iid = engine.start_workflow("fails", Data())
    with pytest.raises(StepFailed):
        engine.wait_for_completion(iid, timeout=30)
    engine.event_bus.flush()
    evs = rec.of(iid)
    failed = [e for e in evs if isinstance(e, events.StepFailed)]
    assert [(e.attempt, e.will_retry) for e in failed] == [(1, True), (2, False)]
    assert sum(isinstance(e, events.StepRetrying) for e in evs) == 1
    assert isinstance(evs[-1], events.WorkflowFailed)


def test_step_skipped_carries_a_reason(engine: WorkflowEngine) -> None:
    rec = Recorder()
    engine.event_bus.subscribe(rec)

    def skip(ctx: Any) -> StepResult:
        return StepResult.SKIP

    wf = WorkflowDefinition("skips", data_type=Data)
    wf.add_step(StepDefinition("cond", "cond", record).run_if(lambda ctx: ctx.data.n > 0))
    wf.add_step(StepDefinition("body", "body", skip))
    wf.add_step(StepDefinition("after", "after", record).depends_on(["cond", "body"]))
    engine.register_workflow(wf)
    iid = engine.start_workflow("skips", Data(n=0))
    engine.wait_for_completion(iid, timeout=30)
    engine.event_bus.flush()
    evs = rec.of(iid)
    skipped = {e.step_id: e for e in evs if isinstance(e, events.StepSkipped)}
    assert set(skipped) == {"cond", "body"}
    assert "run_if" in skipped["cond"].reason
    assert "SKIP" in skipped["body"].reason
    # run_if is decided in the scheduler: the step never started
    assert not any(isinstance(e, events.StepStarted) and e.step_id == "cond" for e in evs)
    assert index(evs, events.StepStarted, "body") < index(evs, events.StepSkipped, "body")
    # its dependents still run, after both skips
    assert index(evs, events.StepSkipped, "cond") < index(evs, events.StepStarted, "after")
    assert index(evs, events.StepSkipped, "body") < index(evs, events.StepStarted, "after")
    assert isinstance(evs[-1], events.WorkflowCompleted)


def test_workflow_failed_names_the_failed_step(engine: WorkflowEngine) -> None:
    rec = Recorder()
    engine.event_bus.subscribe(rec)

    def boom(ctx: Any) -> None:
        raise ValueError("the input is bad")

    wf = WorkflowDefinition("fail", data_type=Data)
    wf.add_step(StepDefinition("ok", "ok", record))
    wf.add_step(StepDefinition("x", "x", boom).depends_on(["ok"]))
    wf.add_step(StepDefinition("never", "never", record).depends_on(["x"]))
    engine.register_workflow(wf)
    iid = engine.start_workflow("fail", Data())
    with pytest.raises(StepFailed):
        engine.wait_for_completion(iid, timeout=30)
    engine.event_bus.flush()
    evs = rec.of(iid)
    last = evs[-1]
    assert isinstance(last, events.WorkflowFailed), kinds(evs)
    assert last.failed_step == "x"
    assert "the input is bad" in last.error
    assert sum(isinstance(e, events.WorkflowFailed) for e in evs) == 1
    assert not any(isinstance(e, events.WorkflowCompleted) for e in evs)
    assert not any(getattr(e, "step_id", None) == "never" for e in evs)
    step_failed = [e for e in evs if isinstance(e, events.StepFailed)]
    assert len(step_failed) == 1 and step_failed[0].will_retry is False and step_failed[0].step_id == "x"


def test_continue_next_step_failure_is_not_a_workflow_failure(engine: WorkflowEngine) -> None:
    rec = Recorder()
    engine.event_bus.subscribe(rec)

    def boom(ctx: Any) -> None:
        raise ValueError("optional")

    wf = WorkflowDefinition("opt", data_type=Data)
    wf.add_step(StepDefinition("x", "x", boom).with_failure_action(FailureAction.CONTINUE_NEXT_STEP))
    wf.add_step(StepDefinition("y", "y", record).depends_on(["x"]))
    engine.register_workflow(wf)
    iid = engine.start_workflow("opt", Data())
    engine.wait_for_completion(iid, timeout=30)
    engine.event_bus.flush()
    evs = rec.of(iid)
    assert index(evs, events.StepFailed, "x") < index(evs, events.StepStarted, "y")
    assert isinstance(evs[-1], events.WorkflowCompleted)
    assert not any(isinstance(e, events.WorkflowFailed) for e in evs)


def test_workflow_cancelled(engine: WorkflowEngine, tmp_path: Path) -> None:
    rec = Recorder()
    engine.event_bus.subscribe(rec)
    started = tmp_path / "started"

    def block(ctx: Any) -> None:
        write_atomic(started, str(os.getpid()))
        wait_for(tmp_path / "never", timeout=120)

    wf = WorkflowDefinition("cancel", data_type=Data)
    wf.add_step(StepDefinition("b", "b", block))
    wf.add_step(StepDefinition("after", "after", record).depends_on(["b"]))
    engine.register_workflow(wf)
    iid = engine.start_workflow("cancel", Data())
    wait_for_text(started)
    engine.cancel_workflow(iid)
    with pytest.raises(Cancelled):
        engine.wait_for_completion(iid, timeout=10)
    engine.event_bus.flush()
    evs = rec.of(iid)
    assert isinstance(evs[0], events.WorkflowStarted)
    assert isinstance(evs[-1], events.WorkflowCancelled), kinds(evs)
    assert sum(isinstance(e, events.WorkflowCancelled) for e in evs) == 1
    assert not any(isinstance(e, (events.WorkflowCompleted, events.WorkflowFailed)) for e in evs)
    assert not any(isinstance(e, events.StepSucceeded) for e in evs)
    assert not any(getattr(e, "step_id", None) == "after" for e in evs)
    assert not any(isinstance(e, events.StepRetrying) for e in evs)


# -- subscribers ------------------------------------------------------------------------------------


def test_a_raising_subscriber_fails_nothing_and_later_subscribers_still_get_events(
    engine: WorkflowEngine, caplog: pytest.LogCaptureFixture
) -> None:
    first, last = Recorder(), Recorder()
    calls = []

    def bad(event: WorkflowEvent) -> None:
        calls.append(event)
        raise RuntimeError("subscriber bug")

    engine.event_bus.subscribe(first)
    engine.event_bus.subscribe(bad)
    engine.event_bus.subscribe(last)
    engine.register_workflow(diamond())
    with caplog.at_level(logging.ERROR, logger="wfaas"):
        iid = engine.start_workflow("diamond", Data())
        assert engine.wait_for_completion(iid, "d", timeout=30) == "d completed successfully via workflow"
        assert engine.event_bus.flush()
    assert len(calls) == len(first.events) == len(last.events) == 10
    assert kinds(last.events) == kinds(first.events)
    assert "subscriber bug" in caplog.text
    # and the engine goes on working
    again = engine.start_workflow("diamond", Data())
    engine.wait_for_completion(again, timeout=30)
    engine.event_bus.flush()
    assert len(last.of(again)) == 10


def test_a_slow_subscriber_does_not_stall_a_workflow(engine: WorkflowEngine) -> None:
    release = threading.Event()
    rec = Recorder()

    def slow(event: WorkflowEvent) -> None:
        release.wait(60)

    engine.event_bus.subscribe(slow)
    engine.event_bus.subscribe(rec)
    engine.register_workflow(diamond())
    try:
        iid = engine.start_workflow("diamond", Data())
        # completes while the subscriber is still stuck on the first event
        engine.wait_for_completion(iid, timeout=30)
        assert rec.of(iid) == []
    finally:
        release.set()
    assert engine.event_bus.flush(30)
    assert len(rec.of(iid)) == 10


def test_subscribers_are_called_in_subscription_order_on_an_event_thread(engine: WorkflowEngine) -> None:
    calls: list[tuple[str, WorkflowEvent, str]] = []  # the events are kept: their ids stay unique

    def make(tag: str) -> Any:
        def deliver(event: WorkflowEvent) -> None:
            calls.append((tag, event, threading.current_thread().name))

        return deliver

    for tag in ("one", "two", "three"):
        engine.event_bus.subscribe(make(tag))
    engine.register_workflow(diamond())
    engine.wait_for_completion(engine.start_workflow("diamond", Data()), timeout=30)
    engine.event_bus.flush()
    per_event: dict[int, list[str]] = defaultdict(list)
    for tag, event, _ in calls:
        per_event[id(event)].append(tag)
    assert len(per_event) == 10
    assert all(tags == ["one", "two", "three"] for tags in per_event.values())
    threads = {name for _, _, name in calls}
    assert len(threads) == 1
    assert threading.current_thread().name not in threads


def test_a_plain_callable_and_an_object_both_work_as_subscribers(engine: WorkflowEngine) -> None:
    got: list[WorkflowEvent] = []
    rec = Recorder()
    engine.event_bus.subscribe(got.append)
    engine.event_bus.subscribe(rec)
    assert isinstance(rec, EventSubscriber)
    with pytest.raises(TypeError):
        engine.event_bus.subscribe(42)  # type: ignore[arg-type]
    engine.register_workflow(diamond())
    iid = engine.start_workflow("diamond", Data())
    engine.wait_for_completion(iid, timeout=30)
    engine.event_bus.flush()
    assert kinds(got) == kinds(rec.events)
    assert len(got) == 10
    assert isinstance(got[0], events.WorkflowStarted) and got[0].instance_id == iid


def test_flush_waits_for_delivery(engine: WorkflowEngine) -> None:
    gate = threading.Event()
    delivered: list[WorkflowEvent] = []

    def gated(event: WorkflowEvent) -> None:
        gate.wait(30)
        delivered.append(event)

    engine.event_bus.subscribe(gated)
    engine.register_workflow(diamond())
    try:
        iid = engine.start_workflow("diamond", Data())
        engine.wait_for_completion(iid, timeout=30)
        assert engine.event_bus.flush(0.2) is False  # not delivered yet: the subscriber waits
    finally:
        gate.set()
    assert engine.event_bus.flush(30) is True
    assert len(delivered) == 10 and isinstance(delivered[-1], events.WorkflowCompleted)


def test_logging_subscriber_logs_through_the_wfaas_logger(
    engine: WorkflowEngine, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(ctx: Any) -> None:
        raise ValueError("logged failure")

    engine.event_bus.subscribe(LoggingSubscriber())
    engine.register_workflow(diamond())
    engine.register_workflow(WorkflowDefinition("bad", data_type=Data).add_step(StepDefinition("x", "x", boom)))
    with caplog.at_level(logging.DEBUG, logger="wfaas"):
        ok = engine.start_workflow("diamond", Data())
        engine.wait_for_completion(ok, timeout=30)
        bad = engine.start_workflow("bad", Data())
        with pytest.raises(StepFailed):
            engine.wait_for_completion(bad, timeout=30)
        engine.event_bus.flush()
    mine = [r for r in caplog.records if r.name == "wfaas"]
    ok_lines = [r.getMessage() for r in mine if ok in r.getMessage()]
    assert len(ok_lines) == 10, ok_lines
    assert any("WorkflowStarted" in m for m in ok_lines)
    assert any("StepSucceeded" in m and "step_id=d" in m for m in ok_lines)
    assert any("WorkflowCompleted" in m for m in ok_lines)
    assert all(r.levelno == logging.INFO for r in mine if ok in r.getMessage())
    bad_records = [r for r in mine if bad in r.getMessage()]
    failed = [r for r in bad_records if "WorkflowFailed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].levelno >= logging.WARNING
    assert "logged failure" in failed[0].getMessage()


def test_logging_subscriber_accepts_a_logger_and_level(
    engine: WorkflowEngine, caplog: pytest.LogCaptureFixture
) -> None:
    engine.event_bus.subscribe(LoggingSubscriber(logging.getLogger("wfaas.audit"), level=logging.DEBUG))
    engine.register_workflow(diamond())
    with caplog.at_level(logging.DEBUG, logger="wfaas.audit"):
        iid = engine.start_workflow("diamond", Data())
        engine.wait_for_completion(iid, timeout=30)
        engine.event_bus.flush()
    audit = [r for r in caplog.records if r.name == "wfaas.audit" and iid in r.getMessage()]
    assert len(audit) == 10
    assert {r.levelno for r in audit} == {logging.DEBUG}


def test_events_for_subscribers_added_later(engine: WorkflowEngine) -> None:
    engine.register_workflow(diamond())
    first = engine.start_workflow("diamond", Data())
    engine.wait_for_completion(first, timeout=30)
    rec = Recorder()
    engine.event_bus.subscribe(rec)
    second = engine.start_workflow("diamond", Data())
    engine.wait_for_completion(second, timeout=30)
    engine.event_bus.flush()
    wait_until(lambda: len(rec.of(second)) == 10, 10, "events of the second run")
    assert rec.of(first) == []


def test_every_event_is_delivered_by_the_time_the_context_exits() -> None:
    rec = Recorder()
    with WorkflowEngine(max_workers=2) as engine:
        engine.event_bus.subscribe(rec)
        engine.register_workflow(diamond())
        ids = [engine.start_workflow("diamond", Data()) for _ in range(3)]
    # no flush(): closing the engine delivers what was published
    for iid in ids:
        evs = rec.of(iid)
        assert len(evs) == 10 and isinstance(evs[-1], events.WorkflowCompleted), kinds(evs)


def test_a_timed_out_step_fails_the_workflow_with_events(
    vengine: WorkflowEngine, clock: VirtualClock, tmp_path: Path
) -> None:
    """The timeout is on the virtual clock; the kill is real."""
    engine = vengine
    rec = Recorder()
    engine.event_bus.subscribe(rec)

    def hang(ctx: Any) -> None:
        wait_for(tmp_path / "never", timeout=120)

    wf = WorkflowDefinition("hang", data_type=Data).add_step(StepDefinition("h", "h", hang).with_timeout(30))
    engine.register_workflow(wf)
    iid = engine.start_workflow("hang", Data())
    wait_until(lambda: engine.get_status(iid).step_states["h"].status is StepStatus.RUNNING, 30, "the step to run")
    clock.advance(30)
    with pytest.raises(StepTimeout):
        engine.wait_for_completion(iid, timeout=30)
    engine.event_bus.flush()
    evs = rec.of(iid)
    expected = [("WorkflowStarted", None), ("StepStarted", "h"), ("StepFailed", "h"), ("WorkflowFailed", None)]
    assert kinds(evs) == expected
    step_failed, wf_failed = evs[2], evs[3]
    assert isinstance(step_failed, events.StepFailed) and not step_failed.will_retry
    assert "timed out" in step_failed.error
    assert isinstance(wf_failed, events.WorkflowFailed) and wf_failed.failed_step == "h"
    assert "timed out" in wf_failed.error
