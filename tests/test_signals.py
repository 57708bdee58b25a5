"""Signals in the parent: Ctrl-C cancels gracefully; workers ignore SIGINT so only the scheduler decides.

Ctrl-C is sent the way a terminal does: SIGINT to the whole foreground
process group of a child Python process running an engine (the script below,
started in a session of its own). Workers lead their own process groups, so
the signal reaches only the engine's process (and stdlib helpers that ignore
it); the engine then stops the running step's tree (SIGTERM first: the step
sees it), marks the run CANCELLED and the program ends with KeyboardInterrupt.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from wfaas import (
    SqliteStore,
    StepDefinition,
    StepStatus,
    Terminated,
    WorkflowDefinition,
    WorkflowEngine,
    WorkflowStatus,
)

from conftest import Data, alive, reap, wait_for, wait_for_text, wait_until, write_atomic

pytestmark = pytest.mark.usefixtures("no_leftovers")


SCRIPT = textwrap.dedent(
    """
    import faulthandler, json, os, signal, subprocess, sys, time
    from dataclasses import dataclass
    from pathlib import Path

    from wfaas import SqliteStore, StepDefinition, WorkflowData, WorkflowDefinition, WorkflowEngine

    OUT = Path(sys.argv[1])
    MODE = sys.argv[2]  # wait | context | twice | own (the program handles SIGTERM itself)


    @dataclass
    class D(WorkflowData):
        pass


    def write(name, text):
        tmp = OUT / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, OUT / name)


    def step(ctx):
        def on_term(signum, frame):
            # Re-entrant: the engine signals the worker and its group, so this may run nested.
            with open(OUT / "got_sigterm", "a") as f:
                f.write("TERM\\n")
            if MODE != "twice":  # "twice": a step that will not stop on SIGTERM
                os._exit(0)

        signal.signal(signal.SIGTERM, on_term)
        child = subprocess.Popen(["sleep", "120"])
        write("step.json", json.dumps({"worker": os.getpid(), "grandchild": child.pid}))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (OUT / "go").exists():
            time.sleep(0.01)


    if __name__ == "__main__":
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for stacks if it hangs
        if MODE == "own":
            signal.signal(signal.SIGTERM, lambda signum, frame: write("own_handler", "called"))
        store = SqliteStore(OUT / "runs.sqlite")
        grace = 60.0 if MODE == "twice" else 1.0
        try:
            with WorkflowEngine(store=store, max_workers=2, grace_period=grace) as engine:
                wf = WorkflowDefinition("sig", data_type=D).add_step(StepDefinition("s", "s", step))
                engine.register_workflow(wf)
                iid = engine.start_workflow("sig", D())
                write("iid", iid)
                while not (OUT / "step.json").exists():
                    time.sleep(0.01)
                if MODE == "own":
                    write("waiting", "")
                    while not (OUT / "own_handler").exists():  # the engine must leave the handler alone
                        time.sleep(0.01)
                    (OUT / "go").touch()
                if MODE == "context":
                    write("waiting", "")
                    while True:  # the program's own work inside the engine's context
                        time.sleep(0.01)
                try:
                    write("waiting", "")
                    engine.wait_for_completion(iid)
                finally:
                    state = engine.get_status(iid)
                    write("status.json", json.dumps([state.status.name, state.step_states["s"].status.name]))
        finally:
            store.close()
    """
)


def start(tmp_path: Path, mode: str) -> tuple[subprocess.Popen[bytes], list[psutil.Process], dict[str, int]]:
    script = tmp_path / "sig_script.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), mode],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, as a program in a terminal
    )
    try:
        wait_until(lambda: (tmp_path / "waiting").exists() or proc.poll() is not None, 60, "the script to wait")
        if proc.poll() is not None:
            raise AssertionError(f"the script ended early: {proc.communicate()[1].decode()}")
        step = json.loads(wait_for_text(tmp_path / "step.json"))
        tree = psutil.Process(proc.pid).children(recursive=True)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    return proc, tree, step


def ctrl_c(proc: subprocess.Popen[bytes]) -> None:
    """What the terminal does on Ctrl-C: SIGINT to the foreground process group."""
    os.killpg(proc.pid, signal.SIGINT)


def finish(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """Wait for the script to end; if it hangs, fail with every thread's stack (faulthandler) and kill it."""
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGUSR1)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=2)  # let faulthandler write the stacks
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        raise AssertionError(f"the script did not exit within {timeout} s:\n{err.decode()}") from None
    return err.decode()


