"""Readiness: the truth table of ``wfaas.readiness`` checked directly, then end to end with real workers.

Ordering across processes is proven with data (what a step's snapshot held when
it started), marker files the steps write, and files the test creates once it
has seen a state; the test itself never sleeps to synchronise.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import pytest
from wfaas import (
    FailureAction,
    StepDefinition,
    StepFailed,
    StepResult,
    StepStatus,
    WorkflowDefinition,
    WorkflowEngine,
    WorkflowStatus,
    events,
)
from wfaas.readiness import TRUTH_TABLE, Counts, Decision, Gate, Outcome, decide

from conftest import Data, collect, wait_for, wait_until

OUTCOMES = list(Outcome)

# -- the truth table, as data ----------------------------------------------------------------------


def test_truth_table_has_one_row_per_outcome_and_the_documented_values() -> None:
    assert set(TRUTH_TABLE) == set(Outcome)
    assert TRUTH_TABLE[Outcome.SUCCEEDED] == Counts(finishes=True, satisfies_any=True)
    assert TRUTH_TABLE[Outcome.SKIPPED] == Counts(finishes=True, satisfies_any=False)
    assert TRUTH_TABLE[Outcome.FAILED_CONTINUE] == Counts(finishes=True, satisfies_any=False)


def test_module_documents_the_table() -> None:
    from wfaas import readiness

    doc = readiness.__doc__ or ""
    for row in ("SUCCEEDED", "SKIPPED", "CONTINUE_NEXT_STEP", "FAIL_WORKFLOW", "depends_on_any"):
        assert row in doc


# -- Gate: every order of every outcome, against a reference model ---------------------------------


def expected_open(all_outcomes: list[Outcome | None], any_outcomes: list[Outcome | None]) -> bool:
    """The contract in words: every `all` dependency finished, and one `any` succeeded or all finished."""
    all_done = all(o is not None for o in all_outcomes)
    if not any_outcomes:
        return all_done
    any_ok = any(o is Outcome.SUCCEEDED for o in any_outcomes) or all(o is not None for o in any_outcomes)
    return all_done and any_ok


@pytest.mark.parametrize(("n_all", "n_any"), [(0, 1), (1, 0), (2, 0), (0, 2), (0, 3), (1, 1), (1, 2), (2, 2)])
def test_gate_opens_exactly_when_the_contract_says_in_every_order(n_all: int, n_any: int) -> None:
    deps = [("all", i) for i in range(n_all)] + [("any", i) for i in range(n_any)]
    cases = 0
    for outcomes in itertools.product(OUTCOMES, repeat=len(deps)):
        for order in itertools.permutations(range(len(deps))):
            gate = Gate(all_pending=n_all, any_total=n_any)
            seen_all: list[Outcome | None] = [None] * n_all
            seen_any: list[Outcome | None] = [None] * n_any
            opened_at = None
            for step_no, k in enumerate(order):
                kind, i = deps[k]
                (seen_all if kind == "all" else seen_any)[i] = outcomes[k]
                opened = gate.record(outcomes[k], via_any=kind == "any")
                should = expected_open(seen_all, seen_any)
                if opened_at is None:
                    assert opened == should, (outcomes, order, step_no)
                    if opened:
                        opened_at = step_no
                else:
                    assert not opened, "a gate opens only once"
            assert opened_at is not None, (outcomes, order)  # every dependency finished: it always opens
            assert not gate.check()  # and never again
            cases += 1
    assert cases >= 1


def test_gate_without_dependencies_opens_on_the_first_check_only() -> None:
    gate = Gate(all_pending=0, any_total=0)
    assert gate.check() is True
    assert gate.check() is False
    assert gate.opened


def test_skipped_and_continued_alternatives_do_not_open_depends_on_any_early() -> None:
    gate = Gate(all_pending=0, any_total=3)
    assert not gate.record(Outcome.SKIPPED, via_any=True)
    assert not gate.record(Outcome.FAILED_CONTINUE, via_any=True)
    assert gate.record(Outcome.SUCCEEDED, via_any=True)


def test_depends_on_any_with_an_unfinished_all_dependency_waits_for_it() -> None:
    gate = Gate(all_pending=1, any_total=2)
    assert not gate.record(Outcome.SUCCEEDED, via_any=True)  # `any` satisfied, the `all` part not
    assert not gate.record(Outcome.SUCCEEDED, via_any=True)
    assert gate.record(Outcome.SKIPPED, via_any=False)  # a skipped `all` dependency counts as finished


# -- decide: run, skip or wait ---------------------------------------------------------------------


class Asked:
    def __init__(self, answer: bool) -> None:
        self.answer = answer
        self.calls = 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.answer


@pytest.mark.parametrize(
    ("ready_at", "not_before", "now", "due"),
    [
        (10.0, None, 5.0, 10.0),  # delay only
        (5.0, 20.0, 5.0, 20.0),  # schedule later than the delay
        (30.0, 20.0, 5.0, 30.0),  # delay later than the schedule: both are waited for
        (0.0, 7.5, 0.0, 7.5),  # schedule only
    ],
)
def test_decide_waits_for_the_later_of_delay_and_schedule(
    ready_at: float, not_before: float | None, now: float, due: float
) -> None:
    condition = Asked(True)
    assert decide(condition, ready_at, now, not_before) == (Decision.WAIT, due)
    assert condition.calls == 0  # run_if is asked only once the wait is over
    assert decide(condition, ready_at, due, not_before) == (Decision.RUN, due)
    assert condition.calls == 1


def test_decide_runs_or_skips_once_due() -> None:
    assert decide(None, 0.0, 0.0, None) == (Decision.RUN, 0.0)
    assert decide(Asked(True), 1.0, 2.0, None) == (Decision.RUN, 2.0)
    assert decide(Asked(False), 1.0, 2.0, 1.5) == (Decision.SKIP, 2.0)


def test_decide_lets_a_raising_condition_through() -> None:
    def broken() -> bool:
        raise ZeroDivisionError("run_if bug")

    with pytest.raises(ZeroDivisionError):
        decide(broken, 0.0, 0.0, None)


# -- helpers for steps ------------------------------------------------------------------------------


def mark(key: str) -> Any:
    """A step that records its id as a dict key (parallel steps writing distinct keys never conflict)."""

    def body(ctx: Any) -> None:
        ctx.data.items[key] = ctx.step_id

    return body


def seen_keys(ctx: Any) -> None:
    """Record which keys the step's snapshot held when it became ready."""
    ctx.data.value = sorted(ctx.data.items)


