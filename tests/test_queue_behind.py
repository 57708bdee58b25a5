"""Steps queued behind a busy worker's step (``dispatch.py``) with real worker processes.

The tick tests (``test_queue_behind_tick.py``) show the decisions; this shows
the worker's side of taking a queued step back: it skips it, and the step
runs once, elsewhere.
"""

from __future__ import annotations

import os
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
