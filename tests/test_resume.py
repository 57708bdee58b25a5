"""Resume and recover on a SqliteStore: what ran is not run again, what did not runs with a fresh budget.

Every step appends its id to ``<workdir>/runs.log`` when it starts, so a test
counts executions across processes, engines and resumes. Interrupted runs are
real: a runner process is killed with SIGKILL while a step runs, and the test
resumes its instance from the SQLite file.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from wfaas import (
    Backoff,
    Cancelled,
    InvalidDefinition,
    InvalidStateTransition,
    RetryPolicy,
    SqliteStore,
    StepDefinition,
    StepFailed,
    StepStatus,
    WorkflowData,
    WorkflowDefinition,
    WorkflowEngine,
    WorkflowStatus,
)

from conftest import alive, reap, wait_until

S, W = StepStatus, WorkflowStatus
TESTS = Path(__file__).resolve().parent


@dataclass
class ResumeData(WorkflowData):
    workdir: str = ""
    items: dict[str, Any] = field(default_factory=dict)
    n: int = 0


# -- step bodies (module level: the runner processes import this module) ----------------


def record(ctx: Any) -> int:
    """Append this step's id to the run log; returns how many times it has now started, in all."""
    log = Path(ctx.data.workdir) / "runs.log"
    with open(log, "a") as f:
        f.write(ctx.step_id + "\n")
    return log.read_text().split().count(ctx.step_id)


def runs(workdir: Path) -> collections.Counter[str]:
    log = workdir / "runs.log"
    return collections.Counter(log.read_text().split()) if log.exists() else collections.Counter()


def mark(ctx: Any) -> None:
    ctx.data.items[ctx.step_id] = record(ctx)


def first(ctx: Any) -> None:
    record(ctx)
    ctx.data.n = 1
    ctx.data.items[ctx.step_id] = 1


def first_v2(ctx: Any) -> None:  # the same step, its code edited
    record(ctx)
    ctx.data.n = 2
    ctx.data.items[ctx.step_id] = "v2"


def needs_marker(ctx: Any) -> None:
    """Fails until the file ``marker`` exists (a fix that does not depend on the data)."""
    executions = record(ctx)
    ctx.data.n = -999  # a failed attempt's writes must never reach the instance's data
    if not (Path(ctx.data.workdir) / "marker").exists():
        raise FileNotFoundError("marker file missing")
    ctx.data.n = 10
    ctx.data.items[ctx.step_id] = executions


def needs_marker_v2(ctx: Any) -> None:
    needs_marker(ctx)
    ctx.data.items["b_version"] = 2


def fourth_time_lucky(ctx: Any) -> None:
    """Fails on its first three executions, whatever the data."""
    executions = record(ctx)
    if executions < 4:
        raise RuntimeError(f"execution {executions} fails")
    ctx.data.items[ctx.step_id] = executions


def copy_b(ctx: Any) -> None:
    record(ctx)
    ctx.data.items[ctx.step_id] = ("saw b", ctx.data.items.get("b"))


def add_up(ctx: Any) -> None:
    record(ctx)
    ctx.data.n = sum(v for v in ctx.data.items.values() if isinstance(v, int))


def blocker(ctx: Any) -> None:
    """Writes its worker's PID to ``<step>.started``, then waits for the file ``release``."""
    record(ctx)
    work = Path(ctx.data.workdir)
    tmp = work / f"{ctx.step_id}.started.tmp"
    tmp.write_text(str(os.getpid()))
    tmp.replace(work / f"{ctx.step_id}.started")
    deadline = time.monotonic() + 60
    while not (work / "release").exists():
        if time.monotonic() > deadline:
            raise TimeoutError("never released")
        time.sleep(0.01)
    ctx.data.items[ctx.step_id] = 1


# -- definitions ---------------------------------------------------------------------------


