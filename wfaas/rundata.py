"""A run's data: fields by version, snapshots, the merge of a step's changes, checkpoint deltas.

Pure bookkeeping over encoded fields (``data.py`` encodes them): nothing
here talks to a worker, a store or a thread. ``merge`` decides whether a
step's changes conflict with what ran at the same time and, if not, applies
them; what changed since the last checkpoint is taken once per turn
(``take_changes``).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from . import data as data_codec
from . import objects as large
from .store import TOMBSTONE


@dataclass(eq=False)
class Snapshot:
    """The data of a run at one version; encoded once, shared by every step that starts from it."""

    key: tuple[str, int]
    fields: dict[str, bytes]
    _blob: bytes | None = None
    objects: tuple[Any, ...] | None = None  # where large fields are, and which are fresh (``objects.py``)

    @property
    def version(self) -> int:
        return self.key[1]

    @property
    def blob(self) -> bytes:
        if self._blob is None:
            fields = self.fields if self.objects is None else {**self.fields, large.OBJECTS_FIELD: self.objects}
            self._blob = pickle.dumps(fields, protocol=5)
        return self._blob


class Conflict(NamedTuple):
    """A field (``"name"`` or ``"name[key]"``) another step wrote meanwhile, to a different value."""

    what: str
    other_step: str

    @property
    def context(self) -> bool:
        """The conflict is on the shared context (``ctx.set``), not a data field."""
        return self.what.startswith(data_codec.CONTEXT_FIELD)


Mark = tuple[int, str]  # (version, step id) of the last write


@dataclass(eq=False)
class RunData:
    """The fields of one run: encoded, versioned, with who wrote what last (for conflicts)."""

    fields: dict[str, bytes]
    objects: large.ObjectStore | None = None  # where fields over its limit go (``objects.py``)
    version: int = 0
    field_writes: dict[str, Mark] = field(default_factory=dict)
    key_writes: dict[tuple[str, Any], Mark] = field(default_factory=dict)
    field_key_marks: dict[str, Mark] = field(default_factory=dict)  # last key-wise write per field
    snap: Snapshot | None = None
    live: tuple[int, Any] | None = None
    # Dict fields merged key by key stay decoded here and are encoded once per
    # turn (stale_fields), not once per step: a wide fan-out writing one key
    # each would otherwise cost O(keys) per step.
    live_dicts: dict[str, dict[Any, Any]] = field(default_factory=dict)
    stale_fields: set[str] = field(default_factory=set)
    # Objects this engine's workers wrote for the run, latest last: a worker need not hash them again.
    fresh: dict[str, None] = field(default_factory=dict)
    # Changed since the last checkpoint: fields written whole, and dict keys written one by one
    # (O(keys changed), not O(dict)).
    dirty_fields: set[str] = field(default_factory=set)
    deltas: dict[str, dict[bytes, bytes]] = field(default_factory=dict)

    def dict_value(self, name: str) -> Any:
        """The decoded value of a field, cached when it is a dict (None if the field is absent)."""
        live = self.live_dicts.get(name)
        if live is not None:
            return live
        blob = self.fields.get(name)
        if blob is None:
            value: Any = {} if name == data_codec.CONTEXT_FIELD else None
        else:
            value = pickle.loads(blob)
        if isinstance(value, dict):
            self.live_dicts[name] = value
        return value

    def field_bytes(self, name: str) -> bytes | None:
        self.sync()
        return self.fields.get(name)

    def sync(self) -> None:
        """Encode the dict fields changed since the last call."""
        for name in self.stale_fields:
            self.fields[name] = data_codec.encode_value(self.live_dicts[name])
        self.stale_fields.clear()

    def snapshot(self, iid: str) -> Snapshot:
        """The fields at the current version, as steps starting now will see them."""
        self.sync()
        if self.snap is None or self.snap.version != self.version:
            cfg = (self.objects.config, tuple(self.fresh)) if self.objects is not None else None
            self.snap = Snapshot((iid, self.version), dict(self.fields), objects=cfg)
        return self.snap

    def build(self, cls: type, what: str = "") -> Any:
        """A live data object at the current version (for run_if); built at most once per version.

        ``what`` names the run in errors about its large values' files."""
        self.sync()
        if self.live is None or self.live[0] != self.version:
            self.live = (self.version, data_codec.build(cls, self.fields, self.objects, what))
        return self.live[1]

    def merge(self, step_id: str, base: int, changes: dict[str, data_codec.FieldChange]) -> Conflict | None:
        """Apply the fields a step that started from version ``base`` changed, or say what conflicts.

        A concurrent different write to one field (or key) is a conflict.
        Everything is checked before anything is applied, so a conflicting
        result changes nothing.
        """
        if not changes:
            return None
        conflict = self._conflict(step_id, base, changes)
        if conflict is None:
            self._apply(step_id, changes)
        return conflict

    def _conflict(self, step_id: str, base: int, changes: dict[str, data_codec.FieldChange]) -> Conflict | None:
        def concurrent(mark: Mark | None) -> bool:
            return mark is not None and mark[0] > base and mark[1] != step_id

        for name, change in changes.items():
            whole = self.field_writes.get(name)
            cur = self.dict_value(name) if change.set_keys is not None else None
            if not isinstance(cur, dict):
                # A whole write conflicts with any concurrent write to the field, key-wise ones included.
                other = whole if concurrent(whole) else self.field_key_marks.get(name)
                if concurrent(other) and not same_encoded(self.field_bytes(name), change.blob):
                    return Conflict(name, other[1] if other else "?")
                continue
            assert change.set_keys is not None
            for key in (*change.set_keys, *(change.deleted_keys or ())):
                mark = self.key_writes.get((name, key)) or (whole if concurrent(whole) else None)
                if concurrent(mark):
                    old = data_codec.encode_value(cur[key]) if key in cur else None
                    if not same_encoded(change.set_keys.get(key), old):
                        return Conflict(f"{name}[{key!r}]", mark[1] if mark else "?")
        return None

    def _apply(self, step_id: str, changes: dict[str, data_codec.FieldChange]) -> None:
        self.version += 1
        mark = (self.version, step_id)
        for name, change in changes.items():
            cur = self.dict_value(name) if change.set_keys is not None else None
            if isinstance(cur, dict) and change.set_keys is not None:
                deltas = self.deltas.setdefault(name, {})
                for key, blob in change.set_keys.items():
                    cur[key] = pickle.loads(blob)
                    self.key_writes[(name, key)] = mark
                    deltas[pickle.dumps(key, protocol=5)] = blob
                for key in change.deleted_keys or ():
                    cur.pop(key, None)
                    self.key_writes[(name, key)] = mark
                    deltas[pickle.dumps(key, protocol=5)] = TOMBSTONE
                self.field_key_marks[name] = mark
                self.stale_fields.add(name)
            else:
                if self.objects is not None and len(change.blob) > self.objects.limit and not _dict_pickle(change.blob):
                    # From a worker that could not write it (a Dask worker elsewhere): written here, once.
                    change.blob = self.objects.put([memoryview(change.blob)])
                if large.is_ref(change.blob):
                    self.fresh[large.ref_of(change.blob).digest] = None
                    while len(self.fresh) > large.FRESH_KEPT:
                        del self.fresh[next(iter(self.fresh))]
                self.fields[name] = change.blob
                self.live_dicts.pop(name, None)
                self.stale_fields.discard(name)
                self.field_writes[name] = mark
                self.dirty_fields.add(name)

    def take_changes(self) -> tuple[dict[str, bytes | None], dict[str, dict[bytes, bytes]]]:
        """For the checkpoint: fields written whole, and dict keys written one by one, since the last call."""
        if self.dirty_fields:
            self.sync()
        fields: dict[str, bytes | None] = {name: self.fields.get(name) for name in self.dirty_fields}
        # A field written whole this turn already holds its key changes.
        deltas = {name: d for name, d in self.deltas.items() if name not in fields}
        self.dirty_fields.clear()
        self.deltas = {}
        return fields, deltas


def _dict_pickle(blob: bytes) -> bool:
    """A protocol-5 pickle of a dict (the context, or a dict field: kept in the store, merged key-wise)."""
    return blob[2:3] == b"}" or (blob[2:3] == b"\x95" and blob[11:12] == b"}")


def same_encoded(a: bytes | None, b: bytes | None) -> bool:
    """Equal encodings, or equal values whose encodings differ (a set's order, a dict's key order)."""
    if a == b:
        return True
    if a is None or b is None:
        return False
    try:
        x, y = pickle.loads(a), pickle.loads(b)
        return bool(type(x) is type(y) and x == y)
    except Exception:  # noqa: BLE001 - an undecodable or uncomparable value is not provably the same
        return False
