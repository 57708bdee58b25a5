"""Lifecycle events, and the bus that delivers them on its own thread.

The scheduler publishes a turn's events only after that turn's checkpoint is
committed, in the order things happened. Subscribers are called in order of
subscription on one event thread, so a slow or raising subscriber delays
other subscribers, never a workflow.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from . import _threads

__all__ = [
    "EventBus",
    "EventSubscriber",
    "LoggingSubscriber",
    "StepFailed",
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
]

log = logging.getLogger("wfaas")


@dataclass(frozen=True)
class WorkflowEvent:
    """Base of every event: which instance of which workflow, and when (UTC)."""

    instance_id: str
    workflow_id: str
    timestamp: datetime


@dataclass(frozen=True)
class WorkflowStarted(WorkflowEvent):
    """An instance started (or was resumed)."""


@dataclass(frozen=True)
class WorkflowCompleted(WorkflowEvent):
    """Every step finished; ``duration`` in seconds."""

    duration: float


@dataclass(frozen=True)
class WorkflowFailed(WorkflowEvent):
    """A step failed for good with FAIL_WORKFLOW."""

    error: str
    failed_step: str | None


@dataclass(frozen=True)
class WorkflowCancelled(WorkflowEvent):
    """The instance was cancelled; its running steps were stopped."""


@dataclass(frozen=True)
class StepStarted(WorkflowEvent):
    """An attempt was handed to a worker."""

    step_id: str
    attempt: int
    item_key: str | None = None  # the item's key, for an item of a for_each step


@dataclass(frozen=True)
class StepSucceeded(WorkflowEvent):
    """An attempt succeeded; ``duration`` in seconds, ``usage`` the worker's figures."""

    step_id: str
    attempt: int
    duration: float
    usage: dict[str, Any] | None = None
    item_key: str | None = None  # the item's key, for an item of a for_each step


@dataclass(frozen=True)
class StepFailed(WorkflowEvent):
    """An attempt failed; ``will_retry`` says whether another attempt follows."""

    step_id: str
    attempt: int
    error: str
    will_retry: bool
    usage: dict[str, Any] | None = None
    item_key: str | None = None  # the item's key, for an item of a for_each step


@dataclass(frozen=True)
class StepRetrying(WorkflowEvent):
    """Attempt ``attempt`` will start after ``delay`` seconds of backoff."""

    step_id: str
    attempt: int
    delay: float
    item_key: str | None = None  # the item's key, for an item of a for_each step


@dataclass(frozen=True)
class StepSkipped(WorkflowEvent):
    """A step was skipped: ``run_if`` was false or its body returned SKIP."""

    step_id: str
    reason: str
    item_key: str | None = None  # the item's key, for an item of a for_each step


@dataclass(frozen=True)
class StepOutput(WorkflowEvent):
    """Lines an attempt printed (stdout, stderr) or logged: a few at a time while it runs, the rest when it ends.

    ``lines`` are ``(time.time(), level, text)``: level 0 for a printed line,
    else the log record's level. ``wfaas-local logs`` reads the same lines
    from the store.
    """

    step_id: str
    attempt: int
    lines: tuple[tuple[float, int, str], ...]
    item_key: str | None = None  # the item's key, for an item of a for_each step


@runtime_checkable
class EventSubscriber(Protocol):
    """Anything with ``on_event(event)``; a plain callable works too."""

    def on_event(self, event: WorkflowEvent) -> None: ...


Subscriber = EventSubscriber | Callable[[WorkflowEvent], Any]


class LoggingSubscriber:
    """Logs every event through the stdlib ``logging`` module (logger ``wfaas``)."""

    def __init__(self, logger: logging.Logger | None = None, level: int = logging.INFO) -> None:
        self.logger = logger or log
        self.level = level

    def on_event(self, event: WorkflowEvent) -> None:
        if isinstance(event, StepOutput):
            return  # its log records already reached logging (re-emitted); printed lines are for logs/CLI
        level = logging.WARNING if isinstance(event, (WorkflowFailed, StepFailed)) else self.level
        fields = {k: v for k, v in vars(event).items() if k not in ("instance_id", "workflow_id", "timestamp", "usage")}
        detail = " ".join(f"{k}={v}" for k, v in fields.items())
        self.logger.log(level, "%s %s/%s %s", type(event).__name__, event.workflow_id, event.instance_id, detail)


_STOP = object()


class EventBus:
    """Delivers events to subscribers on one thread, in publication order."""

    def __init__(self) -> None:
        self._subscribers: list[Callable[[WorkflowEvent], Any]] = []
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def has_subscribers(self) -> bool:
        return bool(self._subscribers)

    def subscribe(self, subscriber: Subscriber) -> None:
        """Add a subscriber: an object with ``on_event(event)`` or a callable."""
        on_event = getattr(subscriber, "on_event", None)
        if callable(on_event):
            self._subscribers = [*self._subscribers, on_event]
        elif callable(subscriber):
            self._subscribers = [*self._subscribers, subscriber]
        else:
            raise TypeError(f"a subscriber needs on_event(event) or must be callable, got {type(subscriber).__name__}")

    def publish(self, items: list[Any]) -> None:
        """Queue events (and worker log records) for delivery; never blocks."""
        if not items:
            return
        self._ensure_thread()
        self._queue.put(items)

    def flush(self, timeout: float | None = 5.0) -> bool:
        """Wait until everything published so far was delivered."""
        if self._thread is None:
            return True
        done = threading.Event()
        self._queue.put([done])
        return done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    def _ensure_thread(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = _threads.start(self._run, "wfaas-events")

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is _STOP:
                return
            for item in batch:
                if isinstance(item, threading.Event):
                    item.set()
                elif isinstance(item, dict):
                    _emit_worker_log(item)
                else:
                    for deliver in self._subscribers:
                        try:
                            deliver(item)
                        except Exception:  # a subscriber never fails a workflow
                            log.exception("event subscriber %r raised on %s", deliver, type(item).__name__)


def _emit_worker_log(item: dict[str, Any]) -> None:
    """Re-emit a log record captured in a worker through this process's logging."""
    logger = logging.getLogger(item["name"])
    if logger.isEnabledFor(item["levelno"]):
        # Marked, so that a handler that shows StepOutput lines (the CLI) can skip it.
        record = logging.makeLogRecord({**item, "args": None, "wfaas_worker": True})
        logger.handle(record)