def stored_status(tmp_path: Path) -> tuple[WorkflowStatus, StepStatus]:
    iid = (tmp_path / "iid").read_text()
    store = SqliteStore(tmp_path / "runs.sqlite")
    try:
        state = store.load(iid)
        return state.status, state.step_states["s"].status
    finally:
        store.close()


def assert_tree_dead(tree: list[psutil.Process], step: dict[str, int]) -> None:
    pids = {p.pid for p in tree} | set(step.values())
    wait_until(lambda: not any(alive(p) for p in pids), 2.0, "the engine's processes to end with it")


# One variant of each signal test runs by default, the others with the slow set (same code path, another entry).
@pytest.mark.parametrize("mode", ["wait", pytest.param("context", marks=pytest.mark.slow)])
def test_ctrl_c_cancels_gracefully_and_exits_with_keyboard_interrupt(tmp_path: Path, mode: str) -> None:
    proc, tree, step = start(tmp_path, mode)
    ctrl_c(proc)
    err = finish(proc, timeout=30)
    assert proc.returncode in (-signal.SIGINT, 130), (proc.returncode, err)
    assert "KeyboardInterrupt" in err, err
    # Graceful: the step got SIGTERM (and its own handler ran) rather than a bare SIGKILL.
    assert (tmp_path / "got_sigterm").exists()
    assert stored_status(tmp_path) == (WorkflowStatus.CANCELLED, StepStatus.CANCELLED)
    if mode == "wait":
        # Seen by the program itself, right after wait_for_completion raised.
        assert json.loads((tmp_path / "status.json").read_text()) == ["CANCELLED", "CANCELLED"]
    assert_tree_dead(tree, step)


def test_second_ctrl_c_kills_at_once(tmp_path: Path) -> None:
    """The step ignores SIGTERM and the grace period is 60 s: a second Ctrl-C must not wait for it."""
    proc, tree, step = start(tmp_path, "twice")
    ctrl_c(proc)
    wait_for_text(tmp_path / "got_sigterm")  # the graceful cancel is under way
    second = time.monotonic()
    ctrl_c(proc)
    err = finish(proc, timeout=30)
    assert time.monotonic() - second < 5, "the second Ctrl-C waited for the grace period"
    assert proc.returncode in (-signal.SIGINT, 130), (proc.returncode, err)
    assert "KeyboardInterrupt" in err, err
    assert stored_status(tmp_path) == (WorkflowStatus.CANCELLED, StepStatus.CANCELLED)
    assert_tree_dead(tree, step)


