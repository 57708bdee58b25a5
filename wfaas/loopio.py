"""The scheduler loop's I/O: what it blocks on, how other threads reach it, and its timers.

``Poller`` blocks on many descriptors at once; ``WakeUp`` is the pipe other
threads write to so the block ends; ``Commands`` carries calls from other
threads to the scheduler thread; ``Timers`` is the heap of deadlines whose
earliest sets how long the loop may block. None of them knows what a run is.
"""

from __future__ import annotations

import collections
import concurrent.futures
import enum
import heapq
import itertools
import logging
import math
import os
import select
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from . import _threads
from .clock import Clock

log = logging.getLogger("wfaas")


class Poller:
    """Blocks on many descriptors at once, with one ``poll`` object kept across turns.

    ``multiprocessing.connection.wait`` builds and fills a new selector on
    every call; at two or three turns a step that was a measurable share of
    the scheduler's time per step. Here only what changed between turns is
    (un)registered.
    """

    def __init__(self) -> None:
        self._poll = select.poll()
        self._fds: set[int] = set()

    def wait(self, objects: list[Any], timeout: float | None, spin: float = 0.0) -> list[Any]:
        """The objects (descriptors, or anything with ``fileno()``) ready to read, closed, or failed.

        ``spin``: look without blocking for up to that many seconds first (see ``Loop.wait``).
        """
        by_fd = {obj if isinstance(obj, int) else obj.fileno(): obj for obj in objects}
        for fd in self._fds - by_fd.keys():
            self._poll.unregister(fd)
        for fd in by_fd.keys() - self._fds:
            self._poll.register(fd, select.POLLIN)
        self._fds = set(by_fd)
        ms = None if timeout is None else max(0, math.ceil(timeout * 1000))
        if spin and ms != 0:
            end = time.perf_counter() + (spin if timeout is None else min(spin, timeout))
            while time.perf_counter() < end:
                ready = self._poll.poll(0)
                if ready:
                    return [by_fd[fd] for fd, _ in ready if fd in by_fd]
        return [by_fd[fd] for fd, _ in self._poll.poll(ms) if fd in by_fd]


class WakeUp:
    """A pipe that ends the loop's block when any thread writes to it."""

    def __init__(self) -> None:
        self.fd, self._w = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._w, False)
        self._lock = threading.Lock()

    def __call__(self) -> None:
        # Called from any thread (kill threads, commit acknowledgements, a virtual clock),
        # also after close(): never write to the descriptor once closed, its number may be reused.
        with self._lock:
            if self._w < 0:
                return
            try:
                os.write(self._w, b"x")
            except BlockingIOError:
                pass  # the pipe is full, so a wake-up is pending anyway

    def drain(self) -> None:
        try:
            os.read(self.fd, 4096)
        except BlockingIOError:
            pass

    def close(self) -> None:
        with self._lock:
            os.close(self.fd)
            os.close(self._w)
            self._w = -1


Command = tuple[Callable[..., Any], tuple[Any, ...], concurrent.futures.Future[Any] | None]


class Commands(collections.deque[Command]):
    """Calls from other threads, run in order on the scheduler thread (a deque: its truth test is C, once a turn)."""

    def put(self, fn: Callable[..., Any], args: tuple[Any, ...], future: concurrent.futures.Future[Any] | None) -> None:
        self.append((fn, args, future))

    def run(self) -> Iterator[tuple[concurrent.futures.Future[Any], Any]]:
        """Run every queued call; yields (future, result) to resolve once this turn is committed."""
        while self:
            fn, args, future = self.popleft()
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to the caller through its future
                if future is not None:
                    future.set_exception(exc)
                else:
                    log.exception("wfaas scheduler command %s failed", getattr(fn, "__name__", fn))
            else:
                if future is not None:
                    yield future, result

    def fail_all(self, error: BaseException) -> None:
        """The scheduler is gone: every caller still waiting gets ``error``."""
        while self:
            _, _, future = self.popleft()
            if future is not None:
                future.set_exception(error)


