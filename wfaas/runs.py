"""What the scheduler tracks: a compiled definition, runs, their steps, attempts in flight.

Plain records and the closed sets of values they hold. Nothing here acts:
the scheduler (``scheduler.py``) is the only writer of these objects, and
the pure modules beside it (``rundata.py``, ``verdicts.py``, ``commits.py``)
read them to decide.
"""

from __future__ import annotations

import collections
import concurrent.futures
import enum
import functools
import hashlib
import itertools
import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from . import data as data_codec
from . import wire
from .bodies import BodyEncoder
from .capture import AttemptLog
from .definition import NO_RETRY, RetryPolicy, StepDefinition, WorkflowDefinition, fingerprint
from .errors import WorkflowError
from .pool import Slot
from .readiness import Gate
from .rundata import RunData, Snapshot
from .states import StepStatus, WorkflowStatus
from .steps import WorkflowContext

if TYPE_CHECKING:
    from .items import ItemTable

_ids = itertools.count(1)


class Stopping(enum.Enum):
    """Why a run dispatches no more steps: it failed, or it is being cancelled."""

    FAIL = "fail"
    CANCEL = "cancel"


class Hook(enum.Enum):
    """Which hook of a step is queued or running (the step ends after it)."""

    SUCCESS = "success"
    FAILURE = "failure"


class KillReason(enum.Enum):
    """Why a worker's process tree is being stopped."""

    TIMEOUT = "timeout"
    MEMORY = "memory"
    CANCEL = "cancel"
    CRASH = "crash"  # it died on its own: what it started is stopped before a retry
    UNQUEUED = "unqueued"  # queued in a worker (dispatch.py) for a run that stopped meanwhile: never started
    RETIRED = "retired"  # sent to a worker that then said it retires (wire.Retire): never read, never started


class WaitKind(enum.Enum):
    """What a WAITING step waits for (``Attempt.wait_kind`` holds the value)."""

    DELAY = "delay"
    SCHEDULED = "scheduled"
    BACKOFF = "backoff"


class Compiled:
    """A validated definition as the scheduler walks it: indices, edges, encoded bodies."""

    def __init__(self, definition: WorkflowDefinition, bodies: dict[int, bytes]) -> None:
        """``bodies``: each distinct step body's encoding, by ``id(body)`` (see ``encode_bodies``)."""
        self.definition = definition
        self.token = f"{definition.id}#{next(_ids)}"
        self.steps: list[StepDefinition] = list(definition.steps)
        self.index = {s.id: i for i, s in enumerate(self.steps)}
        self.dependents: list[list[tuple[int, bool]]] = [[] for _ in self.steps]
        for i, s in enumerate(self.steps):
            for dep in dict.fromkeys(s.dependencies):
                self.dependents[self.index[dep]].append((i, False))
            for dep in dict.fromkeys(s.any_dependencies):
                if dep not in s.dependencies:
                    self.dependents[self.index[dep]].append((i, True))
        self.n_all = [len(set(s.dependencies)) for s in self.steps]
        self.n_any = [len(set(s.any_dependencies) - set(s.dependencies)) for s in self.steps]
        self.retry: list[RetryPolicy] = [s.retry or definition.default_retry or NO_RETRY for s in self.steps]
        self.timeout = [s.timeout if s.timeout is not None else definition.default_timeout for s in self.steps]
        self.memory_limit = [s.memory_limit or definition.default_memory_limit for s in self.steps]
        # One key per distinct body: a 10,000-step chain of one function sends it to a worker once.
        self.body_keys = [f"{self.token}/{id(s.body)}" for s in self.steps]
        self.body_blobs = [bodies[id(s.body)] for s in self.steps]
        self.fingerprint = fingerprint(definition)