def sigint_ignored(pid: int) -> bool:
    """Whether SIGINT is in the process's ignored-signals mask (/proc/PID/status, SigIgn)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    raise AssertionError("no SigIgn line")


def test_workers_ignore_sigint(engine: WorkflowEngine, tmp_path: Path) -> None:
    go = tmp_path / "go"

    def step(ctx: Any) -> None:
        write_atomic(tmp_path / "pid", str(os.getpid()))
        deadline = time.monotonic() + 30
        while not go.exists():
            if time.monotonic() > deadline:
                raise TimeoutError("never released")
            time.sleep(0.01)
        time.sleep(0.1)  # a SIGINT that was not ignored would surface here as KeyboardInterrupt
        ctx.data.value = os.getpid()

    engine.register_workflow(WorkflowDefinition("int", data_type=Data).add_step(StepDefinition("s", "s", step)))
    iid = engine.start_workflow("int", Data())
    pid = int(wait_for_text(tmp_path / "pid"))
    assert sigint_ignored(pid)
    os.kill(pid, signal.SIGINT)
    os.killpg(pid, signal.SIGINT)  # a terminal's Ctrl-C would reach the worker's group, if anything
    go.touch()
    engine.wait_for_completion(iid, timeout=30)
    state = engine.get_status(iid)
    assert state.step_states["s"].attempts == 1
    assert state.data.value == pid
    assert alive(pid)


# -- SIGTERM and SIGHUP: how systemd, docker and `kill` stop a program (issue 14) ---------------

EXIT_BY = {signal.SIGTERM: 143, signal.SIGHUP: 129}


@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, pytest.param(signal.SIGHUP, marks=pytest.mark.slow)], ids=["SIGTERM", "SIGHUP"]
)
def test_sigterm_or_sighup_cancels_gracefully_like_ctrl_c(tmp_path: Path, sig: signal.Signals) -> None:
    """An engine in a program that handles neither signal: cancelled gracefully, checkpointed, exit 128 + N."""
    proc, tree, step = start(tmp_path, "wait")
    os.kill(proc.pid, sig)  # to the program alone, as `kill PID` or `docker stop` send it
    err = finish(proc, timeout=30)
    assert proc.returncode == EXIT_BY[sig], (proc.returncode, err)
    assert (tmp_path / "got_sigterm").exists()  # the step was stopped with SIGTERM, not a bare SIGKILL
    assert stored_status(tmp_path) == (WorkflowStatus.CANCELLED, StepStatus.CANCELLED)
    assert json.loads((tmp_path / "status.json").read_text()) == ["CANCELLED", "CANCELLED"]
    assert sig.name in err  # one line says what happened
    assert_tree_dead(tree, step)


def test_second_sigterm_kills_at_once(tmp_path: Path) -> None:
    """The step ignores SIGTERM and the grace period is 60 s: a second SIGTERM must not wait for it."""
    proc, tree, step = start(tmp_path, "twice")
    os.kill(proc.pid, signal.SIGTERM)
    wait_for_text(tmp_path / "got_sigterm")  # the graceful cancel is under way
    second = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    err = finish(proc, timeout=30)
    assert time.monotonic() - second < 20, "the second SIGTERM waited for the grace period (60 s)"
    assert proc.returncode == 143, (proc.returncode, err)
    assert stored_status(tmp_path) == (WorkflowStatus.CANCELLED, StepStatus.CANCELLED)
    assert_tree_dead(tree, step)


def test_a_program_that_handles_sigterm_keeps_its_handler(tmp_path: Path) -> None:
    proc, tree, step = start(tmp_path, "own")
    del tree, step  # nothing is stopped here
    os.kill(proc.pid, signal.SIGTERM)
    err = finish(proc, timeout=60)
    assert proc.returncode == 0, err
    assert (tmp_path / "own_handler").read_text() == "called"
    assert json.loads((tmp_path / "status.json").read_text()) == ["COMPLETED", "SUCCEEDED"]
    assert not (tmp_path / "got_sigterm").exists()


@pytest.fixture
def default_dispositions() -> Iterator[None]:
    """SIGTERM and SIGHUP at SIG_DFL for the test (as in a program that set neither), restored after."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    for sig in saved:
        signal.signal(sig, signal.SIG_DFL)
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.usefixtures("default_dispositions")
def test_the_engine_handles_only_default_signals_and_restores_them() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup: stays ignored
    first = WorkflowEngine(max_workers=1)
    second = WorkflowEngine(max_workers=1)
    try:
        installed = signal.getsignal(signal.SIGTERM)
        assert callable(installed)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        first.close()
        assert signal.getsignal(signal.SIGTERM) is installed  # the second engine still runs
    finally:
        first.close()
        second.close()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN


@pytest.mark.usefixtures("default_dispositions")
def test_a_first_signal_raised_inside_a_weakref_callback_is_delivered_again() -> None:
    # The garbage collector runs weakref callbacks between any two bytecodes; what one raises, Python
    # swallows. A wfaas-local command whose first signal landed there used to wait on, never cancelling.
    import weakref

    from wfaas._signals import Interrupted, StopOnSignals

    notes: list[str] = []
    swallowed: list[BaseException | None] = []

    class Collected:
        pass

    def callback(ref: Any) -> None:
        signal.raise_signal(signal.SIGTERM)  # its handler raises Interrupted here, in the callback

    stop = StopOnSignals(notes.append).__enter__()
    outer = sys.unraisablehook
    try:
        sys.unraisablehook = lambda u: (swallowed.append(u.exc_value), stop._swallowed(u))[0]  # type: ignore[func-returns-value]
        collected = Collected()
        ref = weakref.ref(collected, callback)
        with pytest.raises(Interrupted) as raised:
            del collected  # the last reference: the callback runs now
            threading.Event().wait(10)  # a wait the signal, sent again, interrupts (as the command's wait)
    finally:
        sys.unraisablehook = outer
        stop.__exit__()
    assert ref() is None and len([e for e in swallowed if isinstance(e, Interrupted)]) == 1
    assert raised.value.signum == signal.SIGTERM and raised.value.exit_code == 143
    assert (stop.signum, stop.received) == (signal.SIGTERM, 1), "still the first signal: a second one kills"
    assert notes == ["SIGTERM: cancelling… again to kill"], "said once"


