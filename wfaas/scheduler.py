"""The scheduler: one thread that owns every run's state and walks the DAGs.

How a step travels::

    WorkflowDefinition --register--> Compiled (index graph, step bodies encoded once)
    start/resume --> Run: each step has a Gate (readiness.py)
    dependency finished --> Gate opens --> decide: RUN / SKIP / WAIT(timer)
    RUN --> ready queue (with the data snapshot of that moment) --> idle Slot
        --pipe--> worker runs the body on its own copy of the data
        <--pipe-- result: the fields it changed
    result --> merge (conflict check) --> step SUCCEEDED --> dependents' Gates
    failure --> retry after backoff (timer) | fail for good (FAIL_WORKFLOW stops the run)

Each turn of the loop: block on pipes + process sentinels + wake-up pipe with a
timeout set to the next timer; handle what arrived and what expired; commit
one checkpoint holding everything that changed (``store.write``); then publish
the events, release waiters, and only then send new steps to workers — so no
step ever starts before the results it depends on are committed.

Only this thread writes run state. Other threads talk to it through
``submit(command)``; killing a process tree happens on a helper thread that
reports back the same way.
"""

from __future__ import annotations

import collections
import concurrent.futures
import heapq
import itertools
import logging
import math
import os
import pickle
import select
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from . import _threads, wire
from . import data as data_codec
from . import events as ev
from .capture import AttemptLog
from .clock import Clock
from .definition import NO_RETRY, FailureAction, RetryPolicy, StepDefinition, WorkflowDefinition, fingerprint
from .errors import (
    Cancelled,
    DataConflict,
    InvalidStateTransition,
    NotFound,
    StepFailed,
    StepTimeout,
    StoreError,
    WorkerCrashed,
    WorkflowError,
)
from .pool import Exit, Pool, Slot
from .readiness import Decision, Gate, Outcome, decide
from .states import StepStatus, WorkflowStatus, check_step_transition, check_workflow_transition
from .steps import StepExecutor, WorkflowContext, overrides
from .store import TOMBSTONE, Checkpoint, StateStore
from .watchdog import MemoryWatchdog

log = logging.getLogger("wfaas")
S, W = StepStatus, WorkflowStatus
_ids = itertools.count(1)


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
    for s in definition.steps:
        if not isinstance(s, StepDefinition) or id(s.body) in blobs:
            continue  # validate() reports what is not a StepDefinition
        try:
            blobs[id(s.body)] = data_codec.dill_dumps(s.body)
        except Exception as exc:  # noqa: BLE001 - every failure is listed with its step
            problems.append(
                f"step {s.id!r}: its body cannot be sent to a worker process ({type(exc).__name__}: {exc}); "
                "define it at module level, or keep unpicklable things out of its closure"
            )
    return blobs, problems


@dataclass(eq=False)
class Snapshot:
    """The data of a run at one version; encoded once, shared by every step that starts from it."""

    key: tuple[str, int]
    fields: dict[str, bytes]
    _blob: bytes | None = None

    @property
    def version(self) -> int:
        return self.key[1]

    @property
    def blob(self) -> bytes:
        if self._blob is None:
            self._blob = pickle.dumps(self.fields, protocol=5)
        return self._blob


@dataclass(eq=False)
class StepRun:
    """One step of one run, as the scheduler tracks it."""

    index: int
    sid: str
    gate: Gate
    status: StepStatus = S.PENDING
    attempts: int = 0
    budget_start: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    wait_until: datetime | None = None
    error: str | None = None
    usage: dict[str, Any] | None = None  # the last finished attempt's figures
    history: list[dict[str, Any]] = field(default_factory=list)  # one Attempt record per finished attempt
    waited_from: float = 0.0  # monotonic: when its current wait (delay, schedule, backoff) began
    wait_kind: str | None = None  # "delay", "scheduled", "backoff" or None (no wait)
    enqueued: float = 0.0  # monotonic: when it joined the ready queue
    timer: int = 0  # the live timer's sequence number; others are stale
    queued: int = 0  # the live ready-queue entry's token; others are stale
    final_error: WorkflowError | None = None
    counted: bool = False  # already subtracted from run.unfinished
    run_ref: Run | None = None
    ready_at: float = 0.0  # monotonic: gate opened + delay
    not_before: float | None = None  # monotonic: scheduled_at
    snapshot: Snapshot | None = None  # the data it will start from
    hook: str | None = None  # "success" / "failure": that hook is queued or running; the step ends after it


@dataclass(eq=False)
class Task:
    """One attempt (or one on_success / on_failure hook) in flight in a worker slot."""

    run: Run
    step: StepRun
    slot: Slot
    attempt: int
    snapshot: Snapshot
    started: float
    hook: str | None = None
    kill_reason: str | None = None
    timer: int = 0
    pid: int | None = None
    waited: float = 0.0  # before it: delay / schedule / backoff (of wait_kind)
    wait_kind: str | None = None
    queued: float = 0.0  # then: waiting for a free worker


