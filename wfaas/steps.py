"""What a step is, and what it sees while it runs.

A step body is any callable ``fn(ctx) -> StepResult | None``, a
:class:`StepExecutor` subclass, or ``FunctionStep(fn)``. It runs in a worker
process with a :class:`WorkflowContext` holding its own copy of the data.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from typing import Any, Generic, TypeVar, overload

from .errors import ContextValueNotFound, TypeMismatch

__all__ = ["FunctionStep", "StepExecutor", "StepResult", "WorkflowContext"]

D = TypeVar("D")
T = TypeVar("T")
_MISSING: Any = object()


class StepResult(enum.Enum):
    """What a step body returns; ``None`` means ``SUCCESS``."""

    SUCCESS = "success"
    FAILURE = "failure"
    SKIP = "skip"


class WorkflowContext(Generic[D]):
    """What a step sees: its copy of the data, who it is, and shared named values.

    ``attempt`` counts from 1. ``idempotency_key`` is ``"{instance_id}:{step_id}"``
    (``"{instance_id}:{step_id}[{item_key}]"`` for an item of a ``for_each``
    step) and stays the same across retries and resumes: pass it to external
    systems so that a step run twice (at-least-once) has its effect once.
    ``item`` / ``item_key`` are the item and its key for a ``for_each`` step,
    else ``None``.
    """

    def __init__(
        self,
        data: D,
        *,
        instance_id: str,
        workflow_id: str,
        step_id: str,
        attempt: int,
        values: dict[str, Any] | None = None,
        item: Any = None,
        item_key: str | None = None,
    ) -> None:
        self.data = data
        self.instance_id = instance_id
        self.workflow_id = workflow_id
        self.step_id = step_id
        self.attempt = attempt
        self.item = item
        self.item_key = item_key
        self._values: dict[str, Any] = values if values is not None else {}
        self._written: dict[str, Any] = {}

    @property
    def logger(self) -> logging.Logger:
        """The step's logger, ``wfaas.step.<workflow>.<step>``; its records reach the engine's logging."""
        return logging.getLogger(f"wfaas.step.{self.workflow_id}.{self.step_id}")

    @property
    def idempotency_key(self) -> str:
        """``"{instance_id}:{step_id}"`` (``[{item_key}]`` appended for an item), stable across retries and resumes."""
        if self.item_key is not None:
            return f"{self.instance_id}:{self.step_id}[{self.item_key}]"
        return f"{self.instance_id}:{self.step_id}"

    @overload
    def get(self, key: str) -> Any: ...
    @overload
    def get(self, key: str, default: Any = ..., *, type: type[T]) -> T: ...
    @overload
    def get(self, key: str, default: Any) -> Any: ...

    def get(self, key: str, default: Any = _MISSING, *, type: type[Any] | None = None) -> Any:  # noqa: A002 - API.md
        """A value set by an earlier step with :meth:`set`.

        Missing without a default raises :class:`ContextValueNotFound`; with
        ``type=`` a value of another type raises :class:`TypeMismatch`.
        """
        if key in self._values:
            value = self._values[key]
        elif default is not _MISSING:
            return default
        else:
            raise ContextValueNotFound(key, self.instance_id, self.step_id)
        if type is not None and not isinstance(value, type):
            raise TypeMismatch(key, type, value)
        return value

    def set(self, key: str, value: Any) -> None:
        """Share a small named value with the steps that run after this one."""
        self._values[key] = value
        self._written[key] = value


def values_written(ctx: WorkflowContext[Any]) -> dict[str, Any]:
    """The shared values ``ctx`` set during its step (the worker sends back only those)."""
    return ctx._written


class StepExecutor(Generic[D]):
    """A step as a class: override :meth:`execute`, and the hooks if you need them.

    ``is_retryable`` is asked in the scheduler for every failed attempt;
    ``on_success`` runs in the worker right after the successful attempt;
    ``on_failure`` runs once, in a worker, after the step failed for good.
    A hook that raises is logged (logger ``wfaas``) and changes nothing.
    """

    def execute(self, ctx: WorkflowContext[D]) -> StepResult | None:
        """Do the step's work on ``ctx.data``; raise or return ``FAILURE`` to fail."""
        raise NotImplementedError(f"{type(self).__name__}.execute is not implemented")

    def is_retryable(self, error: BaseException) -> bool:
        """Whether a failed attempt may be retried (default: always)."""
        return True

    def on_success(self, ctx: WorkflowContext[D]) -> None:
        """Called once after the successful attempt."""

    def on_failure(self, ctx: WorkflowContext[D], error: BaseException) -> None:
        """Called once after the step failed for good, with the error that ended it."""


class FunctionStep(StepExecutor[D]):
    """Wraps a plain function ``fn(ctx) -> StepResult | None`` as an executor."""

    def __init__(self, fn: Callable[[WorkflowContext[D]], StepResult | None]) -> None:
        if not callable(fn):
            raise TypeError(f"FunctionStep needs a callable, got {type(fn).__name__}")
        self.fn = fn

    def execute(self, ctx: WorkflowContext[D]) -> StepResult | None:
        return self.fn(ctx)

    def __repr__(self) -> str:
        return f"FunctionStep({getattr(self.fn, '__qualname__', self.fn)!r})"


def overrides(executor: object, hook: str) -> bool:
    """Whether ``executor`` defines ``hook`` itself rather than inheriting the no-op."""
    if not isinstance(executor, StepExecutor):
        return False
    return getattr(type(executor), hook) is not getattr(StepExecutor, hook)