@pytest.mark.usefixtures("default_dispositions")
def test_an_engine_made_outside_the_main_thread_leaves_signals_alone() -> None:
    made: list[WorkflowEngine] = []
    thread = threading.Thread(target=lambda: made.append(WorkflowEngine(max_workers=1)))
    thread.start()
    thread.join(60)
    try:
        assert made and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        for eng in made:
            eng.close()


# -- wfaas-local: the same signals through the real CLI (issue 13, defect 3; issue 14, item 5) ----

CLI_TARGET = textwrap.dedent(
    """
    import os, signal, time
    from dataclasses import dataclass
    from pathlib import Path

    import wfaas.engine
    from wfaas import StepDefinition, WorkflowData, WorkflowDefinition

    OUT = Path(os.environ["WFAAS_TEST_OUT"])
    STUBBORN = os.environ.get("WFAAS_TEST_STUBBORN") == "1"
    if STUBBORN:
        # Only a kill can then end the step quickly: the graceful stop would take 60 s.
        wfaas.engine.WorkflowEngine.__init__.__kwdefaults__["grace_period"] = 60.0


    @dataclass
    class D(WorkflowData):
        pass


    def block(ctx):
        def on_term(signum, frame):
            with open(OUT / "got_sigterm", "a") as f:
                f.write("TERM\\n")
            if not STUBBORN:
                os._exit(0)

        signal.signal(signal.SIGTERM, on_term)
        tmp = OUT / ".pid.tmp"
        tmp.write_text(str(os.getpid()))
        os.replace(tmp, OUT / "step.pid")
        deadline = time.monotonic() + 120
        while not (OUT / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.01)


    workflow = WorkflowDefinition("blocking", data_type=D).add_step(StepDefinition("block", "Block", block))
    """
)


class Cli:
    """A `wfaas-local` command in a session of its own; its output (stdout and stderr) read as it comes."""

    def __init__(self, tmp_path: Path, *args: str, stubborn: bool = False) -> None:
        (tmp_path / "cli_wf.py").write_text(CLI_TARGET)
        self.store = str(tmp_path / "runs.sqlite")
        env = {**os.environ, "WFAAS_TEST_OUT": str(tmp_path), "WFAAS_TEST_STUBBORN": "1" if stubborn else "0"}
        command = args or ("run", f"{tmp_path}/cli_wf.py:workflow")
        self.proc = subprocess.Popen(
            [sys.executable, "-X", "faulthandler", "-m", "wfaas.command_line", *command, "--store", self.store],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
        self.out = b""
        self.mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])  # what the command inherits

    def read_until(self, text: str, timeout: float = 60) -> None:
        """Read output until ``text`` appears (failing after ``timeout`` s, or if the command ends first)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while text.encode() not in self.out:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {text!r} within {timeout} s; output so far {self._stacks()}")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    raise AssertionError(f"the command ended before {text!r}; output:\n{self.out.decode()}")
                self.out += chunk

    def finish(self, timeout: float = 60) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the command did not end within {timeout} s:\n{self._stacks()}")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            chunk = os.read(self.proc.stdout.fileno(), 65536) if ready else b""
            if ready and not chunk:
                break
            self.out += chunk
        self.proc.wait(timeout=30)
        self.proc.stdout.close()
        return self.out.decode()

    def _stacks(self) -> str:
        """The output so far and, if the command still runs, every thread's stack (faulthandler, SIGABRT)."""
        assert self.proc.stdout is not None
        state = f"(exit status {self.proc.poll()}; some child still holds the output open)"
        if self.proc.poll() is None:
            masks = []
            for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
                lines = (task / "status").read_text().splitlines()
                wanted = ("Name", "SigBlk", "SigPnd", "ShdPnd", "SigCgt")
                masks.append(" ".join(x for x in lines if x.startswith(wanted)))
            state = "(still running; its threads' signal masks and stacks:)\n" + "\n".join(masks)
            os.kill(self.proc.pid, signal.SIGABRT)
            end = time.monotonic() + 5
            while time.monotonic() < end and select.select([self.proc.stdout], [], [], 0.5)[0]:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                self.out += chunk
        reap(self.proc)
        inherited = ", ".join(sorted(s.name for s in self.mask)) or "none"
        return f"{state}\nsignals blocked when it was started: {inherited}\n{self.out.decode(errors='replace')}"

    def stored(self) -> tuple[str, str]:
        store = SqliteStore(self.store)
        try:
            (iid,) = store.ids()
            record = store.read(iid)  # not load(): the data class lives in the target, not importable here
            assert record is not None
            return record.meta["status"].upper(), record.steps["block"]["status"].upper()
        finally:
            store.close()


