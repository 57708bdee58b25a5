"""Delayed and scheduled steps: with_delay counts from when dependencies finish; scheduled_at is a wall-clock time.

Waiting never holds a worker. Run it:  wfaas-local run examples/scheduled.py:workflow
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from wfaas import StepDefinition, WorkflowData, WorkflowDefinition, WorkflowEngine


@dataclass
class ScheduledData(WorkflowData):
    times: dict[str, float] = field(default_factory=dict)


def stamp(ctx: Any) -> None:
    ctx.data.times[ctx.step_id] = time.time()


def workflow() -> WorkflowDefinition:
    """Built when loaded, so that scheduled_at is two seconds from now."""
    soon = datetime.now(UTC) + timedelta(seconds=2)
    return (
        WorkflowDefinition("scheduled", "Delayed and scheduled", data_type=ScheduledData)
        .add_step(StepDefinition("start", "Start", stamp))
        .add_step(StepDefinition("delayed", "One second after start", stamp).depends_on(["start"]).with_delay(1))
        .add_step(StepDefinition("at_time", "At a set time", stamp).scheduled_at(soon))
    )


if __name__ == "__main__":
    with WorkflowEngine() as engine:
        engine.register_workflow(workflow())
        iid = engine.start_workflow("scheduled", ScheduledData())
        print(engine.wait_for_completion(iid, "scheduled", timeout=60))
        times = engine.get_status(iid).data.times
        print({k: round(v - times["start"], 2) for k, v in times.items()})
