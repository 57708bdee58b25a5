"""SIGTERM and SIGHUP stop runs like a first Ctrl-C; a second signal kills their steps at once.

That is how systemd, docker and ``kill`` stop a batch job, and the default
action (die at once) would leave the runs RUNNING and SIGKILL their steps with
no grace. Two users of this module:

* **An engine used from Python** (:func:`attach` / :func:`detach`). An engine
  made on the main thread installs :func:`_engine_handler` for each of the two
  signals whose disposition is still ``SIG_DFL``: a program that handles or
  ignores one (``nohup`` ignores SIGHUP) keeps its own. The handler raises
  :class:`Terminated`, a ``SystemExit`` with status 128 + N, in the main
  thread; ``wait_for_completion``, ``wait_for_shutdown`` and the engine's
  ``with`` block treat it as they treat ``KeyboardInterrupt`` (cancel
  gracefully, checkpoint, re-raise), and an uncaught one ends the program with
  status 143 (SIGTERM) or 129 (SIGHUP), running its ``finally`` blocks. A
  signal that arrives while runs are being cancelled kills their steps at once
  and raises nothing. The dispositions are put back when the last engine
  closes.
* **wfaas-local** (:class:`StopOnSignals`) handles SIGINT, SIGTERM and SIGHUP
  itself: the first prints a note and raises :class:`Interrupted` (a
  ``KeyboardInterrupt``, so the engine cancels gracefully); the second only
  kills the steps at once, raising nothing, so the command still checkpoints,
  prints the resume command and exits 128 + the first signal's number; a
  third ends the process there and then, with that status.

Killing at once runs on a helper thread: a handler runs between two bytecodes
of the main thread, which may hold a lock the kill needs.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import termios
import threading
import weakref
from collections.abc import Callable
from types import FrameType
from typing import Any

from . import _threads

__all__ = ["Interrupted", "StopOnSignals", "Terminated", "attach", "detach"]

log = logging.getLogger("wfaas")

STOPPING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)

AGAIN_AFTER = 0.05
"""Seconds after which a first signal swallowed in a weakref callback is sent again (``StopOnSignals``)."""


class Terminated(SystemExit):
    """Raised in the main thread when SIGTERM or SIGHUP arrives and an engine handles it.

    A ``SystemExit`` whose ``code`` is 128 + the signal's number (143, 129):
    uncaught, the program exits with the status a shell expects of a program
    that was stopped by that signal. ``signum`` is the signal.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


