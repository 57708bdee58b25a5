"""Steps queued behind a busy worker's step (``dispatch.py``) with real worker processes.

The tick tests (``test_queue_behind_tick.py``) show the decisions; this shows
the worker's side of taking a queued step back: it skips it, and the step
runs once, elsewhere.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from wfaas import StepDefinition, WorkflowData, WorkflowDefinition, WorkflowEngine

from conftest import wait_for, wait_until

pytestmark = pytest.mark.usefixtures("no_leftovers")


@dataclass
class HoldData(WorkflowData):
    folder: str = ""
    done: dict[str, int] = field(default_factory=dict)


def held_at_five(ctx: Any) -> None:
    if ctx.item == 5:
        wait_for(Path(ctx.data.folder) / "go", timeout=60)
    ctx.data.done[ctx.item_key] = os.getpid()


def test_a_step_queued_behind_one_that_turns_long_runs_in_the_other_worker(
    engine: WorkflowEngine, tmp_path: Path
) -> None:
    # Items 0-4 take microseconds, so the item after 5 is queued behind it in its worker; 5 then waits for
    # "go", which comes only once every other item is done: the queued one must be taken back to get there.
    each = StepDefinition("each", "each", held_at_five).for_each(lambda data: range(40))
    engine.register_workflow(WorkflowDefinition("held", data_type=HoldData).add_step(each))
    iid = engine.start_workflow("held", HoldData(folder=str(tmp_path)))
    wait_until(lambda: engine.get_status(iid).step_states["each"].items_done == 39, 30, "every item but 5 done")
    (tmp_path / "go").touch()
    engine.wait_for_completion(iid, timeout=30)
    state = engine.get_status(iid)
    assert len(state.data.done) == 40
    assert {item.attempts for item in state.step_states["each"].items.values()} == {1}


@dataclass
class FanData(WorkflowData):
    results: dict[int, int] = field(default_factory=dict)


def fan_body(i: int, slow: bool) -> Any:
    def body(ctx: Any) -> None:
        if slow:
            time.sleep(0.003)  # past QUEUE_BEHIND_BELOW: the step queued behind it is taken back
        ctx.data.results[i] = i

    return body


@pytest.mark.slow  # 3 s: 20,000 steps, about 400 of them taken back
def test_no_result_is_lost_or_doubled_when_queued_steps_are_taken_back(engine: WorkflowEngine) -> None:
    # Before the worker answered wire.Skipped, a step taken back could take the claim token of the next step
    # queued in that worker: it ran twice and that step not at all (1 to 3 results lost in 20,000).
    n, rnd = 20_000, random.Random(7)
    definition = WorkflowDefinition("fan", data_type=FanData)
    for i in range(n):
        definition.add_step(StepDefinition(f"s{i}", "s", fan_body(i, rnd.random() < 0.02)))
    engine.register_workflow(definition)
    iid = engine.start_workflow("fan", FanData())
    engine.wait_for_completion(iid, timeout=120)
    state = engine.get_status(iid)
    assert state.data.results == {i: i for i in range(n)}
    assert {s.attempts for s in state.step_states.values()} == {1}
