"""Workflow and step definitions: what to run, in which order, with which policies.

Definitions are plain builders; nothing runs here. ``validate`` lists every
problem of a definition at once and ``compile`` turns a valid one into the
index-based graph the scheduler walks in O(steps + edges).
"""

from __future__ import annotations

import enum
import hashlib
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from .steps import StepExecutor, WorkflowContext

__all__ = [
    "Backoff",
    "Exponential",
    "FailureAction",
    "Fixed",
    "Linear",
    "RetryPolicy",
    "StepDefinition",
    "WorkflowDefinition",
]

Seconds = float | int | timedelta


def to_seconds(value: Seconds, what: str) -> float:
    """Seconds as a float from a number or a ``timedelta``; negative is an error."""
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if seconds < 0:
        raise ValueError(f"{what} must not be negative, got {seconds} s")
    return seconds


class FailureAction(enum.Enum):
    """What a step that failed for good does to its instance."""

    FAIL_WORKFLOW = "fail_workflow"
    CONTINUE_NEXT_STEP = "continue_next_step"
    RETRY_INDEFINITELY = "retry_indefinitely"


@dataclass(frozen=True)
class Backoff:
    """The wait before each retry: ``delay(n)`` is the wait before attempt n+1.

    Build one with :meth:`fixed`, :meth:`exponential` or :meth:`linear`.
    ``jitter`` is a fraction: 0.1 spreads each wait uniformly over ±10 %,
    never past ``max``.
    """

    kind: str
    base: float
    max: float
    jitter: float = 0.0

    @classmethod
    def fixed(cls, delay: Seconds, *, jitter: float = 0.0) -> Backoff:
        """The same wait before every retry."""
        d = to_seconds(delay, "Backoff.fixed(delay)")
        return cls("fixed", d, d, _check_jitter(jitter))

    @classmethod
    def exponential(cls, base: Seconds, max: Seconds, *, jitter: float = 0.0) -> Backoff:  # noqa: A002 - the seed's name
        """base, 2·base, 4·base … capped at ``max``."""
        return cls("exponential", to_seconds(base, "base"), to_seconds(max, "max"), _check_jitter(jitter))

    @classmethod
    def linear(cls, increment: Seconds, max: Seconds, *, jitter: float = 0.0) -> Backoff:  # noqa: A002 - the seed's name
        """increment, 2·increment … capped at ``max``."""
        return cls("linear", to_seconds(increment, "increment"), to_seconds(max, "max"), _check_jitter(jitter))

    def delay(self, failed_attempts: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the ``failed_attempts``-th failure (1-based)."""
        n = max(1, failed_attempts)
        if self.kind == "fixed":
            value = self.base
        elif self.kind == "exponential":
            # Capped before multiplying out so that attempt 10_000 does not overflow.
            value = self.max if n > 64 else min(self.max, self.base * (2 ** (n - 1)))
        else:
            value = min(self.max, self.base * n)
        if self.jitter:
            spread = value * self.jitter
            value += (rng or random).uniform(-spread, spread)
            value = min(max(0.0, value), self.max)
        return value


def _check_jitter(jitter: float) -> float:
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter is a fraction between 0 and 1, got {jitter}")
    return float(jitter)


def Fixed(delay: Seconds, *, jitter: float = 0.0) -> Backoff:  # noqa: N802 - the seed's spelling
    """Alias of :meth:`Backoff.fixed` (the seed's spelling)."""
    return Backoff.fixed(delay, jitter=jitter)


def Exponential(base: Seconds, max: Seconds, *, jitter: float = 0.0) -> Backoff:  # noqa: N802, A002
    """Alias of :meth:`Backoff.exponential` (the seed's spelling)."""
    return Backoff.exponential(base, max, jitter=jitter)


def Linear(increment: Seconds, max: Seconds, *, jitter: float = 0.0) -> Backoff:  # noqa: N802, A002
    """Alias of :meth:`Backoff.linear` (the seed's spelling)."""
    return Backoff.linear(increment, max, jitter=jitter)


@dataclass(frozen=True)
class RetryPolicy:
    """How often a step is attempted (``max_attempts`` counts the first) and how long between."""

    max_attempts: int = 1
    backoff: Backoff = field(default_factory=lambda: Backoff.fixed(0))

    def __post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(
                f"RetryPolicy(max_attempts={self.max_attempts!r}): counts attempts, the first included; use 1 or more"
            )


NO_RETRY = RetryPolicy()

Condition = Callable[[WorkflowContext[Any]], bool]


class StepDefinition:
    """One step: an id, a display name, a body and its policies. Every ``with_*`` chains."""

    def __init__(self, id: str, name: str, body: Any) -> None:  # noqa: A002 - the seed's name
        self.id = id
        self.name = name
        self.body = body
        self.dependencies: list[str] = []
        self.any_dependencies: list[str] = []
        self.retry: RetryPolicy | None = None
        self.timeout: float | None = None
        self.failure_action = FailureAction.FAIL_WORKFLOW
        self.condition: Condition | None = None
        self.delay: float = 0.0
        self.schedule: datetime | None = None
        self.memory_limit: int | None = None
        self.items: Callable[[Any], Iterable[Any]] | None = None  # for_each
        self.concurrency: int | None = None

    def depends_on(self, step_ids: Iterable[str]) -> StepDefinition:
        """Run after **all** of these finished (succeeded, skipped, or failed with CONTINUE_NEXT_STEP)."""
        self.dependencies.extend(_ids(step_ids, "depends_on"))
        return self

    def depends_on_any(self, step_ids: Iterable[str]) -> StepDefinition:
        """Run once **one** of these succeeded; if none does, once all of them finished."""
        self.any_dependencies.extend(_ids(step_ids, "depends_on_any"))
        return self

    def with_retry(self, policy: RetryPolicy) -> StepDefinition:
        """Attempt up to ``policy.max_attempts`` times, waiting ``policy.backoff`` between."""
        if not isinstance(policy, RetryPolicy):
            raise TypeError(f"step {self.id!r}: with_retry takes a RetryPolicy, got {type(policy).__name__}")
        self.retry = policy
        return self

    def with_timeout(self, seconds: Seconds) -> StepDefinition:
        """Kill an attempt (its whole process tree) after this many seconds."""
        self.timeout = to_seconds(seconds, f"step {self.id!r}: timeout")
        return self

    def with_failure_action(self, action: FailureAction) -> StepDefinition:
        """What failing for good does: fail the workflow (default), continue, or retry forever."""
        self.failure_action = FailureAction(action)
        return self

    def run_if(self, condition: Condition) -> StepDefinition:
        """Skip the step when ``condition(ctx)`` is false; evaluated in the scheduler, keep it cheap."""
        self.condition = condition
        return self

    def with_delay(self, seconds: Seconds) -> StepDefinition:
        """Wait this long after the dependencies are met (no worker is held meanwhile)."""
        self.delay = to_seconds(seconds, f"step {self.id!r}: delay")
        return self

    def scheduled_at(self, when: datetime) -> StepDefinition:
        """Do not start before ``when`` (an aware datetime)."""
        if not isinstance(when, datetime) or when.tzinfo is None or when.utcoffset() is None:
            raise ValueError(
                f"step {self.id!r}: scheduled_at needs an aware datetime, e.g. datetime.now(timezone.utc); got {when!r}"
            )
        self.schedule = when
        return self

    def with_memory_limit(self, limit_bytes: int) -> StepDefinition:
        """Stop an attempt whose worker (with its children) uses more than this much memory."""
        if limit_bytes <= 0:
            raise ValueError(f"step {self.id!r}: memory limit must be positive, got {limit_bytes}")
        self.memory_limit = int(limit_bytes)
        return self

    def for_each(self, items: Callable[[Any], Iterable[Any]]) -> StepDefinition:
        """Run the body once per item of ``items(data)``, computed in the scheduler when the step is ready.

        Each item is its own unit of work (retry, timeout, memory limit apply
        per item); the body sees it as ``ctx.item`` and its key as
        ``ctx.item_key`` (API.md §12).
        """
        if not callable(items):
            raise TypeError(
                f"step {self.id!r}: for_each takes a function of the data returning the items, "
                f"e.g. .for_each(lambda data: data.files); got {type(items).__name__}"
            )
        self.items = items
        return self

    def with_concurrency(self, n: int) -> StepDefinition:
        """Run at most ``n`` attempts of this step (items or not) at once; ``n >= 1``."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"step {self.id!r}: with_concurrency needs a whole number >= 1, got {n!r}")
        self.concurrency = n
        return self

    def __repr__(self) -> str:
        return f"StepDefinition({self.id!r}, {self.name!r})"


def _ids(step_ids: Iterable[str], what: str) -> list[str]:
    if isinstance(step_ids, str):
        return [step_ids]  # depends_on("a") is an easy slip; take it as ["a"]
    ids = list(step_ids)
    for sid in ids:
        if not isinstance(sid, str):
            raise TypeError(f"{what} takes step ids (str), got {sid!r}")
    return ids


class WorkflowDefinition:
    """A named DAG of steps, with defaults for retry and timeout."""

    def __init__(self, id: str, name: str = "", data_type: type | None = None) -> None:  # noqa: A002
        self.id = id
        self.name = name or id
        self.data_type = data_type
        self.steps: list[StepDefinition] = []
        self.default_retry: RetryPolicy | None = None
        self.default_timeout: float | None = None
        self.default_memory_limit: int | None = None

    def add_step(self, step: StepDefinition) -> WorkflowDefinition:
        """Append a step; order does not matter, dependencies do."""
        self.steps.append(step)
        return self

    def with_default_retry(self, policy: RetryPolicy) -> WorkflowDefinition:
        """The retry policy of every step that sets none."""
        self.default_retry = policy
        return self

    def with_default_timeout(self, seconds: Seconds) -> WorkflowDefinition:
        """The timeout of every step that sets none."""
        self.default_timeout = to_seconds(seconds, f"workflow {self.id!r}: default timeout")
        return self

    def step(self, step_id: str) -> StepDefinition:
        """The step with this id (``KeyError`` naming the known ids otherwise)."""
        for s in self.steps:
            if s.id == step_id:
                return s
        raise KeyError(f"workflow {self.id!r} has no step {step_id!r} (steps: {', '.join(s.id for s in self.steps)})")

    def validate(self) -> list[str]:
        """Every problem of this definition, as sentences; empty when it is valid."""
        return validate(self)

    def explain(self) -> str:
        """The DAG as text: one line per step, in an order that respects dependencies."""
        problems = validate(self)
        if problems:
            return f"{self.id}: invalid definition\n" + "\n".join(f"  - {p}" for p in problems)
        lines = [f"workflow {self.id!r} ({self.name}), {len(self.steps)} steps:"]
        for s in topological_order(self):
            parts = []
            if s.dependencies:
                parts.append("after all of " + ", ".join(s.dependencies))
            if s.any_dependencies:
                parts.append("after any of " + ", ".join(s.any_dependencies))
            flags = [for_each_text(s)] if s.items is not None or s.concurrency is not None else []
            if s.condition is not None:
                flags.append("run_if")
            if s.delay:
                flags.append(f"delay {s.delay:g}s")
            if s.schedule is not None:
                flags.append(f"at {s.schedule.isoformat()}")
            policy = s.retry or self.default_retry
            if policy and policy.max_attempts > 1:
                flags.append(f"retry ×{policy.max_attempts}")
            timeout = s.timeout if s.timeout is not None else self.default_timeout
            if timeout is not None:
                flags.append(f"timeout {timeout:g}s")
            if s.failure_action is not FailureAction.FAIL_WORKFLOW:
                flags.append(s.failure_action.name)
            tail = "; ".join(parts) or "start"
            lines.append(f"  {s.id} [{s.name}] <- {tail}" + (f"  ({', '.join(flags)})" if flags else ""))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"WorkflowDefinition({self.id!r}, {len(self.steps)} steps)"


def for_each_text(step: StepDefinition) -> str:
    """``for each``, ``for each, at most 4 at once`` or ``at most 4 at once``: how ``graph`` and ``plan``
    mark a step that runs once per item, and its concurrency cap."""
    cap = f"at most {step.concurrency} at once" if step.concurrency is not None else ""
    return ", ".join(part for part in ("for each" if step.items is not None else "", cap) if part)


def validate(definition: WorkflowDefinition) -> list[str]:
    """Every problem of a definition at once: ids, bodies, dependencies, cycles."""
    problems: list[str] = []
    if not isinstance(definition.id, str) or not definition.id:
        problems.append(f"the workflow id must be a non-empty string, got {definition.id!r}")
    if not definition.steps:
        problems.append("the workflow has no steps; add one with .add_step(StepDefinition(id, name, body))")
    seen: set[str] = set()
    for step in definition.steps:
        if not isinstance(step, StepDefinition):  # users pass anything
            problems.append(f"add_step got {type(step).__name__}, not a StepDefinition")  # type: ignore[unreachable]
            continue
        if not isinstance(step.id, str) or not step.id:
            problems.append(f"a step id must be a non-empty string, got {step.id!r}")
        elif step.id in seen:
            problems.append(f"duplicate step id {step.id!r}")
        seen.add(step.id)
        if isinstance(step.body, type) and issubclass(step.body, StepExecutor):
            problems.append(
                f"step {step.id!r}: the body is the class {step.body.__name__}; "
                f"pass an instance: {step.body.__name__}()"
            )
        elif not (isinstance(step.body, StepExecutor) or callable(step.body)):
            problems.append(
                f"step {step.id!r}: the body must be callable (fn(ctx)) or a StepExecutor, "
                f"got {type(step.body).__name__}"
            )
    steps = [s for s in definition.steps if isinstance(s, StepDefinition)]
    for step in steps:
        for kind, deps in (("depends_on", step.dependencies), ("depends_on_any", step.any_dependencies)):
            for dep in deps:
                if dep not in seen:
                    problems.append(f"step {step.id!r}: {kind} names unknown step {dep!r}")
                elif dep == step.id:
                    problems.append(f"step {step.id!r} depends on itself")
    for cycle in _cycles(steps, seen):
        problems.append("dependency cycle: " + " -> ".join(cycle) + " (each step depends on the next)")
    return problems


def _cycles(steps: Sequence[StepDefinition], known: set[str]) -> list[list[str]]:
    """Cycles of the dependency graph, each named once (iterative DFS, no recursion limit)."""
    graph: dict[str, list[str]] = {}
    for s in steps:  # a duplicated id keeps the edges of every copy, so no cycle hides behind it
        graph.setdefault(s.id, []).extend(d for d in (*s.dependencies, *s.any_dependencies) if d in known and d != s.id)
    color = dict.fromkeys(graph, 0)  # 0 new, 1 on the stack, 2 done
    cycles: list[list[str]] = []
    for root in graph:
        if color[root]:
            continue
        stack: list[tuple[str, int]] = [(root, 0)]
        path: list[str] = [root]
        color[root] = 1
        while stack:
            node, i = stack[-1]
            deps = graph[node]
            if i < len(deps):
                stack[-1] = (node, i + 1)
                nxt = deps[i]
                if color[nxt] == 0:
                    color[nxt] = 1
                    stack.append((nxt, 0))
                    path.append(nxt)
                elif color[nxt] == 1:
                    cycles.append([*path[path.index(nxt) :], nxt])
            else:
                color[node] = 2
                stack.pop()
                path.pop()
    return cycles


def topological_order(definition: WorkflowDefinition) -> list[StepDefinition]:
    """Steps so that each comes after its dependencies (Kahn; stable in definition order)."""
    by_id = {s.id: s for s in definition.steps}
    indegree = {s.id: len(set(s.dependencies) | set(s.any_dependencies)) for s in definition.steps}
    dependents: dict[str, list[str]] = {s.id: [] for s in definition.steps}
    for s in definition.steps:
        for dep in set(s.dependencies) | set(s.any_dependencies):
            dependents[dep].append(s.id)
    queue = [s.id for s in definition.steps if indegree[s.id] == 0]
    order: list[StepDefinition] = []
    i = 0
    while i < len(queue):
        sid = queue[i]
        i += 1
        order.append(by_id[sid])
        for d in dependents[sid]:
            indegree[d] -= 1
            if indegree[d] == 0:
                queue.append(d)
    return order


def fingerprint(definition: WorkflowDefinition) -> dict[str, Any]:
    """What a stored run remembers of its definition, to notice code changes on resume."""
    steps = {}
    for s in definition.steps:
        steps[s.id] = {
            "depends_on": sorted(s.dependencies),
            "depends_on_any": sorted(s.any_dependencies),
            "code": body_hash(s.body),
        }
        if s.items is not None:  # only then: runs stored before for_each keep their fingerprint
            steps[s.id]["for_each"] = body_hash(s.items)
    return {"workflow_id": definition.id, "steps": steps}


def fingerprint_changes(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(structural differences, steps whose code changed) between two definition fingerprints."""
    structural: list[str] = []
    old_steps, new_steps = old.get("steps", {}), new.get("steps", {})
    for sid in old_steps.keys() - new_steps.keys():
        structural.append(f"step {sid!r} was removed")
    for sid in new_steps.keys() - old_steps.keys():
        structural.append(f"step {sid!r} was added")
    bodies = []
    for sid in old_steps.keys() & new_steps.keys():
        a, b = old_steps[sid], new_steps[sid]
        for kind in ("depends_on", "depends_on_any"):
            if a[kind] != b[kind]:
                structural.append(f"step {sid!r}: {kind} was {a[kind]}, is now {b[kind]}")
        if ("for_each" in a) != ("for_each" in b):
            structural.append(
                f"step {sid!r}: " + ("is no longer" if "for_each" in a else "is now") + " a for_each step"
            )
        if a["code"] != b["code"]:
            bodies.append(sid)
    return sorted(structural), sorted(bodies)


def body_hash(body: Any) -> str:
    """A short hash of a step body's code (bytecode and constants), or its type name."""
    fn = body.fn if hasattr(body, "fn") else body
    code = getattr(fn, "__code__", None)
    if code is None:
        execute = getattr(type(fn), "execute", None)
        code = getattr(execute, "__code__", None)
    if code is None:
        return type(fn).__qualname__
    digest = hashlib.sha256()
    _hash_code(code, digest)
    return digest.hexdigest()[:16]


def _hash_code(code: Any, digest: Any) -> None:
    # Nested functions' code objects print with their memory address: hash their contents instead.
    digest.update(code.co_code)
    digest.update(repr(code.co_names).encode(errors="replace"))
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            _hash_code(const, digest)
        else:
            digest.update(repr(const).encode(errors="replace"))
