"""Crash isolation: a worker that dies on its own costs only the step it ran.

Real deaths: ``os._exit(3)``, a segfault (``ctypes.string_at(0)``), SIGKILL
sent by the test to the worker's PID (which the step wrote to a file), and a
SIGKILL of a worker holding a lot of memory (what the kernel's OOM killer
does). Each is a ``WorkerCrashed`` naming the exit code or signal, retried per
the step's policy; a step running beside it in the other worker finishes with
one attempt, and steps still queued all run, once.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from wfaas import (
    RetryPolicy,
    StepDefinition,
    StepExecutor,
    StepStatus,
    WorkerCrashed,
    WorkflowDefinition,
    WorkflowEngine,
    WorkflowStatus,
    events,
)

from conftest import Data, alive, descendants, wait_for_text, wait_until, write_atomic

pytestmark = pytest.mark.usefixtures("no_leftovers")


def crash(kind: str, pidfile: Path) -> None:
    """Inside a step: record the worker's PID, then die the way ``kind`` says."""
    write_atomic(pidfile, str(os.getpid()))
    if kind == "exit3":
        os._exit(3)
    elif kind == "segfault":
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file in the working directory
        ctypes.string_at(0)
    elif kind == "sigkill_from_outside":
        time.sleep(60)  # the test kills this worker from outside
    raise AssertionError(f"still alive after {kind}")


# kind -> (expected exitcode, expected signal name, text the message must contain)
EXPECTED: dict[str, tuple[int, str | None, str]] = {
    "exit3": (3, None, "exited with code 3"),
    "segfault": (-signal.SIGSEGV, "SIGSEGV", "SIGSEGV"),
    "sigkill_from_outside": (-signal.SIGKILL, "SIGKILL", "SIGKILL"),
}


def kill_from_outside(kind: str, pidfile: Path) -> int:
    """For ``sigkill_from_outside``: wait for the step's PID file and SIGKILL that worker."""
    pid = int(wait_for_text(pidfile))
    if kind == "sigkill_from_outside":
        os.kill(pid, signal.SIGKILL)
    return pid


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_crash_is_worker_crashed_and_retried_per_policy(engine: WorkflowEngine, tmp_path: Path, kind: str) -> None:
    exitcode, signal_name, text = EXPECTED[kind]

    def step(ctx: Any) -> None:
        crash(kind, tmp_path / f"pid{ctx.attempt}")

    failed: list[events.StepFailed] = []
    engine.event_bus.subscribe(lambda e: failed.append(e) if isinstance(e, events.StepFailed) else None)
    engine.register_workflow(
        WorkflowDefinition("crash", data_type=Data).add_step(
            StepDefinition("c", "crash", step).with_retry(RetryPolicy(max_attempts=2))
        )
    )
    iid = engine.start_workflow("crash", Data())
    pids = [kill_from_outside(kind, tmp_path / f"pid{n}") for n in (1, 2)]
    with pytest.raises(WorkerCrashed) as info:
        engine.wait_for_completion(iid, timeout=30)
    error = info.value
    assert error.exitcode == exitcode
    assert error.signal_name == signal_name
    assert text in str(error) and str(pids[1]) in str(error)
    assert error.step_id == "c" and error.instance_id == iid and error.attempt == 2
    state = engine.get_status(iid)
    assert state.status is WorkflowStatus.FAILED
    assert state.step_states["c"].status is StepStatus.FAILED
    assert state.step_states["c"].attempts == 2  # max_attempts counts attempts: one retry, no more
    assert pids[0] != pids[1] and not alive(pids[0]) and not alive(pids[1])
    engine.event_bus.flush()
    assert [e.will_retry for e in failed] == [True, False]
    assert all(text in e.error for e in failed)
    # Both slots have a live worker again.
    wait_until(lambda: len(descendants()) == 2, what="the crashed slot to get a new worker")


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_crash_fails_only_its_step_and_loses_no_queued_step(engine: WorkflowEngine, tmp_path: Path, kind: str) -> None:
    runs = tmp_path / "runs.log"
    victim_pid = tmp_path / "pid1"

    def victim(ctx: Any) -> None:
        with open(runs, "a") as f:
            f.write(f"victim {ctx.attempt}\n")
        if ctx.attempt == 1:
            crash(kind, victim_pid)
        ctx.data.items["victim"] = ctx.attempt

    def sibling(ctx: Any) -> None:
        with open(runs, "a") as f:
            f.write(f"sibling {os.getpid()}\n")
        # Still running when the victim's worker dies.
        deadline = time.monotonic() + 30
        while not (victim_pid.exists() and not alive(int(victim_pid.read_text()))):
            if time.monotonic() > deadline:
                raise TimeoutError("the victim never died")
            time.sleep(0.01)
        ctx.data.items["sibling"] = os.getpid()

    def queued(ctx: Any) -> None:
        with open(runs, "a") as f:
            f.write(f"{ctx.step_id}\n")
        ctx.data.items[ctx.step_id] = ctx.attempt

    wf = WorkflowDefinition("iso", data_type=Data)
    # Two workers: victim and sibling start at once; the four others wait in the queue.
    wf.add_step(StepDefinition("victim", "v", victim).with_retry(RetryPolicy(max_attempts=2)))
    wf.add_step(StepDefinition("sibling", "s", sibling))
    for i in range(4):
        wf.add_step(StepDefinition(f"q{i}", "q", queued))
    engine.register_workflow(wf)
    iid = engine.start_workflow("iso", Data())
    kill_from_outside(kind, victim_pid)
    engine.wait_for_completion(iid, timeout=30)

    state = engine.get_status(iid)
    assert state.status is WorkflowStatus.COMPLETED
    assert state.step_states["victim"].attempts == 2
    assert state.step_states["sibling"].attempts == 1
    for i in range(4):
        assert state.step_states[f"q{i}"].status is StepStatus.SUCCEEDED
        assert state.step_states[f"q{i}"].attempts == 1
    lines = runs.read_text().splitlines()
    assert sorted(line for line in lines if line.startswith("q")) == ["q0", "q1", "q2", "q3"]
    assert [line for line in lines if line.startswith("victim")] == ["victim 1", "victim 2"]
    (sibling_line,) = [line for line in lines if line.startswith("sibling")]  # never restarted
    assert state.data.items["sibling"] == int(sibling_line.split()[1])
    assert state.data.items["victim"] == 2


