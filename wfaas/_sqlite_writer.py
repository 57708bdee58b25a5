"""The one connection that writes a ``SqliteStore``: its thread, and the caller that may write in its place.

Transactions run in the order queued, on the writer thread; each one is
answered (``done(None)`` or ``done(StoreError)``), and a failed one is rolled
back without stopping the thread. ``write_now`` runs a transaction in the
caller's thread instead, when nothing is queued: a scheduler whose next step
waits on this very commit saves two thread hand-offs and a turn (issue 17:
a SqliteStore chain took 5.6 scheduler turns a step, against about 1).
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Any

from . import _threads
from .errors import StoreError

log = logging.getLogger("wfaas")
Statements = list[tuple[str, Any]]  # (sql, parameters); a list of rows for executemany
Done = Callable[[StoreError | None], None]


class Writer:
    """The one thread that writes: transactions in the order queued; each one answered, never fatal."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        describe: Callable[[BaseException], StoreError],
        check: Callable[[], None],
    ) -> None:
        self._conn = conn
        self._describe = describe
        self._check = check
        self._jobs: queue.SimpleQueue[tuple[Statements, Done] | None] = queue.SimpleQueue()
        # One transaction at a time on the connection, whichever thread runs it (_running); _queued counts
        # jobs submitted and not yet run (under _count, never held for long), so write_now never overtakes one.
        self._running = threading.Lock()
        self._count = threading.Lock()
        self._queued = 0
        self._thread = _threads.start(self._run, "wfaas-sqlite-writer")

    def submit(self, statements: Statements, done: Done) -> None:
        with self._count:
            self._queued += 1
        self._jobs.put((statements, done))

    def write_now(self, statements: Statements, done: Done) -> None:
        """Run one transaction in this thread (``done`` called here) if nothing is queued, else queue it."""
        with self._count:
            queued = self._queued
        if queued:
            self.submit(statements, done)
            return
        with self._running:
            error = self._transaction(statements)
        done(error)

    def close(self) -> None:
        self._jobs.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=60)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                break
            statements, done = job
            with self._running:
                error = self._transaction(statements)
            with self._count:
                self._queued -= 1
            try:
                done(error)
            except Exception:  # a callback's own failure must not stop the commits of others
                log.exception("wfaas: a store write's completion callback failed")
        try:
            self._conn.close()  # the last connection checkpoints the log into the file and removes it
        except sqlite3.Error:
            pass  # nothing committed is lost: the log stays beside the file and is read on next open

    def _transaction(self, statements: Statements) -> StoreError | None:
        conn = self._conn
        try:
            self._check()
            conn.execute("BEGIN IMMEDIATE")
            for sql, args in statements:
                conn.executemany(sql, args)
            conn.execute("COMMIT")
        except BaseException as exc:  # noqa: BLE001 - reported to the job's caller; the thread goes on
            error = self._describe(exc)
            error.__cause__ = exc
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # SQLite rolled it back itself (as after SQLITE_FULL)
            return error
        return None
