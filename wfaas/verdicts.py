"""Verdicts on how an attempt ended: retry, hook or fail; and the words of every step error.

Pure functions of the step's definition, its attempts and what the worker
(or the kill) reported. The scheduler asks, then acts on the answer: it
starts timers, queues hooks and changes statuses; nothing here does.
"""

from __future__ import annotations

import enum
import logging
import pickle
from datetime import datetime, timedelta
from typing import Any

from .definition import FailureAction
from .errors import (
    DataConflict,
    InvalidStateTransition,
    NotFound,
    StepFailed,
    StepTimeout,
    StoreError,
    WorkerCrashed,
    WorkflowError,
)
from .pool import Exit
from .rundata import Conflict
from .runs import Hook, KillReason, Run, StepRun, Stopping, Task
from .states import AttemptOutcome, WorkflowStatus
from .steps import StepExecutor, overrides

log = logging.getLogger("wfaas")

# Attempts kept per step: a step retried indefinitely must not make each checkpoint grow without end.
HISTORY_KEPT = 100


def keep_attempt(history: list[dict[str, Any]], record: dict[str, Any]) -> None:
    """Add an attempt's record to a step's history, keeping the last ``HISTORY_KEPT``."""
    history.append(record)
    if len(history) > HISTORY_KEPT:
        del history[0]


# A worker SIGKILLed while this large (ten times a fresh worker) was probably the OOM killer's
# choice: the kernel says nothing to us, so this is a hint, and worded as one.
OOM_HINT_BYTES = 256 * 2**20


class Verdict(enum.Enum):
    """What becomes of a step after an attempt failed."""

    RETRY = "retry"  # after the backoff, another attempt
    HOOK = "hook"  # it failed for good; its on_failure hook runs first
    FAIL = "fail"  # it failed for good


def after_failure(run: Run, step: StepRun, cause: BaseException, *, may_retry: bool = True) -> tuple[Verdict, float]:
    """Retry (and after how many seconds), run the on_failure hook, or fail for good."""
    i = step.index
    sdef = run.compiled.steps[i]
    policy = run.compiled.retry[i]
    used = step.attempts - step.budget_start
    forever = sdef.failure_action is FailureAction.RETRY_INDEFINITELY
    if may_retry and run.stopping is None and (forever or used < policy.max_attempts) and retryable(sdef.body, cause):
        return Verdict.RETRY, policy.backoff.delay(used)
    if overrides(sdef.body, "on_failure") and run.stopping is not Stopping.CANCEL:
        return Verdict.HOOK, 0.0
    return Verdict.FAIL, 0.0


def hook_after_success(run: Run, step: StepRun) -> Hook | None:
    """The on_success hook to run before the step counts as succeeded, if it has one."""
    return Hook.SUCCESS if overrides(run.compiled.steps[step.index].body, "on_success") else None


def retryable(body: Any, cause: BaseException) -> bool:
    if not isinstance(body, StepExecutor):
        return True
    try:
        return bool(body.is_retryable(cause))
    except Exception:  # a raising is_retryable means: do not retry
        log.exception("is_retryable of %r raised; not retrying", body)
        return False


# -- the words -----------------------------------------------------------------------


def where(run: Run, step: StepRun) -> dict[str, Any]:
    """The keyword arguments that make a step error name its step (``step[key]`` for an item), attempt, instance
    and workflow."""
    return {"instance_id": run.iid, "workflow_id": run.workflow_id, "step_id": step.label, "attempt": step.attempts}


def reason(error: WorkflowError) -> str:
    """What went wrong, without the step and instance a step record already names."""
    return str(getattr(error, "reason", None) or error)


def returned_failure(run: Run, step: StepRun) -> StepFailed:
    return StepFailed("the step returned StepResult.FAILURE", **where(run, step))


def raised(run: Run, step: StepRun, error_blob: bytes, traceback: str) -> tuple[StepFailed, BaseException]:
    """The step error for an exception the step raised, and that exception (with the worker's traceback)."""
    exc = decode_error(error_blob)
    exc.__cause__ = RemoteTraceback(traceback)
    error = StepFailed(f"{type(exc).__name__}: {exc}", **where(run, step))
    error.__cause__ = exc
    return error, exc


def run_if_raised(run: Run, step: StepRun, exc: BaseException) -> StepFailed:
    error = StepFailed(f"run_if raised {type(exc).__name__}: {exc}", **where(run, step))
    error.__cause__ = exc
    return error


def conflict(run: Run, step: StepRun, found: Conflict) -> DataConflict:
    name = "the shared context" if found.context else f"field {found.what}"
    return DataConflict(
        f"{name} was changed by step {found.other_step!r}, which ran at the same time, to a different value; "
        f"make one of them depend on the other, or write different fields (dict fields merge key by key)",
        **where(run, step),
    )