def send(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Ctrl-C as a terminal sends it (to the foreground process group); SIGTERM/SIGHUP as `kill PID` does."""
    if sig is signal.SIGINT:
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid, sig)


CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}


@pytest.mark.parametrize(
    "sig",
    [
        signal.SIGINT,
        pytest.param(signal.SIGTERM, marks=pytest.mark.slow),
        pytest.param(signal.SIGHUP, marks=pytest.mark.slow),
    ],
    ids=lambda s: s.name,
)
def test_cli_run_stops_gracefully_prints_resume_and_exits_128_plus_n(tmp_path: Path, sig: signal.Signals) -> None:
    cli = Cli(tmp_path)
    try:
        cli.read_until("block: started")
        worker = int(wait_for_text(tmp_path / "step.pid"))
        send(cli.proc, sig)
        out = cli.finish()
    finally:
        reap(cli.proc)
    assert cli.proc.returncode == CODES[sig], out
    assert "cancelling… " in out and "again to kill" in out
    assert "wfaas-local resume " in out and "Aborted!" not in out and "Traceback" not in out
    assert (tmp_path / "got_sigterm").exists()  # graceful: the step saw SIGTERM first
    assert cli.stored() == ("CANCELLED", "CANCELLED")
    wait_until(lambda: not alive(worker), 5, "the step's worker to be gone")


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (signal.SIGINT, signal.SIGINT),
        pytest.param(signal.SIGTERM, signal.SIGTERM, marks=pytest.mark.slow),
        pytest.param(signal.SIGTERM, signal.SIGINT, marks=pytest.mark.slow),
    ],
    ids=["ctrl-c-twice", "sigterm-twice", "sigterm-then-ctrl-c"],
)
def test_cli_second_signal_kills_at_once_and_exits_with_the_first(
    tmp_path: Path, first: signal.Signals, second: signal.Signals
) -> None:
    """The step ignores SIGTERM and the grace period is 60 s: only the second signal's kill ends it soon."""
    cli = Cli(tmp_path, stubborn=True)
    try:
        cli.read_until("block: started")
        wait_for_text(tmp_path / "step.pid")
        send(cli.proc, first)
        cli.read_until("again to kill")  # the graceful stop is under way, and the user is told so
        wait_for_text(tmp_path / "got_sigterm")
        sent = time.monotonic()
        send(cli.proc, second)
        out = cli.finish()
    finally:
        reap(cli.proc)
    assert time.monotonic() - sent < 30, "the second signal waited for the 60 s grace period"
    assert cli.proc.returncode == CODES[first], out
    assert "Aborted!" not in out and "Traceback" not in out
    assert "wfaas-local resume " in out
    assert cli.stored() == ("CANCELLED", "CANCELLED")


def test_cli_ctrl_c_while_it_closes_still_exits_130(tmp_path: Path) -> None:
    """A second Ctrl-C after the run was cancelled, while the command closes the engine: still 130, no traceback."""
    cli = Cli(tmp_path)
    try:
        cli.read_until("block: started")
        wait_for_text(tmp_path / "step.pid")
        send(cli.proc, signal.SIGINT)
        cli.read_until("wfaas-local resume ")  # cancelled and checkpointed: now it closes
        with contextlib.suppress(ProcessLookupError):
            send(cli.proc, signal.SIGINT)
        out = cli.finish()
    finally:
        reap(cli.proc)
    assert cli.proc.returncode == 130, out
    assert "Aborted!" not in out and "Traceback" not in out


@pytest.mark.parametrize(
    "sig", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)], ids=lambda s: s.name
)
def test_cli_recover_stops_on_a_signal_like_run(tmp_path: Path, sig: signal.Signals) -> None:
    first = Cli(tmp_path)
    try:
        first.read_until("block: started")
        wait_for_text(tmp_path / "step.pid")
        os.killpg(first.proc.pid, signal.SIGKILL)  # the run's owner dies: a run for `recover`
        first.finish()
    finally:
        reap(first.proc)
    (tmp_path / "step.pid").unlink()
    cli = Cli(tmp_path, "recover")
    try:
        cli.read_until("recovered ")
        wait_for_text(tmp_path / "step.pid")
        send(cli.proc, sig)
        out = cli.finish()
    finally:
        reap(cli.proc)
    assert cli.proc.returncode == CODES[sig], out
    assert "Aborted!" not in out and "Traceback" not in out
    assert "wfaas-local resume " in out
    assert cli.stored() == ("CANCELLED", "CANCELLED")


