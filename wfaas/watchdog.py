"""The memory watchdog: samples busy workers' memory, stops steps over their limit.

Memory is the one fault the scheduler cannot wait on: no pipe or sentinel
fires when a step starts eating the machine. So a thread samples the resident
memory of each busy worker's process tree (the worker and everything it
started) and asks the scheduler to stop a step that went over its limit,
before the machine swaps or the kernel's OOM killer picks a victim. It samples
fast (``fast``) while a step with a limit runs, and slowly otherwise, only to
remember each worker's last size: a worker later killed by SIGKILL with a
large last size is reported as "probably out of memory".
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from . import _threads
from .pool import Pool, Slot


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (0 if it is gone)."""
    import psutil  # imported when first needed: it costs `import wfaas` 8 ms

    try:
        root = psutil.Process(pid)
        total = int(root.memory_info().rss)
        for child in root.children(recursive=True):
            try:
                total += int(child.memory_info().rss)
            except psutil.Error:
                pass
        return total
    except psutil.Error:
        return 0


class MemoryWatchdog:
    """Samples busy slots; calls ``exceeded(slot, task, rss)`` when a task's tree is over its limit."""

    def __init__(
        self,
        pool: Pool,
        limit_of: Callable[[Any], int | None],
        exceeded: Callable[[Slot, Any, int], None],
        *,
        fast: float = 0.05,
        slow: float = 0.5,
    ) -> None:
        self._pool = pool
        self._limit_of = limit_of
        self._exceeded = exceeded
        self._fast, self._slow = fast, slow
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="wfaas-memory-watchdog", daemon=True)

    def start(self) -> None:
        with _threads.signals_blocked():
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        # Sampling is the only way to see memory grow; the interval bounds how far past its limit a step gets.
        while not self._stop.wait(self._sample()):
            pass

    def _sample(self) -> float:
        """One pass over the slots; returns how long to wait before the next."""
        interval = self._slow
        for slot in list(self._pool.slots):
            task, pid = slot.task, slot.pid
            if task is None or slot.dying:
                continue
            limit = self._limit_of(task)
            # A remote step (Dask) is sampled where it runs, which reports only going over the limit.
            rss = tree_rss(pid) if pid is not None else slot.reported_rss
            if rss:
                slot.last_rss = rss
            if limit is not None:
                interval = self._fast
                if rss > limit:
                    self._exceeded(slot, task, rss)
        return interval
