"""wfaas: a workflow engine for one machine.

Write a workflow as a DAG of Python steps; wfaas runs independent steps in
parallel worker processes, with retries, timeouts that kill the step's whole
process tree, conditional and delayed steps, events, and a checkpoint after
every step. See ``README.md`` for the tour; this module is the whole public API.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from . import events
    from ._signals import Terminated
    from .clock import Clock, SystemClock
    from .dask_backend import DaskBackend
    from .data import WorkflowData, transient
    from .definition import (
        Backoff,
        Exponential,
        FailureAction,
        Fixed,
        Linear,
        RetryPolicy,
        StepDefinition,
        WorkflowDefinition,
    )
    from .engine import CleanupHandle, WorkflowEngine
    from .errors import (
        Cancelled,
        ContextValueNotFound,
        DataConflict,
        DefinitionNotFound,
        InvalidDefinition,
        InvalidStateTransition,
        NotFound,
        SerializationError,
        ShuttingDown,
        StepFailed,
        StepTimeout,
        StoreError,
        TypeMismatch,
        WorkerCrashed,
        WorkflowError,
    )
    from .events import (
        EventBus,
        EventSubscriber,
        LoggingSubscriber,
        StepOutput,
        StepRetrying,
        StepSkipped,
        StepStarted,
        StepSucceeded,
        WorkflowCancelled,
        WorkflowCompleted,
        WorkflowEvent,
        WorkflowFailed,
        WorkflowStarted,
    )
    from .objects import ObjectError
    from .prune import PruneResult
    from .sqlite_store import SqliteStore
    from .states import Attempt, ItemState, StepState, StepStatus, WorkflowState, WorkflowStatus
    from .steps import FunctionStep, StepExecutor, StepResult, WorkflowContext
    from .store import InMemoryStore, StateStore

# Every public name and the module that defines it, imported on first use (PEP 562), as
# concurrent.futures does with its executors: `import wfaas` costs a few milliseconds, and a
# worker process or a CLI command loads only the modules it uses.
_HOME = {
    "Terminated": "_signals",
    "Clock": "clock",
    "SystemClock": "clock",
    "WorkflowData": "data",
    "transient": "data",
    **dict.fromkeys(
        ("Backoff", "Exponential", "FailureAction", "Fixed", "Linear", "RetryPolicy", "StepDefinition"), "definition"
    ),
    "WorkflowDefinition": "definition",
    "CleanupHandle": "engine",
    "WorkflowEngine": "engine",
    **dict.fromkeys(
        (
            "Cancelled",
            "ContextValueNotFound",
            "DataConflict",
            "DefinitionNotFound",
            "InvalidDefinition",
            "InvalidStateTransition",
            "NotFound",
            "SerializationError",
            "ShuttingDown",
            "StepFailed",
            "StepTimeout",
            "StoreError",
            "TypeMismatch",
            "WorkerCrashed",
            "WorkflowError",
        ),
        "errors",
    ),
    **dict.fromkeys(
        (
            "EventBus",
            "EventSubscriber",
            "LoggingSubscriber",
            "StepOutput",
            "StepRetrying",
            "StepSkipped",
            "StepStarted",
            "StepSucceeded",
            "WorkflowCancelled",
            "WorkflowCompleted",
            "WorkflowEvent",
            "WorkflowFailed",
            "WorkflowStarted",
        ),
        "events",
    ),
    **dict.fromkeys(("Attempt", "ItemState", "StepState", "StepStatus", "WorkflowState", "WorkflowStatus"), "states"),
    **dict.fromkeys(("FunctionStep", "StepExecutor", "StepResult", "WorkflowContext"), "steps"),
    "InMemoryStore": "store",
    "StateStore": "store",
    "SqliteStore": "sqlite_store",  # sqlite3 costs import time
    "DaskBackend": "dask_backend",  # imports no distributed until it connects
    "ObjectError": "objects",
    "PruneResult": "prune",
}


def __getattr__(name: str) -> object:
    if name == "__version__":
        # Imported only when asked for: importlib.metadata costs import time.
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("wfaas")
        except PackageNotFoundError:  # pragma: no cover - a source tree without install
            found = "0.0.0+unknown"
        # Kept: a Dask worker asks for it with every step, and each look-up reads the installed metadata.
        globals()["__version__"] = found
        return found
    if name == "events":
        return importlib.import_module(".events", __name__)
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'wfaas' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "Attempt",
    "Backoff",
    "Cancelled",
    "CleanupHandle",
    "Clock",
    "ContextValueNotFound",
    "DaskBackend",
    "DataConflict",
    "DefinitionNotFound",
    "EventBus",
    "EventSubscriber",
    "Exponential",
    "FailureAction",
    "Fixed",
    "FunctionStep",
    "InMemoryStore",
    "InvalidDefinition",
    "InvalidStateTransition",
    "ItemState",
    "Linear",
    "LoggingSubscriber",
    "NotFound",
    "ObjectError",
    "PruneResult",
    "RetryPolicy",
    "SerializationError",
    "ShuttingDown",
    "SqliteStore",
    "StateStore",
    "StepDefinition",
    "StepExecutor",
    "StepFailed",
    "StepOutput",
    "StepResult",
    "StepRetrying",
    "StepSkipped",
    "StepStarted",
    "StepState",
    "StepStatus",
    "StepSucceeded",
    "StepTimeout",
    "StoreError",
    "SystemClock",
    "Terminated",
    "TypeMismatch",
    "WorkerCrashed",
    "WorkflowCancelled",
    "WorkflowCompleted",
    "WorkflowContext",
    "WorkflowData",
    "WorkflowDefinition",
    "WorkflowEngine",
    "WorkflowError",
    "WorkflowEvent",
    "WorkflowFailed",
    "WorkflowStarted",
    "WorkflowState",
    "WorkflowStatus",
    "__version__",
    "events",
    "transient",
]
