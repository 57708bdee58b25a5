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

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from .clock import Clock

__all__ = ["VirtualClock"]

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
