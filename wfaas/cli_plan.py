"""What ``plan`` says of each step: when it may start, whether it will run, be skipped or wait.

The verdict is readiness's own (:func:`wfaas.readiness.decide`), asked as the
scheduler asks it once a step's wait is over: ``run_if`` on the data as given,
and a raising ``run_if`` is the step's failure. Nothing runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from .definition import StepDefinition, WorkflowDefinition, topological_order
from .readiness import Decision, decide
from .steps import WorkflowContext

__all__ = ["plan_lines"]


def plan_lines(
    definition: WorkflowDefinition,
    payload: Any,
    done: dict[str, str],
    now: datetime,
    items_done: dict[str, tuple[int, int]] | None = None,
) -> Iterator[str]:
    """One line per step in the order they can run; ``done``: the steps a resumed run will not run again;
    ``items_done``: for a resumed run's unfinished for_each steps, (items succeeded, items in its list)."""
    for s in topological_order(definition):
        if s.id in done:
            yield f"{s.id}: already {done[s.id]} in that run; will not run again"
            continue
        why = _waits_for(s)
        verdict = _verdict(definition, s, payload, why)
        if s.items is not None and s.id in (items_done or {}):
            ok, total = (items_done or {})[s.id]
            verdict += f" for the {total - ok} of its {total} items not done yet (the list is not computed again)"
        elif s.items is not None:
            verdict += " for each item of its list (computed when it is ready)"
        if s.concurrency is not None:
            why.append(f"at most {s.concurrency} at once")
        if s.delay:
            why.append(f"then waits {s.delay:g}s")
        if s.schedule is not None:
            when = "now (already due)" if s.schedule <= now else s.schedule.isoformat()
            why.append(f"not before {when}")
        yield f"{s.id}: {verdict}" + (f" — {'; '.join(why)}" if why else " — no dependencies, starts at once")


def _waits_for(s: StepDefinition) -> list[str]:
    """The step's gate in words (the truth table in :mod:`wfaas.readiness`)."""
    why = []
    if s.dependencies:
        why.append("after all of " + ", ".join(s.dependencies))
    if s.any_dependencies:
        why.append("after the first success of " + ", ".join(s.any_dependencies) + " (or all finished)")
    return why


def _verdict(definition: WorkflowDefinition, s: StepDefinition, payload: Any, why: list[str]) -> str:
    """``run``, ``skip`` or ``fail`` (a raising run_if), with run_if's answer added to ``why``."""
    condition = None
    if s.condition is not None:
        cond = s.condition
        ctx: WorkflowContext[Any] = WorkflowContext(
            payload, instance_id="plan", workflow_id=definition.id, step_id=s.id, attempt=1
        )

        def condition() -> bool:
            return bool(cond(ctx))

    try:
        # The wait is over (0 >= 0): decide asks run_if, as the scheduler does just before dispatch.
        decision, _ = decide(condition, 0.0, 0.0, None)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        why.append(f"run_if raises {type(exc).__name__}: {exc}")
        return "fail"
    if condition is not None:
        why.append(f"run_if is {'true' if decision is Decision.RUN else 'false'} on the current data")
    return decision.value
