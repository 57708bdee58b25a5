"""``for_each`` steps (API.md §12), driven through ``Scheduler.tick()`` with a fake pool and a virtual clock.

Items from upstream data, the key rules, the failure actions, per-item
retry, timeout and cancel, ``with_concurrency``, empty collections,
``run_if``, a raising or wrong ``for_each``, events, merges and conflicts,
hooks, and resume from what was checkpointed. No worker process is started;
an item runs as ``step[key]`` in ``FakePool``.
"""

from __future__ import annotations

from pathlib import Path
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
from wfaas.items import item_keys
from wfaas.states import StepStatus, WorkflowStatus

from conftest import Data, HeldStore, Ticker

S, W = StepStatus, WorkflowStatus
calls: list[Any] = []  # what the for_each functions were called with (they run in this process)


def wf(*steps: StepDefinition) -> WorkflowDefinition:
    definition = WorkflowDefinition("w", "w", data_type=Data)
    for s in steps:
        definition.add_step(s)
    return definition


def listing(ctx: WorkflowContext[Data]) -> None:
    ctx.data.value = ["a", "b", "c"]


def upper(ctx: WorkflowContext[Data]) -> None:
    ctx.data.items[ctx.item_key] = (ctx.item.upper(), ctx.idempotency_key)


def fail_on_a(ctx: WorkflowContext[Data]) -> None:
    if ctx.item == "a":
        raise ValueError("bad item a")
    ctx.data.items[ctx.item_key] = True


def flaky_a(ctx: WorkflowContext[Data]) -> None:
    if ctx.item == "a" and ctx.attempt < 2:
        raise RuntimeError("a fails once")
    ctx.data.items[ctx.item_key] = ctx.attempt


def set_value(ctx: WorkflowContext[Data]) -> None:
    ctx.data.value = ctx.item  # a plain field: two items setting it differently conflict


def record_items(ctx: WorkflowContext[Data]) -> None:
    ctx.data.log = sorted(ctx.data.items)


def of_value(data: Data) -> Any:
    calls.append(list(data.value) if isinstance(data.value, list) else data.value)
    return data.value


def each(sid: str, body: Any = upper, after: list[str] | None = None) -> StepDefinition:
    return StepDefinition(sid, sid, body).depends_on(after or ["list"]).for_each(of_value)


def lister(items: Any = ("a", "b", "c")) -> StepDefinition:
    def fill(ctx: WorkflowContext[Data]) -> None:
        ctx.data.value = items if not isinstance(items, tuple) else list(items)

    return StepDefinition("list", "list", fill)


@pytest.fixture(autouse=True)
def _fresh_calls() -> None:
    calls.clear()


def run_all(ticker: Ticker, limit: int = 50) -> None:
    """Let every busy worker run its step or item until nothing is busy."""
    for _ in range(limit):
        busy = sorted(ticker.busy())
        if not busy:
            return
        for label in busy:
            ticker.run(label)
    raise AssertionError(f"still busy after {limit} rounds: {ticker.busy()}")


# -- items and keys -------------------------------------------------------------------------


def test_items_come_from_upstream_data_each_with_its_key_and_idempotency_key(ticker: Ticker) -> None:
    iid = ticker.start(wf(lister(), each("e"), StepDefinition("r", "r", record_items).depends_on(["e"])))
    assert (ticker.step(iid, "e").items, ticker.step(iid, "list").items) == ({}, None)  # not computed yet
    ticker.run("list")
    assert ticker.busy() == {"e[a]", "e[b]"}
    run_all(ticker)
    state = ticker.state(iid)
    assert state.status is W.COMPLETED
    assert state.data.items == {k: (k.upper(), f"{iid}:e[{k}]") for k in "abc"}
    assert state.data.log == ["a", "b", "c"]  # the dependent ran after every item
    step = state.step_states["e"]
    assert step.status is S.SUCCEEDED
    assert list(step.items or ()) == ["a", "b", "c"]
    assert (step.items_total, step.items_done, step.items_failed) == (3, 3, 0)
    assert calls == [["a", "b", "c"]]


