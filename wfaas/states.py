"""Statuses, the one table of allowed transitions each, and the state users read.

``WorkflowState`` / ``StepState`` are what ``engine.get_status`` and the
stores return: plain snapshots, decoupled from the scheduler's own records.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

from .errors import InvalidStateTransition

__all__ = ["Attempt", "AttemptOutcome", "ItemState", "StepState", "StepStatus", "WorkflowState", "WorkflowStatus"]

D = TypeVar("D")


class WorkflowStatus(enum.Enum):
    """Where an instance is in its life."""

    # Hashed by identity (members are singletons): Enum's own __hash__ is a Python call, and the
    # transition tables and status sets are looked up several times per step.
    __hash__ = object.__hash__

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        """COMPLETED, FAILED or CANCELLED."""
        return self in _TERMINAL_WORKFLOW


class StepStatus(enum.Enum):
    """Where a step of an instance is in its life. WAITING = delay, schedule or backoff."""

    __hash__ = object.__hash__  # see WorkflowStatus

    PENDING = "pending"
    WAITING = "waiting"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        """SUCCEEDED, FAILED, SKIPPED or CANCELLED."""
        return self in _FINAL_STEP


_TERMINAL_WORKFLOW = frozenset({WorkflowStatus.COMPLETED, WorkflowStatus.FAILED, WorkflowStatus.CANCELLED})
_FINAL_STEP = frozenset({StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.SKIPPED, StepStatus.CANCELLED})

W, S = WorkflowStatus, StepStatus

# Every allowed status change of an instance, each made by the scheduler (tests/test_transitions.py
# checks both ways). Anything else raises.
WORKFLOW_TRANSITIONS: dict[WorkflowStatus, frozenset[WorkflowStatus]] = {
    W.PENDING: frozenset({W.RUNNING}),  # started, or resumed after its process died before the start
    W.RUNNING: frozenset({W.COMPLETED, W.FAILED, W.CANCELLED, W.RUNNING}),  # RUNNING->RUNNING: recovered
    W.FAILED: frozenset({W.RUNNING}),  # resume
    W.CANCELLED: frozenset({W.RUNNING}),  # resume
    W.COMPLETED: frozenset({W.RUNNING}),  # resume with rerun=[...]
}

# Every allowed status change of a step, each made by the scheduler. Anything else raises.
# A resumed step starts from its recorded status and is moved to PENDING through this table.
STEP_TRANSITIONS: dict[StepStatus, frozenset[StepStatus]] = {
    S.PENDING: frozenset({S.WAITING, S.RUNNING, S.SKIPPED, S.FAILED}),  # FAILED: its run_if raised
    S.WAITING: frozenset({S.RUNNING, S.SKIPPED, S.FAILED, S.PENDING}),  # PENDING: its instance stopped
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.SKIPPED, S.CANCELLED, S.WAITING, S.PENDING}),
    # RUNNING->WAITING: a retry's backoff; RUNNING->PENDING: resumed after its process died
    S.SUCCEEDED: frozenset({S.PENDING}),  # resume with rerun
    S.SKIPPED: frozenset({S.PENDING}),  # resume with rerun
    S.FAILED: frozenset({S.PENDING}),  # resume
    S.CANCELLED: frozenset({S.PENDING}),  # resume
}


def check_workflow_transition(instance_id: str, current: WorkflowStatus, new: WorkflowStatus) -> None:
    """Raise :class:`InvalidStateTransition` unless the table allows ``current -> new``."""
    if new not in WORKFLOW_TRANSITIONS[current]:
        raise InvalidStateTransition(f"instance {instance_id}", current, new)


def check_step_transition(instance_id: str, step_id: str, current: StepStatus, new: StepStatus) -> None:
    """Raise :class:`InvalidStateTransition` unless the table allows ``current -> new``."""
    if new not in STEP_TRANSITIONS[current]:
        raise InvalidStateTransition(f"step {step_id!r} of instance {instance_id}", current, new)


class AttemptOutcome(enum.Enum):
    """How one attempt ended (``Attempt.outcome`` holds the value; the report colours each)."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CRASHED = "crashed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class Attempt:
    """One attempt of a step: how it ended and what it cost.

    ``wall``/``cpu`` in seconds (CPU = user + system, the step's child processes
    included), ``max_rss`` the peak resident memory in bytes during the attempt
    (the worker's, or a waited-for child's if larger). For an attempt that was
    killed (timeout, crash, cancel, memory limit) ``cpu`` and ``max_rss`` are
    unknown (``None``) and ``wall`` is measured by the engine; ``exitcode`` /
    ``signal`` say how the worker ended. ``waited`` is the time before it, spent
    in a delay, ``scheduled_at`` or a retry's backoff (``wait_kind``), and
    ``queued`` the time it then waited for a free worker. ``traceback`` is the
    step's full traceback as text when the attempt raised (else ``None``).
    """

    number: int
    outcome: str
    started_at: datetime | None = None
    finished_at: datetime | None = None
    wall: float | None = None
    cpu: float | None = None
    max_rss: int | None = None
    waited: float = 0.0
    wait_kind: str | None = None
    queued: float = 0.0
    exitcode: int | None = None
    signal: str | None = None
    error: str | None = None
    traceback: str | None = None

    def to_record(self) -> dict[str, Any]:
        return dict(vars(self))

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Attempt:
        if rec.keys() == _ATTEMPT_FIELDS:
            # A record of this version has every field: a 20,000-step run's report builds its
            # attempts in a third of the time ``__init__`` takes (issue 17).
            attempt = object.__new__(cls)
            attempt.__dict__.update(rec)
            return attempt
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in rec.items() if k in known})  # a newer version may record more


