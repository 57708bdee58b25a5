"""What becomes of results and faults, driven through ``Scheduler.tick()`` with a fake pool and a virtual clock.

Merges and conflicts, failure actions and hooks, cancel, timeouts (decided by
the virtual clock; the kill is asked of the fake pool), crashes and memory
limits. No worker process is started.
"""

from __future__ import annotations

from typing import Any

import pytest
from wfaas import (
    Backoff,
    FailureAction,
    RetryPolicy,
    StepDefinition,
    StepExecutor,
    StepResult,
    WorkflowContext,
    WorkflowDefinition,
    events,
    wire,
)
from wfaas.errors import InvalidStateTransition, NotFound
from wfaas.states import StepStatus, WorkflowStatus

from conftest import Data, Ticker

S, W = StepStatus, WorkflowStatus


def wf(*steps: StepDefinition) -> WorkflowDefinition:
    definition = WorkflowDefinition("w", "w", data_type=Data)
    for s in steps:
        definition.add_step(s)
    return definition


def step(sid: str, body: Any, after: list[str] | None = None) -> StepDefinition:
    s = StepDefinition(sid, sid, body)
    return s.depends_on(after) if after else s


def ok(ctx: WorkflowContext[Data]) -> None:
    ctx.data.items[ctx.step_id] = True


def boom(ctx: WorkflowContext[Data]) -> None:
    raise ValueError("boom")


def set_value_a(ctx: WorkflowContext[Data]) -> None:
    ctx.data.value = "a"


def set_value_b(ctx: WorkflowContext[Data]) -> None:
    ctx.data.value = "b"


def set_n_and_value_b(ctx: WorkflowContext[Data]) -> None:
    ctx.data.n = 99
    ctx.data.value = "b"


def set_n(ctx: WorkflowContext[Data]) -> None:
    ctx.data.n = 7


def key_x_1(ctx: WorkflowContext[Data]) -> None:
    ctx.data.items["x"] = 1


def key_x_2(ctx: WorkflowContext[Data]) -> None:
    ctx.data.items["x"] = 2


def ctx_set_1(ctx: WorkflowContext[Data]) -> None:
    ctx.set("k", 1)


def ctx_set_2(ctx: WorkflowContext[Data]) -> None:
    ctx.set("k", 2)


def write_then_raise(ctx: WorkflowContext[Data]) -> None:
    ctx.data.n = 1000
    raise RuntimeError("after writing")


# -- merges and conflicts ------------------------------------------------------------------


