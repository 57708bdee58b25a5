"""The wire protocol: every message between the engine, its workers and the Dask side, by name.

Over one duplex pipe per worker (``pool.py``), pickled with protocol 5::

    engine -> worker   RunStep   one attempt (or hook); blobs the worker already holds are None
                       STOP      (pre-pickled) exit when idle
                       SYNC      (pre-pickled) answer Synced
    worker -> engine   Output    lines the step printed while it runs (0 or more, before the reply)
                       Skipped   a step queued behind another that the engine took back (dispatch.py)
                       Done      the step returned: its outcome and the fields it changed
                       Failed    the step raised: its exception, encoded, and the traceback text
                       Tail      (after a reply) what the attempt printed and logged, if anything
                       Retire    (after a reply) this worker cannot run another step, and exits
                       Synced    the answer to SYNC

Told so (``RunStep.tail``), a local worker sends its reply before it stops
capturing the attempt's output, so that the engine reads the reply
meanwhile: the reply's output is TAIL, and a ``Tail`` follows it, before
any other message, if the attempt printed or logged anything. So any other
message from that worker (but a live ``Output`` of that attempt sent as the
reply was) says the attempt's output, if any, has come; ``SYNC`` asks for
one when the engine waits for it (a run ends only once its attempts' output
is in: ``outputs.py``).

A Dask task (``_dask_remote.run_step``) answers the driver with one of
``RemoteReply`` (the child's reply bytes, as above), ``RemoteExit`` (the child
died or was stopped) or ``RemoteStopped`` (a stop order came first).

The messages are ``NamedTuple``, but they travel as plain tuples (a small
code for the type, then the items: ``dumps``/``loads``). Pickling a
NamedTuple itself costs ~2 µs each way for the class reference and its
Python ``__new__``, against ~0.5 µs for a tuple, on the per-step hot path
(``benchmarks/run.py --only chain``).
"""

from __future__ import annotations

import os
import pickle
from typing import Any, NamedTuple

# What the worker's reply says about the attempt (``Done.outcome``); a hook's reply is HOOK.
SUCCESS, FAILURE, SKIP, HOOK = "success", "failure", "skip", "hook"


class RunStep(NamedTuple):
    """Run one attempt (or hook) of a step: the body, the data class and the snapshot, each sent once per worker.

    The next six fields say who the step is, for its ``WorkflowContext``;
    ``hook`` is None, "success" or "failure", and ``error``, for an
    on_failure hook, is ``(error, its cause)`` encoded (pickle drops ``__cause__``).
    ``item`` (encoded) and ``item_key`` are the item of a ``for_each`` step, else None.
    ``spin`` and ``claim``: see ``dispatch.py`` (why a worker may look for its next step before it sleeps,
    and how a step queued behind another is taken back); ``tail``: see ``outputs.py``.
    """

    task_id: int
    body_key: str
    body: bytes | None
    cls_key: str
    cls: bytes | None
    snap_key: Any
    snap: bytes | None
    instance_id: str
    workflow_id: str
    step_id: str
    attempt: int
    hook: str | None
    error: bytes | None
    item: bytes | None = None
    item_key: str | None = None
    spin: float = 0.0  # after replying, look for the next step for up to this many seconds before sleeping
    claim: bool = False  # queued behind another step: run it only if the engine did not take it back
    tail: bool = False  # reply before ending the capture: what it printed follows in a Tail (outputs.py)


class Stop(NamedTuple):
    """Exit when idle."""


class Sync(NamedTuple):
    """Answer ``Synced``: everything the worker sent before, a ``Tail`` included, has come first."""


class Synced(NamedTuple):
    """The answer to ``Sync``."""


TAIL = "tail"
"""A local worker's ``Done.output`` / ``Failed.output``: the attempt's output follows in a ``Tail``, if it has any."""


class Tail(NamedTuple):
    """What an attempt printed and logged, sent right after its reply: ``output`` as ``Done.output`` would hold it."""

    task_id: int
    output: tuple[Any, ...]


