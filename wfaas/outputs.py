"""The scheduler's part that keeps what attempts printed and logged (``capture.py``), and waits for it.

What an attempt printed reaches the scheduler live (``wire.Output``, while
it runs) and whole: in its reply, or in a ``wire.Tail`` right after it, so
that the engine reads the reply while the worker ends the capture (issue 13:
nothing of the capture on a chain's path from one step to the next). Local
workers do the latter unless someone subscribed to the events, who would
then see a step's last lines after its StepSucceeded (``Dispatch._tail``).
The reply then says ``wire.TAIL``, and the slot holds the task
(``Slot.tail``) until the worker's next message: a ``Tail``, or anything
else, which says there was none. A run ends only once its attempts' output
is in (``_output_pending`` asks an idle worker for a ``wire.Synced``), so
that its last checkpoint holds every log. A mixin of
:class:`~wfaas.scheduler.Scheduler`, as ``failures.py``'s ``Failures`` is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from . import events as ev
from . import verdicts, wire
from .items import key_field as _key

if TYPE_CHECKING:
    from datetime import datetime

    from .clock import Clock
    from .commits import Commits
    from .pool import Pool, Slot
    from .runs import Run, Task

    class Scheduler(Protocol):
        """What ``Outputs`` uses of the scheduler it is part of (a self-type for mypy)."""

        clock: Clock
        pool: Pool
        _commits: Commits

        def _event(self, kind: type, run: Run, when: datetime, **fields: Any) -> None: ...
        def _maybe_finish(self, run: Run) -> None: ...
        def _send(self, sends: list[tuple[Slot, bytes]]) -> None: ...
        def _keep_output(self, task: Task, lines: list[Any], cut: int, fresh: int = 0) -> None: ...
        def _output_event(self, task: Task, lines: list[Any]) -> None: ...


class Outputs:
    """Attempts' output: checkpointed with the run, published as ``StepOutput`` (``self`` is the scheduler)."""

    def _keep_output(self: Scheduler, task: Task, lines: list[Any], cut: int, fresh: int = 0) -> None:
        """What an attempt (or hook) printed and logged: checkpointed with it; what was not sent live, published."""
        run = task.run
        run.keep_log(task, lines, cut, verdicts.HISTORY_KEPT)
        self._commits.dirty[run.iid] = run
        if fresh < len(lines):
            self._output_event(task, lines[fresh:])

    def _output_event(self: Scheduler, task: Task, lines: list[Any]) -> None:
        fields = {"step_id": task.step.sid, "attempt": task.attempt, "lines": tuple(lines), **_key(task.step)}
        self._event(ev.StepOutput, task.run, self.clock.now(), **fields)

    def _on_tail(self: Scheduler, slot: Slot, message: wire.FromWorker) -> bool:
        """A message from a worker whose last reply said its output follows (``wire.TAIL``): whether it was that
        output. Any other message says there was none (``wire.py``), but a live ``Output`` sent with the reply."""
        tail: Task = slot.tail
        if isinstance(message, wire.Output) and message.task_id == tail.id:
            self._output_event(tail, message.lines)
            return True
        if isinstance(message, wire.Tail):
            self._keep_output(tail, *message.output)
        slot.tail = None
        if slot.syncing:  # its run waits for it (_output_pending)
            slot.syncing = False
            self._maybe_finish(tail.run)
        return isinstance(message, wire.Tail | wire.Synced)

    def _output_pending(self: Scheduler, run: Run) -> bool:
        """An attempt of ``run`` replied and its output may still follow (``wire.TAIL``): ask its worker to say
        when it has come (``wire.SYNC``), so that a run ends with every attempt's output checkpointed."""
        pending = [s for s in self.pool.slots if s.tail is not None and s.tail.run is run]
        for slot in pending:
            if not slot.syncing:
                slot.syncing = True
                self._send([(slot, wire.SYNC)])
        return bool(pending)
