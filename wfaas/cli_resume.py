"""The checks ``resume`` and ``plan --resume`` share, answered in the CLI's words.

The engine refuses the same things (``InvalidStateTransition``,
``InvalidDefinition``) in the Python API's words (``rerun=[...]``,
``force=True``) and with every changed dependency list; the CLI checks first
and says it in one short sentence with the flag to use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .cli_text import plural
from .definition import WorkflowDefinition, fingerprint
from .store import Record

__all__ = ["definition_changes", "resume_problem"]


def _names(ids: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(sorted(ids)[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def definition_changes(stored: dict[str, Any], definition: WorkflowDefinition) -> str | None:
    """What changed in the steps or their dependencies since ``stored`` was fingerprinted, in a phrase."""
    old, new = stored.get("steps", {}), fingerprint(definition)["steps"]
    added = [s for s in new if s not in old]
    removed = [s for s in old if s not in new]
    rewired = [
        s
        for s in old.keys() & new.keys()
        if old[s]["depends_on"] != new[s]["depends_on"] or old[s]["depends_on_any"] != new[s]["depends_on_any"]
    ]
    parts = []
    if added:
        parts.append(f"{plural(len(added), 'step')} added ({_names(added)})")
    if removed:
        parts.append(f"{plural(len(removed), 'step')} removed ({_names(removed)})")
    if rewired:
        parts.append(f"the dependencies of {plural(len(rewired), 'step')} changed ({_names(rewired)})")
    return "; ".join(parts) or None


def resume_problem(
    iid: str, record: Record, definition: WorkflowDefinition, rerun: Sequence[str] = (), *, force: bool = False
) -> str | None:
    """Why ``wfaas-local resume`` would refuse this run with this definition, or ``None``."""
    from .engine import owner_alive

    meta = record.meta
    if meta["workflow_id"] != definition.id:
        return (
            f"run {iid} is a run of workflow {meta['workflow_id']!r}, but the target defines {definition.id!r}; "
            "name the run's own workflow (or leave TARGET out: the run recorded it)"
        )
    steps = [s.id for s in definition.steps]
    unknown = [s for s in rerun if s not in steps]
    if unknown:
        name = unknown[0]
        return f"--rerun {name}: workflow {definition.id!r} has no step {name!r} (steps: {_names(steps, 8)})"
    status = meta["status"]
    if status == "completed" and not rerun:
        return (
            f"run {iid} already COMPLETED; nothing to resume. To run steps again, "
            "add --rerun STEP (reruns it and everything after it); for a new run, use `wfaas-local run`"
        )
    owner = meta.get("owner") or {}
    if status in ("running", "pending") and owner_alive(owner):
        return (
            f"run {iid} is still running in process {owner.get('pid')}; "
            f"stop it with `wfaas-local cancel {iid[:8]}` or wait for it"
        )
    stored = record.extra.get("fingerprint")
    changes = definition_changes(stored, definition) if stored and not force else None
    if changes:
        return (
            f"workflow {definition.id!r} changed since run {iid} started: {changes}; "
            "add --force to resume it on the new definition, or start a new run"
        )
    return None
