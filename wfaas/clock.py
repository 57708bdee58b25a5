"""Time, read through one object so that tests can drive it.

The scheduler reads ``monotonic()`` for every deadline (timeouts, delays,
backoff) and ``now()`` only for ``scheduled_at`` and timestamps. A clock also
tells the scheduler how long it may block (``wait_timeout``) and wakes it when
virtual time moves (``add_listener``); the real clock never needs to.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

__all__ = ["Clock", "SystemClock"]


class Clock:
    """The interface the engine reads time through. :class:`SystemClock` is the real one."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back; used for all deadlines."""
        raise NotImplementedError

    def now(self) -> datetime:
        """The current wall-clock time, timezone-aware (UTC)."""
        raise NotImplementedError

    def wait_timeout(self, deadline: float | None) -> float | None:
        """Real seconds the scheduler may block before ``deadline`` (a ``monotonic()`` value).

        ``None`` means: block until something else wakes you.
        """
        raise NotImplementedError

    def add_listener(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` whenever this clock jumps (virtual clocks only)."""

    def idle(self, next_deadline: float | None) -> None:
        """Told by the scheduler that nothing but timers can make progress now."""


class SystemClock(Clock):
    """Real time: ``time.monotonic`` and the UTC wall clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime:
        return datetime.now(UTC)

    def wait_timeout(self, deadline: float | None) -> float | None:
        if deadline is None:
            return None
        return max(0.0, deadline - time.monotonic())
