"""The error tree: every error wfaas raises is a :class:`WorkflowError`.

Messages are sentences that name the workflow, instance, step or field at
fault and, where there is one, the fix. The structured parts stay available as
attributes (``instance_id``, ``step_id`` ...) so programs need not parse text.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
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
]


class WorkflowError(Exception):
    """Base class of every error raised by wfaas."""


class NotFound(WorkflowError):
    """Raised when no workflow instance has the given id."""

    def __init__(self, instance_id: str, detail: str = "") -> None:
        self.instance_id = instance_id
        super().__init__(
            f"no workflow instance {instance_id!r}{detail}; "
            "list the known ones with engine.store.list_all() or `wfaas-local list`"
        )


class DefinitionNotFound(WorkflowError):
    """Raised when a workflow id was never registered with the engine."""

    def __init__(self, workflow_id: str, known: Sequence[str] = ()) -> None:
        self.workflow_id = workflow_id
        hint = f" (registered: {', '.join(sorted(known))})" if known else " (none registered)"
        super().__init__(
            f"workflow {workflow_id!r} is not registered{hint}; call engine.register_workflow(definition) first"
        )


class InvalidDefinition(WorkflowError):
    """Raised by ``register_workflow`` with every problem of a definition at once."""

    def __init__(self, workflow_id: str, problems: Sequence[str]) -> None:
        self.workflow_id = workflow_id
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            f"workflow {workflow_id!r} is invalid ({len(self.problems)} problem"
            f"{'s' if len(self.problems) != 1 else ''}):\n{lines}"
        )


class _StepError(WorkflowError):
    """An error that ended one attempt of one step of one instance."""

    def __init__(
        self,
        message: str,
        *,
        instance_id: str = "",
        workflow_id: str = "",
        step_id: str = "",
        attempt: int = 0,
    ) -> None:
        self.instance_id = instance_id
        self.workflow_id = workflow_id
        self.step_id = step_id
        self.attempt = attempt
        self.reason = message
        where = f"step {step_id!r}" if step_id else "a step"
        if attempt:
            where += f" (attempt {attempt})"
        if instance_id:
            where += f" of instance {instance_id}"
        if workflow_id:
            where += f" of workflow {workflow_id!r}"
        super().__init__(f"{where}: {message}")

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only construction does not survive pickle's default
        # ``cls(*args)``; rebuild from the structured parts instead.
        return (
            _rebuild_step_error,
            (
                type(self),
                self.reason,
                self.instance_id,
                self.workflow_id,
                self.step_id,
                self.attempt,
                dict(self.__dict__),
            ),
        )


def _rebuild_step_error(
    cls: type[_StepError],
    message: str,
    instance_id: str,
    workflow_id: str,
    step_id: str,
    attempt: int,
    state: dict[str, object],
) -> _StepError:
    error = cls.__new__(cls)
    _StepError.__init__(
        error,
        message,
        instance_id=instance_id,
        workflow_id=workflow_id,
        step_id=step_id,
        attempt=attempt,
    )
    error.__dict__.update(state)
    return error


def step_error_named(type_name: str, message: str, *, instance_id: str, step_id: str) -> WorkflowError | None:
    """The step error class ``type_name`` rebuilt from a stored record's text, or None if it is not one."""
    kind = globals().get(type_name)
    if not (isinstance(kind, type) and issubclass(kind, _StepError)):
        return None
    error = kind.__new__(kind)
    _StepError.__init__(error, message, instance_id=instance_id, step_id=step_id)
    Exception.__init__(error, message)  # the message as stored already names the step
    return error


class StepFailed(_StepError):
    """Raised when a step failed for good: it raised, or returned ``StepResult.FAILURE``.

    The step's own exception is ``__cause__``, carrying the worker's traceback.
    """


class StepTimeout(_StepError):
    """Raised when an attempt ran past its timeout; its process tree was killed."""


class WorkerCrashed(_StepError):
    """Raised when the worker process running a step died (exit, signal, OOM)."""

    exitcode: int | None = None
    signal_name: str | None = None


class DataConflict(_StepError):
    """Raised when two steps that ran at once changed one field (or dict key) differently."""


class Cancelled(WorkflowError):
    """Raised when waiting on an instance that was cancelled."""

    def __init__(self, instance_id: str, workflow_id: str = "") -> None:
        self.instance_id = instance_id
        self.workflow_id = workflow_id
        of = f" of workflow {workflow_id!r}" if workflow_id else ""
        super().__init__(
            f"instance {instance_id}{of} was cancelled; "
            f"continue it with engine.resume({instance_id!r}) or `wfaas-local resume {instance_id}`"
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (Cancelled, (self.instance_id, self.workflow_id))


class InvalidStateTransition(WorkflowError):
    """Raised on a status change the transition table does not allow."""

    def __init__(self, what: str, current: object, requested: object, hint: str = "") -> None:
        self.current = current
        self.requested = requested
        super().__init__(
            f"{what}: cannot go from {_name(current)} to {_name(requested)}" + (f"; {hint}" if hint else "")
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_plain, (type(self), str(self)))


class ContextValueNotFound(WorkflowError):
    """Raised by ``ctx.get(key)`` when the key was never set and no default was given."""

    def __init__(self, key: str, instance_id: str = "", step_id: str = "") -> None:
        self.key = key
        super().__init__(
            f"context value {key!r} not found (instance {instance_id or '?'}, step {step_id or '?'}); "
            "set it in an earlier step with ctx.set(key, value) or pass a default"
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_plain, (type(self), str(self)))


class TypeMismatch(WorkflowError):
    """Raised by ``ctx.get(key, type=T)`` when the stored value is not a ``T``."""

    def __init__(self, key: str, expected: type, actual: object) -> None:
        self.key = key
        super().__init__(f"context value {key!r} is a {type(actual).__name__}, not the {expected.__name__} asked for")

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_plain, (type(self), str(self)))


class ShuttingDown(WorkflowError):
    """Raised by ``start_workflow`` after ``shutdown()`` was called."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(
            "the engine is shutting down and accepts no new workflows"
            + (f" ({detail})" if detail else "")
            + "; create a new WorkflowEngine"
        )


class SerializationError(WorkflowError):
    """Raised at ``start_workflow`` when a data field cannot travel to a worker."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


class StoreError(WorkflowError):
    """Raised when a state store cannot be opened, read or written.

    ``resumable`` is True when a run stopped by it can be resumed once the
    cause is fixed (a full disk: what was committed is kept), False when not
    (the store file was deleted).
    """

    def __init__(self, message: str, *, resumable: bool = False) -> None:
        super().__init__(message)
        self.resumable = resumable

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_store_error, (str(self), self.resumable))


def _rebuild_store_error(message: str, resumable: bool) -> StoreError:
    return StoreError(message, resumable=resumable)


def _rebuild_plain(cls: type[WorkflowError], message: str) -> WorkflowError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    return error


def _name(value: object) -> str:
    return getattr(value, "name", None) or str(value)
