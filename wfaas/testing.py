"""Helpers for testing workflows: a clock you move by hand.

``VirtualClock`` replaces real time in the scheduler, so a test of a one-hour
``with_delay``, an exponential backoff or a ``scheduled_at`` runs in
milliseconds::

    clock = VirtualClock()
    with WorkflowEngine(clock=clock) as engine:
        ...
        clock.advance(3600)        # the delayed step becomes due now

With ``autojump=True`` the clock jumps to the next timer by itself whenever no
step is running, which is what most tests of delays and backoff want. Step
bodies still run in real worker processes on real time; only the engine's
timers (delays, backoff, ``scheduled_at``, step timeouts) are virtual.
"""

from __future__ import annotations

import itertools
import os
import pickle
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from . import _worker, wire
from .clock import Clock
from .pool import Exit, Slot, Waitable

__all__ = ["FakePool", "VirtualClock"]

_EPOCH = datetime(2030, 1, 1, tzinfo=UTC)


class VirtualClock(Clock):
    """A clock that only moves when told to (``advance``) or, with ``autojump``, when idle.

    It never goes backwards: ``advance`` refuses negative steps.
    """

    def __init__(self, start: datetime = _EPOCH, *, autojump: bool = False) -> None:
        if start.tzinfo is None:
            raise ValueError("VirtualClock(start=...) needs an aware datetime, e.g. datetime.now(timezone.utc)")
        self._start = start
        self._offset = 0.0
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []
        self.autojump = autojump

    def monotonic(self) -> float:
        with self._lock:
            return self._offset

    def now(self) -> datetime:
        with self._lock:
            return self._start + timedelta(seconds=self._offset)

    def advance(self, seconds: float | timedelta) -> None:
        """Move time forward by ``seconds`` and wake every engine reading this clock."""
        step = seconds.total_seconds() if isinstance(seconds, timedelta) else float(seconds)
        if step < 0:
            raise ValueError(f"VirtualClock.advance({step}): time does not go backwards")
        with self._lock:
            self._offset += step
            listeners = list(self._listeners)
        for wake in listeners:
            wake()

    def wait_timeout(self, deadline: float | None) -> float | None:
        if deadline is not None and deadline <= self.monotonic():
            return 0.0
        return None

    def add_listener(self, wake: Callable[[], None]) -> None:
        with self._lock:
            self._listeners.append(wake)

    def idle(self, next_deadline: float | None) -> None:
        if self.autojump and next_deadline is not None:
            with self._lock:
                self._offset = max(self._offset, next_deadline)


class _FakeProcess:
    """Stands in for a worker process: a pid, never started."""

    def __init__(self, pid: int) -> None:
        self.pid = pid


class _FakeConn:
    """What ``Scheduler._on_worker_exit`` asks of a slot's pipe: is a reply still waiting?"""

    def __init__(self, pool: FakePool, slot: Slot) -> None:
        self._pool, self._slot = pool, slot

    def poll(self) -> bool:
        return bool(self._pool.replies[self._slot.index])


@dataclass
class KillRequest:
    """A kill the scheduler asked of the fake pool; the test ends it with ``FakePool.end_kill``."""

    slot: Slot
    grace: float
    done: Callable[[Slot, Exit], None]
    exit: Exit | None  # set when the worker had died on its own (a crash)


