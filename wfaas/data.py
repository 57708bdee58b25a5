"""Workflow data: how it is split into fields, encoded, copied and merged.

The scheduler never holds a live data object as the truth. It holds one
encoded ``bytes`` per field. That makes each piece of the design cheap:

* a snapshot for a step is a dict of references (no copy);
* a worker sends back only the fields whose bytes changed;
* a checkpoint writes only the changed fields;
* a conflict is "two steps wrote one field since the snapshot both started from".

Values are encoded with the C pickler when the result is loadable anywhere,
and with dill otherwise (lambdas, closures, classes defined in ``__main__``).
Decoding always uses the C unpickler, which reads both.
"""

from __future__ import annotations

import dataclasses
import functools
import pickle
from collections.abc import Callable, Mapping
from typing import Any

from . import lazydata
from . import objects as large
from .errors import SerializationError

__all__ = ["WorkflowData", "transient"]

CONTEXT_FIELD = "__wfaas_context__"
"""The reserved field holding ``ctx.set`` values; merged key-wise like any dict field."""

_TRANSIENT = "wfaas_transient"
_PLAIN = (bytes, str, int, float, bool, type(None), bytearray, complex)


class WorkflowData:
    """Base class for workflow data (usually a ``@dataclass``).

    ``workflow_type`` is a class attribute naming the kind of data: the class
    name if neither the class nor a base it inherits from sets one. Override
    ``restore(self)`` to re-create ``transient()`` fields in every process that
    receives the data.
    """

    workflow_type: str = ""
    _wfaas_default_type = True  # workflow_type was filled in here, not set by the user

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("workflow_type")
        if own:
            cls._wfaas_default_type = False
        elif own is not None or cls._wfaas_default_type:
            cls.workflow_type = cls.__name__
            cls._wfaas_default_type = True

    def restore(self) -> None:
        """Re-create transient fields (connections, clients); called after every decode."""


