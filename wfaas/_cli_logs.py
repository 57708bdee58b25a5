"""The command line's side of API.md §13: step output, log levels, tracebacks.

``wfaas-local logs`` prints what attempts printed and logged, as stored with
the run; ``run``/``resume`` show the same lines as attempts end (above the
live panel on a terminal); ``-v``/``--log-level`` chooses which log records
are shown everywhere (printed lines always are); a failed run ends with its
failed step's traceback.
"""

from __future__ import annotations

import functools
import logging
import shlex
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

import click

from .capture import OUTPUT, AttemptLog, LogLine, cut_marker
from .cli_text import shorten
from .states import StepState, StepStatus, WorkflowState, WorkflowStatus
from .store import StateStore

DEFAULT_LEVEL = logging.WARNING
_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
_level = DEFAULT_LEVEL
# A failed run shows the end of its traceback: the frames nearest the error.
TRACEBACK_LINES = 30
FOLLOW_POLL_SECONDS = 0.25


def shown_level() -> int:
    """The least level of a log record that is shown (``-v``: INFO, ``-vv``: DEBUG, ``--log-level``)."""
    return _level


def log_level_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """``-v`` (repeatable) and ``--log-level LEVEL`` for a command; the command's own signature is unchanged."""

    @functools.wraps(command)
    def wrapper(*args: Any, verbose: int, log_level: str | None, **kwargs: Any) -> Any:
        global _level
        if log_level is not None:
            _level = logging.getLevelName(log_level.upper())
        else:
            _level = DEFAULT_LEVEL - 10 * min(verbose, 2)
        _install_handler()
        return command(*args, **kwargs)

    wrapper = click.option(
        "--log-level",
        type=click.Choice(_LEVELS, case_sensitive=False),
        help="Show log records of this level and above (default WARNING).",
    )(wrapper)
    return click.option(
        "-v", "--verbose", count=True, help="Show more log records: -v INFO, -vv DEBUG (default: WARNING and above)."
    )(wrapper)


class _ConsoleHandler(logging.Handler):
    """The engine's own records, one line each on stderr (through rich: above a live panel, never into it).

    Records a worker sent are skipped: their lines come with the step's output (``StepOutput``).
    """

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "wfaas_worker", False) or record.levelno < _level:
            return
        from rich.console import Console

        text = f"{record.levelname} {record.name}: {record.getMessage()}"
        if record.exc_info and _level <= logging.DEBUG:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        Console(stderr=True, highlight=False, soft_wrap=True).print(text, markup=False)


def _install_handler() -> None:
    root = logging.getLogger()
    if not any(isinstance(h, _ConsoleHandler) for h in root.handlers):
        root.addHandler(_ConsoleHandler())
    # Without this, logging's last-resort handler would print worker records a second time, raw.
    root.setLevel(min(root.level or logging.WARNING, _level))


def shown(lines: Iterable[LogLine]) -> list[LogLine]:
    """Printed lines, and log records at or above the chosen level."""
    return [line for line in lines if line[1] == OUTPUT or line[1] >= _level]


def safe(line: str) -> Any:
    """A step's line for a live terminal: its colours kept, every other escape sequence (cursor moves,
    clearing the screen) dropped, so that nothing a step prints can move the live panel."""
    from rich.text import Text

    return Text.from_ansi(line)


def stamp(when: float) -> str:
    return datetime.fromtimestamp(when).strftime("%H:%M:%S.%f")[:-3]


def prefixed(prefix: str, text: str) -> list[str]:
    """Every line of ``text`` (a record can hold a traceback) with the prefix."""
    return [f"{prefix} {part}" for part in text.split("\n")]


# -- wfaas-local logs --------------------------------------------------------------------


def log_lines(log: AttemptLog) -> list[tuple[float, str]]:
    """One attempt's shown lines as ``(time, "time step[item] attempt text")``, the cut marker first."""
    item = log.item_key  # None for a log stored before items existed: the class default
    where = f"{log.step_id}{f'[{item}]' if item is not None else ''}{'.' + log.part if log.part else ''} {log.attempt}"
    out: list[tuple[float, str]] = []
    lines = shown(log.lines)
    if log.cut:
        first = log.lines[0][0] if log.lines else 0.0
        out.append((first, f"{stamp(first)} {where} {cut_marker(log.cut)}"))
    for when, _, text in lines:
        out += [(when, line) for line in prefixed(f"{stamp(when)} {where}", text)]
    return out