def test_cli_sighup_from_a_terminal_that_closed_exits_129(tmp_path: Path) -> None:
    """The usual SIGHUP: the terminal went away, so every write to it fails (EIO). The run must still
    be cancelled and checkpointed, and the command end with 129, not a traceback and 1."""
    (tmp_path / "cli_wf.py").write_text(CLI_TARGET)
    primary, secondary = pty.openpty()
    store_path = str(tmp_path / "runs.sqlite")
    proc = subprocess.Popen(
        [sys.executable, "-m", "wfaas.command_line", "run", f"{tmp_path}/cli_wf.py:workflow", "--store", store_path],
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        env={**os.environ, "WFAAS_TEST_OUT": str(tmp_path), "COLUMNS": "80", "TERM": "xterm"},
        start_new_session=True,
    )
    os.close(secondary)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "step.pid").exists():  # keep reading, or the live panel blocks on a full pty
            assert time.monotonic() < deadline, "the step did not start"
            if select.select([primary], [], [], 0.1)[0]:
                os.read(primary, 65536)
        os.close(primary)  # the terminal goes away
        primary = -1
        os.kill(proc.pid, signal.SIGHUP)
        proc.wait(timeout=60)
    finally:
        if primary >= 0:
            os.close(primary)
        reap(proc)
    assert proc.returncode == 129
    store = SqliteStore(tmp_path / "runs.sqlite")
    try:
        (iid,) = store.ids()
        assert (store.read_meta(iid) or {}).get("status") == "cancelled"
    finally:
        store.close()
    assert (tmp_path / "got_sigterm").exists()


@pytest.mark.slow  # the same stop as run's and recover's, which run by default
def test_cli_resume_stops_on_sigterm_like_run(tmp_path: Path) -> None:
    first = Cli(tmp_path)
    try:
        first.read_until("block: started")
        wait_for_text(tmp_path / "step.pid")
        send(first.proc, signal.SIGINT)
        first.finish()
    finally:
        reap(first.proc)
    (tmp_path / "step.pid").unlink()
    (tmp_path / "got_sigterm").unlink()
    store = SqliteStore(first.store)
    try:
        (iid,) = store.ids()
    finally:
        store.close()
    cli = Cli(tmp_path, "resume", iid)
    try:
        cli.read_until("block: started")
        wait_for_text(tmp_path / "step.pid")
        send(cli.proc, signal.SIGTERM)
        out = cli.finish()
    finally:
        reap(cli.proc)
    assert cli.proc.returncode == 143, out
    assert f"wfaas-local resume {iid}" in out and "Traceback" not in out
    assert (tmp_path / "got_sigterm").exists()
    assert cli.stored() == ("CANCELLED", "CANCELLED")


@pytest.mark.usefixtures("default_dispositions")
def test_a_signal_handled_on_another_thread_still_stops_the_wait(engine: WorkflowEngine, tmp_path: Path) -> None:
    """CPython runs a Python signal handler in the main thread between bytecodes. If the C-level
    handler ran elsewhere (the signal arrived on another thread, or just before the main thread
    blocked in a lock), nothing wakes a main thread blocked in ``wait_for_completion``: the SIGTERM
    would wait for the run to end. The wait wakes regularly instead."""
    go = tmp_path / "go"

    def step(ctx: Any) -> None:
        write_atomic(tmp_path / "started", "yes")
        wait_for(go)

    engine.register_workflow(WorkflowDefinition("sigwait", data_type=Data).add_step(StepDefinition("s", "s", step)))
    idle = threading.Event()

    def deliver() -> None:  # a thread of the program that does not block SIGTERM gets it
        wait_for_text(tmp_path / "started")
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
        idle.wait(30)

    sender = threading.Thread(target=deliver)
    started = time.monotonic()
    try:
        with pytest.raises(Terminated):
            iid = engine.start_workflow("sigwait", Data())
            sender.start()
            engine.wait_for_completion(iid, timeout=60)
        assert time.monotonic() - started < 20, "the SIGTERM waited for the run"
    finally:
        go.touch()
        idle.set()
        if sender.is_alive():
            sender.join(30)
