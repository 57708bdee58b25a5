"""Retries against a flaky service: exponential backoff with jitter, CONTINUE_NEXT_STEP, events.

``call_service`` fails its first attempts (a local stand-in for a flaky HTTP
call) and succeeds after backoff; ``optional_enrich`` always fails but is
marked CONTINUE_NEXT_STEP, so the workflow still completes. Every event is
printed. Run it:  wfaas-local run examples/flaky_service.py:workflow
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from wfaas import (
    Backoff,
    FailureAction,
    RetryPolicy,
    StepDefinition,
    WorkflowData,
    WorkflowDefinition,
    WorkflowEngine,
)


class ServiceUnavailable(Exception):
    """The flaky service said 503."""


@dataclass
class FlakyData(WorkflowData):
    fail_times: int = 2
    response: str = ""
    enriched: bool = False


def call_service(ctx: Any) -> None:
    if ctx.attempt <= ctx.data.fail_times:
        raise ServiceUnavailable(f"503 on attempt {ctx.attempt}")
    ctx.data.response = f"200 OK after {ctx.attempt} attempts (key {ctx.idempotency_key})"


def optional_enrich(ctx: Any) -> None:
    raise ServiceUnavailable("the enrichment service is down")


def store_result(ctx: Any) -> None:
    ctx.logger.info("stored %r", ctx.data.response)


workflow = (
    WorkflowDefinition("flaky_service", "Flaky service", data_type=FlakyData)
    .add_step(
        StepDefinition("call_service", "Call the service", call_service).with_retry(
            RetryPolicy(max_attempts=5, backoff=Backoff.exponential(0.1, 2.0, jitter=0.2))
        )
    )
    .add_step(
        StepDefinition("optional_enrich", "Enrich (optional)", optional_enrich)
        .depends_on(["call_service"])
        .with_failure_action(FailureAction.CONTINUE_NEXT_STEP)
    )
    .add_step(StepDefinition("store", "Store result", store_result).depends_on(["optional_enrich"]))
)

if __name__ == "__main__":
    with WorkflowEngine() as engine:
        engine.event_bus.subscribe(print)
        engine.register_workflow(workflow)
        iid = engine.start_workflow("flaky_service", FlakyData())
        print(engine.wait_for_completion(iid, "flaky", timeout=60))
        print(engine.get_status(iid).data.response)