class NoRetryOnCrash(StepExecutor):
    """is_retryable sees the WorkerCrashed: this step retries other errors, not crashes."""

    def __init__(self, out: str) -> None:
        self.out = out

    def execute(self, ctx: Any) -> None:
        with open(self.out, "a") as f:
            f.write(f"{ctx.attempt}\n")
        os._exit(5)

    def is_retryable(self, error: BaseException) -> bool:
        return not isinstance(error, WorkerCrashed)


def test_is_retryable_sees_worker_crashed(engine: WorkflowEngine, tmp_path: Path) -> None:
    out = tmp_path / "attempts"
    engine.register_workflow(
        WorkflowDefinition("nr", data_type=Data).add_step(
            StepDefinition("c", "c", NoRetryOnCrash(str(out))).with_retry(RetryPolicy(max_attempts=3))
        )
    )
    iid = engine.start_workflow("nr", Data())
    with pytest.raises(WorkerCrashed, match="exited with code 5"):
        engine.wait_for_completion(iid, timeout=30)
    assert out.read_text() == "1\n"
    assert engine.get_status(iid).step_states["c"].attempts == 1


@pytest.mark.slow  # waits 1.5 real seconds for the engine to sample the worker's memory
def test_sigkill_with_high_memory_is_reported_as_probably_out_of_memory(engine: WorkflowEngine, tmp_path: Path) -> None:
    """What the kernel's OOM killer does: SIGKILL to a worker holding a lot of memory."""

    def hog(ctx: Any) -> None:
        block = b"\x01" * (600 * 2**20)  # written, so resident
        time.sleep(1.5)  # long enough for the engine to have measured it
        write_atomic(tmp_path / "pid", str(os.getpid()))
        time.sleep(60)
        del block

    engine.register_workflow(WorkflowDefinition("oom", data_type=Data).add_step(StepDefinition("h", "h", hog)))
    iid = engine.start_workflow("oom", Data())
    os.kill(int(wait_for_text(tmp_path / "pid")), signal.SIGKILL)
    with pytest.raises(WorkerCrashed) as info:
        engine.wait_for_completion(iid, timeout=30)
    assert info.value.signal_name == "SIGKILL"
    assert "probably out of memory" in str(info.value)


@pytest.mark.slow  # waits 1.5 real seconds for the engine to sample the worker's memory
def test_sigkill_of_a_small_worker_is_not_called_out_of_memory(engine: WorkflowEngine, tmp_path: Path) -> None:
    """The OOM hint is for SIGKILL *with high RSS*; a plain worker killed by hand is just killed."""

    def idle(ctx: Any) -> None:
        time.sleep(1.5)  # the engine measured this worker by now (it samples busy workers' memory)
        write_atomic(tmp_path / "pid", str(os.getpid()))
        time.sleep(60)

    engine.register_workflow(WorkflowDefinition("small", data_type=Data).add_step(StepDefinition("i", "i", idle)))
    iid = engine.start_workflow("small", Data())
    os.kill(int(wait_for_text(tmp_path / "pid")), signal.SIGKILL)
    with pytest.raises(WorkerCrashed) as info:
        engine.wait_for_completion(iid, timeout=30)
    assert info.value.signal_name == "SIGKILL"
    assert "out of memory" not in str(info.value), str(info.value)


def test_crash_takes_the_dead_workers_children_down_before_the_retry(engine: WorkflowEngine, tmp_path: Path) -> None:
    """A step that started a child and then crashed: the child must not outlive the attempt.

    Otherwise the retry runs while the crashed attempt's child still works
    (PEERS.md #13), and the child is orphaned for good.
    """

    def step(ctx: Any) -> None:
        if ctx.attempt == 1:
            child = subprocess.Popen(["sleep", "120"])
            write_atomic(tmp_path / "attempt1.json", json.dumps([os.getpid(), child.pid]))
            os._exit(3)
        earlier = json.loads((tmp_path / "attempt1.json").read_text())
        write_atomic(tmp_path / "attempt2.json", json.dumps([p for p in earlier if alive(p)]))

    engine.register_workflow(
        WorkflowDefinition("orph", data_type=Data).add_step(
            StepDefinition("s", "s", step).with_retry(RetryPolicy(max_attempts=2))
        )
    )
    iid = engine.start_workflow("orph", Data())
    engine.wait_for_completion(iid, timeout=30)
    _, grandchild = json.loads((tmp_path / "attempt1.json").read_text())
    try:
        assert json.loads((tmp_path / "attempt2.json").read_text()) == [], (
            "the retry started while the crashed attempt's child still ran"
        )
        assert not alive(grandchild), "the crashed worker's child is still running"
    finally:
        if alive(grandchild):
            os.kill(grandchild, signal.SIGKILL)