@pytest.mark.parametrize(
    ("items", "keys"),
    [
        (["x.csv", "y.csv"], ["x.csv", "y.csv"]),
        ([3, 1, 2], ["3", "1", "2"]),
        ([Path("/d/a"), "b"], ["/d/a", "b"]),
        (["a", "a"], ["0", "1"]),  # not unique: the index
        ([1, "1"], ["0", "1"]),  # unique values, equal strings: the index
        ([{"id": 1}, {"id": 2}], ["0", "1"]),  # not str/int/path: the index
        ([1.5, 2.5], ["0", "1"]),
        ([], []),
    ],
)
def test_key_rules(items: list[Any], keys: list[str]) -> None:
    assert item_keys(items) == keys


def test_the_item_reaches_the_body_as_it_was_returned(ticker: Ticker) -> None:
    rows = [{"id": 7, "name": "x"}, {"id": 8, "name": "y"}]

    def copy(ctx: WorkflowContext[Data]) -> None:
        ctx.data.items[ctx.item_key] = ctx.item

    iid = ticker.start(wf(lister(rows), each("e", copy)))
    run_all(ticker)
    assert ticker.state(iid).data.items == {"0": rows[0], "1": rows[1]}


# -- how the step ends ----------------------------------------------------------------------


def test_an_empty_collection_succeeds_at_once_and_its_dependents_run(ticker: Ticker) -> None:
    iid = ticker.start(wf(lister([]), each("e"), StepDefinition("r", "r", record_items).depends_on(["e"])))
    ticker.run("list")
    assert ticker.busy() == {"r"}
    ticker.run("r")
    step = ticker.step(iid, "e")
    assert (step.status, step.items) == (S.SUCCEEDED, {})
    assert ticker.status(iid) is W.COMPLETED


def test_a_delayed_step_with_an_empty_collection_ends_the_run_when_its_delay_is_over(ticker: Ticker) -> None:
    iid = ticker.start(wf(lister([]), each("e").with_delay(5)))
    ticker.run("list")
    assert ticker.step(iid, "e").status is S.WAITING
    ticker.advance(5)
    assert ticker.step(iid, "e").status is S.SUCCEEDED
    assert ticker.status(iid) is W.COMPLETED


def test_run_if_false_skips_the_step_without_computing_its_items(ticker: Ticker) -> None:
    iid = ticker.start(wf(lister(), each("e").run_if(lambda ctx: False)))
    ticker.run("list")
    assert ticker.step(iid, "e").status is S.SKIPPED
    assert calls == []
    assert ticker.status(iid) is W.COMPLETED


@pytest.mark.parametrize(
    ("items", "said"),
    [
        (None, "for_each returned NoneType, not an iterable of items"),
        (42, "for_each returned int, not an iterable of items"),
        ("abc", "for_each returned str, not an iterable of items"),
    ],
)
def test_for_each_returning_no_iterable_fails_the_step_naming_it(ticker: Ticker, items: Any, said: str) -> None:
    iid = ticker.start(wf(lister(items), each("e")))
    ticker.run("list")
    state = ticker.state(iid)
    assert (state.status, state.failed_step) == (W.FAILED, "e")
    assert said in (state.step_states["e"].error or "")
    assert "step 'e'" in (state.error or "")


def test_for_each_raising_fails_the_step_with_its_cause_never_retried(ticker: Ticker) -> None:
    def broken(data: Data) -> Any:
        calls.append("called")
        raise KeyError("files")

    definition = wf(
        lister(),
        StepDefinition("e", "e", upper).depends_on(["list"]).for_each(broken).with_retry(RetryPolicy(max_attempts=3)),
    )
    iid = ticker.start(definition)
    ticker.run("list")
    step = ticker.step(iid, "e")
    assert step.status is S.FAILED
    assert "for_each raised KeyError: 'files'" in (step.error or "")
    assert calls == ["called"]
    [failed] = ticker.events(events.StepFailed)
    assert (failed.step_id, failed.will_retry, failed.item_key) == ("e", False, None)


