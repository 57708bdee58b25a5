"""``for_each`` steps: one step run once per item of a collection computed at run time (API.md §12).

How a ``for_each`` step travels, beside the journey of ``scheduler.py``::

    gate opens, run_if / delay allow --_open_items--> fn(data) in the scheduler --> ItemTable (keys: item_keys)
        fn raised, returned no iterable, an item cannot travel --> the step's failed attempt, never retried
    each item not yet succeeded --_enqueue--> admit (with_concurrency: else the table's backlog) --> ready queue
    an item's attempt is a Task like a step's: retry, timeout, memory limit, hooks, merge as writer "step[key]"
    an item moved --run.unsettled--> _settle, at _maybe_finish: the SETTLE table says the step waits,
        SUCCEEDS, FAILS, is CANCELLED or goes back to PENDING (the run stopped; resume runs the rest)
    checkpoint: the collection once, when computed; then only the records of the items that changed

An item is a ``StepRun`` of its own (``runs.py``) with its step's index and
id, so the scheduler runs it through the same code as a step; what differs
is decided here: the key rules, the cap, the table of how the step ends,
and the checkpoint of the items. ``ForEachSteps`` is the part of the
scheduler that acts on it (a mixin of ``Scheduler``).
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from . import data as data_codec
from . import events as ev
from . import verdicts
from .errors import StepFailed, WorkflowError
from .readiness import Gate
from .runs import Run, StepRun, Stopping
from .states import ITEM_DONE, StepStatus

if TYPE_CHECKING:
    import itertools
    from collections.abc import Callable
    from datetime import datetime

    from .clock import Clock
    from .runs import ReadyQueue

    class Scheduler(Protocol):
        """What ``ForEachSteps`` uses of the scheduler it is part of (a self-type for mypy)."""

        clock: Clock
        _ready: ReadyQueue
        _seq: itertools.count[int]

        def _condition_raised(
            self, run: Run, step: StepRun, exc: Exception, words: Callable[..., WorkflowError] = ...
        ) -> None: ...
        def _set_status(self, run: Run, step: StepRun, new: StepStatus) -> None: ...
        def _event(self, kind: type, run: Run, when: datetime, **fields: Any) -> None: ...
        def _enqueue(self, run: Run, step: StepRun, now: float) -> None: ...
        def _finish(
            self, run: Run, step: StepRun, status: StepStatus, *, reason: str = "", duration: float = 0.0
        ) -> None: ...
        def _fail_for_good(self, run: Run, step: StepRun, error: WorkflowError) -> None: ...
        def _items_failed(self, run: Run, step: StepRun) -> WorkflowError: ...
        def _maybe_finish(self, run: Run) -> None: ...


S = StepStatus
_NO_GATE = Gate(0, 0)  # items have no dependencies of their own: their step's gate opened


def item_keys(items: list[Any]) -> list[str]:
    """Each item's key: ``str(item)`` when every item is a str, int or path and those are unique, else its index."""
    if all(isinstance(i, str | int | os.PathLike) for i in items):
        keys = [str(i) for i in items]
        if len(set(keys)) == len(keys):
            return keys
    return [str(n) for n in range(len(items))]


class ItemsError(Exception):
    """``fn`` of ``for_each`` raised, returned no iterable, or returned an item that cannot travel."""


def collect(fn: Any, data: Any) -> tuple[list[str], list[bytes]]:
    """Call ``fn(data)``; the items' keys and encodings. Raises ``ItemsError`` (with the cause) naming what failed."""
    try:
        returned = fn(data)
    except Exception as exc:
        raise ItemsError(f"for_each raised {type(exc).__name__}: {exc}") from exc
    if isinstance(returned, str | bytes) or not hasattr(returned, "__iter__"):
        raise ItemsError(
            f"for_each returned {type(returned).__name__}, not an iterable of items; "
            "return a list (or any iterable) of the items, e.g. .for_each(lambda data: data.files)"
        )
    try:
        items = list(returned)
    except Exception as exc:
        raise ItemsError(f"for_each's iterable raised {type(exc).__name__}: {exc}") from exc
    blobs = []
    for n, item in enumerate(items):
        try:
            blobs.append(data_codec.encode_value(item))
        except Exception as exc:
            raise ItemsError(
                f"item {n} ({_short(item)}) cannot be sent to a worker ({type(exc).__name__}: {exc}); "
                "return plain values (paths, ids, dicts of them) and open what they name in the step"
            ) from exc
    return item_keys(items), blobs


