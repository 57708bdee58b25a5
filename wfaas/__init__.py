"""wfaas: a workflow engine for one machine.

Write a workflow as a DAG of Python steps; wfaas runs independent steps in
parallel worker processes, with retries, timeouts that kill the step's whole
process tree, conditional and delayed steps, events, and a checkpoint after
every step. See ``README.md`` for the tour; this module is the whole public API.
"""

from __future__ import annotations

from . import events
from ._signals import Terminated
from .clock import Clock, SystemClock
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
from .states import Attempt, ItemState, StepState, StepStatus, WorkflowState, WorkflowStatus
from .steps import FunctionStep, StepExecutor, StepResult, WorkflowContext
from .store import InMemoryStore, StateStore


def __getattr__(name: str) -> object:
    # Imported only when asked for: importlib.metadata and sqlite3 cost import time.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("wfaas")
        except PackageNotFoundError:  # pragma: no cover - a source tree without install
            return "0.0.0+unknown"
    if name == "SqliteStore":
        from .sqlite_store import SqliteStore

        return SqliteStore
    if name == "DaskBackend":
        # Imports no distributed until it connects.
        from .dask_backend import DaskBackend

        return DaskBackend
    if name in ("ObjectError", "PruneResult"):  # large values (objects.py, prune.py)
        from . import objects, prune

        return getattr(objects if name == "ObjectError" else prune, name)
    raise AttributeError(f"module 'wfaas' has no attribute {name!r}")


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
