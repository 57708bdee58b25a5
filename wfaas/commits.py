"""Checkpoints: what one turn changed, written as one batch, and what waits for its commit.

Group commit: while one batch is being written, the next turns' changes
accumulate and go out together once it is done, so a slow store costs
fewer, larger writes instead of a queue of small ones. A batch holds what
may happen only once it is committed: dependents dispatched (the ready-queue
``mark``), events published, finished runs released, futures resolved.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .events import EventBus
from .runs import Run
from .store import Checkpoint, StateStore


@dataclass(eq=False)
class Batch:
    """One turn's checkpoint in flight, and what may happen only once it is committed."""

    mark: int  # ready-queue entries up to this sequence number depend on nothing newer
    runs: list[Run]
    events: list[Any]
    finished: list[Run]
    resolve: list[tuple[concurrent.futures.Future[Any], Any]]
    committed: bool = False
    error: Exception | None = None

    def acknowledge(self, wake: Callable[[], None]) -> Callable[[Exception | None], None]:
        """The callback a store calls (on any thread) once the checkpoint is committed or failed."""

        scheduler_thread = threading.get_ident()

        def done(error: Exception | None) -> None:
            self.error = error
            self.committed = True
            if threading.get_ident() != scheduler_thread:
                wake()  # acknowledged inline (in-memory stores) needs no wake-up

        return done


class Commits:
    """What this turn changed (``dirty`` runs, ``events``, ``finished`` runs, futures to ``resolve``),
    and the batches handed to the store and not yet released, oldest first."""

    def __init__(self, store: StateStore, bus: EventBus, wake: Callable[[], None]) -> None:
        self.store, self.bus, self.wake = store, bus, wake
        self.dirty: dict[str, Run] = {}
        self.events: list[Any] = []
        self.finished: list[Run] = []
        self.resolve: list[tuple[concurrent.futures.Future[Any], Any]] = []
        self.pending: collections.deque[Batch] = collections.deque()
        self.committed_mark = 0  # ready-queue entries up to this sequence number are committed
        self.wrote = False  # the last write_turn wrote a checkpoint (it did not wait for a write in flight)

    def write_turn(self, mark: int, owner: dict[str, Any], now: datetime, *, waited_on: bool = False) -> None:
        """This turn's changes as one batch; while a write is in flight they wait and go out with the next.

        ``waited_on``: nothing else can progress until it is committed (the store may write it in this thread).
        """
        self.wrote = False
        if self.writing:
            return  # group commit
        batch = Batch(mark, list(self.dirty.values()), self.events, self.finished, self.resolve)
        self.events, self.finished, self.resolve = [], [], []
        checkpoints = [checkpoint(run, owner, now) for run in self.dirty.values()]
        self.dirty.clear()
        self.wrote = bool(checkpoints)
        self.write(batch, checkpoints, waited_on)

    def release(self, ended: Callable[[Run], None], failed: Callable[[list[Run], Exception], None]) -> None:
        """Release, in order, what waited for commits that are done: dependents, events, waiters.

        ``ended(run)`` for each run whose end is committed, before its waiters
        wake; ``failed(runs, error)`` for a batch the store could not write.
        """
        failures = False
        for batch in self.completed():
            if batch.error is not None:
                failed(batch.runs, batch.error)
                failures = True
            if batch.events:
                self.bus.publish(batch.events)
            for run in batch.finished:
                ended(run)
                run.done.set()
                for waiter in run.waiters:
                    waiter.set_result(run.status)
            for future, result in batch.resolve:
                future.set_result(result)
            # The store may hold on to the acknowledgement (and so this batch) until its next commit:
            # let go of the runs now, or the last finished run stays in memory with all its data.
            batch.runs, batch.events, batch.finished, batch.resolve = [], [], [], []
        if failures and (self.dirty or self.events or self.finished or self.resolve):
            # A failed commit changed state: another turn checkpoints it. Only then: changes that wait for
            # a write in flight go out when its acknowledgement wakes the loop, which must not spin meanwhile.
            self.wake()

    @property
    def writing(self) -> bool:
        """A batch is being written: the next one waits (group commit)."""
        return bool(self.pending) and not self.pending[-1].committed

    def write(self, batch: Batch, checkpoints: list[Checkpoint], waited_on: bool = False) -> None:
        """Hand one batch to the store; a store that raises fails the batch, never hangs it."""
        self.pending.append(batch)
        if not checkpoints:
            batch.committed = True
            return
        try:
            (self.store.write_now if waited_on else self.store.write_async)(checkpoints, batch.acknowledge(self.wake))
        except Exception as exc:  # noqa: BLE001 - turned into a failed run, never a hung one
            batch.acknowledge(self.wake)(exc)

    def completed(self) -> Iterator[Batch]:
        """The committed (or failed) batches, in the order they were written, each once."""
        while self.pending and self.pending[0].committed:
            batch = self.pending.popleft()
            self.committed_mark = batch.mark
            yield batch


def checkpoint(run: Run, owner: dict[str, Any], now: datetime) -> Checkpoint:
    """Everything of ``run`` that changed since its last checkpoint (and clears those marks)."""
    meta = {
        "workflow_id": run.workflow_id,
        "status": run.status._value_,  # _value_, not value: a plain attribute, read per step
        "error": str(run.error) if run.error else None,
        "error_type": type(run.error).__name__ if run.error else None,
        "failed_step": run.failed_step,
        "created_at": run.created_at,
        "updated_at": now,
        "owner": owner if not run.final else None,
    }
    steps = {}
    lists, items = {}, {}
    for i in run.dirty_steps:
        s = run.steps[i]
        steps[s.sid] = {
            "status": s.status._value_,
            "attempts": s.attempts,
            "started_at": s.started_at,
            "finished_at": s.finished_at,
            "error": s.error,
            "wait_until": s.wait_until,
            "history": list(s.history),  # a copy: the store may encode it after this turn
        }
        if s.items is not None:  # for_each: the collection once, then the items that changed
            listed, items[s.sid] = s.items.take_changes()
            if listed is not None:
                lists[s.sid] = listed
    run.dirty_steps.clear()
    fields, deltas = run.data.take_changes()
    extra, run.extra = run.extra, {}
    logs, run.logs = run.logs, {}
    return Checkpoint(run.iid, meta, steps, fields, extra, deltas, logs=logs, item_lists=lists, items=items)
