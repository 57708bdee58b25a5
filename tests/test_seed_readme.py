"""Every example of the seed README (wfaas 1.0.3, Rust), ported to Python and run with real workers.

Each test names the README section it ports. Where the port deliberately
differs (API.md section 10), the test checks the port's behaviour.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from wfaas import (
    Backoff,
    Cancelled,
    ContextValueNotFound,
    DefinitionNotFound,
    Exponential,
    FailureAction,
    Fixed,
    FunctionStep,
    InMemoryStore,
    InvalidStateTransition,
    Linear,
    LoggingSubscriber,
    NotFound,
    RetryPolicy,
    ShuttingDown,
    StateStore,
    StepDefinition,
    StepExecutor,
    StepFailed,
    StepResult,
    StepStatus,
    TypeMismatch,
    WorkflowContext,
    WorkflowData,
    WorkflowDefinition,
    WorkflowEngine,
    WorkflowError,
    WorkflowStatus,
    events,
    transient,
)
from wfaas.store import Checkpoint, Record
from wfaas.testing import VirtualClock

from conftest import Data, alive, descendants, wait_for, wait_for_text, wait_until, write_atomic


def retrying_events(engine: WorkflowEngine) -> list[events.StepRetrying]:
    got: list[events.StepRetrying] = []
    engine.event_bus.subscribe(lambda e: got.append(e) if isinstance(e, events.StepRetrying) else None)
    return got


# -- Quick Start ----------------------------------------------------------------------------------


@dataclass
class MyWorkflowData(WorkflowData):
    workflow_type = "my_workflow"
    input: str = ""
    result: str | None = None


class ProcessStep(StepExecutor[MyWorkflowData]):
    def execute(self, ctx: WorkflowContext[MyWorkflowData]) -> StepResult:
        ctx.data.result = f"Processed: {ctx.data.input}"
        return StepResult.SUCCESS


def test_quick_start() -> None:
    # 3. Create the engine and register a workflow
    with WorkflowEngine() as engine:
        workflow = WorkflowDefinition("process_workflow", "Process Workflow").add_step(
            StepDefinition("process", "Process Input", ProcessStep())
        )
        engine.register_workflow(workflow)
        # 4. Start workflow instances
        instance_id = engine.start_workflow("process_workflow", MyWorkflowData(input="Hello, World!", result=None))
        # 5. Wait for completion
        msg = engine.wait_for_completion(instance_id, "example", timeout=timedelta(seconds=30))
        assert msg == "example completed successfully via workflow"
        assert engine.get_status(instance_id).data.result == "Processed: Hello, World!"
    assert MyWorkflowData.workflow_type == "my_workflow"
    assert descendants() == []


def test_quick_start_api_md_version(engine: WorkflowEngine) -> None:
    def process(ctx: WorkflowContext[MyWorkflowData]) -> StepResult:
        ctx.data.result = f"Processed: {ctx.data.input}"
        return StepResult.SUCCESS

    workflow = WorkflowDefinition("process_workflow", "Process Workflow", data_type=MyWorkflowData).add_step(
        StepDefinition("process", "Process Input", process)
    )
    engine.register_workflow(workflow)
    iid = engine.start_workflow("process_workflow", MyWorkflowData(input="Hello, World!"))
    assert engine.wait_for_completion(iid, "example", timeout=30) == "example completed successfully via workflow"
    assert engine.get_status(iid).data.result == "Processed: Hello, World!"


# -- WorkflowData: non-serializable fields ------------------------------------------------------------


class AppContext:
    """Something that cannot travel between processes: holds a lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pid = os.getpid()


@dataclass
class ConfigData(WorkflowData):
    config: dict[str, Any] = field(default_factory=dict)
    result: str | None = None
    app_context: AppContext | None = transient()

    def restore(self) -> None:
        self.app_context = AppContext()


def test_non_serializable_fields_are_skipped_and_reinitialized(engine: WorkflowEngine) -> None:
    def use(ctx: WorkflowContext[ConfigData]) -> None:
        assert ctx.data.app_context is not None, "restore() did not run in the worker"
        ctx.data.result = f"{ctx.data.config['name']} in {ctx.data.app_context.pid}"

    engine.register_workflow(WorkflowDefinition("cfg", data_type=ConfigData).add_step(StepDefinition("u", "u", use)))
    data = ConfigData(config={"name": "job"})
    data.app_context = AppContext()  # a lock: it would not pickle
    iid = engine.start_workflow("cfg", data)
    engine.wait_for_completion(iid, timeout=30)
    result = engine.get_status(iid).data.result
    assert result is not None and result.startswith("job in ")
    assert int(result.split()[-1]) != os.getpid()  # re-created in the worker


