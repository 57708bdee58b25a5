"""Timeouts and cancel: the step's whole process tree is dead before the attempt is marked.

Every hang below is real: a pure-Python loop, C-level blocking calls
(``time.sleep``, a blocking socket read, ``subprocess.run`` of a shell
``sleep``) and steps that start ``multiprocessing`` / ``subprocess`` children.
Each step writes the PIDs it started to a file; the test also lists the
worker's descendants with psutil while the step hangs. When
``wait_for_completion`` raises ``StepTimeout`` (or ``cancel_workflow``
returns), none of them may be alive, and the time from the deadline to the
verdict is at most ``grace + 0.5`` s.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from wfaas import (
    Cancelled,
    RetryPolicy,
    StepDefinition,
    StepStatus,
    StepTimeout,
    WorkflowDefinition,
    WorkflowEngine,
    WorkflowStatus,
    events,
)

from conftest import Data, alive, descendants, wait_for_text, wait_until, write_atomic

GRACE = 1.0  # the test engine's grace period between SIGTERM and SIGKILL
TIMEOUT = 1.0  # every hanging step's timeout
SLACK = 0.5  # the bound: deadline -> StepTimeout <= grace + 0.5 s

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_leftovers")]


@pytest.fixture
def tengine() -> Iterator[WorkflowEngine]:
    """Two workers and an explicit grace period, so that timings below are stated against it."""
    with WorkflowEngine(max_workers=2, grace_period=GRACE) as eng:
        yield eng


class Recorder:
    """Collects events (thread-safe enough: list.append) for timing and ordering checks."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def __call__(self, event: Any) -> None:
        self.events.append(event)

    def of(self, kind: type, step_id: str | None = None) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind) and (step_id is None or e.step_id == step_id)]


# -- the hangs (run inside the worker; each records what it started, then blocks) ---------------


def _ready(out: Path, pids: list[int]) -> None:
    write_atomic(out, json.dumps({"worker": os.getpid(), "pids": pids}))


def hang_python_loop(out: Path) -> None:
    _ready(out, [])
    x = 0
    while True:
        x += 1


def hang_python_loop_ignoring_sigterm(out: Path) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL after the grace period stops it
    _ready(out, [])
    x = 0
    while True:
        x += 1


def hang_time_sleep(out: Path) -> None:
    _ready(out, [])
    time.sleep(120)


def hang_socket_read(out: Path) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    _ready(out, [])
    client.recv(1)  # nobody ever sends: blocks in C


def hang_subprocess_run(out: Path) -> None:
    _ready(out, [])  # the `sleep` child is found by listing the worker's children
    subprocess.run(["sleep", "120"], check=False)


def hang_with_subprocess_children(out: Path) -> None:
    """Children of every kind ``subprocess`` can leave; the tree kill must catch all of them."""
    popen = subprocess.Popen(["sleep", "120"])
    # Left the process group, still a descendant: found by listing the tree.
    own_session = subprocess.Popen(["sleep", "120"], start_new_session=True)
    # Double fork: re-parented at once to the worker (a subreaper), so found by listing its tree.
    with subprocess.Popen(["sh", "-c", "sleep 120 >/dev/null 2>&1 & echo $!"], stdout=subprocess.PIPE) as sh:
        assert sh.stdout is not None
        detached = int(sh.stdout.readline())
    # Ignores SIGTERM (and so does its own child): needs the SIGKILL after the grace period.
    stubborn = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 120; true"])
    deadline = time.monotonic() + 10
    while not psutil.Process(stubborn.pid).children() and time.monotonic() < deadline:
        time.sleep(0.005)
    pids = [popen.pid, own_session.pid, detached, stubborn.pid]
    _ready(out, pids + [c.pid for c in psutil.Process(stubborn.pid).children()])
    time.sleep(120)


def hang_with_multiprocessing_children(out: Path) -> None:
    """A step that uses multiprocessing itself: a Process and a Pool (each a child of the worker)."""
    mp = multiprocessing.get_context("fork")
    child = mp.Process(target=time.sleep, args=(120,))
    child.start()
    pool = mp.Pool(2)
    pool.apply_async(time.sleep, (120,))
    workers = [p.pid for p in multiprocessing.active_children() if p.pid != child.pid]
    _ready(out, [child.pid or 0, *[w or 0 for w in workers]])
    time.sleep(120)