def fix_me(
    retry: int = 2, *, b_body: Any = needs_marker, a_body: Any = first, c_after: str = "b"
) -> WorkflowDefinition:
    """a -> b (fails until the marker exists, ``retry`` attempts) -> c;  a -> d."""
    wf = WorkflowDefinition("fix_me", data_type=ResumeData)
    wf.add_step(StepDefinition("a", "a", a_body))
    wf.add_step(
        StepDefinition("b", "b", b_body)
        .depends_on(["a"])
        .with_retry(RetryPolicy(max_attempts=retry, backoff=Backoff.fixed(0.01)))
    )
    wf.add_step(StepDefinition("c", "c", mark).depends_on([c_after]))
    wf.add_step(StepDefinition("d", "d", mark).depends_on(["a"]))
    return wf


def blocking() -> WorkflowDefinition:
    """a -> b (waits for the file ``release``) -> c;  a -> d."""
    wf = WorkflowDefinition("blocking", data_type=ResumeData)
    wf.add_step(StepDefinition("a", "a", first))
    wf.add_step(StepDefinition("b", "b", blocker).depends_on(["a"]))
    wf.add_step(StepDefinition("c", "c", mark).depends_on(["b"]))
    wf.add_step(StepDefinition("d", "d", mark).depends_on(["a"]))
    return wf


def sqlite_engine(path: Path) -> WorkflowEngine:
    return WorkflowEngine(store=SqliteStore(path), max_workers=2, grace_period=1.0)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "runs.sqlite"


@pytest.fixture
def sengine(store_path: Path) -> Iterator[WorkflowEngine]:
    """A real engine checkpointing to a SQLite file."""
    with sqlite_engine(store_path) as eng:
        yield eng


def fail_first_run(engine: WorkflowEngine, work: Path, definition: WorkflowDefinition) -> str:
    engine.register_workflow(definition)
    iid = engine.start_workflow(definition.id, ResumeData(workdir=str(work)))
    with pytest.raises(StepFailed, match="marker file missing"):
        engine.wait_for_completion(iid, timeout=60)
    return iid


# -- FAILED --------------------------------------------------------------------------------


def test_resume_of_a_failed_instance_runs_only_what_did_not_succeed(sengine: WorkflowEngine, work: Path) -> None:
    iid = fail_first_run(sengine, work, fix_me(retry=2))
    failed = sengine.get_status(iid)
    assert failed.status is W.FAILED
    assert failed.failed_step == "b"
    assert failed.step_states["a"].status is S.SUCCEEDED
    assert (failed.step_states["b"].status, failed.step_states["b"].attempts) == (S.FAILED, 2)
    assert failed.step_states["c"].status is S.PENDING
    # The last committed data: a's writes, none of b's failed attempts' (n = -999).
    assert failed.data.n == 1
    assert "b" not in failed.data.items
    assert runs(work)["b"] == 2

    (work / "marker").touch()  # the fix: nothing in the data changes
    assert sengine.resume(iid) == iid
    assert sengine.wait_for_completion(iid, "r", timeout=60) == "r completed successfully via workflow"
    done = sengine.get_status(iid)
    assert done.status is W.COMPLETED
    assert runs(work) == {"a": 1, "b": 3, "c": 1, "d": 1}  # a and d (succeeded) not run again
    assert done.data.n == 10
    assert done.data.items == {"a": 1, "b": 3, "c": 1, "d": 1}
    assert {sid: s.status for sid, s in done.step_states.items()} == dict.fromkeys("abcd", S.SUCCEEDED)
    assert done.step_states["a"].attempts == 1
    assert done.step_states["b"].attempts == 3
    assert done.error is None


def test_a_resumed_step_gets_a_fresh_attempt_budget(sengine: WorkflowEngine, work: Path) -> None:
    sengine.register_workflow(fix_me(retry=2, b_body=fourth_time_lucky))
    iid = sengine.start_workflow("fix_me", ResumeData(workdir=str(work)))
    with pytest.raises(StepFailed, match="execution 2 fails"):
        sengine.wait_for_completion(iid, timeout=60)
    # Two more attempts after the resume: the third fails, the fourth succeeds. Had the
    # resume kept the spent budget (2 of 2), the third failure would have ended the run.
    sengine.resume(iid)
    sengine.wait_for_completion(iid, timeout=60)
    done = sengine.get_status(iid)
    assert done.step_states["b"].attempts == 4
    assert done.data.items["b"] == 4
    assert runs(work) == {"a": 1, "b": 4, "c": 1, "d": 1}


