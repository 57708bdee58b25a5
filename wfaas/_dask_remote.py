"""What runs on a Dask worker: each step in a warm child process that wfaas can kill.

Dask cannot stop a task once it runs (it only forgets it), so a Dask task
here does not run the step itself: it hands the step to a child process of
the Dask worker, the same ``_worker.main`` loop a local slot runs, and waits
for its reply, its death, or an order to stop it::

    driver (DaskPool)                     Dask worker process
    client.submit(run_step, ...)  ----->  run_step: take an idle child (or start one)
                                            --pipe--> child: _worker.main runs the body
                                            <--pipe-- wire.Done | wire.Failed, as bytes
    future result  <------------------   wire.RemoteReply(bytes, where); if small, also pushed at once
                                           as an event on the client's topic (the driver takes the first)
    client.run(stop, token, grace) ---->  stop: SIGTERM the child's tree, SIGKILL after grace
    future result  <------------------   wire.RemoteExit(exitcode, rss, where, stopped, ...)

The child leads its own process group and is a subreaper (``_worker.main``),
so stopping its tree stops what the step started; a guard process per Dask
worker (``_guard.py``) kills the children's trees if the Dask worker dies. A
task the driver no longer wants (cancelled, or its client disconnected
because the driver died) is noticed by polling the worker's own task state,
and its child is killed: nothing a driver started outlives it.

This module is imported on the workers by name, so workers need wfaas
installed (the same version: ``DaskBackend`` checks at connect time, and
``run_step`` again for workers that joined later).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import pickle
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from . import _worker, wire
from ._guard import Guard
from .pool import terminate_tree

# How often a waiting task checks that Dask still wants it: the delay before a
# cancelled step (or one whose driver died) is killed.
POLL_SECONDS = 0.1
# Replies up to this size are pushed to the driver as a Dask event (the scheduler keeps
# the last 1,000 events of a topic: at most this many times that in memory).
PUSH_BYTES = 16 * 1024
PUSH_REPLY, PUSH_RSS = "reply", "rss"  # what a pushed event carries
# How often a step with a memory limit is sampled (the local watchdog's fast rate).
FAST_POLL_SECONDS = 0.05
# Stop orders for tasks that had not started on this worker are kept this long.
_TOMBSTONE_SECONDS = 600.0


@dataclass(eq=False)
class _Child:
    """One warm step process on this Dask worker and what it already holds."""

    process: Any
    conn: multiprocessing.connection.Connection
    paths: frozenset[str]
    bodies: set[str] = field(default_factory=set)
    classes: set[str] = field(default_factory=set)
    snapshot: object = None

    @classmethod
    def start(cls, paths: tuple[str, ...]) -> _Child:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["wfaas._worker", "wfaas._guard", "dill", "psutil"])
        parent_end, child_end = ctx.Pipe(duplex=True)
        process = ctx.Process(target=_child_main, args=(child_end, paths), name="wfaas-dask-step", daemon=False)
        with _not_daemon():
            guard = _guard_of(ctx)
            process.start()
        child_end.close()
        if process.pid is not None:
            guard.watch(process.pid)
        return cls(process, parent_end, frozenset(paths))

    def retire(self) -> None:
        """Ask an idle child to exit (it lacks a path the driver now has)."""
        try:
            self.conn.send_bytes(wire.STOP)
        except OSError:
            pass
        self.conn.close()


@contextlib.contextmanager
def _not_daemon() -> Iterator[None]:
    # Dask workers run as daemon processes by default, and a daemon may not start
    # processes; these die with the worker anyway (the guard watches it).
    config = multiprocessing.current_process()._config  # type: ignore[attr-defined]
    daemon = config.get("daemon")
    config["daemon"] = False
    try:
        yield
    finally:
        config["daemon"] = daemon


_guard: Guard | None = None
_guard_lock = threading.Lock()


def _guard_of(ctx: Any) -> Guard:
    """This Dask worker's guard process: it kills the step children's trees if the Dask worker dies."""
    global _guard
    with _guard_lock:
        if _guard is None:
            _guard = Guard(ctx)
        return _guard


def _child_main(conn: multiprocessing.connection.Connection, paths: tuple[str, ...]) -> None:
    # Step bodies are pickled by reference to their modules: give the child the
    # driver's sys.path entries that exist here (the same checkout, a shared
    # filesystem, or this very machine), in the driver's order, before its own.
    missing = [p for p in paths if p not in sys.path and os.path.isdir(p)]
    sys.path[:0] = missing
    # One reply per step: run_step returns it as the task's result.
    _worker.main(conn, live_output=False, one_reply=True)


@dataclass(eq=False)
class _Running:
    child: _Child
    stopping: bool = False
    stopper: threading.Thread | None = None  # the thread stopping its tree, once one does
    forced: int = 0  # how many of its processes needed SIGKILL

    def stop(self, grace: float) -> None:
        """Stop the child's tree on a thread (SIGTERM, ``grace``, SIGKILL)."""

        def run() -> None:
            self.forced = terminate_tree(self.child.process.pid, grace)

        self.stopper = threading.Thread(target=run, daemon=True)
        self.stopper.start()


