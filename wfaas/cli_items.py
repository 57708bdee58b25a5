"""How the CLI shows the items of a ``for_each`` step (API.md §12): compactly, at any number of items.

- ``status``: the step keeps one row in the steps' table (its figures summed
  over its items); under the table, one line ``done/total items`` per
  ``for_each`` step with its failed items below it, capped at
  :data:`FAILED_SHOWN`.
- ``status ID --step STEP``: every item, one line each, cut to the width;
  ``--step 'STEP[KEY]'`` shows one item's attempts with their tracebacks.
- ``--json``: the counts and every item, one item per line (:func:`dumps`),
  so 10,000 items stay a few MB that ``grep`` and ``jq`` read alike.

Counts are taken in one pass over the items: a 10,000-item step is counted
once per command, not once per figure.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from .cli_text import items_line, plural, shorten
from .report_items import no_items
from .states import ITEM_DONE, ItemState, StepState, StepStatus, WorkflowState

__all__ = [
    "FAILED_SHOWN",
    "ItemCounts",
    "dumps",
    "items_json",
    "print_item_lines",
    "print_items",
    "show_step",
    "split_item",
]

# Failed items listed under a for_each step's line in `status`; the rest are counted.
FAILED_SHOWN = 10
_FAILED = (StepStatus.FAILED, StepStatus.CANCELLED)
_ITEM = re.compile(r"^(?P<step>[^\[]+)\[(?P<key>.*)\]$")


@dataclass
class ItemCounts:
    """A ``for_each`` step's items summed in one pass: statuses, attempts, CPU, peak memory."""

    total: int = 0
    done: int = 0
    failed: int = 0
    running: int = 0
    attempts: int = 0
    cpu: float | None = None
    max_rss: int | None = None

    @classmethod
    def of(cls, step: StepState) -> ItemCounts:
        counts = cls()
        for item in (step.items or {}).values():
            counts.total += 1
            counts.done += item.status in ITEM_DONE
            counts.failed += item.status in _FAILED
            counts.running += item.status is StepStatus.RUNNING
            counts.attempts += item.attempts
            for a in item.history:
                if a.cpu is not None:
                    counts.cpu = (counts.cpu or 0.0) + a.cpu
                if a.max_rss is not None:
                    counts.max_rss = max(counts.max_rss or 0, a.max_rss)
        return counts

    def line(self) -> str:
        """``9990/10000 items done, 2 running, 8 failed`` (the zero counts left out)."""
        return items_line(self.done, plural(self.total, "item"), self.running, self.failed)


def _wall(item: ItemState) -> float | None:
    if item.history and item.history[-1].wall is not None:
        return item.history[-1].wall
    if item.started_at is None or item.finished_at is None:
        return None
    return (item.finished_at - item.started_at).total_seconds()


def _failed(step: StepState) -> list[ItemState]:
    return [item for item in (step.items or {}).values() if item.status in _FAILED]


def print_item_lines(steps: Iterable[tuple[str, StepState]], console: Any, iid: str) -> None:
    """Under ``status``'s table: per ``for_each`` step one ``done/total`` line, then its failed items."""
    from rich.text import Text

    from .cli_tables import step_error

    shown = [(sid, s) for sid, s in steps if s.items is not None]
    if not shown:
        return
    width = console.width
    console.print(Text("items:"))
    for sid, s in shown:
        summary = ItemCounts.of(s).line() if s.items else no_items(s)
        console.print(Text(shorten(f"  {sid}: {summary}", width)), soft_wrap=False)
        failed = _failed(s)
        for item in failed[:FAILED_SHOWN]:
            what = f"    {item.key}  {plural(item.attempts, 'attempt')}  {step_error(item.error or item.status.name)}"
            console.print(Text(shorten(what, width)), soft_wrap=False)
        if len(failed) > FAILED_SHOWN:
            every = f"`wfaas-local status {iid[:8]} --step {sid}` lists every item"
            more = f"    … and {len(failed) - FAILED_SHOWN} more ({every})"
            console.print(Text(shorten(more, width)), soft_wrap=False)


def split_item(step: str) -> tuple[str, str | None]:
    """``clean[f1.csv]`` → (``clean``, ``f1.csv``); ``clean`` → (``clean``, None)."""
    match = _ITEM.match(step)
    return (match["step"], match["key"]) if match else (step, None)


