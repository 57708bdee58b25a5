"""The engine's public calls (API.md section 5): starting, status, waiting, cancel, shutdown, cleanup, exit."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from wfaas import (
    Cancelled,
    DefinitionNotFound,
    InvalidStateTransition,
    NotFound,
    RetryPolicy,
    ShuttingDown,
    StepDefinition,
    StepFailed,
    StepResult,
    StepState,
    StepStatus,
    StepTimeout,
    WorkflowDefinition,
    WorkflowEngine,
    WorkflowError,
    WorkflowState,
    WorkflowStatus,
)
from wfaas.testing import VirtualClock

from conftest import Data, alive, descendants, wait_for, wait_for_text, wait_until, write_atomic

# -- step bodies (they run in worker processes) ----------------------------------------------------


def record(ctx: Any) -> None:
    ctx.data.log.append(ctx.step_id)
    ctx.data.n += 1


def blocker(marker: Path, pidfile: Path | None = None, timeout: float = 60.0) -> Any:
    """A step that writes its PID (optionally) and waits for ``marker``."""

    def body(ctx: Any) -> None:
        if pidfile is not None:
            write_atomic(pidfile, str(os.getpid()))
        wait_for(marker, timeout)
        ctx.data.log.append(ctx.step_id)

    return body


def one_step(wid: str, body: Any) -> WorkflowDefinition:
    return WorkflowDefinition(wid, wid, data_type=Data).add_step(StepDefinition("s", "s", body))


def dead(pid: int) -> bool:
    return not alive(pid)


# -- start_workflow ---------------------------------------------------------------------------


def test_start_workflow_returns_an_id_at_once(engine: WorkflowEngine, tmp_path: Path) -> None:
    go = tmp_path / "go"
    engine.register_workflow(one_step("w", blocker(go)))
    iid = engine.start_workflow("w", Data())
    # The step cannot finish before the marker exists: start_workflow did not wait for it.
    assert isinstance(iid, str) and iid
    assert not go.exists()
    state = engine.get_status(iid)
    assert state.status in (WorkflowStatus.PENDING, WorkflowStatus.RUNNING)
    assert not state.status.is_terminal
    other = engine.start_workflow("w", Data())
    assert other != iid
    go.touch()
    assert engine.wait_for_completion(iid, "a", timeout=30) == "a completed successfully via workflow"
    assert engine.wait_for_completion(other, "b", timeout=30) == "b completed successfully via workflow"


def test_start_workflow_without_data_builds_the_data_type(engine: WorkflowEngine) -> None:
    engine.register_workflow(one_step("w", record))
    iid = engine.start_workflow("w")
    engine.wait_for_completion(iid, timeout=30)
    assert engine.get_status(iid).data == Data(n=1, log=["s"])


# -- get_status ----------------------------------------------------------------------------


def test_get_status_of_a_completed_instance(engine: WorkflowEngine) -> None:
    wf = WorkflowDefinition("st", "Status", data_type=Data)
    wf.add_step(StepDefinition("a", "A", record))
    wf.add_step(StepDefinition("b", "B", record).depends_on(["a"]))
    engine.register_workflow(wf)
    before = datetime.now(UTC)
    iid = engine.start_workflow("st", Data(value="in"))
    engine.wait_for_completion(iid, timeout=30)
    after = datetime.now(UTC)

    state = engine.get_status(iid)
    assert isinstance(state, WorkflowState)
    assert state.instance_id == iid
    assert state.workflow_id == "st"
    assert state.status is WorkflowStatus.COMPLETED
    assert state.error is None
    assert state.data == Data(n=2, log=["a", "b"], value="in")
    assert state.created_at is not None and state.updated_at is not None
    assert state.created_at.tzinfo is not None and state.updated_at.tzinfo is not None
    assert before - timedelta(seconds=1) <= state.created_at <= state.updated_at <= after + timedelta(seconds=1)

    assert list(state.step_states) == ["a", "b"]
    for sid, step in state.step_states.items():
        assert isinstance(step, StepState), sid
        assert step.status is StepStatus.SUCCEEDED, sid
        assert step.attempts == 1, sid
        assert step.error is None, sid
        assert step.started_at is not None and step.finished_at is not None, sid
        assert step.started_at.tzinfo is not None, sid
        assert step.started_at <= step.finished_at, sid
        assert state.created_at <= step.started_at and step.finished_at <= state.updated_at, sid
    # b depends on a: it started only after a had finished.
    a, b = state.step_states["a"], state.step_states["b"]
    assert a.finished_at is not None and b.started_at is not None
    assert a.finished_at <= b.started_at


def test_get_status_while_running(engine: WorkflowEngine, tmp_path: Path) -> None:
    go = tmp_path / "go"
    wf = WorkflowDefinition("run", data_type=Data)
    wf.add_step(StepDefinition("block", "block", blocker(go)))
    wf.add_step(StepDefinition("after", "after", record).depends_on(["block"]))
    engine.register_workflow(wf)
    iid = engine.start_workflow("run", Data())
    wait_until(lambda: engine.get_status(iid).step_states["block"].status is StepStatus.RUNNING, 30, "block runs")
    state = engine.get_status(iid)
    assert state.status is WorkflowStatus.RUNNING
    running, waiting = state.step_states["block"], state.step_states["after"]
    assert running.attempts == 1 and running.started_at is not None and running.finished_at is None
    assert waiting.status is StepStatus.PENDING
    assert waiting.attempts == 0 and waiting.started_at is None and waiting.finished_at is None
    go.touch()
    engine.wait_for_completion(iid, timeout=30)
    assert engine.get_status(iid).step_states["after"].status is StepStatus.SUCCEEDED


def test_get_status_of_a_failed_instance(engine: WorkflowEngine) -> None:
    def boom(ctx: Any) -> None:
        raise ValueError("the input is bad")

    wf = WorkflowDefinition("bad", data_type=Data)
    wf.add_step(StepDefinition("x", "x", boom))
    wf.add_step(StepDefinition("y", "y", record).depends_on(["x"]))
    engine.register_workflow(wf)
    iid = engine.start_workflow("bad", Data())
    with pytest.raises(StepFailed):
        engine.wait_for_completion(iid, timeout=30)
    state = engine.get_status(iid)
    assert state.status is WorkflowStatus.FAILED
    assert state.error is not None and "the input is bad" in state.error
    x, y = state.step_states["x"], state.step_states["y"]
    assert x.status is StepStatus.FAILED and x.attempts == 1
    assert x.error is not None and "the input is bad" in x.error
    assert x.finished_at is not None
    assert y.status is StepStatus.PENDING and y.attempts == 0 and y.started_at is None
    assert state.data.log == []


def test_get_status_returns_a_snapshot(engine: WorkflowEngine) -> None:
    engine.register_workflow(one_step("w", record))
    iid = engine.start_workflow("w", Data())
    engine.wait_for_completion(iid, timeout=30)
    first = engine.get_status(iid)
    first.data.log.append("changed by the caller")
    first.step_states["s"].attempts = 99
    again = engine.get_status(iid)
    assert again.data.log == ["s"]
    assert again.step_states["s"].attempts == 1


# -- unknown ids, shutting down --------------------------------------------------------------


def test_unknown_instance_is_not_found(engine: WorkflowEngine) -> None:
    with pytest.raises(NotFound, match="no-such-instance") as info:
        engine.get_status("no-such-instance")
    assert isinstance(info.value, WorkflowError)
    with pytest.raises(NotFound):
        engine.wait_for_completion("no-such-instance", timeout=5)
    with pytest.raises(NotFound):
        engine.cancel_workflow("no-such-instance")


def test_unknown_workflow_is_definition_not_found(engine: WorkflowEngine) -> None:
    engine.register_workflow(one_step("known", record))
    with pytest.raises(DefinitionNotFound, match="'unknown'") as info:
        engine.start_workflow("unknown", Data())
    assert isinstance(info.value, WorkflowError)
    assert info.value.workflow_id == "unknown"
    assert "known" in str(info.value)  # names what is registered
    assert engine.store.ids() == []  # nothing was created


def test_start_after_shutdown_is_shutting_down(engine: WorkflowEngine) -> None:
    engine.register_workflow(one_step("w", record))
    iid = engine.start_workflow("w", Data())
    engine.shutdown()
    with pytest.raises(ShuttingDown) as info:
        engine.start_workflow("w", Data())
    assert isinstance(info.value, WorkflowError)
    # what was started before goes on
    assert engine.wait_for_completion(iid, "w", timeout=30) == "w completed successfully via workflow"
    assert len(engine.store.ids()) == 1


# -- wait_for_completion -----------------------------------------------------------------------


def test_wait_for_completion_returns_the_seeds_message_and_keeps_the_state(engine: WorkflowEngine) -> None:
    engine.register_workflow(one_step("w", record))
    iid = engine.start_workflow("w", Data())
    assert engine.wait_for_completion(iid, "example", timeout=30) == "example completed successfully via workflow"
    # waiting again, and without a label, still works: the state was kept (the crate deleted it)
    assert engine.wait_for_completion(iid) == " completed successfully via workflow"
    assert engine.wait_for_completion(iid, "t", timeout=timedelta(seconds=5)) == "t completed successfully via workflow"
    assert engine.get_status(iid).status is WorkflowStatus.COMPLETED


def test_wait_for_completion_raises_the_instances_error(engine: WorkflowEngine) -> None:
    class Boom(Exception):
        pass

    def boom(ctx: Any) -> None:
        raise Boom("kaboom")

    def fails(ctx: Any) -> StepResult:
        return StepResult.FAILURE

    engine.register_workflow(one_step("raises", boom))
    engine.register_workflow(one_step("returns", fails))
    iid = engine.start_workflow("raises", Data())
    with pytest.raises(StepFailed, match="kaboom") as info:
        engine.wait_for_completion(iid, "x", timeout=30)
    error = info.value
    assert error.instance_id == iid and error.step_id == "s"
    assert iid in str(error) and "'s'" in str(error)
    assert type(error.__cause__).__name__ == "Boom"
    assert "kaboom" in str(error.__cause__)
    # the same error again on a second wait
    with pytest.raises(StepFailed, match="kaboom"):
        engine.wait_for_completion(iid, timeout=5)

    iid2 = engine.start_workflow("returns", Data())
    with pytest.raises(StepFailed, match="FAILURE"):
        engine.wait_for_completion(iid2, timeout=30)


def test_wait_for_completion_raises_step_timeout(vengine: WorkflowEngine, clock: VirtualClock, tmp_path: Path) -> None:
    """The timeout is on the virtual clock; the kill is real (test_timeouts times it on the real one)."""
    wf = one_step("slow", blocker(tmp_path / "never", timeout=120))
    wf.steps[0].with_timeout(30)
    vengine.register_workflow(wf)
    iid = vengine.start_workflow("slow", Data())
    wait_until(lambda: vengine.get_status(iid).step_states["s"].status is StepStatus.RUNNING, 30, "the step to run")
    clock.advance(30)
    with pytest.raises(StepTimeout) as info:
        vengine.wait_for_completion(iid, timeout=30)
    assert info.value.step_id == "s" and info.value.instance_id == iid
    assert vengine.get_status(iid).status is WorkflowStatus.FAILED


def test_wait_timeout_raises_builtin_timeout_error_and_the_run_goes_on(engine: WorkflowEngine, tmp_path: Path) -> None:
    go = tmp_path / "go"
    engine.register_workflow(one_step("w", blocker(go)))
    iid = engine.start_workflow("w", Data())
    with pytest.raises(TimeoutError) as info:
        engine.wait_for_completion(iid, "w", timeout=0.2)
    assert type(info.value) is TimeoutError  # the builtin, not StepTimeout
    assert not isinstance(info.value, WorkflowError)
    assert engine.get_status(iid).status is WorkflowStatus.RUNNING
    with pytest.raises(TimeoutError):
        engine.wait_for_completion(iid, timeout=timedelta(milliseconds=100))
    go.touch()
    assert engine.wait_for_completion(iid, "w", timeout=30) == "w completed successfully via workflow"
    assert engine.get_status(iid).data.log == ["s"]


# -- cancel ------------------------------------------------------------------------------------------


def test_cancel_a_running_instance(engine: WorkflowEngine, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    wf = WorkflowDefinition("c", data_type=Data)
    wf.add_step(StepDefinition("block", "block", blocker(tmp_path / "never", pidfile, timeout=120)))
    wf.add_step(StepDefinition("after", "after", record).depends_on(["block"]))
    engine.register_workflow(wf)
    iid = engine.start_workflow("c", Data())
    pid = int(wait_for_text(pidfile))
    assert alive(pid)

    engine.cancel_workflow(iid)  # returns once the instance is CANCELLED
    state = engine.get_status(iid)
    assert state.status is WorkflowStatus.CANCELLED
    block = state.step_states["block"]
    assert block.status is StepStatus.CANCELLED
    assert block.finished_at is not None
    assert state.step_states["after"].status is StepStatus.PENDING
    assert state.step_states["after"].attempts == 0
    assert dead(pid), "the cancelled step's process still runs"
    assert engine.store.is_cancelled(iid)

    with pytest.raises(Cancelled) as info:
        engine.wait_for_completion(iid, timeout=5)
    assert info.value.instance_id == iid
    assert isinstance(info.value, WorkflowError)


def test_cancel_with_steps_queued_and_waiting(engine: WorkflowEngine, tmp_path: Path) -> None:
    """Three parallel steps on two workers, and a delayed one: cancel stops the two, starts nothing else."""
    never = tmp_path / "never"

    def block(ctx: Any) -> None:
        ctx.data.n = 99  # a cancelled attempt changes nothing in the data
        write_atomic(tmp_path / f"{ctx.step_id}.pid", str(os.getpid()))
        wait_for(never, timeout=120)

    wf = WorkflowDefinition("q", data_type=Data)
    for sid in ("p1", "p2", "p3"):
        wf.add_step(StepDefinition(sid, sid, block))
    wf.add_step(StepDefinition("later", "later", record).with_delay(3600))
    engine.register_workflow(wf)
    iid = engine.start_workflow("q", Data())
    wait_until(lambda: len(list(tmp_path.glob("*.pid"))) == 2, 30, "two steps running")
    pids = [int(wait_for_text(p)) for p in tmp_path.glob("*.pid")]
    state = engine.get_status(iid)
    assert state.step_states["later"].status is StepStatus.WAITING
    engine.cancel_workflow(iid)
    state = engine.get_status(iid)
    assert state.status is WorkflowStatus.CANCELLED
    statuses = sorted(state.step_states[s].status.name for s in ("p1", "p2", "p3"))
    assert statuses == ["CANCELLED", "CANCELLED", "PENDING"]
    queued = next(s for s in ("p1", "p2", "p3") if state.step_states[s].status is StepStatus.PENDING)
    assert state.step_states[queued].attempts == 0
    assert state.step_states["later"].status in (StepStatus.PENDING, StepStatus.CANCELLED)
    assert state.step_states["later"].attempts == 0
    assert all(dead(pid) for pid in pids)
    assert state.data.n == 0
    assert len(list(tmp_path.glob("*.pid"))) == 2  # the queued step never started


def test_a_waiter_in_another_thread_gets_cancelled(engine: WorkflowEngine, tmp_path: Path) -> None:
    engine.register_workflow(one_step("w", blocker(tmp_path / "never", tmp_path / "pid", timeout=120)))
    iid = engine.start_workflow("w", Data())
    outcome: list[BaseException | str] = []

    def wait() -> None:
        try:
            outcome.append(engine.wait_for_completion(iid, timeout=60))
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            outcome.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    wait_for_text(tmp_path / "pid")
    engine.cancel_workflow(iid)
    waiter.join(30)
    assert not waiter.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], Cancelled), outcome


def test_cancel_leaves_other_instances_running(engine: WorkflowEngine, tmp_path: Path) -> None:
    go = tmp_path / "go"
    engine.register_workflow(one_step("victim", blocker(go, tmp_path / "victim.pid")))
    engine.register_workflow(one_step("keeper", blocker(go, tmp_path / "keeper.pid")))
    victim = engine.start_workflow("victim", Data())
    keeper = engine.start_workflow("keeper", Data())
    victim_pid = int(wait_for_text(tmp_path / "victim.pid"))
    keeper_pid = int(wait_for_text(tmp_path / "keeper.pid"))
    engine.cancel_workflow(victim)
    assert dead(victim_pid)
    assert alive(keeper_pid)
    assert engine.get_status(keeper).status is WorkflowStatus.RUNNING
    go.touch()
    assert engine.wait_for_completion(keeper, "k", timeout=30) == "k completed successfully via workflow"
    assert engine.get_status(keeper).step_states["s"].attempts == 1
    with pytest.raises(Cancelled):
        engine.wait_for_completion(victim, timeout=5)


def test_cancel_a_finished_instance_is_an_invalid_transition(engine: WorkflowEngine, tmp_path: Path) -> None:
    def boom(ctx: Any) -> None:
        raise RuntimeError("no")

    engine.register_workflow(one_step("ok", record))
    engine.register_workflow(one_step("bad", boom))
    engine.register_workflow(one_step("blocked", blocker(tmp_path / "never", timeout=120)))
    done = engine.start_workflow("ok", Data())
    engine.wait_for_completion(done, timeout=30)
    failed = engine.start_workflow("bad", Data())
    with pytest.raises(StepFailed):
        engine.wait_for_completion(failed, timeout=30)
    cancelled = engine.start_workflow("blocked", Data())
    wait_until(lambda: engine.get_status(cancelled).step_states["s"].status is StepStatus.RUNNING, 30, "start")
    engine.cancel_workflow(cancelled)

    for iid, status in ((done, WorkflowStatus.COMPLETED), (failed, WorkflowStatus.FAILED)):
        with pytest.raises(InvalidStateTransition) as info:
            engine.cancel_workflow(iid)
        assert status.name in str(info.value) and "CANCELLED" in str(info.value)
        assert engine.get_status(iid).status is status  # not overwritten (the crate's bug)
    with pytest.raises(InvalidStateTransition):
        engine.cancel_workflow(cancelled)
    assert engine.get_status(cancelled).status is WorkflowStatus.CANCELLED


# -- shutdown --------------------------------------------------------------------------------------


def test_wait_for_shutdown_true_when_runs_end(tmp_path: Path) -> None:
    go = tmp_path / "go"
    engine = WorkflowEngine(max_workers=2, grace_period=0.5)
    try:
        engine.register_workflow(one_step("w", blocker(go)))
        ids = [engine.start_workflow("w", Data()) for _ in range(3)]
        engine.shutdown()
        with pytest.raises(ShuttingDown):
            engine.start_workflow("w", Data())
        # runs started before shutdown() go on; release them from another thread while we wait
        releaser = threading.Timer(0.3, go.touch)
        releaser.start()
        try:
            assert engine.wait_for_shutdown(timeout=60) is True
        finally:
            releaser.join()
        assert [engine.get_status(i).status for i in ids] == [WorkflowStatus.COMPLETED] * 3
        assert engine.active_instances() == []
        assert descendants() == []  # it stopped the workers too
    finally:
        engine.close()
    assert descendants() == []


def test_wait_for_shutdown_false_while_a_step_blocks_then_force_cancel_all(tmp_path: Path) -> None:
    engine = WorkflowEngine(max_workers=2, grace_period=0.5)
    try:
        engine.register_workflow(one_step("w", blocker(tmp_path / "never", timeout=120)))
        engine.register_workflow(one_step("quick", record))
        finished = engine.start_workflow("quick", Data())
        engine.wait_for_completion(finished, timeout=30)
        ids = [engine.start_workflow("w", Data()) for _ in range(2)]
        wait_until(
            lambda: all(engine.get_status(i).step_states["s"].status is StepStatus.RUNNING for i in ids), 30, "start"
        )
        started = time.monotonic()
        assert engine.wait_for_shutdown(timeout=0.3) is False
        assert time.monotonic() - started >= 0.25  # it did wait for the timeout
        assert [engine.get_status(i).status for i in ids] == [WorkflowStatus.RUNNING] * 2
        with pytest.raises(ShuttingDown):
            engine.start_workflow("quick", Data())

        assert engine.force_cancel_all() == 2  # the finished one does not count
        assert [engine.get_status(i).status for i in ids] == [WorkflowStatus.CANCELLED] * 2
        assert engine.get_status(finished).status is WorkflowStatus.COMPLETED
        assert engine.force_cancel_all() == 0
        assert engine.wait_for_shutdown(timeout=10) is True
    finally:
        engine.close()
    assert descendants() == []


# -- cleanup -----------------------------------------------------------------------------------------


def cleanup_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "wfaas-cleanup" and t.is_alive()]


def test_cleanup_task_removes_finished_instances_only(engine: WorkflowEngine, tmp_path: Path) -> None:
    def boom(ctx: Any) -> None:
        raise RuntimeError("x")

    go = tmp_path / "go"
    engine.register_workflow(one_step("ok", record))
    engine.register_workflow(one_step("bad", boom))
    engine.register_workflow(one_step("blocked", blocker(go)))
    done = engine.start_workflow("ok", Data())
    failed = engine.start_workflow("bad", Data())
    running = engine.start_workflow("blocked", Data())
    engine.wait_for_completion(done, timeout=30)
    with pytest.raises(StepFailed):
        engine.wait_for_completion(failed, timeout=30)

    before = len(cleanup_threads())
    handle = engine.start_cleanup_task(ttl=0, interval=0.05)
    try:
        assert len(cleanup_threads()) == before + 1
        wait_until(lambda: not {done, failed} & set(engine.store.ids()), 10, "the cleanup")
        # the sweep that removed the finished ones left the running one alone
        assert running in engine.store.ids()
        assert engine.get_status(running).status is WorkflowStatus.RUNNING
        with pytest.raises(NotFound):
            engine.get_status(done)
        with pytest.raises(NotFound):
            engine.get_status(failed)
        with pytest.raises(NotFound):
            engine.wait_for_completion(done, timeout=5)
    finally:
        handle.stop()  # joins the thread: its count is final
        if not go.exists():
            go.touch()  # a failed assertion must not leave the step blocked for the teardown
    assert handle.removed >= 2
    assert len(cleanup_threads()) == before, "stop() did not end the cleanup thread"
    engine.wait_for_completion(running, timeout=30)
    assert engine.get_status(running).status is WorkflowStatus.COMPLETED


def test_cleanup_task_keeps_instances_younger_than_ttl(vengine: WorkflowEngine, clock: VirtualClock) -> None:
    vengine.register_workflow(one_step("ok", record))
    old = vengine.start_workflow("ok", Data())
    vengine.wait_for_completion(old, timeout=30)
    clock.advance(timedelta(hours=2))
    young = vengine.start_workflow("ok", Data())
    vengine.wait_for_completion(young, timeout=30)
    handle = vengine.start_cleanup_task(ttl=timedelta(hours=1), interval=timedelta(milliseconds=20))
    try:
        wait_until(lambda: old not in vengine.store.ids(), 10, "the old instance's removal")
        assert young in vengine.store.ids()
    finally:
        handle.stop()
    assert handle.removed == 1
    assert vengine.get_status(young).status is WorkflowStatus.COMPLETED


# -- several instances, one pool -----------------------------------------------------------------------


def test_several_instances_share_one_pool(engine: WorkflowEngine, tmp_path: Path) -> None:
    workers = {p.pid for p in descendants()}
    assert len(workers) == 2

    def whoami(ctx: Any) -> None:
        ctx.data.value = os.getpid()

    # Two instances meet: each waits for the other's marker, so they must run at the same time.
    def meet(mine: Path, theirs: Path) -> Any:
        def body(ctx: Any) -> None:
            mine.touch()
            wait_for(theirs, timeout=30)
            ctx.data.value = os.getpid()

        return body

    engine.register_workflow(one_step("who", whoami))
    engine.register_workflow(one_step("left", meet(tmp_path / "l", tmp_path / "r")))
    engine.register_workflow(one_step("right", meet(tmp_path / "r", tmp_path / "l")))
    left = engine.start_workflow("left", Data())
    right = engine.start_workflow("right", Data())
    many = [engine.start_workflow("who", Data()) for _ in range(8)]
    for iid in [left, right, *many]:
        engine.wait_for_completion(iid, timeout=60)
    pids = {engine.get_status(iid).data.value for iid in [left, right, *many]}
    assert pids <= workers, f"steps ran outside the engine's pool: {pids - workers}"
    assert engine.get_status(left).data.value != engine.get_status(right).data.value
    assert {p.pid for p in descendants()} == workers  # still the same warm workers


def test_start_returns_at_once_when_every_worker_is_busy(engine: WorkflowEngine, tmp_path: Path) -> None:
    go = tmp_path / "go"
    engine.register_workflow(one_step("w", blocker(go)))
    try:
        busy = [engine.start_workflow("w", Data()) for _ in range(2)]
        wait_until(
            lambda: all(engine.get_status(i).step_states["s"].status is StepStatus.RUNNING for i in busy), 30, "busy"
        )
        queued = engine.start_workflow("w", Data())  # two workers, both blocked: it must not wait for one
        state = engine.get_status(queued)
        assert not state.status.is_terminal
        assert state.step_states["s"].status is StepStatus.PENDING and state.step_states["s"].attempts == 0
    finally:
        go.touch()
    for iid in [*busy, queued]:
        engine.wait_for_completion(iid, timeout=30)


def test_two_engines_keep_their_own_instances_and_workers() -> None:
    with WorkflowEngine(max_workers=1) as first, WorkflowEngine(max_workers=2) as second:
        assert len(descendants()) == 3
        for eng in (first, second):
            eng.register_workflow(one_step("w", record))
        iid = first.start_workflow("w", Data())
        first.wait_for_completion(iid, timeout=30)
        with pytest.raises(NotFound):
            second.get_status(iid)
        assert second.store.ids() == []
    assert descendants() == []


# -- the context manager ------------------------------------------------------------------------------


def test_context_exit_leaves_no_worker_process(tmp_path: Path) -> None:
    with WorkflowEngine(max_workers=2) as engine:
        engine.register_workflow(one_step("w", record))
        for _ in range(3):
            engine.wait_for_completion(engine.start_workflow("w", Data()), timeout=30)
        workers = descendants()
        assert len(workers) == 2
    assert descendants() == []
    for w in workers:
        assert dead(w.pid), f"worker {w.pid} survived the engine"


def test_context_exit_leaves_nothing_a_step_started(tmp_path: Path) -> None:
    """A step that leaves a subprocess running: the engine's exit must not leave it behind."""
    pidfile = tmp_path / "child.pid"

    def spawn(ctx: Any) -> None:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        write_atomic(pidfile, str(child.pid))

    with WorkflowEngine(max_workers=2, grace_period=0.5) as engine:
        engine.register_workflow(one_step("w", spawn))
        engine.wait_for_completion(engine.start_workflow("w", Data()), timeout=30)
        child = int(wait_for_text(pidfile))
    assert descendants() == []
    wait_until(lambda: dead(child), 10, f"the step's subprocess {child} to end")


