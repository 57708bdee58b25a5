"""Stopping worker process trees: timeouts, memory limits, cancels, failed stores, crashes' leftovers.

A kill takes up to a grace period, so the pool runs it on a thread of its
own; once the whole tree is dead, ``after_kill(slot, exit_)`` runs on the
scheduler thread (through ``submit``), which decides what the attempt's end
means (``verdicts.killed``). Every kill here records why (``KillReason``)
on the task first: that reason is what the scheduler reads then.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .pool import Exit, Pool, Slot
from .runs import KillReason, Run, Task


class Supervisor:
    """Asks the pool to stop trees for the scheduler, and hands each dead tree back to it."""

    def __init__(
        self, pool: Pool, grace: float, submit: Callable[..., Any], after_kill: Callable[[Slot, Exit], None]
    ) -> None:
        self.pool, self.grace, self._submit, self._after_kill = pool, grace, submit, after_kill

    def stop(self, task: Task, reason: KillReason, grace: float) -> None:
        task.kill_reason = reason
        self.pool.kill(task.slot, grace, self.killed)

    def on_timeout(self, task: Task) -> None:
        """A step's timeout fired (a stale one, for a task that ended, does nothing)."""
        if task.slot.task is task and not task.slot.dying:
            self.stop(task, KillReason.TIMEOUT, task.run.grace if task.run.grace is not None else self.grace)

    def over_memory(self, slot: Slot, task: Task, rss: int) -> None:
        """Called on the watchdog thread: hand the kill decision to the scheduler thread."""
        try:
            self._submit(self._stop_over_memory, slot, task, rss, reply=False)
        except RuntimeError:
            pass  # the engine closed meanwhile

    def _stop_over_memory(self, slot: Slot, task: Task, rss: int) -> None:
        if slot.task is task and not slot.dying and task.kill_reason is None:
            slot.last_rss = rss
            # No grace: every moment it keeps running it takes more of the machine.
            self.stop(task, KillReason.MEMORY, 0.0)

    def cancel(self, run: Run, grace: float | None) -> None:
        """Stop every attempt of ``run`` (``grace`` None: the engine's); a second cancel with 0 hurries the first."""
        for slot in self.pool.slots:
            task = slot.task
            if task is None or task.run is not run:
                continue
            if task.kill_reason is None and not slot.dying:
                self.stop(task, KillReason.CANCEL, self.grace if grace is None else grace)
            elif slot.dying and grace == 0:
                # A second, immediate cancel while a graceful kill is waiting: kill now.
                self.pool.kill(slot, 0, lambda s, e: None)

    def worker_exited(self, slot: Slot) -> None:
        """A worker died on its own: what its step started still runs in its process group; stop that first."""
        exit_ = self.pool.exit_of(slot)
        if slot.task is not None:
            slot.task.kill_reason = KillReason.CRASH
        # Before anything is retried: never two attempts' processes at once.
        self.pool.kill(slot, 0.0, self.killed, exit_)

    def retire(self, slot: Slot) -> None:
        """A worker that said it cannot run another step exits by itself: reap it and start the next."""
        self.pool.kill(slot, 0.0, self.killed)

    def killed(self, slot: Slot, exit_: Exit) -> None:
        """Called on the kill thread once the slot's whole tree is dead."""
        try:
            self._submit(self._after_kill, slot, exit_, reply=False)
        except RuntimeError:
            pass  # the engine closed meanwhile