def test_a_step_s_change_lands_in_the_run_s_data(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a", set_n)))
    ticker.run("a")
    assert ticker.state(iid).data.n == 7


def test_steps_side_by_side_writing_different_fields_both_merge(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a", set_n), step("b", set_value_b)))
    ticker.run("a")
    ticker.run("b")
    data = ticker.state(iid).data
    assert (data.n, data.value, ticker.status(iid)) == (7, "b", W.COMPLETED)


def test_steps_side_by_side_writing_one_field_differently_conflict(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a", set_value_a), step("b", set_value_b)))
    ticker.run("a")
    ticker.run("b")
    assert ticker.status(iid) is W.FAILED
    error = ticker.step(iid, "b").error or ""
    assert "field value was changed by step 'a', which ran at the same time" in error
    assert ticker.state(iid).data.value == "a"


def test_steps_side_by_side_writing_the_same_value_do_not_conflict(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a", set_value_a), step("b", set_value_a)))
    ticker.run("a")
    ticker.run("b")
    assert ticker.status(iid) is W.COMPLETED


def test_dict_fields_merge_key_by_key(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a", ok), step("b", ok)))
    ticker.run("b")
    ticker.run("a")
    assert ticker.state(iid).data.items == {"a": True, "b": True}


def test_one_dict_key_written_differently_side_by_side_conflicts_naming_the_key(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a", key_x_1), step("b", key_x_2)))
    ticker.run("a")
    ticker.run("b")
    assert "field items['x'] was changed by step 'a'" in (ticker.step(iid, "b").error or "")


def test_a_conflict_on_the_shared_context_says_so(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a", ctx_set_1), step("b", ctx_set_2)))
    ticker.run("a")
    ticker.run("b")
    assert "the shared context was changed by step 'a'" in (ticker.step(iid, "b").error or "")


def test_a_conflicting_result_changes_nothing(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a", set_value_a), step("b", set_n_and_value_b)))
    ticker.run("a")
    ticker.run("b")
    data = ticker.state(iid).data
    assert (data.n, data.value) == (0, "a")  # b's n=99 was not applied either


def test_a_failed_attempt_changes_nothing(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a", write_then_raise)))
    ticker.run("a")
    assert ticker.state(iid).data.n == 0


def test_a_chain_sees_what_the_step_before_wrote(ticker: Ticker) -> None:
    def check(ctx: WorkflowContext[Data]) -> None:
        assert ctx.data.n == 7, ctx.data.n

    iid = ticker.start(wf(step("a", set_n), step("b", check, after=["a"])))
    ticker.run("a")
    ticker.run("b")
    assert ticker.status(iid) is W.COMPLETED


def test_a_conflict_is_retried_like_any_failure(ticker: Ticker) -> None:
    policy = RetryPolicy(max_attempts=2, backoff=Backoff.fixed(1))
    iid = ticker.start(wf(step("a", set_value_a), step("b", set_value_b).with_retry(policy)))
    ticker.run("a")
    ticker.run("b")
    assert ticker.step(iid, "b").status is S.WAITING
    ticker.advance(1)
    ticker.run("b")  # from the new snapshot: no longer concurrent with a
    assert ticker.status(iid) is W.COMPLETED
    assert ticker.state(iid).data.value == "b"


# -- failure actions and hooks ---------------------------------------------------------------


def test_fail_workflow_stops_the_run_and_leaves_the_rest_pending(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a", boom), step("b", ok, after=["a"])))
    ticker.run("a")
    state = ticker.state(iid)
    assert (state.status, state.failed_step) == (W.FAILED, "a")
    assert state.step_states["b"].status is S.PENDING


def test_a_failing_step_waits_for_its_running_sibling_before_the_run_fails(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a", boom), step("b", ok)))
    ticker.run("a")
    assert ticker.status(iid) is W.RUNNING  # b is still in a worker
    ticker.run("b")
    assert ticker.status(iid) is W.FAILED
    assert ticker.step(iid, "b").status is S.SUCCEEDED


def test_continue_next_step_lets_the_dependents_run(ticker: Ticker) -> None:
    failing = step("a", boom).with_failure_action(FailureAction.CONTINUE_NEXT_STEP)
    iid = ticker.start(wf(failing, step("b", ok, after=["a"])))
    ticker.run("a")
    assert ticker.busy() == {"b"}
    ticker.run("b")
    assert ticker.status(iid) is W.COMPLETED
    assert ticker.step(iid, "a").status is S.FAILED


class WithHooks(StepExecutor[Data]):
    def __init__(self, fail: bool) -> None:
        self.fail = fail

    def execute(self, ctx: WorkflowContext[Data]) -> StepResult:
        if self.fail:
            raise ValueError("execute failed")
        return StepResult.SUCCESS

    def on_success(self, ctx: WorkflowContext[Data]) -> None:
        pass

    def on_failure(self, ctx: WorkflowContext[Data], error: Exception) -> None:
        pass


def test_an_on_failure_hook_runs_with_the_error_before_the_step_fails(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a", WithHooks(fail=True))))
    ticker.run("a")
    hook = ticker.pool.last_sent("a")
    assert (hook.hook, hook.attempt) == ("failure", 1)
    assert hook.error is not None
    assert ticker.status(iid) is W.RUNNING
    ticker.run("a")
    assert ticker.status(iid) is W.FAILED


def test_dependents_start_only_after_the_on_success_hook(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a", WithHooks(fail=False)), step("b", ok, after=["a"])))
    ticker.run("a")
    assert ticker.busy() == {"a"}
    assert ticker.pool.last_sent("a").hook == "success"
    ticker.run("a")
    assert ticker.busy() == {"b"}
    assert ticker.step(iid, "a").status is S.SUCCEEDED


def test_a_hook_whose_worker_crashes_changes_no_outcome(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a", WithHooks(fail=False))))
    ticker.run("a")
    ticker.pool.crash("a")
    ticker.turn()
    ticker.pool.end_kill("a")
    ticker.turn()
    assert ticker.step(iid, "a").status is S.SUCCEEDED
    assert ticker.status(iid) is W.COMPLETED


# -- cancel --------------------------------------------------------------------------------


def test_cancel_stops_the_running_step_s_tree_with_the_grace_period(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a", ok)))
    future = ticker.scheduler.cancel(iid, None)
    [kill] = ticker.pool.kills
    assert kill.grace == 1.0 and kill.exit is None
    ticker.turn()
    assert not future.done()  # not before the tree is dead
    ticker.pool.end_kill("a")
    ticker.turn()
    assert future.result(0) is W.CANCELLED
    st = ticker.step(iid, "a")
    assert st.status is S.CANCELLED
    assert st.history[-1].outcome == "cancelled"


def test_cancel_with_a_grace_of_zero_kills_at_once(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a", ok)))
    ticker.scheduler.cancel(iid, 0.0)
    assert [k.grace for k in ticker.pool.kills] == [0.0]


def test_a_second_immediate_cancel_hurries_a_graceful_one(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a", ok)))
    ticker.scheduler.cancel(iid, 5.0)
    ticker.scheduler.cancel(iid, 0)
    assert [k.grace for k in ticker.pool.kills] == [5.0, 0]


def test_a_step_that_returns_while_being_cancelled_keeps_its_result(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a", ok)))
    future = ticker.scheduler.cancel(iid, 5.0)
    slot = ticker.pool.busy()["a"]
    ticker.run("a")
    assert ticker.pool.hurried == [slot]
    ticker.pool.end_kill()
    ticker.turn()
    assert future.result(0) is W.CANCELLED
    assert ticker.step(iid, "a").status is S.SUCCEEDED


def test_cancelling_a_finished_run_is_refused(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a", ok)))
    ticker.run("a")
    with pytest.raises(InvalidStateTransition, match="already finished"):
        ticker.scheduler.cancel(iid, None)


def test_cancelling_an_unknown_instance_says_not_found(ticker: Ticker) -> None:
    with pytest.raises(NotFound):
        ticker.scheduler.cancel("nope", None)


def test_cancel_skips_the_on_failure_hook(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a", WithHooks(fail=True))))
    ticker.scheduler.cancel(iid, None)
    ticker.run("a")  # it failed anyway, while being stopped
    ticker.pool.end_kill()
    ticker.turn()
    assert ticker.status(iid) is W.CANCELLED
    assert all(m.hook is None for _, m in ticker.pool.sent)


# -- timeouts --------------------------------------------------------------------------------


def test_a_timeout_is_decided_by_the_clock_and_asks_the_pool_to_kill(ticker: Ticker) -> None:
    ticker.start(wf(step("a", ok).with_timeout(30)))
    ticker.advance(29.9)
    assert ticker.pool.kills == []
    ticker.advance(0.1)
    [kill] = ticker.pool.kills
    assert (kill.slot.task.step.sid, kill.grace) == ("a", 1.0)


def test_a_timed_out_attempt_fails_with_step_timeout_and_is_retried(ticker: Ticker) -> None:
    policy = RetryPolicy(max_attempts=2, backoff=Backoff.fixed(1))
    iid = ticker.start(wf(step("a", ok).with_timeout(30).with_retry(policy)))
    pid = ticker.pool.busy()["a"].pid
    ticker.advance(30)
    ticker.pool.end_kill("a", exitcode=-15)
    ticker.turn()
    st = ticker.step(iid, "a")
    assert st.status is S.WAITING
    attempt = st.history[-1]
    assert (attempt.outcome, attempt.signal, attempt.wall) == ("timed_out", "SIGTERM", 30.0)
    assert f"timed out after 30 s; its worker (pid {pid})" in (attempt.error or "")
    ticker.advance(1)
    assert ticker.pool.last_sent("a").attempt == 2


def test_a_step_that_finishes_in_time_is_not_killed_later(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a", ok).with_timeout(30)))
    ticker.run("a")
    ticker.advance(60)
    assert ticker.pool.kills == []
    assert ticker.status(iid) is W.COMPLETED


def test_the_workflow_default_timeout_applies_to_each_step(ticker: Ticker) -> None:
    definition = wf(step("a", ok)).with_default_timeout(5)
    ticker.start(definition)
    ticker.advance(5)
    assert len(ticker.pool.kills) == 1


def test_a_steps_own_timeout_wins_over_the_workflow_default(ticker: Ticker) -> None:
    ticker.start(wf(step("own", ok).with_timeout(30)).with_default_timeout(5))
    ticker.advance(29)
    assert ticker.pool.kills == []
    ticker.advance(1)
    [kill] = ticker.pool.kills
    assert kill.slot.task.step.sid == "own"


def test_a_hook_has_no_timeout(ticker: Ticker) -> None:
    ticker.start(wf(step("a", WithHooks(fail=False)).with_timeout(5)))
    ticker.run("a")  # now its on_success hook runs
    ticker.advance(60)
    assert ticker.pool.kills == []


# -- crashes and memory --------------------------------------------------------------------


def test_a_crashed_worker_fails_only_its_step_and_is_retried(ticker: Ticker) -> None:
    policy = RetryPolicy(max_attempts=2, backoff=Backoff.fixed(1))
    iid = ticker.start(wf(step("a", ok).with_retry(policy), step("b", ok)))
    ticker.pool.crash("a", exitcode=-9)
    ticker.turn()
    [kill] = ticker.pool.kills
    assert kill.exit is not None and kill.grace == 0.0  # its group is cleaned up before a retry
    ticker.pool.end_kill("a")
    ticker.turn()
    attempt = ticker.step(iid, "a").history[-1]
    assert (attempt.outcome, attempt.signal) == ("crashed", "SIGKILL")
    assert "killed by SIGKILL; other steps were not affected" in (attempt.error or "")
    assert ticker.busy() == {"b"}
    ticker.advance(1)
    assert ticker.busy() == {"a", "b"}


def test_a_reply_sent_before_the_worker_died_is_kept(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a", ok)))
    ticker.pool.execute("a")
    ticker.pool.crash("a")
    ticker.turn()
    assert ticker.step(iid, "a").status is S.SUCCEEDED


def test_a_crash_with_a_large_last_rss_hints_at_the_oom_killer(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a", ok)))
    ticker.pool.busy()["a"].last_rss = 512 * 2**20
    ticker.pool.crash("a", exitcode=-9)
    ticker.turn()
    ticker.pool.end_kill("a")
    ticker.turn()
    assert "probably out of memory (its last measured RSS was 512 MiB)" in (ticker.step(iid, "a").error or "")


def test_a_worker_over_its_memory_limit_is_killed_at_once_and_the_step_fails(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a", ok).with_memory_limit(100 * 2**20)))
    slot = ticker.pool.busy()["a"]
    ticker.scheduler.supervisor.over_memory(slot, slot.task, 300 * 2**20)  # what the watchdog thread calls
    ticker.turn()
    [kill] = ticker.pool.kills
    assert kill.grace == 0.0
    ticker.pool.end_kill("a", exitcode=-9)
    ticker.turn()
    error = ticker.step(iid, "a").error or ""
    assert "its worker used 300 MiB, over the step's memory limit of 100 MiB" in error


def test_a_dask_child_whose_reply_says_it_retires_is_replaced_after_it(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a", ok)))
    slot = ticker.pool.busy()["a"]
    task_id = ticker.pool.last_sent("a").task_id
    ticker.pool.reply("a", wire.Done(task_id, wire.SUCCESS, {}, [], None, {"wall": 0.1, "retire": "cwd changed"}))
    ticker.turn()
    [kill] = ticker.pool.kills
    assert kill.slot is slot and kill.grace == 0.0
    assert ticker.step(iid, "a").status is S.SUCCEEDED


def test_a_worker_that_retires_after_its_reply_is_replaced(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a", ok)))
    slot = ticker.pool.busy()["a"]
    ticker.pool.execute("a")
    ticker.pool.retire(slot, "its working directory /gone cannot be restored")
    ticker.turn()
    [kill] = ticker.pool.kills
    assert kill.slot is slot and kill.grace == 0.0
    assert ticker.status(iid) is W.COMPLETED and ticker.step(iid, "a").status is S.SUCCEEDED


def test_a_step_sent_to_a_worker_before_it_said_it_retires_starts_again_elsewhere_uncounted(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a", ok), step("b", ok, after=["a"])))
    ticker.run("a")
    slot = ticker.pool.busy()["b"]
    ticker.pool.retire(slot, "its standard file descriptor 1 cannot be restored")  # it never read b
    ticker.turn()
    assert ticker.step(iid, "b").status is S.RUNNING and ticker.step(iid, "b").attempts == 1, "until its tree is dead"
    ticker.pool.end_kill()
    ticker.turn()
    assert ticker.busy() == {"b"} and [m.attempt for _, m in ticker.pool.sent if m.step_id == "b"] == [1, 1]
    ticker.run("b")
    b = ticker.step(iid, "b")
    assert ticker.status(iid) is W.COMPLETED and b.attempts == 1 and [h.outcome for h in b.history] == ["succeeded"]


@pytest.mark.parametrize("watched", [False, True])
def test_workers_reply_before_their_output_unless_the_attempt_ends_the_run_or_events_are_watched(watched: bool) -> None:
    t = Ticker(watched=watched)
    t.pool.tails = True  # as a local pool's workers can
    try:
        t.start(wf(step("a", ok), step("b", ok), step("c", ok, after=["a", "b"])))
        t.run("a")
        t.run("b")
        tails = {m.step_id: m.tail for _, m in t.pool.sent}
        assert tails == ({"a": False, "b": False, "c": False} if watched else {"a": True, "b": True, "c": False})
    finally:
        t.close()


def test_a_run_ends_only_once_the_output_that_follows_its_last_reply_is_in(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a", ok)))
    slot = ticker.pool.busy()["a"]
    reply = ticker.pool.execute("a", tail=True)
    ticker.turn()
    assert ticker.status(iid) is W.RUNNING and ticker.pool.syncs == [slot], "its worker is asked for the rest"
    lines = [(1.0, 0, "printed last")]
    ticker.pool.from_worker(slot, wire.Tail(reply.task_id, (lines, 0, 0)))
    ticker.turn()
    assert ticker.status(iid) is W.COMPLETED
    [log] = ticker.store.read_logs(iid)
    assert (log.step_id, log.attempt, log.lines) == ("a", 1, lines)
    [out] = ticker.events(events.StepOutput)
    assert out.lines == tuple(lines)


def test_a_worker_with_no_output_to_follow_says_so_when_asked(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a", ok)))
    slot = ticker.pool.busy()["a"]
    ticker.pool.execute("a", tail=True)
    ticker.turn()
    ticker.pool.from_worker(slot, wire.Synced())
    ticker.turn()
    assert ticker.status(iid) is W.COMPLETED and ticker.store.read_logs(iid) == []


def test_output_sent_as_the_reply_was_belongs_to_that_attempt_not_the_next() -> None:
    one = Ticker(workers=1)
    try:
        iid = one.start(wf(step("a", ok), step("b", ok, after=["a"])))
        slot = one.pool.busy()["a"]
        a = one.pool.execute("a", tail=True)
        one.turn()
        assert one.busy() == {"b"}, "b starts without waiting for a's output"
        one.pool.from_worker(slot, wire.Output(a.task_id, [(1.0, 0, "a, live")]))
        one.pool.from_worker(slot, wire.Tail(a.task_id, ([(1.0, 0, "a, live"), (2.0, 0, "a, last")], 0, 1)))
        one.run("b")
        assert one.status(iid) is W.COMPLETED
        assert [(e.step_id, e.lines) for e in one.events(events.StepOutput)] == [
            ("a", ((1.0, 0, "a, live"),)),
            ("a", ((2.0, 0, "a, last"),)),
        ]
        assert [(log.step_id, len(log.lines)) for log in one.store.read_logs(iid)] == [("a", 2)]
    finally:
        one.close()


def test_a_worker_that_dies_before_its_output_followed_does_not_hold_up_the_run(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a", ok)))
    slot = ticker.pool.busy()["a"]
    ticker.pool.execute("a", tail=True)
    ticker.turn()
    ticker.pool.crash(slot)
    ticker.turn()
    ticker.pool.end_kill()
    ticker.turn()
    assert ticker.status(iid) is W.COMPLETED and ticker.step(iid, "a").status is S.SUCCEEDED


def test_live_output_becomes_step_output_events(ticker: Ticker) -> None:
    ticker.start(wf(step("a", ok)))
    task_id = ticker.pool.last_sent("a").task_id
    ticker.pool.reply("a", wire.Output(task_id, [(0.0, 20, "hello")]))
    ticker.turn()
    [out] = ticker.events(events.StepOutput)
    assert (out.step_id, out.attempt, out.lines) == ("a", 1, ((0.0, 20, "hello"),))


def raising_condition(ctx: Any) -> bool:
    raise KeyError("missing")


def test_a_raising_run_if_is_a_failed_attempt_never_retried(ticker: Ticker) -> None:
    policy = RetryPolicy(max_attempts=3, backoff=Backoff.fixed(1))
    iid = ticker.start(wf(step("a", ok).run_if(raising_condition).with_retry(policy)))
    ticker.advance(5)
    st = ticker.step(iid, "a")
    assert (st.status, st.attempts) == (S.FAILED, 1)
    assert [(a.outcome, a.number) for a in st.history] == [("failed", 1)]
    assert "run_if raised KeyError" in (st.history[0].error or "")
    assert ticker.pool.sent == []  # it never reached a worker


def test_a_raising_run_if_runs_the_on_failure_hook(ticker: Ticker) -> None:
    iid = ticker.start(wf(step("a", WithHooks(fail=False)).run_if(raising_condition)))
    hook = ticker.pool.last_sent("a")
    assert (hook.hook, hook.attempt) == ("failure", 1)
    ticker.run("a")
    assert ticker.status(iid) is W.FAILED
