"""Words and values as the CLI prints them: plurals, articles, and data shortened to fit.

Data is printed as plain text (never through rich markup, where a ``[`` in a
repr is a tag) and built piecewise by :class:`_ShortRepr`, so a 100 MB field
costs its first few dozen characters, not a 400 MB repr cut afterwards.
"""

from __future__ import annotations

import dataclasses
import reprlib
from typing import Any

__all__ = ["console", "data_text", "plural", "shorten", "with_article"]

# Off a terminal (a pipe, a log file) data is still bounded: ``--json`` gives it whole.
PIPE_LIMIT = 10_000


def items_line(done: int, total: str, running: int, failed: int) -> str:
    """``120/10000 items done, 4 running, 1 failed``: the zero counts left out, ``total`` as it is shown."""
    text = f"{done}/{total} done"
    if running:
        text += f", {running} running"
    if failed:
        text += f", {failed} failed"
    return text


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 step``, ``2 steps``."""
    return f"{n} {word if n == 1 else many or word + 's'}"


def with_article(word: str) -> str:
    """``an int``, ``a str``."""
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def shorten(text: str, width: int) -> str:
    """The first line of ``text`` cut to ``width`` characters with an ellipsis."""
    lines = text.splitlines() or [""]
    line = lines[0] + (" …" if len(lines) > 1 else "")
    return line if len(line) <= width else line[: max(1, width - 1)] + "…"


class _ShortRepr(reprlib.Repr):
    def __init__(self, budget: int) -> None:
        super().__init__()
        self.maxstring = self.maxother = max(20, min(budget, 200))
        self.maxlist = self.maxtuple = self.maxset = self.maxdict = 8
        self.maxlevel = 4

    def repr_bytes(self, x: bytes, level: int) -> str:
        head = repr(x[: self.maxstring])
        return head if len(x) <= self.maxstring else f"{head[:-1]}…{head[-1]} ({len(x)} bytes)"

    def repr_bytearray(self, x: bytearray, level: int) -> str:
        return f"bytearray({self.repr_bytes(bytes(x[: self.maxstring + 1]), level)})"

    def repr_instance(self, x: Any, level: int) -> str:
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            if level <= 0:
                return f"{type(x).__name__}(…)"
            parts = [f"{f.name}={self.repr1(getattr(x, f.name, None), level - 1)}" for f in dataclasses.fields(x)]
            return f"{type(x).__name__}({', '.join(parts)})"
        return super().repr_instance(x, level)


def data_text(data: Any, limit: int | None) -> str:
    """``data`` as one plain line of at most ``limit`` characters (``None``: whole)."""
    if limit is None:
        return repr(data)
    return shorten(_ShortRepr(limit).repr(data), limit)


def console(stderr: bool = False) -> Any:
    """A rich console for plain text: no highlighting, long lines left whole for the terminal to wrap."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)
