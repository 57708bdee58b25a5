"""One self-contained HTML file that shows a run: summary, the DAG, a timeline of every attempt.

No server, no network, no script: the page is HTML and inline SVG rendered
with jinja2 (which escapes every step id and error text), and hovering a bar
shows its figures through SVG's own ``<title>`` tooltips. The geometry is
computed here, as plain data, and the template only draws it:

    WorkflowState + dependencies ─▶ summary, dag_layout, timeline ─▶ report.html

Why no plotting library: a Gantt chart is rectangles on a time axis, and the
DAG is drawn in layers by depth (a step's column is one past its deepest
dependency), which needs no layout engine. Plotly would draw the same from a
3.5 MB script embedded in every report.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from .report_items import attempts_of, failed_items, item_row, items_note
from .states import Attempt, AttemptOutcome, StepState, StepStatus, WorkflowState

__all__ = ["COLOURS", "Dependencies", "render_report"]

# step id -> (depends_on, depends_on_any), as the stored definition fingerprint has them
Dependencies = dict[str, tuple[list[str], list[str]]]

# One colour per attempt outcome, in AttemptOutcome's order (the legend's); zip(strict) fails on a new one.
_OUTCOME_COLOURS = ("#2e9d5b", "#d64545", "#e08a1e", "#8e44ad", "#7f8c8d", "#c3c9cd")
OUTCOME_COLOURS = {o.value: c for o, c in zip(AttemptOutcome, _OUTCOME_COLOURS, strict=True)}
COLOURS = {
    **OUTCOME_COLOURS,
    "running": "#3b82f6",
    "pending": "#ffffff",
    "waiting": "#f2d16b",
}

ROW = 26  # px per timeline row
LABEL_W = 180  # px for the step ids left of the timeline
PLOT_W = 860  # px for the time axis
NODE_W, NODE_H, COL_GAP, ROW_GAP = 150, 30, 60, 14
DRAW_LIMIT = 200  # steps drawn in the graph, timeline and table; a larger run shows those worth a look
_WORTH_A_LOOK = (StepStatus.FAILED, StepStatus.RUNNING, StepStatus.WAITING, StepStatus.CANCELLED)


@dataclass
class Bar:
    """One drawn interval of a step's row."""

    kind: str  # an attempt outcome, "running", "wait" or "queued"
    x: float
    width: float
    title: str
    mark: str | None = None  # the signal that killed it, drawn at its end
    y: float = 4  # from the row's top: a for_each step's lanes (report_items.py) set these
    h: float = ROW - 8


@dataclass
class Row:
    step_id: str
    status: str
    y: float
    bars: list[Bar] = field(default_factory=list)
    note: str = ""  # what a step with no attempt did (skipped by run_if, never started, …)
    height: float = ROW
    items: str = ""  # a for_each step's "done/total items", under its label


@dataclass
class Node:
    step_id: str
    status: str
    x: float
    y: float
    title: str
    stack: bool = False  # a for_each step: drawn as a stack of cards


@dataclass
class Edge:
    x1: float
    y1: float
    x2: float
    y2: float
    any_: bool  # a depends_on_any edge (dashed)


def render_report(state: WorkflowState[Any], dependencies: Dependencies, now: datetime | None = None) -> str:
    """The report of one run as a complete HTML document (a run in progress is drawn up to ``now``)."""
    import jinja2

    now = now or state.updated_at or datetime.now(UTC)
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("wfaas", "templates"), autoescape=True, undefined=jinja2.StrictUndefined
    )
    bounds = _bounds(state, now)
    drawn, note = drawn_steps(state, dependencies)
    rows, ticks, height = timeline(drawn, now, bounds)
    nodes, edges, dag_w, dag_h = dag_layout(drawn, dependencies)
    return env.get_template("report.html").render(
        state=state,
        note=note,
        summary=summary(state, dependencies, bounds),
        rows=rows,
        ticks=ticks,
        height=height,
        nodes=nodes,
        edges=edges,
        dag_w=dag_w,
        dag_h=dag_h,
        colours=COLOURS,
        legend=[*OUTCOME_COLOURS, "running"],
        label_w=LABEL_W,
        plot_w=PLOT_W,
        row_h=ROW,
        node_w=NODE_W,
        node_h=NODE_H,
        table=[_table_row(sid, s) for sid, s in drawn.step_states.items()],
        generated=datetime.now(UTC),
    )