def print_logs(
    store: StateStore,
    iid: str,
    step: str | None,
    attempt: int | None,
    follow: bool,
    echo: Callable[[str], None],
    item: str | None = None,
) -> int:
    """Print a run's stored logs (``follow``: until the run ends; ``item``: only that item's); how many
    attempts had any."""
    printed: dict[tuple[str, str | None, int, str], int] = {}
    while True:
        # The status first: logs read after it include everything committed before it ended.
        meta = store.read_meta(iid) or {}
        finished = WorkflowStatus(meta.get("status", "completed")).is_terminal
        fresh: list[tuple[float, str]] = []
        for log in store.read_logs(iid, step):
            if (attempt is not None and log.attempt != attempt) or (item is not None and log.item_key != item):
                continue
            key = (log.step_id, log.item_key, log.attempt, log.part)
            if key in printed:
                continue  # an attempt's log is written once, when it ends
            lines = log_lines(log)
            printed[key] = len(lines)
            fresh += lines
        for _, line in sorted(fresh, key=lambda item: item[0]):
            echo(line)
        if not follow or finished:
            return len(printed)
        time.sleep(FOLLOW_POLL_SECONDS)  # another process writes the store: nothing to block on


# -- tracebacks ------------------------------------------------------------------------


def failed_traceback(state: WorkflowState[Any]) -> tuple[str, int, str] | None:
    """(step, attempt, traceback) of the failed step's last attempt that has one.

    For a ``for_each`` step: of its first failed item's, named ``step[key]``.
    """
    sid = state.failed_step or ""
    step = state.step_states.get(sid)
    if step is None:
        return None
    failed = [(f"{sid}[{k}]", i.history) for k, i in (step.items or {}).items() if i.status is StepStatus.FAILED]
    for name, history in [*failed, (sid, step.history)]:
        for attempt in reversed(history):
            if attempt.traceback:
                return name, attempt.number, attempt.traceback
    return None


def compact_traceback(text: str, limit: int = TRACEBACK_LINES) -> list[str]:
    """The traceback's last ``limit`` lines (where it failed), with a note of what was left out."""
    lines = text.rstrip("\n").split("\n")
    if len(lines) <= limit:
        return lines
    return [f"  ... {len(lines) - limit} lines above left out", *lines[-limit:]]


def print_failed_traceback(state: WorkflowState[Any], console: Any, store_flag: str) -> None:
    """After a failed run: the failed step's traceback, compact, and where to see all of it."""
    found = failed_traceback(state)
    if found is None:
        return
    step, number, text = found
    console.print(f"traceback of step {step} (attempt {number}):", markup=False)
    for line in compact_traceback(text):
        # On a terminal a line is cut at its width rather than wrapped: the whole text is one command away.
        console.print(shorten(f"  {line}", console.width) if console.is_terminal else f"  {line}", markup=False)
    if ":memory:" in store_flag:
        return  # nothing outlives this process: no command could show more later
    step = shlex.quote(step)  # an item's name has brackets, which shells glob
    console.print(f"its output: wfaas-local logs {state.instance_id} {step}{store_flag}", markup=False)
    console.print(f"every attempt: wfaas-local status {state.instance_id} --step {step}{store_flag}", markup=False)


def print_step(state: WorkflowState[Any], step_id: str, console: Any) -> None:
    """``status ID --step S``: the step's attempts with their errors and tracebacks."""
    step: StepState = state.step_states[step_id]
    console.print(f"step {step_id} of {state.workflow_id} {state.instance_id}: {step.status.name}", markup=False)
    if not step.history:
        console.print("  no attempt has ended yet", markup=False)
    for a in step.history:
        started = a.started_at.astimezone().strftime("%Y-%m-%d %H:%M:%S") if a.started_at else "?"
        wall = f"{a.wall:.2f}s" if a.wall is not None else ""
        console.print(f"attempt {a.number}: {a.outcome}  started {started}  {wall}".rstrip(), markup=False)
        if a.error:
            console.print(f"  error: {a.error}", markup=False)
        if a.traceback:
            for line in a.traceback.rstrip("\n").split("\n"):
                console.print(f"  {line}", markup=False)
