"""Large fields loaded on first read: the data a step sees is an instance of a subclass of its class.

``lazy_class(cls, ...)`` makes a subclass whose unread large fields are
non-data descriptors (``_Lazy``): the first read of ``ctx.data.frame`` loads
the value (``ObjectStore.load``) into the instance's ``__dict__``, where it
wins from then on, and once every large field was read the instance is an
instance of ``cls`` again. Until then it compares, hashes, pickles and
copies as ``cls`` (loading what it has to). A field never read is absent
from ``vars(obj)``, so the step's diff (``data.diff_fields``) sees it unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # objects.py imports data.py, which imports this module
    from .objects import ObjectStore

__all__ = ["lazy_class", "user_class"]


class _Lazy:
    """Stands for an unread large field on the data's class: the first read loads it into the instance."""

    def __init__(self, name: str, blob: bytes, objects: ObjectStore, what: str, mapped: Any) -> None:
        self.name, self.blob, self.objects, self.what, self.mapped = name, blob, objects, what, mapped

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        value = self.objects.load(self.blob, f"{self.what}, field {self.name}", self.mapped)
        self.mapped = None
        obj.__dict__[self.name] = value  # from now on the instance's own attribute wins
        if all(n in obj.__dict__ for n in type(obj)._wfaas_lazy):
            object.__setattr__(obj, "__class__", type(obj).__mro__[1])  # all read: the user's class again
        return value


def lazy_class(cls: type, blobs: dict[str, bytes], objects: ObjectStore, what: str, opened: bool = False) -> type:
    """A subclass of ``cls`` whose instances load the fields in ``blobs`` when first read.

    ``opened``: each field's file is mapped now (a missing one raises now), so that reading it later
    works even if the folder is gone by then (a state that outlives its engine's temporary store).
    """
    attrs: dict[str, Any] = {
        name: _Lazy(name, blob, objects, what, objects.open(blob, f"{what}, field {name}") if opened else None)
        for name, blob in blobs.items()
    }
    attrs.update(
        _wfaas_lazy=tuple(blobs),
        __reduce_ex__=_reduce_loaded,
        __eq__=_eq_loaded,
        __hash__=cls.__hash__,  # a class body that sets __eq__ alone would make instances unhashable
        __module__=cls.__module__,
        __qualname__=cls.__qualname__,
    )
    return type(cls.__name__, (cls,), attrs)


def user_class(obj: Any) -> type:
    """The data's own class, also while ``obj`` is an instance of its ``lazy_class``."""
    cls = type(obj)
    return cls.__mro__[1] if "_wfaas_lazy" in cls.__dict__ else cls


def _load_all(self: Any) -> None:
    for name in type(self)._wfaas_lazy:
        getattr(self, name)  # the last one turns self back into the user's class


def _reduce_loaded(self: Any, protocol: Any) -> Any:
    # Pickling or copying the data (a step, or a caller of get_status, may): as the user's class, all loaded.
    _load_all(self)
    return self.__reduce_ex__(protocol)


def _eq_loaded(self: Any, other: Any) -> Any:
    # A dataclass's __eq__ wants both of exactly one class: compare as the user's class, all loaded.
    _load_all(self)
    if type(other).__dict__.get("_wfaas_lazy"):
        _load_all(other)
    return self == other
