"""Around each attempt in a worker: capture what it prints and logs, then put the process back as it was.

A worker is warm: it runs step after step. Two things wrap every attempt:

    Capture (made first: fds 1 and 2 -> its pipe,     ProcessState (taken next, so fds 1 and 2
    for the worker's life; one reader thread)         are the pipe in the state it keeps)
    attempt starts: its lines from now on
    step runs: prints, logs, C code, subprocesses      reader thread: chunks -> timestamped lines
    attempt ends: ---------------------------------->  flush(): what the streams hold -> fds 1, 2
    drain what is left; the attempt's lines
    (the worker's reply: here, or before the flush when RunStep.tail; the engine reads it meanwhile)
                                                       restore(): fds 0-2, stdio objects, cwd,
                                                       environment, signal handlers/mask/timer,
                                                       sys.path, umask, root logging -> None, or
                                                       why not (the engine replaces the worker)
    between attempts and at exit: what arrives goes to the worker's own stderr

Capturing at the file-descriptor level catches what C extensions and child
processes write too. A pipe read by a thread (rather than a file per attempt)
gives each line the time it was written. This runs around every attempt, so
an attempt that prints nothing costs no thread wake-up: two stream flushes
and one ``poll`` to end the capture, and the reset (eight system calls).
A worker does both after sending the attempt's reply, while the engine
reads it (the capture, unless told otherwise: ``outputs.py``): off the
path of a chain of steps, where the engine waits for the reply (issue 13:
``benchmarks/capture_ab.py``).

What a step leaves behind that is not listed above (threads it started,
modules it imported or patched, ``putenv`` from C) is not undone.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # getsignal without the enum conversion: 20 times faster, and this runs after every attempt
import collections
import errno
import io
import itertools
import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LIMIT", "OUTPUT", "AttemptLog", "Capture", "LogLine", "ProcessState"]

LIMIT = 2**20
"""What is kept of one attempt's output and records: the last 1 MiB (counted in characters)."""

OUTPUT = 0
"""The level of a line the step printed (stdout or stderr), as opposed to a log record's level."""

LogLine = tuple[float, int, str]
"""One captured line: (time.time() when it was written, ``OUTPUT`` or the record's level, text)."""


@dataclass
class AttemptLog:
    """What one attempt of a step printed and logged, as a store keeps it.

    ``part`` is ``""`` for the attempt itself, ``"on_success"`` / ``"on_failure"``
    for the hook that ran after it. ``cut`` counts the characters dropped from
    the front to keep the last :data:`LIMIT`. ``item_key`` is the item's key
    for an attempt of one item of a ``for_each`` step (``None`` otherwise).
    """

    step_id: str
    attempt: int
    lines: list[LogLine] = field(default_factory=list)
    cut: int = 0
    part: str = ""
    item_key: str | None = None


# Signals whose Python-level disposition a step may change; SIGKILL and SIGSTOP cannot be caught.
_SIGNALS = [int(s) for s in signal.Signals if s not in (signal.SIGKILL, signal.SIGSTOP)]

# Bound once: ``restore`` runs after every attempt, on a cold cache (the worker slept in between).
_dup2, _getcwd, _umask = os.dup2, os.getcwd, os.umask
_getsignal, _pthread_sigmask, _setitimer = _signal.getsignal, _signal.pthread_sigmask, _signal.setitimer
_SIG_SETMASK, _ITIMER_REAL = int(signal.SIG_SETMASK), int(signal.ITIMER_REAL)


