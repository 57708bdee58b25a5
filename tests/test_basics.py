"""The main paths end to end, with real workers: the short tour of what wfaas promises."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from wfaas import (
    Backoff,
    Cancelled,
    DataConflict,
    FailureAction,
    InvalidDefinition,
    RetryPolicy,
    SerializationError,
    SqliteStore,
    StepDefinition,
    StepFailed,
    StepResult,
    StepStatus,
    StepTimeout,
    WorkerCrashed,
    WorkflowDefinition,
    WorkflowEngine,
    WorkflowStatus,
    events,
)

from conftest import Data, descendants, wait_until


def add(n: int) -> Any:
    def body(ctx: Any) -> None:
        ctx.data.n += n
        ctx.data.log.append(ctx.step_id)

    return body


def put(key: str, value: Any) -> Any:
    def body(ctx: Any) -> None:
        ctx.data.items[key] = value

    return body


def wait_for_file(path: str, timeout: float = 30.0) -> None:
    """Inside a step: block until ``path`` exists (the test creates it), with a deadline."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.01)


def test_chain_runs_in_order_and_merges_data(engine: WorkflowEngine) -> None:
    wf = WorkflowDefinition("chain", data_type=Data)
    wf.add_step(StepDefinition("a", "A", add(1)))
    wf.add_step(StepDefinition("b", "B", add(10)).depends_on(["a"]))
    wf.add_step(StepDefinition("c", "C", add(100)).depends_on(["b"]))
    engine.register_workflow(wf)
    iid = engine.start_workflow("chain", Data())
    assert engine.wait_for_completion(iid, "x", timeout=30) == "x completed successfully via workflow"
    state = engine.get_status(iid)
    assert state.status is WorkflowStatus.COMPLETED
    assert state.data.n == 111
    assert state.data.log == ["a", "b", "c"]
    assert all(s.status is StepStatus.SUCCEEDED and s.attempts == 1 for s in state.step_states.values())


def test_fan_out_writes_dict_keys_without_conflict(engine: WorkflowEngine) -> None:
    wf = WorkflowDefinition("fan", data_type=Data)
    for i in range(20):
        wf.add_step(StepDefinition(f"s{i}", "s", put(f"k{i}", i)))

    def total(ctx: Any) -> None:
        ctx.data.value = sum(ctx.data.items.values())

    wf.add_step(StepDefinition("join", "join", total).depends_on([f"s{i}" for i in range(20)]))
    engine.register_workflow(wf)
    iid = engine.start_workflow("fan", Data())
    engine.wait_for_completion(iid, timeout=60)
    assert engine.get_status(iid).data.value == sum(range(20))


def test_parallel_writes_of_one_field_conflict(engine: WorkflowEngine, tmp_path: Path) -> None:
    gate = str(tmp_path / "go")

    def first(ctx: Any) -> None:
        ctx.data.value = "first"
        Path(gate).touch()

    def second(ctx: Any) -> None:
        wait_for_file(gate)
        ctx.data.value = "second"

    wf = WorkflowDefinition("conflict", data_type=Data)
    wf.add_step(StepDefinition("first", "1", first)).add_step(StepDefinition("second", "2", second))
    engine.register_workflow(wf)
    iid = engine.start_workflow("conflict", Data())
    with pytest.raises(DataConflict) as info:
        engine.wait_for_completion(iid, timeout=30)
    message = str(info.value)
    assert "'second'" in message and "'first'" in message and "value" in message
    # Whichever finished second failed; the other's write is the one kept.
    loser = info.value.step_id
    assert engine.get_status(iid).data.value == ("first" if loser == "second" else "second")


def test_step_exception_is_the_cause_with_remote_traceback(engine: WorkflowEngine) -> None:
    def boom(ctx: Any) -> None:
        raise KeyError("missing thing")

    engine.register_workflow(WorkflowDefinition("boom", data_type=Data).add_step(StepDefinition("b", "B", boom)))
    iid = engine.start_workflow("boom", Data())
    with pytest.raises(StepFailed) as info:
        engine.wait_for_completion(iid, timeout=30)
    assert isinstance(info.value.__cause__, KeyError)
    assert "boom" in str(info.value.__cause__.__cause__)  # the worker's traceback names the function
    assert info.value.step_id == "b" and info.value.instance_id == iid


def test_validation_lists_every_problem(engine: WorkflowEngine) -> None:
    wf = WorkflowDefinition("bad", data_type=Data)
    wf.add_step(StepDefinition("a", "A", add(1)).depends_on(["c"]))
    wf.add_step(StepDefinition("a", "dup", add(1)))
    wf.add_step(StepDefinition("b", "B", add(1)).depends_on(["nope"]))
    wf.add_step(StepDefinition("c", "C", add(1)).depends_on(["a"]))
    wf.add_step(StepDefinition("d", "D", 42))
    with pytest.raises(InvalidDefinition) as info:
        engine.register_workflow(wf)
    text = str(info.value)
    assert "duplicate step id 'a'" in text
    assert "unknown step 'nope'" in text
    assert "dependency cycle: a -> c -> a" in text
    assert "'d'" in text and "callable" in text
    assert len(info.value.problems) >= 4


