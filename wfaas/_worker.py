"""The worker process: receive a step, run it on a private copy of the data, send back what changed.

Runs in a process started by forkserver (never fork from the threaded
engine). It leads its own process group, so a timeout can kill everything the
step started, and Ctrl-C in the terminal reaches only the engine, which
decides. It is a child subreaper, so whatever its steps start stays in its
tree (``_become_subreaper``). It does not watch the engine itself: a thread
here could not run while a step holds the GIL in C code; the pool's guard
process (``_guard.py``) kills the worker's tree when the engine dies.

Messages are the named tuples of ``wire.py``, one pickle each over one duplex
pipe (see ``pool.py``): a ``RunStep`` in, ``Output`` lines while the step runs
(with ``live_output``), then one ``Done`` or ``Failed`` reply, whose ``usage``
holds the attempt's figures. A worker that cannot run another step (its step
left process state that could not be put back: ``capture.py``) says why and
exits (``_answer``).
"""

from __future__ import annotations

import ctypes
import io
import logging
import os
import pickle
import resource
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing import current_process
from multiprocessing.connection import Connection
from typing import Any

import dill

from . import data as data_codec
from . import objects as large
from . import wire
from .capture import Capture, ProcessState, format_record
from .steps import StepExecutor, StepResult, WorkflowContext, values_written


class _Collector(logging.Handler):
    """Keeps the step's log records so the engine can re-emit them in its own logging."""

    def __init__(self, capture: Capture) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[dict[str, Any]] = []
        self.capture = capture

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must not fail the step
            msg = str(record.msg)
        item = {
            "name": record.name,
            "levelno": record.levelno,
            "levelname": record.levelname,
            "msg": msg,
            "created": record.created,
            "pathname": record.pathname,
            "lineno": record.lineno,
            "funcName": record.funcName,
        }
        if record.exc_info:
            item["exc_text"] = "".join(traceback.format_exception(*record.exc_info))
        self.records.append(item)
        self.capture.record(record.created, record.levelno, format_record(record))


_PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def _become_subreaper() -> None:
    """Make processes our steps start stay our descendants, even when their parent exits.

    A daemon that double-forks (fork, setsid, fork, the middle one exits)
    leaves the process group and would be re-parented to init, out of reach
    of a timeout or cancel. As a child subreaper (Linux 3.4+) this worker
    becomes its parent instead, so walking the worker's tree finds it. The
    cost: orphans that exit are this worker's zombies, reaped by ``_reap``.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # no prctl: the process group still catches what did not leave it


def _reap() -> None:
    """Collect every exited child, after an attempt (never during one).

    Waiting for any child during a step could steal the exit status of a
    process the step itself waits for (``subprocess.run``); once the step
    has returned, what it left behind is ours: the orphans a subreaper
    inherits and the children it never waited for.
    """
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _engine_gone() -> None:
    """The engine closed our pipe: end what our steps left running before we exit.

    The guard would, but it and this worker see the engine go at the same
    moment; were this worker to exit first, what its steps left (their
    subreaper gone) would be re-parented to init, out of the guard's reach.
    """
    import psutil

    from .pool import kill_descendants

    kill_descendants(psutil.Process())


class _Meter:
    """Wall time, CPU time and peak memory of one step, measured in the worker.

    The kernel's peak-RSS mark (``ru_maxrss``) covers the process's whole life;
    writing 5 to ``/proc/self/clear_refs`` resets it to the current RSS. That
    costs a few microseconds, so it is done only after a step raised the mark:
    a run of small steps pays nothing. Child processes' peak counts when a
    child that ended during this step set a new one.
    """

    def __init__(self) -> None:
        self._raised = False

    def start(self) -> None:
        if self._raised:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass  # not Linux, or not allowed: the peak stays the process's lifetime peak
        self._self0 = resource.getrusage(resource.RUSAGE_SELF)
        self._children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._started = time.perf_counter()

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self._started
        ru_self = resource.getrusage(resource.RUSAGE_SELF)
        ru_children = resource.getrusage(resource.RUSAGE_CHILDREN)
        s0, c0 = self._self0, self._children0
        self._raised = ru_self.ru_maxrss > s0.ru_maxrss
        children_peak = ru_children.ru_maxrss if ru_children.ru_maxrss > c0.ru_maxrss else 0
        cpu = ru_self.ru_utime + ru_self.ru_stime - s0.ru_utime - s0.ru_stime
        cpu += ru_children.ru_utime + ru_children.ru_stime - c0.ru_utime - c0.ru_stime
        return {"wall": wall, "cpu": cpu, "max_rss": max(ru_self.ru_maxrss, children_peak) * 1024.0}


def _setup_process() -> None:
    os.setpgid(0, 0)
    _become_subreaper()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The engine starts workers as daemons (so they die with it); a daemon may not start
    # processes of its own, but a step may well use multiprocessing. Its children die with
    # this worker's tree anyway (timeouts, cancel, engine death).
    current_process()._config["daemon"] = False  # type: ignore[attr-defined]
    # Line by line, as on a terminal: a print reaches the capture (and its time stamp) when it is made.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)


def main(conn: Connection, live_output: bool = True, token: Connection | None = None, one_reply: bool = False) -> None:
    """The worker loop; returns when told to stop or when the engine closes the pipe.

    With ``live_output``, what a step prints is also sent while it runs
    (``wire.Output`` messages before its reply). ``token`` is the pipe whose
    token it takes before starting a step queued behind another, unless the
    engine took it back first (``pool.WorkerPool.offer``, ``dispatch.py``).
    ``one_reply``: a Dask child, whose task returns one message (``_answer``).
    """
    _setup_process()
    if token is not None:
        os.set_blocking(token.fileno(), False)  # shared with the engine's copy already; said here too
    send_lock = threading.Lock()  # the capture's thread sends output while the step runs
    task: list[int] = [0]

    def forward(lines: list[Any]) -> None:
        try:
            with send_lock:
                conn.send_bytes(wire.dumps(wire.Output(task[0], lines)))
        except OSError:
            pass  # the engine is gone; the reply's send finds out too

    def send(message: wire.Message) -> None:
        try:
            with send_lock:
                conn.send_bytes(wire.dumps(message))
        except OSError:
            raise _EngineGone from None

    capture = Capture(forward if live_output else None)
    root = logging.getLogger()
    collector = _Collector(capture)
    root.addHandler(collector)
    root.setLevel(logging.DEBUG)
    state = ProcessState()  # what every attempt starts from (after the capture: fds 1 and 2 on its pipe)
    meter = _Meter()
    held = _Held()
    try:
        while True:
            try:
                message = wire.loads(conn.recv_bytes())
            except (EOFError, OSError):
                raise _EngineGone from None
            if isinstance(message, wire.Stop):
                return
            if isinstance(message, wire.Sync):
                send(wire.Synced())
                continue
            run: wire.RunStep = message
            if not _take_in(run, held, token, send):
                continue
            task[0] = run.task_id
            capture.start()
            reply, problem = _attempt(run, held, meter, collector, capture, state)
            if not _answer(reply, problem, capture, state, send, one_reply):
                return  # the engine starts a fresh worker in this one's place
            _look_for_next(conn, run.spin)
    except _EngineGone:
        _engine_gone()


class _EngineGone(Exception):
    """The engine closed our pipe."""


def _answer(
    reply: wire.Reply,
    problem: str | None,
    capture: Capture,
    state: ProcessState,
    send: Callable[[Any], None],
    one: bool,
) -> bool:
    """Send an attempt's reply, end its capture (unless ``_attempt`` did: ``problem`` is then what it found) and
    put the process back as it was; whether this worker may run another step.

    A local worker resets its process after the reply, while the engine reads
    it; one whose reply said ``wire.TAIL`` ends the capture first, and a
    ``wire.Tail`` follows if the attempt printed or logged anything. One that
    cannot run another step says why in a ``wire.Retire`` and reads nothing
    more. With ``one`` (a Dask child, whose task returns one message) the
    reset comes first, and the reply says why it cannot go on, under
    ``usage["retire"]``.
    """
    if one:
        problem = problem or state.restore()
        if problem is not None:
            reply.usage["retire"] = problem
        send(reply)
        return problem is None
    send(reply)
    if isinstance(reply.output, str):  # wire.TAIL
        lines, cut, fresh, problem = capture.stop(state)
        if lines or cut:
            send(wire.Tail(reply.task_id, (lines, cut, fresh)))
    problem = problem or state.restore()
    if problem is not None:
        send(wire.Retire(problem))
    return problem is None


def _take_in(run: wire.RunStep, held: _Held, token: Connection | None, send: Callable[[Any], None]) -> bool:
    """Take in what ``run`` brings; whether to run it: not if the engine took it back, or it cannot load (said)."""
    held.take_snapshot(run)
    failure: Exception | None = None
    try:
        held.load(run)
    except Exception as exc:  # noqa: BLE001 - reported as the step's error, with what to do
        failure = exc
    # The claim first, whether or not it loaded: a step taken back is answered Skipped, never Failed (the
    # engine no longer expects it here), and a claimed one's token is taken either way.
    if run.claim and not _claim(token):
        # Taken back, to run elsewhere (its blobs are kept, as the engine counts on). Say so: until the engine
        # knows, it queues nothing more here, whose claim token this step would take.
        send(wire.Skipped(run.task_id))
        return False
    if failure is not None:
        error = ImportError(
            f"the worker cannot load step {run.step_id!r} or its data class: {type(failure).__name__}: {failure}; "
            "the module that defines it must be importable by the worker (on sys.path when the engine starts)"
        )
        send(wire.failed(run.task_id, error, format_traceback(failure)))
        return False
    return True


def _claim(token: Connection | None) -> bool:
    """Take the claim token of a step queued behind another; none: the engine took the step back."""
    if token is None:
        return True  # a Dask child: its engine never queues a step behind another
    return wire.take_claim(token)


def _look_for_next(conn: Connection, seconds: float) -> None:
    """Look for the next message without sleeping, for up to ``seconds`` (the engine asks: ``dispatch.py``)."""
    if not seconds:
        return
    end = time.perf_counter() + seconds
    while time.perf_counter() < end and not conn.poll(0):
        pass


class _Held:
    """What this worker already holds: step bodies, data classes, the last snapshot (each is sent once)."""

    def __init__(self) -> None:
        self.bodies: dict[str, Any] = {}
        self.classes: dict[str, type] = {}
        self.snap_key: object = None
        self.fields: dict[str, bytes] = {}
        self.objects: large.ObjectStore | None = None  # where the run's large fields are (objects.py)

    def take_snapshot(self, run: wire.RunStep) -> None:
        if run.snap is not None:
            self.snap_key, (self.fields, self.objects) = run.snap_key, read_snapshot(run.snap)
        assert self.snap_key == run.snap_key, "engine and worker disagree on the data snapshot"

    def load(self, run: wire.RunStep) -> None:
        """Take in the body and data class ``run`` brings; raises if one cannot be loaded here."""
        if run.body is not None:
            self.bodies[run.body_key] = pickle.loads(run.body)
        if run.cls is not None:
            self.classes[run.cls_key] = pickle.loads(run.cls)


def _attempt(
    run: wire.RunStep, held: _Held, meter: _Meter, collector: _Collector, capture: Capture, state: ProcessState
) -> tuple[wire.Reply, str | None]:
    """One attempt (or hook), measured (its capture has started); its reply, and None or why the capture
    cannot go on.

    The capture ends here, its output in the reply, unless ``run.tail``:
    then the output is ``wire.TAIL`` and ``_answer`` ends the capture.
    """
    collector.records = []
    meter.start()
    try:
        outcome, changes = execute(held.bodies[run.body_key], held.classes[run.cls_key], held.fields, run, held.objects)
        raised: BaseException | None = None
    except BaseException as exc:  # noqa: BLE001 - everything a step raises is reported
        raised = exc
    _reap()  # before the meter stops: what the step left counts in its CPU time
    usage: dict[str, Any] = meter.stop()
    output: tuple[Any, ...] | str | None = wire.TAIL
    problem = None
    if not run.tail:
        lines, cut, fresh, problem = capture.stop(state)
        output = (lines, cut, fresh) if lines or cut else None
    if raised is None:
        return wire.Done(run.task_id, outcome, changes, collector.records, output, usage), problem
    tb = format_traceback(raised)
    return wire.Failed(run.task_id, wire.encode_error(raised), tb, collector.records, output, usage), problem


def read_snapshot(blob: bytes) -> tuple[dict[str, bytes], large.ObjectStore | None]:
    """A snapshot's fields, and where its large values are (``objects.py``)."""
    fields = pickle.loads(blob)
    config = fields.pop(large.OBJECTS_FIELD, None)
    if config is None:
        return fields, None
    large.trust(config[1])
    return fields, large.ObjectStore.from_config(config[0])