class ProcessState:
    """The worker's process-wide state when it started, and :meth:`restore` to go back to it.

    Taken after the worker's :class:`Capture`: the descriptors it puts back are the capture's.
    """

    def __init__(self) -> None:
        try:
            self.cwd: str | None = os.getcwd()
        except OSError:  # started in a folder that was removed: nothing to go back to
            self.cwd = None
        self.environ = dict(os.environ)
        self._environ_data = dict(_environ_data())
        self.path = list(sys.path)
        # A signal whose handler was set outside Python (getsignal: None) cannot be set back from Python.
        self.signals = [sig for sig in _SIGNALS if _signal.getsignal(sig) is not None]
        self.handlers = list(map(_signal.getsignal, self.signals))
        self.mask = _signal.pthread_sigmask(signal.SIG_BLOCK, [])
        self.umask = os.umask(0o22)
        os.umask(self.umask)
        # Copies of the standard descriptors, above the range a step is likely to close.
        self.fds = {fd: _dup_high(fd) for fd in (0, 1, 2)}
        self.stdio = (sys.stdin, sys.stdout, sys.stderr)
        self.root = logging.getLogger()
        self.root_handlers = list(self.root.handlers)
        self.root_level = self.root.level
        self._fd_copies = tuple(self.fds.items())
        self._environ = os.environ
        self._environ_live = _environ_data()

    def flush(self) -> None:
        """Write what the standard streams hold to fds 1 and 2 (into the attempt's capture); never raises.

        The streams the worker started with, and those a step put in their
        place: a ``print(..., end="")`` waits in a stream's buffer.
        """
        _, stdout, stderr = self.stdio
        try:
            stdout.flush()
            stderr.flush()
            if sys.stdout is stdout and sys.stderr is stderr:
                return
        except (AttributeError, ValueError, OSError):  # None at start, closed, or its descriptor was
            pass
        _flush_stdio()

    def restore(self) -> str | None:
        """Put back what a step changed; ``None``, or what could not be put back (replace the worker).

        This runs after every attempt, so the common case (nothing changed)
        is a straight line: compare what can be read without a system call,
        and set unconditionally what can only be read with one (descriptors,
        signal mask, timer, umask: reading costs as much as setting). A worker
        calls it after sending the attempt's reply (``flush`` came before),
        while the engine reads the reply.
        """
        problem = None
        stdin, stdout, stderr = self.stdio
        try:
            changed = sys.stdout is not stdout or sys.stderr is not stderr or sys.stdin is not stdin or stdin.closed
            changed = changed or stdout.closed or stderr.closed
        except AttributeError:  # None at start
            changed = True
        for fd, copy in self._fd_copies:
            try:
                _dup2(copy, fd)
            except OSError as exc:
                problem = f"its standard file descriptor {fd} cannot be restored ({exc})"
        if changed:
            self._restore_stdio()
        if self.cwd is not None:
            try:
                if _getcwd() != self.cwd:
                    os.chdir(self.cwd)
            except OSError:
                try:
                    os.chdir(self.cwd)
                except OSError as exc:
                    problem = f"its working directory {self.cwd} cannot be restored ({exc.strerror})"
        if os.environ is not self._environ or self._environ_live != self._environ_data:
            self._restore_environ()
        if sys.path != self.path:
            sys.path[:] = self.path
        # One comparison in C for the common case: no handler changed.
        if list(map(_getsignal, self.signals)) != self.handlers:
            for sig, handler in zip(self.signals, self.handlers, strict=True):
                if _getsignal(sig) is not handler:
                    signal.signal(sig, handler)
        _pthread_sigmask(_SIG_SETMASK, self.mask)
        _setitimer(_ITIMER_REAL, 0)  # an alarm a step set must not fire in the next one
        _umask(self.umask)
        root = self.root
        if root.handlers != self.root_handlers:
            root.handlers[:] = self.root_handlers
        if root.level != self.root_level:
            root.setLevel(self.root_level)
        if root.manager.disable:
            logging.disable(logging.NOTSET)
        return problem

    def _restore_environ(self) -> None:
        os.environ = self._environ  # noqa: B003 - a step may have put another mapping in its place
        os.environ.clear()
        os.environ.update(self.environ)
        self._environ_live = _environ_data()

    def _restore_stdio(self) -> None:
        streams = []
        for fd, name in enumerate(("stdin", "stdout", "stderr")):
            stream = self.stdio[fd]
            if stream is None or getattr(stream, "closed", False):
                # Closed by the step (``sys.stdout.close()``): a new object over the restored descriptor.
                raw = io.FileIO(fd, "r" if fd == 0 else "w", closefd=False)
                stream = io.TextIOWrapper(
                    raw, encoding="utf-8", errors="backslashreplace", line_buffering=fd != 0, write_through=fd == 2
                )
            streams.append(stream)
            if getattr(sys, name) is not stream:
                setattr(sys, name, stream)
        self.stdio = (streams[0], streams[1], streams[2])


