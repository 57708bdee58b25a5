"""Definitions: chainable builders, validation that lists every problem, backoff math, explain()."""

from __future__ import annotations

import random
import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from wfaas import (
    Backoff,
    Exponential,
    FailureAction,
    Fixed,
    InvalidDefinition,
    Linear,
    RetryPolicy,
    StepDefinition,
    StepExecutor,
    WorkflowDefinition,
    WorkflowEngine,
)

from conftest import Data


def noop(ctx: Any) -> None:
    pass


def other(ctx: Any) -> None:
    pass


# -- builders chain and store what they were given ------------------------------------------------


def test_step_builders_chain_and_store_values() -> None:
    def cond(ctx: Any) -> bool:
        return True

    when = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
    policy = RetryPolicy(max_attempts=4, backoff=Backoff.fixed(2))
    step = StepDefinition("s", "Step S", noop)
    chained = (
        step.depends_on(["a", "b"])
        .depends_on_any(["c", "d"])
        .with_retry(policy)
        .with_timeout(60)
        .with_failure_action(FailureAction.CONTINUE_NEXT_STEP)
        .run_if(cond)
        .with_delay(timedelta(minutes=2))
        .scheduled_at(when)
    )
    assert chained is step
    assert (step.id, step.name, step.body) == ("s", "Step S", noop)
    assert step.dependencies == ["a", "b"]
    assert step.any_dependencies == ["c", "d"]
    assert step.retry is policy
    assert step.timeout == 60.0
    assert step.failure_action is FailureAction.CONTINUE_NEXT_STEP
    assert step.condition is cond
    assert step.delay == 120.0
    assert step.schedule == when


def test_step_defaults_are_no_retry_no_timeout_fail_workflow() -> None:
    step = StepDefinition("s", "S", noop)
    assert step.dependencies == [] and step.any_dependencies == []
    assert step.retry is None
    assert step.timeout is None
    assert step.failure_action is FailureAction.FAIL_WORKFLOW
    assert step.condition is None
    assert step.delay == 0
    assert step.schedule is None
    assert RetryPolicy().max_attempts == 1


def test_timeouts_and_delays_take_timedelta_or_seconds() -> None:
    assert StepDefinition("s", "S", noop).with_timeout(timedelta(milliseconds=1500)).timeout == 1.5
    assert StepDefinition("s", "S", noop).with_timeout(0.25).timeout == 0.25
    assert StepDefinition("s", "S", noop).with_delay(3).delay == 3.0


def test_workflow_builders_chain_and_store_values() -> None:
    policy = RetryPolicy(max_attempts=3)
    a = StepDefinition("a", "A", noop)
    b = StepDefinition("b", "B", noop).depends_on(["a"])
    wf = WorkflowDefinition("wf", "My Workflow", data_type=Data)
    assert (wf.id, wf.name, wf.data_type, wf.steps) == ("wf", "My Workflow", Data, [])
    chained = wf.add_step(a).add_step(b).with_default_retry(policy).with_default_timeout(timedelta(seconds=30))
    assert chained is wf
    assert wf.steps == [a, b]
    assert wf.default_retry is policy
    assert wf.default_timeout == 30.0


def test_workflow_data_type_defaults_to_none() -> None:
    wf = WorkflowDefinition("wf", "W")
    assert wf.data_type is None


def test_scheduled_at_rejects_a_naive_datetime() -> None:
    step = StepDefinition("s", "S", noop)
    with pytest.raises(ValueError, match="aware"):
        step.scheduled_at(datetime(2031, 1, 1, 12, 0))  # naive on purpose
    assert step.schedule is None
    aware = datetime(2031, 1, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    assert step.scheduled_at(aware).schedule == aware


def test_negative_durations_are_refused() -> None:
    with pytest.raises(ValueError):
        StepDefinition("s", "S", noop).with_timeout(-1)
    with pytest.raises(ValueError):
        StepDefinition("s", "S", noop).with_delay(timedelta(seconds=-5))


# -- retry policy and backoff ---------------------------------------------------------------------


@pytest.mark.parametrize("attempts", [0, -1])
def test_retry_policy_needs_at_least_one_attempt(attempts: int) -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=attempts)