def encode_bodies(definition: WorkflowDefinition) -> tuple[dict[int, bytes], list[str]]:
    """Each distinct step body encoded once; and a problem, naming the step, for each that cannot travel."""
    blobs: dict[int, bytes] = {}
    problems = []
    encoder = BodyEncoder()
    for s in definition.steps:
        if not isinstance(s, StepDefinition) or id(s.body) in blobs:
            continue  # validate() reports what is not a StepDefinition
        try:
            blobs[id(s.body)] = encoder.encode(s.body)
        except Exception as exc:  # noqa: BLE001 - every failure is listed with its step
            problems.append(
                f"step {s.id!r}: its body cannot be sent to a worker process ({type(exc).__name__}: {exc}); "
                "define it at module level, or keep unpicklable things out of its closure"
            )
    return blobs, problems


_TERMINAL = frozenset(s for s in WorkflowStatus if s.is_terminal)
# A step whose status is one of these no longer holds its run open.
DONE = frozenset({StepStatus.SUCCEEDED, StepStatus.SKIPPED, StepStatus.FAILED})


@dataclass(eq=False)
class StepRun:
    """One step of one run, as the scheduler tracks it."""

    index: int
    sid: str
    gate: Gate
    run: Run
    status: StepStatus = StepStatus.PENDING
    attempts: int = 0
    budget_start: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    wait_until: datetime | None = None
    error: str | None = None
    usage: dict[str, Any] | None = None  # the last finished attempt's figures
    history: list[dict[str, Any]] = field(default_factory=list)  # one Attempt record per finished attempt
    waited_from: float = 0.0  # monotonic: when its current wait (delay, schedule, backoff) began
    wait_kind: WaitKind | None = None
    enqueued: float = 0.0  # monotonic: when it joined the ready queue
    timer: int = 0  # the live timer's sequence number; others are stale
    queued: int = 0  # the live ready-queue entry's token; others are stale
    final_error: WorkflowError | None = None
    ready_at: float = 0.0  # monotonic: gate opened + delay
    not_before: float | None = None  # monotonic: scheduled_at
    snapshot: Snapshot | None = None  # the data it will start from
    hook: Hook | None = None
    # for_each (items.py): an item is a StepRun of its own, with its step's index and id, and these set
    item_key: str | None = None
    item_blob: bytes | None = None  # the item, encoded
    parent: StepRun | None = None  # the for_each step it belongs to
    position: int = 0  # its place in the collection
    items: ItemTable | None = None  # of a for_each step: its items, once computed (or restored)

    @property
    def table(self) -> ItemTable:
        """Of an item: the item table of its for_each step."""
        assert self.parent is not None and self.parent.items is not None, f"{self.label} is not an item"
        return self.parent.items

    @property
    def label(self) -> str:
        """``step`` or, for an item, ``step[key]``: who wrote a field, in merges and messages."""
        return self.sid if self.item_key is None else f"{self.sid}[{self.item_key}]"

    @property
    def done(self) -> bool:
        """Succeeded, skipped or failed (a failure that stops the run stops it anyway)."""
        return self.status in DONE


_task_ids: itertools.count[int] = itertools.count(1)


@dataclass(eq=False)
class Task:
    """One attempt (or one on_success / on_failure hook) in flight in a worker slot."""

    run: Run
    step: StepRun
    slot: Slot
    attempt: int
    snapshot: Snapshot
    started: float
    hook: Hook | None = None
    kill_reason: KillReason | None = None
    timer: int = 0
    pid: int | None = None
    waited: float = 0.0  # before it: delay / schedule / backoff (of wait_kind)
    wait_kind: WaitKind | None = None
    queued: float = 0.0  # then: waiting for a free worker
    token: int = 0  # its ready-queue token: it goes back to the queue with it if its worker never reads it
    # Names it in the messages to and from its worker: a counter, as an object's id is reused by later tasks.
    id: int = field(default_factory=lambda: next(_task_ids))

    @classmethod
    def start(cls, run: Run, step: StepRun, slot: Slot, now: float, token: int) -> Task:
        """The next attempt (or the hook) of ``step``, taken from the ready queue with ``token`` and sent to
        ``slot`` at monotonic ``now``."""
        assert step.snapshot is not None
        attempt = step.attempts if step.hook else step.attempts + 1
        task = cls(run, step, slot, attempt, step.snapshot, now, hook=step.hook, pid=slot.pid, token=token)
        step.snapshot = None  # the task holds it now; kept on the step, every finished step's data stayed alive
        if step.wait_kind is not None:
            task.waited, task.wait_kind = step.enqueued - step.waited_from, step.wait_kind
        task.queued = now - step.enqueued
        return task


