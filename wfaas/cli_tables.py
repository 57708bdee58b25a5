"""The CLI's tables, fitted to the terminal: a run's steps (``status``, end of ``run``) and the runs (``list``);
and the same run as JSON (``--json``), whole.

Figures are never wrapped or cut. What does not fit goes under the table
as text shortened to the width: each failed step's error on its own line.
A run of thousands of steps is summarised (counts by status, then the steps
worth looking at), so ``status`` stays fast and readable at any size.
"""

from __future__ import annotations

import dataclasses
import json
import re
from datetime import datetime
from typing import Any

from .cli_items import ItemCounts, items_json, print_item_lines
from .cli_text import PIPE_LIMIT, data_text, plural, shorten
from .states import Attempt, ItemState, StepState, StepStatus, WorkflowState

__all__ = [
    "Selection",
    "attempt_json",
    "owner_note",
    "print_runs",
    "print_steps",
    "run_duration",
    "runs_json",
    "state_json",
    "step_error",
]

# Above this many steps, status lists the steps worth a look instead of all of them.
ROW_LIMIT = 50
_INTEREST = (StepStatus.FAILED, StepStatus.RUNNING, StepStatus.WAITING, StepStatus.CANCELLED)
# The engine's error text starts with where it happened; the table already says which run and step.
_WHERE = re.compile(r"^step '[^']*'(?: \[[^\]]*\])? \(attempt \d+\) of instance \S+ of workflow '[^']*': ")


def step_error(error: str) -> str:
    """A step's error without the where-prefix the heading and the row already give."""
    return _WHERE.sub("", error, count=1)


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}s"


def _duration(start: datetime | None, end: datetime | None) -> float | None:
    return None if start is None or end is None else (end - start).total_seconds()


def _row(sid: str, s: StepState) -> list[str]:
    if s.items is not None:  # a for_each step: its items' attempts and CPU summed, their peak memory
        counts = ItemCounts.of(s)
        rss = "" if counts.max_rss is None else f"{counts.max_rss / 2**20:.0f} MiB"
        duration = _seconds(_duration(s.started_at, s.finished_at))
        return [sid, s.status.name, str(counts.attempts or s.attempts), duration, _seconds(counts.cpu), rss, ""]
    last = s.history[-1] if s.history else None
    waited = sum(a.waited + a.queued for a in s.history) if s.history else None
    return [
        sid,
        s.status.name,
        str(s.attempts),
        _seconds(_duration(s.started_at, s.finished_at)),
        _seconds(last.cpu if last else None),
        "" if last is None or last.max_rss is None else f"{last.max_rss / 2**20:.0f} MiB",
        _seconds(waited),
    ]


def owner_note(meta: dict[str, Any], iid: str, store_path: str | None) -> str | None:
    """For a run recorded RUNNING whose owning process is gone: what happened and what to do."""
    if meta.get("status") not in ("running", "pending"):
        return None
    from .engine import owner_alive  # not before: importing the engine costs a finished run's status 50 ms

    owner = meta.get("owner") or {}
    if owner_alive(owner):
        return None
    store = f" --store {store_path}" if store_path else ""
    return f"the process that ran it (pid {owner.get('pid', '?')}) is gone; `wfaas-local recover{store}` continues it"


class Selection:
    """Which steps a large run's table shows: counts by status, then the steps worth a look."""

    def __init__(self, steps: list[tuple[str, str, float | None]]) -> None:
        """``steps``: (step id, status value, duration) of every step, in definition order."""
        self.total = len(steps)
        self.counts: dict[str, int] = {}
        for _, status, _ in steps:
            self.counts[status] = self.counts.get(status, 0) + 1
        interest = {s.value for s in _INTEREST}
        interesting = [sid for sid, status, _ in steps if status in interest]
        done = [(d, sid) for sid, status, d in steps if status not in interest and d is not None]
        slowest = [sid for _, sid in sorted(done, reverse=True)[:5]]
        self.omitted = max(0, len(interesting) - ROW_LIMIT)
        self.ids = interesting[:ROW_LIMIT] + slowest

    @classmethod
    def of_records(cls, steps: dict[str, dict[str, Any]]) -> Selection | None:
        """From a store record's raw steps, before any is decoded (``status`` of a huge run)."""
        if len(steps) <= ROW_LIMIT:
            return None
        return cls(
            [(sid, r["status"], _duration(r.get("started_at"), r.get("finished_at"))) for sid, r in steps.items()]
        )

    def lines(self) -> list[str]:
        counts = ", ".join(f"{n} {StepStatus(v).name}" for v, n in sorted(self.counts.items()))
        tail = f"; {self.omitted} more not shown (`status --json` has every step)" if self.omitted else ""
        return [
            f"{plural(self.total, 'step')}: {counts}",
            f"shown: failed, running and waiting steps, then the 5 slowest{tail}",
        ]