# -- StepExecutor ----------------------------------------------------------------------------------


class PermanentError(Exception):
    pass


class CarefulStep(StepExecutor[Data]):
    """The trait with its optional parts: is_retryable, on_success, on_failure."""

    def __init__(self, marks: Path) -> None:
        self.marks = marks

    def execute(self, ctx: WorkflowContext[Data]) -> StepResult:
        with open(self.marks, "a") as f:
            f.write(f"execute {ctx.attempt}\n")
        if ctx.data.value == "permanent":
            raise PermanentError("do not retry me")
        if ctx.attempt < 2:
            raise RuntimeError("transient trouble")
        return StepResult.SUCCESS

    def is_retryable(self, error: BaseException) -> bool:
        return not isinstance(error, PermanentError)

    def on_success(self, ctx: WorkflowContext[Data]) -> None:
        with open(self.marks, "a") as f:
            f.write("on_success\n")

    def on_failure(self, ctx: WorkflowContext[Data], error: BaseException) -> None:
        with open(self.marks, "a") as f:
            # As in the seed, the hook gets the WorkflowError that ended the step;
            # the step's own exception is its __cause__ (API.md section 9).
            f.write(f"on_failure {type(error).__name__} {type(error.__cause__).__name__}\n")


def test_step_executor_trait(engine: WorkflowEngine, tmp_path: Path) -> None:
    ok_marks, bad_marks = tmp_path / "ok", tmp_path / "bad"
    policy = RetryPolicy(max_attempts=5)
    engine.register_workflow(
        WorkflowDefinition("ok", data_type=Data).add_step(
            StepDefinition("s", "s", CarefulStep(ok_marks)).with_retry(policy)
        )
    )
    engine.register_workflow(
        WorkflowDefinition("bad", data_type=Data).add_step(
            StepDefinition("s", "s", CarefulStep(bad_marks)).with_retry(policy)
        )
    )
    ok = engine.start_workflow("ok", Data())
    engine.wait_for_completion(ok, timeout=30)
    assert ok_marks.read_text().splitlines() == ["execute 1", "execute 2", "on_success"]
    bad = engine.start_workflow("bad", Data(value="permanent"))
    with pytest.raises(StepFailed, match="do not retry me"):
        engine.wait_for_completion(bad, timeout=30)
    wait_until(lambda: "on_failure" in bad_marks.read_text(), 10, "on_failure")
    assert bad_marks.read_text().splitlines() == ["execute 1", "on_failure StepFailed PermanentError"]
    assert engine.get_status(bad).step_states["s"].attempts == 1


# -- FunctionStep ------------------------------------------------------------------------------------


def test_function_step(engine: WorkflowEngine) -> None:
    def done(ctx: WorkflowContext[MyWorkflowData]) -> StepResult:
        ctx.data.result = "done"
        return StepResult.SUCCESS

    step = FunctionStep(done)
    lam = FunctionStep(lambda ctx: setattr(ctx.data, "input", "lambda ran"))
    wf = WorkflowDefinition("fs", data_type=MyWorkflowData)
    wf.add_step(StepDefinition("f", "f", step))
    wf.add_step(StepDefinition("l", "l", lam).depends_on(["f"]))
    engine.register_workflow(wf)
    iid = engine.start_workflow("fs", MyWorkflowData())
    engine.wait_for_completion(iid, timeout=30)
    assert engine.get_status(iid).data == MyWorkflowData(input="lambda ran", result="done")
    with pytest.raises(TypeError):
        FunctionStep("not callable")  # type: ignore[arg-type]


# -- Step Results --------------------------------------------------------------------------------------


def test_step_results(engine: WorkflowEngine) -> None:
    results = {"ok": StepResult.SUCCESS, "none": None, "skip": StepResult.SKIP}

    def returns(ctx: Any) -> StepResult | None:
        return results[ctx.step_id]

    def failure(ctx: Any) -> StepResult:
        return StepResult.FAILURE if ctx.attempt == 1 else StepResult.SUCCESS  # FAILURE may trigger a retry

    wf = WorkflowDefinition("results", data_type=Data)
    for sid in results:
        wf.add_step(StepDefinition(sid, sid, returns))
    wf.add_step(StepDefinition("fail", "fail", failure).with_retry(RetryPolicy(max_attempts=2)))
    engine.register_workflow(wf)
    iid = engine.start_workflow("results", Data())
    engine.wait_for_completion(iid, timeout=30)
    steps = engine.get_status(iid).step_states
    assert steps["ok"].status is StepStatus.SUCCEEDED
    assert steps["none"].status is StepStatus.SUCCEEDED
    assert steps["skip"].status is StepStatus.SKIPPED
    assert steps["fail"].status is StepStatus.SUCCEEDED and steps["fail"].attempts == 2  # the crate never retried


