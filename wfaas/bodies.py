"""How step bodies travel to workers: dill by value, once per family of closures.

A workflow built in a loop (``[make_body(i) for i in range(100_000)]``) has one
closure per step: one code object, one globals, and cells that differ. dill
encodes each by value with its pure-Python pickler (0.23 to 0.36 ms a body, most
of ``register_workflow`` at 100,000 steps, issue 17). :class:`BodyEncoder`
encodes the first closure of such a family with dill (the *template*) and each
other one as the template's bytes plus its own cell values, C-pickled; a
worker loads it as the template's function with those values in its cells
(:func:`_with_cells`), as dill would have given it. Only closures whose cells
hold plain values (numbers, strings, bytes, None) and that differ in nothing
else (defaults, attributes, annotations, docstring) take this way; any other
body is encoded by dill as before.
"""

from __future__ import annotations

import pickle
import types
from typing import Any

from .data import dill_dumps

__all__ = ["BodyEncoder"]

_PLAIN_CELLS = frozenset({int, float, str, bytes, bool, type(None)})


class BodyEncoder:
    """Encodes step bodies for ``pickle.loads`` in a worker; reuses one dill template per closure family."""

    def __init__(self) -> None:
        self._templates: dict[tuple[Any, ...], bytes] = {}

    def encode(self, body: Any) -> bytes:
        """``body`` by value: dill's bytes, or a family's template and this closure's cell values."""
        family = _family(body)
        if family is None:
            return dill_dumps(body)
        template = self._templates.get(family)
        if template is None:
            template = self._templates[family] = dill_dumps(body)
            return template
        return pickle.dumps(_Cells(template, tuple(cell.cell_contents for cell in body.__closure__)), protocol=5)


def _family(body: Any) -> tuple[Any, ...] | None:
    """What closures of one family share, or None for a body that dill must encode by itself."""
    if type(body) is not types.FunctionType or not body.__closure__:
        return None
    if body.__defaults__ is not None or body.__kwdefaults__ is not None or body.__dict__:
        return None
    annotations = body.__annotations__
    if any(type(value) is not str for value in annotations.values()):
        return None  # evaluated annotations may be objects of their own per closure
    try:
        if any(type(cell.cell_contents) not in _PLAIN_CELLS for cell in body.__closure__):
            return None
    except ValueError:  # an empty cell (a free variable not yet assigned)
        return None
    # The globals dict by identity: the families live only while one definition is encoded.
    return (
        body.__code__,
        id(body.__globals__),
        body.__name__,
        body.__qualname__,
        body.__module__,
        body.__doc__,
        tuple(annotations.items()),
    )


class _Cells:
    """Pickles as a call of :func:`_with_cells`, so a worker needs nothing but ``pickle.loads``."""

    def __init__(self, template: bytes, cells: tuple[Any, ...]) -> None:
        self.template, self.cells = template, cells

    def __reduce__(self) -> tuple[Any, tuple[bytes, tuple[Any, ...]]]:
        return _with_cells, (self.template, self.cells)


def _with_cells(template: bytes, cells: tuple[Any, ...]) -> Any:
    """The template's function with cells of its own holding ``cells``' values.

    A worker decodes each template once (``_decoded``): decoding it again for
    every member of the family cost 10 µs a step (dill rebuilds the code
    object), a tenth of a trivial step's whole cost in the worker. Members
    share the template's globals, as closures made in one loop share their
    module's.
    """
    proto = _decoded.get(template)
    if proto is None:
        if len(_decoded) >= _DECODED_KEPT:
            _decoded.clear()  # a worker that met this many families is not on a hot path worth keeping
        proto = _decoded[template] = pickle.loads(template)
    function = types.FunctionType(
        proto.__code__, proto.__globals__, proto.__name__, None, tuple(types.CellType(v) for v in cells)
    )
    function.__qualname__, function.__module__, function.__doc__ = proto.__qualname__, proto.__module__, proto.__doc__
    function.__annotations__ = dict(proto.__annotations__)
    return function


_DECODED_KEPT = 256
_decoded: dict[bytes, Any] = {}
