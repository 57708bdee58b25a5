"""``SqliteStore``: checkpoints in one SQLite file.

Layout: one table ``wfaas`` of (key TEXT PRIMARY KEY, value BLOB), sqlitedict's
layout (``SqliteDict(path, tablename="wfaas", flag="r", journal_mode="WAL")``
reads it). Per instance::

    m/<iid>              meta: status, error, times, owner       (rewritten each turn it changes)
    i/<iid>/s/<step>     one record per step                      (written when that step changes)
    i/<iid>/f/<field>    one encoded data field                   (written when a step replaced it)
    i/<iid>/k/<field>/<key hex>  one key of a dict field          (written when a step changed that key)
    i/<iid>/x/<name>     write-once records: data class, definition fingerprint
    i/<iid>/L/<step>     a for_each step's collection: [(key, encoded item)]  (written once, when computed)
    i/<iid>/t/<step>\x1f<position>  one item of a for_each step              (written when that item changes)
    l/<iid>/<step>\x1f<attempt>\x1f<part>   what one attempt printed and logged (an ``AttemptLog``)

and ``wfaas/format`` holds the layout version. A scheduler turn is one
transaction, so a checkpoint costs O(what changed).

Writing: one writer thread of ours owns the writing connection and runs the
queued transactions in order; each ends by calling its ``done`` with None or
with a :class:`StoreError`. A failed transaction (full disk, I/O error, the
file deleted) is rolled back and reported; the thread never dies of it, so no
caller ever waits for an answer that cannot come. (sqlitedict, which wfaas
used before, runs ``commit()`` outside its writer thread's error handling: on
a full disk the thread dies and every later call waits forever, and it has no
public "commit, then tell me" call; see README "Durability".)
``write_now`` runs the transaction in the caller's thread instead when none is
queued (``_sqlite_writer.py``): the scheduler's commit that the next step waits on.

Reading: a second connection, read-only, beside the writer; in WAL mode it sees
every committed turn and is never blocked by the writer.

Durability: WAL with ``synchronous=NORMAL`` never corrupts the file and keeps
every commit across a crash of the process (``kill -9``), because the commit
is in the OS before ``COMMIT`` returns; only a power cut or OS crash can lose
the last commits. ``synchronous="FULL"`` fsyncs every commit and survives
that too, at the cost of one fsync per scheduler turn.

Trust: values are pickles, so opening a store runs code from it. A store, its
``-wal``/``-shm`` files or its folder that others may write, or that belongs
to another user, is refused (as ssh refuses such keys); see ``_store_files.trust``.
"""

from __future__ import annotations

import atexit
import errno
import functools
import logging
import os
import pickle
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import data as data_codec
from ._sqlite_writer import Done, Statements, Writer
from ._store_files import create_file, trust
from .capture import AttemptLog
from .errors import StoreError
from .objects import ObjectStore
from .store import Checkpoint, Record, StateStore

__all__ = ["FORMAT_VERSION", "SqliteStore"]

FORMAT_VERSION = 1

log = logging.getLogger("wfaas")
_TABLE = "wfaas"
_HEADER = b"SQLite format 3\x00"
_BUSY_SECONDS = 10.0  # another process holding the write lock (a concurrent creator, a reader's checkpoint)


def _log_key(instance_id: str, step_id: str, attempt: int, part: str) -> str:
    return f"l/{instance_id}/{step_id}\x1f{attempt:08d}\x1f{part}"