def test_fixed_backoff_is_constant() -> None:
    backoff = Backoff.fixed(1.5)
    assert [backoff.delay(n) for n in range(1, 8)] == [1.5] * 7
    assert Backoff.fixed(timedelta(seconds=3)).delay(4) == 3.0


def test_exponential_backoff_doubles_and_is_capped() -> None:
    backoff = Backoff.exponential(base=1, max=30)
    assert [backoff.delay(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 30, 30, 30]
    small = Backoff.exponential(base=0.1, max=0.5)
    assert small.delay(1) == pytest.approx(0.1)
    assert small.delay(2) == pytest.approx(0.2)
    assert small.delay(3) == pytest.approx(0.4)
    assert small.delay(4) == pytest.approx(0.5)
    # very late attempts stay at the cap (no overflow)
    assert backoff.delay(10_000) == 30


def test_linear_backoff_grows_by_its_increment_and_is_capped() -> None:
    backoff = Backoff.linear(increment=2, max=7)
    assert [backoff.delay(n) for n in range(1, 7)] == [2, 4, 6, 7, 7, 7]


def test_seed_spellings_are_aliases() -> None:
    assert Fixed(2) == Backoff.fixed(2)
    assert Exponential(1, 10) == Backoff.exponential(1, 10)
    assert Linear(1, 10) == Backoff.linear(1, 10)


@pytest.mark.parametrize(
    "backoff",
    [
        Backoff.fixed(10, jitter=0.2),
        Backoff.exponential(base=1, max=30, jitter=0.2),
        Backoff.linear(increment=3, max=20, jitter=0.5),
    ],
    ids=["fixed", "exponential", "linear"],
)
def test_jitter_stays_within_its_fraction_and_never_exceeds_max(backoff: Backoff) -> None:
    plain = Backoff(backoff.kind, backoff.base, backoff.max, 0.0)
    rng = random.Random(1234)
    spread_seen = set()
    for n in range(1, 12):
        nominal = plain.delay(n)
        for _ in range(200):
            value = backoff.delay(n, rng)
            assert nominal * (1 - backoff.jitter) - 1e-9 <= value <= nominal * (1 + backoff.jitter) + 1e-9, (n, value)
            assert value <= backoff.max + 1e-9, (n, value)
            assert value >= 0
            spread_seen.add(round(value, 6))
    assert len(spread_seen) > 50  # jitter really varies the waits


def test_jitter_is_reproducible_with_a_seeded_random() -> None:
    backoff = Backoff.exponential(base=1, max=60, jitter=0.3)
    first = [backoff.delay(n, random.Random(7)) for n in range(1, 6)]
    again = [backoff.delay(n, random.Random(7)) for n in range(1, 6)]
    assert first == again


@pytest.mark.parametrize("jitter", [-0.1, 1.5])
def test_jitter_must_be_a_fraction(jitter: float) -> None:
    with pytest.raises(ValueError, match="jitter"):
        Backoff.exponential(1, 10, jitter=jitter)


# -- validation at register_workflow --------------------------------------------------------------


def invalid(engine: WorkflowEngine, wf: WorkflowDefinition) -> InvalidDefinition:
    with pytest.raises(InvalidDefinition) as info:
        engine.register_workflow(wf)
    return info.value


def test_every_problem_is_reported_at_once(engine: WorkflowEngine) -> None:
    wf = WorkflowDefinition("broken", data_type=Data)
    wf.add_step(StepDefinition("a", "A", noop))
    wf.add_step(StepDefinition("a", "A again", noop))  # duplicate id
    wf.add_step(StepDefinition("b", "B", noop).depends_on(["ghost"]))  # unknown dependency
    wf.add_step(StepDefinition("c", "C", noop).depends_on(["d"]))  # c -> d -> e -> c
    wf.add_step(StepDefinition("d", "D", noop).depends_on(["e"]))
    wf.add_step(StepDefinition("e", "E", noop).depends_on_any(["c"]))
    wf.add_step(StepDefinition("f", "F", "not a function"))  # not callable
    err = invalid(engine, wf)
    text = str(err)
    assert "'broken'" in text
    assert "duplicate step id 'a'" in text
    assert "'ghost'" in text and "unknown" in text
    assert "'b'" in text
    assert "cycle" in text
    cycle_line = next(line for line in text.splitlines() if "cycle" in line)
    for sid in ("c", "d", "e"):
        assert sid in cycle_line
    assert "'f'" in text and "callable" in text
    assert len(err.problems) == 4
    assert err.workflow_id == "broken"
    # nothing was registered
    with pytest.raises(Exception, match="not registered"):
        engine.start_workflow("broken", Data())


def test_unknown_dependency_of_depends_on_any_is_reported(engine: WorkflowEngine) -> None:
    wf = WorkflowDefinition("w", data_type=Data)
    wf.add_step(StepDefinition("a", "A", noop).depends_on_any(["nope1"]).depends_on(["nope2"]))
    err = invalid(engine, wf)
    assert "'nope1'" in str(err) and "'nope2'" in str(err)
    assert len(err.problems) == 2


def test_self_dependency_is_reported(engine: WorkflowEngine) -> None:
    wf = WorkflowDefinition("w", data_type=Data).add_step(StepDefinition("a", "A", noop).depends_on(["a"]))
    err = invalid(engine, wf)
    assert "'a'" in str(err) and "itself" in str(err)


def test_two_separate_cycles_are_both_named(engine: WorkflowEngine) -> None:
    wf = WorkflowDefinition("w", data_type=Data)
    wf.add_step(StepDefinition("x1", "x1", noop).depends_on(["x2"]))
    wf.add_step(StepDefinition("x2", "x2", noop).depends_on(["x1"]))
    wf.add_step(StepDefinition("y1", "y1", noop).depends_on(["y2"]))
    wf.add_step(StepDefinition("y2", "y2", noop).depends_on(["y1"]))
    wf.add_step(StepDefinition("ok", "ok", noop))
    err = invalid(engine, wf)
    cycles = [p for p in err.problems if "cycle" in p]
    assert len(cycles) == 2
    assert any("x1" in c and "x2" in c for c in cycles)
    assert any("y1" in c and "y2" in c for c in cycles)
    assert not any("ok" in c for c in cycles)


def test_empty_workflow_is_invalid(engine: WorkflowEngine) -> None:
    err = invalid(engine, WorkflowDefinition("empty", data_type=Data))
    assert "'empty'" in str(err)
    assert "no steps" in str(err)


def test_non_callable_body_is_invalid(engine: WorkflowEngine) -> None:
    wf = WorkflowDefinition("w", data_type=Data).add_step(StepDefinition("x", "X", 42))
    err = invalid(engine, wf)
    assert "'x'" in str(err) and "callable" in str(err) and "int" in str(err)


def test_ids_must_be_non_empty_strings_and_steps_step_definitions(engine: WorkflowEngine) -> None:
    wf = WorkflowDefinition("", data_type=Data).add_step(StepDefinition("", "blank", noop))
    wf.add_step("not a step")  # type: ignore[arg-type]
    err = invalid(engine, wf)
    assert len(err.problems) == 3
    assert "workflow id" in str(err) and "step id" in str(err) and "StepDefinition" in str(err)


class Doubles(StepExecutor[Data]):
    def execute(self, ctx: Any) -> None:
        ctx.data.n *= 2


def test_an_executor_class_instead_of_an_instance_is_caught_or_works(engine: WorkflowEngine) -> None:
    # API.md: "a StepExecutor subclass" is a valid body. Passing the class (a common slip for
    # Doubles()) must either be refused at registration, naming the step, or run as the executor.
    wf = WorkflowDefinition("cls", data_type=Data).add_step(StepDefinition("double", "Double", Doubles))
    try:
        engine.register_workflow(wf)
    except InvalidDefinition as exc:
        assert "'double'" in str(exc) and "Doubles" in str(exc)
        return
    iid = engine.start_workflow("cls", Data(n=21))
    engine.wait_for_completion(iid, timeout=30)
    assert engine.get_status(iid).data.n == 42


def test_re_registered_id_is_invalid_and_listed_with_other_problems(engine: WorkflowEngine) -> None:
    engine.register_workflow(WorkflowDefinition("dup", data_type=Data).add_step(StepDefinition("a", "A", noop)))
    # the same id again, valid in itself
    err = invalid(engine, WorkflowDefinition("dup", data_type=Data).add_step(StepDefinition("a", "A", noop)))
    assert "'dup'" in str(err) and "already registered" in str(err)
    # and together with another problem: both at once
    again = WorkflowDefinition("dup", data_type=Data).add_step(StepDefinition("a", "A", noop).depends_on(["zz"]))
    err = invalid(engine, again)
    assert "already registered" in str(err) and "'zz'" in str(err)
    assert len(err.problems) == 2
    # the first registration still runs
    iid = engine.start_workflow("dup", Data())
    assert engine.wait_for_completion(iid, "dup", timeout=30) == "dup completed successfully via workflow"


def test_a_body_that_cannot_be_sent_to_a_worker_is_invalid_and_named(engine: WorkflowEngine) -> None:
    conn = sqlite3.connect(":memory:")

    def uses_conn(ctx: Any) -> None:
        conn.execute("select 1")

    wf = WorkflowDefinition("unsendable", data_type=Data)
    wf.add_step(StepDefinition("fine", "Fine", noop))
    wf.add_step(StepDefinition("query", "Query", uses_conn).depends_on(["fine"]))
    try:
        err = invalid(engine, wf)
    finally:
        conn.close()
    assert "'unsendable'" in str(err)
    assert "Connection" in str(err)
    assert "'query'" in str(err), "the message must say which step's body cannot be sent"


def test_a_valid_definition_validates_clean() -> None:
    wf = WorkflowDefinition("ok", data_type=Data)
    wf.add_step(StepDefinition("a", "A", noop))
    wf.add_step(StepDefinition("b", "B", other).depends_on(["a"]))
    wf.add_step(StepDefinition("c", "C", noop).depends_on_any(["a", "b"]))
    assert wf.validate() == []


# -- explain ---------------------------------------------------------------------------------------


def test_explain_mentions_every_step_in_dependency_order() -> None:
    wf = WorkflowDefinition("shown", "Shown Workflow", data_type=Data)
    # added out of order on purpose
    wf.add_step(StepDefinition("combine", "Combine", noop).depends_on(["left", "right"]))
    wf.add_step(StepDefinition("left", "Left", noop).depends_on(["fetch"]).with_retry(RetryPolicy(max_attempts=3)))
    wf.add_step(StepDefinition("right", "Right", noop).depends_on(["fetch"]).run_if(lambda ctx: True))
    wf.add_step(StepDefinition("fetch", "Fetch", noop).with_timeout(5))
    wf.add_step(StepDefinition("either", "Either", noop).depends_on_any(["left", "right"]).with_delay(7))
    text = wf.explain()
    assert "shown" in text
    for sid in ("fetch", "left", "right", "combine", "either"):
        assert sid in text
    lines = text.splitlines()

    def line_of(sid: str) -> int:
        return next(i for i, line in enumerate(lines) if line.strip().startswith(sid))

    assert line_of("fetch") < line_of("left") < line_of("combine")
    assert line_of("fetch") < line_of("right") < line_of("combine")
    assert "left" in lines[line_of("combine")] and "right" in lines[line_of("combine")]
    assert "any" in lines[line_of("either")]


def test_explain_of_an_invalid_definition_lists_its_problems() -> None:
    wf = WorkflowDefinition("bad", data_type=Data).add_step(StepDefinition("a", "A", noop).depends_on(["nope"]))
    text = wf.explain()
    assert "bad" in text and "'nope'" in text
