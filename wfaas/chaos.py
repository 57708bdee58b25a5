"""Chaos self-test: run a workflow while killing its workers at random, then check nothing was lost.

Run it on your own machine::

    python -m wfaas.chaos [--steps 200] [--seed N] [--workers 2] [--kill-every 0.05]

It builds a random (seeded) DAG of short steps — chains, fan-outs and joins —
and runs it on a real engine with retries, while a thread sends SIGKILL or
SIGTERM to a randomly chosen *busy* worker at random moments (on average every
``--kill-every`` seconds). Each step appends a ``start`` line to its own log
file (named after ``ctx.idempotency_key``) when it begins, records its attempt
in the workflow data, and appends a ``done`` line right before it returns.

Then it checks what the engine promises:

* **lost = 0** — every step ended SUCCEEDED, its result is in the data, and
  the attempt the engine recorded as the successful one really ran to its end;
* **duplicates = 0** — no step started or finished again after the attempt
  the engine recorded as successful, and each step was reported succeeded once;
* **leftover processes = 0** — after the engine closed, none of its workers or
  anything they started is still running.

A kill can land between a step's ``done`` line and the moment its result
reaches the engine; that attempt counts as failed and the step runs again
(at-least-once, which is what ``ctx.idempotency_key`` is for). The report
shows those as *re-done*; they are expected and are not duplicates.

The exit status is 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from . import _threads, events
from .data import WorkflowData
from .definition import RetryPolicy, StepDefinition, WorkflowDefinition
from .engine import WorkflowEngine
from .errors import WorkflowError
from .states import StepStatus, WorkflowState, WorkflowStatus
from .steps import WorkflowContext

__all__ = ["ChaosData", "ChaosReport", "ChaosStep", "build_workflow", "main", "run_chaos"]

WORKFLOW_ID = "wfaas_chaos"


@dataclass
class ChaosData(WorkflowData):
    """The chaos workflow's data: each step records the attempt that produced its result."""

    workflow_type = "wfaas_chaos"
    done: dict[str, int] = field(default_factory=dict)


def _append(path: str, line: str) -> None:
    """Append one line with a single ``write`` (O_APPEND), so concurrent writers never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ChaosStep:
    """A short step: log its start, work for ``seconds``, record its attempt, log ``done``, return."""

    workdir: str
    seconds: float

    def log_path(self, ctx: WorkflowContext[ChaosData]) -> str:
        """The step's own log file, named after its idempotency key (stable across retries)."""
        return os.path.join(self.workdir, f"{ctx.idempotency_key}.log")

    def __call__(self, ctx: WorkflowContext[ChaosData]) -> None:
        path = self.log_path(ctx)
        busy = _busy_marker(self.workdir, os.getpid())
        _append(busy, "")  # the killer picks its victims among the workers running a step
        _append(path, f"{ctx.step_id} start {ctx.attempt} {os.getpid()}\n")
        time.sleep(self.seconds)
        ctx.data.done[ctx.step_id] = ctx.attempt
        _append(path, f"{ctx.step_id} done {ctx.attempt}\n")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(busy)


def _busy_marker(workdir: str, pid: int) -> str:
    return os.path.join(workdir, f"busy-{pid}")