# -- CANCELLED -----------------------------------------------------------------------------


def test_resume_of_a_cancelled_instance(sengine: WorkflowEngine, work: Path) -> None:
    sengine.register_workflow(blocking())
    iid = sengine.start_workflow("blocking", ResumeData(workdir=str(work)))
    wait_until((work / "b.started").exists, 30, "step b to start")
    sengine.cancel_workflow(iid)
    with pytest.raises(Cancelled):
        sengine.wait_for_completion(iid, timeout=30)
    cancelled = sengine.get_status(iid)
    assert cancelled.status is W.CANCELLED
    assert sengine.store.is_cancelled(iid)
    assert cancelled.step_states["a"].status is S.SUCCEEDED
    assert cancelled.step_states["b"].status is S.CANCELLED
    assert cancelled.step_states["c"].status is S.PENDING

    (work / "release").touch()
    sengine.resume(iid)
    sengine.wait_for_completion(iid, timeout=60)
    done = sengine.get_status(iid)
    assert done.status is W.COMPLETED
    assert runs(work) == {"a": 1, "b": 2, "c": 1, "d": 1}
    assert done.data.items == {"a": 1, "b": 1, "c": 1, "d": 1}
    assert not sengine.store.is_cancelled(iid)


# -- rerun ---------------------------------------------------------------------------------


def test_rerun_runs_the_named_step_and_everything_downstream_only(sengine: WorkflowEngine, work: Path) -> None:
    """a -> b -> c -> e;  a -> d -> e: rerun b runs b, c, e again, not a or d."""
    wf = WorkflowDefinition("rerun", data_type=ResumeData)
    wf.add_step(StepDefinition("a", "a", mark))
    wf.add_step(StepDefinition("b", "b", mark).depends_on(["a"]))
    wf.add_step(StepDefinition("c", "c", copy_b).depends_on(["b"]))
    wf.add_step(StepDefinition("d", "d", mark).depends_on(["a"]))
    wf.add_step(StepDefinition("e", "e", add_up).depends_on(["c", "d"]))
    sengine.register_workflow(wf)
    iid = sengine.start_workflow("rerun", ResumeData(workdir=str(work)))
    sengine.wait_for_completion(iid, timeout=60)
    first_run = sengine.get_status(iid)
    assert first_run.data.items["c"] == ("saw b", 1)
    assert first_run.data.n == 3  # a + b + d

    with pytest.raises(InvalidStateTransition, match="rerun"):
        sengine.resume(iid)  # a completed instance: nothing to resume without rerun=[...]
    with pytest.raises(InvalidDefinition, match="nope"):
        sengine.resume(iid, rerun=["nope"])
    assert runs(work) == dict.fromkeys("abcde", 1)

    sengine.resume(iid, rerun=["b"])
    sengine.wait_for_completion(iid, timeout=60)
    again = sengine.get_status(iid)
    assert again.status is W.COMPLETED
    assert runs(work) == {"a": 1, "b": 2, "c": 2, "d": 1, "e": 2}
    assert again.data.items["b"] == 2
    assert again.data.items["c"] == ("saw b", 2)  # downstream saw the new result
    assert again.data.items["a"] == again.data.items["d"] == 1  # kept
    assert again.data.n == 4
    assert again.step_states["a"].attempts == 1
    assert again.step_states["d"].attempts == 1


# -- definition changes between runs ------------------------------------------------------------


