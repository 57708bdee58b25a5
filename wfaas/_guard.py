"""The engine-death guard: a small process that SIGKILLs the workers' trees when the engine dies.

Why a process of its own: a watch thread inside each worker needs the
worker's GIL, and a step blocked in C code that holds it (a catastrophic
regular expression, a long call into a C library) never lets that thread
run, so the worker outlived its engine. A parent-death signal on the worker
does not fire either: the worker's parent is the forkserver, which lives as
long as any worker holds its keep-alive pipe. The guard needs nothing from
the workers::

    engine (WorkerPool)                        guard process (one per pool)
    spawn(slot) -- pid ----pipe------------->  remembers the worker
    engine dies, or the pool closes:           end of file on the pipe (the
      the pipe's only writer is gone    ---->  engine held its only writer):
                                               freeze each worker's tree,
                                               SIGKILL it, exit

It blocks in one read; it costs one process per pool, started with the
workers, and nothing per step. Its pipe end is the only thing it waits on, so
``kill -9`` of the engine, an uncaught exception or the end of the program
all look the same to it. It ignores SIGINT, SIGHUP and SIGTERM (the engine
decides what a Ctrl-C, a closed terminal or SIGTERM to the whole process group
means, and stops its workers with their grace period).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing.connection
import multiprocessing.process
import os
import signal
import threading
from typing import Any

_PR_SET_NAME = 15  # linux/prctl.h
READY = b"ready"
READY_TIMEOUT = 30.0  # seconds; it takes milliseconds, but a loaded machine may be slow to schedule it
log = logging.getLogger("wfaas")


def _name_me(name: bytes) -> None:
    """Show the guard as ``name`` in ps and top (its command line is the forkserver's)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: only the name is lost


def main(conn: multiprocessing.connection.Connection) -> None:
    """The guard's loop: collect worker PIDs until the engine's end of the pipe closes, then kill their trees."""
    import psutil

    from .pool import kill_tree

    _name_me(b"wfaas-guard")
    # Out of the engine's process group: `kill -9 -PGID` of the engine's group (a shell job, a test
    # harness, a supervisor) must not take the guard with it, or nothing would be left to kill the
    # workers, which lead groups of their own.
    try:
        os.setpgid(0, 0)
    except OSError:
        pass  # already a group leader
    # Signals for the engine's process group are the engine's to handle (a graceful stop stops the
    # workers with a grace period); the guard acts only when the engine is gone.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    conn.send_bytes(READY)  # out of the engine's group and deaf to its signals: workers may start now
    watched: dict[int, psutil.Process] = {}
    while True:
        try:
            pid = int(conn.recv())
        except (EOFError, OSError):
            break
        # psutil remembers each worker's start time, so a recycled PID is never killed.
        watched = {p.pid: p for p in watched.values() if p.is_running()}
        try:
            watched[pid] = psutil.Process(pid)
        except psutil.Error:
            pass  # it died already
    for p in watched.values():
        if p.is_running():
            kill_tree(p)


class Guard:
    """The engine side: start the guard process, tell it each worker's PID, close it."""

    def __init__(self, ctx: Any) -> None:
        reader, self._conn = ctx.Pipe(duplex=True)
        self._lock = threading.Lock()  # a Dask worker starts step processes from several threads
        self._process = ctx.Process(target=main, args=(reader,), name="wfaas-guard", daemon=True)
        self._process.start()
        reader.close()
        # Wait until the guard has left the engine's process group: a `kill -9` of that group in the
        # moment between would take the guard too, and leave workers started meanwhile running.
        try:
            ready = self._conn.poll(READY_TIMEOUT) and self._conn.recv_bytes() == READY
        except (EOFError, OSError):
            ready = False  # it died starting (its error is on stderr); the engine runs on without it
        if not ready:
            log.warning(
                "wfaas: the guard process did not start within %s s; workers may outlive a killed engine", READY_TIMEOUT
            )
        # multiprocessing SIGTERMs and then joins its children at interpreter exit; the guard ignores
        # SIGTERM and ends only when the engine's process has, so that join would never return.
        # Out of that list, it is joined by close() or, when the program ends, ends on its own.
        multiprocessing.process._children.discard(self._process)  # type: ignore[attr-defined]

    def watch(self, pid: int) -> None:
        """Kill ``pid``'s tree if the engine dies while it runs."""
        try:
            with self._lock:
                self._conn.send(pid)
        except OSError:
            pass  # the guard died (killed from outside): nothing to tell

    def close(self) -> None:
        """Let the guard go (after the pool stopped its workers): it kills what is still left."""
        with self._lock:
            self._conn.close()
        self._process.join(timeout=5.0)