_ATTEMPT_FIELDS = frozenset(Attempt.__dataclass_fields__)


@dataclass
class ItemState:
    """One item of a ``for_each`` step, as last checkpointed (API.md §12).

    ``status`` uses the step statuses (an item is PENDING, WAITING for its
    backoff, RUNNING, SUCCEEDED, SKIPPED, FAILED or CANCELLED); ``history``
    has one :class:`Attempt` per attempt of this item.
    """

    key: str
    status: StepStatus = StepStatus.PENDING
    attempts: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None
    history: list[Attempt] = field(default_factory=list)

    def to_record(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "status": self.status.value,
            "attempts": self.attempts,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "error": self.error,
            "history": [a.to_record() for a in self.history],
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> ItemState:
        return cls(
            key=rec["key"],
            status=StepStatus(rec["status"]),
            attempts=rec.get("attempts", 0),
            started_at=rec.get("started_at"),
            finished_at=rec.get("finished_at"),
            error=rec.get("error"),
            history=[Attempt.from_record(a) for a in rec.get("history") or ()],
        )


@dataclass
class StepState:
    """One step of one instance, as last checkpointed; ``history`` has one :class:`Attempt` per attempt.

    For a ``for_each`` step, ``items`` maps each item's key to its
    :class:`ItemState` (in the order of the collection), and the ``items_*``
    counts summarise them; an ordinary step has ``items = None``. A
    ``for_each`` step whose collection is not computed yet has ``items = {}``.
    """

    status: StepStatus = StepStatus.PENDING
    attempts: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None
    wait_until: datetime | None = None
    history: list[Attempt] = field(default_factory=list)
    items: dict[str, ItemState] | None = None

    @property
    def items_total(self) -> int:
        """How many items the collection has (0 for an ordinary step)."""
        return len(self.items or ())

    @property
    def items_done(self) -> int:
        """Items that succeeded or were skipped."""
        return self._count(ITEM_DONE)

    @property
    def items_failed(self) -> int:
        """Items that failed for good (or were cancelled)."""
        return self._count(_ITEM_FAILED)

    @property
    def items_running(self) -> int:
        """Items with an attempt in a worker now."""
        return self._count(_ITEM_RUNNING)

    def _count(self, statuses: frozenset[StepStatus]) -> int:
        return sum(item.status in statuses for item in (self.items or {}).values())

    def to_record(self) -> dict[str, Any]:
        return {
            "status": self.status.value,
            "attempts": self.attempts,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "error": self.error,
            "wait_until": self.wait_until,
            "history": [a.to_record() for a in self.history],
            "items": None if self.items is None else [i.to_record() for i in self.items.values()],
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> StepState:
        items = rec.get("items")
        if items is None and rec.keys() == _STEP_FIELDS:  # as Attempt.from_record, for a 20,000-step run
            state = object.__new__(cls)
            state.__dict__.update(rec)
            state.status = StepStatus(rec["status"])
            state.history = [Attempt.from_record(a) for a in rec["history"] or ()]
            return state
        return cls(
            status=StepStatus(rec["status"]),
            attempts=rec.get("attempts", 0),
            started_at=rec.get("started_at"),
            finished_at=rec.get("finished_at"),
            error=rec.get("error"),
            wait_until=rec.get("wait_until"),
            history=[Attempt.from_record(a) for a in rec.get("history") or ()],
            items=None if items is None else {r["key"]: ItemState.from_record(r) for r in items},
        )


_STEP_FIELDS = frozenset(StepState.__dataclass_fields__)
ITEM_DONE = frozenset({StepStatus.SUCCEEDED, StepStatus.SKIPPED})  # an item that needs no other attempt
_ITEM_RUNNING = frozenset({StepStatus.RUNNING})
_ITEM_FAILED = frozenset({StepStatus.FAILED, StepStatus.CANCELLED})


@dataclass
class WorkflowState(Generic[D]):
    """One instance as last checkpointed: statuses, data, error and times."""

    instance_id: str
    workflow_id: str
    status: WorkflowStatus
    data: D
    step_states: dict[str, StepState] = field(default_factory=dict)
    error: str | None = None
    failed_step: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    context: dict[str, Any] = field(default_factory=dict)
    owner: dict[str, Any] | None = None