# -- Building DAG Workflows: dependencies ------------------------------------------------------------------


@dataclass
class FetchData(WorkflowData):
    a: int | None = None
    b: int | None = None
    combined: int | None = None


def test_dag_fan_in(engine: WorkflowEngine, tmp_path: Path) -> None:
    def fetch(name: str, value: int) -> Any:
        other = "b" if name == "a" else "a"

        def body(ctx: WorkflowContext[FetchData]) -> None:
            (tmp_path / name).touch()
            wait_for(tmp_path / other, timeout=30)  # the two fetches meet: they run in parallel
            setattr(ctx.data, name, value)

        return body

    def combine(ctx: WorkflowContext[FetchData]) -> None:
        assert ctx.data.a is not None and ctx.data.b is not None
        ctx.data.combined = ctx.data.a + ctx.data.b

    workflow = (
        WorkflowDefinition("dag_example", "DAG Example", data_type=FetchData)
        # Independent steps run in parallel
        .add_step(StepDefinition("fetch_a", "Fetch A", fetch("a", 1)))
        .add_step(StepDefinition("fetch_b", "Fetch B", fetch("b", 2)))
        # This step waits for BOTH fetch_a AND fetch_b
        .add_step(StepDefinition("combine", "Combine Results", combine).depends_on(["fetch_a", "fetch_b"]))
    )
    engine.register_workflow(workflow)
    iid = engine.start_workflow("dag_example", FetchData())
    engine.wait_for_completion(iid, timeout=60)
    state = engine.get_status(iid)
    assert state.data == FetchData(a=1, b=2, combined=3)
    steps = state.step_states
    comb = steps["combine"].started_at
    assert comb is not None
    for fetch_id in ("fetch_a", "fetch_b"):
        finished = steps[fetch_id].finished_at
        assert finished is not None and finished <= comb


def test_depends_on_and_depends_on_any(engine: WorkflowEngine, tmp_path: Path) -> None:
    """'final' runs when step_a succeeded AND (step_b OR step_c) did; here step_c is still running."""
    final_ran = tmp_path / "final_ran"

    def step_a(ctx: Any) -> None:
        ctx.data.items["a"] = True

    def step_b(ctx: Any) -> None:
        ctx.data.items["b"] = True

    def step_c(ctx: Any) -> None:
        wait_for(final_ran, timeout=30)  # finishes only after 'final' ran: any-of did not wait for it
        ctx.data.items["c"] = True

    def final(ctx: Any) -> None:
        assert ctx.data.items.get("a"), "final ran before step_a"
        assert ctx.data.items.get("b"), "final ran before any of step_b, step_c"
        ctx.data.items["final"] = sorted(ctx.data.items)
        final_ran.touch()

    wf = WorkflowDefinition("any", data_type=Data)
    wf.add_step(StepDefinition("step_a", "A", step_a))
    wf.add_step(StepDefinition("step_b", "B", step_b))
    wf.add_step(StepDefinition("step_c", "C", step_c))
    wf.add_step(
        StepDefinition("final", "Final Step", final).depends_on(["step_a"]).depends_on_any(["step_b", "step_c"])
    )
    engine.register_workflow(wf)
    iid = engine.start_workflow("any", Data())
    engine.wait_for_completion(iid, timeout=60)
    state = engine.get_status(iid)
    assert state.data.items == {"a": True, "b": True, "c": True, "final": ["a", "b"]}
    assert all(s.status is StepStatus.SUCCEEDED for s in state.step_states.values())


def test_depends_on_waits_for_all(engine: WorkflowEngine, tmp_path: Path) -> None:
    """Unlike depends_on_any, depends_on waits for every listed step, however slow."""
    go = tmp_path / "go"

    def slow(ctx: Any) -> None:
        wait_for(go, timeout=30)
        ctx.data.items["slow"] = True

    def fast(ctx: Any) -> None:
        ctx.data.items["fast"] = True
        go.touch()

    def final(ctx: Any) -> None:
        ctx.data.value = sorted(ctx.data.items)

    wf = WorkflowDefinition("all", data_type=Data)
    wf.add_step(StepDefinition("slow", "slow", slow))
    wf.add_step(StepDefinition("fast", "fast", fast))
    wf.add_step(StepDefinition("final", "final", final).depends_on(["slow", "fast"]))
    engine.register_workflow(wf)
    iid = engine.start_workflow("all", Data())
    engine.wait_for_completion(iid, timeout=60)
    assert engine.get_status(iid).data.value == ["fast", "slow"]