def _words(run: Run, step: StepRun, exc: BaseException) -> StepFailed:
    """The step's error when its items could not be had (``collect`` said why), with the cause."""
    error = StepFailed(str(exc), **verdicts.where(run, step))
    error.__cause__ = exc.__cause__ or exc
    return error


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(eq=False)
class ItemTable:
    """The items of one ``for_each`` step as the scheduler tracks them, with their counts and checkpoint marks."""

    items: list[StepRun]
    cap: int | None  # with_concurrency: attempts in flight at most
    listed: list[tuple[str, bytes]] | None = None  # the collection, until it is checkpointed
    dirty: set[int] = field(default_factory=set)  # positions whose record changed since the last checkpoint
    counts: collections.Counter[StepStatus] = field(default_factory=collections.Counter)
    backlog: collections.deque[StepRun] = field(default_factory=collections.deque)
    active: int = 0  # items in the ready queue or in a worker (what the cap counts)
    first_failed: StepRun | None = None

    @classmethod
    def build(cls, step: StepRun, keys: list[str], blobs: list[bytes], cap: int | None) -> ItemTable:
        """A fresh table, every item PENDING and marked for the checkpoint with the collection."""
        table = cls([], cap, listed=list(zip(keys, blobs, strict=True)))
        table.items = [_item(step, n, key, blob) for n, (key, blob) in enumerate(table.listed or ())]
        table.counts[S.PENDING] = len(keys)
        table.dirty.update(range(len(keys)))
        return table

    @classmethod
    def restore(
        cls, step: StepRun, listed: list[tuple[str, bytes]], records: dict[int, dict[str, Any]], cap: int | None
    ) -> ItemTable:
        """The table as checkpointed: succeeded and skipped items stay done, the others start over as PENDING."""
        table = cls([], cap)
        for n, (key, blob) in enumerate(listed):
            item = _item(step, n, key, blob)
            rec = records.get(n)
            if rec is not None:
                item.attempts = item.budget_start = rec.get("attempts", 0)
                item.started_at, item.finished_at = rec.get("started_at"), rec.get("finished_at")
                item.history = list(rec.get("history") or ())
                if S(rec["status"]) in ITEM_DONE:
                    item.status, item.error = S(rec["status"]), rec.get("error")
                else:
                    table.dirty.add(n)  # recorded as it was; checkpointed as PENDING
            table.counts[item.status] += 1
            table.items.append(item)
        return table

    @classmethod
    def restored(cls, step: StepRun, rec: dict[str, Any]) -> ItemTable | None:
        """The table of a resumed for_each step, from its step record as ``engine.resume`` passes it, or None."""
        if rec.get("item_list") is None:
            return None
        cap = step.run.compiled.steps[step.index].concurrency
        return cls.restore(step, rec["item_list"], rec.get("item_records") or {}, cap)

    def moved(self, item: StepRun, old: StepStatus) -> None:
        """``item``'s status (or record) changed: count it and mark it for the checkpoint."""
        if old is not item.status:
            self.counts[old] -= 1
            self.counts[item.status] += 1
            if item.status is S.FAILED and self.first_failed is None:
                self.first_failed = item
        self.dirty.add(item.position)

    def admit(self, item: StepRun) -> bool:
        """May ``item`` join the ready queue now? Else it waits in the backlog for an attempt of the step to end."""
        if self.cap is not None and self.active >= self.cap:
            self.backlog.append(item)
            return False
        self.active += 1
        return True

    def release(self) -> StepRun | None:
        """An item's attempt left its worker: the next item of the backlog, if one may go now."""
        self.active -= 1
        if self.backlog and (self.cap is None or self.active < self.cap):
            self.active += 1
            return self.backlog.popleft()
        return None

    def take_changes(self) -> tuple[list[tuple[str, bytes]] | None, dict[int, dict[str, Any]]]:
        """For the checkpoint: the collection if not yet written, and the records of the items that changed."""
        listed, self.listed = self.listed, None
        records = {n: record(self.items[n]) for n in self.dirty}
        self.dirty = set()
        return listed, records


def _item(step: StepRun, position: int, key: str, blob: bytes) -> StepRun:
    return StepRun(
        step.index, step.sid, _NO_GATE, step.run, item_key=key, item_blob=blob, parent=step, position=position
    )


def record(item: StepRun) -> dict[str, Any]:
    """An item's record in the store (``ItemState.to_record``'s shape)."""
    return {
        "key": item.item_key,
        "status": item.status._value_,
        "attempts": item.attempts,
        "started_at": item.started_at,
        "finished_at": item.finished_at,
        "error": item.error,
        "history": list(item.history),
    }


