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
a callback, so the scheduler never blocks on a dying process. A guard
process (``_guard.py``) kills every worker's tree if the engine dies.
"""

from __future__ import annotations

import enum
import multiprocessing
import multiprocessing.connection
import os
import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import psutil

from . import _guard, _threads, _worker, wire


@dataclass
class Exit:
    """How a worker process ended: exit code, or the signal that killed it.

    ``where`` names the process in messages when a pid alone would not (a
    remote worker); ``detail`` replaces the exit code when there is none to
    tell (the whole remote machine went away). ``forced`` counts the
    processes of a stopped tree that outlived SIGTERM and its grace period
    and so were killed by SIGKILL.
    """

    exitcode: int | None
    last_rss: int = 0
    where: str | None = None
    detail: str | None = None
    forced: int = 0

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
        said = f"killed by {self.signal_name}" if self.signal_name else f"exited with code {self.exitcode}"
        if self.forced and self.signal_name != "SIGKILL":
            # The worker ended on SIGTERM, but what it started did not: say what it took.
            n, s = self.forced, "es" if self.forced > 1 else ""
            said += f"; {n} process{s} it started outlived SIGTERM and the grace period: killed by SIGKILL"
        return said


class ClaimPipe:
    """The claim token of a step queued behind a slot's running one (``dispatch.py``): one byte in a pipe.

    The worker reads it before it starts such a step (``_worker``), the scheduler to take the step back
    (``WorkerPool.take_back``): a pipe gives its byte to one reader, so exactly one of them gets it, and the
    worker that finds none skips the step. No lock, so a killed process leaves nothing behind.
    """

    def __init__(self, ctx: Any) -> None:
        self.reader, self._writer = ctx.Pipe(duplex=False)
        os.set_blocking(self.reader.fileno(), False)  # the worker's copy shares the flag
        # Connection.poll builds a selector per call (60 µs a queued step in the profile): one poll object.
        self._waiting = select.poll()
        self._waiting.register(self.reader.fileno(), select.POLLIN)

    def offer(self) -> None:
        os.write(self._writer.fileno(), b"t")

    def waiting(self) -> bool:
        return bool(self._waiting.poll(0))

    def close(self) -> None:
        self.reader.close()
        self._writer.close()


class Waitable(enum.Enum):
    """What a descriptor the scheduler blocks on says when it is ready (see ``Pool.waitables``)."""

    RESULT = "result"  # the slot's pipe: a message (or EOF)
    EXIT = "exit"  # the slot's process sentinel: it died


class Slot:
    """One worker process and what it already holds (step bodies, data class, snapshot)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: Any = None
        self.conn: multiprocessing.connection.Connection | None = None
        self.task: Any = None  # the scheduler's task in flight, or None
        self.next: Any = None  # a task sent behind it, started when it ends (dispatch.py), or None
        self.claim: ClaimPipe | None = None  # the claim token of a step queued behind its step (dispatch.py)
        self.skipping = 0  # steps taken back whose message its worker has not yet skipped (wire.Skipped)
        self.dying = False
        self.bodies: set[str] = set()
        self.classes: set[str] = set()
        self.snapshot: object = None
        self.last_rss = 0
        self.reported_rss = 0  # a remote step's (no local pid): the RSS its worker reported over its limit
        self.eof = False  # its pipe is closed: nothing more will come (the process died)
        self.tail: Any = None  # the task whose reply said its output follows (wire.TAIL), until its next message
        self.syncing = False  # wire.SYNC sent, for tail's run waits for it

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
    depth: int  # steps a slot may hold: 1, or 2 when one may wait behind the running one (dispatch.py)
    tails: bool  # its workers may reply before they end an attempt's capture (wire.RunStep.tail, outputs.py)

    def start(self) -> None: ...
    def spawn(self, slot: Slot) -> None: ...
    def waitables(self) -> dict[Any, tuple[Waitable, Slot]]: ...
    def send(self, slot: Slot, message: bytes) -> None: ...
    def receive(self, slot: Slot) -> wire.FromWorker | None: ...
    def exit_of(self, slot: Slot) -> Exit: ...
    def kill(self, slot: Slot, grace: float, done: Callable[[Slot, Exit], None], exit_: Exit | None = None) -> None: ...
    def hurry(self, slot: Slot) -> None: ...
    def close(self, grace: float = 2.0) -> None: ...
    def offer(self, slot: Slot) -> None: ...
    def claimed(self, slot: Slot) -> bool: ...
    def take_back(self, slot: Slot) -> bool: ...


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
            self._ctx.set_forkserver_preload(["wfaas._worker", "wfaas._guard", "dill", "psutil"])
        self.slots = [Slot(i) for i in range(size)]
        self.depth = 2  # a step may wait in a busy worker's pipe (dispatch.py): the pipe is its only queue
        self.tails = True
        self._closed = False
        self._guard: _guard.Guard | None = None

    def start(self) -> None:
        self._guard = _guard.Guard(self._ctx)
        for slot in self.slots:
            self.spawn(slot)

    def spawn(self, slot: Slot) -> None:
        """(Re)start the slot's process; the previous one, if any, must be dead."""
        if slot.conn is not None:
            slot.conn.close()
        parent_end, child_end = self._ctx.Pipe(duplex=True)
        if slot.claim is not None:
            slot.claim.close()
        slot.claim = ClaimPipe(self._ctx)
        process = self._ctx.Process(  # type: ignore[attr-defined]
            target=_worker.main,
            args=(child_end, True, slot.claim.reader),
            name=f"wfaas-worker-{slot.index}",
            daemon=True,
        )
        process.start()
        child_end.close()
        if self._guard is not None:
            self._guard.watch(process.pid)
        slot.process, slot.conn = process, parent_end
        slot.task, slot.next, slot.dying, slot.skipping, slot.tail, slot.syncing = None, None, False, 0, None, False
        slot.bodies, slot.classes, slot.snapshot, slot.last_rss, slot.eof = set(), set(), None, 0, False

    def waitables(self) -> dict[Any, tuple[Waitable, Slot]]:
        """Every object the scheduler blocks on, mapped to (kind, slot)."""
        out: dict[Any, tuple[Waitable, Slot]] = {}
        for slot in self.slots:
            if slot.process is None:
                continue
            if not slot.dying:
                out[slot.process.sentinel] = (Waitable.EXIT, slot)
            if (slot.task is not None or slot.tail is not None) and slot.conn is not None and not slot.eof:
                out[slot.conn] = (Waitable.RESULT, slot)
        return out

    def send(self, slot: Slot, message: bytes) -> None:
        assert slot.conn is not None
        slot.conn.send_bytes(message)

    @staticmethod
    def receive(slot: Slot) -> wire.FromWorker | None:
        """The next message from the slot, or None if its pipe broke (the process died)."""
        assert slot.conn is not None
        try:
            result: wire.FromWorker = wire.loads(slot.conn.recv_bytes())
        except (EOFError, OSError):
            slot.eof = True
            return None
        return result

    @staticmethod
    def exit_of(slot: Slot) -> Exit:
        slot.process.join(timeout=1.0)
        return Exit(slot.process.exitcode, slot.last_rss)

    def offer(self, slot: Slot) -> None:
        """The next message is a step queued behind the slot's step: its claim token goes in (``ClaimPipe``)."""
        assert slot.claim is not None
        slot.claim.offer()

    def claimed(self, slot: Slot) -> bool:
        """No token is waiting: every step queued behind the slot's step has been started or taken back."""
        return slot.claim is None or not slot.claim.waiting()

    def take_back(self, slot: Slot) -> bool:
        """Take back the step queued behind the slot's step, unless its worker claimed it first."""
        return slot.claim is not None and wire.take_claim(slot.claim.reader)

    def kill(self, slot: Slot, grace: float, done: Callable[[Slot, Exit], None], exit_: Exit | None = None) -> None:
        """Stop the slot's process tree (SIGTERM, grace, SIGKILL) on a thread; ``done`` once all is dead.

        ``exit_`` is how the worker ended when it died on its own (then only its group is left to kill).
        """
        slot.dying = True
        pid = slot.pid

        def run() -> None:
            forced = terminate_tree(pid, grace, exited=exit_ is not None) if pid is not None else 0
            if exit_ is not None:
                done(slot, exit_)
            else:
                stopped = self.exit_of(slot)
                stopped.forced = forced
                done(slot, stopped)

        _threads.start(run, f"wfaas-kill-{slot.index}")

    @staticmethod
    def hurry(slot: Slot) -> None:
        """SIGKILL a slot that is being stopped, without waiting out its grace period."""
        root = _process(slot.pid) if slot.pid is not None else None
        if root is not None:
            kill_tree(root)
        elif slot.pid is not None:
            _signal_group(slot.pid, signal.SIGKILL)

    def close(self, grace: float = 2.0) -> None:
        """Stop every worker: ask idle ones to exit, kill busy ones' trees, reap all."""
        if self._closed:
            return
        self._closed = True
        asked = set()
        for slot in self.slots:
            if slot.process is None:
                continue
            # A worker whose steps left processes running is not asked to exit: while it lives, its
            # tree holds them all (it is their subreaper); once it exited, they would be init's.
            idle = slot.task is None and not slot.dying and slot.pid is not None and not _children(slot.pid)
            if idle and slot.conn is not None:
                try:
                    slot.conn.send_bytes(wire.STOP)
                    asked.add(slot.index)
                except OSError:
                    pass
        for slot in self.slots:
            if slot.process is None:
                continue
            slot.process.join(timeout=0.5 if slot.index in asked else 0)
            # One that exited when asked had no descendant, so its group is empty: nothing to kill.
            exited = slot.process.exitcode is not None
            if slot.pid is not None and not (slot.index in asked and exited):
                # Also when the worker exited: what its steps left running must not outlive the engine.
                terminate_tree(slot.pid, grace, exited=exited)
            slot.process.join(timeout=1.0)
            if slot.conn is not None:
                slot.conn.close()
            if slot.claim is not None:
                slot.claim.close()
        if self._guard is not None:
            self._guard.close()


