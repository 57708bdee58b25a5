"""Worker slots: one warm process each, so that one death costs only its own step.

Why not ``concurrent.futures.ProcessPoolExecutor``: when one of its workers
dies, the whole pool breaks and every in-flight future fails with
``BrokenProcessPool`` (measured here; also what poisons Prefect's, Dask's and
TaskFlow's process runners: temporalio/sdk-python#245, agronholm/apscheduler#362),
and it cannot tell which PID runs which task, so it cannot kill one task's
process tree on timeout. A slot is the smallest thing that can: one process,
one duplex pipe, one step at a time, replaced when it dies.

The pool does no waiting of its own. The scheduler thread blocks on every
slot's pipe and process sentinel at once (``waitables``), the same shape as
CPython's ``_ExecutorManagerThread``; killing a process tree, which takes up
to a grace period, happens on a short-lived thread that reports back through
a callback, so the scheduler never blocks on a dying process.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import psutil

from . import _threads, _worker


@dataclass
class Exit:
    """How a worker process ended: exit code, or the signal that killed it.

    ``where`` names the process in messages when a pid alone would not (a
    remote worker); ``detail`` replaces the exit code when there is none to
    tell (the whole remote machine went away).
    """

    exitcode: int | None
    last_rss: int = 0
    where: str | None = None
    detail: str | None = None

    @property
    def signal_name(self) -> str | None:
        if self.exitcode is not None and self.exitcode < 0:
            try:
                return signal.Signals(-self.exitcode).name
            except ValueError:
                return f"signal {-self.exitcode}"
        return None

    def describe(self) -> str:
        if self.detail:
            return self.detail
        if self.signal_name:
            return f"killed by {self.signal_name}"
        return f"exited with code {self.exitcode}"


class Slot:
    """One worker process and what it already holds (step bodies, data class, snapshot)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: Any = None
        self.conn: multiprocessing.connection.Connection | None = None
        self.task: Any = None  # the scheduler's task in flight, or None
        self.dying = False
        self.bodies: set[str] = set()
        self.classes: set[str] = set()
        self.snapshot: object = None
        self.last_rss = 0
        self.eof = False  # its pipe is closed: nothing more will come (the process died)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def idle(self) -> bool:
        return self.task is None and not self.dying and self.process is not None


class Pool(Protocol):
    """What the scheduler and the memory watchdog use of a pool: ``WorkerPool`` here, ``DaskPool`` remotely.

    Every call but ``kill`` and ``close`` comes from the scheduler thread and
    must not block; ``waitables`` are what that thread blocks on.
    """

    slots: list[Slot]

    def start(self) -> None: ...
    def spawn(self, slot: Slot) -> None: ...
    def waitables(self) -> dict[Any, tuple[str, Slot]]: ...
    def send(self, slot: Slot, message: bytes) -> None: ...
    def receive(self, slot: Slot) -> tuple[Any, ...] | None: ...
    def exit_of(self, slot: Slot) -> Exit: ...
    def kill(self, slot: Slot, grace: float, done: Callable[[Slot, Exit], None], exit_: Exit | None = None) -> None: ...
    def hurry(self, slot: Slot) -> None: ...
    def close(self, grace: float = 2.0) -> None: ...


class Backend(Protocol):
    """Where steps run, for ``WorkflowEngine(backend=...)``; without one they run in local worker processes."""

    def pool(self, max_workers: int | None) -> Pool:
        """A started pool of ``max_workers`` slots (``None``: as many as the backend can run at once)."""
        ...


