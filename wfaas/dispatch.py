"""Sending steps to workers: to idle ones, and one more behind a busy worker's short step.

``_dispatch`` hands ready steps (those whose inputs are committed) to idle
slots; ``_begin`` starts an attempt: RUNNING, its attempt counted,
StepStarted, its timeout.

Queueing behind. A worker that sends a step's reply otherwise waits a round
trip for its next step: the reply reaches the scheduler, which merges it, and
only then sends another. For steps of a few hundred microseconds that wait is
as long as the step, and every step costs both processes a sleep and a
wake-up (issue 17: a fan-out of 500 trivial steps took 1.3 times a bare
``ProcessPoolExecutor``, which keeps its workers' queue full). So once every
idle worker has a step, ``_queue_behind`` sends one more ready step to a busy
worker (``Slot.next``), which reads it as soon as its current reply is sent.

Only behind a step expected to be short (``QUEUE_BEHIND_BELOW``): its run's
recent attempts took less than that (``Run.recent_wall``, a moving average)
and it has not run that long yet. A run of long steps, where the round trip
does not matter, never queues.

For the run, a queued step has not started: ``_begin`` runs for it when the
reply of the step before it arrives (``_promote``). Until its worker starts
it, the scheduler can take it back: both read for its claim token in a pipe,
and one of them gets it (``pool.WorkerPool.offer``); a worker that finds no
token skips the step. A step is queued only while no token waits in that
pipe and no step taken back is still unread by the worker (it answers
``wire.Skipped``): else the worker, reading the step taken back, would take
the new step's token and run the wrong one. It is taken back when the step in front of
it has run QUEUE_BEHIND_BELOW after all (back to the head of the ready queue:
the next free worker runs it; ``_take_back_stuck``), and when its run stops
(``_take_back_run``). If its worker dies or is stopped first, it was never
run: back to the head of the ready queue as it was (``_unqueue``).

Once promoted, it is a running step like any other; a worker killed from
outside in the microseconds between sending one reply and reading the queued
step charges its crash to the queued step, as it would to a step it had just
started. A worker that claimed a step whose run began to stop (a cancel, a
FAIL_WORKFLOW failure) just before the scheduler could take it back starts
it: it is stopped at once and counted as never started
(``KillReason.UNQUEUED``), as the run's other unstarted steps are (PENDING: a
resume runs it, from the start).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Protocol

from . import events as ev
from . import wire
from .items import key_field as _key
from .loopio import TimerKind
from .runs import KillReason, Run, StepRun, Task, run_message
from .states import StepStatus

if TYPE_CHECKING:
    from datetime import datetime

    from .clock import Clock
    from .pool import Pool, Slot
    from .runs import ReadyQueue
    from .supervision import Supervisor

    class Scheduler(Protocol):
        """What ``Dispatch`` uses of the scheduler it is part of (a self-type for mypy)."""

        clock: Clock
        pool: Pool
        bus: ev.EventBus
        supervisor: Supervisor
        grace: float
        _ready: ReadyQueue
        _soon: bool

        def timer(self, when: float, kind: TimerKind, target: Any) -> int: ...
        def _event(self, kind: type, run: Run, when: datetime, **fields: Any) -> None: ...
        def _set_status(self, run: Run, step: StepRun, new: StepStatus) -> None: ...
        def _begin(self, task: Task) -> None: ...
        def _queue_behind(self, up_to: int) -> list[tuple[Slot, bytes]]: ...
        def _tail(self, run: Run, step: StepRun) -> bool: ...
        def _unqueue(self, task: Task) -> None: ...
        def _unbegin(self, task: Task) -> None: ...
        def _take_back_stuck(self) -> None: ...
        def _take_back(self, slot: Slot) -> None: ...
        def _release_item(self, item: StepRun) -> None: ...


QUEUE_BEHIND_BELOW = 0.002
"""Seconds: a step is queued behind another only if that one's run has been taking less than this per attempt."""

