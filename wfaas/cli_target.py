"""TARGET (``module:attr`` or ``path/file.py:attr``) to a validated WorkflowDefinition, and its run's data.

A run records its target made absolute (:func:`absolute_target`), so
``resume ID`` and ``recover`` load the definition again from anywhere.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from .cli_errors import fail
from .cli_text import with_article
from .definition import WorkflowDefinition

__all__ = ["absolute_target", "build_data", "load_target", "split_target"]


def absolute_target(target: str) -> str:
    """The target with a file path made absolute, as recorded with a run (resume works from anywhere)."""
    module_part, attr = split_target(target)
    if module_part.endswith(".py") or os.sep in module_part:
        return f"{Path(module_part).resolve()}:{attr}"
    return f"{module_part}:{attr}"


def split_target(target: str) -> tuple[str, str]:
    """(module or file, attribute) of a TARGET; without ``:attr`` the attribute is ``workflow``."""
    module_part, sep, attr = target.rpartition(":")
    return (module_part, attr) if sep else (target, "workflow")


def found_hint(module: Any) -> str:
    """What a module does define, for an error naming an attribute it lacks."""
    found = sorted(k for k, v in vars(module).items() if isinstance(v, WorkflowDefinition))
    return f"; it defines: {', '.join(found)}" if found else "; it defines no WorkflowDefinition"


def load_target(target: str) -> WorkflowDefinition:
    """The WorkflowDefinition named by ``module:attr`` or ``path/file.py:attr``."""
    module_part, attr = split_target(target)
    if not module_part or not attr:
        fail(f"target {target!r} must look like package.module:workflow or path/to/file.py:workflow")
    if module_part.endswith(".py") or os.sep in module_part:
        path = Path(module_part).resolve()
        if not path.is_file():
            fail(f"target {target!r}: no file {module_part}")
        # Workers import step functions by module name: the file's folder must be on sys.path
        # before the engine starts its workers.
        sys.path.insert(0, str(path.parent))
        module_name = path.stem
    else:
        module_name = module_part
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is a one-line usage error
        fail(f"target {target!r}: cannot import {module_name!r}: {type(exc).__name__}: {exc}")
    if not hasattr(module, attr):
        fail(f"target {target!r}: module {module_name!r} has no attribute {attr!r}{found_hint(module)}")
    value = getattr(module, attr)
    if isinstance(value, type):
        fail(
            f"target {target!r}: {attr} is the class {value.__name__}, not a WorkflowDefinition; "
            f"name the definition (or a function returning one){found_hint(module)}"
        )
    if callable(value) and not isinstance(value, WorkflowDefinition):
        try:
            value = value()
        except Exception as exc:  # noqa: BLE001 - reported as a usage error
            fail(f"target {target!r}: calling {attr}() raised {type(exc).__name__}: {exc}")
    if not isinstance(value, WorkflowDefinition):
        fail(f"target {target!r}: {attr} is {with_article(type(value).__name__)}, not a WorkflowDefinition")
    problems = value.validate()
    if problems:
        fail(f"target {target!r}: invalid workflow {value.id!r}: " + "; ".join(problems))
    return value


def build_data(definition: WorkflowDefinition, data: str | None, params: tuple[str, ...] = ()) -> Any:
    """The run's data: ``data_type(**fields)`` from JSON (``@file.json`` reads a file) and ``--param``s,
    each value checked against its field's type (:mod:`wfaas.params`)."""
    from .params import ParamError, build_fields

    fields: dict[str, Any] = {}
    if data:
        text = data
        if data.startswith("@"):
            try:
                text = Path(data[1:]).read_text()
            except OSError as exc:
                fail(f"--data {data}: cannot read the file: {exc}")
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as exc:
            fail(f"--data is not valid JSON: {exc}")
        if not isinstance(fields, dict):
            fail('--data must be a JSON object, e.g. \'{"input": "hello"}\'')
    cls = definition.data_type
    if cls is None:
        if fields or params:
            fail(f"--data given, but workflow {definition.id!r} declares no data_type to build it with")
        fail(f"workflow {definition.id!r} declares no data_type; the CLI cannot build its data")
    try:
        fields = build_fields(cls, fields, params)
    except ParamError as exc:
        fail(str(exc))
    try:
        return cls(**fields)
    except TypeError as exc:
        fail(f"--data: cannot build {cls.__name__}: {exc}")