class Interrupted(KeyboardInterrupt):
    """wfaas-local's first SIGINT, SIGTERM or SIGHUP; ``exit_code`` is 128 + its number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


def kill_now(engines: list[Any]) -> None:
    """Cancel every run of ``engines`` with no grace, on a helper thread (never blocks the caller)."""
    for engine in engines:
        _threads.start(_kill_quietly, "wfaas-kill-now", engine)


def _kill_quietly(engine: Any) -> None:
    try:
        engine.force_cancel_all(grace=0.0)
    except Exception:
        log.debug("wfaas: killing the runs at once failed", exc_info=True)


# -- an engine used from Python ------------------------------------------------------------

_engines: weakref.WeakSet[Any] = weakref.WeakSet()
_installed: set[int] = set()  # the signals whose handler is ours
_stopping = False  # a first signal was turned into Terminated


def attach(engine: Any) -> None:
    """Handle SIGTERM and SIGHUP for ``engine`` where the program left them at SIG_DFL (main thread only)."""
    global _stopping
    if threading.current_thread() is not threading.main_thread():
        return
    if not _engines:
        _stopping = False  # engines that were dropped without close() leave no stop in progress
    _engines.add(engine)
    for sig in STOPPING_SIGNALS:
        if sig not in _installed and signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, _engine_handler)
            _installed.add(sig)


def detach(engine: Any) -> None:
    """``engine`` closed; the last one to close puts SIG_DFL back (if the handler is still ours)."""
    global _stopping
    _engines.discard(engine)
    if _engines or threading.current_thread() is not threading.main_thread():
        return  # off the main thread the handler stays; with no engine left it acts as SIG_DFL
    for sig in list(_installed):
        if signal.getsignal(sig) is _engine_handler:
            signal.signal(sig, signal.SIG_DFL)
        _installed.discard(sig)
    _stopping = False


def _engine_handler(signum: int, frame: FrameType | None) -> None:
    global _stopping
    engines = [e for e in _engines if not e._closed]
    if not engines:
        # No engine left to stop: the default action, as if we had never been here.
        signal.signal(signum, signal.SIG_DFL)
        _installed.discard(signum)
        os.kill(os.getpid(), signum)
        return
    running = [e for e in engines if e.active_instances()]
    name = signal.Signals(signum).name
    if _stopping and running:
        log.warning("wfaas: %s again: killing the running steps at once", name)
        kill_now(running)
        return
    _stopping = True
    if running:
        log.warning("wfaas: %s: cancelling the running workflows gracefully; %s again kills them at once", name, name)
    raise Terminated(signum)


# -- wfaas-local ---------------------------------------------------------------------------


class StopOnSignals:
    """For the duration of a command: SIGINT, SIGTERM and SIGHUP stop its runs (see the module docstring).

    ``note`` prints a line for the user; ``engine`` is set once the command has
    one. A signal the command was started with ignored (``nohup``, a
    background job) stays ignored.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, note: Callable[[str], None]) -> None:
        self.note = note
        self.engine: Any = None
        self.signum: int | None = None
        self.received = 0
        self._noted = False
        self._previous: dict[int, Any] = {}
        self._unraisable = sys.unraisablehook

    def __enter__(self) -> StopOnSignals:
        for sig in self.SIGNALS:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                self._previous[sig] = signal.signal(sig, self._handler)
        self._unraisable, sys.unraisablehook = sys.unraisablehook, self._swallowed
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        if sys.unraisablehook == self._swallowed:
            sys.unraisablehook = self._unraisable

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.received += 1
        if signum == signal.SIGHUP:
            _quiet_a_dead_terminal()
        if self.signum is None:
            self.signum = signum
            if not self._noted:
                self._noted = True
                name = signal.Signals(signum).name
                text = "cancelling… Ctrl-C again to kill" if name == "SIGINT" else f"{name}: cancelling… again to kill"
                self._note(text)
            raise Interrupted(signum)
        if self.received == 2 and self.engine is not None:
            self._note("killing the running steps")
            kill_now([self.engine])
        elif self.received > 2:
            # Whatever still holds the command up (a hung store, say), the user wants out.
            self._note("exiting at once")
            os._exit(128 + self.signum)

    def _swallowed(self, unraisable: Any) -> None:
        """Python swallows what a weakref callback or a finalizer raises, and a first signal may land in one
        (the garbage collector runs them between any two bytecodes): the command would wait on, its run
        never cancelled. Send that signal again, as the first, a moment later (``AGAIN_AFTER``): the main
        thread is out of the callback by then (else this comes round again)."""
        lost = unraisable.exc_value
        if isinstance(lost, Interrupted) and lost.signum == self.signum and self.received == 1:
            self.signum, self.received = None, 0
            again = threading.Timer(AGAIN_AFTER, signal.pthread_kill, (threading.main_thread().ident, lost.signum))
            again.daemon = True
            again.start()
            return
        self._unraisable(unraisable)

    def _note(self, text: str) -> None:
        try:
            self.note(text)
        except (OSError, ValueError):  # a terminal that hung up (SIGHUP) cannot show it
            pass


def _quiet_a_dead_terminal() -> None:
    """Point stdout/stderr at /dev/null if they are a terminal that hung up.

    Every write to such a terminal fails (EIO), and the lines the command still
    prints (the live panel's last frame, the resume command) would turn a clean,
    checkpointed stop into a traceback and exit 1. A terminal that is still
    there (``kill -HUP`` from elsewhere) keeps showing them.
    """
    for fd in (1, 2):
        try:
            termios.tcgetattr(fd)
        except termios.error as exc:
            if exc.args and exc.args[0] == errno.EIO:
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, fd)
                os.close(null)
        except OSError:
            pass  # a closed descriptor: nothing will be written there anyway