class Loop:
    """A thread that turns ``tick()`` until stopped, blocking between turns on descriptors and timers.

    The shape of CPython's ``_ExecutorManagerThread``: one wait on every
    descriptor that can bring work (a subclass passes them to ``wait``), the
    wake-up pipe other threads write to, and a timeout set to the next timer.
    ``submit`` is how other threads reach the loop's thread.
    """

    def __init__(self, clock: Clock, name: str) -> None:
        self.clock = clock
        self.wake = WakeUp()
        self._commands = Commands()
        self._poller = Poller()
        self._timers = Timers()
        self._seq = itertools.count(1)  # numbers timers; the scheduler also orders ready steps against commits
        self._again = False  # another turn is due at once
        self._soon = False  # another turn is due within SOON seconds, sooner if anything arrives
        self._stopped = False
        self._thread = threading.Thread(target=self.run, name=name, daemon=True)
        clock.add_listener(self.wake)

    def start(self) -> None:
        with _threads.signals_blocked():
            self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any, reply: bool = True) -> concurrent.futures.Future[Any] | None:
        """Run ``fn(*args)`` on the loop's thread; its result (or error) lands in the returned future."""
        if self._stopped:
            raise RuntimeError("the engine is closed")
        future: concurrent.futures.Future[Any] | None = concurrent.futures.Future() if reply else None
        self._commands.put(fn, args, future)
        self.wake()
        return future

    def stop(self) -> None:
        self.submit(self._stop_now, reply=False)
        self._thread.join(timeout=30)
        self.wake.close()

    def _stop_now(self) -> None:
        self._stopped = True

    def run(self) -> None:
        """The loop's thread: turn until stopped; a crash is handed to ``abandon``."""
        try:
            while not self._stopped:
                self.tick()
        except BaseException as exc:
            log.critical("wfaas scheduler thread crashed; failing every run it owned", exc_info=True)
            self.abandon(exc)

    def tick(self, max_wait: float | None = None) -> None:
        raise NotImplementedError

    def abandon(self, exc: BaseException) -> None:
        """The thread crashed: nothing more will run; callers waiting on commands learn it."""
        self._stopped = True
        self._commands.fail_all(RuntimeError("the engine's scheduler crashed"))

    def timer(self, when: float, kind: TimerKind, target: Any) -> int:
        """A timer for ``target`` (live while ``target.timer`` holds the number returned)."""
        return self._timers.add(when, next(self._seq), kind, target)

    def wait(
        self, waitables: dict[Any, Any], busy: Callable[[], bool], max_wait: float | None, spin: float = 0.0
    ) -> list[Any]:
        """Block until a waitable is ready, a wake-up, or the next timer; the values of the ready waitables.

        ``busy()``: something other than timers can make progress (a virtual
        clock may jump to the next timer only when not); ``max_wait`` bounds
        the block (a test passes 0). ``spin``: look without blocking for up to
        that many seconds before blocking, for an answer expected sooner than
        a sleeping thread wakes up (15 µs a hand-off here, against 1 µs).
        """
        deadline = self._timers.next_deadline
        if deadline is not None and not self._commands and not busy():
            self.clock.idle(deadline)
        timeout = 0.0 if self._commands or self._again else self.clock.wait_timeout(deadline)
        if self._soon:
            timeout = SOON if timeout is None else min(timeout, SOON)
        if max_wait is not None:
            timeout = max_wait if timeout is None else min(timeout, max_wait)
        self._again = self._soon = False
        ready = self._poller.wait([self.wake.fd, *waitables], timeout, spin)
        if self.wake.fd in ready:
            self.wake.drain()
        return [waitables[obj] for obj in ready if obj != self.wake.fd]


SOON = 0.001
"""Seconds a turn may wait for more to happen before it writes what the last one left (steps now RUNNING)."""


class TimerKind(enum.Enum):
    """What happens when a timer fires."""

    TIMEOUT = "timeout"  # an attempt ran too long: stop its tree
    WAIT = "wait"  # a delay or scheduled_at is over: decide the step again
    RETRY = "retry"  # a retry's backoff is over: queue the step


class Timers:
    """A heap of deadlines; a target's timer is live while ``target.timer`` holds its sequence number."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, TimerKind, weakref.ref[Any]]] = []

    def add(self, when: float, seq: int, kind: TimerKind, target: Any) -> int:
        # A weak reference: a timer outlives its use (a step's one-hour timeout after it succeeded) and
        # must not keep the step, its run and the run's data alive until it expires.
        heapq.heappush(self._heap, (when, seq, kind, weakref.ref(target)))
        return seq

    @property
    def next_deadline(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def due(self, now: float) -> list[tuple[TimerKind, Any]]:
        """The live timers due at ``now``, earliest first; stale ones (cancelled, superseded) are dropped."""
        if not self._heap or self._heap[0][0] > now:
            return []  # most turns
        return list(self._pop_due(now))

    def _pop_due(self, now: float) -> Iterator[tuple[TimerKind, Any]]:
        while self._heap and self._heap[0][0] <= now:
            _, seq, kind, ref = heapq.heappop(self._heap)
            target = ref()
            if target is None or target.timer != seq:
                continue  # cancelled, superseded, or its run is gone
            target.timer = 0
            yield kind, target