# name -> (hang, does it need the SIGKILL after the grace period, least number of other processes)
HANGS: dict[str, tuple[Callable[[Path], None], bool, int]] = {
    "python_loop": (hang_python_loop, False, 0),
    "python_loop_ignoring_sigterm": (hang_python_loop_ignoring_sigterm, True, 0),
    "time_sleep": (hang_time_sleep, False, 0),
    "socket_read": (hang_socket_read, False, 0),
    "subprocess_run_sleep": (hang_subprocess_run, False, 1),
    "subprocess_children": (hang_with_subprocess_children, True, 4),
    "multiprocessing_children": (hang_with_multiprocessing_children, False, 3),
}


def tree_of(pid: int) -> list[psutil.Process]:
    try:
        return [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def hanging_tree(engine: WorkflowEngine, iid: str, out: Path, least_others: int) -> tuple[int, set[int]]:
    """Wait until the step reported itself ready and its children exist; (worker pid, every pid of the tree)."""
    wait_until(lambda: out.exists() or engine.get_status(iid).status.is_terminal, 30, "the step to start hanging")
    if not out.exists():
        state = engine.get_status(iid)
        raise AssertionError(f"the step ended before it hung: {state.status.name}: {state.error}")
    info = json.loads(wait_for_text(out))
    worker = info["worker"]
    pids = set(wait_until(lambda: len(tree_of(worker)) > least_others and {p.pid for p in tree_of(worker)}))
    return worker, pids | set(info["pids"])


@pytest.mark.parametrize("kind", list(HANGS))
def test_timeout_kills_the_whole_tree_within_grace(tengine: WorkflowEngine, tmp_path: Path, kind: str) -> None:
    hang, stubborn, least_others = HANGS[kind]
    out = tmp_path / "ready.json"

    def step(ctx: Any) -> None:
        hang(out)

    rec = Recorder()
    tengine.event_bus.subscribe(rec)
    tengine.register_workflow(
        WorkflowDefinition("hang", data_type=Data).add_step(StepDefinition("h", "hang", step).with_timeout(TIMEOUT))
    )
    iid = tengine.start_workflow("hang", Data())
    worker, pids = hanging_tree(tengine, iid, out, least_others)
    assert worker in pids and len(pids) > least_others

    with pytest.raises(StepTimeout) as info:
        tengine.wait_for_completion(iid, timeout=30)
    verdict = time.time()
    # Marked only once dead: nothing of the tree may be alive at the moment the error is seen.
    survivors = [p for p in pids if alive(p)]
    assert survivors == [], f"{kind}: processes of the timed-out step still alive: {survivors}"

    tengine.event_bus.flush()
    (started,) = rec.of(events.StepStarted, "h")
    (failed,) = rec.of(events.StepFailed, "h")
    deadline = started.timestamp.timestamp() + TIMEOUT
    marked = failed.timestamp.timestamp() - deadline  # the engine's own figure
    seen = verdict - deadline  # as observed by the waiting caller
    assert -0.05 <= marked <= seen <= GRACE + SLACK, f"{kind}: marked {marked:.3f} s, seen {seen:.3f} s after deadline"
    if stubborn:
        # Something ignored SIGTERM, so the engine must have waited the grace period before SIGKILL.
        assert marked >= GRACE - 0.05, f"{kind}: SIGKILL came {marked:.3f} s after the deadline, before the grace"

    error = info.value
    assert error.step_id == "h" and error.instance_id == iid
    assert str(worker) in str(error)
    state = tengine.get_status(iid)
    assert state.status is WorkflowStatus.FAILED
    assert state.step_states["h"].status is StepStatus.FAILED
    assert state.step_states["h"].attempts == 1
    # The slot got a fresh worker: two workers again, the old one not among them.
    workers = wait_until(lambda: len(d := descendants()) == 2 and d, what="a fresh worker in the slot")
    assert worker not in {w.pid for w in workers}


def test_retry_after_timeout_runs_in_a_fresh_worker_once_the_old_tree_is_dead(
    tengine: WorkflowEngine, tmp_path: Path
) -> None:
    def step(ctx: Any) -> None:
        if ctx.attempt == 1:
            child = subprocess.Popen(["sleep", "120"])
            write_atomic(tmp_path / "attempt1.json", json.dumps([os.getpid(), child.pid]))
            time.sleep(120)
        earlier = json.loads((tmp_path / "attempt1.json").read_text())
        # Checked by the new attempt itself, before it does anything: the old attempt must be gone.
        write_atomic(
            tmp_path / "attempt2.json",
            json.dumps({"pid": os.getpid(), "earlier_alive": [p for p in earlier if alive(p)]}),
        )
        ctx.data.value = ctx.attempt

    tengine.register_workflow(
        WorkflowDefinition("retry", data_type=Data).add_step(
            StepDefinition("r", "r", step).with_timeout(TIMEOUT).with_retry(RetryPolicy(max_attempts=2))
        )
    )
    iid = tengine.start_workflow("retry", Data())
    tengine.wait_for_completion(iid, timeout=30)
    first_worker, grandchild = json.loads((tmp_path / "attempt1.json").read_text())
    second = json.loads((tmp_path / "attempt2.json").read_text())
    assert second["pid"] != first_worker, "the retry ran in the worker that timed out"
    assert second["earlier_alive"] == [], "the retry started while the timed-out attempt's processes still ran"
    assert not alive(grandchild)
    state = tengine.get_status(iid)
    assert state.status is WorkflowStatus.COMPLETED
    assert state.step_states["r"].attempts == 2
    assert state.data.value == 2


def test_sibling_running_during_a_timeout_finishes_with_one_attempt(tengine: WorkflowEngine, tmp_path: Path) -> None:
    victim_file = tmp_path / "victim.json"
    sibling_log = tmp_path / "sibling.log"

    def victim(ctx: Any) -> None:
        hang_with_subprocess_children(victim_file)

    def sibling(ctx: Any) -> None:
        with open(sibling_log, "a") as f:
            f.write(f"{os.getpid()}\n")
        # Keep running until the victim's worker was killed, so the kill happens while this step runs.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if victim_file.exists() and not alive(json.loads(victim_file.read_text())["worker"]):
                break
            time.sleep(0.01)
        else:
            raise TimeoutError("the victim was never killed")
        ctx.data.value = "sibling done"

    wf = WorkflowDefinition("sib", data_type=Data)
    wf.add_step(StepDefinition("victim", "v", victim).with_timeout(TIMEOUT))
    wf.add_step(StepDefinition("sibling", "s", sibling))
    tengine.register_workflow(wf)
    iid = tengine.start_workflow("sib", Data())
    with pytest.raises(StepTimeout):
        tengine.wait_for_completion(iid, timeout=30)
    state = tengine.get_status(iid)
    assert state.step_states["sibling"].status is StepStatus.SUCCEEDED
    assert state.step_states["sibling"].attempts == 1
    assert state.data.value == "sibling done"
    (sibling_pid,) = sibling_log.read_text().split()  # ran once, never restarted
    assert int(sibling_pid) != json.loads(victim_file.read_text())["worker"]
    assert alive(int(sibling_pid)), "the sibling's worker was killed along with the victim"


# -- cancel: the same kill, reported as CANCELLED -------------------------------------------------


def test_cancel_workflow_kills_the_tree_and_reports_cancelled(tengine: WorkflowEngine, tmp_path: Path) -> None:
    out = tmp_path / "ready.json"
    after = tmp_path / "after_ran"

    def step(ctx: Any) -> None:
        hang_with_subprocess_children(out)

    def later(ctx: Any) -> None:
        after.touch()

    rec = Recorder()
    tengine.event_bus.subscribe(rec)
    wf = WorkflowDefinition("cancel", data_type=Data)
    # A retry policy must not turn a cancel into another attempt.
    wf.add_step(StepDefinition("h", "hang", step).with_retry(RetryPolicy(max_attempts=3)))
    wf.add_step(StepDefinition("later", "later", later).depends_on(["h"]))
    tengine.register_workflow(wf)
    iid = tengine.start_workflow("cancel", Data())
    _, pids = hanging_tree(tengine, iid, out, 4)

    started = time.monotonic()
    tengine.cancel_workflow(iid)
    took = time.monotonic() - started
    survivors = [p for p in pids if alive(p)]
    assert survivors == [], f"cancel_workflow returned while these still ran: {survivors}"
    # A grandchild ignores SIGTERM: the cancel waited the grace period, then killed.
    assert GRACE - 0.05 <= took <= GRACE + SLACK, f"cancel took {took:.3f} s with grace {GRACE} s"

    state = tengine.get_status(iid)
    assert state.status is WorkflowStatus.CANCELLED
    assert state.step_states["h"].status is StepStatus.CANCELLED
    assert state.step_states["h"].attempts == 1
    assert state.step_states["later"].status is StepStatus.PENDING
    with pytest.raises(Cancelled):
        tengine.wait_for_completion(iid, timeout=5)
    tengine.event_bus.flush()
    assert rec.of(events.WorkflowCancelled) and not rec.of(events.WorkflowFailed)
    assert not after.exists()
    assert [e.will_retry for e in rec.of(events.StepFailed)] in ([], [False])


def test_force_cancel_all_stops_every_running_instance(tengine: WorkflowEngine, tmp_path: Path) -> None:
    def step(ctx: Any) -> None:
        child = subprocess.Popen(["sleep", "120"])
        _ready(tmp_path / f"{ctx.instance_id}.json", [child.pid])
        time.sleep(120)

    tengine.register_workflow(WorkflowDefinition("fc", data_type=Data).add_step(StepDefinition("h", "h", step)))
    iids = [tengine.start_workflow("fc", Data()) for _ in range(2)]
    trees = [hanging_tree(tengine, iid, tmp_path / f"{iid}.json", 1)[1] for iid in iids]

    assert tengine.force_cancel_all() == 2
    for iid, pids in zip(iids, trees, strict=True):
        assert [p for p in pids if alive(p)] == []
        state = tengine.get_status(iid)
        assert state.status is WorkflowStatus.CANCELLED
        assert state.step_states["h"].status is StepStatus.CANCELLED
        with pytest.raises(Cancelled):
            tengine.wait_for_completion(iid, timeout=5)
    assert tengine.force_cancel_all() == 0


def test_cancel_of_a_step_that_stops_on_sigterm_frees_its_worker_at_once(tmp_path: Path) -> None:
    """Cooperative cancel: the step handles SIGTERM by finishing its work and returning.

    That is what the grace period is for. Once the step has returned, nothing
    is left to wait for: the slot must take new work at once, not after the
    grace period, and closing the engine must not wait it out either.
    """
    pidfile = tmp_path / "pid"

    def cooperative(ctx: Any) -> None:
        stop: list[int] = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        write_atomic(pidfile, str(os.getpid()))
        deadline = time.monotonic() + 60
        while not stop and time.monotonic() < deadline:
            time.sleep(0.01)

    def quick(ctx: Any) -> None:
        ctx.data.value = "ran"

    long_grace = 10.0
    engine = WorkflowEngine(max_workers=1, grace_period=long_grace)
    try:
        engine.register_workflow(
            WorkflowDefinition("coop", data_type=Data).add_step(StepDefinition("c", "c", cooperative))
        )
        engine.register_workflow(WorkflowDefinition("next", data_type=Data).add_step(StepDefinition("q", "q", quick)))
        iid = engine.start_workflow("coop", Data())
        wait_for_text(pidfile)
        engine.cancel_workflow(iid)
        assert engine.get_status(iid).status is WorkflowStatus.CANCELLED
        started = time.monotonic()
        nxt = engine.start_workflow("next", Data())
        engine.wait_for_completion(nxt, timeout=long_grace + 10)
        waited = time.monotonic() - started
        assert waited < 5, f"the next run waited {waited:.1f} s for the slot of a step that had already returned"
    finally:
        started = time.monotonic()
        engine.close()
        closed = time.monotonic() - started
    assert closed < 5, f"closing the engine took {closed:.1f} s"


def test_timeout_names_the_sigkill_that_processes_ignoring_sigterm_needed(
    tengine: WorkflowEngine, tmp_path: Path
) -> None:
    """The worker dies on SIGTERM, a child ignoring it needs the SIGKILL: the error says so, not just SIGTERM."""
    out = tmp_path / "ready.json"

    def step(ctx: Any) -> None:
        stubborn = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 120; true"])
        deadline = time.monotonic() + 10
        while not psutil.Process(stubborn.pid).children() and time.monotonic() < deadline:
            time.sleep(0.005)
        _ready(out, [stubborn.pid, *[c.pid for c in psutil.Process(stubborn.pid).children()]])
        time.sleep(120)

    tengine.register_workflow(
        WorkflowDefinition("stub", data_type=Data).add_step(StepDefinition("h", "h", step).with_timeout(TIMEOUT))
    )
    iid = tengine.start_workflow("stub", Data())
    _, pids = hanging_tree(tengine, iid, out, 2)
    with pytest.raises(StepTimeout) as info:
        tengine.wait_for_completion(iid, timeout=30)
    assert [p for p in pids if alive(p)] == []
    message = str(info.value)
    assert "killed by SIGTERM" in message, message  # the worker itself
    assert "2 processes it started outlived SIGTERM and the grace period: killed by SIGKILL" in message, message
