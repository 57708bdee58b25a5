"""Readiness: the truth table of ``wfaas.readiness`` checked directly, then end to end with real workers.

Ordering across processes is proven with data (what a step's snapshot held when
it started), marker files the steps write, and files the test creates once it
has seen a state; the test itself never sleeps to synchronise.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from wfaas import (
    StepDefinition,
    StepFailed,
    StepResult,
    StepStatus,
    WorkflowDefinition,
    WorkflowEngine,
    WorkflowStatus,
)
from wfaas.readiness import TRUTH_TABLE, Counts, Decision, Gate, Outcome, decide

from conftest import Data, wait_for, wait_until

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


def after_file(path: str, body: Any) -> Any:
    def step(ctx: Any) -> Any:
        wait_for(path)
        return body(ctx)

    return step


def status_of(engine: WorkflowEngine, iid: str, step: str) -> StepStatus:
    return engine.get_status(iid).step_states[step].status


# -- depends_on ---------------------------------------------------------------------------------------


def test_a_dependency_named_twice_is_waited_for_once(engine: WorkflowEngine) -> None:
    wf = WorkflowDefinition("twice", data_type=Data)
    wf.add_step(StepDefinition("a", "a", mark("a")))
    wf.add_step(StepDefinition("b", "b", seen_keys).depends_on(["a", "a"]).depends_on_any(["a"]))
    engine.register_workflow(wf)
    iid = engine.start_workflow("twice", Data())
    engine.wait_for_completion(iid, timeout=30)
    assert engine.get_status(iid).data.value == ["a"]


# -- depends_on_any -------------------------------------------------------------------------------------


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


# -- skipping -------------------------------------------------------------------------------------------


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