# -- Retry Configuration ----------------------------------------------------------------------------------


def test_per_step_retry(vengine: WorkflowEngine) -> None:
    delays = retrying_events(vengine)

    def unreliable(ctx: Any) -> None:
        if ctx.attempt < 3:
            raise ConnectionError(f"attempt {ctx.attempt} failed")
        ctx.data.value = ctx.attempt

    wf = WorkflowDefinition("retry_step", data_type=Data).add_step(
        StepDefinition("unreliable", "Unreliable Step", unreliable)
        .with_retry(RetryPolicy(max_attempts=5, backoff=Backoff.exponential(base=0.1, max=30)))
        .with_timeout(60)
    )
    vengine.register_workflow(wf)
    iid = vengine.start_workflow("retry_step", Data())
    vengine.wait_for_completion(iid, timeout=30)
    vengine.event_bus.flush()
    state = vengine.get_status(iid)
    assert state.data.value == 3
    assert state.step_states["unreliable"].attempts == 3
    assert [e.delay for e in delays] == pytest.approx([0.1, 0.2])  # doubles each retry (the crate: x1.5)


def test_per_step_retry_gives_up_after_max_attempts(vengine: WorkflowEngine) -> None:
    delays = retrying_events(vengine)

    def never(ctx: Any) -> None:
        raise ConnectionError(f"attempt {ctx.attempt} failed")

    wf = WorkflowDefinition("gives_up", data_type=Data).add_step(
        StepDefinition("unreliable", "Unreliable Step", never).with_retry(
            RetryPolicy(max_attempts=5, backoff=Backoff.exponential(base=10, max=30))
        )
    )
    vengine.register_workflow(wf)
    iid = vengine.start_workflow("gives_up", Data())
    with pytest.raises(StepFailed, match="attempt 5 failed"):
        vengine.wait_for_completion(iid, timeout=30)
    vengine.event_bus.flush()
    assert vengine.get_status(iid).step_states["unreliable"].attempts == 5
    assert [e.delay for e in delays] == pytest.approx([10, 20, 30, 30])  # capped at max


def test_backoff_strategies() -> None:
    fixed, exp, lin = Fixed(timedelta(seconds=1)), Exponential(0.1, 30), Linear(2, 5)
    assert [fixed.delay(n) for n in (1, 2, 3)] == [1, 1, 1]  # Same delay each retry
    assert [exp.delay(n) for n in (1, 2, 3, 4)] == pytest.approx([0.1, 0.2, 0.4, 0.8])  # Doubles each retry
    assert Exponential(1, 30).delay(10) == 30  # up to max
    assert [lin.delay(n) for n in (1, 2, 3, 4)] == [2, 4, 5, 5]  # Adds increment each retry up to max
    assert Backoff.fixed(1) == fixed and Backoff.exponential(0.1, 30) == exp and Backoff.linear(2, 5) == lin


# -- Failure Handling ----------------------------------------------------------------------------------------


def boom(ctx: Any) -> None:
    raise RuntimeError(f"{ctx.step_id} broke")


def test_failure_action_fail_workflow_is_the_default(engine: WorkflowEngine) -> None:
    wf = WorkflowDefinition("fw", data_type=Data)
    wf.add_step(StepDefinition("required", "required", boom))
    wf.add_step(StepDefinition("next", "next", lambda ctx: None).depends_on(["required"]))
    engine.register_workflow(wf)
    iid = engine.start_workflow("fw", Data())
    with pytest.raises(StepFailed, match="required broke"):
        engine.wait_for_completion(iid, timeout=30)
    state = engine.get_status(iid)
    assert state.status is WorkflowStatus.FAILED
    assert state.step_states["next"].status is StepStatus.PENDING


def test_failure_action_continue_next_step(engine: WorkflowEngine) -> None:
    def after(ctx: Any) -> None:
        ctx.data.value = "ran"

    wf = WorkflowDefinition("cont", data_type=Data)
    wf.add_step(StepDefinition("optional", "Optional Step", boom).with_failure_action(FailureAction.CONTINUE_NEXT_STEP))
    wf.add_step(StepDefinition("next", "next", after).depends_on(["optional"]))
    engine.register_workflow(wf)
    iid = engine.start_workflow("cont", Data())
    engine.wait_for_completion(iid, timeout=30)
    state = engine.get_status(iid)
    assert state.status is WorkflowStatus.COMPLETED
    assert state.step_states["optional"].status is StepStatus.FAILED
    error = state.step_states["optional"].error
    assert error is not None and "optional broke" in error
    assert state.data.value == "ran"


