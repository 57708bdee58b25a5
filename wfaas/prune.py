"""Prune: remove finished runs, then every large value's file that no remaining run references.

What is never deleted, also while another process runs workflows on the
same store and writes new objects meanwhile (``objects.py``):

* a run in progress (PENDING or RUNNING in the store, which includes a run
  whose process died: resume or cancel it first);
* an object a remaining run's checkpoint references;
* an object written or touched after the start of the oldest run in
  progress, or within ``grace`` seconds (default 60) before the prune
  began: a step's new object exists before the checkpoint that references
  it commits, and a run being started writes its objects before its first
  checkpoint. A writer that finds its object already there touches it,
  under a shared lock the sweep takes exclusively, so a file about to be
  referenced again is never the one deleted.

Then the store is compacted (SQLite: VACUUM), so its file shrinks.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from .errors import StoreError
from .objects import digests_in
from .states import WorkflowStatus

if TYPE_CHECKING:
    from .sqlite_store import SqliteStore
    from .store import StateStore

__all__ = ["PruneResult", "parse_duration", "prune"]

log = logging.getLogger("wfaas")
GRACE = 60.0
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass
class PruneResult:
    """What a prune removed: the runs' ids, object files and the bytes they held.

    ``recent``: unreferenced object files kept because they were written
    within the grace period (a run may be about to reference them).
    """

    runs: list[str] = field(default_factory=list)
    objects: int = 0
    object_bytes: int = 0
    recent: int = 0


def parse_duration(text: str) -> timedelta:
    """``"7d"``, ``"12h"``, ``"30m"``, ``"90s"``, ``"2w"`` (or plain seconds) as a timedelta."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not match:
        raise ValueError(f"{text!r} is not a duration; write it as 7d, 12h, 30m, 90s or 2w")
    return timedelta(seconds=float(match[1]) * _UNITS[match[2] or "s"])


def prune(
    store: StateStore,
    older_than: float | timedelta | None = None,
    status: Iterable[str] | None = None,
    *,
    grace: float = GRACE,
    now: datetime | None = None,
) -> PruneResult:
    """Remove finished runs last updated ``older_than`` ago (all, if None) whose status is in ``status``
    (default: COMPLETED, FAILED, CANCELLED), the objects no remaining run references, and compact."""
    started = time.time()
    result = PruneResult(runs=remove_finished(store, older_than, status, now=now))
    result.objects, result.object_bytes, result.recent = sweep_objects(store, started - grace)
    from .sqlite_store import SqliteStore  # imports sqlite3: not at ``import wfaas``

    if isinstance(store, SqliteStore):
        vacuum(store)
    return result


def remove_finished(
    store: StateStore,
    older_than: float | timedelta | None = None,
    status: Iterable[str] | None = None,
    *,
    now: datetime | None = None,
) -> list[str]:
    """Remove the runs ``prune`` and the cleanup task remove (see ``prune``); their ids."""
    wanted = _statuses(status)
    cutoff = None
    if older_than is not None:
        seconds = older_than.total_seconds() if isinstance(older_than, timedelta) else float(older_than)
        cutoff = (now or datetime.now(UTC)) - timedelta(seconds=seconds)
    removed = []
    for iid in store.ids():
        meta = store._meta_or_skip(iid)
        if meta is None or meta["status"] not in wanted:
            continue
        if cutoff is not None and meta["updated_at"] >= cutoff:
            continue
        if store.remove(iid):
            removed.append(iid)
    return removed


def sweep_objects(store: StateStore, before: float | None = None) -> tuple[int, int, int]:
    """Delete the objects no run of ``store`` references (see the module docstring); see ``ObjectStore.sweep``."""
    objects = store.objects
    if objects is None:
        return 0, 0, 0
    if before is None:
        before = time.time() - GRACE
    keep: set[str] = set()
    for iid in store.ids():
        try:
            record = store.read(iid)
        except StoreError as exc:
            # Its references cannot be read: deleting anything now could delete what it needs.
            log.warning("not deleting unreferenced large values: run %s cannot be read (%s)", iid, exc)
            return 0, 0, 0
        if record is None:
            continue
        keep |= digests_in(record.fields.values())
        if not WorkflowStatus(record.meta["status"]).is_terminal:
            created = record.meta.get("created_at")
            if created is not None:
                before = min(before, created.timestamp())
    return objects.sweep(keep, before)


def vacuum(store: SqliteStore) -> None:
    """Compact a SQLite store: VACUUM the file, then truncate its write-ahead log."""
    import sqlite3  # only here: ``import wfaas`` does not import sqlite3

    if store.readonly:
        raise StoreError(f"the wfaas store {store.path} was opened read-only")
    conn = sqlite3.connect(store.path, isolation_level=None, timeout=10.0)
    try:
        conn.execute("VACUUM")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot compact the wfaas store {store.path}: {exc}; try again when it is idle") from exc
    finally:
        conn.close()


def _statuses(status: Iterable[str] | None) -> set[str]:
    finished = {s.value for s in WorkflowStatus if s.is_terminal}
    if status is None:
        return finished
    wanted = {WorkflowStatus[s.upper()].value if s.upper() in WorkflowStatus.__members__ else s for s in status}
    refused = wanted - finished
    if refused:
        raise ValueError(
            f"prune removes finished runs only (COMPLETED, FAILED, CANCELLED), not {', '.join(sorted(refused))}; "
            "cancel a run first to remove it"
        )
    return wanted