def touch_then(path: str, body: Any) -> Any:
    def step(ctx: Any) -> Any:
        Path(path).touch()
        return body(ctx)

    return step


def after_file(path: str, body: Any) -> Any:
    def step(ctx: Any) -> Any:
        wait_for(path)
        return body(ctx)

    return step


def status_of(engine: WorkflowEngine, iid: str, step: str) -> StepStatus:
    return engine.get_status(iid).step_states[step].status


# -- depends_on ---------------------------------------------------------------------------------------


def test_depends_on_waits_for_all_of_them(engine: WorkflowEngine, tmp_path: Path) -> None:
    go = str(tmp_path / "go")
    wf = WorkflowDefinition("all", data_type=Data)
    wf.add_step(StepDefinition("fast", "fast", mark("fast")))
    wf.add_step(StepDefinition("slow", "slow", after_file(go, mark("slow"))))
    wf.add_step(StepDefinition("join", "join", seen_keys).depends_on(["fast", "slow"]))
    engine.register_workflow(wf)
    iid = engine.start_workflow("all", Data())
    wait_until(lambda: status_of(engine, iid, "fast") is StepStatus.SUCCEEDED, 30, "the fast branch")
    assert status_of(engine, iid, "slow") is StepStatus.RUNNING
    assert status_of(engine, iid, "join") is StepStatus.PENDING
    Path(go).touch()
    engine.wait_for_completion(iid, timeout=30)
    state = engine.get_status(iid)
    assert state.data.value == ["fast", "slow"]  # join's snapshot held both results
    join, slow = state.step_states["join"], state.step_states["slow"]
    assert join.started_at is not None and slow.finished_at is not None
    assert join.started_at >= slow.finished_at