def test_failure_action_retry_indefinitely(vengine: WorkflowEngine) -> None:
    def works_on_the_seventh(ctx: Any) -> None:
        if ctx.attempt < 7:
            raise RuntimeError("until manual intervention")
        ctx.data.value = ctx.attempt

    wf = WorkflowDefinition("forever", data_type=Data).add_step(
        StepDefinition("s", "s", works_on_the_seventh)
        .with_retry(RetryPolicy(max_attempts=2, backoff=Backoff.exponential(1, 60)))
        .with_failure_action(FailureAction.RETRY_INDEFINITELY)
    )
    vengine.register_workflow(wf)
    iid = vengine.start_workflow("forever", Data())
    vengine.wait_for_completion(iid, timeout=30)
    state = vengine.get_status(iid)
    assert state.data.value == 7
    assert state.step_states["s"].attempts == 7


def test_failure_action_retry_indefinitely_is_stopped_by_cancel(engine: WorkflowEngine, tmp_path: Path) -> None:
    tries = tmp_path / "tries"

    def never(ctx: Any) -> None:
        with open(tries, "a") as f:
            f.write(".")
        raise RuntimeError("still broken")

    wf = WorkflowDefinition("forever", data_type=Data).add_step(
        StepDefinition("s", "s", never)
        .with_retry(RetryPolicy(max_attempts=1, backoff=Backoff.fixed(0.01)))
        .with_failure_action(FailureAction.RETRY_INDEFINITELY)
    )
    engine.register_workflow(wf)
    iid = engine.start_workflow("forever", Data())
    wait_until(lambda: tries.exists() and len(tries.read_text()) >= 3, 30, "three attempts")
    engine.cancel_workflow(iid)
    assert engine.get_status(iid).status is WorkflowStatus.CANCELLED
    with pytest.raises(Cancelled):
        engine.wait_for_completion(iid, timeout=5)


# -- Conditional Execution -------------------------------------------------------------------------------------


@dataclass
class CondData(WorkflowData):
    should_execute: bool = False
    ran: list[str] = field(default_factory=list)


def test_run_if(engine: WorkflowEngine) -> None:
    def mark(ctx: WorkflowContext[CondData]) -> None:
        ctx.data.ran.append(ctx.step_id)

    wf = WorkflowDefinition("cond", data_type=CondData)
    wf.add_step(StepDefinition("conditional", "Conditional Step", mark).run_if(lambda ctx: ctx.data.should_execute))
    wf.add_step(StepDefinition("dependent", "dependent", mark).depends_on(["conditional"]))
    engine.register_workflow(wf)

    skipped = engine.start_workflow("cond", CondData(should_execute=False))
    engine.wait_for_completion(skipped, timeout=30)
    state = engine.get_status(skipped)
    assert state.step_states["conditional"].status is StepStatus.SKIPPED
    assert state.step_states["conditional"].attempts == 0
    assert state.data.ran == ["dependent"]  # dependents can still proceed

    ran = engine.start_workflow("cond", CondData(should_execute=True))
    engine.wait_for_completion(ran, timeout=30)
    assert engine.get_status(ran).data.ran == ["conditional", "dependent"]


def test_run_if_sees_data_written_by_earlier_steps(engine: WorkflowEngine) -> None:
    def decide(ctx: WorkflowContext[CondData]) -> None:
        ctx.data.should_execute = True

    def mark(ctx: WorkflowContext[CondData]) -> None:
        ctx.data.ran.append(ctx.step_id)

    wf = WorkflowDefinition("cond2", data_type=CondData)
    wf.add_step(StepDefinition("decide", "decide", decide))
    wf.add_step(
        StepDefinition("conditional", "c", mark).depends_on(["decide"]).run_if(lambda ctx: ctx.data.should_execute)
    )
    engine.register_workflow(wf)
    iid = engine.start_workflow("cond2", CondData())
    engine.wait_for_completion(iid, timeout=30)
    assert engine.get_status(iid).data.ran == ["conditional"]


# -- Scheduled and Delayed Execution ---------------------------------------------------------------------------


def test_with_delay_on_the_virtual_clock(vengine: WorkflowEngine, clock: VirtualClock) -> None:
    def mark(ctx: Any) -> None:
        ctx.data.log.append(ctx.step_id)

    wf = WorkflowDefinition("delayed", data_type=Data)
    wf.add_step(StepDefinition("first", "first", mark))
    wf.add_step(StepDefinition("delayed", "Delayed Step", mark).depends_on(["first"]).with_delay(60))
    vengine.register_workflow(wf)
    iid = vengine.start_workflow("delayed", Data())
    vengine.wait_for_completion(iid, timeout=30)  # an hour of real time would time out here
    state = vengine.get_status(iid)
    assert state.data.log == ["first", "delayed"]
    first_done = state.step_states["first"].finished_at
    delayed_start = state.step_states["delayed"].started_at
    assert first_done is not None and delayed_start is not None
    assert delayed_start - first_done >= timedelta(seconds=60)  # counted from when its dependencies were met


