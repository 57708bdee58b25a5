"""Processes that try to escape: a double-forked daemon, and a worker stuck in C code holding the GIL.

A daemon made the classic way (fork, ``setsid``, fork again, the middle
process exits) leaves the worker's process group and session and is
re-parented away from it; it must still die on a timeout, on cancel and when
the engine is killed with ``kill -9``. A worker whose step runs a
catastrophic regular expression (in C, the GIL held for hours) must die
within seconds of its engine's death. Each daemon runs ``sleep`` with a
duration unique to the test, so a scan of every process on the machine by
command line tells whether it survived, wherever it was re-parented to.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from wfaas import Cancelled, StepDefinition, StepTimeout, WorkflowDefinition, WorkflowEngine
from wfaas.pool import terminate_tree

from conftest import Data, alive, reap, wait_for_text, wait_until, write_atomic

# Slow: what waits on real time (a real timeout, the bound after kill -9); the rest runs in the default set.
pytestmark = pytest.mark.usefixtures("no_leftovers")

DEADLINE = 2.0  # the issue: gone within seconds of the engine's death; the orphan tests' bound


def daemonize(seconds: str, pidfile: Path) -> None:
    """Start ``sleep seconds`` as a daemon: fork, setsid, fork, the middle process exits at once."""
    middle = os.fork()
    if middle == 0:
        try:
            os.setsid()
            if os.fork() == 0:
                write_atomic(pidfile, str(os.getpid()))
                os.execvp("sleep", ["sleep", seconds])
        finally:
            os._exit(0)
    os.waitpid(middle, 0)


def unique_seconds() -> str:
    """A `sleep` duration no other process on the machine has on its command line."""
    return f"600.{uuid.uuid4().int % 10**9:09d}"


def sleepers(seconds: str) -> list[psutil.Process]:
    """Every live process on the machine whose command line is ``sleep seconds``."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["cmdline"] == ["sleep", seconds] and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(p)
    return found


def kill_leftovers(seconds: str) -> None:
    for p in sleepers(seconds):
        try:
            p.kill()
        except psutil.Error:
            pass


def zombie_children() -> list[int]:
    """The calling process's children that exited and were not waited for."""
    return [c.pid for c in psutil.Process().children() if c.status() == psutil.STATUS_ZOMBIE]


def daemon_step(seconds: str, pidfile: Path) -> Any:
    def step(ctx: Any) -> None:
        daemonize(seconds, pidfile)
        time.sleep(120)

    return step


def started_daemon(pidfile: Path, seconds: str) -> int:
    """The daemon's PID, once it runs `sleep`, checked to have left the worker's session (and so its group)."""
    pid = int(wait_for_text(pidfile))
    wait_until(lambda: alive(pid) and psutil.Process(pid).cmdline() == ["sleep", seconds], what="the daemon's exec")
    assert os.getsid(pid) != os.getsid(0), "the test's daemon did not leave the worker's session"
    return pid


@pytest.mark.slow
def test_timeout_kills_a_double_forked_daemon(tmp_path: Path) -> None:
    seconds, pidfile = unique_seconds(), tmp_path / "daemon.pid"
    wf = WorkflowDefinition("daemon", data_type=Data).add_step(
        StepDefinition("d", "d", daemon_step(seconds, pidfile)).with_timeout(2.0)
    )
    try:
        with WorkflowEngine(max_workers=1, grace_period=1.0) as engine:
            engine.register_workflow(wf)
            iid = engine.start_workflow("daemon", Data())
            daemon = started_daemon(pidfile, seconds)
            with pytest.raises(StepTimeout):
                engine.wait_for_completion(iid, timeout=30)
            # The attempt is marked only once its whole tree is dead: the daemon too, at once.
            assert not alive(daemon), "the timed-out step's daemon still runs"
            assert sleepers(seconds) == []
    finally:
        kill_leftovers(seconds)


