"""The report's row of a ``for_each`` step: its items' attempts packed into lanes, and a density strip.

One timeline row per step, whatever its number of items (API.md §12). Inside
a ``for_each`` step's row:

- **lanes**: each item attempt goes to the first lane free at its start (the
  classic interval packing), so the lanes show how many items ran at once
  and each attempt is a bar of its own. At most :data:`LANE_LIMIT` lanes are
  drawn; an attempt that finds none free shares the lane that frees first
  (the strip below still counts it).
- **merging**: a succeeded attempt narrower than :data:`MIN_PX` cannot be
  seen or hovered alone; such neighbours in a lane become one bar whose
  tooltip counts them and names the first and last item. Failed, timed-out,
  crashed and running attempts keep a bar each (up to :data:`SINGLE_LIMIT`
  per step), so a failure is never hidden in a batch.
- **density strip**: under the lanes, how many items ran at once, in
  :data:`BUCKETS` columns across the time axis.

The page then grows with the pixels, not with the items: 10,000 items draw
a few hundred bars.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime

from .states import Attempt, StepState, StepStatus

__all__ = [
    "BUCKETS",
    "LANE_LIMIT",
    "MIN_PX",
    "SINGLE_LIMIT",
    "ItemBar",
    "attempts_of",
    "failed_items",
    "item_row",
    "items_note",
    "no_items",
]

LANE_LIMIT = 12  # lanes drawn in one step's row
LANE_H = 6  # px per lane; 10 while there are at most 4 (a few lanes read better thick)
STRIP_H = 12  # px for the density strip
MIN_PX = 3.0  # a succeeded attempt narrower than this is merged with its neighbours
SINGLE_LIMIT = 400  # attempts of one step drawn with a bar (and a tooltip) of their own
BUCKETS = 172  # columns of the density strip (5 px each across the 860 px axis)


def attempts_of(step: StepState) -> Iterator[Attempt]:
    """Every attempt of a step: its own and, for a ``for_each`` step, each item's."""
    yield from step.history
    for item in (step.items or {}).values():
        yield from item.history


@dataclass
class ItemBar:
    """One bar of a ``for_each`` row: kind (an outcome, "running" or "density"), place and tooltip."""

    kind: str
    x: float
    width: float
    y: float  # from the row's top
    h: float
    title: str

    def __post_init__(self) -> None:
        # A tenth of a pixel is finer than any screen: 15 digits per number would double the page.
        self.x, self.width = round(self.x, 1), round(self.width, 1)


@dataclass
class _Span:
    key: str
    kind: str
    x0: float
    x1: float
    attempt: Attempt | None  # None for an attempt still running


def _spans(step: StepState, x: Callable[[datetime], float], now: datetime) -> list[_Span]:
    spans = []
    for key, item in (step.items or {}).items():
        for a in item.history:
            if a.started_at is not None and a.finished_at is not None:
                spans.append(_Span(key, a.outcome, x(a.started_at), x(a.finished_at), a))
        if item.status is StepStatus.RUNNING and item.started_at is not None:
            since = max([item.started_at, *(a.finished_at for a in item.history if a.finished_at)])
            spans.append(_Span(key, "running", x(since), x(now), None))
    spans.sort(key=lambda s: (s.x0, s.x1))
    return spans


def _pack(spans: list[_Span]) -> list[list[_Span]]:
    """Each span into the first lane free at its start; above LANE_LIMIT, the lane that frees first."""
    lanes: list[list[_Span]] = []
    free: list[tuple[float, int]] = []  # (where the lane's last span ends, lane)
    for span in spans:
        if free and (free[0][0] <= span.x0 or len(lanes) >= LANE_LIMIT):
            end, lane = heapq.heappop(free)
        else:
            lane, end = len(lanes), span.x1
            lanes.append([])
        lanes[lane].append(span)
        heapq.heappush(free, (max(end, span.x1), lane))
    return lanes