def test_a_dependency_named_twice_is_waited_for_once(engine: WorkflowEngine) -> None:
    wf = WorkflowDefinition("twice", data_type=Data)
    wf.add_step(StepDefinition("a", "a", mark("a")))
    wf.add_step(StepDefinition("b", "b", seen_keys).depends_on(["a", "a"]).depends_on_any(["a"]))
    engine.register_workflow(wf)
    iid = engine.start_workflow("twice", Data())
    engine.wait_for_completion(iid, timeout=30)
    assert engine.get_status(iid).data.value == ["a"]


# -- depends_on_any -------------------------------------------------------------------------------------


def test_depends_on_any_starts_on_the_first_success_while_others_run(engine: WorkflowEngine, tmp_path: Path) -> None:
    """`slow` cannot finish until `either` has run: only a step started on the first success completes this."""
    either_ran = str(tmp_path / "either-ran")
    wf = WorkflowDefinition("any", data_type=Data)
    wf.add_step(StepDefinition("fast", "fast", mark("fast")))
    wf.add_step(StepDefinition("slow", "slow", after_file(either_ran, mark("slow"))))
    wf.add_step(StepDefinition("either", "either", touch_then(either_ran, seen_keys)).depends_on_any(["fast", "slow"]))
    engine.register_workflow(wf)
    iid = engine.start_workflow("any", Data())
    engine.wait_for_completion(iid, timeout=60)
    state = engine.get_status(iid)
    assert state.status is WorkflowStatus.COMPLETED
    assert state.data.value == ["fast"]  # started from the snapshot right after `fast`, before `slow` ended
    assert state.data.items == {"fast": "fast", "slow": "slow"}  # the other branch still ran and merged
    assert state.step_states["either"].started_at < state.step_states["slow"].finished_at
    assert all(s.status is StepStatus.SUCCEEDED for s in state.step_states.values())


def skip_by_run_if() -> StepDefinition:
    return StepDefinition("alt", "alt", mark("alt")).run_if(lambda ctx: False)


def skip_by_result() -> StepDefinition:
    return StepDefinition("alt", "alt", lambda ctx: StepResult.SKIP)


@pytest.mark.parametrize("alternative", [skip_by_run_if, skip_by_result], ids=["run_if", "returns_SKIP"])
def test_a_skipped_alternative_does_not_start_depends_on_any(
    engine: WorkflowEngine, tmp_path: Path, alternative: Any
) -> None:
    """The Rust crate starts the step on the first skip; the contract waits for the real branch."""
    go = str(tmp_path / "go")
    wf = WorkflowDefinition("alt", data_type=Data)
    wf.add_step(alternative())
    wf.add_step(StepDefinition("real", "real", after_file(go, mark("real"))))
    wf.add_step(StepDefinition("after", "after", seen_keys).depends_on_any(["alt", "real"]))
    engine.register_workflow(wf)
    iid = engine.start_workflow("alt", Data())
    wait_until(
        lambda: (
            status_of(engine, iid, "alt") is StepStatus.SKIPPED and status_of(engine, iid, "real") is StepStatus.RUNNING
        ),
        30,
        "the alternative to be skipped while the real branch runs",
    )
    assert status_of(engine, iid, "after") is StepStatus.PENDING
    Path(go).touch()
    engine.wait_for_completion(iid, timeout=30)
    state = engine.get_status(iid)
    assert state.data.value == ["real"]  # it started after the real branch's result was merged
    assert state.step_states["after"].status is StepStatus.SUCCEEDED
    assert state.step_states["after"].started_at >= state.step_states["real"].finished_at