class ReadyQueue(collections.deque[tuple["Run", StepRun, int]]):
    """Steps waiting for a free worker, oldest first (hooks first of all), with the snapshot they will start from.

    Each entry holds a token; only the entry whose token the step holds in
    ``StepRun.queued`` is live (a step parked or queued again leaves a stale
    one behind, dropped when reached). Tokens are the scheduler's sequence
    numbers, so ``take`` can stop at the entries newer than the last commit.
    """

    def push(self, run: Run, step: StepRun, token: int, *, first: bool = False) -> None:
        step.snapshot = run.snapshot()
        step.queued = token
        (self.appendleft if first else self.append)((run, step, token))

    def push_back(self, run: Run, step: StepRun, token: int) -> None:
        """Put back, at the head, a taken step that never started (its snapshot kept, ``dispatch.py``)."""
        step.queued = token
        self.appendleft((run, step, token))

    def take(self, slots: list[Slot], up_to: int) -> list[tuple[Run, StepRun, Slot, int]]:
        """Live entries up to token ``up_to``, one per slot, with their tokens; a stopping run's only if hooks."""
        taken = []
        while slots and self and self[0][2] <= up_to:
            run, step, token = self.popleft()
            if step.queued != token or (run.stopping is not None and not step.hook):
                continue
            step.queued = 0
            taken.append((run, step, slots.pop(), token))
        return taken


@dataclass(eq=False)
class Run:
    """One instance while this engine runs it; its data fields live in ``data`` (``rundata.RunData``)."""

    iid: str
    compiled: Compiled
    cls: type
    cls_blob: bytes
    data: RunData
    created_at: datetime
    steps: list[StepRun] = field(default_factory=list)
    status: WorkflowStatus = WorkflowStatus.PENDING
    stopping: Stopping | None = None
    done_steps: int = 0  # steps with ``StepRun.done``, kept by ``Scheduler._set_status``
    error: WorkflowError | None = None
    failed_step: str | None = None
    started_mono: float = 0.0
    dirty_steps: set[int] = field(default_factory=set)
    unsettled: set[StepRun] = field(default_factory=set)  # for_each steps whose items moved (items.py)
    extra: dict[str, Any] = field(default_factory=dict)
    waiters: list[concurrent.futures.Future[Any]] = field(default_factory=list)
    logs: dict[tuple[str, int, str], AttemptLog | None] = field(default_factory=dict)  # since the last checkpoint
    done: threading.Event = field(default_factory=threading.Event)  # set once it ended and that is committed
    grace: float | None = None
    recent_wall: float | None = None  # seconds per attempt lately, a moving average (dispatch.py)

    @property
    def workflow_id(self) -> str:
        return self.compiled.definition.id

    @functools.cached_property
    def cls_key(self) -> str:
        """Names the data class's encoding in the workers' caches: by content, so that runs of one
        class share one entry instead of adding one per run to every worker (issue 14)."""
        return hashlib.blake2b(self.cls_blob, digest_size=16).hexdigest()

    def let_go(self) -> None:
        """Drop a finished run's data (its final state is committed): the Run itself lives on in a reference
        cycle with its steps until the cyclic GC runs, which counts objects, not bytes, and may wait for
        hundreds of runs' data (issue 14)."""
        self.data = RunData({})
        for step in self.steps:
            step.snapshot = None
            step.items = None  # for_each: its items hold snapshots too

    @property
    def final(self) -> bool:
        """It ended (runs enter the scheduler RUNNING; only ``_maybe_finish`` ends them)."""
        return self.status in _TERMINAL

    @property
    def unfinished(self) -> int:
        return len(self.steps) - self.done_steps

    def snapshot(self) -> Snapshot:
        return self.data.snapshot(self.iid)

    def context(self, step: StepRun) -> WorkflowContext[Any]:
        """What ``run_if`` sees: a live data object at the current version, and the shared values."""
        values = dict(self.data.dict_value(data_codec.CONTEXT_FIELD))
        data = self.data.build(self.cls, f"run {self.iid}")
        return WorkflowContext(
            data, instance_id=self.iid, workflow_id=self.workflow_id, step_id=step.sid, attempt=step.attempts + 1,
            values=values,
        )  # fmt: skip

    def keep_log(self, task: Task, lines: list[Any], cut: int, kept: int) -> None:
        """What an attempt (or hook) printed and logged, for the next checkpoint; the ``kept`` latest attempts'."""
        step = task.step
        item = f"[{step.item_key}]" if step.item_key is not None else ""  # each item's attempts have their own
        hook = f"on_{task.hook.value}" if task.hook else ""
        log = AttemptLog(step.sid, task.attempt, lines, cut, hook, step.item_key)
        self.logs[(step.sid, task.attempt, item + hook)] = log
        if not task.hook and task.attempt > kept:
            # Logs are kept for the attempts the history keeps: a step retried forever stays bounded.
            self.logs[(step.sid, task.attempt - kept, item)] = None