def item_row(
    sid: str,
    step: StepState,
    x: Callable[[datetime], float],
    now: datetime,
    plot_w: float,
    describe: Callable[[str, Attempt], str],
) -> tuple[list[ItemBar], float]:
    """The bars of a ``for_each`` step's row (y from the row's top) and the row's height.

    ``describe(where, attempt)`` is the report's tooltip for one attempt.
    """
    lanes = _pack(_spans(step, x, now))
    lane_h = 10 if len(lanes) <= 4 else LANE_H
    bars: list[ItemBar] = []
    singles = 0
    for n, lane in enumerate(lanes):
        y = 4 + n * lane_h
        batch: list[_Span] = []
        for span in lane:
            alone = span.kind != "succeeded" or span.x1 - span.x0 >= MIN_PX
            if alone and singles < SINGLE_LIMIT:
                singles += 1
                bars += _batch(sid, batch, y, lane_h)
                batch = []
                bars.append(_single(sid, span, y, lane_h, describe))
            elif batch and (batch[-1].kind != span.kind or span.x0 - batch[-1].x1 > 1.0):
                bars += _batch(sid, batch, y, lane_h)
                batch = [span]
            else:
                batch.append(span)
        bars += _batch(sid, batch, y, lane_h)
    top = 4 + max(len(lanes), 1) * lane_h + 3
    bars += _density(sid, lanes, top, plot_w)
    return bars, max(top + STRIP_H + 6, 26.0)


def _single(sid: str, span: _Span, y: float, h: float, describe: Callable[[str, Attempt], str]) -> ItemBar:
    # No signal mark beside the bar, as a step's row has: in a lane it would cover the neighbours
    # (the tooltip names the signal, the colour says timed out or crashed).
    where = f"{sid}[{span.key}]"
    if span.attempt is None:
        return ItemBar("running", span.x0, span.x1 - span.x0, y, h - 1, f"{where}: running")
    return ItemBar(span.kind, span.x0, span.x1 - span.x0, y, h - 1, describe(where, span.attempt))


def _batch(sid: str, batch: list[_Span], y: float, h: float) -> list[ItemBar]:
    if not batch:
        return []
    first, last = batch[0], batch[-1]
    if len(batch) == 1:
        what = f"{sid}[{first.key}]: {first.kind.replace('_', ' ')}"
    else:
        what = f"{sid}: {len(batch)} item attempts {first.kind.replace('_', ' ')}, {first.key} … {last.key}"
    return [ItemBar(first.kind, first.x0, last.x1 - first.x0, y, h - 1, what)]


def _density(sid: str, lanes: list[list[_Span]], top: float, plot_w: float) -> list[ItemBar]:
    """How many attempts ran at once, per column of the axis (the busiest column is the strip's height)."""
    width = plot_w / BUCKETS
    counts = [0.0] * BUCKETS
    for lane in lanes:
        for span in lane:
            # Each column gets the share of its width the attempt covered: the average number running.
            first, last = int(span.x0 // width), int(span.x1 // width)
            for b in range(max(first, 0), min(last, BUCKETS - 1) + 1):
                lo, hi = max(span.x0, b * width), min(span.x1, (b + 1) * width)
                counts[b] += max(hi - lo, 0.0) / width
    peak = max(counts, default=0.0)
    if peak <= 0:
        return []
    bars = []
    for b, count in enumerate(counts):
        if count <= 0:
            continue
        h = max(1.0, STRIP_H * count / peak)
        title = f"{sid}: {count:.1f} items running on average here (at most {peak:.1f} in a column)"
        bars.append(ItemBar("density", b * width, width, top + STRIP_H - h, h, title))
    return bars


def no_items(step: StepState) -> str:
    """What a ``for_each`` step without items says: its list is to come, or was empty (or never made)."""
    waiting = step.status in (StepStatus.PENDING, StepStatus.WAITING, StepStatus.RUNNING)
    return "list not computed yet" if waiting else "no items"


def items_note(step: StepState) -> str:
    """The line under a ``for_each`` step's label: ``9990/10000 items``."""
    if not step.items:
        return no_items(step)
    return f"{step.items_done}/{step.items_total} items"


def failed_items(step: StepState, limit: int = 50) -> tuple[list[tuple[str, str]], int]:
    """Up to ``limit`` failed items (key, error) for the steps table, and how many more there are."""
    failed = [(k, i.error or i.status.value) for k, i in (step.items or {}).items() if i.status is StepStatus.FAILED]
    return failed[:limit], max(0, len(failed) - limit)