def test_depends_on_any_runs_once_all_finished_when_none_succeeded(engine: WorkflowEngine, tmp_path: Path) -> None:
    broke = str(tmp_path / "broke")

    def fail_last(ctx: Any) -> None:
        wait_for(str(tmp_path / "never"), timeout=0.3)  # takes a moment, then fails

    def fail_marked(ctx: Any) -> None:
        Path(broke).touch()
        raise RuntimeError("optional branch broke")

    def after(ctx: Any) -> None:
        if not os.path.exists(broke):
            raise AssertionError("started before every alternative had finished")
        ctx.data.value = "ran anyway"

    wf = WorkflowDefinition("none", data_type=Data)
    wf.add_step(StepDefinition("skipped", "skipped", mark("skipped")).run_if(lambda ctx: False))
    wf.add_step(
        StepDefinition("failed", "failed", after_file(str(tmp_path / "skip-seen"), fail_marked)).with_failure_action(
            FailureAction.CONTINUE_NEXT_STEP
        )
    )
    wf.add_step(
        StepDefinition("slow_fail", "slow_fail", fail_last).with_failure_action(FailureAction.CONTINUE_NEXT_STEP)
    )
    wf.add_step(StepDefinition("after", "after", after).depends_on_any(["skipped", "failed", "slow_fail"]))
    engine.register_workflow(wf)
    iid = engine.start_workflow("none", Data())
    wait_until(lambda: status_of(engine, iid, "skipped") is StepStatus.SKIPPED, 30, "the skip")
    (tmp_path / "skip-seen").touch()
    engine.wait_for_completion(iid, timeout=30)
    state = engine.get_status(iid)
    assert state.status is WorkflowStatus.COMPLETED
    assert state.data.value == "ran anyway"
    assert {sid: s.status for sid, s in state.step_states.items()} == {
        "skipped": StepStatus.SKIPPED,
        "failed": StepStatus.FAILED,
        "slow_fail": StepStatus.FAILED,
        "after": StepStatus.SUCCEEDED,
    }
    last_finish = max(state.step_states[s].finished_at for s in ("skipped", "failed", "slow_fail"))
    assert state.step_states["after"].started_at >= last_finish


# -- skipping -------------------------------------------------------------------------------------------


def test_run_if_false_skips_and_dependents_still_run(engine: WorkflowEngine) -> None:
    seen = collect(engine)
    wf = WorkflowDefinition("skip", data_type=Data)
    wf.add_step(StepDefinition("set", "set", lambda ctx: setattr(ctx.data, "n", 5)))
    wf.add_step(StepDefinition("big", "big", mark("big")).depends_on(["set"]).run_if(lambda ctx: ctx.data.n > 3))
    wf.add_step(StepDefinition("huge", "huge", mark("huge")).depends_on(["set"]).run_if(lambda ctx: ctx.data.n > 10))
    wf.add_step(StepDefinition("after_huge", "after", mark("after_huge")).depends_on(["huge"]))
    wf.add_step(StepDefinition("end", "end", seen_keys).depends_on(["big", "after_huge"]))
    engine.register_workflow(wf)
    iid = engine.start_workflow("skip", Data())
    assert engine.wait_for_completion(iid, "skip", timeout=30) == "skip completed successfully via workflow"
    state = engine.get_status(iid)
    assert state.status is WorkflowStatus.COMPLETED
    assert state.step_states["big"].status is StepStatus.SUCCEEDED  # run_if saw the merged n == 5
    assert state.step_states["huge"].status is StepStatus.SKIPPED
    assert state.step_states["huge"].attempts == 0  # never sent to a worker
    assert state.step_states["after_huge"].status is StepStatus.SUCCEEDED
    assert state.data.value == ["after_huge", "big"]
    engine.event_bus.flush()
    skipped = [e for e in seen if isinstance(e, events.StepSkipped)]
    assert [e.step_id for e in skipped] == ["huge"]
    assert not any(isinstance(e, events.StepStarted) and e.step_id == "huge" for e in seen)