def build_workflow(steps: int, seed: int, workdir: str, max_attempts: int = 50) -> WorkflowDefinition:
    """A random DAG of ``steps`` short steps: mostly chains and fan-outs, some joins and new roots."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    rng = random.Random(seed)
    wf = WorkflowDefinition(WORKFLOW_ID, "wfaas chaos self-test", data_type=ChaosData)
    wf.with_default_retry(RetryPolicy(max_attempts=max_attempts))
    ids = [f"s{i:03d}" for i in range(steps)]
    for i, sid in enumerate(ids):
        step = StepDefinition(sid, f"chaos step {i}", ChaosStep(workdir, rng.uniform(0.002, 0.02)))
        shape = rng.random()
        if i == 0 or shape >= 0.92:
            deps: list[str] = []  # a new root
        elif shape < 0.40:
            deps = [ids[i - 1]]  # a chain
        elif shape < 0.75:
            deps = [ids[rng.randrange(max(0, i - 20), i)]]  # one more branch of a fan-out
        else:
            window = ids[max(0, i - 12) : i]
            deps = rng.sample(window, k=min(len(window), rng.randint(2, 3)))  # a join
        wf.add_step(step.depends_on(deps))
    return wf


@dataclass
class ChaosReport:
    """What a chaos run did and what it found; ``ok`` when nothing was lost, duplicated or left over."""

    steps: int
    seed: int
    workers: int
    kill_every: float
    status: str = "NOT RUN"
    error: str | None = None
    elapsed: float = 0.0
    succeeded: int = 0
    kills: int = 0
    kills_by_signal: dict[str, int] = field(default_factory=dict)
    crashed_attempts: int = 0
    retries: int = 0
    most_attempts: int = 0
    lost: int = 0
    duplicates: int = 0
    redone: int = 0
    leftover_processes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every step succeeded once, nothing was lost or run again after success, no process is left."""
        return (
            self.status == WorkflowStatus.COMPLETED.name
            and self.succeeded == self.steps
            and self.lost == 0
            and self.duplicates == 0
            and self.leftover_processes == 0
        )

    def summary(self) -> str:
        """The human-readable report printed by ``python -m wfaas.chaos``."""
        by_signal = ", ".join(f"{name} {n}" for name, n in sorted(self.kills_by_signal.items()))
        lines = [
            f"wfaas chaos self-test: {self.steps} steps on {self.workers} workers, seed {self.seed}, "
            f"a kill every ~{self.kill_every:g} s",
            f"  workflow            {self.status} in {self.elapsed:.1f} s" + (f" ({self.error})" if self.error else ""),
            f"  steps succeeded     {self.succeeded}/{self.steps}",
            f"  kills               {self.kills}" + (f" ({by_signal})" if by_signal else ""),
            f"  crashed attempts    {self.crashed_attempts}",
            f"  retries             {self.retries} (at most {self.most_attempts} attempts for one step)",
            f"  lost                {self.lost}",
            f"  duplicates          {self.duplicates}",
            f"  leftover processes  {self.leftover_processes}",
        ]
        if self.redone:
            lines.append(
                f"  re-done             {self.redone} (killed after finishing, before reporting: "
                "run again, at-least-once as documented)"
            )
        lines += [f"  problem: {p}" for p in self.problems[:20]]
        if len(self.problems) > 20:
            lines.append(f"  ... and {len(self.problems) - 20} more problems")
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)


class _Killer:
    """A thread that sends SIGKILL or SIGTERM to a random busy worker at random (seeded) intervals."""

    def __init__(self, workdir: str, seed: int, every: float) -> None:
        self._workdir = workdir
        self._rng = random.Random(seed)
        self._every = every
        self._stop = threading.Event()
        self.kills: Counter[str] = Counter()
        self.victims: set[int] = set()
        self._thread = threading.Thread(target=self._run, name="wfaas-chaos-killer", daemon=True)

    def start(self) -> None:
        with _threads.signals_blocked():
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _busy_workers(self) -> list[int]:
        # The steps say which workers run one right now (a marker file each, see ChaosStep). At
        # worst the worker finished meanwhile, and killing an idle worker is a fault the engine
        # must survive too.
        prefix = "busy-"
        return sorted(int(n[len(prefix) :]) for n in os.listdir(self._workdir) if n.startswith(prefix))

    def _run(self) -> None:
        while not self._stop.wait(self._rng.expovariate(1.0 / self._every)):
            busy = self._busy_workers()
            if not busy:
                continue
            pid = self._rng.choice(busy)
            sig = signal.SIGKILL if self._rng.random() < 0.7 else signal.SIGTERM
            # The marker goes first: a dead worker's PID may be another process's later.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(_busy_marker(self._workdir, pid))
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                continue
            self.kills[sig.name] += 1
            self.victims.add(pid)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _new_descendants(before: set[int]) -> list[int]:
    """Live descendants of this process that were not there before, minus multiprocessing's own helpers.

    The forkserver and the resource tracker are shared by every engine of the
    process (stdlib helpers, not workers) and stay until the process exits.
    """
    me = psutil.Process()
    out = []
    for p in me.children(recursive=True):
        try:
            if p.pid in before or p.status() == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(p.cmdline())
            if p.ppid() == me.pid and ("forkserver" in cmd or "resource_tracker" in cmd):
                continue
        except psutil.Error:
            continue
        out.append(p.pid)
    return out


