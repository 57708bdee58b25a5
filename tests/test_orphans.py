"""No orphans: whatever way the engine's process ends, its workers and their children end too.

The engine runs in a child Python process (a script written into tmp_path)
whose steps each start a grandchild ``sleep``. The test lists that process's
whole tree with psutil while the steps hang, ends the process (``kill -9``, an
uncaught exception, the end of the script) and checks that every process of
the tree is gone within 2 s. The same for an engine in this process leaving
its ``with`` block normally and by an exception.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from wfaas import (
    StepDefinition,
    StepStatus,
    WorkflowDefinition,
    WorkflowEngine,
    WorkflowStatus,
)

from conftest import Data, alive, descendants, wait_for_text, wait_until, write_atomic

pytestmark = pytest.mark.usefixtures("no_leftovers")

ORPHAN_DEADLINE = 2.0  # the issue: workers and their children exit within 2 s of the engine's death


SCRIPT = textwrap.dedent(
    """
    import json, os, subprocess, sys, time
    from dataclasses import dataclass
    from pathlib import Path

    from wfaas import StepDefinition, WorkflowData, WorkflowDefinition, WorkflowEngine

    OUT = Path(sys.argv[1])
    MODE = sys.argv[2]


    @dataclass
    class D(WorkflowData):
        pass


    def step(ctx):
        child = subprocess.Popen(["sleep", "120"])
        tmp = OUT / f".{ctx.step_id}.tmp"
        tmp.write_text(json.dumps({"worker": os.getpid(), "grandchild": child.pid}))
        os.replace(tmp, OUT / f"{ctx.step_id}.json")
        time.sleep(120)


    def wait_started():
        deadline = time.monotonic() + 60
        while not all((OUT / f"{s}.json").exists() for s in ("a", "b")):
            if time.monotonic() > deadline:
                sys.exit("steps never started")
            time.sleep(0.01)


    def wait_go():
        # The test lists this process's tree first, then lets it end.
        deadline = time.monotonic() + 60
        while not (OUT / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.01)


    if __name__ == "__main__":
        wf = WorkflowDefinition("orphans", data_type=D)
        wf.add_step(StepDefinition("a", "a", step)).add_step(StepDefinition("b", "b", step))
        if MODE in ("kill9", "raise_in_with"):
            with WorkflowEngine(max_workers=2, grace_period=1.0) as engine:
                engine.register_workflow(wf)
                iid = engine.start_workflow("orphans", D())
                wait_started()
                (OUT / "ready").touch()
                if MODE == "raise_in_with":
                    wait_go()
                    raise RuntimeError("the program failed while its workflow ran")
                engine.wait_for_completion(iid)  # until the test kills this process
        else:
            # No context manager, no close(): the program just ends, by an exception or not.
            engine = WorkflowEngine(max_workers=2, grace_period=1.0)
            engine.register_workflow(wf)
            engine.start_workflow("orphans", D())
            wait_started()
            (OUT / "ready").touch()
            wait_go()
            if MODE == "raise_without_close":
                raise RuntimeError("the program failed while its workflow ran")
    """
)


def run_script(tmp_path: Path, mode: str) -> tuple[subprocess.Popen[bytes], list[psutil.Process], list[int]]:
    """Start the script; once both steps hang, (the process, its whole tree, the steps' worker + grandchild PIDs)."""
    script = tmp_path / "engine_script.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), mode], cwd=tmp_path, stderr=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        wait_until(lambda: (tmp_path / "ready").exists() or proc.poll() is not None, 60, "the script's steps to start")
    except AssertionError:
        proc.kill()
        raise
    if not (tmp_path / "ready").exists():
        _, err = proc.communicate()
        raise AssertionError(f"the script ended early ({proc.returncode}): {err.decode()}")
    step_pids = []
    for s in ("a", "b"):
        info = json.loads(wait_for_text(tmp_path / f"{s}.json"))
        step_pids += [info["worker"], info["grandchild"]]
    tree = psutil.Process(proc.pid).children(recursive=True)
    assert set(step_pids) <= {p.pid for p in tree}
    return proc, tree, step_pids


def assert_all_gone(tree: list[psutil.Process], step_pids: list[int], since: float, what: str) -> None:
    pids = {p.pid for p in tree} | set(step_pids)
    try:
        wait_until(lambda: not any(alive(p) for p in pids), ORPHAN_DEADLINE - (time.monotonic() - since), what)
    except AssertionError:
        left = [f"{p} {' '.join(psutil.Process(p).cmdline())[:80]}" for p in pids if alive(p)]
        for p in pids:  # do not leave them running for the rest of the suite
            if alive(p):
                os.kill(p, signal.SIGKILL)
        raise AssertionError(f"{what}: still running {ORPHAN_DEADLINE} s later: {left}") from None


def test_kill_9_of_the_engine_process_leaves_no_orphans(tmp_path: Path) -> None:
    proc, tree, step_pids = run_script(tmp_path, "kill9")
    # The tree: the forkserver, the resource tracker, two workers, two grandchild sleeps.
    assert len(tree) >= 5
    os.kill(proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    assert_all_gone(tree, step_pids, killed, "after kill -9 of the engine")


@pytest.mark.parametrize("mode", ["raise_in_with", "raise_without_close", "return_without_close"])
def test_engine_process_exit_leaves_no_process(tmp_path: Path, mode: str) -> None:
    proc, tree, step_pids = run_script(tmp_path, mode)
    (tmp_path / "go").touch()
    _, err = proc.communicate(timeout=30)
    exited = time.monotonic()
    if mode.startswith("raise"):
        assert proc.returncode == 1 and b"the program failed" in err, err.decode()
    else:
        assert proc.returncode == 0, err.decode()
    assert_all_gone(tree, step_pids, exited, f"after the engine's process exited ({mode})")


# -- an engine in this process ---------------------------------------------------------------------


def test_with_block_exit_by_exception_cancels_and_leaves_no_process(tmp_path: Path) -> None:
    out = tmp_path / "started.json"

    def step(ctx: Any) -> None:
        child = subprocess.Popen(["sleep", "120"])
        write_atomic(out, json.dumps([os.getpid(), child.pid]))
        time.sleep(120)

    wf = WorkflowDefinition("exc", data_type=Data).add_step(StepDefinition("s", "s", step))
    with pytest.raises(RuntimeError, match="user code failed"), WorkflowEngine(max_workers=2, grace_period=1.0) as eng:
        eng.register_workflow(wf)
        iid = eng.start_workflow("exc", Data())
        pids = json.loads(wait_for_text(out))
        raise RuntimeError("user code failed")
    assert [p for p in pids if alive(p)] == []
    assert descendants() == []
    state = eng.get_status(iid)
    assert state.status is WorkflowStatus.CANCELLED
    assert state.step_states["s"].status is StepStatus.CANCELLED


def test_normal_exit_leaves_no_process_even_one_a_step_left_running(tmp_path: Path) -> None:
    """A step that returns but leaves a background child: the engine's exit still takes it down."""
    out = tmp_path / "bg.pid"

    def step(ctx: Any) -> None:
        child = subprocess.Popen(["sleep", "120"])  # never waited for
        write_atomic(out, str(child.pid))

    wf = WorkflowDefinition("bg", data_type=Data).add_step(StepDefinition("s", "s", step))
    with WorkflowEngine(max_workers=2, grace_period=1.0) as eng:
        eng.register_workflow(wf)
        eng.wait_for_completion(eng.start_workflow("bg", Data()), timeout=30)
        background = int(out.read_text())
        workers = [p.pid for p in descendants() if p.pid != background]
        assert len(workers) == 2
    try:
        assert not any(alive(w) for w in workers)
        assert descendants() == []
        assert not alive(background), "a process started by a step outlived the engine"
    finally:
        if alive(background):
            os.kill(background, signal.SIGKILL)
