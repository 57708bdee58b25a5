"""``SqliteStore``: checkpoints in one SQLite file, through sqlitedict.

Layout: one table ``wfaas`` of (key TEXT, value BLOB). Per instance::

    m/<iid>              meta: status, error, times, owner       (rewritten each turn it changes)
    i/<iid>/s/<step>     one record per step                      (written when that step changes)
    i/<iid>/f/<field>    one encoded data field                   (written when a step replaced it)
    i/<iid>/k/<field>/<key hex>  one key of a dict field          (written when a step changed that key)
    i/<iid>/x/<name>     write-once records: data class, definition fingerprint
    l/<iid>/<step>\x1f<attempt>\x1f<part>   what one attempt printed and logged (an ``AttemptLog``)

and ``wfaas/format`` holds the layout version. A scheduler turn is one
transaction: the puts are queued to sqlitedict's thread and a blocking commit
ends them, so a checkpoint costs O(what changed).

Durability: sqlitedict opens connections with ``journal_mode=DELETE`` and
``synchronous=OFF``. We ask for WAL (readers in other processes, such as
``wfaas-local status``, never block the writer, and a commit is one append)
and set ``synchronous=NORMAL`` on the connection after it opens. In WAL mode
NORMAL never corrupts the file and keeps every commit across a crash of the
process (``kill -9``), because the commit is in the OS before ``commit()``
returns; only a power cut or OS crash can lose the last commits. Pass
``synchronous="FULL"`` to fsync every commit and survive that too, at the
cost of one fsync per scheduler turn.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import queue
import sqlite3
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlitedict
from sqlitedict import SqliteDict

from . import _threads
from . import data as data_codec
from .capture import AttemptLog
from .errors import StoreError
from .store import Checkpoint, Record, StateStore

__all__ = ["FORMAT_VERSION", "SqliteStore"]

FORMAT_VERSION = 1

# sqlitedict logs every SQLite error with a traceback on stderr before raising it again
# later; wfaas turns those errors into StoreError sentences, so its own log stays quiet.
logging.getLogger("sqlitedict").setLevel(logging.CRITICAL)
_TABLE = "wfaas"
_HEADER = b"SQLite format 3\x00"
# sqlitedict's in-band commit request and end-of-results marker (it has no public
# "commit, then tell me" call; these are what its own commit(blocking=True) uses).
_COMMIT = sqlitedict._REQUEST_COMMIT
_NO_MORE = sqlitedict._RESPONSE_NO_MORE
_ROWS_PER_STATEMENT = 400  # 800 bound parameters, well under SQLite's limit


def _log_key(instance_id: str, step_id: str, attempt: int, part: str) -> str:
    return f"l/{instance_id}/{step_id}\x1f{attempt:08d}\x1f{part}"


def _after(prefix: str) -> str:
    """The smallest key above every key that starts with ``prefix``."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def _encode(value: Any) -> sqlite3.Binary:
    return sqlite3.Binary(data_codec.encode_value(value))


def _decode(blob: bytes) -> Any:
    return pickle.loads(bytes(blob))