def test_context_exit_waits_for_running_instances(tmp_path: Path) -> None:
    go = tmp_path / "go"
    releaser = threading.Timer(0.3, go.touch)
    with WorkflowEngine(max_workers=2) as engine:
        engine.register_workflow(one_step("w", blocker(go)))
        iid = engine.start_workflow("w", Data())
        releaser.start()
    releaser.join()
    assert engine.get_status(iid).status is WorkflowStatus.COMPLETED
    assert engine.get_status(iid).data.log == ["s"]
    assert descendants() == []


class UserError(Exception):
    pass


@pytest.mark.parametrize("error", [UserError, KeyboardInterrupt])
def test_context_exit_with_an_exception_cancels_running_instances(tmp_path: Path, error: type[BaseException]) -> None:
    pidfile = tmp_path / "pid"

    with pytest.raises(error), WorkflowEngine(max_workers=2, grace_period=0.5) as engine:
        engine.register_workflow(one_step("w", blocker(tmp_path / "never", pidfile, timeout=120)))
        engine.register_workflow(one_step("quick", record))
        done = engine.start_workflow("quick", Data())
        engine.wait_for_completion(done, timeout=30)
        ids = [engine.start_workflow("w", Data()) for _ in range(2)]
        pid = int(wait_for_text(pidfile))
        raise error("user code failed")
    assert [engine.get_status(i).status for i in ids] == [WorkflowStatus.CANCELLED] * 2
    assert engine.get_status(done).status is WorkflowStatus.COMPLETED
    assert dead(pid)
    assert descendants() == []
    with pytest.raises(ShuttingDown):
        engine.start_workflow("quick", Data())


