"""``run``/``resume``/``recover`` following a run: a live panel on a terminal, one line per event otherwise.

What attempts print is shown as they end, prefixed with their step; lines
wait until the run's id has been printed (:meth:`Progress.release`).

A ``for_each`` step's items (events with ``item_key``) are counted, not
listed: the panel has one line per such step (``done/total items``, how many
run, the oldest running item), and line mode prints an item's failures and a
line per tenth of the items done. Each event costs O(1), so 10,000 items
cost the panel nothing it would notice.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import _cli_logs, events
from .cli_tables import step_error
from .cli_text import items_line, plural
from .states import StepStatus, WorkflowState

__all__ = ["ItemProgress", "Progress"]

# How often the total of a step's items is asked again while it is not known yet (seconds).
TOTAL_RETRY = 0.5


@dataclass
class ItemProgress:
    """One ``for_each`` step's items as its events told them: counted, never listed."""

    total: int | None = None  # unknown until the run's state has the step's list
    done: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    running: dict[str, tuple[int, float]] = field(default_factory=dict)  # key -> (attempt, since)
    asked: float = float("-inf")  # when the total was last asked for

    def line(self) -> str:
        """``120/10000 items done, 4 running, 1 failed`` (the zero counts left out)."""
        total = "?" if self.total is None else str(self.total)
        return items_line(len(self.done), f"{total} items", len(self.running), len(self.failed))

    def milestone(self) -> bool:
        """Whether the items finished just reached a tenth of the total, or all of it (line mode prints those)."""
        n = len(self.done) + len(self.failed)
        every = max(1, (self.total or 1000) // 10)
        return n % every == 0 or n == self.total


class Progress:
    """Follows a run's events: a live panel on a terminal, one line per event otherwise."""

    def __init__(self, total: int, *, live: bool, quiet: bool, console: Any) -> None:
        self.total = total
        # Keyed by step (and item): a resume seeds the steps already done, and an event for one of
        # them (or a rerun's) is not counted twice.
        self._done: set[tuple[str, str | None]] = set()
        self.active = True  # False once its run ended: `recover` follows several runs in turn
        self.running: dict[str, tuple[int, float]] = {}
        self.waiting: dict[str, str] = {}
        self.retries = 0
        self.items: dict[str, ItemProgress] = {}
        # step id -> how many items its list has (0: not computed yet); set by whoever follows the run.
        self.items_total: Callable[[str], int] | None = None
        self.started = time.monotonic()
        self.quiet = quiet
        self.console = console
        self._live: Any = None
        self._lock = threading.Lock()
        self._held: list[str] | None = []  # lines wait until the run id is printed (release)
        if live and not quiet:
            from rich.live import Live

            self._live = Live(get_renderable=self.render, console=console, refresh_per_second=8, transient=True)

    def __enter__(self) -> Progress:
        if self._live is not None:
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()
            elapsed = time.monotonic() - self.started
            retries = plural(self.retries, "retry", "retries")
            items = "".join(f", {sid} {len(p.done)}/{p.total or '?'} items" for sid, p in self.items.items())
            self.console.print(
                f"{self.done}/{plural(self.total, 'step')} done in {elapsed:.1f}s, {retries}{items}", markup=False
            )

    @property
    def done(self) -> int:
        return len(self._done)

    def seed(self, state: WorkflowState[Any]) -> None:
        """Count the steps the run had finished before it was followed (a resume)."""
        with self._lock:
            for sid, s in state.step_states.items():
                if s.status in (StepStatus.SUCCEEDED, StepStatus.SKIPPED):
                    self._done.add((sid, None))
                if s.items:
                    done = {k for k, i in s.items.items() if i.status in (StepStatus.SUCCEEDED, StepStatus.SKIPPED)}
                    self.items[sid] = ItemProgress(len(s.items), done)

    def render(self) -> Any:
        from rich.table import Table
        from rich.text import Text

        with self._lock:
            now = time.monotonic()
            table = Table.grid(padding=(0, 2))
            table.add_row(
                f"[bold]{self.done}/{self.total}[/] {'step' if self.total == 1 else 'steps'} done",
                f"elapsed {now - self.started:.1f}s",
                f"retries {self.retries}",
            )
            for sid, (attempt, since) in sorted(self.running.items()):
                if sid not in self.items:
                    table.add_row(Text(f"  running {sid}"), f"attempt {attempt}", f"{now - since:.1f}s")
            for sid, p in self.items.items():
                if p.running or len(p.done) + len(p.failed) != p.total:
                    counts = [f"{len(p.running)} running"] + ([f"{len(p.failed)} failed"] if p.failed else [])
                    table.add_row(Text(f"  {sid}"), f"{len(p.done)}/{p.total or '?'} items", ", ".join(counts))
            for sid, why in sorted(self.waiting.items()):
                table.add_row(Text(f"  waiting {sid}"), why, "")
            return table

    def __call__(self, event: events.WorkflowEvent) -> None:
        if not self.active:
            return
        if isinstance(event, events.StepOutput):
            self._output(event)
            return
        with self._lock:
            line = self._apply(event)
        if line and self._live is None:
            important = isinstance(event, (events.WorkflowFailed, events.StepFailed)) and not getattr(
                event, "will_retry", False
            )
            if not self.quiet or important:
                stamp = event.timestamp.astimezone().strftime("%H:%M:%S")
                with self._lock:
                    if self._held is not None:
                        self._held.append(f"{stamp} {line}")
                        return
                self.console.print(f"{stamp} {line}", markup=False)

    def _output(self, e: events.StepOutput) -> None:
        """What an attempt printed and logged, each line prefixed with its step (above the live panel)."""
        if self.quiet:
            return
        item = getattr(e, "item_key", None)
        where = e.step_id if item is None else f"{e.step_id}[{item}]"
        for when, _, text in _cli_logs.shown(e.lines):
            prefix = f"{where} |" if self._live is not None else f"{_cli_logs.stamp(when)[:8]} {where} |"
            for line in _cli_logs.prefixed(prefix, text):
                with self._lock:
                    if self._held is not None:
                        self._held.append(line)
                        continue
                self.console.print(_cli_logs.safe(line) if self._live is not None else line, markup=False)

    def release(self) -> None:
        """Print the lines held back so far; from now on print as events come."""
        with self._lock:
            # Printed under the lock: an event line waits for the held ones before it (issue 13, defect 9).
            held, self._held = self._held or [], None
            for line in held:
                self.console.print(line, markup=False)

    def _apply(self, e: events.WorkflowEvent) -> str:
        key = getattr(e, "item_key", None)
        if key is not None:
            return self._apply_item(e, key)
        if isinstance(e, events.StepStarted):
            self.waiting.pop(e.step_id, None)
            self.running[e.step_id] = (e.attempt, time.monotonic())
            self._done.discard((e.step_id, None))
            return f"{e.step_id}: started (attempt {e.attempt})"
        if isinstance(e, events.StepSucceeded):
            self.running.pop(e.step_id, None)
            self._done.add((e.step_id, None))
            return f"{e.step_id}: succeeded in {e.duration:.2f}s [{self.done}/{self.total}]"
        if isinstance(e, events.StepSkipped):
            self._done.add((e.step_id, None))
            return f"{e.step_id}: skipped ({e.reason}) [{self.done}/{self.total}]"
        if isinstance(e, events.StepFailed):
            self.running.pop(e.step_id, None)
            if not e.will_retry:
                self._done.add((e.step_id, None))
            return f"{e.step_id}: attempt {e.attempt} failed: {_failure(e)}"
        if isinstance(e, events.StepRetrying):
            self.retries += 1
            self.waiting[e.step_id] = f"backoff {e.delay:.2f}s"
            return f"{e.step_id}: retrying in {e.delay:.2f}s (attempt {e.attempt})"
        if isinstance(e, events.WorkflowCompleted):
            return f"workflow completed in {e.duration:.2f}s"
        if isinstance(e, events.WorkflowFailed):
            return f"workflow failed at step {e.failed_step}: {e.error}"
        if isinstance(e, events.WorkflowCancelled):
            return "workflow cancelled"
        if isinstance(e, events.WorkflowStarted):
            return "workflow started"
        return ""

    def _apply_item(self, e: events.WorkflowEvent, key: str) -> str:
        """An item's event: counted in its step's :class:`ItemProgress`; a line only for what is worth one."""
        sid = getattr(e, "step_id", "")
        p = self.items.setdefault(sid, ItemProgress())
        self._ask_total(sid, p)
        if isinstance(e, events.StepStarted):
            p.running[key] = (e.attempt, time.monotonic())
            p.done.discard(key)
            p.failed.discard(key)
            return ""
        if isinstance(e, events.StepSucceeded | events.StepSkipped):
            p.running.pop(key, None)
            p.done.add(key)
            self._step_done_with(sid, p)
            return f"{sid}: {p.line()}" if p.milestone() else ""
        if isinstance(e, events.StepFailed):
            p.running.pop(key, None)
            if not e.will_retry:
                p.failed.add(key)
                self._step_done_with(sid, p)
            line = f"{sid}[{key}]: attempt {e.attempt} failed: {_failure(e)}"
            return line + (f" [{p.line()}]" if not e.will_retry and p.milestone() else "")
        if isinstance(e, events.StepRetrying):
            self.retries += 1
        return ""

    def _step_done_with(self, sid: str, p: ItemProgress) -> None:
        """Once every item has ended, the step counts as done (as its own event would say; counted once)."""
        if p.total is not None and len(p.done) + len(p.failed) == p.total:
            self._done.add((sid, None))
            self.running.pop(sid, None)

    def _ask_total(self, sid: str, p: ItemProgress) -> None:
        """The number of the step's items, from the run's state (no event carries it); asked again at most
        every TOTAL_RETRY seconds while the state has no list yet."""
        now = time.monotonic()
        if p.total is not None or self.items_total is None or now - p.asked < TOTAL_RETRY:
            return
        p.asked = now
        try:
            total = self.items_total(sid)
        except Exception:  # noqa: BLE001 - a count the panel cannot get is shown as "?", never an error
            return
        p.total = total or None


# -- running -------------------------------------------------------------------------


def _failure(e: events.StepFailed) -> str:
    """An attempt's error without the where-prefix the line already gives, and whether it will be retried."""
    return step_error(e.error) + (" (will retry)" if e.will_retry else "")
