"""A DAG: fan-out, fan-in, depends_on_any and run_if.

    fetch_a ──┐                 ┌── from_cache (run_if use_cache) ──┐
    fetch_b ──┼──▶ combine ──▶──┤                                   ├╌╌any╌╌▶ publish
    fetch_c ──┘                 └── recompute ──────────────────────┘

Run it:  wfaas-local run examples/dag.py:workflow --data '{"use_cache": false}'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from wfaas import StepDefinition, WorkflowData, WorkflowDefinition, WorkflowEngine


@dataclass
class DagData(WorkflowData):
    use_cache: bool = False
    parts: dict[str, int] = field(default_factory=dict)
    total: int = 0
    source: str = ""


def fetch(name: str, value: int) -> Any:
    def body(ctx: Any) -> None:
        ctx.data.parts[name] = value  # dict fields merge key by key: parallel fetches never conflict

    return body


def combine(ctx: Any) -> None:
    ctx.data.total = sum(ctx.data.parts.values())


def from_cache(ctx: Any) -> None:
    ctx.data.source = "cache"


def recompute(ctx: Any) -> None:
    ctx.data.source = "recomputed"


def publish(ctx: Any) -> None:
    ctx.logger.info("publishing total %s from %s", ctx.data.total, ctx.data.source)


workflow = (
    WorkflowDefinition("dag_example", "DAG example", data_type=DagData)
    .add_step(StepDefinition("fetch_a", "Fetch A", fetch("a", 1)))
    .add_step(StepDefinition("fetch_b", "Fetch B", fetch("b", 2)))
    .add_step(StepDefinition("fetch_c", "Fetch C", fetch("c", 3)))
    .add_step(StepDefinition("combine", "Combine", combine).depends_on(["fetch_a", "fetch_b", "fetch_c"]))
    .add_step(
        StepDefinition("from_cache", "From cache", from_cache)
        .depends_on(["combine"])
        .run_if(lambda c: c.data.use_cache)
    )
    .add_step(
        StepDefinition("recompute", "Recompute", recompute)
        .depends_on(["combine"])
        .run_if(lambda c: not c.data.use_cache)
    )
    .add_step(StepDefinition("publish", "Publish", publish).depends_on_any(["from_cache", "recompute"]))
)

if __name__ == "__main__":
    with WorkflowEngine() as engine:
        engine.register_workflow(workflow)
        iid = engine.start_workflow("dag_example", DagData())
        print(engine.wait_for_completion(iid, "dag", timeout=60))
        state = engine.get_status(iid)
        print(state.data.total, state.data.source)