def test_an_item_that_cannot_travel_fails_the_step_naming_the_item(ticker: Ticker) -> None:
    unsendable = StepDefinition("e", "e", upper).depends_on(["list"]).for_each(lambda d: ["ok", (x for x in d.log)])
    iid = ticker.start(wf(lister(), unsendable))
    ticker.run("list")
    error = ticker.step(iid, "e").error or ""
    assert "item 1 (<generator object" in error and "cannot be sent to a worker" in error
    assert ticker.busy() == set()  # not even the item that could travel started


def test_fail_workflow_item_failure_starts_no_new_item_and_lets_running_ones_finish(ticker: Ticker) -> None:
    iid = ticker.start(wf(lister(), each("e", fail_on_a), StepDefinition("r", "r", record_items).depends_on(["e"])))
    ticker.run("list")
    assert ticker.busy() == {"e[a]", "e[b]"}
    ticker.run("e[a]")  # fails for good: the run stops
    assert ticker.busy() == {"e[b]"}  # c is not started in the freed worker
    assert ticker.status(iid) is W.RUNNING
    ticker.run("e[b]")  # the running item finishes and is checkpointed
    state = ticker.state(iid)
    assert (state.status, state.failed_step) == (W.FAILED, "e")
    items = state.step_states["e"].items or {}
    assert {k: i.status for k, i in items.items()} == {"a": S.FAILED, "b": S.SUCCEEDED, "c": S.PENDING}
    assert state.step_states["e"].status is S.FAILED
    assert state.step_states["r"].status is S.PENDING
    assert "ValueError: bad item a" in (items["a"].error or "")
    assert "step 'e[a]'" in (state.error or "")
    assert [m.item_key for _, m in ticker.pool.sent if m.step_id == "e"] == ["a", "b"]


def test_continue_next_step_runs_the_remaining_items_then_fails_the_step_and_runs_dependents(
    ticker: Ticker,
) -> None:
    failing = each("e", fail_on_a).with_failure_action(FailureAction.CONTINUE_NEXT_STEP)
    iid = ticker.start(wf(lister(), failing, StepDefinition("r", "r", record_items).depends_on(["e"])))
    ticker.run("list")
    ticker.run("e[a]")
    assert ticker.busy() == {"e[b]", "e[c]"}
    run_all(ticker)
    state = ticker.state(iid)
    assert state.status is W.COMPLETED
    step = state.step_states["e"]
    assert step.status is S.FAILED
    assert (step.items_done, step.items_failed) == (2, 1)
    assert "1 of 3 items failed; item 'a' failed: ValueError: bad item a" in (step.error or "")
    assert state.data.log == ["b", "c"]  # r ran


def test_another_step_failing_leaves_the_unstarted_items_pending_for_a_resume(ticker: Ticker) -> None:
    def boom(ctx: WorkflowContext[Data]) -> None:
        raise ValueError("boom")

    iid = ticker.start(wf(lister(), each("e").with_concurrency(1), StepDefinition("x", "x", boom).depends_on(["list"])))
    ticker.run("list")
    assert ticker.busy() == {"e[a]", "x"}
    ticker.run("x")  # the run stops
    ticker.run("e[a]")  # the running item finishes; b and c do not start
    state = ticker.state(iid)
    assert (state.status, state.failed_step) == (W.FAILED, "x")
    step = state.step_states["e"]
    assert step.status is S.PENDING
    assert {k: i.status for k, i in (step.items or {}).items()} == {"a": S.SUCCEEDED, "b": S.PENDING, "c": S.PENDING}


# -- per item: retry, timeout, cancel, concurrency -------------------------------------------


