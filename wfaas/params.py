"""Typed workflow parameters: ``--data`` JSON and ``--param FIELD=VALUE`` checked against the data class.

The CLI builds a run's data as ``data_type(**fields)``. Before it does, every
field's value is checked against the field's annotation and converted where
the annotation asks for a type JSON has no spelling for (``datetime``/``date``
from ISO strings, ``Path``, enums, tuples). A mismatch is one
:class:`ParamError` naming the field, the expected type and the value, so
nothing runs on data the steps would choke on later.

Supported: ``int``, ``float`` (an ``int`` is fine), ``str``, ``bool``,
``None``/``Optional``/unions, ``Literal``, ``list``/``tuple``/``set``/``dict``
of those, ``datetime``/``date`` (ISO 8601), ``Path``, enums (by value or name),
``Any``. A field of any other type is passed through as given.

Why the stdlib and not pydantic or cattrs: neither is a dependency, the set of
types a command line can spell is small, and ``typing.get_type_hints`` plus
the converter table below is a page of code that costs nothing at
``import wfaas`` (this module is imported by the CLI only).
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import json
import types
import typing
from datetime import date, datetime
from pathlib import PurePath
from typing import Any

__all__ = ["ParamError", "build_fields", "field_types", "parse_param", "type_name"]


class ParamError(ValueError):
    """Raised when a value does not fit its field's annotation; the message is one line."""


class _Mismatch(Exception):
    """Internal: the value at ``path`` does not fit ``expected``."""

    def __init__(self, path: str, expected: Any, value: Any) -> None:
        super().__init__(path)
        self.path, self.expected, self.value = path, expected, value


def type_name(tp: Any) -> str:
    """A type as a user writes it: ``int``, ``list[int]``, ``str | None``."""
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) if isinstance(a, str) else repr(a) for a in args)
    if origin is not None and args:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join('...' if a is Ellipsis else type_name(a) for a in args)}]"
    return str(tp).replace("typing.", "")


def field_types(cls: type) -> dict[str, Any]:
    """The constructor's field names and annotations (``Any`` where one cannot be resolved)."""
    if dataclasses.is_dataclass(cls):
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        source: Any = cls
    else:
        try:
            params = inspect.signature(cls).parameters
        except (TypeError, ValueError):
            return {}
        names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        source = cls.__init__  # type: ignore[misc]  # the constructor of the class itself
    try:
        hints = typing.get_type_hints(source)
    except Exception:  # noqa: BLE001 - an annotation naming something not importable here: leave it unchecked
        hints = {}
    return {name: hints.get(name, Any) for name in names}