def _children(pid: int) -> list[int]:
    """PIDs of ``pid``'s children, from the kernel's own list: no scan of every process on the machine.

    Each thread has its list (a subreaper's adopted orphans may hang under any
    of them). Without those lists (not Linux, or a kernel built without
    ``CONFIG_PROC_CHILDREN``), psutil finds them by a scan.
    """
    if not _CHILD_LISTS:
        try:
            return [c.pid for c in psutil.Process(pid).children()]
        except psutil.Error:
            return []
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found: list[int] = []
    for tid in threads:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                found.extend(int(c) for c in f.read().split())
        except OSError:
            continue  # the thread ended meanwhile
    return found


_CHILD_LISTS = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


def _group_members(pgid: int) -> list[psutil.Process]:
    """What a dead worker's process group left running, and what that started, found by walking trees.

    Only for a worker that is already dead: a live worker's tree is walked
    instead (``_freeze``). The worker was a subreaper; when it died, the
    kernel gave its children to the nearest subreaper above it, which is this
    process or one of its ancestors (the worker's parent, this process or its
    forkserver, is not one), else to init. So the group's survivors are
    among those few processes' children; their own children stay theirs.
    """
    if pgid == os.getpgid(0):
        return []
    roots = []
    for reaper in _ancestors():
        for pid in _children(reaper):
            try:
                if os.getpgid(pid) == pgid:
                    roots.append(pid)
            except (ProcessLookupError, PermissionError):
                continue
    members: dict[int, psutil.Process] = {}
    while roots:
        pid = roots.pop()
        proc = _process(pid)
        if proc is not None and pid not in members:
            members[pid] = proc
            roots.extend(_children(pid))
    return list(members.values())


