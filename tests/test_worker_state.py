"""A step cannot poison its warm worker: each attempt starts from the same process state (issue 14 item 4).

Each test runs a step that changes some process-wide state and then, on the
same worker process (one worker), a step that looks at that state.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from wfaas import StepDefinition, WorkflowContext, WorkflowDefinition, WorkflowEngine, WorkflowStatus

from conftest import Data

pytestmark = pytest.mark.usefixtures("no_leftovers")


def _close_std_fds(ctx: WorkflowContext[Data]) -> None:
    os.close(1)
    os.close(2)


def _chdir(ctx: WorkflowContext[Data]) -> None:
    os.chdir("/")


def _environment(ctx: WorkflowContext[Data]) -> None:
    os.environ["WFAAS_POISON"] = "1"
    os.environ.pop("PATH", None)


def _replace_environ(ctx: WorkflowContext[Data]) -> None:
    os.environ = {"WFAAS_POISON": "1"}  # type: ignore[assignment]  # noqa: B003 - the poison: a plain dict in its place


def _signals(ctx: WorkflowContext[Data]) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, lambda *a: None)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    signal.setitimer(signal.ITIMER_REAL, 600)


def _sys_path(ctx: WorkflowContext[Data]) -> None:
    sys.path.insert(0, "/wfaas-poison")


def _look(ctx: WorkflowContext[Data]) -> None:
    # Writes to fds 1 and 2 (Python's and the raw ones) fail with EBADF if the last step closed them.
    print("look: stdout works", flush=True)
    print("look: stderr works", file=sys.stderr, flush=True)
    os.write(1, b"look: raw fd 1 works\n")
    ctx.data.items = {
        "pid": os.getpid(),
        "cwd": os.getcwd(),
        "poison_env": os.environ.get("WFAAS_POISON"),
        "environ_type": type(os.environ).__name__,
        "path_env": os.environ.get("PATH"),
        "sigterm": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
        "sigusr2": signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL,
        "blocked": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
        "itimer": signal.getitimer(signal.ITIMER_REAL)[0],
        "path_poisoned": "/wfaas-poison" in sys.path,
    }


def _pid(ctx: WorkflowContext[Data]) -> None:
    # What a fresh worker starts with (the environment is the forkserver's, not the test's).
    ctx.data.value = os.getpid()
    ctx.data.log = [os.getcwd(), os.environ["PATH"]]


@pytest.fixture
def one_worker() -> Iterator[WorkflowEngine]:
    with WorkflowEngine(max_workers=1, grace_period=1.0) as eng:
        yield eng


def _run(engine: WorkflowEngine, poison: Callable[[WorkflowContext[Data]], None]) -> Any:
    wf = (
        WorkflowDefinition(f"poison_{poison.__name__}", data_type=Data)
        .add_step(StepDefinition("first", "First", _pid))
        .add_step(StepDefinition("poison", "Poison", poison).depends_on("first"))
        .add_step(StepDefinition("look", "Look", _look).depends_on("poison"))
    )
    engine.register_workflow(wf)
    iid = engine.start_workflow(wf.id, Data())
    engine.wait_for_completion(iid, timeout=60)
    state = engine.get_status(iid)
    assert state.status is WorkflowStatus.COMPLETED
    return state.data


@pytest.mark.parametrize("poison", [_close_std_fds, _chdir, _environment, _replace_environ, _signals, _sys_path])
def test_the_next_step_on_the_worker_sees_the_state_it_started_with(
    one_worker: WorkflowEngine, poison: Callable[[WorkflowContext[Data]], None]
) -> None:
    data = _run(one_worker, poison)
    seen = data.items
    assert seen["pid"] == data.value, "the steps ran on one warm worker"
    assert seen["cwd"] == data.log[0]
    assert seen["poison_env"] is None and seen["path_env"] == data.log[1]
    assert seen["environ_type"] == "_Environ"
    assert seen["sigterm"] and seen["sigusr2"]
    assert int(signal.SIGHUP) not in seen["blocked"]
    assert seen["itimer"] == 0
    assert not seen["path_poisoned"]


def _remove_cwd(ctx: WorkflowContext[Data]) -> None:
    shutil.rmtree(os.getcwd())


def test_a_worker_whose_state_cannot_be_restored_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The worker starts in a folder the step removes: its working directory cannot be restored.
    home = tmp_path / "cwd"
    home.mkdir()
    monkeypatch.chdir(home)
    with WorkflowEngine(max_workers=1, grace_period=1.0) as engine:
        monkeypatch.chdir(tmp_path)  # the next worker starts where the engine is now
        wf = (
            WorkflowDefinition("poison_cwd_removed", data_type=Data)
            .add_step(StepDefinition("first", "First", _pid))
            .add_step(StepDefinition("poison", "Poison", _remove_cwd).depends_on("first"))
            .add_step(StepDefinition("look", "Look", _look).depends_on("poison"))
        )
        engine.register_workflow(wf)
        iid = engine.start_workflow(wf.id, Data())
        engine.wait_for_completion(iid, timeout=60)
        state = engine.get_status(iid)
    assert state.data.items["pid"] != state.data.value, "the worker was replaced before its next step"
    # Sent to the old worker as soon as poison's reply came, before it said it retires: never started there.
    assert [a.outcome for a in state.step_states["look"].history] == ["succeeded"]


def _close_capture_pipe(ctx: WorkflowContext[Data]) -> None:
    # During an attempt fds 1 and 2 are the capture pipe's write end; close every other
    # descriptor of that pipe (its read end and the capture's own copy of the write end),
    # as a step closing "all inherited descriptors" would.
    pipe = os.readlink("/proc/self/fd/1")
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            try:
                if os.readlink(f"/proc/self/fd/{fd}") == pipe:
                    os.close(fd)
            except OSError:
                continue  # the listing's own descriptor, gone by now
    ctx.data.n = 1


def test_a_step_that_closes_the_capture_pipe_gets_its_worker_replaced() -> None:
    with WorkflowEngine(max_workers=1, grace_period=1.0) as engine:
        wf = (
            WorkflowDefinition("poison_capture_pipe", data_type=Data)
            .add_step(StepDefinition("first", "First", _pid))
            .add_step(StepDefinition("poison", "Poison", _close_capture_pipe).depends_on("first"))
            .add_step(StepDefinition("look", "Look", _look).depends_on("poison"))
        )
        engine.register_workflow(wf)
        iid = engine.start_workflow(wf.id, Data())
        engine.wait_for_completion(iid, timeout=60)
        state = engine.get_status(iid)
    assert state.status is WorkflowStatus.COMPLETED, state.step_states["look"].error
    assert state.data.n == 1
    assert state.data.items["pid"] != state.data.value, "the worker was replaced before its next step"
    assert [a.outcome for a in state.step_states["look"].history] == ["succeeded"]
