"""The scheduler's decisions, driven through ``Scheduler.tick()`` with a fake pool and a virtual clock.

No worker process is started: ``FakePool`` plays the workers (it runs a step's
body in this process when the test says ``run``), ``VirtualClock`` the time.
Each test builds the state it needs and checks one decision: readiness,
delays and schedules, dispatch, retries and backoff.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from wfaas import (
    Backoff,
    RetryPolicy,
    StepDefinition,
    StepExecutor,
    StepResult,
    WorkflowContext,
    WorkflowDefinition,
    events,
    wire,
)
from wfaas.states import StepStatus, WorkflowStatus

from conftest import Data, HeldStore, Ticker

S, W = StepStatus, WorkflowStatus


def ok(ctx: WorkflowContext[Data]) -> None:
    ctx.data.items[ctx.step_id] = ctx.attempt  # a dict field: steps running side by side merge key by key


def boom(ctx: WorkflowContext[Data]) -> None:
    raise ValueError(f"boom in {ctx.step_id}")


def returns_failure(ctx: WorkflowContext[Data]) -> StepResult:
    return StepResult.FAILURE


def returns_skip(ctx: WorkflowContext[Data]) -> StepResult:
    return StepResult.SKIP


def count(ctx: WorkflowContext[Data]) -> None:
    ctx.data.n += 1


def flaky_until_3(ctx: WorkflowContext[Data]) -> None:
    if ctx.attempt < 3:
        raise RuntimeError(f"attempt {ctx.attempt} fails")
    ctx.data.value = ctx.attempt


def wf(*steps: StepDefinition, wid: str = "w") -> WorkflowDefinition:
    definition = WorkflowDefinition(wid, wid, data_type=Data)
    for s in steps:
        definition.add_step(s)
    return definition


def step(sid: str, body: Any = ok, after: list[str] | None = None) -> StepDefinition:
    s = StepDefinition(sid, sid, body)
    return s.depends_on(after) if after else s


# -- readiness -------------------------------------------------------------------------


def test_a_step_with_no_dependency_is_sent_on_the_first_turn(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a")))
    assert ticker.busy() == {"a"}
    sent = ticker.pool.last_sent("a")
    assert (sent.instance_id, sent.step_id, sent.attempt, sent.hook) == (iid, "a", 1, None)


def test_a_dependent_waits_for_its_dependency_to_succeed(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a"), step("b", after=["a"])))
    assert ticker.busy() == {"a"}
    ticker.run("a")
    assert ticker.busy() == {"b"}
    ticker.run("b")
    assert ticker.status(iid) is W.COMPLETED
    assert ticker.state(iid).data.items == {"a": 1, "b": 1}


def test_a_join_waits_for_every_dependency(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a"), step("b"), step("j", after=["a", "b"])))
    assert ticker.busy() == {"a", "b"}
    ticker.run("a")
    assert ticker.busy() == {"b"}
    assert ticker.step(iid, "j").status is S.PENDING
    ticker.run("b")
    assert ticker.busy() == {"j"}


def test_an_any_dependency_starts_when_the_first_dependency_succeeds(ticker: Ticker) -> None:
    any_step = StepDefinition("x", "x", ok).depends_on_any(["a", "b"])
    iid = ticker.start(wf(step("a"), step("b"), any_step))
    ticker.run("b")
    assert ticker.busy() == {"a", "x"}
    ticker.run("x")
    ticker.run("a")
    assert ticker.status(iid) is W.COMPLETED


def test_an_any_dependency_whose_dependencies_all_skipped_still_runs(ticker: Ticker) -> None:
    any_step = StepDefinition("x", "x", ok).depends_on_any(["a", "b"])
    iid = ticker.start(wf(step("a", returns_skip), step("b", returns_skip), any_step))
    ticker.run("a")
    assert ticker.busy() == {"b"}
    ticker.run("b")
    assert ticker.busy() == {"x"}
    ticker.run("x")
    assert ticker.step(iid, "x").status is S.SUCCEEDED


def test_more_ready_steps_than_workers_wait_for_a_free_one(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a"), step("b"), step("c")))
    assert len(ticker.busy()) == 2
    first = sorted(ticker.busy())[0]
    ticker.run(first)
    assert len(ticker.busy()) == 2
    for sid in sorted(ticker.busy()):
        ticker.run(sid)
    for sid in sorted(ticker.busy()):
        ticker.run(sid)
    assert ticker.status(iid) is W.COMPLETED


def test_run_if_false_skips_the_step_and_its_dependents_still_run(ticker: Ticker) -> None:
    cond = step("c").run_if(lambda ctx: False)
    iid = ticker.start(wf(cond, step("d", after=["c"])))
    assert ticker.busy() == {"d"}
    assert ticker.step(iid, "c").status is S.SKIPPED
    skipped = ticker.events(events.StepSkipped)
    assert [(e.step_id, e.reason) for e in skipped] == [("c", "run_if was false")]


def test_run_if_reads_the_data_its_dependencies_wrote(ticker: Ticker) -> None:
    cond = step("c", after=["a"]).run_if(lambda ctx: ctx.data.n == 1)
    iid = ticker.start(wf(step("a", count), cond))
    ticker.run("a")
    assert ticker.busy() == {"c"}
    ticker.run("c")
    assert ticker.status(iid) is W.COMPLETED


def test_run_if_that_raises_fails_the_step_with_its_cause(ticker: Ticker) -> None:
    def bad(ctx: Any) -> bool:
        raise KeyError("missing")

    iid = ticker.start(wf(step("c").run_if(bad)))
    assert ticker.status(iid) is W.FAILED
    st = ticker.step(iid, "c")
    assert st.status is S.FAILED
    assert "run_if raised KeyError" in (st.error or "")


def test_a_step_returning_skip_is_skipped_with_its_reason(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a", returns_skip), step("b", after=["a"])))
    ticker.run("a")
    assert ticker.step(iid, "a").status is S.SKIPPED
    assert ticker.busy() == {"b"}
    assert ticker.events(events.StepSkipped)[0].reason == "the step returned StepResult.SKIP"


def test_steps_ready_together_start_from_one_snapshot(ticker: Ticker) -> None:
    ticker.start(wf(step("a"), step("b")))
    a, b = ticker.pool.last_sent("a"), ticker.pool.last_sent("b")
    assert a.snap_key == b.snap_key
    assert a.snap is not None and b.snap is not None  # two slots: each gets it once


def test_a_worker_is_sent_the_body_and_snapshot_only_once(ticker: Ticker) -> None:
    one = Ticker(workers=1)
    try:
        one.start(wf(step("a"), step("b", after=["a"])))
        first = one.pool.last_sent("a")
        one.run("a")
        second = one.pool.last_sent("b")
        assert first.body is not None and first.cls is not None
        assert second.body is None and second.cls is None  # the same function, the same class
        assert second.snap is not None  # a new version of the data after a's change
    finally:
        one.close()


def test_a_run_with_every_step_done_completes_and_is_released(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a")))
    ticker.run("a")
    assert iid not in ticker.scheduler.runs
    assert ticker.status(iid) is W.COMPLETED
    kinds = [type(e).__name__ for e in ticker.events() if not isinstance(e, events.StepOutput)]
    assert kinds == ["WorkflowStarted", "StepStarted", "StepSucceeded", "WorkflowCompleted"]


def test_a_resumed_run_does_not_run_its_succeeded_steps_again(ticker: Ticker) -> None:
    definition = wf(step("a"), step("b", after=["a"]))
    iid = ticker.start(definition)
    ticker.run("a")
    ticker.pool.crash("b")
    ticker.turn()
    # Resume b's run in a fresh scheduler from what was checkpointed.
    record = ticker.store.read(iid)
    assert record is not None
    fresh = Ticker(store=ticker.store)
    try:
        from wfaas.rundata import RunData
        from wfaas.runs import Compiled, Run, encode_bodies

        compiled = Compiled(definition, encode_bodies(definition)[0])
        run = Run(
            iid,
            compiled,
            Data,
            record.extra["class"],
            RunData(dict(record.resolved_fields())),
            record.meta["created_at"],
        )
        run.status = W(record.meta["status"])
        fresh.scheduler.start_run(run, dict(record.steps), set())
        fresh.turn()
        assert fresh.busy() == {"b"}
        assert fresh.pool.last_sent("b").attempt == 2
    finally:
        fresh.close()


# -- delays and schedules ----------------------------------------------------------------


def test_a_delayed_step_waits_on_the_clock_without_a_worker(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a").with_delay(60)))
    assert ticker.busy() == set()
    st = ticker.step(iid, "a")
    assert st.status is S.WAITING
    assert st.wait_until == ticker.clock.now() + timedelta(seconds=60)
    ticker.advance(59.9)
    assert ticker.busy() == set()
    ticker.advance(0.1)
    assert ticker.busy() == {"a"}


def test_a_delay_counts_from_when_the_dependencies_were_met(ticker: Ticker) -> None:
    ticker.start(wf(step("a"), step("b", after=["a"]).with_delay(10)))
    ticker.advance(100)
    ticker.run("a")
    ticker.advance(9)
    assert ticker.busy() == set()
    ticker.advance(1)
    assert ticker.busy() == {"b"}


def test_a_step_scheduled_in_the_future_waits_until_then(ticker: Ticker) -> None:
    when = ticker.clock.now() + timedelta(hours=2)
    iid = ticker.start(wf(step("a").scheduled_at(when)))
    assert ticker.step(iid, "a").status is S.WAITING
    ticker.advance(7199)
    assert ticker.busy() == set()
    ticker.advance(1)
    assert ticker.busy() == {"a"}


def test_a_step_scheduled_in_the_past_runs_at_once(ticker: Ticker) -> None:
    when = ticker.clock.now() - timedelta(hours=2)
    ticker.start(wf(step("a").scheduled_at(when)))
    assert ticker.busy() == {"a"}


def test_the_attempt_records_how_long_it_waited_and_why(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a").with_delay(5)))
    ticker.advance(5)
    ticker.run("a")
    attempt = ticker.step(iid, "a").history[-1]
    assert (attempt.waited, attempt.wait_kind, attempt.outcome) == (5.0, "delay", "succeeded")


def test_the_attempt_records_how_long_it_queued_for_a_worker() -> None:
    t = Ticker(workers=1)
    try:
        iid = t.start(wf(step("a"), step("b")))
        first = next(iter(t.busy()))
        t.clock.advance(3)
        t.run(first)
        other = next(iter(t.busy()))
        t.run(other)
        assert t.step(iid, other).history[-1].queued == 3.0
    finally:
        t.close()


def test_a_cancelled_run_forgets_its_delayed_steps(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a").with_delay(60)))
    future = ticker.scheduler.cancel(iid, None)
    ticker.turn()
    assert future.result(0) is W.CANCELLED
    assert ticker.step(iid, "a").status is S.PENDING  # a resume starts it
    ticker.advance(60)
    assert ticker.busy() == set()


# -- retries and backoff -------------------------------------------------------------------


def test_a_failed_attempt_waits_out_its_backoff_then_runs_again(ticker: Ticker) -> None:
    policy = RetryPolicy(max_attempts=3, backoff=Backoff.fixed(30))
    iid = ticker.start(wf(step("a", flaky_until_3).with_retry(policy)))
    ticker.run("a")
    st = ticker.step(iid, "a")
    assert (st.status, st.attempts) == (S.WAITING, 1)
    assert st.wait_until == ticker.clock.now() + timedelta(seconds=30)
    ticker.advance(29)
    assert ticker.busy() == set()
    ticker.advance(1)
    assert ticker.pool.last_sent("a").attempt == 2


def test_a_step_that_succeeds_on_its_third_attempt_succeeds(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a", flaky_until_3).with_retry(RetryPolicy(max_attempts=3))))
    for _ in range(3):
        ticker.run("a")
    assert ticker.status(iid) is W.COMPLETED
    state = ticker.state(iid)
    assert state.data.value == 3
    assert [a.outcome for a in state.step_states["a"].history] == ["failed", "failed", "succeeded"]


def test_attempts_run_out_and_the_run_fails_naming_the_last_attempt(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a", boom).with_retry(RetryPolicy(max_attempts=2))))
    ticker.run("a")
    ticker.run("a")
    assert ticker.status(iid) is W.FAILED
    state = ticker.state(iid)
    assert state.failed_step == "a"
    assert "attempt 2" in (state.error or "") and "ValueError: boom in a" in (state.error or "")
    failed = ticker.events(events.StepFailed)
    assert [e.will_retry for e in failed] == [True, False]


def test_a_step_returning_failure_is_retried_like_an_exception(ticker: Ticker) -> None:
    policy = RetryPolicy(max_attempts=2, backoff=Backoff.fixed(1))
    iid = ticker.start(wf(step("a", returns_failure).with_retry(policy)))
    ticker.run("a")
    assert ticker.step(iid, "a").status is S.WAITING
    ticker.advance(1)
    ticker.run("a")
    assert ticker.step(iid, "a").error == "the step returned StepResult.FAILURE"


class NotRetryable(StepExecutor[Data]):
    def execute(self, ctx: WorkflowContext[Data]) -> StepResult:
        raise PermissionError("denied")

    def is_retryable(self, error: BaseException) -> bool:
        return not isinstance(error, PermissionError)


class RetryableRaises(StepExecutor[Data]):
    def execute(self, ctx: WorkflowContext[Data]) -> StepResult:
        raise PermissionError("denied")

    def is_retryable(self, error: BaseException) -> bool:
        raise RuntimeError("is_retryable is broken")


@pytest.mark.parametrize("body", [NotRetryable(), RetryableRaises()], ids=["says-no", "raises"])
def test_is_retryable_that_says_no_or_raises_stops_the_retries(ticker: Ticker, body: StepExecutor[Data]) -> None:
    iid = ticker.start(wf(step("a", body).with_retry(RetryPolicy(max_attempts=5))))
    ticker.run("a")
    assert ticker.status(iid) is W.FAILED
    assert ticker.step(iid, "a").attempts == 1


def test_retry_indefinitely_goes_past_max_attempts(ticker: Ticker) -> None:
    from wfaas import FailureAction

    policy = RetryPolicy(max_attempts=1, backoff=Backoff.fixed(1))
    s = step("a", boom).with_retry(policy).with_failure_action(FailureAction.RETRY_INDEFINITELY)
    iid = ticker.start(wf(s))
    for attempt in range(1, 6):
        if attempt > 1:
            ticker.advance(1)
        ticker.run("a")
    st = ticker.step(iid, "a")
    assert (st.status, st.attempts) == (S.WAITING, 5)


def test_exponential_backoff_doubles_up_to_its_cap(ticker: Ticker) -> None:
    policy = RetryPolicy(max_attempts=5, backoff=Backoff.exponential(1, 4))
    ticker.start(wf(step("a", boom).with_retry(policy)))
    for delay in (1, 2, 4, 4):
        ticker.run("a")
        ticker.advance(delay)
    assert [e.delay for e in ticker.events(events.StepRetrying)] == [1, 2, 4, 4]


def test_a_retry_records_its_backoff_as_the_wait_of_the_next_attempt(ticker: Ticker) -> None:
    policy = RetryPolicy(max_attempts=2, backoff=Backoff.fixed(7))
    iid = ticker.start(wf(step("a", flaky_until_3).with_retry(policy)))
    ticker.run("a")
    ticker.advance(7)
    ticker.run("a")
    second = ticker.step(iid, "a").history[-1]
    assert (second.number, second.wait_kind, second.waited) == (2, "backoff", 7.0)


def test_a_sibling_failing_for_good_stops_a_pending_retry(ticker: Ticker) -> None:
    policy = RetryPolicy(max_attempts=3, backoff=Backoff.fixed(10))
    iid = ticker.start(wf(step("a", boom).with_retry(policy), step("b", boom)))
    ticker.run("a")
    ticker.run("b")
    assert ticker.status(iid) is W.FAILED
    assert ticker.step(iid, "a").status is S.PENDING
    ticker.advance(10)
    assert ticker.busy() == set()


# -- group commit ---------------------------------------------------------------------


def test_dependents_start_only_once_the_result_they_need_is_committed() -> None:
    store = HeldStore()
    t = Ticker(store=store)
    try:
        t.start(wf(step("a"), step("b", after=["a"])))
        assert t.busy() == set()  # not even a: the run's start is not committed yet
        store.commit()
        t.turn()
        assert t.busy() == {"a"}
        t.run("a")
        assert t.busy() == set()
        store.commit()  # the write in flight when a's result came (its RUNNING status) ...
        t.turn()
        assert t.busy() == set()  # ... so a's result is being written now, not yet committed
        store.commit()
        t.turn()
        assert t.busy() == {"b"}
    finally:
        t.close()


def test_changes_made_while_a_write_is_in_flight_go_out_together() -> None:
    store = HeldStore()
    t = Ticker(workers=3, store=store)
    try:
        t.start(wf(step("a"), step("b"), step("c")))
        store.commit()
        t.turn()
        assert len(t.busy()) == 3
        writes = store.writes
        t.run("a")  # a write is in flight: these results wait for it ...
        t.run("b")
        t.run("c")
        assert store.writes == writes
        store.commit()
        t.turn()
        assert store.writes == writes + 1  # ... and then go out together, in one write
        [(checkpoints, _)] = store.held
        done = {sid for cp in checkpoints for sid, rec in cp.steps.items() if rec["status"] == "succeeded"}
        assert done == {"a", "b", "c"}
    finally:
        t.close()


def test_events_and_waiters_are_released_only_after_the_commit() -> None:
    store = HeldStore()
    t = Ticker(store=store)
    try:
        iid = t.start(wf(step("a")))
        store.commit()
        t.turn()
        t.run("a")
        store.commit()  # the write that was in flight; the one with a's result is held
        t.turn()
        assert not [e for e in t.events() if isinstance(e, events.WorkflowCompleted)]
        assert iid in t.scheduler.runs
        store.commit()
        t.turn()
        assert [type(e) for e in t.events(events.WorkflowCompleted)] == [events.WorkflowCompleted]
        assert iid not in t.scheduler.runs
    finally:
        t.close()


def test_a_failed_commit_fails_the_run_with_a_store_error() -> None:
    store = HeldStore()
    t = Ticker(store=store)
    try:
        iid = t.start(wf(step("a")))
        store.fail(OSError("disk full"))
        t.turn()
        handle = t.scheduler.outcomes[iid]
        assert t.scheduler.runs[iid].status is W.FAILED
        assert handle.status is W.RUNNING  # its end is not committed yet (the store holds that write)
        store.commit()
        t.turn()
        assert handle.status is W.FAILED and handle.done.is_set()
        assert "checkpoint failed (OSError: disk full)" in str(handle.error)
    finally:
        t.close()


def test_the_loop_does_not_turn_again_while_it_waits_for_a_write_in_flight() -> None:
    # Issue 17: it woke itself each turn while this turn's changes waited for the write in flight,
    # 5.6 turns a step in a SqliteStore chain, spinning against the thread that writes.
    store = HeldStore()
    t = Ticker(store=store)
    try:
        t.start(wf(step("a"), step("b", after=["a"])))
        store.commit()
        t.turn()
        t.run("a")  # a's RUNNING status is being written; a's result waits for that write
        assert store.held and not t.turn_due()
        store.commit()  # the acknowledgement (on another thread in the engine, which wakes the loop)
        t.turn(1)
        assert not t.turn_due()  # a's result is being written now
        store.commit()
        t.turn(1)
        assert t.busy() == {"b"}
        assert t.turn_due()  # b's RUNNING status is checkpointed next turn, nothing in flight
    finally:
        t.close()


def test_after_a_turn_that_wrote_a_checkpoint_the_loop_looks_again_before_it_blocks(ticker: Ticker) -> None:
    # Results come in bursts (a fan-out's workers finish together): one more look without blocking is
    # cheaper than being woken by the next pipe (issue 17: 10 % on the in-memory fan-out's wall time).
    ticker.start(wf(step("a")))
    ticker.run("a", turns=1)  # a's result (and the run's end) written: no step left to dispatch
    assert not ticker.busy() and ticker.turn_due()
    ticker.turn(1)  # nothing changed in that turn: the next one blocks
    assert not ticker.turn_due()


def test_a_commit_nothing_else_can_move_on_is_written_now_the_others_in_the_background() -> None:
    # With no step in a worker nothing can arrive meanwhile: the store may write in the scheduler's
    # thread (SqliteStore.write_now), saving two thread hand-offs and a turn on a chain's critical path.
    store = HeldStore()
    t = Ticker(store=store)
    try:
        t.start(wf(step("a"), step("b", after=["a"])))
        assert store.kinds == ["now"]  # the run's start: nothing in a worker
        store.commit()
        t.turn()
        assert t.busy() == {"a"} and store.kinds == ["now", "async"]  # a's RUNNING status, a in its worker
        t.run("a")
        store.commit()
        t.turn(1)
        assert store.kinds == ["now", "async", "now"]  # a's result: b waits on it, no worker busy
        store.commit()
        t.turn(1)
        assert t.busy() == {"b"}
    finally:
        t.close()


def test_the_run_message_is_a_named_wire_message(ticker: Ticker) -> None:
    ticker.start(wf(step("a")))
    slot = ticker.pool.busy()["a"]
    message = ticker.pool.last_sent("a")
    assert isinstance(message, wire.RunStep)
    assert message.task_id == slot.task.id


def test_an_autojump_clock_jumps_to_the_next_timer_only_when_nothing_else_can_move() -> None:
    t = Ticker()
    t.clock.autojump = True
    try:
        iid = t.start(wf(step("a"), step("b").with_delay(3600)))
        assert t.busy() == {"a"}  # a runs: the clock may not jump past b's delay yet
        assert t.clock.monotonic() == 0.0
        t.run("a")
        t.turn()
        assert t.busy() == {"b"}
        assert t.clock.monotonic() == 3600.0
        t.run("b")
        assert t.status(iid) is W.COMPLETED
    finally:
        t.close()


def test_a_finished_run_is_not_kept_alive_by_its_timers(ticker: Ticker) -> None:
    import gc
    import weakref

    iid = ticker.start(wf(step("a").with_timeout(3600)))
    ref = weakref.ref(ticker.scheduler.runs[iid])
    ticker.run("a")
    assert ticker.status(iid) is W.COMPLETED
    gc.collect()
    assert ref() is None  # the one-hour timeout timer still in the heap holds it weakly