def test_scheduled_at_on_the_virtual_clock(vengine: WorkflowEngine, clock: VirtualClock) -> None:
    def mark(ctx: Any) -> None:
        ctx.data.log.append(ctx.step_id)

    when = clock.now() + timedelta(hours=1)
    wf = WorkflowDefinition("scheduled", data_type=Data)
    wf.add_step(StepDefinition("now", "now", mark))
    wf.add_step(StepDefinition("scheduled", "Scheduled Step", mark).scheduled_at(when))
    vengine.register_workflow(wf)
    iid = vengine.start_workflow("scheduled", Data())
    vengine.wait_for_completion(iid, timeout=30)
    state = vengine.get_status(iid)
    assert sorted(state.data.log) == ["now", "scheduled"]
    started = state.step_states["scheduled"].started_at
    assert started is not None and started >= when
    now_started = state.step_states["now"].started_at
    assert now_started is not None and now_started < when
    with pytest.raises(ValueError):
        StepDefinition("naive", "naive", mark).scheduled_at(datetime(2030, 1, 1))


def test_scheduled_step_waits_without_a_manual_advance() -> None:
    """Without autojump the step waits (WAITING) until the clock is moved past its time."""
    manual = VirtualClock()

    def mark(ctx: Any) -> None:
        ctx.data.log.append(ctx.step_id)

    with WorkflowEngine(max_workers=2, clock=manual, grace_period=1.0) as engine:
        wf = WorkflowDefinition("sched", data_type=Data)
        wf.add_step(StepDefinition("later", "later", mark).scheduled_at(manual.now() + timedelta(hours=1)))
        engine.register_workflow(wf)
        iid = engine.start_workflow("sched", Data())
        wait_until(lambda: engine.get_status(iid).step_states["later"].status is StepStatus.WAITING, 10, "WAITING")
        with pytest.raises(TimeoutError):
            engine.wait_for_completion(iid, timeout=0.2)
        manual.advance(timedelta(minutes=59))
        with pytest.raises(TimeoutError):
            engine.wait_for_completion(iid, timeout=0.2)
        manual.advance(timedelta(minutes=1))
        engine.wait_for_completion(iid, timeout=30)
        assert engine.get_status(iid).data.log == ["later"]


# -- Event Observability ------------------------------------------------------------------------------------------


class MySubscriber:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def on_event(self, event: events.WorkflowEvent) -> None:
        match event:
            case events.WorkflowStarted(instance_id=instance_id):
                self.lines.append(f"Workflow {instance_id} started")
            case events.StepSucceeded(step_id=step_id, duration=duration):
                self.lines.append(f"Step {step_id} completed in {duration:.3f}s")
            case events.WorkflowFailed(instance_id=instance_id, error=error):
                self.lines.append(f"Workflow {instance_id} failed: {error}")
            case _:
                pass


def test_event_subscriber(engine: WorkflowEngine) -> None:
    sub = MySubscriber()
    engine.event_bus.subscribe(sub)
    engine.event_bus.subscribe(LoggingSubscriber())  # the built-in one
    wf = WorkflowDefinition("observed", data_type=Data)
    wf.add_step(StepDefinition("a", "a", lambda ctx: None))
    wf.add_step(StepDefinition("b", "b", boom).depends_on(["a"]))
    engine.register_workflow(wf)
    iid = engine.start_workflow("observed", Data())
    with pytest.raises(StepFailed):
        engine.wait_for_completion(iid, timeout=30)
    assert engine.event_bus.flush()
    assert sub.lines[0] == f"Workflow {iid} started"
    assert sub.lines[1].startswith("Step a completed in ")
    assert sub.lines[2].startswith(f"Workflow {iid} failed: ") and "b broke" in sub.lines[2]
    assert len(sub.lines) == 3


# -- State Persistence: a custom store ------------------------------------------------------------------------------