def execute(
    body: Any, cls: type, fields: dict[str, bytes], run: wire.RunStep, objects: large.ObjectStore | None = None
) -> tuple[str, dict[str, Any]]:
    """Run the body (or hook): its outcome (``wire.SUCCESS`` ...) and the fields it changed."""
    step_id, hook = run.step_id, run.hook
    what = f"run {run.instance_id}"
    data = data_codec.build(cls, fields, objects, what)
    ctx_blob = fields.get(data_codec.CONTEXT_FIELD)
    values = pickle.loads(ctx_blob) if ctx_blob is not None else {}
    ctx: WorkflowContext[Any] = WorkflowContext(
        data,
        instance_id=run.instance_id,
        workflow_id=run.workflow_id,
        step_id=step_id,
        attempt=run.attempt,
        values=values,
        item=pickle.loads(run.item) if run.item is not None else None,
        item_key=run.item_key,
    )
    if hook is not None:
        # Hooks run once the outcome is decided (the result merged, or the step failed for good).
        try:
            if hook == "failure":
                assert run.error is not None, "an on_failure hook is sent with the step's error"
                error, cause = pickle.loads(run.error)
                error.__cause__ = cause
                body.on_failure(ctx, error)
            else:
                body.on_success(ctx)
        except Exception:  # a hook never changes the outcome; it is logged
            logging.getLogger("wfaas").exception("on_%s hook of step %r raised", hook, step_id)
        return wire.HOOK, {}

    result = body.execute(ctx) if isinstance(body, StepExecutor) else body(ctx)
    if result is None:
        result = StepResult.SUCCESS
    if not isinstance(result, StepResult):
        raise TypeError(f"step {step_id!r} returned {result!r}; a step returns StepResult.SUCCESS/FAILURE/SKIP or None")
    if result is StepResult.FAILURE:
        return wire.FAILURE, {}
    # ctx.data, not the object built above: a step may assign a new object to it.
    changes = data_codec.diff_fields(ctx.data, fields, values if values_written(ctx) else None, objects, what)
    return result.value, changes


def format_traceback(exc: BaseException) -> str:
    """The step's traceback as text, from the step's own frames (this module's are left out)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


if __name__ == "__main__":  # pragma: no cover - started through multiprocessing only
    sys.exit("wfaas._worker is started by the engine")


RemoteError = wire.RemoteError  # where older messages name it
__all__ = ["RemoteError", "format_traceback", "main"]
_ = dill  # imported so that dill-encoded blobs find their reducers at once