def _environ_data() -> dict[Any, Any]:
    # The encoded mapping behind os.environ: comparing it is 70 times faster than os.environ's
    # own __eq__, which decodes every entry.
    data = getattr(os.environ, "_data", None)
    return data if isinstance(data, dict) else dict(os.environ)


def _dup_high(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100)


# While an attempt runs, its new lines are handed to ``forward`` at most this often.
FORWARD_INTERVAL = 0.1


class Capture:
    """Holds fds 1 and 2 on a pipe for the worker's life; a thread turns what an attempt writes into timestamped lines.

    Make it before the worker's :class:`ProcessState`, so that the state put
    back after every attempt has fds 1 and 2 on the pipe. What arrives while no
    attempt runs (a child a step left running, the worker's own warnings) is
    passed on to the worker's own stderr, as is what is left at :meth:`close`
    (called at exit, before a worker's last traceback is printed).
    Log records are added by :meth:`record` (a logging handler calls it).
    Everything is bounded to the last :data:`LIMIT` characters per attempt.
    With ``forward``, lines are also handed over while the attempt runs
    (``forward(lines)``, at most every :data:`FORWARD_INTERVAL` seconds, never
    after :meth:`stop` began), so that they can be shown as they come.
    """

    def __init__(self, forward: Callable[[list[LogLine]], None] | None = None) -> None:
        from multiprocessing import util

        self._forward = forward
        self._active = False
        self._r, self._w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._r, False)
        # Whether the pipe holds anything, without a read that raises when it does not.
        # Used under the lock only: a poll object refuses concurrent calls.
        self._peek = select.poll()
        self._peek.register(self._r, select.POLLIN)
        self._lock = threading.Lock()
        self._reset()
        self._own = (_dup_high(1), _dup_high(2))  # the worker's own stdout and stderr
        _flush_stdio()
        _dup2(self._w, 1)
        _dup2(self._w, 2)
        # A worker process ends through multiprocessing's exit function (no atexit there);
        # it runs finalizers before printing the traceback of a worker that failed.
        util.Finalize(None, self.close, exitpriority=100)
        self._reading = True
        self._reader = threading.Thread(target=self._read_forever, name="wfaas-capture", daemon=True)
        self._reader.start()

    def _reset(self) -> None:
        """Forget the lines kept (lock held, or before the reader starts)."""
        self._lines: collections.deque[LogLine] = collections.deque()
        self._size = 0
        self._cut = 0
        self._partial = b""
        self._partial_at = 0.0
        self._last = 0.0
        self._total = 0  # lines added this attempt
        self._sent = 0  # of which handed to forward
        self._due = 0.0

    def start(self) -> None:
        """What fds 1 and 2 receive from now on, and the records logged, are this attempt's."""
        # No lock: one store, and a chunk the reader thread is reading right now arrived before the attempt.
        self._active = True

    def stop(self, state: ProcessState) -> tuple[list[LogLine], int, int, str | None]:
        """End the attempt's capture (``state.flush()`` first); the caller then calls ``state.restore()``.

        Returns (lines, characters cut, index of the first line not yet
        forwarded, and None, or why this worker cannot capture another attempt).
        """
        state.flush()
        problem = None
        with self._lock:
            closed = not self._reading
            ready = self._peek.poll(0)
            if ready:
                if ready[0][1] & select.POLLNVAL:
                    closed = True
                else:
                    self._drain()
            self._active = False
            if closed:
                problem = "a step closed the pipe that captures its output"
            if not self._total and not self._partial:
                return [], 0, 0, problem  # the common case: the attempt printed and logged nothing
            if self._partial:
                self._add(self._partial_at, OUTPUT, self._partial.decode(errors="replace"))
            lines, cut = list(self._lines), self._cut
            fresh = max(0, len(lines) - (self._total - self._sent))
            self._reset()
        return lines, cut, fresh, problem

    def record(self, when: float, level: int, text: str) -> None:
        """Add a log record's text (any thread), after what was printed before it; none between attempts."""
        with self._lock:
            if not self._active:
                return
            if self._peek.poll(0):
                self._drain()
            self._add(when, level, text)
            self._maybe_forward()

    def close(self) -> None:
        """Give fds 1 and 2 back to the worker's own stdout and stderr, passing on what the pipe still holds."""
        _flush_stdio()
        with self._lock:
            self._active = False
            passed = self._drain() if self._peek.poll(0) else []
        self._pass_on(passed)
        for fd, own in enumerate(self._own, 1):
            try:
                _dup2(own, fd)
            except OSError:
                pass  # a step closed the copy: nothing to give back

    def _read_forever(self) -> None:
        poller = select.poll()
        poller.register(self._r, select.POLLIN)
        timeout: float | None = None
        try:
            while True:
                events = poller.poll(None if timeout is None else timeout * 1000)
                if any(mask & select.POLLNVAL for _, mask in events):
                    return  # a step closed the pipe; the worker is replaced (see ``stop``)
                with self._lock:
                    passed = self._drain()
                    timeout = self._maybe_forward()
                self._pass_on(passed)
        finally:
            self._reading = False

    def _maybe_forward(self) -> float | None:
        """Hand new lines over if it is time (lock held); else how long until it is, or None (nothing to do)."""
        if self._forward is None or not self._active or self._sent == self._total:
            return None
        wait = self._due - time.monotonic()
        if wait > 0:
            return wait
        new = list(itertools.islice(self._lines, max(0, len(self._lines) - (self._total - self._sent)), None))
        self._sent, self._due = self._total, time.monotonic() + FORWARD_INTERVAL
        if new:
            self._forward(new)
        return None

    def _drain(self) -> list[bytes]:
        """Read what the pipe holds (lock held, so the reader thread is not mid-read).

        An attempt's chunks become its lines; what arrived while none runs is
        returned, to be passed on (``_pass_on``) once the lock is released.
        """
        passed: list[bytes] = []
        while True:
            try:
                chunk = os.read(self._r, 65536)
            except BlockingIOError:
                return passed
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                return passed
            if not chunk:
                return passed
            if self._active:
                self._split(chunk)
            else:
                passed.append(chunk)

    def _pass_on(self, chunks: list[bytes]) -> None:
        """Write what arrived between attempts to the worker's own stderr (lock not held: it may block)."""
        for chunk in chunks:
            rest = memoryview(chunk)
            try:
                while rest:
                    rest = rest[os.write(self._own[1], rest) :]
            except OSError:
                return  # nowhere to go: dropped, as it would be on a closed stderr

    def _split(self, chunk: bytes) -> None:
        now = time.time()
        if not self._partial:
            self._partial_at = now
        data = self._partial + chunk
        *complete, self._partial = data.split(b"\n")
        for raw in complete:
            self._add(self._partial_at, OUTPUT, raw.decode(errors="replace"))
            self._partial_at = now
        if len(self._partial) > LIMIT:  # a line with no end: keep its last part
            self._add(self._partial_at, OUTPUT, self._partial.decode(errors="replace"))
            self._partial = b""

    def _add(self, when: float, level: int, text: str) -> None:
        # Lines are stamped when read, records when made: keep the times in the order things
        # were written, so that sorting by time never puts a record before a line printed first.
        when = self._last = max(when, self._last)
        if len(text) > LIMIT:
            self._cut += len(text) - LIMIT
            text = text[-LIMIT:]
        self._lines.append((when, level, text))
        self._total += 1
        self._size += len(text) + 1
        while self._size > LIMIT:
            dropped = self._lines.popleft()
            self._size -= len(dropped[2]) + 1
            self._cut += len(dropped[2]) + 1


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass  # closed, or its descriptor was: restore() replaces it


def format_record(record: logging.LogRecord) -> str:
    """A log record as one captured line: level, logger and message (and its traceback, if any)."""
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a bad format string must not fail the step
        message = str(record.msg)
    # A step's own logger (ctx.logger) is named after the step, which every line shows anyway.
    name = "" if record.name.startswith("wfaas.step.") else f" {record.name}"
    text = f"{record.levelname}{name}: {message}"
    if record.exc_info:
        import traceback

        text += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
    elif record.exc_text:
        text += "\n" + record.exc_text
    return text


def cut_marker(cut: int) -> str:
    """The line shown where an attempt's log was cut."""
    return f"[... {cut} characters cut: only the last {LIMIT // 2**20} MiB of an attempt's output is kept ...]"


def level_name(level: int) -> str:
    return "" if level == OUTPUT else logging.getLevelName(level)