class FakePool:
    """``pool.Pool`` without processes, for tests that drive ``Scheduler.tick()`` by hand.

    Every slot has a real pipe the scheduler blocks on, written when the
    test queues a reply (``execute``, ``reply``) and a second one written
    when the test makes its worker die (``crash``), so the scheduler's wait
    works as with real workers. ``execute`` runs the step's body here, in the
    test's process, through the worker's own ``_worker.execute``; kills are
    recorded (``kills``) and end when the test says (``end_kill``).

    It is in the package, not in ``tests/``, so that ``mypy --strict`` checks
    it against ``pool.Pool``: the fake cannot drift from what it fakes.
    """

    def __init__(self, size: int = 2, depth: int = 1) -> None:
        self.slots = [Slot(i) for i in range(size)]
        self.depth = depth
        self.tails = False  # a test that wants RunStep.tail sets it; execute(tail=True) replies so either way
        self.sent: list[tuple[Slot, wire.RunStep]] = []
        self.kills: list[KillRequest] = []
        self.hurried: list[Slot] = []
        self.syncs: list[Slot] = []  # the slots sent wire.SYNC, in order
        self.replies: list[list[wire.FromWorker]] = [[] for _ in self.slots]
        self._results = [os.pipe() for _ in self.slots]
        self._exits = [os.pipe() for _ in self.slots]
        self._exitcodes: list[int | None] = [None for _ in self.slots]
        self._pids = itertools.count(100_001)
        self._held: list[dict[str, Any]] = [{} for _ in self.slots]  # what each fake worker holds, as a worker does
        # Each fake worker's messages not yet started, (task id, queued behind another), in order; and
        # the claim tokens in its token pipe (pool.WorkerPool.offer).
        self._inbox: list[list[tuple[int, bool]]] = [[] for _ in self.slots]
        self._tokens = [0 for _ in self.slots]
        self._running = [0 for _ in self.slots]  # the task id each fake worker runs (0: none)

    # -- pool.Pool ------------------------------------------------------------------

    def start(self) -> None:
        for slot in self.slots:
            self.spawn(slot)

    def spawn(self, slot: Slot) -> None:
        i = slot.index
        _drain(self._results[i][0])
        _drain(self._exits[i][0])
        self._inbox[i], self._tokens[i], self._running[i] = [], 0, 0
        self.replies[i].clear()
        self._exitcodes[i] = None
        self._held[i] = {"bodies": {}, "classes": {}, "snap": (None, {}, None)}
        slot.process, slot.conn = _FakeProcess(next(self._pids)), _FakeConn(self, slot)  # type: ignore[assignment]
        slot.task, slot.next, slot.dying, slot.skipping, slot.tail, slot.syncing = None, None, False, 0, None, False
        slot.bodies, slot.classes, slot.snapshot, slot.last_rss, slot.eof = set(), set(), None, 0, False

    def waitables(self) -> dict[Any, tuple[Waitable, Slot]]:
        out: dict[Any, tuple[Waitable, Slot]] = {}
        for slot in self.slots:
            if not slot.dying:
                out[self._exits[slot.index][0]] = (Waitable.EXIT, slot)
            if (slot.task is not None or slot.tail is not None) and not slot.eof:
                out[self._results[slot.index][0]] = (Waitable.RESULT, slot)
        return out

    def send(self, slot: Slot, message: bytes) -> None:
        run: wire.RunStep | wire.Sync = wire.loads(message)
        if isinstance(run, wire.Sync):
            self.syncs.append(slot)  # the test answers (``from_worker``)
            return
        held = self._held[slot.index]
        if run.body is not None:
            held["bodies"][run.body_key] = pickle.loads(run.body)
        if run.cls is not None:
            held["classes"][run.cls_key] = pickle.loads(run.cls)
        if run.snap is not None:
            held["snap"] = (run.snap_key, *_worker.read_snapshot(run.snap))
        assert held["snap"][0] == run.snap_key, "the scheduler and the worker disagree on the data snapshot"
        self.sent.append((slot, run))
        self._inbox[slot.index].append((run.task_id, run.claim))
        if not run.claim:
            self._next(slot)  # sent to an idle worker: it starts at once

    def receive(self, slot: Slot) -> wire.FromWorker | None:
        if not self.replies[slot.index]:
            slot.eof = self._exitcodes[slot.index] is not None
            return None
        os.read(self._results[slot.index][0], 1)
        return self.replies[slot.index].pop(0)

    def exit_of(self, slot: Slot) -> Exit:
        return Exit(self._exitcodes[slot.index], slot.last_rss)

    def kill(self, slot: Slot, grace: float, done: Callable[[Slot, Exit], None], exit_: Exit | None = None) -> None:
        slot.dying = True
        self.kills.append(KillRequest(slot, grace, done, exit_))

    def hurry(self, slot: Slot) -> None:
        self.hurried.append(slot)

    def offer(self, slot: Slot) -> None:
        self._tokens[slot.index] += 1

    def claimed(self, slot: Slot) -> bool:
        return not self._tokens[slot.index]

    def take_back(self, slot: Slot) -> bool:
        """Take the claim token, as the scheduler and the worker both do (``pool.WorkerPool.offer``)."""
        if not self._tokens[slot.index]:
            return False
        self._tokens[slot.index] -= 1
        return True

    def _next(self, slot: Slot) -> None:
        """The fake worker is free: it starts its next message, skipping one taken back (as ``_worker._claim``)."""
        inbox = self._inbox[slot.index]
        self._running[slot.index] = 0
        while inbox:
            task_id, queued = inbox.pop(0)
            if not queued or self.take_back(slot):  # the worker's claim takes the same token
                self._running[slot.index] = task_id
                return
            self.replies[slot.index].append(wire.Skipped(task_id))
            os.write(self._results[slot.index][1], b"x")

    def close(self, grace: float = 2.0) -> None:
        for r, w in (*self._results, *self._exits):
            os.close(r)
            os.close(w)

    # -- what the test does -------------------------------------------------------------

    def busy(self) -> dict[str, Slot]:
        """The slots running a step (or hook), by step id; an item of a for_each step as ``step[key]``."""
        return {slot.task.step.label: slot for slot in self.slots if slot.task is not None}

    def last_sent(self, step_id: str) -> wire.RunStep:
        """The last message that started ``step_id`` (or one of its hooks); ``step[key]`` names an item."""
        message: wire.RunStep = next(m for _, m in reversed(self.sent) if _label(m) == step_id)
        return message

    def execute(self, step_id: str, usage: dict[str, Any] | None = None, *, tail: bool = False) -> wire.Reply:
        """Run the step's body (or hook) here, as its worker would, and queue the reply; with ``tail``, a reply that
        says its output follows (``wire.TAIL``: the test sends it, or anything else, with ``from_worker``)."""
        slot = self.busy()[step_id]
        run = self.last_sent(step_id)
        assert run.task_id == self._running[slot.index], f"{step_id}'s worker runs another message (as a worker would)"
        held = self._held[slot.index]
        try:
            body, cls = held["bodies"][run.body_key], held["classes"][run.cls_key]
            outcome, changes = _worker.execute(body, cls, held["snap"][1], run, held["snap"][2])
            output = wire.TAIL if tail else None
            reply: wire.Reply = wire.Done(run.task_id, outcome, changes, [], output, usage or {"wall": 0.001})
        except Exception as exc:  # noqa: BLE001 - reported to the scheduler as the worker would
            reply = wire.failed(run.task_id, exc, _worker.format_traceback(exc))
            reply = reply._replace(output=wire.TAIL) if tail else reply
        self.reply(step_id, reply)
        return reply

    def reply(self, step_id: str, message: wire.FromWorker) -> None:
        """Queue ``message`` from the worker running ``step_id``; a reply, not ``Output``, ends the step, and the
        worker claims the step queued behind it (if the scheduler has not taken it back)."""
        slot = self.busy()[step_id]
        self.replies[slot.index].append(message)
        if not isinstance(message, wire.Output):
            self._next(slot)  # it replied: on to the step queued behind, if any
        os.write(self._results[slot.index][1], b"x")

    def from_worker(self, slot: Slot, message: wire.FromWorker) -> None:
        """Queue ``message`` from the slot's worker, busy or idle (a ``Tail``, ``Synced``, a late ``Output``)."""
        self.replies[slot.index].append(message)
        os.write(self._results[slot.index][1], b"x")

    def retire(self, slot: Slot, reason: str) -> None:
        """The slot's worker says it cannot run another step (``wire.Retire``, after its last reply) and exits
        without reading another message: what it was sent since then never starts."""
        self._inbox[slot.index], self._running[slot.index] = [], 0
        self.from_worker(slot, wire.Retire(reason))
        self.crash(slot, exitcode=0)

    def crash(self, step_id: str | Slot, exitcode: int = -9) -> None:
        """The worker running ``step_id`` (or the slot's) dies (-9: SIGKILL)."""
        slot = self.busy()[step_id] if isinstance(step_id, str) else step_id
        self._exitcodes[slot.index] = exitcode
        os.write(self._exits[slot.index][1], b"x")

    def end_kill(self, step_id: str | None = None, exitcode: int = -15) -> KillRequest:
        """The oldest kill still pending (of ``step_id``'s slot) is over: its tree is dead."""
        for request in self.kills:
            task = request.slot.task
            if step_id is None or (task is not None and task.step.label == step_id):
                self.kills.remove(request)
                request.done(request.slot, request.exit or Exit(exitcode, request.slot.last_rss))
                return request
        raise AssertionError(f"no kill pending for {step_id or 'any step'}; pending: {self.kills}")


def _label(message: wire.RunStep) -> str:
    return message.step_id if message.item_key is None else f"{message.step_id}[{message.item_key}]"


def _drain(fd: int) -> None:
    os.set_blocking(fd, False)
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