def test_body_returning_skip_is_skipped_and_dependents_run(engine: WorkflowEngine) -> None:
    seen = collect(engine)

    def nothing_to_do(ctx: Any) -> StepResult:
        return StepResult.SKIP

    wf = WorkflowDefinition("skipres", data_type=Data)
    wf.add_step(StepDefinition("maybe", "maybe", nothing_to_do))
    wf.add_step(StepDefinition("next", "next", mark("next")).depends_on(["maybe"]))
    engine.register_workflow(wf)
    iid = engine.start_workflow("skipres", Data())
    engine.wait_for_completion(iid, timeout=30)
    state = engine.get_status(iid)
    assert state.status is WorkflowStatus.COMPLETED
    assert state.step_states["maybe"].status is StepStatus.SKIPPED
    assert state.step_states["maybe"].attempts == 1  # it ran, and said skip
    assert state.step_states["next"].status is StepStatus.SUCCEEDED
    engine.event_bus.flush()
    skipped = [e for e in seen if isinstance(e, events.StepSkipped)]
    assert len(skipped) == 1 and skipped[0].step_id == "maybe" and "SKIP" in skipped[0].reason


def test_a_raising_run_if_fails_the_step_with_its_cause(engine: WorkflowEngine) -> None:
    wf = WorkflowDefinition("badcond", data_type=Data)
    wf.add_step(StepDefinition("s", "s", mark("s")).run_if(lambda ctx: 1 / 0))
    engine.register_workflow(wf)
    iid = engine.start_workflow("badcond", Data())
    with pytest.raises(StepFailed, match="ZeroDivisionError") as info:
        engine.wait_for_completion(iid, timeout=30)
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    assert engine.get_status(iid).step_states["s"].status is StepStatus.FAILED
    assert engine.get_status(iid).data.items == {}


# -- failures -------------------------------------------------------------------------------------------


def test_continue_next_step_failure_counts_as_finished(engine: WorkflowEngine) -> None:
    def broken(ctx: Any) -> None:
        ctx.data.items["broken"] = "should be discarded"
        raise ValueError("optional enrichment failed")

    wf = WorkflowDefinition("cont", data_type=Data)
    wf.add_step(StepDefinition("ok", "ok", mark("ok")))
    wf.add_step(StepDefinition("optional", "optional", broken).with_failure_action(FailureAction.CONTINUE_NEXT_STEP))
    wf.add_step(StepDefinition("after", "after", seen_keys).depends_on(["ok", "optional"]))
    engine.register_workflow(wf)
    iid = engine.start_workflow("cont", Data())
    assert engine.wait_for_completion(iid, "c", timeout=30) == "c completed successfully via workflow"
    state = engine.get_status(iid)
    assert state.status is WorkflowStatus.COMPLETED
    assert state.error is None
    optional = state.step_states["optional"]
    assert optional.status is StepStatus.FAILED
    assert optional.error is not None and "optional enrichment failed" in optional.error
    assert state.step_states["after"].status is StepStatus.SUCCEEDED
    assert state.data.value == ["ok"]  # the failed step's write was not merged