def test_cancel_kills_a_double_forked_daemon(tmp_path: Path) -> None:
    seconds, pidfile = unique_seconds(), tmp_path / "daemon.pid"
    wf = WorkflowDefinition("daemon", data_type=Data).add_step(StepDefinition("d", "d", daemon_step(seconds, pidfile)))
    try:
        with WorkflowEngine(max_workers=1, grace_period=1.0) as engine:
            engine.register_workflow(wf)
            iid = engine.start_workflow("daemon", Data())
            daemon = started_daemon(pidfile, seconds)
            engine.cancel_workflow(iid)
            assert not alive(daemon), "cancel_workflow returned while the step's daemon still ran"
            assert sleepers(seconds) == []
            with pytest.raises(Cancelled):
                engine.wait_for_completion(iid, timeout=5)
    finally:
        kill_leftovers(seconds)


def test_a_daemon_left_by_a_step_that_returned_dies_with_the_engine(tmp_path: Path) -> None:
    seconds, pidfile = unique_seconds(), tmp_path / "daemon.pid"

    def step(ctx: Any) -> None:
        daemonize(seconds, pidfile)

    wf = WorkflowDefinition("daemon", data_type=Data).add_step(StepDefinition("d", "d", step))
    try:
        with WorkflowEngine(max_workers=1, grace_period=1.0) as engine:
            engine.register_workflow(wf)
            engine.wait_for_completion(engine.start_workflow("daemon", Data()), timeout=30)
            daemon = started_daemon(pidfile, seconds)
        assert not alive(daemon), "a daemon a step started outlived the engine"
    finally:
        kill_leftovers(seconds)


# -- the engine killed with kill -9 ---------------------------------------------------------------

SCRIPT = textwrap.dedent(
    """
    import os, re, sys, time
    from dataclasses import dataclass
    from pathlib import Path

    from wfaas import StepDefinition, WorkflowData, WorkflowDefinition, WorkflowEngine

    OUT, MODE, SECONDS = Path(sys.argv[1]), sys.argv[2], sys.argv[3]


    @dataclass
    class D(WorkflowData):
        pass


    def step(ctx):
        if MODE in ("daemon", "returned"):  # fork, setsid, fork, the middle one exits: as daemonize() in the test
            middle = os.fork()
            if middle == 0:
                os.setsid()
                if os.fork() == 0:
                    (OUT / "daemon.tmp").write_text(str(os.getpid()))
                    os.replace(OUT / "daemon.tmp", OUT / "daemon.pid")
                    os.execvp("sleep", ["sleep", SECONDS])
                os._exit(0)
            os.waitpid(middle, 0)
        if MODE == "returned":
            return  # its daemon stays behind in the worker, now idle
        (OUT / "worker.tmp").write_text(str(os.getpid()))
        os.replace(OUT / "worker.tmp", OUT / "worker.pid")
        if MODE == "regex":
            # Backtracks 2**40 times in C without releasing the GIL: no Python thread runs meanwhile.
            re.match(r"(a+)+$", "a" * 40 + "b")
        time.sleep(600)


    if __name__ == "__main__":
        with WorkflowEngine(max_workers=1, grace_period=1.0) as engine:
            engine.register_workflow(WorkflowDefinition("w", data_type=D).add_step(StepDefinition("s", "s", step)))
            engine.wait_for_completion(engine.start_workflow("w", D()))  # until the test kills this process
            worker = [s.pid for s in engine._pool.slots]
            (OUT / "worker.tmp").write_text(str(worker[0]))
            os.replace(OUT / "worker.tmp", OUT / "worker.pid")
            time.sleep(600)
    """
)