class WorkerPool:
    """A fixed number of worker slots started with forkserver (or spawn)."""

    def __init__(self, size: int, start_method: str = "forkserver") -> None:
        if size < 1:
            raise ValueError(f"max_workers must be at least 1, got {size}")
        if start_method == "fork":
            raise ValueError("start_method='fork' is unsafe with the engine's threads; use 'forkserver' or 'spawn'")
        self._ctx = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            # Workers are forked from a server that already imported the worker code.
            self._ctx.set_forkserver_preload(["wfaas._worker", "dill", "psutil"])
        self.slots = [Slot(i) for i in range(size)]
        self._closed = False

    def start(self) -> None:
        for slot in self.slots:
            self.spawn(slot)

    def spawn(self, slot: Slot) -> None:
        """(Re)start the slot's process; the previous one, if any, must be dead."""
        if slot.conn is not None:
            slot.conn.close()
        parent_end, child_end = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(  # type: ignore[attr-defined]
            target=_worker.main, args=(child_end,), name=f"wfaas-worker-{slot.index}", daemon=True
        )
        process.start()
        child_end.close()
        slot.process, slot.conn = process, parent_end
        slot.task, slot.dying = None, False
        slot.bodies, slot.classes, slot.snapshot, slot.last_rss, slot.eof = set(), set(), None, 0, False

    def waitables(self) -> dict[Any, tuple[str, Slot]]:
        """Every object the scheduler blocks on, mapped to (kind, slot)."""
        out: dict[Any, tuple[str, Slot]] = {}
        for slot in self.slots:
            if slot.process is None:
                continue
            if not slot.dying:
                out[slot.process.sentinel] = ("exit", slot)
            if slot.task is not None and slot.conn is not None and not slot.eof:
                out[slot.conn] = ("result", slot)
        return out

    def send(self, slot: Slot, message: bytes) -> None:
        assert slot.conn is not None
        slot.conn.send_bytes(message)

    @staticmethod
    def receive(slot: Slot) -> tuple[Any, ...] | None:
        """The next message from the slot, or None if its pipe broke (the process died)."""
        assert slot.conn is not None
        try:
            result: tuple[Any, ...] = pickle.loads(slot.conn.recv_bytes())
        except (EOFError, OSError):
            slot.eof = True
            return None
        return result

    @staticmethod
    def exit_of(slot: Slot) -> Exit:
        slot.process.join(timeout=1.0)
        return Exit(slot.process.exitcode, slot.last_rss)

    def kill(self, slot: Slot, grace: float, done: Callable[[Slot, Exit], None], exit_: Exit | None = None) -> None:
        """Stop the slot's process tree (SIGTERM, grace, SIGKILL) on a thread; ``done`` once all is dead.

        ``exit_`` is how the worker ended when it died on its own (then only its group is left to kill).
        """
        slot.dying = True
        pid = slot.pid

        def run() -> None:
            if pid is not None:
                terminate_tree(pid, grace)
            done(slot, exit_ or self.exit_of(slot))

        _threads.start(run, f"wfaas-kill-{slot.index}")

    @staticmethod
    def hurry(slot: Slot) -> None:
        """SIGKILL a slot that is being stopped, without waiting out its grace period."""
        if slot.pid is not None:
            for p in _group_members(slot.pid):
                _signal(p, signal.SIGKILL)
            _signal_group(slot.pid, signal.SIGKILL)
            try:
                os.kill(slot.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self, grace: float = 2.0) -> None:
        """Stop every worker: ask idle ones to exit, kill busy ones' trees, reap all."""
        if self._closed:
            return
        self._closed = True
        for slot in self.slots:
            if slot.process is None:
                continue
            if slot.task is None and not slot.dying and slot.conn is not None:
                try:
                    slot.conn.send_bytes(pickle.dumps(("stop",)))
                except OSError:
                    pass
        for slot in self.slots:
            if slot.process is None:
                continue
            slot.process.join(timeout=0.5 if slot.task is None else 0)
            if slot.pid is not None:
                # Also when the worker exited: what its steps left running must not outlive the engine.
                terminate_tree(slot.pid, grace)
            slot.process.join(timeout=1.0)
            if slot.conn is not None:
                slot.conn.close()


def _group_members(pgid: int) -> list[psutil.Process]:
    """Processes of the group a worker leads: what its steps started, even after the worker died."""
    if pgid == os.getpgid(0):
        return []
    members = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                members.append(p)
        except (ProcessLookupError, PermissionError):
            continue
    return members


def _has_children(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        return bool(psutil.Process(pid).children())
    except psutil.Error:
        return False


def terminate_tree(pid: int, grace: float) -> None:
    """SIGTERM ``pid``, its descendants and its process group; SIGKILL whatever lives after ``grace``.

    The group catches grandchildren that were re-parented (a double fork)
    before we listed them; listing first catches those that left the group.
    """
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        procs = []
    procs += [p for p in _group_members(pid) if p.pid not in {q.pid for q in procs}]
    for p in procs:
        _signal(p, signal.SIGTERM)
    _signal_group(pid, signal.SIGTERM)
    alive = _wait_gone(procs, grace)
    for p in alive:
        _signal(p, signal.SIGKILL)
    _signal_group(pid, signal.SIGKILL)
    _wait_gone(alive, 5.0)


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until every process has exited; the ones still running after ``timeout``.

    A zombie counts as gone: a re-parented grandchild may wait a long time for
    an init that reaps slowly (as in many containers), yet it runs no more.
    This runs on a kill thread, so polling here blocks nobody.
    """
    deadline = time.monotonic() + timeout
    alive = procs
    while True:
        alive = [p for p in alive if _running(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.005)


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal(proc: psutil.Process, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except psutil.Error:
        pass


def _signal_group(pgid: int, sig: int) -> None:
    # The worker leads its own group (see _worker.main); never signal our own.
    if pgid == os.getpgid(0):
        return
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