def killed(task: Task, exit_: Exit) -> tuple[AttemptOutcome, WorkflowError | None]:
    """How an attempt whose tree was stopped ended, and the error it failed with (None: cancelled)."""
    run, step = task.run, task.step
    if task.kill_reason is KillReason.CRASH:
        return AttemptOutcome.CRASHED, crashed(task, exit_)
    if task.kill_reason is KillReason.TIMEOUT:
        return AttemptOutcome.TIMED_OUT, StepTimeout(
            f"timed out after {run.compiled.timeout[step.index] or 0:g} s; its worker ({worker_name(task, exit_)}) "
            f"and every process it started were stopped ({exit_.describe()})",
            **where(run, step),
        )
    if task.kill_reason is KillReason.MEMORY:
        error = WorkerCrashed(
            f"stopped: its worker used {mib(exit_.last_rss)} MiB, over the step's memory limit of "
            f"{mib(run.compiled.memory_limit[step.index] or 0)} MiB{f' ({exit_.where})' if exit_.where else ''}; "
            "raise it with with_memory_limit() "
            "or make the step use less",
            **where(run, step),
        )
        error.exitcode, error.signal_name = exit_.exitcode, exit_.signal_name
        return AttemptOutcome.CRASHED, error
    return AttemptOutcome.CANCELLED, None


CANCELLED_WHILE_RUNNING = "cancelled while running; its process tree was stopped"


def crashed(task: Task, exit_: Exit) -> WorkerCrashed:
    hint = ""
    if exit_.signal_name == "SIGKILL" and exit_.last_rss >= OOM_HINT_BYTES:
        hint = f"; probably out of memory (its last measured RSS was {mib(exit_.last_rss)} MiB)"
    error = WorkerCrashed(
        f"its worker process ({worker_name(task, exit_)}) {exit_.describe()}{hint}; other steps were not affected",
        **where(task.run, task.step),
    )
    error.exitcode, error.signal_name = exit_.exitcode, exit_.signal_name
    return error


def not_cancellable(iid: str, meta: dict[str, Any] | None) -> WorkflowError:
    """Why a run this engine does not hold cannot be cancelled here (``meta``: its stored record, if any)."""
    if meta is None:
        return NotFound(iid)
    status = WorkflowStatus(meta["status"])
    owner = (meta.get("owner") or {}).get("pid", "?")
    hint = "it has already finished" if status.is_terminal else f"it is owned by process {owner}"
    return InvalidStateTransition(f"instance {iid}", status, WorkflowStatus.CANCELLED, hint)


def store_failed(run: Run, exc: Exception) -> StoreError:
    """The run's error when a checkpoint holding its changes failed; a store's own error says what to do."""
    resumable = exc.resumable if isinstance(exc, StoreError) else True
    cause = str(exc) if isinstance(exc, StoreError) else f"checkpoint failed ({type(exc).__name__}: {exc})"
    return StoreError(
        f"instance {run.iid} stopped so that no step runs on uncommitted results: {cause}", resumable=resumable
    )


def worker_name(task: Task, exit_: Exit) -> str:
    """The process that ran the task, for messages: its pid here, or what the remote pool called it."""
    return exit_.where or f"pid {task.pid}"


def mib(n: int) -> str:
    return f"{n / 2**20:.0f}"


class RemoteTraceback(Exception):
    """The worker's traceback, attached as ``__cause__`` of the step's own exception."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


def decode_error(blob: bytes) -> BaseException:
    try:
        exc = pickle.loads(blob)
    except Exception as err:  # noqa: BLE001 - the class may not exist here
        return RuntimeError(f"(the step's exception could not be decoded here: {err})")
    if not isinstance(exc, BaseException):
        return RuntimeError(repr(exc))
    return exc


# -- the record of an attempt ------------------------------------------------------------


def attempt_record(
    task: Task,
    outcome: AttemptOutcome,
    *,
    now: datetime,
    elapsed: float,
    usage: dict[str, float] | None = None,
    exit_: Exit | None = None,
    error: WorkflowError | None = None,
    traceback: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The attempt's figures, and its ``Attempt`` record (see states.py); ``elapsed`` if the worker sent none."""
    # A killed worker sent nothing: its RSS as last sampled, if it was (memory limits).
    sampled = exit_.last_rss if exit_ is not None and exit_.last_rss else None
    figures: dict[str, Any] = {
        "wall": usage["wall"] if usage else elapsed,
        "cpu": usage.get("cpu") if usage else None,
        "max_rss": int(usage["max_rss"]) if usage and "max_rss" in usage else sampled,
        "waited": task.waited,
        "wait_kind": task.wait_kind._value_ if task.wait_kind else None,  # _value_: see commits.checkpoint
        "queued": task.queued,
        "exitcode": exit_.exitcode if exit_ else None,
        "signal": exit_.signal_name if exit_ else None,
    }
    record = {
        "number": task.attempt,
        "outcome": outcome._value_,
        "started_at": task.step.started_at,
        "finished_at": now,
        **figures,
        "error": reason(error) if error is not None else None,
        "traceback": traceback,
    }
    return figures, record


def run_if_record(
    step: StepRun, error: WorkflowError, now: datetime, waited: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The figures and ``Attempt`` record of the failed attempt a raising run_if is (it ran nowhere)."""
    figures = {"wall": 0.0, "cpu": None, "max_rss": None, "queued": 0.0, "exitcode": None, "signal": None}
    usage = {**figures, "waited": waited, "wait_kind": step.wait_kind.value if step.wait_kind else None}
    record = {"number": step.attempts, "outcome": AttemptOutcome.FAILED.value, "started_at": now, "finished_at": now}
    return usage, {**record, **usage, "error": reason(error)}


def delta(seconds: float) -> timedelta:
    return timedelta(seconds=max(0.0, seconds))