@dataclass(eq=False)
class Run:
    """One instance while this engine runs it."""

    iid: str
    compiled: Compiled
    cls: type
    cls_blob: bytes
    fields: dict[str, bytes]
    created_at: datetime
    steps: list[StepRun] = field(default_factory=list)
    status: WorkflowStatus = W.PENDING
    version: int = 0
    field_writes: dict[str, tuple[int, str]] = field(default_factory=dict)
    key_writes: dict[tuple[str, Any], tuple[int, str]] = field(default_factory=dict)
    snap: Snapshot | None = None
    live: tuple[int, Any] | None = None
    # Dict fields merged key by key stay decoded here and are encoded once per
    # turn (stale_fields), not once per step: a wide fan-out writing one key
    # each would otherwise cost O(keys) per step.
    live_dicts: dict[str, dict[Any, Any]] = field(default_factory=dict)
    stale_fields: set[str] = field(default_factory=set)
    # Keys changed since the last checkpoint, written key by key: O(keys changed), not O(dict).
    deltas: dict[str, dict[bytes, bytes]] = field(default_factory=dict)
    field_key_marks: dict[str, tuple[int, str]] = field(default_factory=dict)  # last key-wise write per field
    stopping: str | None = None  # "fail" | "cancel"
    inflight: int = 0
    unfinished: int = 0
    error: WorkflowError | None = None
    failed_step: str | None = None
    started_mono: float = 0.0
    final: bool = False
    dirty_steps: set[int] = field(default_factory=set)
    dirty_fields: set[str] = field(default_factory=set)
    extra: dict[str, Any] = field(default_factory=dict)
    waiters: list[concurrent.futures.Future[Any]] = field(default_factory=list)
    logs: dict[tuple[str, int, str], AttemptLog | None] = field(default_factory=dict)  # since the last checkpoint
    done: threading.Event = field(default_factory=threading.Event)
    grace: float | None = None

    @property
    def workflow_id(self) -> str:
        return self.compiled.definition.id

    def dict_value(self, name: str) -> Any:
        """The decoded value of a field, cached when it is a dict (None if the field is absent)."""
        live = self.live_dicts.get(name)
        if live is not None:
            return live
        blob = self.fields.get(name)
        if blob is None:
            value: Any = {} if name == data_codec.CONTEXT_FIELD else None
        else:
            value = pickle.loads(blob)
        if isinstance(value, dict):
            self.live_dicts[name] = value
        return value

    def field_bytes(self, name: str) -> bytes | None:
        self.sync()
        return self.fields.get(name)

    def sync(self) -> None:
        """Encode the dict fields changed since the last call."""
        for name in self.stale_fields:
            self.fields[name] = data_codec.encode_value(self.live_dicts[name])
        self.stale_fields.clear()

    def snapshot(self) -> Snapshot:
        self.sync()
        if self.snap is None or self.snap.version != self.version:
            self.snap = Snapshot((self.iid, self.version), dict(self.fields))
        return self.snap

    def data(self) -> Any:
        """A live data object at the current version (for run_if); built at most once per version."""
        self.sync()
        if self.live is None or self.live[0] != self.version:
            self.live = (self.version, data_codec.build(self.cls, self.fields))
        return self.live[1]


@dataclass(eq=False)
class Batch:
    """One turn's checkpoint in flight, and what may happen only once it is committed."""

    mark: int  # ready-queue entries up to this sequence number depend on nothing newer
    runs: list[Run]
    events: list[Any]
    finished: list[Run]
    resolve: list[tuple[concurrent.futures.Future[Any], Any]]
    committed: bool = False
    error: Exception | None = None

    def acknowledge(self, wake: Callable[[], None]) -> Callable[[Exception | None], None]:
        """The callback a store calls (on any thread) once the checkpoint is committed or failed."""

        scheduler_thread = threading.get_ident()

        def done(error: Exception | None) -> None:
            self.error = error
            self.committed = True
            if threading.get_ident() != scheduler_thread:
                wake()  # acknowledged inline (in-memory stores) needs no wake-up

        return done


class _Poller:
    """Blocks on many descriptors at once, with one ``poll`` object kept across turns.

    ``multiprocessing.connection.wait`` builds and fills a new selector on
    every call; at two or three turns a step that was a measurable share of
    the scheduler's time per step. Here only what changed between turns is
    (un)registered.
    """

    def __init__(self) -> None:
        self._poll = select.poll()
        self._fds: set[int] = set()

    def wait(self, objects: list[Any], timeout: float | None) -> list[Any]:
        """The objects (descriptors, or anything with ``fileno()``) ready to read, closed, or failed."""
        by_fd = {obj if isinstance(obj, int) else obj.fileno(): obj for obj in objects}
        for fd in self._fds - by_fd.keys():
            self._poll.unregister(fd)
        for fd in by_fd.keys() - self._fds:
            self._poll.register(fd, select.POLLIN)
        self._fds = set(by_fd)
        ms = None if timeout is None else max(0, math.ceil(timeout * 1000))
        return [by_fd[fd] for fd, _ in self._poll.poll(ms) if fd in by_fd]