def test_fail_workflow_starts_nothing_new_and_lets_running_siblings_finish(
    engine: WorkflowEngine, tmp_path: Path
) -> None:
    sibling_started = str(tmp_path / "sibling-started")
    go = str(tmp_path / "go")
    seen = collect(engine)

    def sibling(ctx: Any) -> None:
        Path(sibling_started).touch()
        wait_for(go)
        ctx.data.items["sibling"] = "finished"

    def bad(ctx: Any) -> None:
        wait_for(sibling_started)
        raise RuntimeError("fatal problem")

    wf = WorkflowDefinition("failwf", data_type=Data)
    wf.add_step(StepDefinition("sibling", "sibling", sibling))
    wf.add_step(StepDefinition("bad", "bad", bad))
    wf.add_step(StepDefinition("after_sibling", "after", mark("after_sibling")).depends_on(["sibling"]))
    wf.add_step(StepDefinition("after_bad", "after", mark("after_bad")).depends_on(["bad"]))
    wf.add_step(StepDefinition("delayed", "delayed", mark("delayed")).depends_on(["sibling"]).with_delay(0.01))
    engine.register_workflow(wf)
    iid = engine.start_workflow("failwf", Data())
    wait_until(lambda: status_of(engine, iid, "bad") is StepStatus.FAILED, 30, "the fatal failure")
    assert status_of(engine, iid, "sibling") is StepStatus.RUNNING
    # the instance does not end while a step still runs
    with pytest.raises(TimeoutError):
        engine.wait_for_completion(iid, timeout=0.3)
    assert engine.get_status(iid).status is WorkflowStatus.RUNNING
    Path(go).touch()
    with pytest.raises(StepFailed, match="fatal problem") as info:
        engine.wait_for_completion(iid, timeout=30)
    assert info.value.step_id == "bad"
    state = engine.get_status(iid)
    assert state.status is WorkflowStatus.FAILED
    assert state.failed_step == "bad"
    assert state.error is not None and "fatal problem" in state.error
    assert state.step_states["sibling"].status is StepStatus.SUCCEEDED
    assert state.data.items == {"sibling": "finished"}  # the sibling's result was checkpointed
    for never in ("after_sibling", "after_bad", "delayed"):
        assert state.step_states[never].status is StepStatus.PENDING, never
        assert state.step_states[never].attempts == 0, never
    engine.event_bus.flush()
    started = [e.step_id for e in seen if isinstance(e, events.StepStarted)]
    assert sorted(started) == ["bad", "sibling"]
    failed = [e for e in seen if isinstance(e, events.WorkflowFailed)]
    assert len(failed) == 1 and failed[0].failed_step == "bad"


def test_fail_workflow_does_not_wait_out_a_pending_delay(engine: WorkflowEngine) -> None:
    """A step waiting an hour (real clock) is not started, and the failed instance ends without waiting for it."""

    def bad(ctx: Any) -> None:
        raise RuntimeError("fatal problem")

    wf = WorkflowDefinition("faildelay", data_type=Data)
    wf.add_step(StepDefinition("later", "later", mark("later")).with_delay(3600))
    wf.add_step(StepDefinition("bad", "bad", bad))
    engine.register_workflow(wf)
    iid = engine.start_workflow("faildelay", Data())
    with pytest.raises(StepFailed, match="fatal problem"):
        engine.wait_for_completion(iid, timeout=30)
    state = engine.get_status(iid)
    assert state.status is WorkflowStatus.FAILED
    assert state.step_states["later"].status is StepStatus.PENDING  # a resume would start it
    assert state.step_states["later"].attempts == 0
    assert state.data.items == {}


def test_run_if_is_asked_after_the_wait_with_the_data_of_that_moment(vengine: WorkflowEngine, tmp_path: Path) -> None:
    """`waits` becomes ready at once but waits an hour (virtual); `sets` changes n meanwhile."""
    wf = WorkflowDefinition("late", data_type=Data)
    wf.add_step(StepDefinition("sets", "sets", lambda ctx: setattr(ctx.data, "n", 5)))
    wf.add_step(StepDefinition("waits", "waits", mark("waits")).with_delay(3600).run_if(lambda ctx: ctx.data.n == 5))
    wf.add_step(StepDefinition("skips", "skips", mark("skips")).with_delay(3600).run_if(lambda ctx: ctx.data.n == 0))
    vengine.register_workflow(wf)
    iid = vengine.start_workflow("late", Data())
    vengine.wait_for_completion(iid, timeout=30)
    state = vengine.get_status(iid)
    assert state.step_states["waits"].status is StepStatus.SUCCEEDED
    assert state.step_states["skips"].status is StepStatus.SKIPPED
    assert state.data.items == {"waits": "waits"}