def _after(prefix: str) -> str:
    """The smallest key above every key that starts with ``prefix``."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def _encode(value: Any) -> sqlite3.Binary:
    return sqlite3.Binary(data_codec.encode_value(value))


class SqliteStore(StateStore):
    """A :class:`StateStore` in one SQLite file; safe to read from other processes while a run writes.

    ``synchronous`` is ``"NORMAL"`` (survives a process crash) or ``"FULL"``
    (also survives a power cut; slower). ``readonly=True`` opens an existing
    store for reading only (what ``wfaas-local status`` does). ``create=False``
    opens an existing store for writing but never creates one (what
    ``wfaas-local resume`` does): a missing file raises :class:`StoreError`.

    Opening a store unpickles what it holds, so it runs code from it like
    opening a pickle: a store file, its folder, or its ``-wal``/``-shm``
    files that another user owns, or that its group or others may write, is
    refused with a :class:`StoreError` naming the mode or owner and the fix.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "NORMAL",
        readonly: bool = False,
        create: bool = True,
    ) -> None:
        if synchronous.upper() not in ("NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be NORMAL, FULL or EXTRA, got {synchronous!r}")
        self.path = Path(path)
        self.readonly = readonly
        self._closed = True  # until fully open: close() and atexit have nothing to do
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._writer: Writer | None = None
        self._empty = False  # a read-only open of a store another process is creating right now
        self.objects = ObjectStore(Path(f"{self.path}.objects"), fsync=synchronous.upper() != "NORMAL")  # as commits
        try:
            self._open_file(create and not readonly)
            self._connect(synchronous.upper())
        except StoreError:
            self._close_connections()
            raise
        except Exception as exc:  # every other open failure becomes one clear StoreError
            self._close_connections()
            if isinstance(exc, PermissionError):
                raise StoreError(
                    f"cannot open the wfaas store {self.path}: {exc.strerror} ({exc.filename}); run as a user who "
                    "may read it, or fix its permissions"
                ) from exc
            if getattr(exc, "sqlite_errorname", "") == "SQLITE_FULL":
                raise StoreError(
                    f"cannot open the wfaas store {self.path}: its disk is full ({exc}); free space on its "
                    "filesystem and try again"
                ) from exc
            raise StoreError(
                f"cannot open the wfaas store {self.path}: {type(exc).__name__}: {exc}. If the file is damaged, "
                "move it aside (its runs are lost) or restore it from a backup; wfaas never recreates it silently"
            ) from exc
        self._closed = False
        atexit.register(self.close)

    # -- opening -------------------------------------------------------------------

    def _open_file(self, create: bool) -> None:
        path = self.path
        if path.is_dir():
            raise StoreError(f"the wfaas store {path} is a directory; give a file path such as {path / 'runs.sqlite'}")
        trust(path)  # before creating anything in a folder others may write
        if not path.exists():
            if not create:
                raise StoreError(f"no wfaas store at {path}; run a workflow first, or pass the right --store")
            create_file(path)
            trust(path)
        if not self.readonly:
            if not os.access(path, os.W_OK):
                raise StoreError(f"the wfaas store {path} is not writable; fix its permissions or choose another path")
            if not os.access(path.parent, os.W_OK | os.X_OK):
                raise StoreError(
                    f"the wfaas store {path} is in a directory without write permission ({path.parent}); SQLite "
                    "keeps its write-ahead log beside the file: make the directory writable or move the store"
                )
        if path.stat().st_size:
            with open(path, "rb") as f:
                if f.read(16) != _HEADER:
                    raise StoreError(
                        f"{path} is not a wfaas store (not an SQLite database); choose another --store path, "
                        "or move the file aside"
                    )
            self._probe()

    def _probe(self) -> None:
        """Check an existing file with SQLite's quick check before using it (reads it once).

        A damaged page is then reported as a damaged store at open, not as a
        failure somewhere in the middle of a run.
        """
        try:
            probe = sqlite3.connect(self._ro_uri(), uri=True, timeout=_BUSY_SECONDS)
            try:
                verdict = probe.execute("PRAGMA quick_check").fetchone()
            finally:
                probe.close()
        except sqlite3.Error as exc:
            if not os.access(self.path.parent, os.W_OK | os.X_OK) or not os.access(self.path, os.R_OK):
                raise StoreError(
                    f"cannot open the wfaas store {self.path}: {exc}. SQLite's write-ahead log needs write "
                    f"permission on the store's directory ({self.path.parent}), also for reading; run as a user "
                    "who has it, or copy the store elsewhere"
                ) from exc
            raise StoreError(self._damaged(str(exc))) from exc
        if not verdict or verdict[0] != "ok":
            raise StoreError(self._damaged(str(verdict[0] if verdict else "no answer")))

    def _ro_uri(self) -> str:
        return f"file:{urllib.parse.quote(str(self.path))}?mode=ro"  # a "?" or "#" in the path is not a URI part

    def _connect(self, synchronous: str) -> None:
        st = os.stat(self.path)
        self._identity = (st.st_dev, st.st_ino)  # the file a commit must still be writing to
        if not self.readonly:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=_BUSY_SECONDS)
            try:
                tables = self._tables(conn)
                if tables and _TABLE not in tables:  # before anything changes the file (WAL is written in it)
                    raise StoreError(self._foreign(tables))
                _wal(conn)
                conn.execute(f"PRAGMA synchronous={synchronous}")
                self._init_schema(conn)
            except BaseException:
                conn.close()
                raise
            self._writer = Writer(conn, functools.partial(_write_failed, self.path), self._check_identity)
        self._reader = sqlite3.connect(self._ro_uri(), uri=True, check_same_thread=False, timeout=_BUSY_SECONDS)
        tables = self._tables(self._reader)
        if tables and _TABLE not in tables:
            raise StoreError(self._foreign(tables))
        if not tables:
            # Only a read-only open can get here: the file is being created by another process.
            self._empty = True
            return
        rows = self._reader.execute(f'SELECT value FROM "{_TABLE}" WHERE key = ?', ("wfaas/format",)).fetchall()
        version = pickle.loads(rows[0][0]) if rows else FORMAT_VERSION
        if version > FORMAT_VERSION:
            raise StoreError(
                f"the wfaas store {self.path} was written by a newer wfaas (format {version}, this one reads "
                f"up to {FORMAT_VERSION}); upgrade wfaas (pip install -U wfaas) to use it"
            )

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        """Make an empty file a store; refuse an SQLite database that is something else (issue 13 defect 12)."""
        tables = self._tables(conn)
        if tables and _TABLE not in tables:
            raise StoreError(self._foreign(tables))
        if _TABLE in tables:
            return
        # Several processes may create one store at once: the first to get the lock makes the table.
        conn.execute("BEGIN IMMEDIATE")
        try:
            tables = self._tables(conn)
            if tables and _TABLE not in tables:
                raise StoreError(self._foreign(tables))
            conn.execute(f'CREATE TABLE IF NOT EXISTS "{_TABLE}" (key TEXT PRIMARY KEY, value BLOB)')
            conn.execute(
                f'INSERT OR IGNORE INTO "{_TABLE}" (key, value) VALUES (?, ?)',
                ("wfaas/format", _encode(FORMAT_VERSION)),
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @staticmethod
    def _tables(conn: sqlite3.Connection) -> list[str]:
        return [name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]

    def _foreign(self, tables: list[str]) -> str:
        shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        return (
            f"{self.path} is an SQLite database but not a wfaas store (its tables: {shown}); wfaas leaves it "
            "untouched: choose another --store path"
        )

    def _damaged(self, detail: str) -> str:
        return (
            f"the wfaas store {self.path} is damaged or not a wfaas store ({detail}); move it aside (its runs "
            "are lost) or restore it from a backup; wfaas never recreates a store silently"
        )

    # -- writing -------------------------------------------------------------------

    def _check_identity(self) -> None:
        """Before each commit: the path still names the file we opened (issue 14 item 7).

        SQLite goes on writing into a deleted (or replaced) file without a word, and
        everything written there is lost when it closes.
        """
        try:
            st = os.stat(self.path)
            same = (st.st_dev, st.st_ino) == self._identity
        except FileNotFoundError:
            same = False
        if not same:
            raise StoreError(
                f"the wfaas store {self.path} was deleted or replaced while this process was writing to it; "
                "nothing more is written, so that no checkpoint goes into a file nobody can open: restore the "
                "file from a backup if you have one, or run the workflow again"
            )

    def write(self, checkpoints: list[Checkpoint]) -> None:
        self._write_statements(self._statements(checkpoints))

    def write_async(self, checkpoints: list[Checkpoint], done: Callable[[Exception | None], None]) -> None:
        """Queue one transaction; ``done`` runs on the writer thread once it is committed, or failed.

        The scheduler keeps working meanwhile (steps that were already ready get
        dispatched); only what depends on this checkpoint waits for ``done``.
        """
        self._submit(self._statements(checkpoints), done)

    def write_now(self, checkpoints: list[Checkpoint], done: Callable[[Exception | None], None]) -> None:
        """Commit in this thread when no write is queued (no hand-off to the writer thread), else queue it."""
        self._submit(self._statements(checkpoints), done, now=True)

    def _submit(self, statements: Statements, done: Done, now: bool = False) -> None:
        with self._lock:
            if self._writer is None or self._closed:
                raise StoreError(f"the wfaas store {self.path} is closed; open it again to write")
            (self._writer.write_now if now else self._writer.submit)(statements, done)

    def _statements(self, checkpoints: list[Checkpoint]) -> Statements:
        """One turn's statements, encoded in the caller's thread."""
        if self.readonly:
            raise StoreError(f"the wfaas store {self.path} was opened read-only")
        rows: list[tuple[str, sqlite3.Binary]] = []
        ranges: list[tuple[str, str]] = []  # key ranges to delete first
        keys: list[tuple[str]] = []  # single keys to delete
        for cp in checkpoints:
            prefix = f"i/{cp.instance_id}/"
            if cp.replace:
                ranges.append((prefix, prefix[:-1] + "0"))
            rows += [(f"{prefix}x/{name}", _encode(value)) for name, value in cp.extra.items()]
            rows += [(f"{prefix}s/{sid}", _encode(rec)) for sid, rec in cp.steps.items()]
            for name, blob in cp.fields.items():
                deltas = f"{prefix}k/{name}/"
                ranges.append((deltas, deltas[:-1] + "0"))
                if blob is None:
                    keys.append((f"{prefix}f/{name}",))
                else:
                    rows.append((f"{prefix}f/{name}", sqlite3.Binary(blob)))
            for name, changes in cp.deltas.items():
                rows += [(f"{prefix}k/{name}/{k.hex()}", sqlite3.Binary(v)) for k, v in changes.items()]
            _item_rows(prefix, cp, rows, ranges)
            if cp.meta is not None:
                rows.append((f"m/{cp.instance_id}", _encode(cp.meta)))
            for (sid, number, part), log in cp.logs.items():
                if log is None:
                    keys.append((_log_key(cp.instance_id, sid, number, part),))
                else:
                    rows.append((_log_key(cp.instance_id, sid, number, part), _encode(log)))
        statements: Statements = []
        if ranges:
            statements.append((f'DELETE FROM "{_TABLE}" WHERE key >= ? AND key < ?', ranges))
        if keys:
            statements.append((f'DELETE FROM "{_TABLE}" WHERE key = ?', keys))
        if rows:
            statements.append((f'REPLACE INTO "{_TABLE}" (key, value) VALUES (?, ?)', rows))
        return statements

    # -- reading -------------------------------------------------------------------

    def _select(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        if self._empty:
            return []
        with self._read_lock:
            try:
                return self._reader.execute(sql, args).fetchall()
            except sqlite3.DatabaseError as exc:
                raise StoreError(self._damaged(str(exc))) from exc

    def _decode(self, instance_id: str, key: str, blob: bytes) -> Any:
        try:
            return pickle.loads(bytes(blob))
        except Exception as exc:  # any unpickling failure means a damaged record
            raise StoreError(self._bad_record(instance_id, f"{key}: {type(exc).__name__}: {exc}")) from exc

    def _bad_record(self, instance_id: str, detail: str) -> str:
        return (
            f"the wfaas store {self.path} holds a damaged record of run {instance_id} ({detail}); that run "
            "cannot be read, other runs are not affected: restore the store from a backup, or remove that run "
            f"with: python -c \"from wfaas import SqliteStore; SqliteStore('{self.path}').delete('{instance_id}')\""
        )

    def read(self, instance_id: str) -> Record | None:
        prefix = f"i/{instance_id}/"
        rows = self._select(
            f'SELECT key, value FROM "{_TABLE}" WHERE key = ? OR (key >= ? AND key < ?)',
            (f"m/{instance_id}", prefix, prefix[:-1] + "0"),
        )
        meta_key = f"m/{instance_id}"
        meta = next((self._decode(instance_id, key, value) for key, value in rows if key == meta_key), None)
        if meta is None:
            return None
        record = Record(_check_meta(self, instance_id, meta), {}, {}, {}, where=str(self.path))
        at, steps = len(prefix), record.steps
        for key, value in rows:
            kind, name = key[at : at + 2], key[at + 2 :]
            if kind == "s/" and name:  # first and inline: a run's bulk (20,000 rows of a 20,000-step run)
                try:
                    steps[name] = pickle.loads(value)
                except Exception:  # noqa: BLE001 - _decode raises, naming the damaged record
                    steps[name] = self._decode(instance_id, key, value)
                continue
            if key == meta_key:
                continue
            if kind == "f/" and name.isidentifier():
                record.fields[name] = bytes(value)
            elif kind == "k/" and (delta := _delta_key(name)) is not None:
                record.deltas.setdefault(delta[0], {})[delta[1]] = bytes(value)
            elif kind == "x/" and name:
                record.extra[name] = self._decode(instance_id, key, value)
            elif (kind == "L/" and name) or (kind == "t/" and name[-9:-8] == "\x1f" and name[-8:].isdigit()):
                _put_item(record, kind, name, self._decode(instance_id, key, value))
            else:  # a key damaged in a sound file: SQLite's checks cannot see it
                raise StoreError(self._bad_record(instance_id, f"unexpected key {key!r}"))
        return record

    def read_logs(self, instance_id: str, step_id: str | None = None) -> list[AttemptLog]:
        # Outside the i/<iid>/ range that read() loads: status and resume never read logs.
        low = f"l/{instance_id}/" if step_id is None else f"l/{instance_id}/{step_id}\x1f"
        rows = self._select(f'SELECT key, value FROM "{_TABLE}" WHERE key >= ? AND key < ?', (low, _after(low)))
        logs = [self._decode(instance_id, key, value) for key, value in rows]
        return sorted(logs, key=lambda log: (log.step_id, log.attempt, log.part))

    def read_meta(self, instance_id: str) -> dict[str, Any] | None:
        key = f"m/{instance_id}"
        rows = self._select(f'SELECT value FROM "{_TABLE}" WHERE key = ?', (key,))
        if not rows:
            return None
        return _check_meta(self, instance_id, self._decode(instance_id, key, rows[0][0]))

    def ids(self) -> list[str]:
        rows = self._select(f'SELECT key FROM "{_TABLE}" WHERE key >= ? AND key < ?', ("m/", "m0"))
        return [key[2:] for (key,) in rows]

    def remove(self, instance_id: str) -> bool:
        # Looks for the key without decoding it: a run whose record is damaged can be removed.
        if not self._select(f'SELECT 1 FROM "{_TABLE}" WHERE key = ?', (f"m/{instance_id}",)):
            return False
        prefix, logs = f"i/{instance_id}/", f"l/{instance_id}/"
        delete = f'DELETE FROM "{_TABLE}" WHERE (key >= ? AND key < ?) OR key = ? OR (key >= ? AND key < ?)'
        self._write_statements([(delete, [(prefix, prefix[:-1] + "0", f"m/{instance_id}", logs, _after(logs))])])
        return True

    def _write_statements(self, statements: Statements) -> None:
        """Run statements as one transaction; returns once committed, raises StoreError if not."""
        if self.readonly:
            raise StoreError(f"the wfaas store {self.path} was opened read-only")
        answered = threading.Event()
        errors: list[StoreError | None] = []

        def done(error: StoreError | None) -> None:
            errors.append(error)
            answered.set()

        self._submit(statements, done, now=True)
        answered.wait()  # the writer thread answers every job, also when the commit fails
        if errors[0] is not None:
            raise errors[0]

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check``: ``"ok"`` for a sound file, else what is wrong."""
        with self._read_lock:
            try:
                rows = self._reader.execute("PRAGMA integrity_check").fetchall()
            except sqlite3.DatabaseError as exc:
                return str(exc)
        return "\n".join(str(r[0]) for r in rows) or "no answer"

    def close(self) -> None:
        """Commit what is queued and close the file (idempotent; also run at interpreter exit)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self.close)
        self._close_connections()

    def _close_connections(self) -> None:
        # The reader first: the last connection to close removes the write-ahead log only if it may write.
        reader = getattr(self, "_reader", None)
        if reader is not None:
            with self._read_lock:
                reader.close()
        if self._writer is not None:
            self._writer.close()

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r})"