# -- timeouts: the bound ------------------------------------------------------------------------


def test_retry_policy_counts_attempts_in_status(engine: WorkflowEngine) -> None:
    def flaky(ctx: Any) -> None:
        if ctx.attempt < 3:
            raise RuntimeError(f"attempt {ctx.attempt}")
        ctx.data.value = ctx.attempt

    wf = one_step("flaky", flaky)
    wf.steps[0].with_retry(RetryPolicy(max_attempts=3))
    engine.register_workflow(wf)
    iid = engine.start_workflow("flaky", Data())
    engine.wait_for_completion(iid, timeout=30)
    state = engine.get_status(iid)
    assert state.step_states["s"].attempts == 3
    assert state.step_states["s"].error is None
    assert state.data.value == 3


def test_import_wfaas_loads_each_name_on_first_use() -> None:
    # `import wfaas` loads no submodule (issue 17: import time); every public name still
    # resolves, to the object its module defines, and `from wfaas import *` gives them all.
    code = (
        "import sys, importlib, wfaas\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('wfaas.') or m in ('dill', 'psutil', 'sqlite3'))\n"
        "print(loaded)\n"
        "names = {}\n"
        "exec('from wfaas import *', names)\n"
        "missing = [n for n in wfaas.__all__ if n not in names]\n"
        "wrong = [n for n, home in wfaas._HOME.items() if names[n] is not "
        "getattr(importlib.import_module('wfaas.' + home), n)]\n"
        "print(missing, wrong, wfaas.events.__name__, 'WorkflowEngine' in dir(wfaas))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.splitlines() == ["[]", "[] [] wfaas.events True"], out.stdout + out.stderr


def test_a_data_class_the_workers_cannot_import_fails_the_step_saying_so(
    engine: WorkflowEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Importable here (sys.path changed after the engine started its workers), not in the workers.
    (tmp_path / "late_module.py").write_text(
        "from dataclasses import dataclass\nfrom wfaas import WorkflowData\n\n"
        "@dataclass\nclass LateData(WorkflowData):\n    n: int = 0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from late_module import LateData  # type: ignore[import-not-found]

    definition = WorkflowDefinition("late", data_type=LateData).add_step(StepDefinition("s", "s", _noop))
    engine.register_workflow(definition)
    iid = engine.start_workflow("late", LateData())
    with pytest.raises(WorkflowError) as raised:
        engine.wait_for_completion(iid, timeout=30)
    assert "the worker cannot load step 's'" in str(raised.value)
    assert "importable by the worker" in str(raised.value)
    monkeypatch.delitem(sys.modules, "late_module")


def _noop(ctx: Any) -> None:
    pass