def print_steps(
    state: WorkflowState[Any], console: Any, *, note: str | None = None, selection: Selection | None = None
) -> None:
    """The run's heading, its steps' table, their errors, and its data, all within ``console.width``.

    With a ``selection`` (or more than ROW_LIMIT steps) only the selected steps are listed.
    """
    from rich import box
    from rich.table import Table
    from rich.text import Text

    width = console.width
    states = state.step_states
    console.print(Text(f"{state.workflow_id} {state.instance_id}: {state.status.name}"))
    if note:  # what to do: wrapped to the width, never cut
        console.print(Text(f"  {note}"), soft_wrap=False)
    if selection is None and len(states) > ROW_LIMIT:
        selection = Selection(
            [(sid, s.status.value, _duration(s.started_at, s.finished_at)) for sid, s in states.items()]
        )
    shown = list(states.items())
    if selection is not None:
        shown = [(sid, states[sid]) for sid in selection.ids if sid in states]
        for line in selection.lines():
            console.print(Text(line), soft_wrap=False)
    step_width = min(20, max((len(sid) for sid, _ in shown), default=4))
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    table.add_column("step", overflow="fold", min_width=min(step_width, 8), max_width=max(step_width, 8))
    table.add_column("status", no_wrap=True, min_width=9)
    for col in ("attempts", "duration", "cpu", "peak RSS", "waited"):
        table.add_column(col, justify="right", no_wrap=True)
    for sid, s in shown:
        table.add_row(*_row(sid, s))
    console.print(table)
    print_item_lines(shown, console, state.instance_id)
    errors = [(sid, s.error) for sid, s in shown if s.error]
    if errors:
        console.print(Text("errors:"))
        for sid, error in errors:
            console.print(Text(shorten(f"  {sid}: {step_error(error)}", width)), soft_wrap=False)
    if not console.is_terminal:  # one line for a pipe (grep, a log file)
        console.print(Text("data: " + data_text(state.data, PIPE_LIMIT)), soft_wrap=True)
        return
    # At most two lines, cut at the width: a repr has few places a word wrap would like.
    text = "data: " + data_text(state.data, 2 * width - len("data: "))
    for start in range(0, len(text), width):
        console.print(Text(text[start : start + width]), soft_wrap=True)


def print_runs(rows: list[tuple[datetime | None, str, dict[str, Any]]], console: Any, notes: dict[str, str]) -> None:
    """One line per run: full id, workflow, status, created, duration; errors shortened under the table."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    if not rows:
        return
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    # Only the workflow's name gives way: ids are pasted back, statuses and times read whole.
    id_width = max(len(iid) for _, iid, _ in rows)
    table.add_column("id", no_wrap=True, min_width=id_width)
    workflow_width = max(8, min(24, console.width - id_width - 9 - 11 - 6 - 4 * 2))
    table.add_column("workflow", no_wrap=True, overflow="ellipsis", max_width=workflow_width)
    table.add_column("status", no_wrap=True, min_width=9)
    table.add_column("created", no_wrap=True, min_width=11)
    table.add_column("took", no_wrap=True, justify="right", min_width=6)
    for created, iid, m in rows:
        when = created.astimezone().strftime("%m-%d %H:%M") if created else ""
        took = run_duration(m)
        status = m["status"].upper() + ("?" if iid in notes else "")
        table.add_row(iid, m["workflow_id"], status, when, _took(took))
    console.print(table)
    width = console.width
    gone = [iid for _, iid, _ in rows if iid in notes]
    if gone:
        console.print(Text("RUNNING?:"))
    for iid in gone:  # what to do: wrapped to the width, never cut
        console.print(Text(f"  {iid[:8]}: {notes[iid]}"), soft_wrap=False)
    errors = [(iid, m["error"]) for _, iid, m in rows if m.get("error") and iid not in notes]
    if errors:
        console.print(Text("errors:"))
    for iid, error in errors:
        console.print(Text(shorten(f"  {iid[:8]}: {step_error(error)}", width)), soft_wrap=False)


def run_duration(meta: dict[str, Any]) -> float | None:
    """Seconds from a finished run's start to its end (``None`` while it runs)."""
    if meta.get("status") in ("running", "pending"):
        return None
    return _duration(meta.get("created_at"), meta.get("updated_at"))


def _took(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"


def state_json(state: WorkflowState[Any]) -> dict[str, Any]:
    """A run as plain JSON-able data."""
    data: Any = state.data
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        data = {k: v for k, v in vars(data).items()}
    return {
        "instance_id": state.instance_id,
        "workflow_id": state.workflow_id,
        "status": state.status.name,
        "error": state.error,
        "failed_step": state.failed_step,
        "created_at": state.created_at.isoformat() if state.created_at else None,
        "updated_at": state.updated_at.isoformat() if state.updated_at else None,
        "steps": {
            sid: {
                **progress_json(s, _duration(s.started_at, s.finished_at)),
                **(_NO_ITEMS if s.items is None else items_json(s)),
            }
            for sid, s in state.step_states.items()
        },
        "data": json.loads(json.dumps(data, default=repr)),
    }


_NO_ITEMS = {"items": None}  # an ordinary step's, as items_json gives it (20,000 calls fewer)


def progress_json(unit: StepState | ItemState, duration: float | None) -> dict[str, Any]:
    """A step's or an item's status, attempts, times, error and history as plain JSON-able data."""
    return {
        "status": unit.status.name,
        "attempts": unit.attempts,
        "started_at": unit.started_at.isoformat() if unit.started_at else None,
        "finished_at": unit.finished_at.isoformat() if unit.finished_at else None,
        "duration": duration,
        "error": unit.error,
        "history": [attempt_json(a) for a in unit.history],
    }


def attempt_json(attempt: Attempt) -> dict[str, Any]:
    """One attempt's figures as plain JSON-able data (times as ISO 8601)."""
    out = attempt.to_record()
    for key in ("started_at", "finished_at"):
        out[key] = out[key].isoformat() if out[key] else None
    return out


def runs_json(rows: list[tuple[datetime | None, str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The runs ``list`` shows, as plain JSON-able data."""
    return [
        {
            "instance_id": iid,
            "workflow_id": m["workflow_id"],
            "status": m["status"].upper(),
            "created_at": created.isoformat() if created else None,
            "error": m.get("error"),
            "duration": run_duration(m),
            "owner_gone": owner_note(m, iid, None) is not None,
        }
        for created, iid, m in rows
    ]