def _read_log(path: Path) -> tuple[list[tuple[int, int]], list[int]]:
    """(start lines as (attempt, pid), done lines as attempt) of one step's log."""
    starts: list[tuple[int, int]] = []
    dones: list[int] = []
    if not path.exists():
        return starts, dones
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] == "start":
            starts.append((int(parts[2]), int(parts[3]) if len(parts) > 3 else 0))
        elif len(parts) >= 3 and parts[1] == "done":
            dones.append(int(parts[2]))
    return starts, dones


def _check(
    report: ChaosReport,
    wf: WorkflowDefinition,
    state: WorkflowState[ChaosData] | None,
    workdir: Path,
    iid: str,
    succeeded_events: Counter[str],
    worker_pids: set[int],
) -> None:
    """Fill ``lost``, ``duplicates``, ``redone`` and ``problems`` from the state, the logs and the events."""
    done_data: dict[str, int] = state.data.done if state is not None and state.data is not None else {}
    for step in wf.steps:
        sid = step.id
        starts, dones = _read_log(workdir / f"{iid}:{sid}.log")
        worker_pids.update(pid for _, pid in starts)
        st = state.step_states.get(sid) if state is not None else None
        if st is None or st.status is not StepStatus.SUCCEEDED:
            report.lost += 1
            report.problems.append(f"{sid}: ended {st.status.name if st else 'unknown'}, not SUCCEEDED")
            continue
        report.succeeded += 1
        report.retries += max(0, st.attempts - 1)
        report.most_attempts = max(report.most_attempts, st.attempts)
        won = st.attempts
        if done_data.get(sid) != won or won not in dones:
            report.lost += 1
            report.problems.append(
                f"{sid}: succeeded with attempt {won}, but the data holds attempt {done_data.get(sid)} "
                f"and the log shows finished attempts {dones}"
            )
        after = [a for a, _ in starts if a > won] + [a for a in dones if a > won]
        repeats = [a for a, n in Counter(a for a, _ in starts).items() if n > 1]
        if after or repeats or dones.count(won) > 1 or succeeded_events[sid] != 1:
            report.duplicates += 1
            report.problems.append(
                f"{sid}: ran again after its success (attempt {won}): later attempts {after}, "
                f"attempts started twice {repeats}, reported succeeded {succeeded_events[sid]} times"
            )
        report.redone += sum(1 for a in dones if a < won)