def test_structural_changes_are_refused_with_the_differences_unless_forced(
    sengine: WorkflowEngine, work: Path, store_path: Path
) -> None:
    iid = fail_first_run(sengine, work, fix_me())
    before = runs(work)
    (work / "marker").touch()

    changed = WorkflowDefinition("fix_me", data_type=ResumeData)  # b no longer needs a, c is gone, e is new
    changed.add_step(StepDefinition("a", "a", first))
    changed.add_step(StepDefinition("b", "b", needs_marker))
    changed.add_step(StepDefinition("d", "d", mark).depends_on(["a"]))
    changed.add_step(StepDefinition("e", "e", mark).depends_on(["b"]))
    with sqlite_engine(store_path) as other:
        other.register_workflow(changed)
        with pytest.raises(InvalidDefinition) as refused:
            other.resume(iid)
    message = str(refused.value)
    assert iid in message
    assert "step 'c' was removed" in message
    assert "step 'e' was added" in message
    assert "step 'b': depends_on was ['a'], is now []" in message
    assert "force" in message

    with sqlite_engine(store_path) as other:
        other.register_workflow(fix_me(c_after="a"))  # c after a instead of b: same ids, same code
        with pytest.raises(InvalidDefinition, match=r"step 'c': depends_on was \['b'\], is now \['a'\]"):
            other.resume(iid)

    assert runs(work) == before  # nothing ran
    assert sengine.get_status(iid).status is W.FAILED  # nothing changed

    extended = fix_me().add_step(StepDefinition("e", "e", mark).depends_on(["c"]))
    with sqlite_engine(store_path) as other:
        other.register_workflow(extended)
        with pytest.raises(InvalidDefinition, match="step 'e' was added"):
            other.resume(iid)
        other.resume(iid, force=True)
        other.wait_for_completion(iid, timeout=60)
        done = other.get_status(iid)
    assert done.status is W.COMPLETED
    assert done.step_states["e"].status is S.SUCCEEDED
    assert runs(work) == {"a": 1, "b": 3, "c": 1, "d": 1, "e": 1}