_lock = threading.Lock()
_idle: list[_Child] = []
_running: dict[str, _Running] = {}
_stopped: dict[str, float] = {}


def _address() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except ValueError:  # not in a Dask worker (unit tests call this module directly)
        return "(no Dask worker)"


def _wanted() -> bool:
    """Whether Dask still wants this task's result (False once cancelled or its client left)."""
    try:
        from distributed import get_worker
        from distributed import utils as dask_utils

        key = getattr(dask_utils, "thread_state").key  # noqa: B009 - not exported; how Dask itself finds the running key
        ts = get_worker().state.tasks.get(key)
    except (ValueError, AttributeError):
        return True
    return ts is not None and ts.state == "executing"


def _other_version(version: str, where: str, task_id: int) -> wire.RemoteReply | None:
    """The step's failure when the driver's wfaas is not this worker's: results could not be trusted."""
    mine = _own_version()
    if version == mine:
        return None
    error = RuntimeError(
        f"driver has wfaas {version}, Dask worker {where} has {mine}: "
        f"pip install the same version on every worker (pip install 'wfaas[dask]=={version}')"
    )
    return wire.RemoteReply(wire.dumps(wire.failed(task_id, error)), where)


def run_step(
    token: str,
    version: str,
    paths: tuple[str, ...],
    head: wire.RunStep,
    small: dict[str, bytes],
    large: dict[str, bytes],
    reply_topic: str | None = None,
    memory_limit: int | None = None,
) -> wire.RemoteReply | wire.RemoteExit | wire.RemoteStopped:
    """Run one step (a ``wire.RunStep`` whose snapshot is ``small`` + ``large``) in a child.

    Returns ``RemoteReply`` with the child's reply as it sent it,
    ``RemoteExit`` when the child died (on its own, or ``stopped`` by
    ``stop``; ``forced`` processes of its tree needed SIGKILL), or
    ``RemoteStopped`` when a stop order came before the step started.
    A reply of at most ``PUSH_BYTES`` is also pushed to the driver at once as an
    event on ``reply_topic``; the driver takes whichever comes first. A step
    with a ``memory_limit`` is sampled fast, and its tree's RSS pushed on that
    topic when over the limit: the driver's memory watchdog stops it.
    """
    where = _address()
    if (refused := _other_version(version, where, head.task_id)) is not None:
        return refused
    with _lock:
        child = _idle.pop() if _idle else None
    if child is not None and not child.paths.issuperset(paths):
        child.retire()
        child = None
    if child is None or not child.process.is_alive():
        child = _Child.start(paths)
    with _lock:
        _prune_tombstones()
        if _stopped.pop(token, None) is not None:
            _idle.append(child)
            return wire.RemoteStopped(where)
        run = _running[token] = _Running(child)
    where = f"pid {child.process.pid} on Dask worker {where}"
    try:
        # Only what this child does not hold yet travels down its pipe.
        message = head._replace(
            body=None if head.body_key in child.bodies else head.body,
            cls=None if head.cls_key in child.classes else head.cls,
            snap=None if child.snapshot == head.snap_key else pickle.dumps({**small, **large}, protocol=5),
        )
        child.bodies.add(head.body_key)
        child.classes.add(head.cls_key)
        child.snapshot = head.snap_key
        child.conn.send_bytes(wire.dumps(message))
        over = None if reply_topic is None or memory_limit is None else _Over(reply_topic, token, memory_limit)
        result = _wait(run, where, over)
        if reply_topic is not None and isinstance(result, wire.RemoteReply) and len(result.reply) <= PUSH_BYTES:
            _push(reply_topic, [PUSH_REPLY, token, result.reply, result.where])
        return result
    finally:
        with _lock:
            _running.pop(token, None)


