"""When a step may start: the readiness truth table, as data, and pure functions over it.

How a finished dependency counts for the steps that wait on it:

=====================================  ===================  ========================
dependency ended as                    ``depends_on`` (all)  ``depends_on_any``
=====================================  ===================  ========================
SUCCEEDED                              finished              satisfied (start now)
SKIPPED (``run_if`` false / ``SKIP``)  finished              finished, not satisfied
FAILED with ``CONTINUE_NEXT_STEP``     finished              finished, not satisfied
FAILED with ``FAIL_WORKFLOW``          (instance fails: nothing new starts)
=====================================  ===================  ========================

A step is ready when every ``depends_on`` dependency finished and, if it has
``depends_on_any`` dependencies, one of them succeeded or all of them finished.
A ready step then runs, is skipped (``run_if`` false) or waits (``with_delay``
from the moment it became ready, and/or ``scheduled_at``).

Nothing here touches processes, stores or clocks: the scheduler feeds facts in
and acts on the answers, and the tests check the table directly.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass


class Outcome(enum.Enum):
    """How a dependency ended, as far as its dependents care."""

    SUCCEEDED = "succeeded"
    SKIPPED = "skipped"
    FAILED_CONTINUE = "failed, continue"


@dataclass(frozen=True)
class Counts:
    """What one outcome does to a waiting step's gate."""

    finishes: bool
    satisfies_any: bool


# The truth table above, as the code reads it.
TRUTH_TABLE: dict[Outcome, Counts] = {
    Outcome.SUCCEEDED: Counts(finishes=True, satisfies_any=True),
    Outcome.SKIPPED: Counts(finishes=True, satisfies_any=False),
    Outcome.FAILED_CONTINUE: Counts(finishes=True, satisfies_any=False),
}


@dataclass
class Gate:
    """A step's progress towards readiness, updated once per finished dependency: O(edges) per run."""

    all_pending: int
    any_total: int
    any_finished: int = 0
    any_succeeded: bool = False
    opened: bool = False

    def record(self, outcome: Outcome, *, via_any: bool) -> bool:
        """Count one finished dependency; True exactly once, when the gate opens."""
        counts = TRUTH_TABLE[outcome]
        if via_any:
            self.any_finished += counts.finishes
            self.any_succeeded = self.any_succeeded or counts.satisfies_any
        else:
            self.all_pending -= counts.finishes
        return self.check()

    def check(self) -> bool:
        """Open the gate if the table says so; True only on the call that opens it."""
        if self.opened:
            return False
        any_ok = self.any_total == 0 or self.any_succeeded or self.any_finished >= self.any_total
        if self.all_pending <= 0 and any_ok:
            self.opened = True
            return True
        return False


class Decision(enum.Enum):
    """What to do with a step whose gate just opened (or whose wait just ended)."""

    RUN = "run"
    SKIP = "skip"
    WAIT = "wait"


def decide(
    condition: Callable[[], bool] | None, ready_at: float, now: float, not_before: float | None
) -> tuple[Decision, float]:
    """RUN, SKIP or WAIT until the returned monotonic time.

    ``ready_at`` is when the gate opened plus the step's delay; ``not_before``
    is ``scheduled_at`` on the monotonic clock (None: unscheduled). The
    ``run_if`` condition is asked only once the wait is over, just before
    dispatch, so it sees the data as it is then.
    """
    due = ready_at if not_before is None else max(ready_at, not_before)
    if due > now:
        return Decision.WAIT, due
    if condition is not None and not condition():
        return Decision.SKIP, now
    return Decision.RUN, now