SPIN = 0.0002
"""Seconds the scheduler (or a worker that replied) looks for the next message before it sleeps, when
steps are shorter than that and a core is free for it: a sleeping process takes ~15 µs to wake here,
twice per step of a chain (the scheduler's answer and the worker's), against ~1 µs when it looks."""

_WEIGHT = 0.3  # of the latest attempt in ``Run.recent_wall``: a slow step stops the queueing within a step or two


class Dispatch:
    """The scheduler's part that sends ready steps to workers and starts their attempts."""

    def _dispatch(self: Scheduler, up_to: int) -> list[tuple[Slot, bytes]]:
        """Hand ready steps to idle slots (then behind busy ones), only those queued before ``up_to`` (committed)."""
        if self.pool.depth > 1:
            self._take_back_stuck()
        idle = [s for s in self.pool.slots if s.idle]
        if not self._ready:
            return []
        now = self.clock.monotonic()
        sends = []
        taken = self._ready.take(idle, up_to)
        # A worker may look for its next step after replying while a core is left for the scheduler.
        spare = self.pool.depth > 1 and sum(s.task is not None for s in self.pool.slots) + len(taken) < CPUS
        for run, step, slot, token in taken:
            task = slot.task = Task.start(run, step, slot, now, token)
            spin = SPIN if spare and _short_run(run, SPIN) else 0.0
            sends.append((slot, wire.dumps(run_message(task, spin, tail=self._tail(run, step)))))
            self._begin(task)
        if self._ready and self.pool.depth > 1:
            sends += self._queue_behind(up_to)
        return sends

    def _begin(self: Scheduler, task: Task) -> None:
        """The attempt (or hook) starts: RUNNING, StepStarted, its timeout."""
        run, step = task.run, task.step
        if not task.hook:
            step.attempts = task.attempt
            self._set_status(run, step, StepStatus.RUNNING)
            step.started_at = self.clock.now()
            step.finished_at = None
            self._event(ev.StepStarted, run, step.started_at, step_id=step.sid, attempt=step.attempts, **_key(step))
        now = task.started = self.clock.monotonic()
        task.queued = now - step.enqueued
        timeout = run.compiled.timeout[step.index]
        if timeout is not None and not task.hook:
            task.timer = self.timer(now + timeout, TimerKind.TIMEOUT, task)

    def _tail(self: Scheduler, run: Run, step: StepRun) -> bool:
        """Whether a worker replies before it ends the attempt's capture (``outputs.py``): where it can (a local
        pool), unless someone watches the events (who would see a step's last lines after its end), and
        unless the run ends with this attempt: it would then wait for the output anyway, a round trip later."""
        if not self.pool.tails or self.bus.has_subscribers:
            return False
        if run.unfinished > 1:
            return True
        if step.parent is None:
            return False
        counts = step.table.counts  # an item of the run's last step: is another item still to end?
        return counts[StepStatus.PENDING] + counts[StepStatus.WAITING] + counts[StepStatus.RUNNING] > 1

    def _spin(self: Scheduler) -> float:
        """How long the scheduler's wait looks before it sleeps: SPIN while a step that should end
        within it runs, and a core is left for it; else 0."""
        if self.pool.depth < 2:
            return 0.0
        tasks = [s.task for s in self.pool.slots if s.task is not None]
        if not tasks or len(tasks) >= CPUS:
            return 0.0
        now = self.clock.monotonic()
        return SPIN if any(_short_run(t.run, SPIN) and now - t.started < SPIN for t in tasks) else 0.0

    def _queue_behind(self: Scheduler, up_to: int) -> list[tuple[Slot, bytes]]:
        """Ready steps (queued before ``up_to``) for busy slots whose step is short and has nothing behind it."""
        now = self.clock.monotonic()
        behind = [
            slot
            for slot in self.pool.slots
            if slot.task is not None
            and slot.next is None
            and not slot.dying
            and slot.task.kill_reason is None
            and _short(slot.task, now)
            and not slot.skipping  # else a message taken back, not yet skipped, would take this one's token
            and self.pool.claimed(slot)  # at most one token in the pipe: take_back takes the one it means
        ]
        if not behind:
            return []
        sends = []
        for run, step, slot, token in self._ready.take(behind, up_to):
            task = slot.next = Task.start(run, step, slot, now, token)
            self.pool.offer(slot)
            sends.append((slot, wire.dumps(run_message(task, claim=True, tail=self._tail(run, step)))))
        return sends

    def _take_back_stuck(self: Scheduler) -> None:
        """Take back the steps queued behind steps that turned out long: the next free worker runs them first.

        While a step is queued behind one that has run less than QUEUE_BEHIND_BELOW, the loop looks again
        within ``loopio.SOON``: a queued step waits behind a long one for about that long at most."""
        now = self.clock.monotonic()
        for slot in self.pool.slots:
            task = slot.next
            if task is None or slot.dying:
                continue
            if now - slot.task.started < QUEUE_BEHIND_BELOW:
                self._soon = True
            else:
                self._take_back(slot)

    def _take_back_run(self: Scheduler, run: Run) -> None:
        """``run`` stops: take back its steps queued behind others, not to start them (those claimed meanwhile are
        stopped as they start: ``_promote``)."""
        for slot in self.pool.slots:
            task = slot.next
            if task is not None and task.run is run and not task.hook:
                self._take_back(slot)

    def _take_back(self: Scheduler, slot: Slot) -> None:
        """Take back the step queued in ``slot``, unless its worker claimed it: it goes back as it was."""
        task = slot.next
        if self.pool.take_back(slot):
            slot.next, slot.skipping = None, slot.skipping + 1  # its worker answers wire.Skipped
            self._unqueue(task)

    def _promote(self: Scheduler, slot: Slot, ended: Task, wall: float | None) -> None:
        """``ended`` replied (its attempt took ``wall`` s): the step queued behind it, if any, starts."""
        if wall is not None:
            last = ended.run.recent_wall
            ended.run.recent_wall = wall if last is None else last + _WEIGHT * (wall - last)
        task = slot.next
        if task is None or slot.dying:  # dying: it exits (retired) or is being stopped, and never reads it
            return
        slot.task, slot.next = task, None
        if task.run.stopping is None or task.hook:
            self._begin(task)
            return
        # Its run began to stop while it was queued: its worker starts it now, so stop it at once.
        self.supervisor.stop(task, KillReason.UNQUEUED, 0.0)

    def _unbegin(self: Scheduler, task: Task) -> None:
        """``task`` was begun (``_begin``) but its worker never read it (``wire.Retire``): as it was before. Its
        StepStarted stands; it is sent again, with the same attempt number."""
        if not task.hook:
            task.step.attempts = task.attempt - 1
            self._set_status(task.run, task.step, StepStatus.PENDING)
        task.timer = 0
        self._unqueue(task)

    def _unqueue(self: Scheduler, task: Task) -> None:
        """A step queued in a worker that never ran it (or was stopped as it began): as it was before."""
        run, step = task.run, task.step
        step.snapshot = task.snapshot
        if run.stopping is None or task.hook:
            self._ready.push_back(run, step, task.token)
            return
        if step.status is not StepStatus.PENDING:
            self._set_status(run, step, StepStatus.PENDING)  # as the run's other unstarted steps (_park_waiting)
        if step.parent is not None:
            self._release_item(step)  # it held a place under with_concurrency


def _short(task: Task, now: float) -> bool:
    return _short_run(task.run, QUEUE_BEHIND_BELOW) and now - task.started < QUEUE_BEHIND_BELOW


def _short_run(run: Run, below: float) -> bool:
    return run.recent_wall is not None and run.recent_wall < below


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


CPUS = _cpus()