def run_chaos(
    steps: int = 200,
    seed: int = 0,
    workers: int = 2,
    kill_every: float = 0.05,
    *,
    max_attempts: int = 50,
    timeout: float = 300.0,
    workdir: str | os.PathLike[str] | None = None,
) -> ChaosReport:
    """Run the chaos self-test and return its report (see the module docstring).

    ``kill_every`` is the mean number of seconds between kills; ``timeout``
    bounds the whole run; ``workdir`` keeps the steps' log files (a temporary
    directory, removed afterwards, when not given).

    Why ``max_attempts`` is 50: while a chain runs, only one worker is busy,
    so every kill hits the one step that runs, including its retry while the
    new worker boots. At a kill every 0.05 s an attempt is killed about half
    the time, and one step in a few thousand needs eight attempts or more; a
    budget of 10 would fail healthy runs now and then. The chaos steps never
    fail on their own, so every retry is the answer to a kill.
    """
    if kill_every <= 0:
        raise ValueError(f"kill_every must be positive, got {kill_every}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="wfaas-chaos-"))
        path = Path(workdir)
        path.mkdir(parents=True, exist_ok=True)
        return _run(steps, seed, workers, kill_every, max_attempts, timeout, path)
    raise AssertionError("unreachable")  # pragma: no cover - ExitStack does not swallow exceptions


def _run(
    steps: int, seed: int, workers: int, kill_every: float, max_attempts: int, timeout: float, workdir: Path
) -> ChaosReport:
    report = ChaosReport(steps=steps, seed=seed, workers=workers, kill_every=kill_every)
    wf = build_workflow(steps, seed, str(workdir), max_attempts)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    succeeded_events: Counter[str] = Counter()
    crashed: list[int] = []

    def on_event(event: events.WorkflowEvent) -> None:
        if isinstance(event, events.StepSucceeded):
            succeeded_events[event.step_id] += 1
        elif isinstance(event, events.StepFailed):
            crashed.append(event.attempt)

    worker_pids: set[int] = set()
    state: WorkflowState[ChaosData] | None = None
    started = time.monotonic()
    engine = WorkflowEngine(max_workers=workers, grace_period=1.0)
    killer = _Killer(str(workdir), seed, kill_every)
    iid = ""
    try:
        engine.event_bus.subscribe(on_event)
        engine.register_workflow(wf)
        iid = engine.start_workflow(WORKFLOW_ID, ChaosData())
        killer.start()
        try:
            engine.wait_for_completion(iid, "chaos", timeout=timeout)
        except TimeoutError as exc:
            report.error = str(exc)
        except WorkflowError as exc:
            report.error = f"{type(exc).__name__}: {exc}"
        finally:
            killer.stop()
        report.elapsed = time.monotonic() - started
        if report.error is not None:
            engine.force_cancel_all(grace=0.0)
        engine.event_bus.flush(10.0)
        state = engine.get_status(iid)
        report.status = state.status.name
    finally:
        killer.stop()
        engine.close()
    report.kills = sum(killer.kills.values())
    report.kills_by_signal = dict(killer.kills)
    report.crashed_attempts = len(crashed)
    _check(report, wf, state, workdir, iid, succeeded_events, worker_pids)
    worker_pids |= killer.victims
    # Give the last kills a moment to be reaped; a zombie already counts as gone.
    deadline = time.monotonic() + 2.0
    while True:
        left = set(_new_descendants(before)) | {p for p in worker_pids if _alive(p)}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    report.leftover_processes = len(left)
    report.problems += [f"process {p} still running after the engine closed" for p in sorted(left)]
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: run the self-test, print the report, return 0 (all good) or 1."""
    parser = argparse.ArgumentParser(
        prog="python -m wfaas.chaos",
        description="Run a workflow while killing its workers at random; check that no step is lost or duplicated "
        "and that no process is left behind.",
    )
    parser.add_argument("--steps", type=int, default=200, help="number of steps in the workflow (default 200)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: a random one, printed)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument(
        "--kill-every", type=float, default=0.05, help="mean seconds between kills of a busy worker (default 0.05)"
    )
    parser.add_argument("--max-attempts", type=int, default=50, help="attempts per step (default 50)")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds (default 300)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.workers < 1 or args.kill_every <= 0 or args.max_attempts < 1:
        parser.error("--steps, --workers and --max-attempts must be at least 1, --kill-every positive")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    report = run_chaos(
        args.steps, seed, args.workers, args.kill_every, max_attempts=args.max_attempts, timeout=args.timeout
    )
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    # Run through the importable module, so that workers find ChaosStep as wfaas.chaos.ChaosStep.
    from wfaas.chaos import main as _main

    sys.exit(_main())