class DictStore(StateStore):
    """A store over a plain dict: the four primitives, and every seed method comes with them."""

    def __init__(self) -> None:
        self.records: dict[str, Record] = {}
        self.lock = threading.Lock()
        self.writes = 0

    def write(self, checkpoints: list[Checkpoint]) -> None:
        with self.lock:
            self.writes += 1
            for cp in checkpoints:
                record = None if cp.replace else self.records.get(cp.instance_id)
                if record is None:
                    record = self.records[cp.instance_id] = Record({}, {}, {}, {})
                record.apply(cp)

    def read(self, instance_id: str) -> Record | None:
        with self.lock:
            r = self.records.get(instance_id)
            if r is None:
                return None
            deltas = {name: dict(d) for name, d in r.deltas.items()}
            return Record(dict(r.meta), {k: dict(v) for k, v in r.steps.items()}, dict(r.fields), dict(r.extra), deltas)

    def ids(self) -> list[str]:
        with self.lock:
            return list(self.records)

    def remove(self, instance_id: str) -> bool:
        with self.lock:
            return self.records.pop(instance_id, None) is not None


def test_custom_state_store(tmp_path: Path) -> None:
    store = DictStore()
    go = tmp_path / "go"

    def add(ctx: Any) -> None:
        ctx.data.n += 1
        ctx.data.items[ctx.step_id] = ctx.attempt
        ctx.set("seen", ctx.step_id)

    def block(ctx: Any) -> None:
        wait_for(go, timeout=60)

    wf = WorkflowDefinition("stored", data_type=Data)
    wf.add_step(StepDefinition("a", "a", add))
    wf.add_step(StepDefinition("b", "b", add).depends_on(["a"]))
    with WorkflowEngine.with_store(store, max_workers=2) as engine:
        assert engine.store is store
        engine.register_workflow(wf)
        engine.register_workflow(
            WorkflowDefinition("blocked", data_type=Data).add_step(StepDefinition("x", "x", block))
        )
        iid = engine.start_workflow("stored", Data())
        engine.wait_for_completion(iid, timeout=30)
        running = engine.start_workflow("blocked", Data())
        wait_until(lambda: engine.get_status(running).step_states["x"].status is StepStatus.RUNNING, 30, "start")

        assert store.writes > 0 and iid in store.records  # the engine checkpointed to our store
        state = engine.get_status(iid)
        assert state.status is WorkflowStatus.COMPLETED
        assert state.data.n == 2 and state.data.items == {"a": 1, "b": 1}
        assert store.load(iid).data == state.data
        assert [s.instance_id for s in store.list_active()] == [running]
        assert {s.instance_id for s in store.list_all()} == {iid, running}
        assert store.is_cancelled(iid) is False
        ctx = store.get_context(iid)
        assert ctx.get("seen") == "b" and ctx.data.n == 2
        assert store.cleanup_if_terminal(running) is False
        go.touch()
        engine.wait_for_completion(running, timeout=30)

    # save / update / delete / cleanup on the store itself
    def bump(s: Any) -> None:
        s.data.value = "updated"

    store.update(iid, bump)
    assert store.load(iid).data.value == "updated"
    copy = store.load(iid)
    copy.instance_id = "copy"
    store.save(copy)
    assert store.load("copy").data.value == "updated"
    store.delete("copy")
    with pytest.raises(NotFound):
        store.delete("copy")
    assert store.cleanup_if_terminal(running) is True
    assert store.cleanup_old_workflows(timedelta(hours=1)) == 0
    assert store.cleanup_old_workflows(0) == 1
    assert store.ids() == []


def test_the_default_store_is_in_memory(engine: WorkflowEngine) -> None:
    assert isinstance(engine.store, InMemoryStore)


# -- Workflow Management ---------------------------------------------------------------------------------------