def run_message(task: Task, spin: float = 0.0, claim: bool = False, tail: bool = False) -> wire.RunStep:
    """The message that starts ``task`` in its slot: only what the worker does not hold yet travels."""
    run, step, slot, snap, hook = task.run, task.step, task.slot, task.snapshot, task.hook
    key = run.compiled.body_keys[step.index]
    body_blob = None if key in slot.bodies else run.compiled.body_blobs[step.index]
    slot.bodies.add(key)
    cls_blob = None if run.cls_key in slot.classes else run.cls_blob
    slot.classes.add(run.cls_key)
    snap_blob = None if slot.snapshot == snap.key else snap.blob
    slot.snapshot = snap.key
    # pickle drops __cause__ (the step's own exception): send it beside the error.
    error = step.final_error
    error_blob = data_codec.encode_value((error, error.__cause__)) if hook is Hook.FAILURE and error else None
    return wire.RunStep(
        task.id, key, body_blob, run.cls_key, cls_blob, snap.key, snap_blob,
        run.iid, run.workflow_id, step.sid, task.attempt, hook.value if hook else None, error_blob,
        step.item_blob, step.item_key, spin, claim, tail,
    )  # fmt: skip


def memory_limit_of(task: Task) -> int | None:
    """The task's memory limit in bytes (hooks have none), for the watchdog."""
    return None if task.hook else task.run.compiled.memory_limit[task.step.index]


@dataclass
class Finished:
    """What a finished run leaves behind for waiters in this process."""

    status: WorkflowStatus
    error: WorkflowError | None
    done: threading.Event


_SET = threading.Event()  # the handle of a run that ended before anyone waited
_SET.set()


class Outcomes(dict[str, Finished]):
    """How this engine's runs stand, for waiters on any thread, by instance id.

    A handle per running run, updated in place when the run ends (waiters
    hold it), and the errors of the last ``kept`` runs that failed or were
    cancelled; a completed run is the store's to tell.
    """

    def __init__(self, kept: int) -> None:
        super().__init__()
        self.kept = kept
        self._errors: collections.deque[str] = collections.deque()

    def started(self, run: Run) -> None:
        self[run.iid] = Finished(WorkflowStatus.RUNNING, None, run.done)

    def ended(self, run: Run, running: dict[str, Run]) -> None:
        """``run``'s end is committed (``running``: the runs still going, a resumed one among them)."""
        finished = self.pop(run.iid, None)
        if finished is not None:  # waiting callers hold this one: tell them through it
            finished.status, finished.error = run.status, run.error
        if run.status is WorkflowStatus.COMPLETED:
            return
        self[run.iid] = Finished(run.status, run.error, _SET)
        self._errors.append(run.iid)
        if len(self._errors) > self.kept:
            old = self._errors.popleft()
            if old not in running:  # not resumed meanwhile
                self.pop(old, None)