def test_each_item_is_retried_on_its_own(ticker: Ticker) -> None:
    retried = each("e", flaky_a).with_retry(RetryPolicy(max_attempts=2, backoff=Backoff.fixed(5)))
    iid = ticker.start(wf(lister(), retried))
    ticker.run("list")
    ticker.run("e[a]")
    items = ticker.step(iid, "e").items or {}
    assert (items["a"].status, items["a"].attempts) == (S.WAITING, 1)
    assert ticker.busy() == {"e[b]", "e[c]"}  # the others go on meanwhile
    ticker.run("e[b]")
    ticker.run("e[c]")
    ticker.advance(5)
    assert ticker.busy() == {"e[a]"}
    assert ticker.pool.last_sent("e[a]").attempt == 2
    ticker.run("e[a]")
    state = ticker.state(iid)
    assert state.status is W.COMPLETED
    assert state.data.items == {"a": 2, "b": 1, "c": 1}
    assert [i.attempts for i in (state.step_states["e"].items or {}).values()] == [2, 1, 1]
    retrying = ticker.events(events.StepRetrying)
    assert [(e.step_id, e.item_key, e.attempt) for e in retrying] == [("e", "a", 2)]


def test_a_timeout_kills_only_the_item_that_ran_over(ticker: Ticker) -> None:
    iid = ticker.start(wf(lister(), each("e").with_timeout(30)))
    ticker.run("list")
    ticker.advance(10)
    ticker.run("e[a]")  # a finishes in time; c starts at 10
    ticker.advance(20)  # b has run 30 s
    [kill] = ticker.pool.kills
    assert kill.slot.task.step.label == "e[b]"
    ticker.pool.end_kill("e[b]")
    ticker.turn()
    ticker.run("e[c]")
    step = ticker.step(iid, "e")
    items = step.items or {}
    assert {k: i.status for k, i in items.items()} == {"a": S.SUCCEEDED, "b": S.FAILED, "c": S.SUCCEEDED}
    assert items["b"].history[-1].outcome == "timed_out"
    assert ticker.status(iid) is W.FAILED


def test_with_concurrency_caps_the_items_in_flight(ticker: Ticker) -> None:
    iid = ticker.start(wf(lister(["a", "b", "c", "d"]), each("e").with_concurrency(1)), turns=3)
    ticker.run("list")
    seen = []
    while ticker.busy():
        busy = ticker.busy()
        assert len(busy) == 1, busy  # two workers, one item at a time
        seen += busy
        ticker.run(busy.pop())
    assert seen == ["e[a]", "e[b]", "e[c]", "e[d]"]
    assert ticker.status(iid) is W.COMPLETED


def test_with_concurrency_counts_a_retry_against_the_cap(ticker: Ticker) -> None:
    capped = each("e", flaky_a).with_concurrency(1).with_retry(RetryPolicy(max_attempts=2, backoff=Backoff.fixed(1)))
    iid = ticker.start(wf(lister(), capped))
    ticker.run("list")
    ticker.run("e[a]")  # fails, waits 1 s; b takes the free place
    assert ticker.busy() == {"e[b]"}
    ticker.advance(1)  # a's retry is due, but b holds the one place
    assert ticker.busy() == {"e[b]"}
    run_all(ticker)
    assert ticker.status(iid) is W.COMPLETED


def test_cancel_stops_the_running_items_and_cancels_the_step(ticker: Ticker) -> None:
    iid = ticker.start(wf(lister(), each("e")))
    ticker.run("list")
    future = ticker.scheduler.cancel(iid, 0.0)
    assert len(ticker.pool.kills) == 2
    ticker.pool.end_kill("e[a]")
    ticker.pool.end_kill("e[b]")
    ticker.turn()
    assert future.result(0) is W.CANCELLED
    step = ticker.step(iid, "e")
    assert step.status is S.CANCELLED
    assert {k: i.status for k, i in (step.items or {}).items()} == {"a": S.CANCELLED, "b": S.CANCELLED, "c": S.PENDING}