# How a for_each step ends, once no item is in a worker: by (an item is still to run, an item failed for
# good, how the run stops). No entry: the step goes on (an item runs, or one is still to run and the run
# goes on). CANCELLED items count as still to run (a resume runs them).
SETTLE: dict[tuple[bool, bool, Stopping | None], StepStatus] = {
    **{(False, False, stop): S.SUCCEEDED for stop in (None, Stopping.FAIL, Stopping.CANCEL)},
    **{(False, True, stop): S.FAILED for stop in (None, Stopping.FAIL, Stopping.CANCEL)},
    (True, True, Stopping.FAIL): S.FAILED,  # FAIL_WORKFLOW: no new item starts, the step failed
    (True, True, Stopping.CANCEL): S.CANCELLED,
    (True, False, Stopping.CANCEL): S.CANCELLED,
    (True, False, Stopping.FAIL): S.PENDING,  # another step failed: a resume runs the rest
}


def settled(table: ItemTable, stopping: Stopping | None) -> StepStatus | None:
    """The step's status now that its items moved (SETTLE), or None while it goes on."""
    counts = table.counts
    if counts[S.RUNNING]:
        return None
    left = counts[S.PENDING] + counts[S.WAITING] + counts[S.CANCELLED]
    return SETTLE.get((left > 0, counts[S.FAILED] > 0, stopping))


def key_field(step: StepRun) -> dict[str, str]:
    """The events' ``item_key`` of an item (an ordinary step's events leave it None)."""
    return {"item_key": step.item_key} if step.item_key is not None else {}


def items_of(run: Run) -> Iterator[StepRun]:
    """Every item of the run's for_each steps whose collection is known."""
    for step in run.steps:
        if step.items is not None:
            yield from step.items.items


class ForEachSteps:
    """The scheduler's part that opens a for_each step's items and ends the step when they end."""

    def _open_items(self: Scheduler, run: Run, step: StepRun, now: float) -> None:
        """The step's gate opened and run_if / delay allow it: compute (or take the restored) items, queue them."""
        sdef = run.compiled.steps[step.index]
        if step.items is None:
            try:
                # A data object of its own: what fn does to it stays out of the run (and of run_if's).
                keys, blobs = collect(sdef.items, data_codec.build(run.cls, run.snapshot().fields))
            except ItemsError as exc:
                self._condition_raised(run, step, exc, _words)
                return
            step.items = ItemTable.build(step, keys, blobs, sdef.concurrency)
        step.attempts += 1
        self._set_status(run, step, S.RUNNING)
        step.started_at, step.finished_at = self.clock.now(), None
        self._event(ev.StepStarted, run, step.started_at, step_id=step.sid, attempt=step.attempts)
        for item in step.items.items:
            if not item.done:
                self._enqueue(run, item, now)
        run.unsettled.add(step)
        self._maybe_finish(run)  # an empty (or, resumed, finished) collection ends now, whoever opened it

    def _release_item(self: Scheduler, item: StepRun) -> None:
        """An item's attempt left its worker: under ``with_concurrency`` the next one may be queued."""
        nxt = item.table.release()
        if nxt is not None:
            self._ready.push(item.run, nxt, next(self._seq))

    def _settle(self: Scheduler, run: Run) -> None:
        """End the for_each steps whose items moved, as SETTLE says."""
        while run.unsettled:
            step = run.unsettled.pop()
            if step.status.is_final or step.items is None:
                continue
            new = settled(step.items, run.stopping)
            if new is S.SUCCEEDED:
                began = step.started_at
                self._finish(
                    run, step, S.SUCCEEDED, duration=(self.clock.now() - began).total_seconds() if began else 0.0
                )
            elif new is S.FAILED:
                error = self._items_failed(run, step)
                fields = {"attempt": step.attempts, "error": str(error), "will_retry": False}
                self._event(ev.StepFailed, run, self.clock.now(), step_id=step.sid, **fields)
                self._fail_for_good(run, step, error)
            elif new is not None:  # CANCELLED or PENDING: the run stopped before its items ran
                self._set_status(run, step, new)
                step.finished_at = self.clock.now() if new is S.CANCELLED else None
                step.error = verdicts.CANCELLED_WHILE_RUNNING if new is S.CANCELLED else None

    def _items_failed(self: Scheduler, run: Run, step: StepRun) -> WorkflowError:
        assert step.items is not None
        table, first = step.items, step.items.first_failed
        n, total = table.counts[S.FAILED], len(table.items)
        said = f"item {first.item_key!r} failed: {first.error}" if first is not None else "an item failed"
        return StepFailed(f"{n} of {total} items failed; {said}", **verdicts.where(run, step))