@contextlib.contextmanager
def engine_script(tmp_path: Path, mode: str, seconds: str) -> Iterator[tuple[subprocess.Popen[Any], int]]:
    """Run SCRIPT until its step runs; (the engine's process, the worker's PID). Whatever is left is killed after."""
    script = tmp_path / "engine_script.py"
    script.write_text(SCRIPT)
    command = [sys.executable, str(script), str(tmp_path), mode, seconds]
    # Its stderr goes to a file: a pipe would stay open as long as any process that inherited it lives.
    with open(tmp_path / "stderr.txt", "wb") as err:
        proc = subprocess.Popen(command, cwd=tmp_path, stderr=err)
    family: list[psutil.Process] = []
    try:
        worker = tmp_path / "worker.pid"
        wait_until(lambda: worker.exists() or proc.poll() is not None, 60, "the script's step to start")
        if proc.poll() is not None:
            raise AssertionError(f"the script ended early ({proc.returncode}): {(tmp_path / 'stderr.txt').read_text()}")
        family = psutil.Process(proc.pid).children(recursive=True)
        yield proc, int(worker.read_text())
    finally:
        reap(proc)
        for p in family:  # do not leave them running for the rest of the suite
            if alive(p.pid):
                p.kill()
        kill_leftovers(seconds)


def assert_gone_after_kill_9(proc: subprocess.Popen[Any], pids: list[int], what: str) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    proc.wait(timeout=10)
    try:
        wait_until(lambda: not any(alive(p) for p in pids), DEADLINE - (time.monotonic() - killed), what)
    except AssertionError:
        raise AssertionError(f"{what}: still running {DEADLINE} s after kill -9 of the engine") from None


@pytest.mark.slow
def test_kill_9_of_the_engine_kills_a_double_forked_daemon(tmp_path: Path) -> None:
    seconds = unique_seconds()
    with engine_script(tmp_path, "daemon", seconds) as (proc, worker):
        daemon = started_daemon(tmp_path / "daemon.pid", seconds)
        assert_gone_after_kill_9(proc, [worker, daemon], "the worker and its step's daemon")
        assert sleepers(seconds) == []


@pytest.mark.slow
def test_kill_9_of_the_engine_kills_a_daemon_left_by_a_step_that_returned(tmp_path: Path) -> None:
    """The worker is idle, so it too sees the engine go (its pipe closes): it must not leave first, alone."""
    seconds = unique_seconds()
    with engine_script(tmp_path, "returned", seconds) as (proc, worker):
        daemon = started_daemon(tmp_path / "daemon.pid", seconds)
        assert_gone_after_kill_9(proc, [worker, daemon], "an idle worker and the daemon its step left")
        assert sleepers(seconds) == []


@pytest.mark.slow
def test_kill_9_of_the_engine_kills_a_worker_holding_the_gil_in_c_code(tmp_path: Path) -> None:
    with engine_script(tmp_path, "regex", unique_seconds()) as (proc, worker):
        # The step wrote its PID just before the regex: once its CPU time grows, it is inside re.match.
        cpu0 = psutil.Process(worker).cpu_times().user
        wait_until(lambda: psutil.Process(worker).cpu_times().user > cpu0 + 0.2, 30, "the worker to be in re.match")
        assert_gone_after_kill_9(proc, [worker], "a worker stuck in re.match with the GIL held")


def test_the_worker_reaps_the_orphans_it_inherits_and_the_step_keeps_its_exit_statuses(tmp_path: Path) -> None:
    """As a subreaper the worker inherits orphans: they must not pile up as zombies, nor take a step's statuses."""
    report = tmp_path / "report.json"

    def leave_orphans(ctx: Any) -> None:
        # Each `sh` exits at once; its `true` is re-parented to the worker and exits too.
        for _ in range(5):
            subprocess.run(["sh", "-c", "true & exit 0"], check=True)
        # While orphans die around it, a step's own child still reports its own exit status.
        ctx.data.value = subprocess.run(["sh", "-c", "exit 3"], check=False).returncode
        # The step ends once all five are the worker's zombies (so the test does not depend on timing).
        wait_until(lambda: len(zombie_children()) == 5, 30, "five zombie orphans of the worker")

    def count_zombies(ctx: Any) -> None:
        report.write_text(str(len(zombie_children())))

    wf = WorkflowDefinition("reap", data_type=Data)
    wf.add_step(StepDefinition("leave", "leave", leave_orphans))
    wf.add_step(StepDefinition("count", "count", count_zombies).depends_on(["leave"]))
    with WorkflowEngine(max_workers=1, grace_period=1.0) as engine:
        engine.register_workflow(wf)
        iid = engine.start_workflow("reap", Data())
        engine.wait_for_completion(iid, timeout=30)
        assert engine.get_status(iid).data.value == 3
    assert report.read_text() == "0", "the worker left zombies of the orphans it inherited"


