"""The CLI's way into a store: open it (never creating one by reading), find a run by id prefix, decode it.

A damaged record costs its own run, not the command: :func:`read_metas`
returns the readable runs and one line per damaged one.
"""

from __future__ import annotations

import functools
import gc
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from .cli_errors import fail
from .errors import StoreError
from .states import WorkflowState
from .store import InMemoryStore, Record, StateStore

__all__ = [
    "DEFAULT_STORE",
    "bulk",
    "load_run",
    "open_store",
    "orphans_by_target",
    "read_metas",
    "resolve_id",
]

DEFAULT_STORE = ".wfaas/runs.sqlite"

F = TypeVar("F", bound=Callable[..., Any])


def bulk(command: F) -> F:
    """Run a command that decodes a whole run with the cyclic garbage collector paused.

    Decoding a 20,000-step run makes about a million objects and no cycles; each
    collection on the way would walk all made so far (150 of 1,000 ms of
    ``status --json``, issue 17). Reference counting still frees what is dropped.
    """

    @functools.wraps(command)
    def paused(*args: Any, **kwargs: Any) -> Any:
        was = gc.isenabled()
        gc.disable()
        try:
            return command(*args, **kwargs)
        finally:
            if was:
                gc.enable()

    return paused  # type: ignore[return-value]


def open_store(path: str, *, readonly: bool = False, must_exist: bool = False) -> StateStore:
    """The store at ``path``; commands that only read (``readonly``) or resume (``must_exist``) never create one."""
    if path == ":memory:":
        return InMemoryStore()
    from .sqlite_store import SqliteStore

    if (readonly or must_exist) and not os.path.lexists(path):
        fail(
            f"no wfaas store at {path}: nothing has run with it here, and this command never creates one; "
            "name the store with --store PATH or the WFAAS_STORE environment variable"
        )
    try:
        return SqliteStore(path, readonly=readonly, create=not must_exist)
    except StoreError as exc:
        fail(str(exc))


def read_metas(store: StateStore) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """Every run's meta, and one line per run whose record is damaged (the others are still shown)."""
    metas, damaged = [], []
    for iid in store.ids():
        try:
            meta = store.read_meta(iid)
        except StoreError as exc:
            damaged.append(str(exc))
            continue
        if meta is not None:
            metas.append((iid, meta))
    return metas, damaged


def load_run(store: StateStore, iid: str, record: Record | None = None) -> tuple[WorkflowState[Any], Record]:
    """A run's state, its data decoded where the run's own code can be imported, and the stored record it was
    decoded from (or is given)."""
    from .store import record_to_state

    record = record or store.read(iid)
    if record is None:
        fail(f"no run {iid} in this store")
    origin = record.extra.get("origin")
    if origin:
        module_part = origin.rpartition(":")[0]
        if module_part.endswith(".py") or os.sep in module_part:
            sys.path.insert(0, str(Path(module_part).resolve().parent))
        elif os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
    try:
        return record_to_state(iid, record), record
    except Exception as exc:  # noqa: BLE001 - show the steps anyway
        state = record_to_state(iid, record, decode_data=False)
        state.data = f"(not decodable here: {type(exc).__name__}: {exc})"
        return state, record


def resolve_id(store: StateStore, prefix: str | None) -> str:
    """A full instance id from a unique prefix; no prefix: the newest run."""
    ids = store.ids()
    if prefix is None:
        if not ids:
            fail("no runs in this store yet; start one with `wfaas-local run TARGET`")
        readable, _ = read_metas(store)  # a damaged run is never the newest: it cannot be shown
        if not readable:
            fail(f"no readable run in this store: {store!r} holds only damaged records")
        metas = [(meta, i) for i, meta in readable]
        return max(metas, key=lambda m: m[0].get("created_at") or datetime.min.replace(tzinfo=UTC))[1]
    matches = [i for i in ids if i.startswith(prefix)]
    if not matches:
        fail(f"no run with id {prefix!r} in this store (`wfaas-local list` shows them)")
    if len(matches) > 1:
        fail(f"id prefix {prefix!r} is ambiguous: {', '.join(sorted(matches))}")
    return matches[0]


# -- output ------------------------------------------------------------------------


def orphans_by_target(store: StateStore) -> tuple[dict[str, list[str]], list[str]]:
    """The runs ``recover`` resumes (:func:`wfaas.engine.orphaned`) by their recorded TARGET, and a line for
    each run it skips: damaged, or not started by wfaas-local."""
    from .engine import orphaned

    origins: dict[str, list[str]] = {}
    metas, damaged = read_metas(store)
    skipped = [f"skipping: {line}" for line in damaged]  # the damage stays with its run: the others are recovered
    for iid, meta in metas:
        if not orphaned(meta):
            continue
        try:
            record = store.read(iid)
        except StoreError as exc:
            skipped.append(f"skipping: {exc}")
            continue
        origin = record.extra.get("origin") if record else None
        if origin:
            origins.setdefault(origin, []).append(iid)
        else:
            skipped.append(f"skipping {iid}: not started by wfaas-local (resume it from Python)")
    return origins, skipped