def print_items(state: WorkflowState[Any], step_id: str, console: Any) -> None:
    """``status ID --step STEP`` of a ``for_each`` step: one line per item, within ``console.width``.

    Written line by line rather than as a rich table: 10,000 rows of a table
    cost seconds to lay out, these cost milliseconds.
    """
    from .cli_tables import step_error

    step = state.step_states[step_id]
    width, iid = console.width, state.instance_id
    items = list((step.items or {}).values())

    def echo(text: str) -> None:
        console.out(shorten(text, width), highlight=False)  # plain text: no markup (a key may hold "[")

    echo(f"step {step_id} of {state.workflow_id} {iid}: {step.status.name}")
    echo(ItemCounts.of(step).line() if items else no_items(step))
    if step.error:
        echo(f"error: {step_error(step.error)}")
    if not items:
        return
    key_w = max(4, min(max(len(i.key) for i in items), max(12, width // 3)))
    shared = len(os.path.commonprefix([i.key for i in items]))  # noqa: RUF071 - keys, not paths: by character
    echo(f"{'item':<{key_w}}  {'status':<9}  attempts     wall  error")
    for item in items:
        key = _cut(item.key, key_w, shared)
        wall = _wall(item)
        line = f"{key:<{key_w}}  {item.status.name:<9}  {item.attempts:>8}  {'' if wall is None else f'{wall:.2f}s':>7}"
        echo(line + ("  " + step_error(item.error) if item.error else "").rstrip())
    # A command to copy: whole, even past the width.
    console.out(f"an item's tracebacks: wfaas-local status {iid[:8]} --step '{step_id}[KEY]'", highlight=False)


def _cut(key: str, width: int, shared: int) -> str:
    """A long key cut to ``width`` around where keys start to differ (``shared``: the length of the
    start all keys have in common): keys of one list often share a folder and differ further on."""
    if len(key) <= width:
        return key
    w = width - 2
    start = max(0, min(shared - 2, len(key) - w))
    return ("…" if start else "") + key[start : start + w] + ("…" if start + w < len(key) else "")


def show_step(state: WorkflowState[Any], step: str, as_json: bool) -> None:
    """``status --step STEP``: a step's attempts, a for_each step's items, or (``STEP[KEY]``) one item's attempts."""
    import click

    from . import _cli_logs
    from .cli_errors import fail
    from .cli_tables import state_json
    from .cli_text import console

    sid, key = split_item(step) if step not in state.step_states else (step, None)
    s = state.step_states.get(sid)
    if s is None:
        fail(f"run {state.instance_id} has no step {sid!r}; its steps: {', '.join(state.step_states)}")
    if key is not None:
        item = (s.items or {}).get(key)
        if item is None:
            fail(f"step {sid!r} of run {state.instance_id} has no item {key!r}; `status --step {sid}` lists them")
        if as_json:
            click.echo(json.dumps(items_json(s)["items"][key], indent=2))
        else:
            _cli_logs.print_step(replace(state, step_states={step: item_as_step(item)}), step, console())
    elif as_json:
        click.echo(dumps(state_json(state)["steps"][sid]))
    elif s.items is not None:
        print_items(state, sid, console())
    else:
        _cli_logs.print_step(state, sid, console())


def item_as_step(item: ItemState) -> StepState:
    """An item shown as ``--step`` shows a step (its attempts, errors and tracebacks)."""
    return StepState(item.status, item.attempts, item.started_at, item.finished_at, item.error, history=item.history)


# -- JSON ------------------------------------------------------------------------------


def items_json(step: StepState) -> dict[str, Any]:
    """A step's items as plain JSON-able data: ``items`` (None for an ordinary step) and, for a
    ``for_each`` step, the counts ``items_total``/``items_done``/``items_failed``/``items_running``."""
    from .cli_tables import progress_json

    if step.items is None:
        return {"items": None}
    counts = ItemCounts.of(step)
    return {
        "items_total": counts.total,
        "items_done": counts.done,
        "items_failed": counts.failed,
        "items_running": counts.running,
        "items": {key: progress_json(item, _wall(item)) for key, item in step.items.items()},
    }


_HOLE = "\x00wfaas-items-{}\x00"


def dumps(obj: dict[str, Any]) -> str:
    """A run's or a step's ``state_json`` as indented JSON, each item of a ``for_each`` step on one line.

    Indenting every field of 10,000 items would make 200,000 lines; one line
    per item keeps it readable, greppable and about half the size.
    """
    holes: dict[str, dict[str, Any]] = {}

    def hollow(step: Any) -> Any:
        if not isinstance(step, dict) or not step.get("items"):
            return step
        token = _HOLE.format(len(holes))
        holes[token] = step["items"]
        return {**step, "items": token}

    if isinstance(obj.get("steps"), dict):
        obj = {**obj, "steps": {sid: hollow(step) for sid, step in obj["steps"].items()}}
    else:
        obj = hollow(obj)
    text = indented(obj)
    for token, items in holes.items():
        quoted = json.dumps(token)
        at = text.index(quoted)
        indent = " " * (at - text.rindex("\n", 0, at) - 1 - len('"items": '))
        lines = ",\n".join(f"{indent}  {json.dumps(k)}: {json.dumps(v)}" for k, v in items.items())
        text = text[:at] + "{\n" + lines + f"\n{indent}}}" + text[at + len(quoted) :]
    return text


def indented(obj: Any) -> str:
    """The text of ``json.dumps(obj, indent=2)``, each run of plain values encoded by json's C encoder.

    json's indenting encoder is pure Python: 2 s for the 20,000 steps of a run's
    ``status --json``. Plain values at one depth sit one a line with the same
    indent, so encoding a run of them without indent but with the newline and
    indent as the item separator gives the same text (issue 17).
    """
    return _indented(obj, 0)


_ENCODERS: dict[int, Callable[[Any], str]] = {}
_REFUSE = json.JSONEncoder().default  # what is not JSON raises json's own TypeError


def _flat(depth: int) -> Callable[[Any], str]:
    """An encoder of containers of plain values whose items are separated as ``indent=2`` at ``depth``."""
    encode = _ENCODERS.get(depth)
    if encode is None:
        separator = ",\n" + "  " * (depth + 1)
        c_encoder = getattr(json.encoder, "c_make_encoder", None)
        if c_encoder is None:  # an interpreter without json's C module: same text, slower
            encode = json.JSONEncoder(separators=(separator, ": ")).encode
        else:
            chunks = c_encoder(
                None, _REFUSE, json.encoder.encode_basestring_ascii, None, ": ", separator, False, False, True
            )

            def encode(value: Any) -> str:
                return "".join(chunks(value, 0))

        _ENCODERS[depth] = encode
    return encode


def _indented(obj: Any, depth: int) -> str:
    encode = _flat(depth)
    if isinstance(obj, dict):
        if _PLAIN.issuperset(map(type, obj.values())):
            return _wrap(encode(obj), depth)
        parts: list[str] = []
        run: dict[Any, Any] = {}
        for key, value in obj.items():
            if isinstance(value, _CONTAINERS):
                if run:
                    parts.append(encode(run)[1:-1])
                    run = {}
                parts.append(f"{_key(key)}: {_indented(value, depth + 1)}")
            else:
                run[key] = value
        if run:
            parts.append(encode(run)[1:-1])
    elif isinstance(obj, (list, tuple)):
        if _PLAIN.issuperset(map(type, obj)):
            return _wrap(encode(obj), depth)
        parts = []
        values: list[Any] = []
        for value in obj:
            if isinstance(value, _CONTAINERS):
                if values:
                    parts.append(encode(values)[1:-1])
                    values = []
                parts.append(_indented(value, depth + 1))
            else:
                values.append(value)
        if values:
            parts.append(encode(values)[1:-1])
    else:
        return encode(obj)
    pad = _PADS[depth] if depth < len(_PADS) else "\n" + "  " * (depth + 1)
    opening, closing = ("{", "}") if isinstance(obj, dict) else ("[", "]")
    return f"{opening}{pad}{(',' + pad).join(parts)}{pad[:-2]}{closing}"


def _wrap(flat: str, depth: int) -> str:
    """A container of plain values encoded flat, with the newlines ``indent=2`` puts inside its brackets."""
    if len(flat) == 2:  # empty
        return flat
    pad = _PADS[depth] if depth < len(_PADS) else "\n" + "  " * (depth + 1)
    return f"{flat[0]}{pad}{flat[1:-1]}{pad[:-2]}{flat[-1]}"


def _key(key: Any) -> str:
    if type(key) is str:
        return _STRING(key)
    return _flat(0)({key: 0})[1:-4]  # json's own conversion of a non-string key


_CONTAINERS = (dict, list, tuple)
_PLAIN = frozenset({str, int, float, bool, type(None)})  # subclasses take the longer way, as containers
_PADS = ["\n" + "  " * (depth + 1) for depth in range(16)]
_STRING = json.encoder.encode_basestring_ascii
