"""The scheduler's part that handles what goes wrong: a failed attempt, a stopped tree, a cancel.

Sections 5 and 6 of the journey drawn in ``scheduler.py``'s docstring, and
``cancel``; a mixin of :class:`~wfaas.scheduler.Scheduler` (the only writer of
run state), as ``items.py``'s ``ForEachSteps`` is. What is decided (retry or
not, the wording of kill and crash errors) lives in ``verdicts.py``; this
module does what the verdict says.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
from typing import TYPE_CHECKING, Any, Protocol

from . import events as ev
from . import verdicts
from .definition import FailureAction
from .errors import InvalidStateTransition, WorkflowError
from .items import items_of
from .items import key_field as _key
from .loopio import TimerKind
from .pool import Exit, Slot
from .readiness import Outcome
from .runs import Hook, KillReason, Run, StepRun, Stopping, Task, WaitKind
from .states import StepStatus, WorkflowStatus
from .verdicts import Verdict

if TYPE_CHECKING:
    from datetime import datetime

    from . import wire
    from .clock import Clock
    from .pool import Pool
    from .states import AttemptOutcome
    from .store import StateStore
    from .supervision import Supervisor

    class Scheduler(Protocol):
        """What ``Failures`` uses of the scheduler it is part of (a self-type for mypy)."""

        clock: Clock
        pool: Pool
        runs: dict[str, Run]
        store: StateStore
        supervisor: Supervisor

        def timer(self, when: float, kind: TimerKind, target: Any) -> int: ...
        def _set_status(self, run: Run, step: StepRun, new: StepStatus) -> None: ...
        def _event(self, kind: type, run: Run, when: datetime, **fields: Any) -> None: ...
        def _queue_hook(self, run: Run, step: StepRun, hook: Hook) -> None: ...
        def _propagate(self, run: Run, step: StepRun, outcome: Outcome) -> None: ...
        def _maybe_finish(self, run: Run) -> None: ...
        def _release(self, task: Task) -> None: ...
        def _hook_done(self, run: Run, step: StepRun) -> None: ...
        def _on_message(self, slot: Slot, message: wire.FromWorker) -> None: ...
        def _end_attempt(
            self, task: Task, outcome: AttemptOutcome, usage: dict[str, float] | None = None, **how: Any
        ) -> None: ...
        def _attempt_failed(
            self, run: Run, step: StepRun, error: WorkflowError, cause: BaseException, *, may_retry: bool = True
        ) -> None: ...
        def _fail_for_good(self, run: Run, step: StepRun, error: WorkflowError) -> None: ...
        def _park_waiting(self, run: Run) -> None: ...
        def _unqueue(self, task: Task) -> None: ...
        def _unbegin(self, task: Task) -> None: ...
        def _on_retire(self, slot: Slot, reason: str) -> None: ...
        def _take_back_run(self, run: Run) -> None: ...


S, W = StepStatus, WorkflowStatus
log = logging.getLogger("wfaas")


class Failures:
    """Retry, hook or fail for good; crashes and kills; cancel (``self`` is the scheduler)."""

    # -- 5. failures: retry, hook, or fail for good ------------------------------------

    def _attempt_failed(
        self: Scheduler, run: Run, step: StepRun, error: WorkflowError, cause: BaseException, *, may_retry: bool = True
    ) -> None:
        verdict, delay = verdicts.after_failure(run, step, cause, may_retry=may_retry)
        step.error = verdicts.reason(error)
        now = self.clock.now()
        retry = verdict is Verdict.RETRY
        fields = {"attempt": step.attempts, "error": str(error), "will_retry": retry, "usage": step.usage}
        self._event(ev.StepFailed, run, now, step_id=step.sid, **fields, **_key(step))
        if retry:
            self._set_status(run, step, S.WAITING)
            step.waited_from, step.wait_kind = self.clock.monotonic(), WaitKind.BACKOFF
            step.wait_until = now + verdicts.delta(delay)
            step.timer = self.timer(self.clock.monotonic() + delay, TimerKind.RETRY, step)
            retrying = {"attempt": step.attempts + 1, "delay": delay}
            self._event(ev.StepRetrying, run, now, step_id=step.sid, **retrying, **_key(step))
            return
        step.final_error = error
        if verdict is Verdict.HOOK:
            self._queue_hook(run, step, Hook.FAILURE)
        else:
            self._fail_for_good(run, step, error)

    def _fail_for_good(self: Scheduler, run: Run, step: StepRun, error: WorkflowError) -> None:
        self._set_status(run, step, S.FAILED)
        step.finished_at = self.clock.now()
        step.error = verdicts.reason(error)
        if run.compiled.steps[step.index].failure_action is FailureAction.CONTINUE_NEXT_STEP:
            self._propagate(run, step, Outcome.FAILED_CONTINUE)
        elif run.stopping is None:
            run.stopping = Stopping.FAIL
            run.error, run.failed_step = error, step.sid
            self._park_waiting(run)
        self._maybe_finish(run)

    def _park_waiting(self: Scheduler, run: Run) -> None:
        """The run stops: steps (and items) not yet started go back to PENDING (a resume starts them)."""
        self._take_back_run(run)  # those queued behind another step in a worker, too (dispatch.py)
        run.unsettled.update(s for s in run.steps if s.items is not None)
        for step in itertools.chain(run.steps, items_of(run)):
            if step.hook:
                continue  # an on_failure hook still runs; the step ends after it
            if step.status is S.WAITING or step.queued:
                step.queued = 0
                step.timer = 0
                if step.status is S.WAITING:
                    self._set_status(run, step, S.PENDING)
                    step.wait_until = None

    # -- 6. timeouts, crashes, kills ------------------------------------------------------

    def _on_worker_exit(self: Scheduler, slot: Slot) -> None:
        """A worker died on its own: fail only the step it ran, replace it."""
        while slot.conn is not None and slot.conn.poll():
            message = self.pool.receive(slot)
            if message is None:
                break
            self._on_message(slot, message)  # it finished before dying: keep its result (and a Retire after it)
        if not slot.dying:  # dying: it asked to be replaced (wire.Retire), and that has begun
            self.supervisor.worker_exited(slot)

    def _on_retire(self: Scheduler, slot: Slot, reason: str) -> None:
        """The worker could not put back what its last step changed in its process (``capture.py``) and exits
        without reading another message: a step sent to it since that step's reply never started."""
        log.info("replacing worker %s: %s", slot.pid, reason)
        if slot.task is not None:
            slot.task.kill_reason = KillReason.RETIRED
        if not slot.dying:
            self.supervisor.retire(slot)

    def _after_kill(self: Scheduler, slot: Slot, exit_: Exit) -> None:
        """A stopped tree is dead (``supervision.py`` stopped it): the attempt ends as its kill reason says."""
        task: Task | None = slot.task
        queued = slot.next  # a step queued behind it (dispatch.py), never read
        tail = slot.tail
        self.pool.spawn(slot)
        if tail is not None:
            self._maybe_finish(tail.run)  # the output it had still to send, if any, is lost with it
        if queued is not None:
            self._unqueue(queued)
            self._maybe_finish(queued.run)  # a stopping run may have waited for it
        if task is None:
            return  # its result arrived before the kill; nothing was lost
        run, step = task.run, task.step
        if task.kill_reason is KillReason.UNQUEUED:
            self._unqueue(task)
            self._maybe_finish(run)
            return
        if task.kill_reason is KillReason.RETIRED:
            self._unbegin(task)
            self._maybe_finish(run)
            return
        self._release(task)
        outcome, error = verdicts.killed(task, exit_)
        if task.hook:  # crashed or cancelled while a hook ran: the outcome was decided before it
            self._hook_done(run, step)
        elif error is not None:
            self._end_attempt(task, outcome, exit_=exit_, error=error)
            self._attempt_failed(run, step, error, error)
        else:
            self._set_status(run, step, S.CANCELLED)
            step.finished_at = self.clock.now()
            step.error = verdicts.CANCELLED_WHILE_RUNNING
            self._end_attempt(task, outcome, exit_=exit_)
            step.history[-1]["error"] = step.error
        self._maybe_finish(run)

    # -- cancel ---------------------------------------------------------------------------

    def cancel(self: Scheduler, iid: str, grace: float | None) -> concurrent.futures.Future[Any]:
        """Stop dispatching, kill running steps' trees; the future resolves once the run is CANCELLED."""
        run = self.runs.get(iid)
        if run is None:
            raise verdicts.not_cancellable(iid, self.store.read_meta(iid))
        if run.final:
            raise InvalidStateTransition(f"instance {iid}", run.status, W.CANCELLED, "it has already finished")
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        run.waiters.append(future)
        run.grace = grace
        if run.stopping is not Stopping.CANCEL:
            run.stopping = Stopping.CANCEL
            self._park_waiting(run)
        self.supervisor.cancel(run, grace)
        self._maybe_finish(run)
        return future
