"""State stores: where instances are checkpointed, and read back from.

A store keeps, per instance, a few records: ``meta`` (status, error, times,
owner), one record per step, one encoded ``bytes`` per data field, and a few
write-once ``extra`` records (the data class, the definition's fingerprint).
The scheduler, the only writer, sends one :class:`Checkpoint` per changed
instance per turn holding only what changed, so a checkpoint costs
O(what changed), not O(whole run).

A store implements five primitives (``write``, ``read``, ``ids``, ``remove``,
``close``); the public API of the seed (``save``, ``load``, ``update``,
``list_active`` ...) is built on them here, once, for every store.
"""

from __future__ import annotations

import abc
import logging
import pickle
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from . import data as data_codec
from . import lazydata
from .capture import AttemptLog
from .errors import NotFound, StoreError
from .objects import ObjectStore
from .states import ItemState, StepState, WorkflowState, WorkflowStatus
from .steps import WorkflowContext

if TYPE_CHECKING:
    from .prune import PruneResult

__all__ = ["Checkpoint", "InMemoryStore", "Record", "StateStore"]

log = logging.getLogger("wfaas")


@dataclass
class Checkpoint:
    """What changed in one instance during one scheduler turn: written as one transaction."""

    instance_id: str
    meta: dict[str, Any] | None = None
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    fields: dict[str, bytes | None] = field(default_factory=dict)  # None: field removed
    extra: dict[str, Any] = field(default_factory=dict)
    # Dict fields changed key by key: field -> {encoded key: encoded value, or TOMBSTONE}.
    # A whole write of a field (in ``fields``) drops that field's earlier deltas.
    deltas: dict[str, dict[bytes, bytes]] = field(default_factory=dict)
    replace: bool = False  # drop everything held for the instance first (``save``)
    # What attempts printed and logged, by (step, attempt, part): kept beside the records, read by
    # ``read_logs``; None removes that attempt's log.
    logs: dict[tuple[str, int, str], AttemptLog | None] = field(default_factory=dict)
    # for_each steps: the collection, (key, encoded item) in order, written once when computed (it replaces
    # the step's earlier items, records included); and the records of the items that changed, by position.
    item_lists: dict[str, list[tuple[str, bytes]]] = field(default_factory=dict)
    items: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)


TOMBSTONE = b""
"""A delta value meaning "this key was deleted" (an encoded value is never empty)."""


@dataclass
class Record:
    """Everything a store holds for one instance."""

    meta: dict[str, Any]
    steps: dict[str, dict[str, Any]]
    fields: dict[str, bytes]
    extra: dict[str, Any]
    deltas: dict[str, dict[bytes, bytes]] = field(default_factory=dict)
    where: str = ""  # the file it was read from, for messages about a damaged record
    item_lists: dict[str, list[tuple[str, bytes]]] = field(default_factory=dict)  # see Checkpoint
    items: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)

    def apply(self, cp: Checkpoint) -> None:
        if cp.meta is not None:
            self.meta = cp.meta
        self.steps.update(cp.steps)
        for sid, listed in cp.item_lists.items():
            self.item_lists[sid], self.items[sid] = listed, {}
        for sid, records in cp.items.items():
            self.items.setdefault(sid, {}).update(records)
        for name, blob in cp.fields.items():
            self.deltas.pop(name, None)
            if blob is None:
                self.fields.pop(name, None)
            else:
                self.fields[name] = blob
        for name, changes in cp.deltas.items():
            self.deltas.setdefault(name, {}).update(changes)
        self.extra.update(cp.extra)

    def resolved_fields(self) -> dict[str, bytes]:
        """Each field's encoding with its key-wise deltas applied."""
        if not self.deltas:
            return self.fields
        fields = dict(self.fields)
        for name, changes in self.deltas.items():
            blob = fields.get(name)
            value = pickle.loads(blob) if blob is not None else {}
            for key_blob, value_blob in changes.items():
                key = pickle.loads(key_blob)
                if value_blob == TOMBSTONE:
                    value.pop(key, None)
                else:
                    value[key] = pickle.loads(value_blob)
            fields[name] = data_codec.encode_value(value)
        return fields


