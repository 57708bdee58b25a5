"""Memory limits: a step that eats memory is stopped before it takes the machine.

``StepDefinition.with_memory_limit(bytes)`` and ``WorkflowEngine(memory_limit=...)``.
A step allocating far beyond its limit (limit 100 MiB, 600 MiB in 10 MiB
chunks, each one written so that it is resident) must end as ``WorkerCrashed``
naming the limit, long before it got all of it; a step running beside it
finishes with one attempt.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import pytest
from wfaas import (
    RetryPolicy,
    StepDefinition,
    StepStatus,
    WorkerCrashed,
    WorkflowDefinition,
    WorkflowEngine,
    WorkflowStatus,
)

from conftest import Data, alive, wait_for_text, write_atomic

pytestmark = pytest.mark.usefixtures("no_leftovers")

MiB = 2**20
LIMIT = 100 * MiB
TARGET = 600  # MiB the hog tries to reach
CHUNK = 10  # MiB per allocation


def eat(progress: Path, target_mib: int = TARGET) -> list[bytes]:
    """Allocate ``target_mib`` in chunks, recording how far it got; ~1 GiB/s, so a watchdog has time to act."""
    held = []
    for n in range(CHUNK, target_mib + 1, CHUNK):
        held.append(b"\x01" * (CHUNK * MiB))
        write_atomic(progress, str(n))
        time.sleep(0.01)
    return held


def hold(seconds: float = 30.0) -> None:
    time.sleep(seconds)


def wait_dead(pidfile: Path, timeout: float = 30.0) -> None:
    """Inside a sibling step: keep running until the worker named in ``pidfile`` is dead."""
    deadline = time.monotonic() + timeout
    while not (pidfile.exists() and not alive(int(pidfile.read_text()))):
        if time.monotonic() > deadline:
            raise TimeoutError("the memory hog was never stopped")
        time.sleep(0.01)


def test_step_over_its_memory_limit_is_stopped_and_sibling_untouched(engine: WorkflowEngine, tmp_path: Path) -> None:
    progress = tmp_path / "progress"
    pidfile = tmp_path / "hog.pid"

    def hog(ctx: Any) -> None:
        write_atomic(pidfile, str(os.getpid()))
        held = eat(progress)
        hold()
        del held

    def sibling(ctx: Any) -> None:
        wait_dead(pidfile)
        ctx.data.value = "sibling done"

    wf = WorkflowDefinition("mem", data_type=Data)
    wf.add_step(StepDefinition("hog", "hog", hog).with_memory_limit(LIMIT))
    wf.add_step(StepDefinition("sibling", "sibling", sibling))
    engine.register_workflow(wf)
    started = time.monotonic()
    iid = engine.start_workflow("mem", Data())
    with pytest.raises(WorkerCrashed) as info:
        engine.wait_for_completion(iid, timeout=60)
    assert time.monotonic() - started < 20  # stopped, not left to hold its memory for 30 s
    message = str(info.value)
    assert "memory limit" in message and "100 MiB" in message, message
    assert info.value.step_id == "hog"
    reached = int(progress.read_text())
    assert reached < TARGET, f"the step got all {reached} MiB before it was stopped"
    assert not alive(int(pidfile.read_text()))
    state = engine.get_status(iid)
    assert state.status is WorkflowStatus.FAILED
    assert state.step_states["hog"].status is StepStatus.FAILED
    assert state.step_states["sibling"].status is StepStatus.SUCCEEDED
    assert state.step_states["sibling"].attempts == 1
    assert state.data.value == "sibling done"


def _eat_in_child(progress: str) -> None:
    eat(Path(progress))
    hold()


def test_memory_of_the_steps_children_counts(engine: WorkflowEngine, tmp_path: Path) -> None:
    progress = tmp_path / "progress"
    child_pid = tmp_path / "child.pid"

    def step(ctx: Any) -> None:
        child = multiprocessing.get_context("fork").Process(target=_eat_in_child, args=(str(progress),))
        child.start()
        write_atomic(child_pid, str(child.pid))
        child.join()

    engine.register_workflow(
        WorkflowDefinition("kids", data_type=Data).add_step(StepDefinition("s", "s", step).with_memory_limit(LIMIT))
    )
    iid = engine.start_workflow("kids", Data())
    with pytest.raises(WorkerCrashed, match="100 MiB"):
        engine.wait_for_completion(iid, timeout=60)
    assert int(progress.read_text()) < TARGET
    assert not alive(int(wait_for_text(child_pid)))


def test_engine_default_memory_limit_and_step_override(tmp_path: Path) -> None:
    def hog(ctx: Any) -> None:
        held = eat(tmp_path / "hog.progress")
        hold()
        del held

    def allowed(ctx: Any) -> None:
        held = eat(tmp_path / "allowed.progress", 200)  # over the engine's default, under its own limit
        ctx.data.value = len(held) * CHUNK

    wf = WorkflowDefinition("dflt", data_type=Data)
    wf.add_step(StepDefinition("allowed", "allowed", allowed).with_memory_limit(1024 * MiB))
    wf.add_step(StepDefinition("hog", "hog", hog).depends_on(["allowed"]))
    with WorkflowEngine(max_workers=2, grace_period=1.0, memory_limit=LIMIT) as engine:
        engine.register_workflow(wf)
        iid = engine.start_workflow("dflt", Data())
        with pytest.raises(WorkerCrashed) as info:
            engine.wait_for_completion(iid, timeout=60)
        state = engine.get_status(iid)
    assert "memory limit" in str(info.value) and "100 MiB" in str(info.value)
    assert info.value.step_id == "hog"
    assert state.step_states["allowed"].status is StepStatus.SUCCEEDED
    assert state.data.value == 200
    assert int((tmp_path / "hog.progress").read_text()) < TARGET


def test_memory_kill_is_retried_per_policy(engine: WorkflowEngine, tmp_path: Path) -> None:
    def step(ctx: Any) -> None:
        if ctx.attempt == 1:
            held = eat(tmp_path / "progress")
            hold()
            del held
        ctx.data.value = ctx.attempt

    engine.register_workflow(
        WorkflowDefinition("again", data_type=Data).add_step(
            StepDefinition("s", "s", step).with_memory_limit(LIMIT).with_retry(RetryPolicy(max_attempts=2))
        )
    )
    iid = engine.start_workflow("again", Data())
    engine.wait_for_completion(iid, timeout=60)
    state = engine.get_status(iid)
    assert state.step_states["s"].attempts == 2
    assert state.data.value == 2