class SqliteStore(StateStore):
    """A :class:`StateStore` in one SQLite file; safe to read from other processes while a run writes.

    ``synchronous`` is ``"NORMAL"`` (survives a process crash) or ``"FULL"``
    (also survives a power cut; slower). ``readonly=True`` opens an existing
    store for reading only (what ``wfaas-local status`` does).
    """

    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = "NORMAL", readonly: bool = False) -> None:
        if synchronous.upper() not in ("NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be NORMAL, FULL or EXTRA, got {synchronous!r}")
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.Lock()
        self._check_file()
        try:
            with _threads.signals_blocked():  # sqlitedict starts its writer thread here
                self._db = SqliteDict(
                    str(self.path),
                    tablename=_TABLE,
                    flag="r" if readonly else "c",
                    autocommit=False,
                    journal_mode="WAL",
                    encode=_encode,
                    decode=_decode,
                    outer_stack=False,
                )
            self._db.conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._db.conn.execute("PRAGMA busy_timeout=10000")
            version = self._db.get("wfaas/format")
            if version is None and not readonly:
                self._db["wfaas/format"] = FORMAT_VERSION
                self._db.commit()
        except StoreError:
            raise
        except Exception as exc:  # every open failure becomes one clear StoreError
            raise StoreError(
                f"cannot open the wfaas store {self.path}: {type(exc).__name__}: {exc}. If the file is damaged, "
                "move it aside (its runs are lost) or restore it from a backup; wfaas never recreates it silently"
            ) from exc
        if version is not None and version > FORMAT_VERSION:
            self._db.close(force=True)
            raise StoreError(
                f"the wfaas store {self.path} was written by a newer wfaas (format {version}, this one reads "
                f"up to {FORMAT_VERSION}); upgrade wfaas (pip install -U wfaas) to use it"
            )
        self._read_lock = threading.Lock()
        self._reader = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False, timeout=10)
        self._acks: queue.Queue[Any] = queue.Queue()
        self._committer: threading.Thread | None = None
        self._closed = False
        atexit.register(self.close)

    def _check_file(self) -> None:
        path = self.path
        if path.is_dir():
            raise StoreError(f"the wfaas store {path} is a directory; give a file path such as {path / 'runs.sqlite'}")
        if path.exists():
            if not self.readonly and not os.access(path, os.W_OK):
                raise StoreError(f"the wfaas store {path} is not writable; fix its permissions or choose another path")
            if not self.readonly and not os.access(path.parent, os.W_OK | os.X_OK):
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
            return
        if self.readonly:
            raise StoreError(f"no wfaas store at {path}; run a workflow first, or pass the right --store")
        parent = path.parent
        if not parent.exists():
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create the directory {parent} for the wfaas store: {exc}") from exc
        if not os.access(parent, os.W_OK | os.X_OK):
            raise StoreError(
                f"cannot create the wfaas store {path}: no write permission on {parent}; choose another path"
            )
        # Runs can hold anything a step wrote: readable by the owner only.
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, stat.S_IRUSR | stat.S_IWUSR)
        os.close(fd)

    def _probe(self) -> None:
        """Check an existing file with the stdlib driver before sqlitedict's thread touches it.

        A damaged file kills sqlitedict's thread on the first bad page, and every
        later call then waits forever (sqlitedict#24); SQLite's own quick check
        finds such pages first, at the cost of reading the file once.
        """
        try:
            probe = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)
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

    def _damaged(self, detail: str) -> str:
        return (
            f"the wfaas store {self.path} is damaged or not a wfaas store ({detail}); move it aside (its runs "
            "are lost) or restore it from a backup; wfaas never recreates a store silently"
        )

    # -- primitives ----------------------------------------------------------------

    def write(self, checkpoints: list[Checkpoint]) -> None:
        with self._lock:
            self._enqueue(checkpoints)
            self._db.commit(blocking=True)

    def write_async(self, checkpoints: list[Checkpoint], done: Callable[[Exception | None], None]) -> None:
        """Queue the statements and the commit in order; ``done`` runs on the committer thread once committed.

        The scheduler keeps working meanwhile (steps that were already ready get
        dispatched); only what depends on this checkpoint waits for ``done``.
        """
        marker: queue.Queue[Any] = queue.Queue()
        with self._lock:
            self._enqueue(checkpoints)
            self._db.conn.execute(_COMMIT)
            # Answered by sqlitedict's thread only after the commit queued before it ran.
            self._db.conn.execute("SELECT 1", res=marker)
            self._ensure_committer()
            self._acks.put((marker, done))

    def _ensure_committer(self) -> None:
        if self._committer is None:
            self._committer = _threads.start(self._acknowledge, "wfaas-sqlite-commit")

    def _acknowledge(self) -> None:
        while True:
            item = self._acks.get()
            if item is None:
                return
            marker, done = item
            while marker.get() != _NO_MORE:
                pass
            try:
                self._db.conn.check_raise_error()
            except Exception as exc:  # noqa: BLE001 - handed to the scheduler as a failed checkpoint
                done(exc)
            else:
                done(None)

    def _enqueue(self, checkpoints: list[Checkpoint]) -> None:
        """Queue one turn's statements (the caller holds the lock and queues the commit)."""
        if self.readonly:
            raise StoreError(f"the wfaas store {self.path} was opened read-only")
        rows: list[tuple[str, sqlite3.Binary]] = []
        ranges: list[tuple[str, str]] = []  # key ranges to delete first
        keys: list[str] = []  # single keys to delete
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
                    keys.append(f"{prefix}f/{name}")
                else:
                    rows.append((f"{prefix}f/{name}", sqlite3.Binary(blob)))
            for name, changes in cp.deltas.items():
                rows += [(f"{prefix}k/{name}/{k.hex()}", sqlite3.Binary(v)) for k, v in changes.items()]
            if cp.meta is not None:
                rows.append((f"m/{cp.instance_id}", _encode(cp.meta)))
            for (sid, number, part), log in cp.logs.items():
                if log is None:
                    keys.append(_log_key(cp.instance_id, sid, number, part))
                else:
                    rows.append((_log_key(cp.instance_id, sid, number, part), _encode(log)))
        conn = self._db.conn
        for low, high in ranges:
            conn.execute(f'DELETE FROM "{_TABLE}" WHERE key >= ? AND key < ?', (low, high))
        for key in keys:
            conn.execute(f'DELETE FROM "{_TABLE}" WHERE key = ?', (key,))
        # One statement per chunk of rows: every statement is a trip to sqlitedict's thread.
        for i in range(0, len(rows), _ROWS_PER_STATEMENT):
            chunk = rows[i : i + _ROWS_PER_STATEMENT]
            values = ", ".join(["(?, ?)"] * len(chunk))
            conn.execute(f'REPLACE INTO "{_TABLE}" (key, value) VALUES {values}', [x for row in chunk for x in row])

    # Reads go through a private stdlib connection: in WAL mode it sees every committed
    # turn beside the writer, and a page damaged later raises here instead of killing
    # sqlitedict's thread, after which every call would wait forever (sqlitedict#24).

    def _select(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with self._read_lock:
            try:
                return self._reader.execute(sql, args).fetchall()
            except sqlite3.DatabaseError as exc:
                raise StoreError(self._damaged(str(exc))) from exc

    def read(self, instance_id: str) -> Record | None:
        prefix = f"i/{instance_id}/"
        rows = self._select(
            f'SELECT key, value FROM "{_TABLE}" WHERE key = ? OR (key >= ? AND key < ?)',
            (f"m/{instance_id}", prefix, prefix[:-1] + "0"),
        )
        meta = next((_decode(value) for key, value in rows if key.startswith("m/")), None)
        if meta is None:
            return None
        record = Record(meta, {}, {}, {})
        for key, value in rows:
            if key.startswith("m/"):
                continue
            kind, name = key[len(prefix)], key[len(prefix) + 2 :]
            if kind == "f":
                record.fields[name] = bytes(value)
            elif kind == "k":
                field_name, key_hex = name.rsplit("/", 1)
                record.deltas.setdefault(field_name, {})[bytes.fromhex(key_hex)] = bytes(value)
            elif kind == "s":
                record.steps[name] = _decode(value)
            else:
                record.extra[name] = _decode(value)
        return record

    def read_logs(self, instance_id: str, step_id: str | None = None) -> list[AttemptLog]:
        # Outside the i/<iid>/ range that read() loads: status and resume never read logs.
        low = f"l/{instance_id}/" if step_id is None else f"l/{instance_id}/{step_id}\x1f"
        rows = self._select(f'SELECT key, value FROM "{_TABLE}" WHERE key >= ? AND key < ?', (low, _after(low)))
        logs = [_decode(value) for _, value in rows]
        return sorted(logs, key=lambda log: (log.step_id, log.attempt, log.part))

    def read_meta(self, instance_id: str) -> dict[str, Any] | None:
        rows = self._select(f'SELECT value FROM "{_TABLE}" WHERE key = ?', (f"m/{instance_id}",))
        meta: dict[str, Any] | None = _decode(rows[0][0]) if rows else None
        return meta

    def ids(self) -> list[str]:
        rows = self._select(f'SELECT key FROM "{_TABLE}" WHERE key >= ? AND key < ?', ("m/", "m0"))
        return [key[2:] for (key,) in rows]

    def remove(self, instance_id: str) -> bool:
        if self.read_meta(instance_id) is None:
            return False
        prefix = f"i/{instance_id}/"
        logs = f"l/{instance_id}/"
        with self._lock:
            self._db.conn.execute(
                f'DELETE FROM "{_TABLE}" WHERE (key >= ? AND key < ?) OR key = ? OR (key >= ? AND key < ?)',
                (prefix, prefix[:-1] + "0", f"m/{instance_id}", logs, _after(logs)),
            )
            self._db.commit(blocking=True)
        return True

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check``: ``"ok"`` for a sound file, else what is wrong."""
        with self._read_lock:
            try:
                rows = self._reader.execute("PRAGMA integrity_check").fetchall()
            except sqlite3.DatabaseError as exc:
                return str(exc)
        return "\n".join(str(r[0]) for r in rows) or "no answer"

    def close(self) -> None:
        """Commit and close the file (idempotent; also run at interpreter exit)."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        atexit.unregister(self.close)
        if self._committer is not None:
            self._acks.put(None)
            self._committer.join(timeout=30)
        # The reader first: the last connection to close removes the write-ahead log only if it may write.
        with self._read_lock:
            self._reader.close()
        with self._lock:
            self._db.close()

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r})"