def test_a_crashed_worker_fails_only_its_item(ticker: Ticker) -> None:
    iid = ticker.start(wf(lister(), each("e").with_failure_action(FailureAction.CONTINUE_NEXT_STEP)))
    ticker.run("list")
    ticker.pool.crash("e[a]")
    ticker.turn()
    ticker.pool.end_kill("e[a]", exitcode=-9)
    ticker.turn()
    run_all(ticker)
    items = ticker.step(iid, "e").items or {}
    assert {k: i.status for k, i in items.items()} == {"a": S.FAILED, "b": S.SUCCEEDED, "c": S.SUCCEEDED}
    assert items["a"].history[-1].outcome == "crashed"


def test_a_memory_limit_stops_only_the_item_over_it(ticker: Ticker) -> None:
    limited = each("e").with_memory_limit(100 * 2**20).with_failure_action(FailureAction.CONTINUE_NEXT_STEP)
    iid = ticker.start(wf(lister(), limited))
    ticker.run("list")
    slot = ticker.pool.busy()["e[b]"]
    ticker.scheduler.supervisor.over_memory(slot, slot.task, 300 * 2**20)  # what the watchdog thread calls
    ticker.turn()
    [kill] = ticker.pool.kills
    assert kill.slot is slot
    ticker.pool.end_kill("e[b]", exitcode=-9)
    ticker.turn()
    run_all(ticker)
    items = ticker.step(iid, "e").items or {}
    assert {k: i.status for k, i in items.items()} == {"a": S.SUCCEEDED, "b": S.FAILED, "c": S.SUCCEEDED}
    assert "its worker used 300 MiB, over the step's memory limit of 100 MiB" in (items["b"].error or "")


# -- events, merges, hooks -------------------------------------------------------------------


def test_events_carry_the_item_key(ticker: Ticker) -> None:
    ticker.start(wf(lister(["a"]), each("e", fail_on_a).with_failure_action(FailureAction.CONTINUE_NEXT_STEP)))
    ticker.run("list")
    ticker.run("e[a]")
    seen = [(type(e).__name__, e.item_key) for e in ticker.events() if getattr(e, "step_id", None) == "e"]
    assert seen == [("StepStarted", None), ("StepStarted", "a"), ("StepFailed", "a"), ("StepFailed", None)]


def test_what_an_item_prints_is_its_own_output_and_log(ticker: Ticker) -> None:
    iid = ticker.start(wf(lister(["a", "b"]), each("e")))
    ticker.run("list")
    for key in ("a", "b"):
        sent = ticker.pool.last_sent(f"e[{key}]")
        ticker.pool.reply(f"e[{key}]", wire.Output(sent.task_id, [(0.0, 20, f"live {key}")]))
        line = (0.0, 20, f"kept {key}")
        ticker.pool.reply(f"e[{key}]", wire.Done(sent.task_id, "success", {}, [], ([line], 0, 0), {"wall": 0.001}))
    ticker.turn()
    outputs = [(e.item_key, e.lines[0][2]) for e in ticker.events(events.StepOutput)]
    assert sorted(outputs) == [("a", "kept a"), ("a", "live a"), ("b", "kept b"), ("b", "live b")]
    logs = ticker.store.read_logs(iid, "e")
    assert sorted((log.item_key, log.part, log.attempt, log.lines[0][2]) for log in logs) == [
        ("a", "", 1, "kept a"),
        ("b", "", 1, "kept b"),
    ]


def test_items_writing_one_plain_field_differently_conflict(ticker: Ticker) -> None:
    iid = ticker.start(wf(lister(["a", "b"]), each("e", set_value)))
    ticker.run("list")
    ticker.run("e[a]")
    ticker.run("e[b]")
    state = ticker.state(iid)
    items = state.step_states["e"].items or {}
    assert "field value was changed by step 'e[a]', which ran at the same time" in (items["b"].error or "")
    assert state.status is W.FAILED


