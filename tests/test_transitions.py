"""The transition tables (states.py) and the code agree: every move in them is made, none is made around them.

A raising ``run_if`` is a failed attempt like any other: ``StepFailed``
event, an attempt record, ``on_failure`` called (issue 14).
"""

from __future__ import annotations

import ast
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import wfaas.scheduler
from wfaas import (
    Backoff,
    FailureAction,
    InvalidStateTransition,
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
from wfaas.states import STEP_TRANSITIONS, WORKFLOW_TRANSITIONS, check_step_transition
from wfaas.store import Checkpoint

from conftest import Data, collect, wait_for, wait_until

S, W = StepStatus, WorkflowStatus
ROOT = Path(wfaas.scheduler.__file__).parent


def raises(ctx: Any) -> bool:
    raise KeyError("no_such_flag")


class Hooked(StepExecutor[Data]):
    def __init__(self, marks: str) -> None:
        self.marks = marks

    def execute(self, ctx: Any) -> None:
        with open(self.marks, "a") as f:
            f.write("execute\n")

    def on_failure(self, ctx: Any, error: BaseException) -> None:
        with open(self.marks, "a") as f:
            f.write(f"on_failure:{type(error).__name__}:{ctx.attempt}\n")


@pytest.mark.parametrize("delay", [0.0, 5.0], ids=["pending", "after-a-delay"])
def test_a_raising_run_if_is_a_failed_attempt(vengine: WorkflowEngine, tmp_path: Path, delay: float) -> None:
    marks = tmp_path / "marks"
    seen = collect(vengine)
    step = StepDefinition("s", "s", Hooked(str(marks))).run_if(raises).with_retry(RetryPolicy(max_attempts=3))
    if delay:
        step = step.with_delay(delay)
    vengine.register_workflow(WorkflowDefinition("ri", data_type=Data).add_step(step))
    iid = vengine.start_workflow("ri", Data())
    with pytest.raises(StepFailed, match="run_if raised KeyError") as caught:
        vengine.wait_for_completion(iid, timeout=30)
    assert isinstance(caught.value.__cause__, KeyError)
    vengine.event_bus.flush()
    failed = [e for e in seen if isinstance(e, events.StepFailed)]
    assert [(e.step_id, e.attempt, e.will_retry) for e in failed] == [("s", 1, False)]  # never retried
    assert not any(isinstance(e, events.StepStarted) for e in seen)  # the body never ran
    state = vengine.get_status(iid)
    s = state.step_states["s"]
    assert (state.status, s.status, s.attempts) == (W.FAILED, S.FAILED, 1)
    assert [(a.number, a.outcome) for a in s.history] == [(1, "failed")]
    assert "run_if raised KeyError" in (s.history[0].error or "")
    assert marks.read_text().split() == ["on_failure:StepFailed:1"]  # the hook ran, the body did not


class Recorder:
    """Every transition the scheduler checks, as (kind, from, to)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seen: set[tuple[str, Any, Any]] = set()
        step_check, run_check = wfaas.scheduler.check_step_transition, wfaas.scheduler.check_workflow_transition

        def on_step(iid: str, sid: str, current: S, new: S) -> None:
            step_check(iid, sid, current, new)
            self.seen.add(("step", current, new))

        def on_run(iid: str, current: W, new: W) -> None:
            run_check(iid, current, new)
            self.seen.add(("run", current, new))

        monkeypatch.setattr(wfaas.scheduler, "check_step_transition", on_step)
        monkeypatch.setattr(wfaas.scheduler, "check_workflow_transition", on_run)


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    yield Recorder(monkeypatch)


def skip_me(ctx: Any) -> StepResult:
    return StepResult.SKIP


def fail_once(ctx: Any) -> None:
    if ctx.attempt == 1:
        raise RuntimeError("first attempt fails")


def boom(ctx: Any) -> None:
    raise RuntimeError("always fails")


def noop(ctx: Any) -> None:
    pass


def never(ctx: Any) -> bool:
    return False


def test_every_transition_in_the_tables_is_made(vengine: WorkflowEngine, tmp_path: Path, recorder: Recorder) -> None:
    go = tmp_path / "go"

    def block(ctx: Any) -> None:
        (tmp_path / f"{ctx.step_id}.started").touch()
        wait_for(go)

    eng = vengine
    go_on = FailureAction.CONTINUE_NEXT_STEP  # so that every step of the first run gets its turn
    wf = WorkflowDefinition("all", data_type=Data)
    wf.add_step(StepDefinition("ok", "ok", noop))  # PENDING->RUNNING->SUCCEEDED
    wf.add_step(StepDefinition("skip_if", "s", noop).run_if(never))  # PENDING->SKIPPED
    wf.add_step(StepDefinition("skip_ret", "s", skip_me))  # RUNNING->SKIPPED
    wf.add_step(StepDefinition("late_skip", "s", noop).with_delay(1).run_if(never))  # PENDING->WAITING->SKIPPED
    wf.add_step(StepDefinition("late", "s", noop).with_delay(1))  # WAITING->RUNNING
    wf.add_step(StepDefinition("raise_if", "s", noop).run_if(raises).with_failure_action(go_on))  # PENDING->FAILED
    wf.add_step(StepDefinition("late_raise", "s", noop).with_delay(1).run_if(raises).with_failure_action(go_on))
    wf.add_step(StepDefinition("retry", "s", fail_once).with_retry(RetryPolicy(2, Backoff.fixed(1))))  # ->WAITING
    eng.register_workflow(wf)
    iid = eng.start_workflow("all", Data())
    eng.wait_for_completion(iid, timeout=60)  # RUNNING->COMPLETED (run)
    # SUCCEEDED/SKIPPED/FAILED->PENDING (rerun), COMPLETED->RUNNING (run)
    eng.resume(iid, rerun=["ok", "skip_if", "raise_if"])
    eng.wait_for_completion(iid, timeout=60)

    # RUNNING->FAILED (step and run), then FAILED->RUNNING (run) on resume
    wf3 = WorkflowDefinition("bad", data_type=Data).add_step(StepDefinition("b", "b", boom))
    eng.register_workflow(wf3)
    iid3 = eng.start_workflow("bad", Data())
    with pytest.raises(StepFailed):
        eng.wait_for_completion(iid3, timeout=30)
    eng.resume(iid3)
    with pytest.raises(StepFailed):
        eng.wait_for_completion(iid3, timeout=30)

    # Cancel: RUNNING->CANCELLED (step and run), WAITING->PENDING (parked); then CANCELLED->PENDING/RUNNING.
    # While "hold" runs the virtual clock does not jump, so "delayed" is still WAITING.
    wf4 = WorkflowDefinition("cancel", data_type=Data)
    wf4.add_step(StepDefinition("hold", "h", block))
    wf4.add_step(StepDefinition("delayed", "d", noop).with_delay(3600))
    eng.register_workflow(wf4)
    iid4 = eng.start_workflow("cancel", Data())
    wait_until((tmp_path / "hold.started").exists, 30, "the blocking step to start")
    wait_until(lambda: eng.get_status(iid4).step_states["hold"].status is S.RUNNING, 30, "RUNNING committed")
    interrupted = copy.deepcopy(eng.store.read(iid4))  # as a kill -9 would have left it
    eng.cancel_workflow(iid4)
    go.touch()
    eng.resume(iid4)
    eng.wait_for_completion(iid4, timeout=60)

    # An interrupted run (its process died): RUNNING->RUNNING (run), RUNNING->PENDING (step).
    assert interrupted is not None
    eng.store.write(
        [Checkpoint(iid4, interrupted.meta, interrupted.steps, interrupted.fields, interrupted.extra, replace=True)]
    )
    eng.resume(iid4)
    eng.wait_for_completion(iid4, timeout=60)

    table = {("step", a, b) for a, bs in STEP_TRANSITIONS.items() for b in bs}
    table |= {("run", a, b) for a, bs in WORKFLOW_TRANSITIONS.items() for b in bs}
    assert recorder.seen <= table
    never_made = sorted(f"{k}: {a.name}->{b.name}" for k, a, b in table - recorder.seen)
    assert not never_made, f"the tables allow moves no path makes: {never_made}"


def _status_writes() -> Iterator[tuple[str, str, ast.FunctionDef]]:
    for name in ("scheduler.py", "engine.py"):
        tree = ast.parse((ROOT / name).read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef):
                continue
            for node in ast.walk(fn):
                targets = node.targets if isinstance(node, ast.Assign) else []
                for t in targets:
                    for leaf in t.elts if isinstance(t, ast.Tuple) else [t]:
                        # run.status / step.status; a Finished record copies a status already set
                        if (
                            isinstance(leaf, ast.Attribute)
                            and leaf.attr == "status"
                            and isinstance(leaf.value, ast.Name)
                            and leaf.value.id != "finished"
                        ):
                            yield name, fn.name, fn


# Functions that set a status without a transition: they load one from a record into a new object.
LOADERS = {("engine.py", "resume"), ("scheduler.py", "_restore")}  # _restore: start_run's loading of records


def test_no_status_is_set_around_the_transition_check() -> None:
    """Every assignment to ``.status`` is in a function that calls a check_*_transition, or only loads a record."""
    writers = set()
    for module, name, fn in _status_writes():
        writers.add((module, name))
        calls = {
            n.func.id if isinstance(n.func, ast.Name) else getattr(n.func, "attr", "")
            for n in ast.walk(fn)
            if isinstance(n, ast.Call)
        }
        checked = calls & {"check_step_transition", "check_workflow_transition"}
        assert checked or (module, name) in LOADERS, f"{module}:{name} sets a status without checking the transition"
    assert writers >= {("scheduler.py", "_set_status")}


def test_loaders_pass_the_loaded_status_through_the_check(recorder: Recorder) -> None:
    """A resumed step starts from its recorded status, and is moved to PENDING through the table."""
    with WorkflowEngine(max_workers=1) as eng:
        eng.register_workflow(WorkflowDefinition("r", data_type=Data).add_step(StepDefinition("b", "b", boom)))
        iid = eng.start_workflow("r", Data())
        with pytest.raises(StepFailed):
            eng.wait_for_completion(iid, timeout=30)
        recorder.seen.clear()
        eng.resume(iid)
        with pytest.raises(StepFailed):
            eng.wait_for_completion(iid, timeout=30)
    assert ("step", S.FAILED, S.PENDING) in recorder.seen
    assert ("run", W.FAILED, W.RUNNING) in recorder.seen


def test_a_refused_transition_names_both_states() -> None:
    with pytest.raises(InvalidStateTransition, match="SUCCEEDED to RUNNING"):
        check_step_transition("iid", "s", StepStatus.SUCCEEDED, StepStatus.RUNNING)