def _write_failed(path: Path, exc: BaseException) -> StoreError:
    """A failed write as the StoreError its caller gets: what, which store, and what to do."""
    if isinstance(exc, StoreError):
        return exc
    name = getattr(exc, "sqlite_errorname", "")
    if name == "SQLITE_FULL" or (isinstance(exc, OSError) and exc.errno == errno.ENOSPC):
        advice = "the disk is full; everything committed before is kept: free space on its filesystem, then resume"
    else:
        advice = "everything committed before is kept: fix the cause, then resume"
    return StoreError(f"cannot write to the wfaas store {path} ({type(exc).__name__}: {exc}); {advice}", resumable=True)


def _wal(conn: sqlite3.Connection) -> None:
    """Switch the file to WAL (once per file; it stays WAL).

    The switch needs the file to itself, and SQLite answers SQLITE_BUSY at once,
    without its busy handler, while another process has it open, as when several
    create one store at once: wait and try again here, as the busy handler would.
    """
    deadline = time.monotonic() + _BUSY_SECONDS
    pause = 0.001
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorname", "") != "SQLITE_BUSY" or time.monotonic() > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def _item_rows(prefix: str, cp: Checkpoint, rows: list[tuple[str, Any]], ranges: list[tuple[str, str]]) -> None:
    """A for_each step's rows: its collection when new (its old items go), and the items that changed."""
    for sid, listed in cp.item_lists.items():
        ranges.append((f"{prefix}t/{sid}\x1f", f"{prefix}t/{sid}\x20"))
        rows.append((f"{prefix}L/{sid}", _encode(listed)))
    for sid, records in cp.items.items():
        rows += [(f"{prefix}t/{sid}\x1f{n:08d}", _encode(rec)) for n, rec in records.items()]


def _put_item(record: Record, kind: str, name: str, value: Any) -> None:
    if kind == "L/":
        record.item_lists[name] = value
    else:
        record.items.setdefault(name[:-9], {})[int(name[-8:])] = value


def _delta_key(name: str) -> tuple[str, bytes] | None:
    field_name, _, key_hex = name.rpartition("/")
    if not field_name.isidentifier():
        return None
    try:
        return field_name, bytes.fromhex(key_hex)
    except ValueError:
        return None


def _check_meta(store: SqliteStore, instance_id: str, meta: Any) -> dict[str, Any]:
    if not isinstance(meta, dict) or "status" not in meta or "workflow_id" not in meta:
        raise StoreError(store._bad_record(instance_id, f"m/{instance_id}: not a run's record"))
    return meta