def _table_row(sid: str, s: StepState) -> tuple[Any, ...]:
    """(step, state, attempts, figures, traceback, (failed items, how many more)) for the steps table."""
    if s.items is None:
        figures = _figures_line(s.history[-1]) if s.history else ""
        return sid, s, s.attempts, figures, _last_traceback(s), ([], 0)
    attempts = sum(i.attempts for i in s.items.values())
    return sid, s, attempts, f"for each: {items_note(s)}", "", failed_items(s)


def drawn_steps(state: WorkflowState[Any], deps: Dependencies) -> tuple[WorkflowState[Any], str | None]:
    """The run with only the steps worth drawing, and a note saying so; all of them up to DRAW_LIMIT.

    A run of 20,000 steps drawn whole is a 20 MB page no one can read (issue 13):
    above the limit the graph, timeline and table keep the failed, running,
    waiting and cancelled steps, the critical path and the slowest steps.
    """
    steps = state.step_states
    if len(steps) <= DRAW_LIMIT:
        return state, None
    look = [sid for sid, s in steps.items() if s.status in _WORTH_A_LOOK][: DRAW_LIMIT // 2]
    busy = sorted(((sum(a.wall or 0.0 for a in attempts_of(s)), sid) for sid, s in steps.items()), reverse=True)
    keep = {*look, *critical_path(state, deps)}
    for _, sid in busy:  # then the longest, up to the limit (the critical path's may be among them)
        if len(keep) >= DRAW_LIMIT:
            break
        keep.add(sid)
    drawn = replace(state, step_states={sid: s for sid, s in steps.items() if sid in keep})
    note = (
        f"{len(steps)} steps: the graph, timeline and table show {len(keep)} of them (failed, running, waiting "
        "and cancelled steps, the critical path, then the longest); `wfaas-local status ID --json` has every step."
    )
    return drawn, note


# -- the timeline ---------------------------------------------------------------


def _span(attempt: Attempt) -> tuple[datetime | None, datetime | None]:
    """When the attempt's waiting began, and when it ended."""
    if attempt.started_at is None:
        return None, attempt.finished_at
    return attempt.started_at - timedelta(seconds=attempt.waited + attempt.queued), attempt.finished_at


def _bounds(state: WorkflowState[Any], now: datetime) -> tuple[datetime, datetime]:
    starts: list[datetime] = [state.created_at] if state.created_at else []
    ends: list[datetime] = []
    for s in state.step_states.values():
        for a in attempts_of(s):
            begin, end = _span(a)
            starts += [begin] if begin else []
            ends += [end] if end else []
        starts += [s.started_at] if s.started_at else []
        ends += [s.finished_at] if s.finished_at else []  # not wait_until: a wait of hours would squash the rest
        if s.status is StepStatus.RUNNING or any(i.status is StepStatus.RUNNING for i in (s.items or {}).values()):
            ends.append(now)
    t0 = min(starts) if starts else now
    t1 = max([*ends, t0])
    return t0, t1


def nice_step(span: float, target_ticks: int = 8) -> float:
    """A tick interval of 1, 2 or 5 times a power of ten giving about ``target_ticks`` ticks."""
    raw = max(span, 1e-3) / target_ticks
    power = 10.0 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def timeline(
    state: WorkflowState[Any], now: datetime, bounds: tuple[datetime, datetime]
) -> tuple[list[Row], list[tuple[float, str]], float]:
    """Rows of bars (x in px from the left of the plot, which spans ``bounds``), the axis ticks, the plot's height."""
    t0, t1 = bounds
    span = max((t1 - t0).total_seconds(), 1e-3)
    scale = PLOT_W / span

    def x(t: datetime) -> float:
        return (t - t0).total_seconds() * scale

    rows = []
    y = 0.0
    for sid, s in state.step_states.items():
        row = Row(sid, s.status.value, y)
        if s.items is not None:
            bars, row.height = item_row(sid, s, x, now, PLOT_W, _describe)
            row.bars = [Bar(b.kind, b.x, b.width, b.title, None, b.y, b.h) for b in bars]
            row.items = items_note(s)
        y += row.height
        for a in s.history:
            if a.started_at is None or a.finished_at is None:
                continue
            wait_from = a.started_at - timedelta(seconds=a.waited + a.queued)
            queued_from = a.started_at - timedelta(seconds=a.queued)
            if a.waited > 0:
                row.bars.append(
                    Bar(
                        "wait",
                        x(wait_from),
                        a.waited * scale,
                        f"{sid}: {a.wait_kind} before attempt {a.number}, {_secs(a.waited)}",
                    )
                )
            if a.queued * scale >= 1:
                row.bars.append(
                    Bar(
                        "queued",
                        x(queued_from),
                        a.queued * scale,
                        f"{sid}: attempt {a.number} waited {_secs(a.queued)} for a free worker",
                    )
                )
            title = _describe(sid, a)
            row.bars.append(Bar(a.outcome, x(a.started_at), x(a.finished_at) - x(a.started_at), title, a.signal))
        if s.status is StepStatus.RUNNING and s.started_at is not None and s.items is None:
            row.bars.append(
                Bar("running", x(s.started_at), x(now) - x(s.started_at), f"{sid}, attempt {s.attempts}: running")
            )
        if s.status is StepStatus.WAITING and s.wait_until is not None:
            row.note = f"waiting until {s.wait_until:%H:%M:%S}"
        elif not s.history and not row.bars and s.status is not StepStatus.RUNNING:
            row.note = _no_attempt_note(s)
        rows.append(row)
    step = nice_step(span)
    ticks = [(k * step * scale, _secs(k * step)) for k in range(int(span / step) + 1)]
    return rows, ticks, max(y, ROW)


def _describe(where: str, a: Attempt) -> str:
    """An attempt's tooltip: outcome, figures, error, the end of its traceback."""
    title = f"{where}, attempt {a.number}: {a.outcome.replace('_', ' ')}\n{_figures_line(a)}"
    if a.error:
        title += f"\n{a.error}"
    if a.traceback:
        title += "\n\n" + _tail(a.traceback, TOOLTIP_TRACEBACK_LINES)
    return title


# A tooltip shows the end of a traceback (where it failed); the steps table has all of it.
TOOLTIP_TRACEBACK_LINES = 20


def _tail(text: str, lines: int) -> str:
    parts = text.rstrip("\n").split("\n")
    if len(parts) <= lines:
        return "\n".join(parts)
    return "\n".join([f"... {len(parts) - lines} lines above (all of it in the steps table)", *parts[-lines:]])


def _last_traceback(s: StepState) -> str:
    """The traceback of the step's last attempt that raised, or ""."""
    return next((a.traceback for a in reversed(s.history) if a.traceback), None) or ""


def _no_attempt_note(s: StepState) -> str:
    if s.status is StepStatus.SKIPPED:
        return f"skipped{': ' + s.error if s.error else ''}"
    notes = {StepStatus.PENDING: "not started", StepStatus.CANCELLED: "cancelled before it started"}
    return notes.get(s.status, str(s.status.value))


def _secs(seconds: float) -> str:
    if seconds >= 120:
        return f"{seconds / 60:.1f} min"
    if seconds >= 10:
        return f"{seconds:.0f} s"
    if seconds >= 1 or seconds == 0:
        return f"{seconds:.3g} s"
    return f"{seconds * 1000:.3g} ms"


def _figures_line(a: Attempt) -> str:
    parts = [f"wall {_secs(a.wall)}" if a.wall is not None else "wall —"]
    parts.append(f"cpu {_secs(a.cpu)}" if a.cpu is not None else "cpu —")
    parts.append(f"peak RSS {a.max_rss / 2**20:.0f} MiB" if a.max_rss else "peak RSS —")
    if a.waited:
        parts.append(f"{a.wait_kind} {_secs(a.waited)}")
    parts.append(f"queued {_secs(a.queued)}")
    if a.signal:
        parts.append(f"killed by {a.signal}")
    elif a.exitcode is not None:
        parts.append(f"exit code {a.exitcode}")
    return ", ".join(parts)


# -- the DAG ------------------------------------------------------------------------


def depths(order: Iterable[str], deps: Dependencies) -> dict[str, int]:
    """Each step's column: one past its deepest dependency, 0 without any (``wfaas-local graph`` prints the same).

    ``order`` lists every step after its dependencies; a dependency not in it counts as column 0.
    """
    depth: dict[str, int] = {}
    for sid in order:
        all_deps, any_deps = deps.get(sid, ([], []))
        depth[sid] = 1 + max((depth.get(p, 0) for p in [*all_deps, *any_deps]), default=-1)
    return depth


def dag_layout(state: WorkflowState[Any], deps: Dependencies) -> tuple[list[Node], list[Edge], float, float]:
    """Nodes in columns by depth (one past the deepest dependency), edges between their sides."""
    depth = depths(state.step_states, deps)  # steps come in definition order, dependencies first
    columns: dict[int, list[str]] = {}
    for sid, d in depth.items():
        columns.setdefault(d, []).append(sid)
    pos: dict[str, tuple[float, float]] = {}
    for d, members in columns.items():
        for k, sid in enumerate(members):
            pos[sid] = (d * (NODE_W + COL_GAP), k * (NODE_H + ROW_GAP))
    nodes = []
    for sid, (x, y) in pos.items():
        s = state.step_states[sid]
        title = f"{sid}: {s.status.value}, {s.attempts} attempt(s)"
        if s.items is not None:
            title = f"{sid}: {s.status.value}, for each item: {items_note(s)}"
        nodes.append(Node(sid, s.status.value, x, y, title, s.items is not None))
    edges = []
    for sid, (all_deps, any_deps) in deps.items():
        if sid not in pos:
            continue
        for parent, any_ in [(p, False) for p in all_deps] + [(p, True) for p in any_deps]:
            if parent in pos:
                (px, py), (cx, cy) = pos[parent], pos[sid]
                edges.append(Edge(px + NODE_W, py + NODE_H / 2, cx, cy + NODE_H / 2, any_))
    width = (max(depth.values(), default=0) + 1) * (NODE_W + COL_GAP)
    height = max((len(m) for m in columns.values()), default=1) * (NODE_H + ROW_GAP)
    return nodes, edges, width, height


# -- the summary -------------------------------------------------------------------


def summary(state: WorkflowState[Any], deps: Dependencies, bounds: tuple[datetime, datetime]) -> dict[str, Any]:
    """Status, duration (``bounds``: the run's first and last moment), attempts, slowest steps, critical path."""
    t0, t1 = bounds
    busy = {sid: _busy(s) for sid, s in state.step_states.items()}
    slowest = sorted((item for item in busy.items() if item[1] > 0), key=lambda item: -item[1])[:5]
    # A for_each step's unit of work is the item: its attempts and retries are the items'.
    units = [(s.attempts, len(s.history)) for s in state.step_states.values() if s.items is None]
    units += [(i.attempts, len(i.history)) for s in state.step_states.values() for i in (s.items or {}).values()]
    return {
        "duration": _secs((t1 - t0).total_seconds()),
        "attempts": sum(n for n, _ in units),
        "retries": sum(max(h - 1, 0) for _, h in units),
        "counts": _counts(state),
        "items": [(sid, items_note(s)) for sid, s in state.step_states.items() if s.items is not None],
        "slowest": [(sid, _secs(seconds)) for sid, seconds in slowest],
        "critical_path": [(sid, _secs(busy[sid])) for sid in critical_path(state, deps)],
    }


def _busy(step: StepState) -> float:
    """How long a step kept the run busy: its attempts' wall time; a for_each step's span, first item to last
    (its items overlap: their sum is work, not time)."""
    if step.items is not None and step.started_at is not None and step.finished_at is not None:
        return (step.finished_at - step.started_at).total_seconds()
    return sum(a.wall or 0.0 for a in attempts_of(step))


def _counts(state: WorkflowState[Any]) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for s in state.step_states.values():
        counts[s.status.value] = counts.get(s.status.value, 0) + 1
    return sorted(counts.items())


def critical_path(state: WorkflowState[Any], deps: Dependencies) -> list[str]:
    """The chain that set the run's length: from the step that finished last, back through the
    dependency that let each step start (the last of its ``depends_on`` to finish, or the first
    of its ``depends_on_any``, whichever came later)."""
    finished = {sid: s.finished_at for sid, s in state.step_states.items() if s.finished_at is not None}
    if not finished:
        return []
    path = [max(finished, key=lambda sid: finished[sid])]
    while True:
        all_deps, any_deps = deps.get(path[-1], ([], []))
        gates = [max((p for p in all_deps if p in finished), key=finished.__getitem__, default=None)]
        gates.append(min((p for p in any_deps if p in finished), key=finished.__getitem__, default=None))
        parents = [p for p in gates if p is not None and p not in path]
        if not parents:
            return path[::-1]
        path.append(max(parents, key=finished.__getitem__))