def test_items_writing_keys_of_a_dict_field_merge(ticker: Ticker) -> None:
    iid = ticker.start(wf(lister(["a", "b"]), each("e")))
    ticker.run("list")
    ticker.run("e[a]")
    ticker.run("e[b]")
    assert set(ticker.state(iid).data.items) == {"a", "b"}


class Hooked(StepExecutor[Data]):
    def execute(self, ctx: WorkflowContext[Data]) -> StepResult:
        return StepResult.SUCCESS

    def on_success(self, ctx: WorkflowContext[Data]) -> None:
        pass


def test_hooks_run_once_per_item_with_the_item(ticker: Ticker) -> None:
    iid = ticker.start(wf(lister(["a", "b"]), each("e", Hooked())))
    ticker.run("list")
    run_all(ticker)
    hooks = [(m.item_key, m.hook) for _, m in ticker.pool.sent if m.step_id == "e" and m.hook]
    assert sorted(hooks) == [("a", "success"), ("b", "success")]
    assert ticker.status(iid) is W.COMPLETED


# -- checkpoints and resume ------------------------------------------------------------------


def test_resume_runs_only_the_items_that_did_not_succeed_and_keeps_the_list(ticker: Ticker) -> None:
    definition = wf(lister(), each("e", fail_on_a).with_failure_action(FailureAction.CONTINUE_NEXT_STEP))
    iid = ticker.start(definition)
    ticker.run("list")
    run_all(ticker)
    assert ticker.step(iid, "e").status is S.FAILED
    fresh = Ticker(store=ticker.store)
    try:
        fresh.resume(definition, iid)
        assert fresh.busy() == {"e[a]"}
        assert fresh.pool.last_sent("e[a]").attempt == 2
        assert calls == [["a", "b", "c"]]  # not computed again
    finally:
        fresh.close()


def test_rerun_computes_the_list_again(ticker: Ticker) -> None:
    definition = wf(lister(), each("e"))
    iid = ticker.start(definition)
    ticker.run("list")
    run_all(ticker)
    fresh = Ticker(store=ticker.store)
    try:
        fresh.resume(definition, iid, reruns={"e"})
        assert fresh.busy() == {"e[a]", "e[b]"}
        run_all(fresh)
        assert calls == [["a", "b", "c"]] * 2
        assert fresh.status(iid) is W.COMPLETED
    finally:
        fresh.close()


def test_items_start_only_once_their_collection_is_committed() -> None:
    store = HeldStore()
    t = Ticker(store=store)
    try:
        iid = t.start(wf(lister(), each("e")))
        store.commit()
        t.turn()
        t.run("list")
        store.commit()  # the write in flight when list's result came (its RUNNING status) ...
        t.turn()
        assert t.busy() == set()  # ... so list's result and e's collection are being written now
        record = store.read(iid)
        assert record is not None and "e" not in record.item_lists  # written, not committed yet
        store.commit()
        t.turn()
        assert t.busy() == {"e[a]", "e[b]"}
        record = store.read(iid)
        assert record is not None and [key for key, _ in record.item_lists["e"]] == ["a", "b", "c"]
    finally:
        t.close()


def test_a_checkpoint_holds_only_the_items_that_changed(ticker: Ticker) -> None:
    items = [f"i{n}" for n in range(20)]
    iid = ticker.start(wf(lister(items), each("e")))
    ticker.run("list")
    written: list[int] = []
    original = ticker.store.write

    def spy(checkpoints: list[Any]) -> None:
        written.extend(len(records) for cp in checkpoints for records in cp.items.values())
        original(checkpoints)

    ticker.store.write = spy  # type: ignore[method-assign]
    ticker.run("e[i0]")
    assert written and max(written) <= 3  # i0 ended, i2 started (and i1 may be re-marked): never the 20
    assert ticker.step(iid, "e").items_done == 1