def _check(value: Any, tp: Any, path: str) -> Any:
    """``value`` (as JSON gives it) converted to ``tp``; raises _Mismatch."""
    if tp is Any or tp is object:
        return value
    if tp is None or tp is type(None):
        if value is None:
            return None
        raise _Mismatch(path, tp, value)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            try:
                return _check(value, arg, path)
            except _Mismatch:
                continue
        raise _Mismatch(path, tp, value)
    if origin is typing.Literal:
        if value in args:
            return value
        raise _Mismatch(path, tp, value)
    if origin is typing.Annotated:
        return _check(value, args[0], path)
    if origin in (list, set, frozenset, tuple) or tp in (list, set, frozenset, tuple):
        container = origin or tp
        if not isinstance(value, list):
            raise _Mismatch(path, tp, value)
        if container is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _Mismatch(path, tp, value)
            return tuple(_check(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        item = args[0] if args else Any
        return container(_check(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _Mismatch(path, tp, value)
        key_tp, val_tp = args if len(args) == 2 else (Any, Any)
        out = {}
        for k, v in value.items():
            key = _check(_key_from_json(k, key_tp), key_tp, f"{path} key {k!r}")
            out[key] = _check(v, val_tp, f"{path}[{k!r}]")
        return out
    if not isinstance(tp, type):
        return value  # a typing construct the CLI cannot spell: the class checks it, if at all
    return _check_class(value, tp, path)


def _check_class(value: Any, tp: type, path: str) -> Any:
    """``value`` converted to the plain class ``tp`` (bool, int, float, str, an enum, a date, a path)."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch(path, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch(path, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch(path, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch(path, tp, value)
    if issubclass(tp, enum.Enum):
        for member in tp:
            if value in (member.value, member.name):
                return member
        raise _Mismatch(path, tp, value)
    if issubclass(tp, datetime) or (issubclass(tp, date) and tp is date):
        if isinstance(value, str):
            try:
                return tp.fromisoformat(value)
            except ValueError:
                pass
        raise _Mismatch(path, tp, value)
    if issubclass(tp, PurePath):
        if isinstance(value, str):
            return tp(value)
        raise _Mismatch(path, tp, value)
    return value  # any other class: JSON cannot spell it; the data class decides


def _key_from_json(key: str, key_tp: Any) -> Any:
    """JSON object keys are strings: ``dict[int, ...]`` keys are read as numbers."""
    if key_tp in (int, float):
        try:
            return key_tp(key)
        except ValueError:
            return key
    return key


def _mismatch_message(cls: type, exc: _Mismatch, given: str) -> str:
    expected = type_name(exc.expected)
    base = exc.expected
    if typing.get_origin(base) in (typing.Union, types.UnionType):
        core = [a for a in typing.get_args(base) if a is not type(None)]
        base = core[0] if len(core) == 1 else base  # Optional[X]: say how to write an X
    if isinstance(base, type) and issubclass(base, enum.Enum):
        expected += " (one of " + ", ".join(repr(m.value) for m in base) + ")"
    elif base in (datetime, date):
        expected += " (an ISO 8601 string, e.g. 2026-01-31" + ("T09:30:00" if base is datetime else "") + ")"
    value = json.dumps(exc.value, default=repr)
    if len(value) > 60:
        value = value[:59] + "…"
    return f"{given}: field {exc.path!r} of {cls.__name__} expects {expected}, got {value}"


def parse_param(text: str, tp: Any) -> Any:
    """The value of ``--param FIELD=TEXT`` for a field of type ``tp``; raises _Mismatch with path ``""``.

    TEXT is read as JSON where that gives a value of the field's type (``3``,
    ``true``, ``null``, ``[1, 2]``), else as the plain string (``hello``,
    ``2026-01-31``, ``/tmp/x``). Booleans also accept yes/no/on/off.
    """
    candidates: list[Any] = []
    try:
        candidates.append(json.loads(text))
    except ValueError:
        pass
    if _takes_text(tp):
        candidates.insert(0, text)  # a str field keeps `007` and `null` as typed
    else:
        candidates.append(text)
    lowered = text.strip().lower()
    if lowered in ("yes", "on", "no", "off"):
        candidates.append(lowered in ("yes", "on"))
    for value in candidates:
        try:
            return _check(value, tp, "")
        except _Mismatch:
            continue
    raise _Mismatch("", tp, text)


def _takes_text(tp: Any) -> bool:
    if isinstance(tp, type):
        return tp is str or issubclass(tp, (PurePath, date, enum.Enum))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_takes_text(a) for a in typing.get_args(tp) if a is not type(None))
    return False


def build_fields(cls: type, data: dict[str, Any], params: typing.Sequence[str]) -> dict[str, Any]:
    """The keyword arguments for ``cls``: ``data`` (from ``--data``) with ``params`` (``FIELD=VALUE``) over it.

    Every value is checked against its field's annotation and converted;
    raises :class:`ParamError` (one line) for an unknown field or a mismatch.
    """
    types_ = field_types(cls)
    known = ", ".join(types_) or "none"
    unknown = sorted(set(data) - set(types_))
    if unknown and types_:
        names = ", ".join(map(repr, unknown))
        raise ParamError(f"--data: {cls.__name__} has no field {names} (fields: {known})")
    out: dict[str, Any] = {}
    for name, value in data.items():
        try:
            out[name] = _check(value, types_.get(name, Any), name)
        except _Mismatch as exc:
            raise ParamError(_mismatch_message(cls, exc, "--data")) from None
    for param in params:
        name, sep, text = param.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ParamError(f"--param {param!r}: write it as FIELD=VALUE, e.g. --param count=3")
        if name not in types_ and types_:
            raise ParamError(f"--param {name}: {cls.__name__} has no field {name!r} (fields: {known})")
        try:
            out[name] = parse_param(text, types_.get(name, Any))
        except _Mismatch as exc:
            exc.path = name + exc.path
            exc.value = text if exc.path == name else exc.value
            raise ParamError(_mismatch_message(cls, exc, "--param")) from None
    return out