def test_unserializable_field_is_named_before_running(engine: WorkflowEngine) -> None:
    engine.register_workflow(WorkflowDefinition("s", data_type=Data).add_step(StepDefinition("a", "A", add(1))))
    with pytest.raises(SerializationError, match=r"Data\.value \(generator\)"):
        engine.start_workflow("s", Data(value=(x for x in range(3))))


def test_retry_with_backoff_on_virtual_clock(vengine: WorkflowEngine, tmp_path: Path) -> None:
    counter = tmp_path / "attempts"

    def flaky(ctx: Any) -> StepResult:
        with open(counter, "a") as f:
            f.write("x")
        return StepResult.FAILURE if ctx.attempt < 4 else StepResult.SUCCESS

    retrying: list[events.StepRetrying] = []
    vengine.event_bus.subscribe(lambda e: retrying.append(e) if isinstance(e, events.StepRetrying) else None)
    policy = RetryPolicy(max_attempts=5, backoff=Backoff.exponential(10, 25))
    vengine.register_workflow(
        WorkflowDefinition("flaky", data_type=Data).add_step(StepDefinition("f", "F", flaky).with_retry(policy))
    )
    started = time.monotonic()
    iid = vengine.start_workflow("flaky", Data())
    vengine.wait_for_completion(iid, timeout=30)
    assert time.monotonic() - started < 20  # 45 virtual seconds of backoff took no real ones
    assert counter.read_text() == "xxxx"
    assert vengine.get_status(iid).step_states["f"].attempts == 4
    vengine.event_bus.flush()
    assert [e.delay for e in retrying] == [10, 20, 25]


def test_continue_next_step_and_depends_on_any(engine: WorkflowEngine) -> None:
    def fail(ctx: Any) -> None:
        raise RuntimeError("optional part broke")

    wf = WorkflowDefinition("cont", data_type=Data)
    wf.add_step(StepDefinition("opt", "opt", fail).with_failure_action(FailureAction.CONTINUE_NEXT_STEP))
    wf.add_step(StepDefinition("skip", "skip", add(1)).run_if(lambda ctx: False))
    wf.add_step(StepDefinition("after", "after", add(5)).depends_on_any(["opt", "skip"]))
    engine.register_workflow(wf)
    iid = engine.start_workflow("cont", Data())
    engine.wait_for_completion(iid, timeout=30)
    state = engine.get_status(iid)
    assert state.status is WorkflowStatus.COMPLETED
    assert state.step_states["opt"].status is StepStatus.FAILED
    assert state.step_states["skip"].status is StepStatus.SKIPPED
    assert state.step_states["after"].status is StepStatus.SUCCEEDED
    assert state.data.n == 5


@pytest.mark.slow
def test_timeout_kills_only_its_step(engine: WorkflowEngine) -> None:
    def spin(ctx: Any) -> None:
        while True:
            pass

    def sibling(ctx: Any) -> None:
        time.sleep(0.5)
        ctx.data.value = "done"

    wf = WorkflowDefinition("to", data_type=Data)
    wf.add_step(StepDefinition("spin", "spin", spin).with_timeout(1))
    wf.add_step(StepDefinition("sib", "sib", sibling))
    engine.register_workflow(wf)
    started = time.monotonic()
    iid = engine.start_workflow("to", Data())
    with pytest.raises(StepTimeout):
        engine.wait_for_completion(iid, timeout=30)
    assert time.monotonic() - started < 3
    state = engine.get_status(iid)
    assert state.step_states["sib"].status is StepStatus.SUCCEEDED
    assert state.step_states["sib"].attempts == 1
    assert state.data.value == "done"


def test_worker_crash_fails_only_its_step_and_is_retried(engine: WorkflowEngine, tmp_path: Path) -> None:
    def crash_once(ctx: Any) -> None:
        if ctx.attempt == 1:
            os._exit(7)
        ctx.data.value = "survived"

    wf = WorkflowDefinition("crash", data_type=Data)
    wf.add_step(StepDefinition("c", "c", crash_once).with_retry(RetryPolicy(max_attempts=2)))
    wf.add_step(StepDefinition("other", "o", add(1)))
    engine.register_workflow(wf)
    iid = engine.start_workflow("crash", Data())
    engine.wait_for_completion(iid, timeout=30)
    state = engine.get_status(iid)
    assert state.data.value == "survived" and state.data.n == 1
    assert state.step_states["c"].attempts == 2
    assert state.step_states["other"].attempts == 1


