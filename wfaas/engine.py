"""``WorkflowEngine``: the object users hold. It validates, then hands work to the scheduler.

Everything that changes run state is a command executed on the scheduler
thread (see ``scheduler.py``); the engine's methods build inputs in the
caller's thread (validation, encoding, so that errors surface at the call)
and wait on the scheduler's answer.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from . import _malloc, _signals, _threads
from . import data as data_codec
from . import errors as errors_module
from .clock import Clock, SystemClock
from .definition import WorkflowDefinition, fingerprint, fingerprint_changes
from .errors import (
    DefinitionNotFound,
    InvalidDefinition,
    InvalidStateTransition,
    NotFound,
    ShuttingDown,
    StoreError,
    WorkflowError,
)
from .events import EventBus
from .pool import Backend, Pool, WorkerPool
from .rundata import RunData
from .runs import Compiled, Run, encode_bodies
from .scheduler import Scheduler
from .states import WorkflowState, WorkflowStatus
from .store import InMemoryStore, Record, StateStore, data_class, with_inline_limit

__all__ = ["CleanupHandle", "WorkflowEngine"]

log = logging.getLogger("wfaas")
W = WorkflowStatus
# What stops the program's wait for a run: Ctrl-C, or SIGTERM/SIGHUP (see _signals.py).
_INTERRUPTS = (KeyboardInterrupt, _signals.Terminated)


class CleanupHandle:
    """The background cleanup started by ``start_cleanup_task``; ``stop()`` ends it."""

    def __init__(self, engine: WorkflowEngine, ttl: float, interval: float) -> None:
        self._stop = threading.Event()
        self.removed = 0
        self._thread = threading.Thread(
            target=self._loop, args=(weakref.ref(engine), ttl, interval), name="wfaas-cleanup", daemon=True
        )
        with _threads.signals_blocked():
            self._thread.start()

    def _loop(self, ref: weakref.ref[WorkflowEngine], ttl: float, interval: float) -> None:
        while not self._stop.is_set():
            engine = ref()
            # After shutdown() runs still finish: they must stay readable (the crate's task stops too).
            if engine is None or engine._closed or engine._shutting_down:
                return
            try:
                self.removed += engine._cleanup(ttl)
            except Exception:  # a failed sweep is retried next interval
                log.exception("wfaas cleanup sweep failed")
            del engine
            self._stop.wait(interval)

    def stop(self) -> None:
        """Stop the cleanup thread (waits for a sweep in progress)."""
        self._stop.set()
        self._thread.join(timeout=10)


class WorkflowEngine:
    """Runs registered workflows in worker processes, checkpointing every step to ``store``.

    ``max_workers`` worker processes (default: ``os.cpu_count()``) are started
    at once and kept warm. ``grace_period`` is how long a stopped step's
    processes get between SIGTERM and SIGKILL; ``memory_limit`` (bytes) is the
    default limit of every step. ``cancel_signal`` is recorded as the signal
    another process may send this one to cancel its runs (the process must
    handle it). ``clock`` replaces real time
    for the engine's timers (see :mod:`wfaas.testing`). ``backend`` sends
    steps elsewhere, e.g. ``DaskBackend("tcp://host:8786")`` (then
    ``max_workers`` defaults to the cluster's threads). ``inline_limit``: README "Large values". Use it as a context
    manager: on exit it waits for running workflows; on an exception
    (including Ctrl-C) it cancels them.

    SIGTERM and SIGHUP: an engine made on the main thread of a program that
    leaves a signal at its default (``SIG_DFL``) handles it like Ctrl-C until
    the last engine closes, then puts the default back. The signal raises
    :class:`~wfaas.Terminated` (a ``SystemExit`` with status 143 or 129) in the
    main thread; waiting in ``wait_for_completion``, ``wait_for_shutdown`` or the
    ``with`` block, the runs are cancelled gracefully and checkpointed first. A
    second signal while they are cancelled kills their steps at once. A program
    that handles or ignores the signal itself (``nohup``) keeps its own.

    With glibc, the first engine of a process fixes malloc's mmap threshold at
    128 KiB (``mallopt``; glibc would raise it), so that buffers of a run's data
    are given back to the system when freed; ``MALLOC_MMAP_THRESHOLD_`` in the
    environment wins.
    """

    def __init__(
        self,
        store: StateStore | None = None,
        max_workers: int | None = None,
        *,
        clock: Clock | None = None,
        grace_period: float = 2.0,
        memory_limit: int | None = None,
        start_method: str = "forkserver",
        cancel_signal: int | None = None,
        backend: Backend | None = None,
        inline_limit: int | None = None,
    ) -> None:
        _malloc.tune()  # a long-lived engine must not keep every run's freed buffers (see _malloc.py)
        self.store: StateStore = with_inline_limit(store if store is not None else InMemoryStore(), inline_limit)
        self.event_bus = EventBus()
        self.clock: Clock = clock or SystemClock()
        self.grace_period = float(grace_period)
        self.memory_limit = memory_limit
        self._definitions: dict[str, Compiled] = {}
        self._lock = threading.Lock()
        # Where this engine's definitions come from (the CLI's TARGET), saved with each run
        # so that `wfaas-local resume ID` can load the definition again.
        self.origin: str | None = None
        self._class_blobs: dict[type, bytes] = {}
        self._shutting_down = False
        self._closed = False
        self._cleanups: weakref.WeakSet[CleanupHandle] = weakref.WeakSet()
        import psutil  # imported when first needed: it costs `import wfaas` 8 ms

        me = psutil.Process()
        # Recorded with every run this engine owns; `cancel_signal` tells another
        # process (wfaas-local cancel) which signal asks this one to cancel its runs.
        self._owner: dict[str, Any] = {"pid": me.pid, "started": me.create_time(), "cancel_signal": cancel_signal}
        self._pool: Pool
        if backend is None:
            self._pool = WorkerPool(max_workers or os.cpu_count() or 1, start_method)
            self._pool.start()
        else:
            self._pool = backend.pool(max_workers)
        self.max_workers = len(self._pool.slots)
        self._scheduler = Scheduler(self._pool, self.store, self.event_bus, self.clock, self.grace_period, self._owner)
        self._scheduler.start()
        self._finalizer = weakref.finalize(self, _close, self._scheduler, self._pool, self.event_bus, self.grace_period)
        _signals.attach(self)

    @classmethod
    def with_store(cls, store: StateStore, **kwargs: Any) -> WorkflowEngine:
        """An engine checkpointing to ``store`` (the seed's spelling of ``WorkflowEngine(store=...)``)."""
        return cls(store=store, **kwargs)

    # -- definitions -------------------------------------------------------------

    def register_workflow(self, definition: WorkflowDefinition) -> None:
        """Validate and register; :class:`InvalidDefinition` lists every problem at once."""
        if not isinstance(definition, WorkflowDefinition):
            raise TypeError(f"register_workflow takes a WorkflowDefinition, got {type(definition).__name__}")
        problems = definition.validate()
        if definition.id in self._definitions:
            problems.append(f"a workflow with id {definition.id!r} is already registered with this engine")
        bodies, unsendable = encode_bodies(definition)
        problems += unsendable
        if problems:
            raise InvalidDefinition(definition.id, problems)
        compiled = Compiled(definition, bodies)
        if definition.default_memory_limit is None and self.memory_limit is not None:
            compiled.memory_limit = [m or self.memory_limit for m in compiled.memory_limit]
        with self._lock:
            self._definitions[definition.id] = compiled

    def _compiled(self, workflow_id: str) -> Compiled:
        compiled = self._definitions.get(workflow_id)
        if compiled is None:
            raise DefinitionNotFound(workflow_id, list(self._definitions))
        return compiled

    # -- running -----------------------------------------------------------------

    def start_workflow(self, workflow_id: str, data: Any = None) -> str:
        """Start an instance; returns its id at once while it runs in the background."""
        if self._shutting_down or self._closed:
            raise ShuttingDown(f"start_workflow({workflow_id!r}) after shutdown()")
        compiled = self._compiled(workflow_id)
        data_type = compiled.definition.data_type
        if data is None:
            if data_type is None:
                raise TypeError(
                    f"start_workflow({workflow_id!r}) needs a data object (the definition declares no data_type)"
                )
            data = data_type()
        elif data_type is not None and not isinstance(data, data_type):
            raise TypeError(
                f"start_workflow({workflow_id!r}): data must be a {data_type.__name__}, got {type(data).__name__}"
            )
        fields = data_codec.encode_fields(data, where=f"start_workflow({workflow_id!r})", objects=self.store.objects)
        cls_blob = self._class_blob(type(data))
        iid = uuid.uuid4().hex
        run = Run(iid, compiled, type(data), cls_blob, RunData(fields, self.store.objects), created_at=self.clock.now())
        run.data.dirty_fields.update(fields)
        run.extra = {"class": cls_blob, "fingerprint": compiled.fingerprint, "origin": self.origin}
        result: str = self._call(self._scheduler.start_run, run, None, set())
        return result

    def _class_blob(self, cls: type) -> bytes:
        # Encoding a class by value costs milliseconds; do it once per class, not per run.
        blob = self._class_blobs.get(cls)
        if blob is None:
            blob = self._class_blobs[cls] = data_codec.encode_value(cls)
        return blob

    def _call(self, fn: Any, *args: Any) -> Any:
        if self._closed:
            raise ShuttingDown("the engine is closed")
        future = self._scheduler.submit(fn, *args)
        assert future is not None
        return future.result()

    def wait_for_completion(self, instance_id: str, label: str = "", timeout: float | timedelta | None = None) -> str:
        """Block until the instance ends; its error is raised if it did not complete.

        Returns ``"{label} completed successfully via workflow"``. On timeout
        raises the builtin ``TimeoutError`` and the run goes on. Ctrl-C while
        waiting cancels the instance gracefully, then re-raises.
        """
        seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
        finished = self._scheduler.outcomes.get(instance_id)
        if finished is None:
            return self._wait_foreign(instance_id, label, seconds)
        try:
            done = _wait(finished.done, seconds)
        except _INTERRUPTS:
            self._interrupted([instance_id])
            raise
        if not done:
            raise TimeoutError(
                f"instance {instance_id} is still running after {seconds} s; it goes on — wait again, or cancel it"
            )
        if isinstance(finished.error, StoreError):
            raise finished.error  # the store failed: what it holds (or not) is not the answer
        if self.store.read_meta(instance_id) is None:
            # Removed from the store since it ended (cleanup_old_workflows, delete): unknown, as to get_status.
            raise NotFound(instance_id, " (it ended and was removed from the store since)")
        if finished.status is W.COMPLETED:  # the scheduler set it on this very object before `done`
            return f"{label} completed successfully via workflow"
        assert finished.error is not None
        raise finished.error

    def _wait_foreign(self, instance_id: str, label: str, seconds: float | None) -> str:
        """An instance this engine does not run: follow its checkpoints in the store."""
        deadline = None if seconds is None else time.monotonic() + seconds
        pause = 0.01
        while True:
            meta = self.store.read_meta(instance_id)
            if meta is None:
                raise NotFound(instance_id)
            status = W(meta["status"])
            if status is W.COMPLETED:
                return f"{label} completed successfully via workflow"
            if status.is_terminal:
                raise error_from_meta(instance_id, meta)
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"instance {instance_id} is still {status.name} after {seconds} s")
            time.sleep(pause)  # another process writes it; there is nothing to wait on but the file
            pause = min(pause * 2, 0.5)

    def get_status(self, instance_id: str) -> WorkflowState[Any]:
        """The instance as last checkpointed; :class:`NotFound` if unknown."""
        return self.store.load(instance_id)

    def cancel_workflow(self, instance_id: str, *, grace: float | None = None) -> None:
        """Stop dispatching, stop running steps (SIGTERM, grace, SIGKILL); returns once CANCELLED."""
        inner = self._call(self._scheduler.cancel, instance_id, grace)
        done = threading.Event()
        inner.add_done_callback(lambda _: done.set())
        _wait(done, None)  # a second Ctrl-C or SIGTERM during the grace period must be seen at once
        inner.result()

    def _interrupted(self, instance_ids: Iterable[str]) -> None:
        """First Ctrl-C (or SIGTERM/SIGHUP): cancel gracefully. A second one while that runs: kill at once."""
        ids = [i for i in instance_ids if i in self._scheduler.runs]
        try:
            for iid in ids:
                self._cancel_quietly(iid, None)
        except _INTERRUPTS:
            for iid in ids:
                self._cancel_quietly(iid, 0.0)
            raise

    def _cancel_quietly(self, instance_id: str, grace: float | None) -> bool:
        try:
            self.cancel_workflow(instance_id, grace=grace)
            return True
        except (InvalidStateTransition, NotFound):
            return False

    def resume(self, instance_id: str, rerun: Iterable[str] | None = None, *, force: bool = False) -> str:
        """Run a FAILED, CANCELLED or interrupted instance on; succeeded and skipped steps do not run again.

        ``rerun`` names steps to run again with everything downstream of them.
        A definition whose steps or dependencies changed since the run started
        is refused unless ``force=True``.
        """
        if self._shutting_down or self._closed:
            raise ShuttingDown(f"resume({instance_id!r}) after shutdown()")
        record = self.store.read(instance_id)
        if record is None:
            raise NotFound(instance_id)
        meta = record.meta
        compiled = self._compiled(meta["workflow_id"])
        status = W(meta["status"])
        reruns = _downstream(compiled, list(rerun or ()), instance_id)
        if status is W.COMPLETED and not reruns:
            raise InvalidStateTransition(
                f"instance {instance_id}", status, W.RUNNING, "it completed; name steps to run again with rerun=[...]"
            )
        if status in (W.RUNNING, W.PENDING):
            self._refuse_if_running(instance_id, status, meta.get("owner") or {})
        stored_fp = record.extra.get("fingerprint")
        changes = fingerprint_changes(stored_fp, fingerprint(compiled.definition)) if stored_fp else ([], [])
        structural, bodies = changes
        if structural and not force:
            raise InvalidDefinition(
                compiled.definition.id,
                [f"the definition changed since instance {instance_id} started: {c}" for c in structural]
                + ["resume with force=True (CLI: --force) to run it on the new definition anyway"],
            )
        if bodies:
            log.warning(
                "instance %s: step code changed since it started (%s); steps that succeeded are not run again",
                instance_id,
                ", ".join(bodies),
            )
        try:
            cls, rundata = data_class(record), RunData(dict(record.resolved_fields()), self.store.objects)
        except Exception as exc:  # bytes that do not decode: that run's record is damaged, said as such
            where = record.where or repr(self.store)
            raise StoreError(
                f"the record of run {instance_id} in the wfaas store {where} is damaged ({type(exc).__name__}: "
                f"{exc}); it cannot be resumed, other runs are not affected: restore the store from a backup"
            ) from exc
        run = Run(instance_id, compiled, cls, record.extra["class"], rundata, created_at=meta["created_at"])
        run.status = status
        run.extra = {"fingerprint": compiled.fingerprint}
        result: str = self._call(self._scheduler.start_run, run, resumed_steps(record, compiled), reruns)
        return result

    def _refuse_if_running(self, instance_id: str, status: WorkflowStatus, owner: dict[str, Any]) -> None:
        """A RUNNING or PENDING run may be resumed only if no live process runs it."""
        if instance_id in self._scheduler.runs:
            raise InvalidStateTransition(f"instance {instance_id}", status, W.RUNNING, "it is running in this engine")
        if owner_alive(owner) and owner.get("pid") != self._owner["pid"]:
            raise InvalidStateTransition(
                f"instance {instance_id}",
                status,
                W.RUNNING,
                f"it is still running in process {owner.get('pid')}; cancel it there or wait for it",
            )

    def recover(self) -> list[str]:
        """Resume every instance left RUNNING by a process that died; returns their ids."""
        resumed = []
        for iid in self.store.ids():
            try:
                meta = self.store.read_meta(iid)
            except StoreError as exc:  # a damaged record stays that run's problem
                log.warning("cannot recover instance %s: %s", iid, exc)
                continue
            if meta is None or iid in self._scheduler.runs or not orphaned(meta):
                continue
            if meta["workflow_id"] not in self._definitions:
                log.warning("cannot recover instance %s: workflow %r is not registered", iid, meta["workflow_id"])
                continue
            try:
                self.resume(iid)
            except StoreError as exc:
                log.warning("cannot recover instance %s: %s", iid, exc)
                continue
            resumed.append(iid)
        return resumed

    # -- shutting down ---------------------------------------------------------------

    def active_instances(self) -> list[str]:
        """Ids of the instances this engine is running now."""
        return list(self._scheduler.runs)

    def shutdown(self) -> None:
        """Accept no new workflows; running ones go on. The cleanup task stops (finished runs stay)."""
        self._shutting_down = True
        for handle in list(self._cleanups):
            handle._stop.set()

    def wait_for_shutdown(self, timeout: float | timedelta | None = None) -> bool:
        """Wait for running workflows to end, then stop the workers; False if ``timeout`` passed first."""
        self.shutdown()
        seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
        deadline = None if seconds is None else time.monotonic() + seconds
        for iid in self.active_instances():
            finished = self._scheduler.outcomes.get(iid)
            if finished is None:
                continue
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                if not _wait(finished.done, remaining):
                    return False
            except _INTERRUPTS:
                self._interrupted(self.active_instances())
                raise
        self.close()
        return True

    def force_cancel_all(self, *, grace: float | None = None) -> int:
        """Cancel every running workflow (their steps' processes are stopped); returns how many."""
        return sum(self._cancel_quietly(iid, grace) for iid in self.active_instances())

    def close(self) -> None:
        """Stop the scheduler and every worker process. Running steps are killed; call after waiting."""
        if self._closed:
            return
        self._closed = True
        _signals.detach(self)
        self._finalizer()

    def __enter__(self) -> WorkflowEngine:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            try:
                self.wait_for_shutdown()
                return
            except _INTERRUPTS:
                self._cancel_and_close()
                raise
        self._cancel_and_close()

    def _cancel_and_close(self) -> None:
        try:
            self.force_cancel_all()
        except _INTERRUPTS:
            self.force_cancel_all(grace=0.0)
            raise
        finally:
            self.close()

    # -- cleanup -----------------------------------------------------------------------

    def start_cleanup_task(self, ttl: float | timedelta = 3600, interval: float | timedelta = 300) -> CleanupHandle:
        """Remove finished instances older than ``ttl`` every ``interval`` seconds, in the background."""
        ttl_s = ttl.total_seconds() if isinstance(ttl, timedelta) else float(ttl)
        interval_s = interval.total_seconds() if isinstance(interval, timedelta) else float(interval)
        if self._shutting_down or self._closed:
            raise ShuttingDown("start_cleanup_task() after shutdown()")
        handle = CleanupHandle(self, ttl_s, interval_s)
        self._cleanups.add(handle)
        return handle

    def _cleanup(self, ttl: float) -> int:
        removed: int = self._call(self._cleanup_now, ttl)
        return removed

    def _cleanup_now(self, ttl: float) -> int:
        """Runs on the scheduler thread, the only writer."""
        before = set(self.store.ids())
        removed = self.store.cleanup_old_workflows(ttl, now=self.clock.now())
        for iid in before - set(self.store.ids()):
            self._scheduler.outcomes.pop(iid, None)
        return removed


# How often a main thread waiting for a run wakes up (see _wait).
SIGNAL_CHECK = 0.2


def _wait(event: threading.Event, seconds: float | None) -> bool:
    """``event.wait(seconds)`` that lets the program's signal handlers run.

    CPython runs a Python signal handler in the main thread between bytecodes;
    a lock wait is interrupted only if the signal reaches that very thread
    before it blocks. A Ctrl-C or SIGTERM that arrived just before, or on
    another thread, would wait for the run to end. So the main thread wakes
    every ``SIGNAL_CHECK`` seconds; other threads block for the whole wait.
    """
    if threading.current_thread() is not threading.main_thread():
        return event.wait(seconds)
    deadline = None if seconds is None else time.monotonic() + seconds
    while True:
        left = SIGNAL_CHECK if deadline is None else min(SIGNAL_CHECK, deadline - time.monotonic())
        if event.wait(max(left, 0.0)):
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False


def _close(scheduler: Scheduler, pool: Pool, bus: EventBus, grace: float) -> None:
    try:
        scheduler.stop()
    finally:
        pool.close(grace)
        bus.flush(5.0)
        bus.close()


def _downstream(compiled: Compiled, steps: list[str], instance_id: str) -> set[str]:
    unknown = [s for s in steps if s not in compiled.index]
    if unknown:
        raise InvalidDefinition(
            compiled.definition.id,
            [
                f"resume({instance_id!r}, rerun=...): no step {s!r} (steps: {', '.join(compiled.index)})"
                for s in unknown
            ],
        )
    out: set[str] = set()
    todo = [compiled.index[s] for s in steps]
    while todo:
        i = todo.pop()
        sid = compiled.steps[i].id
        if sid in out:
            continue
        out.add(sid)
        todo.extend(j for j, _ in compiled.dependents[i])
    return out


def resumed_steps(record: Record, compiled: Compiled) -> dict[str, dict[str, Any]]:
    """The step records ``Scheduler.start_run`` resumes from; a for_each step's with its items (not recomputed)."""
    steps = {sid: rec for sid, rec in record.steps.items() if sid in compiled.index}
    for sid, listed in record.item_lists.items():
        if sid in steps:
            steps[sid] = {**steps[sid], "item_list": listed, "item_records": record.items.get(sid, {})}
    return steps


def owner_alive(owner: dict[str, Any]) -> bool:
    """Whether the process recorded as an instance's owner still runs (PID and start time match)."""
    pid = owner.get("pid")
    if not pid:
        return False
    import psutil

    try:
        process = psutil.Process(pid)
        # A killed owner stays a zombie until its parent reaps it: it runs nothing any more.
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(process.create_time() - float(owner.get("started", 0))) < 0.5
    except psutil.Error:
        return False


def orphaned(meta: dict[str, Any]) -> bool:
    """Whether a run was left running (or about to start) by a process that is gone: what recover resumes."""
    return meta.get("status") in (W.RUNNING.value, W.PENDING.value) and not owner_alive(meta.get("owner") or {})


def error_from_meta(instance_id: str, meta: dict[str, Any]) -> WorkflowError:
    """Rebuild an instance's error from its stored record (for runs of another process)."""
    if meta["status"] == W.CANCELLED.value:
        return errors_module.Cancelled(instance_id, meta["workflow_id"])
    message = meta.get("error") or "failed"
    step_id = meta.get("failed_step") or ""
    error = errors_module.step_error_named(
        meta.get("error_type") or "", message, instance_id=instance_id, step_id=step_id
    )
    if error is not None:
        return error
    return errors_module.StepFailed(message, instance_id=instance_id, step_id=meta.get("failed_step") or "")