class StateStore(abc.ABC):
    """Where instances live between steps and across processes. Thread-safe."""

    # -- the primitives a store implements ---------------------------------

    @abc.abstractmethod
    def write(self, checkpoints: list[Checkpoint]) -> None:
        """Apply these checkpoints as one committed transaction."""

    @abc.abstractmethod
    def read(self, instance_id: str) -> Record | None:
        """The instance's records, or None."""

    @abc.abstractmethod
    def ids(self) -> list[str]:
        """Every instance id held."""

    @abc.abstractmethod
    def remove(self, instance_id: str) -> bool:
        """Drop an instance; False if it was not there."""

    def write_async(self, checkpoints: list[Checkpoint], done: Callable[[Exception | None], None]) -> None:
        """Start writing; call ``done(None)`` once committed, ``done(error)`` if not (from any thread).

        Writes must commit in the order they were started. The default writes at once.
        """
        try:
            self.write(checkpoints)
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            done(exc)
        else:
            done(None)

    def write_now(self, checkpoints: list[Checkpoint], done: Callable[[Exception | None], None]) -> None:
        """As ``write_async``, for a commit that something waits on: a store may write it in the caller's thread
        (no hand-off) when nothing else is queued. The default is ``write_async``."""
        self.write_async(checkpoints, done)

    def read_logs(self, instance_id: str, step_id: str | None = None) -> list[AttemptLog]:
        """What the instance's attempts printed and logged (of one step, with ``step_id``), by step and attempt.

        A store that keeps no logs returns an empty list.
        """
        return []

    def read_meta(self, instance_id: str) -> dict[str, Any] | None:
        """Only the instance's meta record (cheaper than ``read`` where a store can)."""
        record = self.read(instance_id)
        return record.meta if record else None

    def close(self) -> None:
        """Release files and threads."""

    objects: ObjectStore | None = None
    """Where fields over the engine's ``inline_limit`` are kept (``objects.py``); None: in the records."""

    def prune(
        self, older_than: float | timedelta | None = None, status: Iterable[str] | None = None, *, grace: float = 60.0
    ) -> PruneResult:
        """Remove finished runs (ended ``older_than`` ago, with a ``status`` among these), then every object
        no remaining run references, and compact the store; see ``prune.py`` for what is never touched."""
        from .prune import prune

        return prune(self, older_than, status, grace=grace)

    # -- the seed's API, for every store ------------------------------------

    def save(self, state: WorkflowState[Any]) -> None:
        """Write a whole instance (replacing what was there)."""
        self.write([state_to_checkpoint(state, self.read(state.instance_id), self.objects)])

    def load(self, instance_id: str) -> WorkflowState[Any]:
        """The instance as last checkpointed; :class:`NotFound` if absent."""
        record = self.read(instance_id)
        if record is None:
            raise NotFound(instance_id, f" in {self!r}")
        return record_to_state(instance_id, record, objects=self.objects)

    def update(self, instance_id: str, fn: Callable[[WorkflowState[Any]], None]) -> None:
        """Load, apply ``fn`` to the state, save. Not for instances a running engine owns."""
        state = self.load(instance_id)
        fn(state)
        self.save(state)

    def delete(self, instance_id: str) -> None:
        """Remove an instance; :class:`NotFound` if absent."""
        if not self.remove(instance_id):
            raise NotFound(instance_id, f" in {self!r}")

    def list_all(self) -> list[WorkflowState[Any]]:
        """Every instance, newest first."""
        return self._states(self.ids())

    def list_active(self) -> list[WorkflowState[Any]]:
        """Instances that are not COMPLETED, FAILED or CANCELLED, newest first."""
        active = []
        for iid in self.ids():
            meta = self._meta_or_skip(iid)
            if meta and not WorkflowStatus(meta["status"]).is_terminal:
                active.append(iid)
        return self._states(active)

    def is_cancelled(self, instance_id: str) -> bool:
        """Whether the instance ended CANCELLED; :class:`NotFound` if absent."""
        meta = self.read_meta(instance_id)
        if meta is None:
            raise NotFound(instance_id, f" in {self!r}")
        return bool(meta["status"] == WorkflowStatus.CANCELLED.value)

    def cleanup_old_workflows(self, ttl: float | timedelta, now: datetime | None = None) -> int:
        """Remove finished instances last updated more than ``ttl`` ago; returns how many."""
        from .prune import remove_finished, sweep_objects

        removed = remove_finished(self, ttl, now=now)
        if removed and self.objects is not None:
            sweep_objects(self)
        return len(removed)

    def get_context(self, instance_id: str) -> WorkflowContext[Any]:
        """A context over the instance's last data and shared values (no step)."""
        state = self.load(instance_id)
        return WorkflowContext(
            state.data,
            instance_id=instance_id,
            workflow_id=state.workflow_id,
            step_id="",
            attempt=0,
            values=dict(state.context),
        )

    def cleanup_if_terminal(self, instance_id: str) -> bool:
        """Remove the instance if it is finished; True if it was removed."""
        meta = self.read_meta(instance_id)
        if meta and WorkflowStatus(meta["status"]).is_terminal:
            return self.remove(instance_id)
        return False

    def _meta_or_skip(self, instance_id: str) -> dict[str, Any] | None:
        """The run's meta; None, with a warning, for a run whose record is damaged (the others go on)."""
        try:
            return self.read_meta(instance_id)
        except StoreError as exc:
            log.warning("skipping run %s: %s", instance_id, exc)
            return None

    def _states(self, ids: Iterable[str]) -> list[WorkflowState[Any]]:
        states = []
        for iid in ids:
            # A damaged run is skipped with a warning: the damage stays with it.
            try:
                record = self.read(iid)
                if record is not None:
                    states.append(record_to_state(iid, record, objects=self.objects))
            except StoreError as exc:
                log.warning("skipping run %s: %s", iid, exc)
        states.sort(key=lambda s: s.created_at or datetime.min.replace(tzinfo=UTC), reverse=True)
        return states