def test_crash_reports_signal(engine: WorkflowEngine) -> None:
    def die(ctx: Any) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    engine.register_workflow(WorkflowDefinition("die", data_type=Data).add_step(StepDefinition("d", "d", die)))
    iid = engine.start_workflow("die", Data())
    with pytest.raises(WorkerCrashed, match="SIGKILL"):
        engine.wait_for_completion(iid, timeout=30)


def test_cancel_stops_the_running_step(engine: WorkflowEngine, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"

    def block(ctx: Any) -> None:
        pidfile.write_text(str(os.getpid()))
        wait_for_file(str(tmp_path / "never"), timeout=120)

    engine.register_workflow(WorkflowDefinition("blk", data_type=Data).add_step(StepDefinition("b", "b", block)))
    iid = engine.start_workflow("blk", Data())
    pid = int(wait_until(lambda: pidfile.exists() and pidfile.read_text(), what="step started"))
    engine.cancel_workflow(iid)
    state = engine.get_status(iid)
    assert state.status is WorkflowStatus.CANCELLED
    assert state.step_states["b"].status is StepStatus.CANCELLED
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    with pytest.raises(Cancelled):
        engine.wait_for_completion(iid, timeout=5)


def test_sqlite_store_resume_skips_succeeded_steps(tmp_path: Path) -> None:
    log = tmp_path / "runs.log"
    marker = tmp_path / "fixed"

    def record(ctx: Any) -> None:
        with open(log, "a") as f:
            f.write(ctx.step_id + "\n")
        if ctx.step_id == "b" and not marker.exists():
            raise RuntimeError("input not fixed yet")
        ctx.data.log.append(ctx.step_id)

    wf = WorkflowDefinition("dur", data_type=Data)
    wf.add_step(StepDefinition("a", "a", record))
    wf.add_step(StepDefinition("b", "b", record).depends_on(["a"]))
    wf.add_step(StepDefinition("c", "c", record).depends_on(["b"]))
    store = SqliteStore(tmp_path / "runs.sqlite")
    with WorkflowEngine(store=store, max_workers=2) as engine:
        engine.register_workflow(wf)
        iid = engine.start_workflow("dur", Data())
        with pytest.raises(StepFailed):
            engine.wait_for_completion(iid, timeout=30)
    store.close()
    marker.touch()
    store = SqliteStore(tmp_path / "runs.sqlite")
    with WorkflowEngine(store=store, max_workers=2) as engine:
        engine.register_workflow(wf)
        assert engine.get_status(iid).status is WorkflowStatus.FAILED
        engine.resume(iid)
        engine.wait_for_completion(iid, timeout=30)
        assert engine.get_status(iid).data.log == ["a", "b", "c"]
    store.close()
    assert log.read_text().split() == ["a", "b", "b", "c"]


def test_engine_exit_leaves_no_worker_behind() -> None:
    with WorkflowEngine(max_workers=2) as engine:
        engine.register_workflow(WorkflowDefinition("n", data_type=Data).add_step(StepDefinition("a", "a", add(1))))
        engine.wait_for_completion(engine.start_workflow("n", Data()), timeout=30)
        workers = descendants()
        assert len(workers) == 2
    assert descendants() == []
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)


def drop(key: str) -> Any:
    def body(ctx: Any) -> None:
        del ctx.data.items[key]

    return body


def replace_items(ctx: Any) -> None:
    ctx.data.items = ["replaced", ctx.data.items["k0"]]  # no longer a dict: a whole write


@pytest.mark.parametrize("whole_write_at_end", [False, True])
def test_dict_fields_are_checkpointed_key_by_key(tmp_path: Path, whole_write_at_end: bool) -> None:
    path = tmp_path / "runs.sqlite"
    wf = WorkflowDefinition("keys", data_type=Data)
    for i in range(6):
        wf.add_step(StepDefinition(f"s{i}", "s", put(f"k{i}", i)))
    wf.add_step(StepDefinition("drop", "drop", drop("k5")).depends_on([f"s{i}" for i in range(6)]))
    if whole_write_at_end:
        wf.add_step(StepDefinition("replace", "replace", replace_items).depends_on(["drop"]))
    store = SqliteStore(path)
    with WorkflowEngine(store=store, max_workers=2) as engine:
        engine.register_workflow(wf)
        iid = engine.start_workflow("keys", Data(items={"k0": "old", "keep": True}))
        engine.wait_for_completion(iid, timeout=30)
    record = store.read(iid)
    store.close()
    assert record is not None
    if whole_write_at_end:
        assert record.deltas == {}  # a whole write supersedes the key records
    else:
        assert len(record.deltas["items"]) == 6  # k0..k5, k5 as a deletion: O(keys changed)
    reader = SqliteStore(path, readonly=True)
    items = reader.load(iid).data.items
    reader.close()
    expected = {"keep": True, **{f"k{i}": i for i in range(5)}}
    assert items == (["replaced", 0] if whole_write_at_end else expected)
