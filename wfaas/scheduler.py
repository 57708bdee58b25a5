"""The scheduler: one thread that owns every run's state and walks the DAGs, one ``tick`` at a time.

How a step travels (the function at each arrow; the functions below come in
this order, those marked F in ``failures.py``, I in ``items.py`` and D in
``dispatch.py``, mixins of ``Scheduler``)::

    engine.start_workflow / resume --start_run--> Run, each step with a Gate (readiness.py)
    gate opens --_decide--> RUN | SKIP (_finish) | WAIT (a TimerKind.WAIT timer)
                            | run_if raised (_condition_raised: a failed attempt, never retried)
    RUN, for_each: --_open_items (I)--> one StepRun per item, each as below; --_settle (I)--> the step ends
    RUN --_enqueue--> ready queue, with the data snapshot of that moment (rundata.py)
    ready queue --_dispatch D / _begin D--> idle slot --wire.RunStep--> worker (pool.py, _worker.py)
                 --_queue_behind D--> busy slot, its step short: starts when it replies (_promote D)
    worker --wire.Done | wire.Failed--> _on_message
        Done --RunData.merge--> conflict? --_finish--> SUCCEEDED / SKIPPED --_propagate--> dependents' gates
        Failed, conflict, or a stopped tree (supervision.py: timeout, memory, crash --> _after_kill F)
            --_attempt_failed F--> verdicts.after_failure: RETRY (a TimerKind.RETRY timer)
                                 | HOOK (_queue_hook) | FAIL (_fail_for_good F: CONTINUE or stop the run)
    all steps done or the run stopped, nothing in flight --_maybe_finish--> COMPLETED | FAILED | CANCELLED
    every change --_commit--> one checkpoint per turn (commits.py) --committed--> events published,
        waiters released, steps made ready by it dispatched

One turn, ``tick()``: wait (block on worker pipes + sentinels + the wake-up
pipe, until the next timer) → handle arrivals (results, dead workers) → run
commands from other threads → fire due timers → commit → dispatch. Steps
made ready by this turn's results are sent only once the checkpoint holding
those results is committed; steps that were ready before it go at once, so
workers are busy while it is written. A test drives ``tick()`` itself, with
a fake pool and a virtual clock (``testing.FakePool``).

Only this thread writes run state. Other threads talk to it through
``submit(command)`` (``loopio.Loop``: the thread, the wait, the timers);
killing a process tree happens on a helper thread that reports back the same
way (``supervision.py``). What is decided, not done, lives beside it: run
data and merges (``rundata.py``), verdicts and error wording
(``verdicts.py``), checkpoints and group commit (``commits.py``), the
records and the ready queue (``runs.py``), for_each's items (``items.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from . import events as ev
from . import verdicts, wire
from .clock import Clock
from .commits import Commits
from .dispatch import Dispatch
from .errors import Cancelled, InvalidStateTransition, StepFailed, WorkflowError
from .failures import Failures
from .items import ForEachSteps, ItemTable
from .items import key_field as _key
from .loopio import Loop, TimerKind
from .outputs import Outputs
from .pool import Pool, Slot, Waitable
from .readiness import Decision, Gate, Outcome, decide
from .runs import (
    DONE,
    Finished,
    Hook,
    Outcomes,
    ReadyQueue,
    Run,
    StepRun,
    Stopping,
    Task,
    WaitKind,
    memory_limit_of,
)
from .states import AttemptOutcome, StepStatus, WorkflowStatus, check_step_transition, check_workflow_transition
from .store import StateStore
from .supervision import Supervisor
from .watchdog import MemoryWatchdog

log = logging.getLogger("wfaas")
S, W, A = StepStatus, WorkflowStatus, AttemptOutcome
# Errors of finished runs kept in memory, so that wait_for_completion raises the very exception (with its
# cause); beyond that a long-lived engine would grow with every failed run, and the store answers instead.
ERRORS_KEPT = 1000
Words = Callable[..., WorkflowError]


class Scheduler(Loop, ForEachSteps, Failures, Dispatch, Outputs):
    """Owns every run of one engine; see the module docstring for the journey and the turn.

    Its thread, ``submit`` (how other threads reach it) and the wait between
    turns come from ``loopio.Loop``; what a turn does is ``tick``.
    """

    def __init__(
        self, pool: Pool, store: StateStore, bus: ev.EventBus, clock: Clock, grace: float, owner: dict[str, Any]
    ) -> None:
        super().__init__(clock, "wfaas-scheduler")
        self.pool, self.store, self.bus, self.grace, self.owner = pool, store, bus, grace, owner
        self.runs: dict[str, Run] = {}
        self.outcomes = Outcomes(ERRORS_KEPT)
        self._ready = ReadyQueue()
        self._commits = Commits(store, bus, self.wake)  # what this turn changed, and the commits in flight
        self.supervisor = Supervisor(pool, grace, self.submit, self._after_kill)
        self._watchdog = MemoryWatchdog(pool, memory_limit_of, self.supervisor.over_memory)

    def start(self) -> None:
        super().start()
        self._watchdog.start()

    def stop(self) -> None:
        self._watchdog.stop()
        super().stop()

    # -- the turn ----------------------------------------------------------------

    def tick(self, max_wait: float | None = None) -> None:
        """One turn: wait → handle arrivals → commands → timers → commit → dispatch.

        ``max_wait`` bounds the block (a test passes 0 and never blocks).
        """
        for kind, slot in self.wait(self.pool.waitables(), self._busy_anywhere, max_wait, self._spin()):
            if kind is Waitable.RESULT and (slot.task is not None or slot.tail is not None):
                message = self.pool.receive(slot)
                if message is not None:
                    self._on_message(slot, message)
            elif kind is Waitable.EXIT and not slot.dying:
                self._on_worker_exit(slot)
        if self._commands:
            self._commits.resolve.extend(self._commands.run())
        # Steps ready before this turn depend on nothing uncommitted: they go before the timers
        # and the commit, so workers are busy while this turn's checkpoint is written.
        self._send(self._dispatch(up_to=self._commits.committed_mark))
        for timer, target in self._timers.due(self.clock.monotonic()):
            self._on_timer(timer, target)
        self._commit()
        self._send(self._dispatch(up_to=self._commits.committed_mark))
        if self._commits.writing:
            return  # its acknowledgement wakes the loop
        if self._commits.dirty:
            # What the last dispatch changed (steps now RUNNING) goes with the next turn's changes, or alone
            # within loopio.SOON: a chain's step replies well within it, and each step costs one checkpoint.
            self._soon = True
        elif self._commits.wrote:
            self._again = True  # results follow results (a fan-out's workers finish together): look again

    def _on_timer(self, kind: TimerKind, target: Any) -> None:
        if kind is TimerKind.TIMEOUT:
            self.supervisor.on_timeout(target)
        elif kind is TimerKind.WAIT:
            self._decide(target.run, target, self.clock.monotonic())
        elif target.run.stopping is None and target.status is S.WAITING:  # RETRY
            self._enqueue(target.run, target, self.clock.monotonic())

    def _busy_anywhere(self) -> bool:
        """Something but timers can make progress: a step ready or in a worker, a commit pending."""
        return bool(self._ready or self._commits.pending or any(s.task is not None for s in self.pool.slots))

    def _send(self, sends: list[tuple[Slot, bytes]]) -> None:
        for slot, message in sends:
            try:
                self.pool.send(slot, message)
            except OSError:
                pass  # the worker died meanwhile; its sentinel reports the crash next turn

    # -- 1. a run starts: gates open -----------------------------------------------

    def start_run(self, run: Run, resumed_steps: dict[str, dict[str, Any]] | None, reruns: set[str]) -> str:
        """Take a new (or resumed) run in and open the gates of steps with nothing to wait for."""
        if run.iid in self.runs:
            raise InvalidStateTransition(
                f"instance {run.iid}", self.runs[run.iid].status, W.RUNNING, "it is already running in this engine"
            )
        compiled = run.compiled
        run.started_mono = self.clock.monotonic()
        run.steps = [
            StepRun(i, s.id, Gate(compiled.n_all[i], compiled.n_any[i]), run) for i, s in enumerate(compiled.steps)
        ]
        done = _restore(run, resumed_steps or {}, reruns)
        run.done_steps = sum(step.done for step in run.steps)
        for step in run.steps:
            if step.status is not S.PENDING and step not in done:
                self._set_status(run, step, S.PENDING)  # loaded as recorded; what runs again starts over
        check_workflow_transition(run.iid, run.status, W.RUNNING)
        run.status = W.RUNNING
        run.dirty_steps.update(range(len(run.steps)))
        self.runs[run.iid] = run
        self.outcomes.started(run)
        self._commits.dirty[run.iid] = run
        self._event(ev.WorkflowStarted, run, self.clock.now())
        mono = self.clock.monotonic()
        for step in done:
            outcome = Outcome.SUCCEEDED if step.status is S.SUCCEEDED else Outcome.SKIPPED
            for j, via_any in compiled.dependents[step.index]:
                run.steps[j].gate.record(outcome, via_any=via_any)
        for step in run.steps:
            # record() above may have opened a gate already; check() opens the rest.
            if (step.gate.opened or step.gate.check()) and not step.done:
                self._decide(run, step, mono)
        self._maybe_finish(run)
        return run.iid

    # -- 2. readiness: run, skip or wait -------------------------------------------

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
                return bool(cond(run.context(step)))

        try:
            decision, due = decide(condition, step.ready_at, now, step.not_before)
        except Exception as exc:  # noqa: BLE001 - a raising run_if fails the step, with its cause
            self._condition_raised(run, step, exc)
            return
        if decision is Decision.WAIT:
            self._set_status(run, step, S.WAITING)
            step.wait_until = self.clock.now() + verdicts.delta(due - now)
            step.wait_kind = WaitKind.SCHEDULED if due == step.not_before else WaitKind.DELAY
            step.timer = self.timer(due, TimerKind.WAIT, step)
        elif decision is Decision.SKIP:
            self._finish(run, step, S.SKIPPED, reason="run_if was false")
        elif sdef.items is not None:
            self._open_items(run, step, now)  # items.py
        else:
            self._enqueue(run, step, now)

    def _condition_raised(self, run: Run, step: StepRun, exc: Exception, words: Words = verdicts.run_if_raised) -> None:
        """A raising run_if (or for_each) is the step's failed attempt (recorded, StepFailed, on_failure), never
        retried: a retry would dispatch the step without asking run_if again."""
        step.attempts += 1
        step.started_at = now = self.clock.now()
        error = words(run, step, exc)
        waited = self.clock.monotonic() - step.waited_from if step.wait_kind else 0.0
        step.usage, record = verdicts.run_if_record(step, error, now, waited)
        verdicts.keep_attempt(step.history, record)
        self._set_status(run, step, step.status)  # checkpoint the attempt even while on_failure runs
        self._attempt_failed(run, step, error, exc, may_retry=False)

    def _enqueue(self, run: Run, step: StepRun, now: float) -> None:
        step.enqueued = now
        if step.parent is None or step.table.admit(step):
            self._ready.push(run, step, next(self._seq))

    def _queue_hook(self, run: Run, step: StepRun, hook: Hook) -> None:
        step.hook = hook
        self._ready.push(run, step, next(self._seq), first=True)

    # -- 3. dispatch: a ready step to an idle worker, or behind a busy one: dispatch.py ----

    # -- 4. results: merge, finish, propagate ---------------------------------------------

    def _on_message(self, slot: Slot, message: wire.FromWorker) -> None:
        if slot.tail is not None and self._on_tail(slot, message):
            return
        if isinstance(message, wire.Skipped):  # a step taken back (dispatch.py): its worker read and skipped it
            slot.skipping -= 1
            return
        if isinstance(message, wire.Retire):  # after a reply: its worker could not put its process back
            self._on_retire(slot, message.reason)
            return
        if isinstance(message, wire.Synced | wire.Tail):
            return  # a Synced after another message had ended the tail it was asked for (a Tail never comes late)
        task: Task = slot.task
        run, step = task.run, task.step
        if isinstance(message, wire.Output):  # lines the step printed while it runs; its reply follows
            self._output_event(task, message.lines)
            return
        if slot.dying:
            # Its step returned while being stopped (it handled SIGTERM): the result is kept,
            # and nothing is left to wait a grace period for.
            self.pool.hurry(slot)
        self._release(task)
        if message.logs:
            self._commits.events.extend(message.logs)
        if isinstance(message.output, str):  # wire.TAIL: what it printed follows, if anything
            slot.tail = task
        elif message.output is not None:
            self._keep_output(task, *message.output)
        if message.usage.get("retire"):  # a Dask child says it in its reply (_worker._answer)
            self._on_retire(slot, message.usage["retire"])
        if task.hook:
            self._hook_done(run, step)
        elif isinstance(message, wire.Done):
            self._on_done(task, message)
        else:
            error, exc = verdicts.raised(run, step, message.error, message.traceback)
            self._end_attempt(task, A.FAILED, message.usage, error=error, traceback=message.traceback or None)
            self._attempt_failed(run, step, error, exc)
            self._maybe_finish(run)
        self._promote(slot, task, message.usage.get("wall"))  # dispatch.py: the step queued behind it starts

    def _on_done(self, task: Task, message: wire.Done) -> None:
        run, step, usage = task.run, task.step, message.usage
        if message.outcome == wire.FAILURE:
            error: WorkflowError = verdicts.returned_failure(run, step)
        else:
            conflict = run.data.merge(step.label, task.snapshot.version, message.changes)
            if conflict is None:
                self._commits.dirty[run.iid] = run
                success = message.outcome == wire.SUCCESS
                self._end_attempt(task, A.SUCCEEDED if success else A.SKIPPED, usage)
                if success and (hook := verdicts.hook_after_success(run, step)):
                    self._queue_hook(run, step, hook)  # only now is the success certain
                else:
                    reason = "the step returned StepResult.SKIP"
                    self._finish(
                        run, step, S.SUCCEEDED if success else S.SKIPPED, reason=reason, duration=usage["wall"]
                    )
                    self._maybe_finish(run)
                return
            error = verdicts.conflict(run, step, conflict)
        self._end_attempt(task, A.FAILED, usage, error=error)
        self._attempt_failed(run, step, error, error)

    def _release(self, task: Task) -> None:
        task.slot.task = None
        task.timer = 0
        if task.step.parent is not None and not task.hook:
            self._release_item(task.step)

    def _end_attempt(
        self, task: Task, outcome: AttemptOutcome, usage: dict[str, float] | None = None, **how: Any
    ) -> None:
        """Record how an attempt ended and what it cost (``how``: ``exit_``, ``error``, ``traceback``)."""
        elapsed = self.clock.monotonic() - task.started
        step = task.step
        step.usage, record = verdicts.attempt_record(
            task, outcome, now=self.clock.now(), elapsed=elapsed, usage=usage, **how
        )
        verdicts.keep_attempt(step.history, record)

    def _hook_done(self, run: Run, step: StepRun) -> None:
        """A hook ended (however it ended): the step takes the outcome that was decided before it."""
        hook, step.hook = step.hook, None
        if hook is Hook.SUCCESS:
            self._finish(run, step, S.SUCCEEDED, duration=(step.usage or {}).get("wall", 0.0))
        else:
            assert step.final_error is not None
            self._fail_for_good(run, step, step.final_error)
        self._maybe_finish(run)

    def _finish(self, run: Run, step: StepRun, status: StepStatus, *, reason: str = "", duration: float = 0.0) -> None:
        self._set_status(run, step, status)
        step.finished_at = self.clock.now()
        step.error = None
        if status is S.SUCCEEDED:
            fields = {"attempt": step.attempts, "duration": duration, "usage": step.usage, **_key(step)}
            self._event(ev.StepSucceeded, run, step.finished_at, step_id=step.sid, **fields)
            outcome = Outcome.SUCCEEDED
        else:
            self._event(ev.StepSkipped, run, step.finished_at, step_id=step.sid, reason=reason, **_key(step))
            outcome = Outcome.SKIPPED
        self._propagate(run, step, outcome)

    def _propagate(self, run: Run, step: StepRun, outcome: Outcome) -> None:
        if step.parent is not None:
            return  # an item: its step ends when the SETTLE table says (items.py)
        now = None
        for j, via_any in run.compiled.dependents[step.index]:
            nxt = run.steps[j]
            if nxt.gate.record(outcome, via_any=via_any) and not nxt.done:
                if now is None:
                    now = self.clock.monotonic()
                self._decide(run, nxt, now)

    # -- 7. the run ends ----------------------------------------------------------------

    def _maybe_finish(self, run: Run) -> None:
        if run.unsettled:
            self._settle(run)  # for_each steps whose items moved may end now (items.py)
        # Cheapest first: in a running fan-out most steps are unfinished, and _busy walks the slots.
        if run.final or (run.stopping is None and run.unfinished) or self._busy(run) or self._output_pending(run):
            return
        now = self.clock.now()
        if run.stopping is Stopping.CANCEL:
            new = W.CANCELLED
            run.error = Cancelled(run.iid, run.workflow_id)
            self._event(ev.WorkflowCancelled, run, now)
        elif run.stopping is Stopping.FAIL:
            new = W.FAILED
            self._event(ev.WorkflowFailed, run, now, error=str(run.error), failed_step=run.failed_step)
        else:
            new = W.COMPLETED
            self._event(ev.WorkflowCompleted, run, now, duration=self.clock.monotonic() - run.started_mono)
        check_workflow_transition(run.iid, run.status, new)
        run.status = new
        self._commits.dirty[run.iid] = run
        self._commits.finished.append(run)

    def _busy(self, run: Run) -> bool:
        """An attempt or hook of ``run`` is in a worker slot, running or queued (a slot being stopped counts:
        its queued step stays until the stop ends, when it is put back)."""
        return any(
            (s.task is not None and s.task.run is run) or (s.next is not None and s.next.run is run)
            for s in self.pool.slots
        )

    # -- 8. commit: one checkpoint per turn, then what it allows ---------------------------

    def _commit(self) -> None:
        """Release what earlier commits allow; write this turn's changes (unless a write is in flight)."""
        self._commits.release(self._ended, self._store_failed)
        # No step in a worker: nothing can arrive while this checkpoint is written, so write it in this thread.
        idle = not any(s.task is not None for s in self.pool.slots)
        self._commits.write_turn(next(self._seq), self.owner, self.clock.now(), waited_on=idle)
        self._commits.release(self._ended, self._store_failed)

    def _ended(self, run: Run) -> None:
        """A run's end is committed: it leaves the scheduler and lets go of its data; its waiters learn it."""
        self.runs.pop(run.iid, None)
        self.outcomes.ended(run, self.runs)
        run.let_go()

    def _store_failed(self, runs: list[Run], exc: Exception) -> None:
        # The error is handled: it becomes each run's error (wait_for_completion, the events).
        # One line for who follows the log; the traceback only for who debugs.
        log.info("wfaas could not write a checkpoint; stopping %d run(s): %s", len(runs), exc)
        log.debug("the checkpoint's failure", exc_info=exc)
        for run in runs:
            if not run.final:
                run.stopping = Stopping.FAIL
                run.error = verdicts.store_failed(run, exc)
                self._park_waiting(run)
                self.supervisor.cancel(run, None)  # its attempts cannot be checkpointed
                self._maybe_finish(run)

    # -- helpers ---------------------------------------------------------------------

    def _set_status(self, run: Run, step: StepRun, new: StepStatus) -> None:
        old = step.status
        if old is not new:
            check_step_transition(run.iid, step.label, old, new)
            run.done_steps += (new in DONE) - (old in DONE) if step.parent is None else 0
            step.status = new
        if step.parent is not None:
            step.table.moved(step, old)
            run.unsettled.add(step.parent)
        run.dirty_steps.add(step.index)
        self._commits.dirty[run.iid] = run

    def _event(self, kind: type, run: Run, when: datetime, **fields: Any) -> None:
        if self.bus.has_subscribers:
            where = {"instance_id": run.iid, "workflow_id": run.workflow_id, "timestamp": when}
            self._commits.events.append(kind(**where, **fields))

    def abandon(self, exc: BaseException) -> None:
        """The thread crashed: every run fails, rather than hang its waiters."""
        super().abandon(exc)
        for run in list(self.runs.values()):
            if not run.final:  # a run that finished but whose commit is pending keeps its status
                run.error = StepFailed(f"the engine's scheduler crashed: {exc!r}", instance_id=run.iid)
                check_workflow_transition(run.iid, run.status, W.FAILED)
                run.status = W.FAILED
            finished = self.outcomes.setdefault(run.iid, Finished(run.status, run.error, run.done))
            finished.status, finished.error = run.status, run.error  # waiting callers read this object
            run.done.set()
            for waiter in run.waiters:
                if run.error is None:
                    waiter.set_result(run.status)
                else:
                    waiter.set_exception(run.error)


def _restore(run: Run, records: dict[str, dict[str, Any]], reruns: set[str]) -> list[StepRun]:
    """A resumed run's steps as they were checkpointed; the ones that need not run again."""
    done = []
    for step in run.steps:
        rec = records.get(step.sid)
        if rec is None:
            continue
        step.attempts = step.budget_start = rec.get("attempts", 0)
        step.started_at, step.finished_at = rec.get("started_at"), rec.get("finished_at")
        step.history = list(rec.get("history") or ())
        step.status = S(rec["status"])  # as recorded; start_run moves what runs again to PENDING
        if step.status in (S.SUCCEEDED, S.SKIPPED) and step.sid not in reruns:
            step.error = rec.get("error")
            done.append(step)
        elif step.sid not in reruns:
            step.items = ItemTable.restored(step, rec)  # for_each: its collection is not computed again
    return done