def _wait(run: _Running, where: str, over: _Over | None) -> wire.RemoteReply | wire.RemoteExit:
    child = run.child
    sentinel = child.process.sentinel
    last_rss = 0
    poll = POLL_SECONDS if over is None else FAST_POLL_SECONDS
    while True:
        ready = multiprocessing.connection.wait([child.conn, sentinel], poll)
        if child.conn in ready:
            try:
                reply = child.conn.recv_bytes()
            except (EOFError, OSError):
                pass  # it died while answering: the sentinel tells how
            else:
                if _retiring(reply):
                    # Its step left process state that could not be put back: it exits, and
                    # must not take another step (the next one starts a fresh child).
                    _finish_stopping(child)
                elif not run.stopping:
                    with _lock:
                        _idle.append(child)
                else:
                    # It finished while being stopped: the result stands, and the
                    # child, told to die, must not take another step.
                    _finish_stopping(child)
                return wire.RemoteReply(reply, where)
        if sentinel in ready or not child.process.is_alive():
            child.process.join(1.0)
            if run.stopper is not None:
                run.stopper.join()  # reported once the whole tree is dead, as for a local worker
            # What the step started still runs in the child's group: stop it too.
            terminate_tree(child.process.pid, 0.0, exited=child.process.exitcode is not None)
            child.conn.close()
            return wire.RemoteExit(child.process.exitcode, last_rss, where, run.stopping, forced=run.forced)
        if not run.stopping and not _wanted():
            run.stopping = True
            run.stop(0.0)
        last_rss = _rss(child.process.pid) or last_rss
        if over is not None:
            over.check(last_rss)


@dataclass
class _Over:
    """Tells the driver, once, that a step's tree went over its memory limit."""

    topic: str
    token: str
    limit: int
    told: bool = False

    def check(self, rss: int) -> None:
        if rss > self.limit and not self.told:
            self.told = True
            _push(self.topic, [PUSH_RSS, self.token, rss])


def _push(topic: str, message: list[Any]) -> None:
    try:
        from distributed import get_worker

        worker = get_worker()
    except ValueError:  # not in a Dask worker (unit tests call this module directly)
        return
    worker.log_event(topic, message)


def _retiring(reply: bytes) -> bool:
    """Whether the child's reply says it cannot run another step (``usage["retire"]``, see ``_worker``)."""
    try:
        usage = wire.loads(reply).usage
    except Exception:  # noqa: BLE001 - a reply this side cannot decode is the driver's to judge
        return False
    return isinstance(usage, dict) and bool(usage.get("retire"))


def _finish_stopping(child: _Child) -> None:
    def run() -> None:
        terminate_tree(child.process.pid, 0.0)
        child.process.join(1.0)
        child.conn.close()

    threading.Thread(target=run, daemon=True).start()


def stop(token: str, grace: float) -> str | None:
    """Stop the step ``token`` on this worker (run by ``client.run``); its address if it ran here.

    Runs on the worker's event loop, so the killing happens on a thread. A
    step not (yet) running here is remembered as stopped, in case it starts.
    """
    with _lock:
        run = _running.get(token)
        if run is None:
            _stopped[token] = time.monotonic()
            return None
        run.stopping = True
    run.stop(grace)
    return _address()


def _prune_tombstones() -> None:
    old = time.monotonic() - _TOMBSTONE_SECONDS
    for token in [t for t, when in _stopped.items() if when < old]:
        del _stopped[token]


def _rss(pid: int) -> int:
    from .watchdog import tree_rss

    return tree_rss(pid)


def _own_version() -> str:
    from . import __version__

    return str(__version__)


def close_children() -> int:
    """Stop this worker's idle children (``client.run`` at driver close); how many there were."""
    with _lock:
        children, _idle[:] = list(_idle), []
    for child in children:
        try:
            child.conn.send_bytes(wire.STOP)
        except OSError:
            pass
    for child in children:
        child.process.join(1.0)
        if child.process.is_alive():
            terminate_tree(child.process.pid, 0.0)
        child.conn.close()
    return len(children)
