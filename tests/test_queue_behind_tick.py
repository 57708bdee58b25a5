"""A step queued behind a busy worker's short step (``dispatch.py``), driven through ``Scheduler.tick()``.

The fake pool holds two steps per slot, as the real one does: the running
one (``slot.task``) and one waiting in its pipe (``slot.next``). One worker
makes every decision visible.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from wfaas import StepDefinition, WorkflowContext, WorkflowDefinition, dispatch, events
from wfaas.states import StepStatus, WorkflowStatus

from conftest import Data, Ticker

S, W = StepStatus, WorkflowStatus


def ok(ctx: WorkflowContext[Data]) -> None:
    ctx.data.items[ctx.step_id] = True


def fan(*sids: str, wid: str = "w", timeout: float | None = None) -> WorkflowDefinition:
    definition = WorkflowDefinition(wid, wid, data_type=Data)
    for sid in sids:
        s = StepDefinition(sid, sid, ok)
        definition.add_step(s.with_timeout(timeout) if timeout else s)
    return definition


@pytest.fixture
def one() -> Iterator[Ticker]:
    """One worker that may hold a second step behind the one it runs."""
    t = Ticker(workers=1, depth=2)
    yield t
    t.close()


def queued(t: Ticker) -> str | None:
    task: Any = t.pool.slots[0].next
    return None if task is None else str(task.step.label)


def sent(t: Ticker) -> list[str]:
    return [m.step_id for _, m in t.pool.sent]


def test_nothing_queues_behind_until_the_run_has_shown_short_steps(one: Ticker) -> None:
    one.start(fan("a", "b", "c"))
    assert sent(one) == ["a"] and queued(one) is None
    one.run("a")  # 1 ms (the fake's usage)
    assert one.busy() == {"b"} and queued(one) == "c"
    assert sent(one) == ["a", "b", "c"]


def test_a_run_of_long_steps_never_queues(one: Ticker) -> None:
    one.start(fan("a", "b", "c"))
    one.pool.execute("a", usage={"wall": 1.0})
    one.turn()
    assert one.busy() == {"b"} and queued(one) is None


def test_a_queued_step_starts_only_when_the_step_before_it_replies(one: Ticker) -> None:
    iid = one.start(fan("a", "b", "c"))
    one.run("a")
    assert one.step(iid, "c").status is S.PENDING and one.step(iid, "c").attempts == 0
    one.run("b")
    assert one.busy() == {"c"} and one.step(iid, "c").status is S.RUNNING
    order = [(type(e).__name__, e.step_id) for e in one.events() if hasattr(e, "step_id")]
    assert order.index(("StepSucceeded", "b")) < order.index(("StepStarted", "c"))
    one.run("c")
    assert one.status(iid) is W.COMPLETED
    assert [one.step(iid, s).attempts for s in "abc"] == [1, 1, 1]


def test_a_queued_steps_timeout_counts_from_when_it_starts(one: Ticker) -> None:
    iid = one.start(fan("a", "b", "c", timeout=10.0))
    one.run("a")
    assert queued(one) == "c"
    one.advance(9.0)  # b runs long after all; c waits behind it
    one.run("b")
    one.advance(2.0)  # 11 s after c was sent, 2 s after it started
    assert not one.pool.kills and one.step(iid, "c").status is S.RUNNING
    one.advance(8.5)
    assert [k.slot.task.step.sid for k in one.pool.kills] == ["c"]


def test_nothing_queues_behind_a_step_that_has_run_long(one: Ticker) -> None:
    one.start(fan("a", "b"))
    one.run("a")
    assert one.busy() == {"b"}
    one.advance(1.0)
    one.start(fan("x", wid="other"))  # ready now, but b has run for a second
    assert queued(one) is None and "x" not in sent(one)


def test_a_crash_puts_the_queued_step_back_untouched(one: Ticker) -> None:
    first = one.start(fan("a", "b"))
    one.run("a")
    second = one.start(fan("x", wid="other"))
    assert queued(one) == "x"
    one.pool.crash("b")
    one.turn()
    one.pool.end_kill("b")
    one.turn()
    assert one.busy() == {"x"} and sent(one).count("x") == 2, "sent again, to the new worker"
    one.run("x")
    b = one.step(first, "b")
    assert one.status(first) is W.FAILED and b.history[0].outcome == "crashed"
    x = one.step(second, "x")
    assert one.status(second) is W.COMPLETED and x.attempts == 1 and len(x.history) == 1


def test_a_worker_that_retires_never_runs_its_queued_step(one: Ticker) -> None:
    iid = one.start(fan("a", "b", "c"))
    one.run("a")
    slot = one.pool.busy()["b"]
    one.pool.execute("b")
    one.pool.retire(slot, "a step closed fd 1")
    one.turn()
    [kill] = one.pool.kills
    assert kill.slot is slot and slot.task is not None and slot.task.step.sid == "c", "promoted, then never read"
    one.pool.end_kill()
    one.turn()
    assert one.busy() == {"c"} and sent(one).count("c") == 2, "sent again, to the new worker"
    one.run("c")
    c = one.step(iid, "c")
    assert one.status(iid) is W.COMPLETED and c.attempts == 1 and len(c.history) == 1


def test_a_run_whose_step_waits_in_a_retiring_worker_ends_only_once_it_is_put_back(one: Ticker) -> None:
    first = one.start(fan("a", "b"))
    one.run("a")
    second = one.start(fan("x", wid="other"))
    slot = one.pool.busy()["b"]
    one.pool.execute("b")
    one.pool.retire(slot, "a step closed fd 1")
    one.turn()
    one.scheduler.cancel(second, 0.0)
    one.turn()
    assert one.status(second) is W.RUNNING, "x was sent to the retiring worker, which is not yet gone"
    one.pool.end_kill()
    one.turn()
    assert one.status(first) is W.COMPLETED and one.status(second) is W.CANCELLED
    assert one.step(second, "x").status is S.PENDING and one.step(second, "x").attempts == 0


def test_a_step_queued_for_a_run_cancelled_meanwhile_is_taken_back(one: Ticker) -> None:
    first = one.start(fan("a", "b"))
    one.run("a")
    second = one.start(fan("x", wid="other"))
    assert one.busy() == {"b"} and queued(one) == "x"
    one.scheduler.cancel(second, 0.0)
    one.turn()
    assert one.status(second) is W.CANCELLED and queued(one) is None and not one.pool.kills
    x = one.step(second, "x")
    assert x.status is S.PENDING and x.attempts == 0 and x.history == []
    one.run("b")
    assert one.status(first) is W.COMPLETED and one.busy() == set()
    assert not [e for e in one.events(events.StepStarted) if e.step_id == "x"]


def test_nothing_is_queued_behind_a_worker_until_it_has_skipped_the_step_taken_back(one: Ticker) -> None:
    # Were z queued while x's message is still unread, the worker would take z's claim token for x: x would
    # run twice (here and wherever it went), and z's message, finding no token, would be skipped.
    first = one.start(fan("a", "b"))
    one.run("a")
    second = one.start(fan("x", wid="other"))
    assert queued(one) == "x"
    one.scheduler.cancel(second, 0.0)  # x taken back; its message waits in the worker's pipe
    third = one.start(fan("z", wid="third"))
    assert queued(one) is None and "z" not in sent(one)
    one.run("b")  # the worker replies, reads x's message and skips it (wire.Skipped)
    assert one.busy() == {"z"}
    one.run("z")
    assert one.status(first) is one.status(third) is W.COMPLETED and one.status(second) is W.CANCELLED
    assert sent(one).count("x") == 1


def test_a_step_its_worker_claimed_before_the_cancel_is_stopped_as_never_started(one: Ticker) -> None:
    first = one.start(fan("a", "b"))
    one.run("a")
    second = one.start(fan("x", wid="other"))
    one.pool.execute("b")  # b's reply is on its way; the worker has claimed x and starts it
    one.scheduler.cancel(second, 0.0)
    assert one.status(second) is W.RUNNING, "x is in b's worker: the cancel ends when it is out"
    one.turn()
    assert one.busy() == {"x"} and [k.slot.task.step.sid for k in one.pool.kills] == ["x"]
    one.pool.end_kill("x")
    one.turn()
    assert one.status(second) is W.CANCELLED and one.status(first) is W.COMPLETED
    x = one.step(second, "x")
    assert x.status is S.PENDING and x.attempts == 0 and x.history == []
    assert not [e for e in one.events(events.StepStarted) if e.step_id == "x"]


def test_a_step_queued_behind_one_that_turned_long_is_taken_back_by_an_idle_worker() -> None:
    t = Ticker(workers=2, depth=2)
    try:
        iid = t.start(fan("a", "b", "c", "d", "e"))
        assert t.busy() == {"a", "b"}
        t.run("a")
        assert t.busy() == {"b", "c"} and {s.next.step.sid for s in t.pool.slots} == {"d", "e"}
        waits_behind_b = next(s.next.step.sid for s in t.pool.slots if s.task.step.sid == "b")
        t.advance(1.0)  # b (and c) have run for a second
        t.run("c")
        t.run(next(sid for sid in t.busy() if sid != "b"))  # c's worker ends what it held: it is idle now
        assert t.busy() == {"b", waits_behind_b}, "taken back from b's worker, started in the idle one"
        assert all(s.next is None for s in t.pool.slots)
        t.run(waits_behind_b)
        t.run("b")
        assert t.status(iid) is W.COMPLETED
        assert all(t.step(iid, sid).attempts == 1 for sid in "abcde")
    finally:
        t.close()


def test_a_step_queued_behind_one_whose_run_is_cancelled_goes_to_the_next_worker(one: Ticker) -> None:
    first = one.start(fan("a", "b"))
    one.run("a")
    second = one.start(fan("x", wid="other"))
    assert queued(one) == "x"
    one.scheduler.cancel(first, 0.0)
    one.turn()
    one.pool.end_kill("b")
    one.turn()
    assert one.status(first) is W.CANCELLED and one.busy() == {"x"}
    one.run("x")
    assert one.status(second) is W.COMPLETED and one.step(second, "x").attempts == 1


def test_items_under_with_concurrency_never_queue_past_the_cap(one: Ticker) -> None:
    definition = WorkflowDefinition("w", "w", data_type=Data)
    definition.add_step(StepDefinition("each", "each", ok).for_each(lambda d: range(4)).with_concurrency(1))
    iid = one.start(definition)
    for key in "0123":
        assert one.busy() == {f"each[{key}]"} and queued(one) is None
        one.run(f"each[{key}]")
    assert one.status(iid) is W.COMPLETED


# -- looking for the next message before sleeping (dispatch.SPIN) ------------------------------


@pytest.fixture
def two_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "CPUS", 2)


def chain(*sids: str) -> WorkflowDefinition:
    definition = WorkflowDefinition("c", "c", data_type=Data)
    for before, sid in zip((None, *sids), sids, strict=False):
        s = StepDefinition(sid, sid, ok)
        definition.add_step(s.depends_on([before]) if before else s)
    return definition


def test_a_chain_of_short_steps_has_worker_and_scheduler_look_before_sleeping(one: Ticker, two_cores: None) -> None:
    one.start(chain("a", "b", "c"))
    assert one.pool.last_sent("a").spin == 0.0, "nothing is known of the run's steps yet"
    one.pool.execute("a", usage={"wall": 0.0001})
    one.turn()
    assert one.pool.last_sent("b").spin == dispatch.SPIN
    assert one.scheduler._spin() == dispatch.SPIN


def test_nobody_looks_when_steps_are_long(one: Ticker, two_cores: None) -> None:
    one.start(chain("a", "b", "c"))
    one.pool.execute("a", usage={"wall": 0.5})
    one.turn()
    assert one.pool.last_sent("b").spin == 0.0 and one.scheduler._spin() == 0.0


def test_nobody_looks_when_every_core_has_a_worker(two_cores: None) -> None:
    t = Ticker(workers=2, depth=2)
    try:
        t.start(fan("a", "b", "c", "d", "e"))
        t.pool.execute("a", usage={"wall": 0.0001})
        t.turn()
        assert t.busy() == {"b", "c"}
        assert t.pool.last_sent("c").spin == 0.0 and t.scheduler._spin() == 0.0
    finally:
        t.close()