def transient(*, default: Any = None, default_factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field that never travels: dropped before sending or saving, re-set by ``restore``."""
    meta = {_TRANSIENT: True}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, compare=False, repr=False, metadata=meta)
    return dataclasses.field(default=default, compare=False, repr=False, metadata=meta)


def workflow_type_of(cls: type) -> str:
    """The ``workflow_type`` of a data class, defaulting to its name."""
    return getattr(cls, "workflow_type", "") or cls.__name__


_transient_cache: dict[type, dict[str, Callable[[], Any]]] = {}


def transient_fields(cls: type) -> dict[str, Callable[[], Any]]:
    """Transient field names of ``cls`` with a factory for each one's default value (cached per class)."""
    cached = _transient_cache.get(cls)
    if cached is not None:
        return cached
    out: dict[str, Callable[[], Any]] = {}
    if dataclasses.is_dataclass(cls):
        for f in dataclasses.fields(cls):
            if f.metadata.get(_TRANSIENT):
                if f.default_factory is not dataclasses.MISSING:
                    out[f.name] = f.default_factory
                else:
                    out[f.name] = functools.partial(_identity, f.default)
    for name in getattr(cls, "__transient__", ()):
        out.setdefault(name, functools.partial(_identity, None))
    _transient_cache[cls] = out
    return out


def _identity(value: Any) -> Any:
    return value


def dill_dumps(value: Any) -> bytes:
    """dill by value, with the fix below applied to the classes involved."""
    for cls in type(value).__mro__ if not isinstance(value, type) else value.__mro__:
        _own_orig_bases(cls)
    import dill  # imported when first needed: it costs `import wfaas` 11 ms

    return bytes(dill.dumps(value, protocol=5, recurse=True))


def _own_orig_bases(cls: type) -> None:
    # dill rebuilds a class from ``__orig_bases__`` when it has one, and a plain subclass of
    # a generic class (class Leaf(Mid) where Mid(StepExecutor[D])) inherits Mid's: the rebuilt
    # Leaf would skip Mid and lose its methods. Give such a class its own, equal to its bases.
    if "__orig_bases__" not in cls.__dict__ and hasattr(cls, "__orig_bases__") and cls.__module__ != "typing":
        try:
            cls.__orig_bases__ = cls.__bases__
        except (AttributeError, TypeError):
            pass  # a builtin or extension type: dill pickles those by reference anyway


def encode_value(value: Any) -> bytes:
    """Bytes that any worker can decode with ``pickle.loads``."""
    if type(value) in _PLAIN:
        return pickle.dumps(value, protocol=5)
    try:
        blob = pickle.dumps(value, protocol=5)
    except Exception:  # noqa: BLE001 - any pickling failure means: let dill try
        return dill_dumps(value)
    # pickle stores __main__ objects by reference, which a worker cannot resolve.
    if b"__main__" in blob:
        return dill_dumps(value)
    return blob


def decode_value(blob: bytes) -> Any:
    return pickle.loads(blob)


def encode_fields(obj: Any, *, where: str, objects: large.ObjectStore | None = None) -> dict[str, bytes]:
    """Encode every travelling field, checking each round-trips; names the field that does not.

    With ``objects``, a field over its limit is written there and referenced (``objects.py``).
    """
    try:
        attrs = vars(obj)
    except TypeError:
        raise SerializationError(
            f"{where}: workflow data must be an object with attributes (a dataclass), got {type(obj).__name__}"
        ) from None
    cls = lazydata.user_class(obj)
    skip = transient_fields(cls)
    # A large field never read (``lazydata``) is not an attribute yet: it keeps the reference it was loaded from.
    out: dict[str, bytes] = {
        n: vars(type(obj))[n].blob for n in vars(type(obj)).get("_wfaas_lazy", ()) if n not in attrs
    }
    for name, value in attrs.items():
        if name in skip:
            continue
        try:
            if objects is not None:
                blob = large.encode_field(value, objects)
                if large.is_ref(blob):
                    out[name] = blob  # pickled with buffers and hashed: round-trip checking it would copy it
                    continue
            else:
                blob = encode_value(value)
            decode_value(blob)
        except Exception as exc:  # whatever the failure, it is reported with the field's name
            raise SerializationError(
                f"{where}: field {type(obj).__name__}.{name} ({type(value).__name__}) cannot be sent to a worker: "
                f"{type(exc).__name__}: {exc}. Declare it `{name}: Any = transient()` and re-create it in "
                f"restore(self), or store something serializable instead"
            ) from exc
        out[name] = blob
    return out


def build(
    cls: Any,
    fields: Mapping[str, bytes],
    objects: large.ObjectStore | None = None,
    what: str = "",
    opened: bool = False,
) -> Any:
    """A fresh data object of ``cls`` from encoded fields, transient fields re-created.

    Fields held as objects (``objects.py``) load when first read (their files
    mapped at once if ``opened``); ``what`` names the run in errors about them.
    """
    refs = {n: b for n, b in fields.items() if large.is_ref(b)} if objects is not None else {}
    kind: Any = lazydata.lazy_class(cls, refs, objects, what, opened) if refs else cls  # type: ignore[arg-type]
    obj = kind.__new__(kind)
    for name, blob in fields.items():
        if name not in refs and name != CONTEXT_FIELD:
            object.__setattr__(obj, name, pickle.loads(blob))
    for name, factory in transient_fields(cls).items():
        object.__setattr__(obj, name, factory())
    restore = getattr(obj, "restore", None)
    if callable(restore):
        restore()
    return obj


@dataclasses.dataclass
class FieldChange:
    """A field a step changed: its new bytes, or for a dict, which keys changed."""

    blob: bytes
    set_keys: dict[Any, bytes] | None = None  # dict fields only
    deleted_keys: list[Any] | None = None


def diff_fields(
    obj: Any,
    before: Mapping[str, bytes],
    context: dict[str, Any] | None,
    objects: large.ObjectStore | None = None,
    what: str = "",
) -> dict[str, FieldChange]:
    """The fields of ``obj`` (and the context values) whose encoding differs from ``before``.

    With ``objects``, a large field the step never read is not in ``vars(obj)``
    (``lazydata.lazy_class``): unchanged at no cost; one it read is compared
    with its file, and a new large value is written there (``objects.py``).
    """
    changes: dict[str, FieldChange] = {}
    values = {k: v for k, v in vars(obj).items() if k not in transient_fields(lazydata.user_class(obj))}
    if context is not None:
        values[CONTEXT_FIELD] = context
    for name, value in values.items():
        old_blob = before.get(name)
        if objects is None or name == CONTEXT_FIELD:
            blob = encode_value(value)
        elif large.is_ref(old_blob):
            assert old_blob is not None
            new = large.diff_large(value, old_blob, objects, f"{what}, field {name}")
            if new is not None:
                changes[name] = FieldChange(new)
            continue
        else:
            blob = large.encode_field(value, objects)
        if blob == old_blob:
            continue
        # The context starts empty and merges key-wise; other new fields are whole writes.
        empty = {} if name == CONTEXT_FIELD else _ABSENT
        old = pickle.loads(old_blob) if old_blob is not None else empty
        if old is not _ABSENT and _same(old, value):
            continue  # same value, different bytes (e.g. a set's order)
        change = FieldChange(blob)
        if isinstance(value, dict) and isinstance(old, dict) and not large.is_ref(blob):
            change.set_keys = {}
            for k, v in value.items():
                if k not in old or not _same(old[k], v):
                    change.set_keys[k] = encode_value(v)
            change.deleted_keys = [k for k in old if k not in value]
        changes[name] = change
    return changes


_ABSENT: Any = object()


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(type(a) is type(b) and a == b)
    except Exception:  # noqa: BLE001 - an __eq__ that raises means "not provably the same"
        return False
