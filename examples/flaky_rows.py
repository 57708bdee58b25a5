"""Call a flaky service once per row of a manifest: for_each, with_concurrency and retries per row.

load ──▶ call (for each row: at most 3 calls at once, each retried with backoff) ──▶ summary

``call_service`` stands in for an HTTP call that answers 503 now and then
(here: row n fails its first n % 3 attempts). Each row is its own unit of
work: a 503 retries that row only, after its own backoff, while the other
rows go on; ``with_concurrency(3)`` keeps at most three calls in flight,
as a rate-limited API wants. Each call sends ``ctx.idempotency_key``
(``"<instance>:call[<row id>]"``) so that a row called twice (a retry after a
lost answer, a resume) takes effect once on the service's side.

Run it:  wfaas-local run examples/flaky_rows.py --data '{"rows": 40}'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from wfaas import Backoff, RetryPolicy, StepDefinition, WorkflowData, WorkflowDefinition, WorkflowEngine


class ServiceUnavailable(Exception):
    """The flaky service said 503."""


@dataclass
class RowsData(WorkflowData):
    rows: int = 20  # how many rows the manifest has
    manifest: list[dict[str, Any]] = field(default_factory=list)
    answers: dict[str, str] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    summary: str = ""


def load(ctx: Any) -> None:
    """The manifest: one row per call to make (in a real job, read from a file or a database)."""
    ctx.data.manifest = [{"id": f"row{n:03d}", "n": n} for n in range(ctx.data.rows)]


def call_service(ctx: Any) -> None:
    row = ctx.item
    if ctx.attempt <= row["n"] % 3:
        raise ServiceUnavailable(f"503 for {row['id']} on attempt {ctx.attempt}")
    ctx.data.answers[row["id"]] = f"200 OK (request {ctx.idempotency_key})"
    ctx.data.attempts[row["id"]] = ctx.attempt


def summary(ctx: Any) -> None:
    retried = sum(1 for a in ctx.data.attempts.values() if a > 1)
    ctx.data.summary = f"{len(ctx.data.answers)} rows answered, {retried} of them after retries"


def the_rows(data: RowsData) -> list[dict[str, Any]]:
    return data.manifest  # dicts: each row's key is its index ("0", "1", ...)


workflow = (
    WorkflowDefinition("flaky_rows", "A flaky service, row by row", data_type=RowsData)
    .add_step(StepDefinition("load", "Load the manifest", load))
    .add_step(
        StepDefinition("call", "Call the service for one row", call_service)
        .depends_on(["load"])
        .for_each(the_rows)
        .with_concurrency(3)
        .with_retry(RetryPolicy(max_attempts=4, backoff=Backoff.exponential(0.05, 0.5, jitter=0.2)))
    )
    .add_step(StepDefinition("summary", "Summary", summary).depends_on(["call"]))
)

if __name__ == "__main__":
    with WorkflowEngine() as engine:
        engine.register_workflow(workflow)
        iid = engine.start_workflow("flaky_rows", RowsData())
        print(engine.wait_for_completion(iid, "flaky rows", timeout=120))
        print(engine.get_status(iid).data.summary)