class _RemoteTraceback(Exception):
    """The worker's traceback, attached as ``__cause__`` of the step's own exception."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


@dataclass
class Finished:
    """What a finished run leaves behind for waiters in this process."""

    status: WorkflowStatus
    error: WorkflowError | None
    done: threading.Event


class Scheduler:
    """Owns every run of one engine; see the module docstring for the loop."""

    def __init__(
        self,
        pool: Pool,
        store: StateStore,
        bus: ev.EventBus,
        clock: Clock,
        grace: float,
        owner: dict[str, Any],
    ) -> None:
        self.pool = pool
        self.store = store
        self.bus = bus
        self.clock = clock
        self.grace = grace
        self.owner = owner
        self.runs: dict[str, Run] = {}
        self.outcomes: dict[str, Finished] = {}
        self._ready: collections.deque[tuple[Run, StepRun, int]] = collections.deque()
        self._timers: list[tuple[float, int, str, Any]] = []
        self._seq = itertools.count(1)
        self._commands: collections.deque[
            tuple[Callable[..., Any], tuple[Any, ...], concurrent.futures.Future[Any] | None]
        ] = collections.deque()
        self._wake_r, self._wake_w = os.pipe()
        self._poller = _Poller()
        self._again = False  # another turn is due at once
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._wake_lock = threading.Lock()
        self._dirty: dict[str, Run] = {}
        self._events: list[Any] = []
        self._finished: list[Run] = []
        self._resolve: list[tuple[concurrent.futures.Future[Any], Any]] = []
        self._stopped = False
        self._committed = 0  # ready-queue entries up to this sequence number are committed
        self._pending: collections.deque[Batch] = collections.deque()  # checkpoints not yet acknowledged
        self._inflight = 0
        self._thread = threading.Thread(target=self._main, name="wfaas-scheduler", daemon=True)
        self._watchdog = MemoryWatchdog(pool, _memory_limit_of, self._over_memory)
        clock.add_listener(self.wake)

    # -- talking to the scheduler from other threads ---------------------------

    def start(self) -> None:
        with _threads.signals_blocked():
            self._thread.start()
        self._watchdog.start()

    def wake(self) -> None:
        # Called from any thread (kill threads, commit acknowledgements, a virtual clock),
        # also after stop(): never write to the descriptor once closed, its number may be reused.
        with self._wake_lock:
            if self._wake_w < 0:
                return
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:
                pass  # the pipe is full, so a wake-up is pending anyway

    def submit(self, fn: Callable[..., Any], *args: Any, reply: bool = True) -> concurrent.futures.Future[Any] | None:
        """Run ``fn(*args)`` on the scheduler thread; its result (or error) lands in the returned future."""
        if self._stopped:
            raise RuntimeError("the engine is closed")
        future: concurrent.futures.Future[Any] | None = concurrent.futures.Future() if reply else None
        self._commands.append((fn, args, future))
        self.wake()
        return future

    def stop(self) -> None:
        self._watchdog.stop()
        self.submit(self._stop_now, reply=False)
        self._thread.join(timeout=30)
        with self._wake_lock:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_w = -1

    def _stop_now(self) -> None:
        self._stopped = True

    # -- the loop --------------------------------------------------------------

    def _main(self) -> None:
        try:
            while not self._stopped:
                self._wait_and_handle()
                self._turn()
        except BaseException as exc:  # a dead scheduler must not leave waiters hanging
            log.critical("wfaas scheduler thread crashed; failing every run it owned", exc_info=True)
            self._abandon(exc)

    def _wait_and_handle(self) -> None:
        deadline = self._timers[0][0] if self._timers else None
        idle = self._inflight == 0 and not self._ready and not self._commands and not self._pending
        if deadline is not None and idle:
            self.clock.idle(deadline)
        timeout = 0.0 if self._commands or self._again else self.clock.wait_timeout(deadline)
        waitables = self.pool.waitables()
        self._again = False
        ready = self._poller.wait([self._wake_r, *waitables], timeout)
        for obj in ready:
            if obj == self._wake_r:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
                continue
            kind, slot = waitables[obj]
            if kind == "result" and slot.task is not None:
                message = self.pool.receive(slot)
                if message is not None:
                    self._on_message(slot, message)
            elif kind == "exit" and not slot.dying:
                self._on_worker_exit(slot)
        while self._commands:
            fn, args, future = self._commands.popleft()
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to the caller through its future
                if future is not None:
                    future.set_exception(exc)
                else:
                    log.exception("wfaas scheduler command %s failed", getattr(fn, "__name__", fn))
            else:
                if future is not None:
                    self._resolve.append((future, result))

    def _turn(self) -> None:
        # Steps that were ready before this turn depend on nothing uncommitted: send them
        # first, so workers are busy while this turn's checkpoint is written. Steps made
        # ready by this turn's results wait for the commit.
        self._send(self._dispatch(up_to=self._committed))
        self._fire_timers(self.clock.monotonic())
        self._complete_batches()
        self._flush()
        self._complete_batches()
        self._send(self._dispatch(up_to=self._committed))
        if self._dirty:
            self._again = True  # what the last dispatch changed (steps now RUNNING) is checkpointed next turn

    def _send(self, sends: list[tuple[Slot, bytes]]) -> None:
        for slot, message in sends:
            try:
                self.pool.send(slot, message)
            except OSError:
                pass  # the worker died meanwhile; its sentinel reports the crash next turn

    # -- timers ----------------------------------------------------------------

    def _timer(self, when: float, kind: str, target: Any) -> int:
        seq = next(self._seq)
        heapq.heappush(self._timers, (when, seq, kind, target))
        return seq

    def _fire_timers(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            _, seq, kind, target = heapq.heappop(self._timers)
            if target.timer != seq:
                continue  # cancelled or superseded
            target.timer = 0
            if kind == "timeout":
                self._on_timeout(target)
            elif kind == "wait":
                self._decide(target.run_ref, target, now)
            elif kind == "retry" and target.run_ref.stopping is None and target.status is S.WAITING:
                self._enqueue(target.run_ref, target, now)

    # -- starting runs ---------------------------------------------------------

    def start_run(self, run: Run, resumed_steps: dict[str, dict[str, Any]] | None, reruns: set[str]) -> str:
        """Take a new (or resumed) run in and open the gates of steps with nothing to wait for."""
        if run.iid in self.runs:
            raise InvalidStateTransition(
                f"instance {run.iid}", self.runs[run.iid].status, W.RUNNING, "it is already running in this engine"
            )
        compiled = run.compiled
        now = self.clock.now()
        run.started_mono = self.clock.monotonic()
        steps = []
        for i, s in enumerate(compiled.steps):
            steps.append(StepRun(i, s.id, Gate(compiled.n_all[i], compiled.n_any[i]), run_ref=run))
        run.steps = steps
        done: list[StepRun] = []
        if resumed_steps is not None:
            for step in steps:
                rec = resumed_steps.get(step.sid)
                if rec is None:
                    continue
                step.attempts = step.budget_start = rec.get("attempts", 0)
                step.started_at, step.finished_at = rec.get("started_at"), rec.get("finished_at")
                step.history = list(rec.get("history") or ())
                status = S(rec["status"])
                if status in (S.SUCCEEDED, S.SKIPPED) and step.sid not in reruns:
                    step.status, step.error = status, rec.get("error")
                    done.append(step)
        run.unfinished = len(steps) - len(done)
        for step in done:
            step.counted = True
        old_status = run.status
        check_workflow_transition(run.iid, old_status, W.RUNNING)
        run.status = W.RUNNING
        run.dirty_steps.update(range(len(steps)))
        self.runs[run.iid] = run
        self.outcomes[run.iid] = Finished(W.RUNNING, None, run.done)
        self._dirty[run.iid] = run
        self._event(ev.WorkflowStarted, run, now)
        mono = self.clock.monotonic()
        for step in done:
            outcome = Outcome.SUCCEEDED if step.status is S.SUCCEEDED else Outcome.SKIPPED
            for j, via_any in compiled.dependents[step.index]:
                steps[j].gate.record(outcome, via_any=via_any)
        for step in steps:
            # record() above may have opened a gate already; check() opens the rest.
            opened = step.gate.opened or step.gate.check()
            if opened and not step.counted:
                self._decide(run, step, mono)
        self._maybe_finish(run)
        return run.iid

    # -- readiness -------------------------------------------------------------

    def _decide(self, run: Run, step: StepRun, now: float) -> None:
        if run.stopping is not None or step.status.is_final:
            return
        sdef = run.compiled.steps[step.index]
        if step.status is not S.WAITING:
            step.ready_at = now + sdef.delay
            step.not_before = None
            if sdef.schedule is not None:
                step.not_before = now + (sdef.schedule - self.clock.now()).total_seconds()
            step.waited_from, step.wait_kind = now, None
        condition = None
        if sdef.condition is not None:
            cond = sdef.condition

            def condition() -> bool:
                return bool(cond(self._context(run, step)))

        try:
            decision, due = decide(condition, step.ready_at, now, step.not_before)
        except Exception as exc:  # noqa: BLE001 - a raising run_if fails the step, with its cause
            error = StepFailed(f"run_if raised {type(exc).__name__}: {exc}", **self._where(run, step))
            error.__cause__ = exc
            self._set_status(run, step, S.RUNNING)
            self._fail_for_good(run, step, error)
            return
        if decision is Decision.WAIT:
            self._set_status(run, step, S.WAITING)
            step.wait_until = self.clock.now() + _delta(due - now)
            step.wait_kind = "scheduled" if due == step.not_before else "delay"
            step.timer = self._timer(due, "wait", step)
        elif decision is Decision.SKIP:
            self._finish(run, step, S.SKIPPED, reason="run_if was false")
        else:
            self._enqueue(run, step, now)

    def _context(self, run: Run, step: StepRun) -> WorkflowContext[Any]:
        values = dict(run.dict_value(data_codec.CONTEXT_FIELD))
        return WorkflowContext(
            run.data(),
            instance_id=run.iid,
            workflow_id=run.workflow_id,
            step_id=step.sid,
            attempt=step.attempts + 1,
            values=values,
        )

    def _enqueue(self, run: Run, step: StepRun, now: float) -> None:
        step.enqueued = now
        step.snapshot = run.snapshot()
        step.queued = next(self._seq)
        self._ready.append((run, step, step.queued))

    # -- dispatch ----------------------------------------------------------------

    def _dispatch(self, up_to: int | None = None) -> list[tuple[Slot, bytes]]:
        """Hand ready steps to idle slots; with ``up_to``, only those queued before that sequence number."""
        if not self._ready:
            return []
        idle = [s for s in self.pool.slots if s.idle]
        sends = []
        while idle and self._ready:
            if up_to is not None and self._ready[0][2] > up_to:
                break
            run, step, token = self._ready.popleft()
            if step.queued != token or (run.stopping is not None and not step.hook):
                continue
            step.queued = 0
            slot = idle.pop()
            sends.append((slot, self._start_task(run, step, slot)))
        return sends

    def _start_task(self, run: Run, step: StepRun, slot: Slot) -> bytes:
        compiled = run.compiled
        i = step.index
        hook = step.hook
        snap = step.snapshot
        assert snap is not None
        if not hook:
            step.attempts += 1
            self._set_status(run, step, S.RUNNING)
            step.started_at = self.clock.now()
            step.finished_at = None
            self._event(ev.StepStarted, run, step.started_at, step_id=step.sid, attempt=step.attempts)
        now = self.clock.monotonic()
        task = Task(run, step, slot, step.attempts, snap, now, hook=hook, pid=slot.pid)
        if step.wait_kind is not None:
            task.waited, task.wait_kind = step.enqueued - step.waited_from, step.wait_kind
        task.queued = now - step.enqueued
        slot.task = task
        run.inflight += 1
        self._inflight += 1
        timeout = compiled.timeout[i]
        if timeout is not None and not hook:
            task.timer = self._timer(now + timeout, "timeout", task)
        key = compiled.body_keys[i]
        body_blob = None if key in slot.bodies else compiled.body_blobs[i]
        slot.bodies.add(key)
        cls_key = run.iid
        cls_blob = None if cls_key in slot.classes else run.cls_blob
        slot.classes.add(cls_key)
        snap_blob = None if slot.snapshot == snap.key else snap.blob
        slot.snapshot = snap.key
        # pickle drops __cause__ (the step's own exception): send it beside the error.
        error = step.final_error
        error_blob = data_codec.encode_value((error, error.__cause__)) if hook == "failure" and error else None
        message = wire.RunStep(
            id(task),
            key,
            body_blob,
            cls_key,
            cls_blob,
            snap.key,
            snap_blob,
            run.iid,
            run.workflow_id,
            step.sid,
            step.attempts,
            hook,
            error_blob,
        )
        return wire.dumps(message)

    # -- results ---------------------------------------------------------------

    def _release(self, task: Task) -> None:
        task.slot.task = None
        task.timer = 0
        task.run.inflight -= 1
        self._inflight -= 1

    def _on_message(self, slot: Slot, message: wire.FromWorker) -> None:
        task: Task = slot.task
        if isinstance(message, wire.Output):  # lines the step printed while it runs; its reply follows
            run, step = task.run, task.step
            self._event(
                ev.StepOutput, run, self.clock.now(), step_id=step.sid, attempt=task.attempt, lines=tuple(message.lines)
            )
            return
        if slot.dying:
            # Its step returned while being stopped (it handled SIGTERM): the result is kept,
            # and nothing is left to wait a grace period for.
            self.pool.hurry(slot)
        self._release(task)
        run, step = task.run, task.step
        usage = message.usage
        if message.logs:
            self._events.extend(message.logs)
        if message.output is not None:
            self._keep_output(task, *message.output)
        if usage.get("retire") and not slot.dying:
            log.info("replacing worker %s: %s", slot.pid, usage["retire"])
            self.pool.kill(slot, 0.0, self._killed)  # it exits by itself; this reaps it and starts the next
        if task.hook:
            self._hook_done(run, step)
            return
        if isinstance(message, wire.Done):
            outcome, changes = message.outcome, message.changes
            if outcome == wire.FAILURE:
                error: WorkflowError = StepFailed("the step returned StepResult.FAILURE", **self._where(run, step))
                self._end_attempt(task, "failed", usage, error=error)
                self._attempt_failed(run, step, error, error)
                return
            conflict = self._merge(run, step, task, changes)
            if conflict is not None:
                self._end_attempt(task, "failed", usage, error=conflict)
                self._attempt_failed(run, step, conflict, conflict)
                return
            self._end_attempt(task, "succeeded" if outcome == wire.SUCCESS else "skipped", usage)
            if outcome == wire.SUCCESS and overrides(run.compiled.steps[step.index].body, "on_success"):
                self._queue_hook(run, step, "success")  # only now is the success certain
                return
            status = S.SUCCEEDED if outcome == wire.SUCCESS else S.SKIPPED
            self._finish(run, step, status, reason="the step returned StepResult.SKIP", duration=usage["wall"])
        else:
            exc = _decode_error(message.error)
            exc.__cause__ = _RemoteTraceback(message.traceback)
            error = StepFailed(f"{type(exc).__name__}: {exc}", **self._where(run, step))
            error.__cause__ = exc
            self._end_attempt(task, "failed", usage, error=error, traceback=message.traceback or None)
            self._attempt_failed(run, step, error, exc)
        self._maybe_finish(run)

    def _end_attempt(
        self,
        task: Task,
        outcome: str,
        usage: dict[str, float] | None = None,
        exit_: Exit | None = None,
        error: WorkflowError | None = None,
        traceback: str | None = None,
    ) -> None:
        """Record how an attempt ended and what it cost (an ``Attempt`` record, see states.py)."""
        step = task.step
        # A killed worker sent nothing: its RSS as last sampled, if it was (memory limits).
        sampled = exit_.last_rss if exit_ is not None and exit_.last_rss else None
        figures: dict[str, Any] = {
            "wall": usage["wall"] if usage else self.clock.monotonic() - task.started,
            "cpu": usage.get("cpu") if usage else None,
            "max_rss": int(usage["max_rss"]) if usage and "max_rss" in usage else sampled,
            "waited": task.waited,
            "wait_kind": task.wait_kind,
            "queued": task.queued,
            "exitcode": exit_.exitcode if exit_ else None,
            "signal": exit_.signal_name if exit_ else None,
        }
        step.usage = figures
        step.history.append(
            {
                "number": task.attempt,
                "outcome": outcome,
                "started_at": step.started_at,
                "finished_at": self.clock.now(),
                **figures,
                "error": _reason(error) if error is not None else None,
                "traceback": traceback,
            }
        )
        if len(step.history) > HISTORY_KEPT:
            del step.history[0]

    def _keep_output(self, task: Task, lines: list[Any], cut: int, fresh: int = 0) -> None:
        """What an attempt (or hook) printed and logged: checkpointed with it; what was not sent live, published."""
        run, step = task.run, task.step
        part = f"on_{task.hook}" if task.hook else ""
        run.logs[(step.sid, task.attempt, part)] = AttemptLog(step.sid, task.attempt, lines, cut, part)
        if not part and task.attempt > HISTORY_KEPT:
            # Logs are kept for the attempts the history keeps: a step retried forever stays bounded.
            run.logs[(step.sid, task.attempt - HISTORY_KEPT, "")] = None
        self._dirty[run.iid] = run
        if fresh < len(lines):
            new = tuple(lines[fresh:])
            self._event(ev.StepOutput, run, self.clock.now(), step_id=step.sid, attempt=task.attempt, lines=new)

    def _queue_hook(self, run: Run, step: StepRun, hook: str) -> None:
        step.hook = hook
        step.snapshot = run.snapshot()
        step.queued = next(self._seq)
        self._ready.appendleft((run, step, step.queued))

    def _hook_done(self, run: Run, step: StepRun) -> None:
        """A hook ended (however it ended): the step takes the outcome that was decided before it."""
        hook, step.hook = step.hook, None
        if hook == "success":
            self._finish(run, step, S.SUCCEEDED, duration=(step.usage or {}).get("wall", 0.0))
        else:
            assert step.final_error is not None
            self._fail_for_good(run, step, step.final_error)
        self._maybe_finish(run)

    def _where(self, run: Run, step: StepRun) -> dict[str, Any]:
        return {"instance_id": run.iid, "workflow_id": run.workflow_id, "step_id": step.sid, "attempt": step.attempts}

    def _merge(
        self, run: Run, step: StepRun, task: Task, changes: dict[str, data_codec.FieldChange]
    ) -> DataConflict | None:
        """Apply the fields a step changed; a concurrent different write to one field (or key) is a conflict.

        Everything is checked before anything is applied, so a conflicting result changes nothing.
        """
        if not changes:
            return None
        base = task.snapshot.version

        def concurrent(mark: tuple[int, str] | None) -> bool:
            return mark is not None and mark[0] > base and mark[1] != step.sid

        for name, change in changes.items():
            whole = run.field_writes.get(name)
            cur = run.dict_value(name) if change.set_keys is not None else None
            if not isinstance(cur, dict):
                # A whole write conflicts with any concurrent write to the field, key-wise ones included.
                other = whole if concurrent(whole) else run.field_key_marks.get(name)
                if concurrent(other) and not _same_encoded(run.field_bytes(name), change.blob):
                    return self._conflict(run, step, name, other[1] if other else "?")
                continue
            assert change.set_keys is not None
            for key in (*change.set_keys, *(change.deleted_keys or ())):
                mark = run.key_writes.get((name, key)) or (whole if concurrent(whole) else None)
                if concurrent(mark):
                    old = data_codec.encode_value(cur[key]) if key in cur else None
                    if not _same_encoded(change.set_keys.get(key), old):
                        return self._conflict(run, step, f"{name}[{key!r}]", mark[1] if mark else "?")
        run.version += 1
        mark = (run.version, step.sid)
        for name, change in changes.items():
            cur = run.dict_value(name) if change.set_keys is not None else None
            if isinstance(cur, dict) and change.set_keys is not None:
                deltas = run.deltas.setdefault(name, {})
                for key, blob in change.set_keys.items():
                    cur[key] = pickle.loads(blob)
                    run.key_writes[(name, key)] = mark
                    deltas[pickle.dumps(key, protocol=5)] = blob
                for key in change.deleted_keys or ():
                    cur.pop(key, None)
                    run.key_writes[(name, key)] = mark
                    deltas[pickle.dumps(key, protocol=5)] = TOMBSTONE
                run.field_key_marks[name] = mark
                run.stale_fields.add(name)
            else:
                run.fields[name] = change.blob
                run.live_dicts.pop(name, None)
                run.stale_fields.discard(name)
                run.field_writes[name] = mark
                run.dirty_fields.add(name)
        self._dirty[run.iid] = run
        return None

    def _conflict(self, run: Run, step: StepRun, what: str, other: str) -> DataConflict:
        name = "the shared context" if what.startswith(data_codec.CONTEXT_FIELD) else f"field {what}"
        return DataConflict(
            f"{name} was changed by step {other!r}, which ran at the same time, to a different value; "
            f"make one of them depend on the other, or write different fields (dict fields merge key by key)",
            **self._where(run, step),
        )

    # -- failures ----------------------------------------------------------------

    def _attempt_failed(self, run: Run, step: StepRun, error: WorkflowError, cause: BaseException) -> None:
        i = step.index
        sdef = run.compiled.steps[i]
        policy = run.compiled.retry[i]
        used = step.attempts - step.budget_start
        forever = sdef.failure_action is FailureAction.RETRY_INDEFINITELY
        will_retry = run.stopping is None and (forever or used < policy.max_attempts) and _retryable(sdef.body, cause)
        step.error = _reason(error)
        self._event(
            ev.StepFailed,
            run,
            self.clock.now(),
            step_id=step.sid,
            attempt=step.attempts,
            error=str(error),
            will_retry=will_retry,
            usage=step.usage,
        )
        if will_retry:
            delay = policy.backoff.delay(used)
            self._set_status(run, step, S.WAITING)
            step.waited_from, step.wait_kind = self.clock.monotonic(), "backoff"
            step.wait_until = self.clock.now() + _delta(delay)
            step.timer = self._timer(self.clock.monotonic() + delay, "retry", step)
            self._event(
                ev.StepRetrying, run, self.clock.now(), step_id=step.sid, attempt=step.attempts + 1, delay=delay
            )
            return
        step.final_error = error
        if overrides(sdef.body, "on_failure") and run.stopping != "cancel":
            self._queue_hook(run, step, "failure")
            return
        self._fail_for_good(run, step, error)

    def _fail_for_good(self, run: Run, step: StepRun, error: WorkflowError) -> None:
        self._set_status(run, step, S.FAILED)
        step.finished_at = self.clock.now()
        step.error = _reason(error)
        sdef = run.compiled.steps[step.index]
        if sdef.failure_action is FailureAction.CONTINUE_NEXT_STEP:
            self._count_finished(run, step)
            self._propagate(run, step, Outcome.FAILED_CONTINUE)
        elif run.stopping is None:
            run.stopping = "fail"
            run.error, run.failed_step = error, step.sid
            self._park_waiting(run)
        self._maybe_finish(run)

    def _park_waiting(self, run: Run) -> None:
        """The run stops: steps not yet started go back to PENDING (a resume starts them)."""
        for step in run.steps:
            if step.hook:
                continue  # an on_failure hook still runs; the step ends after it
            if step.status is S.WAITING or step.queued:
                step.queued = 0
                step.timer = 0
                if step.status is S.WAITING:
                    self._set_status(run, step, S.PENDING)
                    step.wait_until = None

    # -- timeouts, crashes, kills ---------------------------------------------------

    def _on_timeout(self, task: Task) -> None:
        if task.slot.task is task and not task.slot.dying:
            task.kill_reason = "timeout"
            self.pool.kill(task.slot, task.run.grace if task.run.grace is not None else self.grace, self._killed)

    def _over_memory(self, slot: Slot, task: Task, rss: int) -> None:
        """Called on the watchdog thread: hand the kill decision to the scheduler thread."""
        try:
            self.submit(self._stop_over_memory, slot, task, rss, reply=False)
        except RuntimeError:
            pass  # the engine closed meanwhile

    def _stop_over_memory(self, slot: Slot, task: Task, rss: int) -> None:
        if slot.task is task and not slot.dying and task.kill_reason is None:
            task.kill_reason = "memory"
            slot.last_rss = rss
            # No grace: every moment it keeps running it takes more of the machine.
            self.pool.kill(slot, 0.0, self._killed)

    def _killed(self, slot: Slot, exit_: Exit) -> None:
        """Called on the kill thread once the slot's whole tree is dead."""
        try:
            self.submit(self._after_kill, slot, exit_, reply=False)
        except RuntimeError:
            pass  # the engine closed meanwhile

    def _after_kill(self, slot: Slot, exit_: Exit) -> None:
        task: Task | None = slot.task
        self.pool.spawn(slot)
        if task is None:
            return  # its result arrived before the kill; nothing was lost
        self._release(task)
        run, step = task.run, task.step
        timeout = run.compiled.timeout[step.index]
        if task.kill_reason == "crash":
            self._crashed(task, exit_)
        elif task.kill_reason == "timeout":
            error: WorkflowError = StepTimeout(
                f"timed out after {timeout:g} s; its worker ({worker_name(task, exit_)}) and every process it started "
                f"were stopped ({exit_.describe()})",
                **self._where(run, step),
            )
            self._end_attempt(task, "timed_out", exit_=exit_, error=error)
            self._attempt_failed(run, step, error, error)
        elif task.kill_reason == "memory":
            error = WorkerCrashed(
                f"stopped: its worker used {_mib(exit_.last_rss)} MiB, over the step's memory limit of "
                f"{_mib(run.compiled.memory_limit[step.index] or 0)} MiB; raise it with with_memory_limit() "
                "or make the step use less",
                **self._where(run, step),
            )
            error.exitcode, error.signal_name = exit_.exitcode, exit_.signal_name
            self._end_attempt(task, "crashed", exit_=exit_, error=error)
            self._attempt_failed(run, step, error, error)
        elif task.hook:  # cancelled while a hook ran: the outcome was decided before it
            self._hook_done(run, step)
        else:  # cancelled
            self._set_status(run, step, S.CANCELLED)
            step.finished_at = self.clock.now()
            step.error = "cancelled while running; its process tree was stopped"
            self._end_attempt(task, "cancelled", exit_=exit_)
            step.history[-1]["error"] = step.error
        self._maybe_finish(run)

    def _on_worker_exit(self, slot: Slot) -> None:
        """A worker died on its own: fail only the step it ran, replace it."""
        while slot.task is not None and slot.conn is not None and slot.conn.poll():
            message = self.pool.receive(slot)
            if message is None:
                break
            self._on_message(slot, message)  # it finished before dying: keep its result
        if slot.dying:
            return  # it asked to be replaced (its reply said "retire"), and that has begun
        exit_ = self.pool.exit_of(slot)
        if slot.task is not None:
            slot.task.kill_reason = "crash"
        # What the dead worker's step started still runs in its process group: stop it
        # before anything is retried (never two attempts' processes at once).
        self.pool.kill(slot, 0.0, self._killed, exit_)

    def _crashed(self, task: Task, exit_: Exit) -> None:
        run, step = task.run, task.step
        hint = ""
        if exit_.signal_name == "SIGKILL" and exit_.last_rss >= _OOM_HINT_BYTES:
            hint = f"; probably out of memory (its last measured RSS was {_mib(exit_.last_rss)} MiB)"
        error = WorkerCrashed(
            f"its worker process ({worker_name(task, exit_)}) {exit_.describe()}{hint}; other steps were not affected",
            **self._where(run, step),
        )
        error.exitcode, error.signal_name = exit_.exitcode, exit_.signal_name
        if task.hook:
            self._hook_done(run, step)  # a hook that crashed changes no outcome
        else:
            self._end_attempt(task, "crashed", exit_=exit_, error=error)
            self._attempt_failed(run, step, error, error)

    # -- finishing steps and runs -----------------------------------------------------

    def _finish(self, run: Run, step: StepRun, status: StepStatus, *, reason: str = "", duration: float = 0.0) -> None:
        self._set_status(run, step, status)
        step.finished_at = self.clock.now()
        step.error = None
        if status is S.SUCCEEDED:
            self._event(
                ev.StepSucceeded,
                run,
                step.finished_at,
                step_id=step.sid,
                attempt=step.attempts,
                duration=duration,
                usage=step.usage,
            )
            outcome = Outcome.SUCCEEDED
        else:
            self._event(ev.StepSkipped, run, step.finished_at, step_id=step.sid, reason=reason)
            outcome = Outcome.SKIPPED
        self._count_finished(run, step)
        self._propagate(run, step, outcome)

    def _count_finished(self, run: Run, step: StepRun) -> None:
        if not step.counted:
            step.counted = True
            run.unfinished -= 1

    def _propagate(self, run: Run, step: StepRun, outcome: Outcome) -> None:
        now = None
        for j, via_any in run.compiled.dependents[step.index]:
            nxt = run.steps[j]
            if nxt.gate.record(outcome, via_any=via_any) and not nxt.counted:
                if now is None:
                    now = self.clock.monotonic()
                self._decide(run, nxt, now)

    def _maybe_finish(self, run: Run) -> None:
        if run.final or run.inflight or (run.stopping is None and run.unfinished):
            return
        run.final = True
        now = self.clock.now()
        if run.stopping == "cancel":
            new, event = W.CANCELLED, ev.WorkflowCancelled
            run.error = Cancelled(run.iid, run.workflow_id)
            self._event(event, run, now)
        elif run.stopping == "fail":
            new = W.FAILED
            self._event(ev.WorkflowFailed, run, now, error=str(run.error), failed_step=run.failed_step)
        else:
            new = W.COMPLETED
            self._event(ev.WorkflowCompleted, run, now, duration=self.clock.monotonic() - run.started_mono)
        check_workflow_transition(run.iid, run.status, new)
        run.status = new
        self._dirty[run.iid] = run
        self._finished.append(run)

    # -- cancel -----------------------------------------------------------------------

    def cancel(self, iid: str, grace: float | None) -> concurrent.futures.Future[Any]:
        """Stop dispatching, kill running steps' trees; the future resolves once the run is CANCELLED."""
        run = self.runs.get(iid)
        if run is None:
            meta = self.store.read_meta(iid)
            if meta is None:
                raise NotFound(iid)
            status = W(meta["status"])
            hint = "it has already finished" if status.is_terminal else f"it is owned by process {_owner(meta)}"
            raise InvalidStateTransition(f"instance {iid}", status, W.CANCELLED, hint)
        if run.final:
            raise InvalidStateTransition(f"instance {iid}", run.status, W.CANCELLED, "it has already finished")
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        run.waiters.append(future)
        run.grace = grace
        if run.stopping != "cancel":
            run.stopping = "cancel"
            self._park_waiting(run)
        for slot in self.pool.slots:
            task = slot.task
            if task is not None and task.run is run and task.kill_reason is None and not slot.dying:
                task.kill_reason = "cancel"
                self.pool.kill(slot, self.grace if grace is None else grace, self._killed)
            elif task is not None and task.run is run and slot.dying and grace == 0:
                # A second, immediate cancel while a graceful kill is waiting: kill now.
                self.pool.kill(slot, 0, lambda s, e: None)
        self._maybe_finish(run)
        return future

    # -- checkpoints -------------------------------------------------------------------

    def _flush(self) -> None:
        """Hand this turn's checkpoint to the store; what depends on it waits in a Batch for the commit."""
        if self._pending and not self._pending[-1].committed:
            return  # group commit: changes made meanwhile go out together once this write is done
        batch = Batch(next(self._seq), list(self._dirty.values()), self._events, self._finished, self._resolve)
        self._events, self._finished, self._resolve = [], [], []
        checkpoints = [self._checkpoint(run) for run in self._dirty.values()]
        self._dirty.clear()
        self._pending.append(batch)
        if not checkpoints:
            batch.committed = True
            return
        try:
            self.store.write_async(checkpoints, batch.acknowledge(self.wake))
        except Exception as exc:  # noqa: BLE001 - turned into a failed run, never a hung one
            batch.acknowledge(self.wake)(exc)

    def _complete_batches(self) -> None:
        """Release, in order, what waited for commits that are done: dependents, events, waiters."""
        while self._pending and self._pending[0].committed:
            batch = self._pending.popleft()
            if batch.error is not None:
                self._store_failed(batch.runs, batch.error)
            self._committed = batch.mark
            if batch.events:
                self.bus.publish(batch.events)
            for run in batch.finished:
                self.runs.pop(run.iid, None)
                self.outcomes[run.iid] = Finished(run.status, run.error, run.done)
                run.done.set()
                for waiter in run.waiters:
                    waiter.set_result(run.status)
            for future, result in batch.resolve:
                future.set_result(result)
        if self._dirty or self._events or self._finished or self._resolve:
            self.wake()  # a failed commit changed state: another turn checkpoints it

    def _checkpoint(self, run: Run) -> Checkpoint:
        meta = {
            "workflow_id": run.workflow_id,
            "status": run.status.value,
            "error": str(run.error) if run.error else None,
            "error_type": type(run.error).__name__ if run.error else None,
            "failed_step": run.failed_step,
            "created_at": run.created_at,
            "updated_at": self.clock.now(),
            "owner": self.owner if not run.final else None,
        }
        steps = {}
        for i in run.dirty_steps:
            s = run.steps[i]
            steps[s.sid] = {
                "status": s.status.value,
                "attempts": s.attempts,
                "started_at": s.started_at,
                "finished_at": s.finished_at,
                "error": s.error,
                "wait_until": s.wait_until,
                "history": list(s.history),  # a copy: the store may encode it after this turn
            }
        run.dirty_steps.clear()
        if run.dirty_fields:
            run.sync()
        fields: dict[str, bytes | None] = {name: run.fields.get(name) for name in run.dirty_fields}
        # A field written whole this turn already holds its key changes.
        deltas = {name: d for name, d in run.deltas.items() if name not in fields}
        run.dirty_fields.clear()
        run.deltas = {}
        extra, run.extra = run.extra, {}
        logs, run.logs = run.logs, {}
        return Checkpoint(run.iid, meta, steps, fields, extra, deltas, logs=logs)

    def _store_failed(self, runs: list[Run], exc: Exception) -> None:
        log.error("wfaas could not write a checkpoint; stopping the runs involved", exc_info=exc)
        for run in runs:
            error = StoreError(
                f"instance {run.iid}: checkpoint failed ({type(exc).__name__}: {exc}); the run was stopped so that "
                "no step runs on uncommitted results; fix the store and resume it"
            )
            if not run.final:
                run.stopping = "fail"
                run.error = error
                self._park_waiting(run)
                for slot in self.pool.slots:
                    if slot.task is not None and slot.task.run is run and not slot.dying:
                        slot.task.kill_reason = "cancel"
                        self.pool.kill(slot, self.grace, self._killed)
                self._maybe_finish(run)

    # -- helpers ---------------------------------------------------------------------

    def _set_status(self, run: Run, step: StepRun, new: StepStatus) -> None:
        if step.status is not new:
            check_step_transition(run.iid, step.sid, step.status, new)
            step.status = new
        run.dirty_steps.add(step.index)
        self._dirty[run.iid] = run

    def _event(self, kind: type, run: Run, when: datetime, **fields: Any) -> None:
        if self.bus.has_subscribers:
            self._events.append(kind(instance_id=run.iid, workflow_id=run.workflow_id, timestamp=when, **fields))

    def _abandon(self, exc: BaseException) -> None:
        self._stopped = True
        for run in list(self.runs.values()):
            run.error = StepFailed(f"the engine's scheduler crashed: {exc!r}", instance_id=run.iid)
            run.status = W.FAILED
            self.outcomes[run.iid] = Finished(W.FAILED, run.error, run.done)
            run.done.set()
            for waiter in run.waiters:
                waiter.set_exception(run.error)
        while self._commands:
            _, _, future = self._commands.popleft()
            if future is not None:
                future.set_exception(RuntimeError("the engine's scheduler crashed"))