def test_changed_step_code_only_warns_and_reruns_nothing_that_succeeded(
    sengine: WorkflowEngine, work: Path, store_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    iid = fail_first_run(sengine, work, fix_me())
    (work / "marker").touch()
    edited = fix_me(a_body=first_v2, b_body=needs_marker_v2)  # same ids and edges, new code for a and b
    with sqlite_engine(store_path) as other:
        other.register_workflow(edited)
        with caplog.at_level(logging.WARNING, logger="wfaas"):
            other.resume(iid)
        other.wait_for_completion(iid, timeout=60)
        done = other.get_status(iid)
    warnings = [r.getMessage() for r in caplog.records if r.name == "wfaas" and r.levelno == logging.WARNING]
    about_code = [w for w in warnings if iid in w and "code" in w]
    assert len(about_code) == 1, warnings
    assert "a, b" in about_code[0]  # the steps whose code changed
    assert done.status is W.COMPLETED
    assert runs(work) == {"a": 1, "b": 3, "c": 1, "d": 1}  # a succeeded with the old code: not re-run
    assert done.data.items["a"] == 1  # the old a's result is kept
    assert done.data.items["b_version"] == 2  # b ran again, with its new code


# -- interrupted: the owner process was killed ----------------------------------------------------

RUNNER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from test_resume import ResumeData, blocking
    from wfaas import SqliteStore, WorkflowEngine

    if __name__ == "__main__":
        store, workdir = sys.argv[1], sys.argv[2]
        with WorkflowEngine(store=SqliteStore(store), max_workers=2) as engine:
            engine.register_workflow(blocking())
            iid = engine.start_workflow("blocking", ResumeData(workdir=workdir))
            print(iid, flush=True)
            engine.wait_for_completion(iid, timeout=120)
    """
)


@dataclass
class Runner:
    proc: subprocess.Popen[str]
    iid: str
    work: Path
    worker_pid: int = 0


@pytest.fixture
def runners(tmp_path: Path) -> Iterator[list[Runner]]:
    """Start runner processes with ``start(store, work)``; killed at the end if still alive."""
    started: list[Runner] = []
    yield started
    for r in started:
        (r.work / "release").touch()
        if r.proc.poll() is None:
            r.proc.kill()
        r.proc.wait(timeout=30)
        if r.proc.stdout is not None:
            r.proc.stdout.close()


def start_runner(runners: list[Runner], tmp_path: Path, store: Path, work: Path) -> Runner:
    """A process that runs ``blocking`` on ``store`` until its step b waits; returns once b started."""
    script = tmp_path / "runner.py"
    script.write_text(RUNNER.format(tests=str(TESTS)))
    proc = subprocess.Popen([sys.executable, str(script), str(store), str(work)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    runner = Runner(proc, "", work)
    runners.append(runner)
    runner.iid = proc.stdout.readline().strip()
    assert runner.iid, "the runner printed no instance id"
    started = work / "b.started"
    wait_until(started.exists, 60, "step b to start in the runner")
    runner.worker_pid = int(started.read_text())
    return runner


def committed(engine: WorkflowEngine, iid: str, *steps: str) -> bool:
    state = engine.get_status(iid)
    return all(state.step_states[s].status is S.SUCCEEDED for s in steps)


def kill_9(runner: Runner) -> None:
    os.kill(runner.proc.pid, signal.SIGKILL)
    assert runner.proc.wait(timeout=30) == -signal.SIGKILL
    # Its worker notices the engine is gone and stops (with what it ran): wait for that,
    # so that the old attempt of b can never run beside the resumed one.
    wait_until(lambda: not alive(runner.worker_pid), 30, f"the killed runner's worker {runner.worker_pid} to exit")


def test_resume_of_an_interrupted_instance_after_kill_9(
    sengine: WorkflowEngine, work: Path, store_path: Path, tmp_path: Path, runners: list[Runner]
) -> None:
    sengine.register_workflow(blocking())
    runner = start_runner(runners, tmp_path, store_path, work)
    iid = runner.iid
    wait_until(lambda: committed(sengine, iid, "a", "d"), 30, "a and d to be committed")

    # Its owner is alive: refused, naming the PID; recover() leaves it alone too.
    with pytest.raises(InvalidStateTransition, match=rf"process {runner.proc.pid}\b"):
        sengine.resume(iid)
    assert sengine.recover() == []

    kill_9(runner)
    interrupted = sengine.get_status(iid)
    assert interrupted.status is W.RUNNING  # what the dead process left behind
    assert interrupted.owner is not None
    assert interrupted.owner["pid"] == runner.proc.pid
    assert runs(work) == {"a": 1, "d": 1, "b": 1}

    (work / "release").touch()
    assert sengine.resume(iid) == iid
    sengine.wait_for_completion(iid, timeout=60)
    done = sengine.get_status(iid)
    assert done.status is W.COMPLETED
    assert runs(work) == {"a": 1, "d": 1, "b": 2, "c": 1}  # only the interrupted step ran again
    assert done.data.n == 1
    assert done.data.items == {"a": 1, "b": 1, "c": 1, "d": 1}
    assert done.owner is None


def test_recover_resumes_only_instances_whose_owner_is_dead(
    sengine: WorkflowEngine, store_path: Path, tmp_path: Path, runners: list[Runner]
) -> None:
    sengine.register_workflow(blocking())
    work_a, work_b = tmp_path / "a", tmp_path / "b"
    work_a.mkdir()
    work_b.mkdir()
    doomed = start_runner(runners, tmp_path, store_path, work_a)
    survivor = start_runner(runners, tmp_path, store_path, work_b)
    wait_until(lambda: committed(sengine, doomed.iid, "a", "d"), 30, "a and d to be committed")

    kill_9(doomed)
    (work_a / "release").touch()
    assert sengine.recover() == [doomed.iid]  # the survivor's owner is alive
    sengine.wait_for_completion(doomed.iid, timeout=60)
    assert sengine.get_status(doomed.iid).status is W.COMPLETED
    assert runs(work_a) == {"a": 1, "d": 1, "b": 2, "c": 1}
    assert sengine.recover() == []  # nothing left to recover

    # The survivor was never touched: it finishes in its own process once released.
    assert sengine.get_status(survivor.iid).status is W.RUNNING
    (work_b / "release").touch()
    assert survivor.proc.wait(timeout=60) == 0
    assert sengine.get_status(survivor.iid).status is W.COMPLETED
    assert runs(work_b) == {"a": 1, "d": 1, "b": 1, "c": 1}


# -- large values through kill -9 of `wfaas-local run` (API.md §14) ------------------------

GROW = textwrap.dedent(
    """
    import hashlib
    import time
    from dataclasses import dataclass
    from wfaas import StepDefinition, WorkflowData, WorkflowDefinition

    @dataclass
    class Grow(WorkflowData):
        value: bytes = b""
        n: int = 0

    def start():
        return hashlib.shake_256(b"wfaas").digest(3 << 20)  # 3 MiB: over the default inline limit

    def step(value, n):
        return bytes([n]) * n + value[n:]

    def grow(ctx):
        time.sleep(0.1)  # the step's work: the run lasts long enough to be killed in the middle
        ctx.data.n += 1
        ctx.data.value = step(ctx.data.value or start(), ctx.data.n)

    workflow = WorkflowDefinition("grow", "grow", data_type=Grow)
    for i in range(8):
        s = StepDefinition(f"g{i}", "grow", grow)
        if i:
            s.depends_on([f"g{i - 1}"])
        workflow.add_step(s)
    """
)


def _succeeded(store_path: Path) -> int:
    try:
        store = SqliteStore(store_path, readonly=True)
    except Exception:  # noqa: BLE001 - not created yet by the runner
        return 0
    try:
        ids = store.ids()
        if not ids:
            return 0
        meta = store.read(ids[0])
        return sum(s["status"] == "succeeded" for s in meta.steps.values()) if meta else 0
    finally:
        store.close()


# Kills at seeded real-time moments (no timing tolerance: it checks data only); one seed runs by default.
@pytest.mark.parametrize("seed", [1, pytest.param(2, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow)])
def test_large_values_round_trip_exactly_through_kill_9_of_the_cli_and_resume(
    tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kill -9 of `wfaas-local run` at a seeded moment while steps write 3 MiB objects: every reference
    in the store names a complete, verified file, and `resume` ends with exactly the value of a clean run."""
    rng = random.Random(seed)
    (tmp_path / "grow_target.py").write_text(GROW)
    monkeypatch.syspath_prepend(str(tmp_path))
    import grow_target

    store_path = tmp_path / "runs.sqlite"
    cli = [sys.executable, "-m", "wfaas.command_line"]
    proc = subprocess.Popen(
        [*cli, "run", "grow_target.py:workflow", "--store", str(store_path), "--quiet"], cwd=tmp_path
    )
    try:
        done = rng.randint(1, 5)
        wait_until(lambda: _succeeded(store_path) >= done, 60, f"{done} steps to commit")
        time.sleep(rng.uniform(0, 0.05))  # not a synchronisation: picks the moment of the kill
        proc.kill()
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        reap(proc)
    store = SqliteStore(store_path)
    [iid] = store.ids()
    interrupted = store.load(iid).data  # raises if a reference names a missing or partial file
    assert interrupted.n < 8, "the run ended before the kill"
    assert interrupted.value[: interrupted.n] == bytes([interrupted.n]) * interrupted.n
    store.close()

    resumed = subprocess.run([*cli, "resume", iid, "--store", str(store_path), "--quiet"], cwd=tmp_path, timeout=120)
    assert resumed.returncode == 0
    expected = grow_target.start()
    for n in range(1, 9):
        expected = grow_target.step(expected, n)
    store = SqliteStore(store_path)
    final = store.load(iid).data
    assert (final.n, final.value == expected) == (8, True)
    store.close()