class Output(NamedTuple):
    """Lines a running step printed or logged (``capture.py``), sent live."""

    task_id: int
    lines: list[Any]


class Skipped(NamedTuple):
    """A step queued behind another was taken back before the worker claimed it: the worker skipped it."""

    task_id: int


class Done(NamedTuple):
    """The step returned. ``changes``: field name -> ``data.FieldChange``.

    ``output`` is ``(lines, cut, fresh)`` as ``capture.py`` keeps it
    (``lines[fresh:]`` were not sent as ``Output``), None, or TAIL; ``usage`` the
    attempt's figures and, from a Dask child, under ``"retire"``, why it exits
    after this reply (a local worker sends ``Retire`` instead).
    """

    task_id: int
    outcome: str
    changes: dict[str, Any]
    logs: list[dict[str, Any]]
    output: tuple[Any, ...] | str | None
    usage: dict[str, Any]


class Failed(NamedTuple):
    """The step raised: its exception encoded (``encode_error``) and its traceback as text."""

    task_id: int
    error: bytes
    traceback: str
    logs: list[dict[str, Any]]
    output: tuple[Any, ...] | str | None
    usage: dict[str, Any]


class Retire(NamedTuple):
    """Sent after a reply: what the step changed in the worker's process could not be put back
    (``capture.py``), so it exits without reading another message; a step sent to it meanwhile never ran."""

    reason: str


Reply = Done | Failed
FromWorker = Output | Done | Failed | Skipped | Retire | Tail | Synced
Message = RunStep | Stop | Sync | Output | Done | Failed | Skipped | Retire | Tail | Synced

_TYPES: tuple[type[Any], ...] = (RunStep, Stop, Output, Done, Failed, Skipped, Retire, Tail, Sync, Synced)
_CODES = {t: code for code, t in enumerate(_TYPES)}


def dumps(message: Message) -> bytes:
    """One message as bytes for a pipe (see the module docstring for why a plain tuple)."""
    return pickle.dumps((_CODES[type(message)], tuple(message)), protocol=5)


def loads(blob: bytes) -> Any:
    """The message ``dumps`` encoded, as its named type."""
    code, items = pickle.loads(blob)
    return tuple.__new__(_TYPES[code], items)


STOP = dumps(Stop())
SYNC = dumps(Sync())


def take_claim(token: Any) -> bool:
    """Take the claim token of a step queued behind another (``pool.ClaimPipe``); False: someone else did."""
    try:
        return os.read(token.fileno(), 1) == b"t"
    except BlockingIOError:
        return False


class RemoteError(Exception):
    """Stands in for a step's exception that could not be sent back as itself."""


def encode_error(exc: BaseException) -> bytes:
    """The exception pickled, or a ``RemoteError`` naming it when it cannot travel."""
    from . import data as data_codec

    try:
        blob = data_codec.encode_value(exc)
        pickle.loads(blob)
        return blob
    except Exception:  # noqa: BLE001 - fall back to a stand-in that always travels
        return pickle.dumps(RemoteError(f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"))


def failed(task_id: int, error: BaseException, traceback: str = "") -> Failed:
    """The reply for a step that could not even start (its body would not load, Dask refused it)."""
    return Failed(task_id, encode_error(error), traceback, [], None, {"wall": 0.0})


class RemoteReply(NamedTuple):
    """A Dask task's answer: the child's reply bytes, and where it ran."""

    reply: bytes
    where: str


class RemoteExit(NamedTuple):
    """A Dask task's answer: the child died (``stopped``: by a stop order); ``forced``: processes SIGKILLed."""

    exitcode: int | None
    last_rss: int
    where: str
    stopped: bool
    detail: str | None = None
    forced: int = 0


class RemoteStopped(NamedTuple):
    """A Dask task's answer: a stop order came before the step started."""

    where: str