def _same_encoded(a: bytes | None, b: bytes | None) -> bool:
    """Equal encodings, or equal values whose encodings differ (a set's order, a dict's key order)."""
    if a == b:
        return True
    if a is None or b is None:
        return False
    try:
        x, y = pickle.loads(a), pickle.loads(b)
        return bool(type(x) is type(y) and x == y)
    except Exception:  # noqa: BLE001 - an undecodable or uncomparable value is not provably the same
        return False


def _memory_limit_of(task: Task) -> int | None:
    return None if task.hook else task.run.compiled.memory_limit[task.step.index]


def _reason(error: WorkflowError) -> str:
    """What went wrong, without the step and instance a step record already names."""
    return str(getattr(error, "reason", None) or error)


def _retryable(body: Any, cause: BaseException) -> bool:
    if not isinstance(body, StepExecutor):
        return True
    try:
        return bool(body.is_retryable(cause))
    except Exception:  # a raising is_retryable means: do not retry
        log.exception("is_retryable of %r raised; not retrying", body)
        return False


def _decode_error(blob: bytes) -> BaseException:
    try:
        exc = pickle.loads(blob)
    except Exception as err:  # noqa: BLE001 - the class may not exist here
        return RuntimeError(f"(the step's exception could not be decoded here: {err})")
    if not isinstance(exc, BaseException):
        return RuntimeError(repr(exc))
    return exc


def _delta(seconds: float) -> Any:
    from datetime import timedelta

    return timedelta(seconds=max(0.0, seconds))


# A worker SIGKILLed while this large (ten times a fresh worker) was probably the OOM killer's
# choice: the kernel says nothing to us, so this is a hint, and worded as one.
_OOM_HINT_BYTES = 256 * 2**20
# Attempts kept per step: a step retried indefinitely must not make each checkpoint grow without end.
HISTORY_KEPT = 100


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f}"


def worker_name(task: Task, exit_: Exit) -> str:
    """The process that ran the task, for messages: its pid here, or what the remote pool called it."""
    return exit_.where or f"pid {task.pid}"


def _owner(meta: dict[str, Any]) -> str:
    owner = meta.get("owner") or {}
    return str(owner.get("pid", "?"))