def with_inline_limit(store: StateStore, limit: int | None) -> StateStore:
    """``store``, its fields over ``limit`` bytes kept as objects (``WorkflowEngine(inline_limit=...)``; the
    store's setting: engines sharing a store share it, the last one made sets it)."""
    if limit is not None and store.objects is not None:
        store.objects = store.objects.limited(limit)
    return store


_class_cache: dict[bytes, type] = {}


def data_class(record: Record) -> type:
    blob = record.extra["class"]
    cls = _class_cache.get(blob)
    if cls is None:
        cls = pickle.loads(blob)
        _class_cache[blob] = cls
    return cls


def record_to_state(
    instance_id: str, record: Record, *, decode_data: bool = True, objects: ObjectStore | None = None
) -> WorkflowState[Any]:
    """Decode a record into the public :class:`WorkflowState` (``decode_data=False``: data is None).

    Large fields load from ``objects`` when first read; without it they show as their ``ObjectRef``.
    """
    meta = record.meta
    try:
        fields = record.resolved_fields()
        ctx_blob = fields.get(data_codec.CONTEXT_FIELD)
        context = pickle.loads(ctx_blob) if ctx_blob is not None else {}
        status = WorkflowStatus(meta["status"])
    except Exception as exc:  # bytes that do not decode: a damaged record, said as one
        where = f" in the wfaas store {record.where}" if record.where else ""
        raise StoreError(
            f"the record of run {instance_id}{where} is damaged ({type(exc).__name__}: {exc}); that run cannot "
            "be read, other runs are not affected: restore the store from a backup, or delete that run"
        ) from exc
    # Steps in definition order (the fingerprint keeps it), whatever order the store returns.
    known = (record.extra.get("fingerprint") or {}).get("steps", {})
    order = {sid: i for i, sid in enumerate(known)}
    steps = sorted(record.steps.items(), key=lambda item: order.get(item[0], len(order)))
    step_states = {sid: StepState.from_record(rec) for sid, rec in steps}
    for sid, state in step_states.items():
        if sid in record.item_lists or (known.get(sid) or {}).get("for_each"):
            state.items = item_states(record.item_lists.get(sid) or [], record.items.get(sid) or {})
    return WorkflowState(
        instance_id=instance_id,
        workflow_id=meta["workflow_id"],
        status=status,
        data=data_codec.build(data_class(record), fields, objects, f"run {instance_id}", opened=True)
        if decode_data
        else None,
        step_states=step_states,
        error=meta.get("error"),
        failed_step=meta.get("failed_step"),
        created_at=meta.get("created_at"),
        updated_at=meta.get("updated_at"),
        context=context,
        owner=meta.get("owner"),
    )