def test_cancellation(engine: WorkflowEngine, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"

    def long_job(ctx: Any) -> None:
        write_atomic(pidfile, str(os.getpid()))
        wait_for(tmp_path / "never", timeout=120)

    engine.register_workflow(WorkflowDefinition("long", data_type=Data).add_step(StepDefinition("j", "j", long_job)))
    instance_id = engine.start_workflow("long", Data())
    pid = int(wait_for_text(pidfile))
    engine.cancel_workflow(instance_id)
    assert engine.get_status(instance_id).status is WorkflowStatus.CANCELLED
    assert not alive(pid)  # the crate stopped nothing that was running
    with pytest.raises(InvalidStateTransition):
        engine.cancel_workflow(instance_id)


def test_status_queries(engine: WorkflowEngine) -> None:
    wf = WorkflowDefinition("q", data_type=Data)
    wf.add_step(StepDefinition("a", "a", lambda ctx: None))
    wf.add_step(StepDefinition("b", "b", lambda ctx: None).depends_on(["a"]))
    engine.register_workflow(wf)
    instance_id = engine.start_workflow("q", Data())
    engine.wait_for_completion(instance_id, timeout=30)
    state = engine.get_status(instance_id)
    assert state.status is WorkflowStatus.COMPLETED
    assert "COMPLETED" in f"Status: {state.status!r}"
    assert {sid: s.status for sid, s in state.step_states.items()} == {
        "a": StepStatus.SUCCEEDED,
        "b": StepStatus.SUCCEEDED,
    }
    assert "SUCCEEDED" in f"Step states: {state.step_states}"


def test_graceful_shutdown(tmp_path: Path) -> None:
    go = tmp_path / "go"

    def job(ctx: Any) -> None:
        wait_for(go, timeout=60)

    engine = WorkflowEngine(max_workers=2, grace_period=0.5)
    try:
        engine.register_workflow(WorkflowDefinition("job", data_type=Data).add_step(StepDefinition("j", "j", job)))
        iid = engine.start_workflow("job", Data())
        # Signal shutdown (stops accepting new workflows)
        engine.shutdown()
        with pytest.raises(ShuttingDown):
            engine.start_workflow("job", Data())
        go.touch()
        # Wait for active workflows to complete
        if not engine.wait_for_shutdown(timedelta(seconds=30)):
            pytest.fail("the active workflow should have completed")
        assert engine.get_status(iid).status is WorkflowStatus.COMPLETED
    finally:
        engine.close()


def test_graceful_shutdown_then_force_cancel_all(tmp_path: Path) -> None:
    def stuck(ctx: Any) -> None:
        wait_for(tmp_path / "never", timeout=120)

    engine = WorkflowEngine(max_workers=2, grace_period=0.5)
    try:
        engine.register_workflow(WorkflowDefinition("stuck", data_type=Data).add_step(StepDefinition("s", "s", stuck)))
        ids = [engine.start_workflow("stuck", Data()) for _ in range(3)]  # 3 runs, 2 workers
        engine.shutdown()
        cancelled = None
        if not engine.wait_for_shutdown(timedelta(milliseconds=300)):
            # Force cancel remaining workflows
            cancelled = engine.force_cancel_all()
        assert cancelled == 3
        assert {engine.get_status(i).status for i in ids} == {WorkflowStatus.CANCELLED}
        assert engine.wait_for_shutdown(timedelta(seconds=10)) is True
    finally:
        engine.close()
    assert descendants() == []


def test_automatic_cleanup(engine: WorkflowEngine) -> None:
    engine.register_workflow(WorkflowDefinition("c", data_type=Data).add_step(StepDefinition("a", "a", lambda c: None)))
    iid = engine.start_workflow("c", Data())
    engine.wait_for_completion(iid, timeout=30)
    # Start background cleanup task (removes completed workflows after TTL)
    cleanup_handle = engine.start_cleanup_task(timedelta(hours=24), timedelta(minutes=5))
    cleanup_handle.stop()
    assert engine.get_status(iid).status is WorkflowStatus.COMPLETED  # younger than a day
    short = engine.start_cleanup_task(ttl=0, interval=0.05)
    try:
        wait_until(lambda: iid not in engine.store.ids(), 10, "the cleanup")
    finally:
        short.stop()
    with pytest.raises(NotFound):
        engine.get_status(iid)


# -- Error Handling ---------------------------------------------------------------------------------------------


def start(engine: WorkflowEngine, workflow_id: str, data: Any) -> str:
    """The seed's match on start_workflow's result, as try/except."""
    try:
        instance_id = engine.start_workflow(workflow_id, data)
    except DefinitionNotFound as e:
        return f"Unknown workflow: {e.workflow_id}"
    except ShuttingDown:
        return "Engine is shutting down"
    except WorkflowError as e:
        return f"Error: {e}"
    return f"Started: {instance_id}"


def test_error_handling(tmp_path: Path) -> None:
    engine = WorkflowEngine(max_workers=2)
    try:
        engine.register_workflow(WorkflowDefinition("w", data_type=Data).add_step(StepDefinition("a", "a", boom)))
        assert start(engine, "nope", Data()) == "Unknown workflow: nope"
        started = start(engine, "w", Data())
        assert started.startswith("Started: ")
        engine.shutdown()
        assert start(engine, "w", Data()) == "Engine is shutting down"
        assert engine.wait_for_shutdown(30)
    finally:
        engine.close()


def test_error_types() -> None:
    import wfaas
    import wfaas.errors

    names = [
        "NotFound",
        "DefinitionNotFound",
        "StepFailed",
        "StepTimeout",
        "Cancelled",
        "InvalidStateTransition",
        "ContextValueNotFound",
        "TypeMismatch",
        "ShuttingDown",
    ]
    for name in names:
        cls = getattr(wfaas, name)
        assert cls is getattr(wfaas.errors, name)
        assert issubclass(cls, WorkflowError), name
    assert ContextValueNotFound is wfaas.ContextValueNotFound and TypeMismatch is wfaas.TypeMismatch
