"""What depends on how workers are started: forkserver (the default) and spawn, the same checks for each.

A spawned worker imports everything afresh (no preloaded modules, no
inherited state): step bodies and the data class must load by name, a dead
worker must be noticed and replaced, and its retry must run in the new one.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from wfaas import RetryPolicy, StepDefinition, WorkerCrashed, WorkflowDefinition, WorkflowEngine

from conftest import Data


def record_pid(ctx: Any) -> None:
    ctx.data.items[ctx.step_id] = os.getpid()


def die_on_first_attempt(ctx: Any) -> None:
    if ctx.attempt == 1:
        os._exit(7)
    ctx.data.value = ctx.attempt


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_steps_load_crash_and_retry_in_a_fresh_worker(method: str) -> None:
    wf = WorkflowDefinition("sm", data_type=Data)
    wf.add_step(StepDefinition("a", "a", record_pid))
    crashing = StepDefinition("c", "c", die_on_first_attempt).with_retry(RetryPolicy(max_attempts=2))
    wf.add_step(crashing.depends_on(["a"]))
    with WorkflowEngine(max_workers=1, start_method=method) as engine:
        engine.register_workflow(wf)
        iid = engine.start_workflow("sm", Data())
        engine.wait_for_completion(iid, timeout=60)
        state = engine.get_status(iid)
    assert state.data.value == 2
    assert state.data.items["a"] not in (None, os.getpid())  # it ran in a worker
    outcomes = [a.outcome for a in state.step_states["c"].history]
    assert outcomes == ["crashed", "succeeded"]


@pytest.mark.parametrize("method", ["forkserver", pytest.param("spawn", marks=pytest.mark.slow)])
def test_a_crash_is_named_whatever_started_the_worker(method: str) -> None:
    wf = WorkflowDefinition("sm2", data_type=Data).add_step(StepDefinition("d", "d", die_on_first_attempt))
    with WorkflowEngine(max_workers=1, start_method=method) as engine:
        engine.register_workflow(wf)
        iid = engine.start_workflow("sm2", Data())
        with pytest.raises(WorkerCrashed, match="exited with code 7"):
            engine.wait_for_completion(iid, timeout=60)