def item_states(listed: list[tuple[str, bytes]], records: dict[int, dict[str, Any]]) -> dict[str, ItemState]:
    """A for_each step's items in collection order: as recorded, or PENDING if never started."""
    return {
        key: ItemState.from_record(records[n]) if n in records else ItemState(key) for n, (key, _) in enumerate(listed)
    }


def state_to_checkpoint(
    state: WorkflowState[Any], previous: Record | None, objects: ObjectStore | None = None
) -> Checkpoint:
    """The checkpoint that makes a store hold exactly ``state`` (its large fields as objects in ``objects``)."""
    meta = dict(previous.meta) if previous else {}
    meta.update(
        workflow_id=state.workflow_id,
        status=state.status.value,
        error=state.error,
        failed_step=state.failed_step,
        created_at=state.created_at or datetime.now(UTC),
        updated_at=datetime.now(UTC),
        owner=state.owner,
    )
    fields: dict[str, bytes | None] = dict(
        data_codec.encode_fields(state.data, where=f"saving instance {state.instance_id}", objects=objects)
    )
    if state.context:
        fields[data_codec.CONTEXT_FIELD] = data_codec.encode_value(state.context)
    if previous:
        for name in previous.fields:
            fields.setdefault(name, None)
    cls = lazydata.user_class(state.data)  # a state loaded with large fields is of a lazy subclass
    extra = {**(previous.extra if previous else {}), "class": data_codec.encode_value(cls)}
    steps, lists, items = {}, {}, {}
    for sid, step in state.step_states.items():
        steps[sid] = {k: v for k, v in step.to_record().items() if k != "items"}  # items: in their own table
        if step.items is not None:
            listed = previous.item_lists.get(sid, []) if previous else []
            if [key for key, _ in listed] != list(step.items):
                # The items themselves are not in the state: a state saved with other keys keeps its keys,
                # each standing for its item.
                listed = [(key, data_codec.encode_value(key)) for key in step.items]
            lists[sid] = listed
            items[sid] = {n: i.to_record() for n, i in enumerate(step.items.values())}
    return Checkpoint(state.instance_id, meta, steps, fields, extra, replace=True, item_lists=lists, items=items)


class InMemoryStore(StateStore):
    """Keeps instances in this process's memory: the engine's default; thread-safe."""

    def __init__(self) -> None:
        self._records: dict[str, Record] = {}
        self._logs: dict[str, dict[tuple[str, int, str], AttemptLog]] = {}
        self._lock = threading.Lock()
        self.objects = ObjectStore.temporary()

    def write(self, checkpoints: list[Checkpoint]) -> None:
        with self._lock:
            for cp in checkpoints:
                record = None if cp.replace else self._records.get(cp.instance_id)
                if record is None:
                    record = self._records[cp.instance_id] = Record({}, {}, {}, {})
                record.apply(cp)
                if cp.logs:
                    logs = self._logs.setdefault(cp.instance_id, {})
                    for key, log in cp.logs.items():
                        if log is None:
                            logs.pop(key, None)
                        else:
                            logs[key] = log

    def read_logs(self, instance_id: str, step_id: str | None = None) -> list[AttemptLog]:
        with self._lock:
            logs = self._logs.get(instance_id, {})
            return [logs[key] for key in sorted(logs) if step_id is None or key[0] == step_id]

    def read(self, instance_id: str) -> Record | None:
        with self._lock:
            record = self._records.get(instance_id)
            if record is None:
                return None
            deltas = {name: dict(d) for name, d in record.deltas.items()}
            copy = Record(dict(record.meta), dict(record.steps), dict(record.fields), dict(record.extra), deltas)
            copy.item_lists = dict(record.item_lists)
            copy.items = {sid: dict(records) for sid, records in record.items.items()}
            return copy

    def read_meta(self, instance_id: str) -> dict[str, Any] | None:
        with self._lock:
            record = self._records.get(instance_id)
            return dict(record.meta) if record else None

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._records)

    def remove(self, instance_id: str) -> bool:
        with self._lock:
            self._logs.pop(instance_id, None)
            return self._records.pop(instance_id, None) is not None

    def close(self) -> None:
        """Remove the temporary folder of its large values (also done when the store is garbage-collected)."""
        assert self.objects is not None
        self.objects.close()

    def __repr__(self) -> str:
        return "InMemoryStore()"