def _ancestors() -> list[int]:
    """This process, its parent, its parent's parent, up to init: the processes an orphan can go to."""
    chain, pid = [], os.getpid()
    while pid > 0 and pid not in chain:
        chain.append(pid)
        try:
            pid = psutil.Process(pid).ppid()
        except psutil.Error:
            break
    return chain if 1 in chain else [*chain, 1]


def _freeze(roots: list[psutil.Process]) -> list[psutil.Process]:
    """SIGSTOP ``roots`` and all their descendants, listing again until no new one appears.

    A stopped process can neither fork nor exit, so the list is whole once it
    stops growing: nothing escapes between listing a tree and signalling it.
    The worker is a child subreaper (``_worker.main``), so while it lives
    every process its steps started is its descendant, even a double-forked
    daemon that left its process group and session. Each round lists every
    stopped process's children again: a subreaper adopts the children of a
    descendant that exited meanwhile.
    """
    seen: dict[int, psutil.Process] = {}
    todo = [p for p in roots if _running(p)]
    while todo:
        for p in todo:
            _signal(p, signal.SIGSTOP)
            seen[p.pid] = p
        found: dict[int, psutil.Process] = {}
        for parent in list(seen):
            for pid in _children(parent):
                if pid not in seen and pid not in found:
                    proc = _process(pid)
                    if proc is not None:
                        found[pid] = proc
        todo = list(found.values())
    return list(seen.values())


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def kill_tree(root: psutil.Process) -> None:
    """SIGKILL ``root``, all its descendants and the process group it leads, at once."""
    for p in _freeze([root]):
        _signal(p, signal.SIGKILL)
    _signal_group(root.pid, signal.SIGKILL)


def kill_descendants(root: psutil.Process) -> None:
    """SIGKILL every descendant of ``root``, not ``root`` itself (a worker ending its own tree)."""
    for p in _freeze([c for c in map(_process, _children(root.pid)) if c is not None]):
        _signal(p, signal.SIGKILL)


def terminate_tree(pid: int, grace: float, *, exited: bool = False) -> int:
    """SIGTERM ``pid``, its descendants and its process group; SIGKILL whatever lives after ``grace``.

    Returns how many processes needed the SIGKILL. The tree is frozen while
    it is listed (``_freeze``), then let go and sent SIGTERM; what outlives
    the grace period is frozen again, with whatever it started meanwhile,
    and killed. The group catches what was re-parented before the
    worker was a subreaper or after it died; for a worker that is already
    dead (``exited``: its PID may be another process's by now), the group is
    all there is to find.
    """
    root = None if exited else _process(pid)
    procs = _freeze([root]) if root is not None else []
    if not procs:
        procs = _group_members(pid)
    # Every one is let go before any gets SIGTERM: a group that loses its last link to the rest of the
    # session while a member is stopped is sent SIGHUP by the kernel, which would end what ignores SIGTERM
    # before its grace period.
    for p in procs:
        _signal(p, signal.SIGCONT)
    for p in procs:
        _signal(p, signal.SIGTERM)
    _signal_group(pid, signal.SIGTERM)
    alive = _wait_gone(procs, grace)
    if not alive:
        return 0
    if root is not None and _running(root):
        alive.append(root)  # still a subreaper: what the survivors' dead parents started is under it
    killed = [p for p in _freeze(alive) if _running(p)]  # not the zombies among their children
    for p in killed:
        _signal(p, signal.SIGKILL)
    _signal_group(pid, signal.SIGKILL)
    _wait_gone(killed, 5.0)
    return len(killed)


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