# -- a kill walks the worker's own tree, never every process on the machine ----------------------

TREE = textwrap.dedent(
    """
    import ctypes, os, signal, subprocess, sys

    OUT, SECONDS = sys.argv[1], sys.argv[2]
    os.setpgid(0, 0)
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER, as a worker is
    grandchild = subprocess.Popen(["sleep", SECONDS])
    middle = os.fork()
    if middle == 0:
        os.setsid()
        if os.fork() == 0:
            os.execvp("sleep", ["sleep", SECONDS])
        os._exit(0)
    os.waitpid(middle, 0)
    with open(OUT + ".tmp", "w") as f:
        f.write(str(grandchild.pid))
    os.replace(OUT + ".tmp", OUT)
    signal.pause()
    """
)


@contextlib.contextmanager
def no_scan() -> Iterator[None]:
    """Fail if anything inside lists every process on the machine (psutil's scans all read /proc)."""
    listdir = os.listdir

    def guarded(path: Any = ".") -> list[Any]:
        if os.fsdecode(path).rstrip("/") == "/proc":
            raise AssertionError("a kill listed every process on the machine")
        return listdir(path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "listdir", guarded)
        yield


def worker_like_tree(tmp_path: Path, seconds: str) -> tuple[subprocess.Popen[Any], int, int]:
    """A subreaper leading its own group, with a child (`sleep`) and a double-forked daemon (`sleep`) that left it."""
    script = tmp_path / "tree.py"
    script.write_text(TREE)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "tree.pid"), seconds])
    grandchild = int(wait_for_text(tmp_path / "tree.pid"))
    daemon = wait_until(lambda: [p.pid for p in sleepers(seconds) if p.pid != grandchild], what="the daemon's exec")[0]
    assert os.getsid(daemon) != os.getsid(proc.pid), "the test's daemon did not leave the tree's session"
    assert psutil.Process(daemon).ppid() == proc.pid, "the daemon was not adopted by the subreaper"
    return proc, grandchild, daemon


def test_a_kill_walks_the_tree_and_stops_a_grandchild_and_a_double_forked_daemon(tmp_path: Path) -> None:
    seconds = unique_seconds()
    proc, grandchild, daemon = worker_like_tree(tmp_path, seconds)
    try:
        with no_scan():
            forced = terminate_tree(proc.pid, grace=5.0)
        assert proc.wait(timeout=5) == -signal.SIGTERM
        assert forced == 0, "SIGTERM should have ended all three within the grace period"
        assert not alive(grandchild), "the kill left the worker's child running"
        assert not alive(daemon), "the kill left the double-forked daemon running"
    finally:
        reap(proc)
        kill_leftovers(seconds)


def test_a_dead_workers_group_is_found_without_a_scan_of_every_process(tmp_path: Path) -> None:
    """The worker died (kill -9): its child went to init or a subreaper above us, still in the worker's group."""
    seconds = unique_seconds()
    proc, grandchild, _ = worker_like_tree(tmp_path, seconds)
    try:
        proc.kill()
        proc.wait(timeout=5)
        wait_until(lambda: psutil.Process(grandchild).ppid() != proc.pid, what="the orphan's re-parenting")
        with no_scan():
            terminate_tree(proc.pid, grace=5.0, exited=True)
        assert not alive(grandchild), "the kill of a dead worker's group left its child running"
    finally:
        reap(proc)
        kill_leftovers(seconds)
