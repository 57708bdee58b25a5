"""Running steps on a Dask distributed cluster: ``WorkflowEngine(backend=DaskBackend(...))``.

The scheduler, the store and every guarantee stay in the driver process; only
step bodies travel. ``DaskPool`` gives the scheduler the slot interface of
the local ``WorkerPool`` (see ``pool.Pool``), so the scheduler does not know
where steps run::

    scheduler --send(slot, bytes)--> sender thread: large fields scattered once,
        client.submit(_dask_remote.run_step, key=token) --> Dask worker --> child process
    reply <= 16 KiB: pushed as an event on the client's topic --> event loop: reply bytes --> slot pipe
    Dask future done --> callback thread: reply bytes --> slot pipe  --> scheduler (as from a local worker)
                                          child died / Dask worker died --> slot sentinel --> WorkerCrashed
    scheduler --kill(slot)--> thread: client.run(_dask_remote.stop, token) on the workers

A slot is one step in flight on the cluster, not one process: ``slot.pid`` is
None (the Dask worker samples a step with a memory limit and pushes its RSS
when over; the memory watchdog reads it as ``slot.reported_rss``), and
messages name the remote process as "pid N on Dask worker tcp://...". Dask retries a task by
itself when its worker dies; wfaas counts that death as the attempt's
``WorkerCrashed`` instead (it watches the scheduler's "remove-worker" events and
cancels the task) and retries per the step's own policy.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from . import _dask_remote, _threads, wire
from . import data as data_codec
from . import objects as large_values
from ._worker import format_traceback
from .pool import Exit, Pool, Slot, Waitable, WorkerPool
from .runs import memory_limit_of

__all__ = ["DaskBackend"]

log = logging.getLogger("wfaas")

DEFAULT_LARGE_FIELD = 2**20


class DaskBackend:
    """Steps run on a Dask distributed cluster; the engine keeps its scheduler and store here.

    ``cluster`` is a scheduler address (``"tcp://host:8786"``), an existing
    ``distributed.Client`` (left open at close), or ``"local"`` /
    ``"local:N"`` to start a ``distributed.LocalCluster`` of N worker
    processes (default: CPU count) for trying it out. Data fields larger than
    ``large_field_bytes`` are scattered to the cluster once and referenced by
    every step that reads them, instead of travelling with each step. Workers
    need wfaas installed, at the driver's version (checked when connecting).
    """

    def __init__(
        self,
        cluster: Any,
        *,
        large_field_bytes: int = DEFAULT_LARGE_FIELD,
        connect_timeout: float = 30.0,
    ) -> None:
        self.cluster = cluster
        self.large_field_bytes = large_field_bytes
        self.connect_timeout = connect_timeout
        self._client: Any = None
        self._local_cluster: Any = None
        self._owns_client = False

    @property
    def client(self) -> Any:
        """The ``distributed.Client`` in use (connects on first use)."""
        self.connect()
        return self._client

    def __repr__(self) -> str:
        return f"DaskBackend({self.cluster!r})"

    def connect(self) -> None:
        """Connect (or start the local cluster) and check every worker's wfaas version; idempotent."""
        if self._client is not None:
            return
        try:
            import dask
            from distributed import Client, LocalCluster
        except ImportError as exc:
            raise ImportError(f"DaskBackend needs the distributed package ({exc}): pip install 'wfaas[dask]'") from None
        # The client's event loop and callback threads must not take the program's
        # signals, or Ctrl-C stops reaching the main thread (see _threads).
        with _threads.signals_blocked():
            if isinstance(self.cluster, str) and (self.cluster == "local" or self.cluster.startswith("local:")):
                n = int(self.cluster.partition(":")[2] or os.cpu_count() or 1)
                # A task whose worker died fails at once (KilledWorker) instead of running again
                # elsewhere behind wfaas's back: retries are the step's policy, not Dask's.
                with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
                    self._local_cluster = LocalCluster(
                        n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None
                    )
                self._client = Client(self._local_cluster)
                self._owns_client = True
            elif isinstance(self.cluster, str):
                try:
                    self._client = Client(self.cluster, timeout=self.connect_timeout)
                except OSError as exc:
                    raise ConnectionError(
                        f"cannot reach the Dask scheduler at {self.cluster} ({exc}); "
                        "start one with `dask scheduler` and workers with `dask worker ADDRESS`"
                    ) from None
                self._owns_client = True
            else:
                self._client = self.cluster
        try:
            self._client.wait_for_workers(1, timeout=self.connect_timeout)
            check_versions(self._client)
        except BaseException:
            self.close()
            raise

    def pool(self, max_workers: int | None) -> Pool:
        """A started ``DaskPool``: ``max_workers`` steps in flight (default: the cluster's threads)."""
        self.connect()
        size = max_workers or sum(self._client.nthreads().values()) or 1
        return DaskPool(self, size)

    def close(self) -> None:
        """Close the client and the local cluster if this backend started them."""
        client, cluster = self._client, self._local_cluster
        self._client = self._local_cluster = None
        if self._owns_client and client is not None:
            client.close()
        if cluster is not None:
            cluster.close()


def check_versions(client: Any) -> None:
    """Raise with what to install if a worker lacks wfaas or has another version (or Python)."""
    import sys

    from . import __version__

    def probe() -> dict[str, Any]:
        # Nested, so it travels by value and runs on a worker without wfaas too.
        import sys
        from importlib.metadata import PackageNotFoundError, version

        try:
            found: str | None = version("wfaas")
        except PackageNotFoundError:
            found = None
        return {"wfaas": found, "python": "{}.{}".format(*sys.version_info[:2])}

    mine = {"wfaas": str(__version__), "python": "{}.{}".format(*sys.version_info[:2])}
    problems = []
    for address, theirs in sorted(client.run(probe).items()):
        if theirs["wfaas"] != mine["wfaas"]:
            has = f"has {theirs['wfaas']}" if theirs["wfaas"] else "does not have it"
            problems.append(f"driver has wfaas {mine['wfaas']}, worker {address} {has}")
        if theirs["python"] != mine["python"]:
            problems.append(f"driver runs Python {mine['python']}, worker {address} runs {theirs['python']}")
    if problems:
        raise RuntimeError(
            "; ".join(problems) + f": pip install the same version on every worker (pip install "
            f"'wfaas[dask]=={mine['wfaas']}' with Python {mine['python']}), then connect again"
        )


class DaskSlot(Slot):
    """One step in flight on the cluster; its pipe and sentinel are local, written by the pool's threads."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.conn, self._writer = multiprocessing.Pipe(duplex=False)
        self.sentinel, self._sentinel_w = os.pipe()
        os.set_blocking(self.sentinel, False)
        self.token: str | None = None  # the Dask key of the step in flight
        self.task_id: Any = None
        self.future: Any = None
        self.exit: Exit | None = None  # set when the step's process or Dask worker died
        self.kill_done: Callable[[Slot, Exit], None] | None = None
        self.where: str | None = None

    @property
    def pid(self) -> int | None:
        return None  # the step's process is on another machine; see ``where``

    @property
    def idle(self) -> bool:
        return self.task is None and not self.dying and self.exit is None


class DaskPool:
    """``pool.Pool`` on a Dask cluster: each send is one Dask task; see the module docstring."""

    def __init__(self, backend: DaskBackend, size: int) -> None:
        import distributed

        self._distributed = distributed
        self._backend = backend
        self._client = backend.client
        self._version = _dask_remote._own_version()
        self.slots: list[Slot] = [DaskSlot(i) for i in range(size)]
        self.depth = 1  # a queued step would be a Dask task of its own: nothing to gain on a round trip this long
        self.tails = False  # a Dask task returns one reply
        self._lock = threading.Lock()
        self._outbox: queue.SimpleQueue[tuple[DaskSlot, str, bytes, int | None] | None] = queue.SimpleQueue()
        self._scattered: collections.OrderedDict[bytes, Any] = collections.OrderedDict()
        self._closed = False
        # Small replies come back pushed on the client's own topic as the step ends, a hop sooner
        # than fetching each task's result after Dask reports it done (see _dask_remote.run_step).
        # The scheduler drops that topic's events once the client has left (not so a topic of ours).
        self._topic = str(self._client.id)
        self._sender = _threads.start(self._send_loop, "wfaas-dask-send")
        _listen(self._client, self)

    def _dask(self) -> list[DaskSlot]:
        return self.slots  # type: ignore[return-value]

    # -- the slot interface (scheduler thread) ---------------------------------

    def start(self) -> None:
        """Nothing to start: the cluster's workers are running."""

    # One step per slot (depth 1): nothing is queued behind another, or taken back.
    def offer(self, slot: Slot) -> None:
        raise AssertionError("a Dask pool has depth 1: no step is queued behind another")

    def claimed(self, slot: Slot) -> bool:
        return True

    def take_back(self, slot: Slot) -> bool:
        return False

    def spawn(self, slot: Slot) -> None:
        """Make the slot ready for the next step (after a crash or a kill)."""
        assert isinstance(slot, DaskSlot)
        with self._lock:
            while True:
                try:
                    if not os.read(slot.sentinel, 4096):
                        break
                except BlockingIOError:
                    break
            slot.task, slot.next, slot.dying, slot.exit, slot.kill_done = None, None, False, None, None
            slot.token = slot.future = slot.where = None
            slot.bodies, slot.classes, slot.snapshot, slot.eof = set(), set(), None, False
            slot.reported_rss = 0

    def waitables(self) -> dict[Any, tuple[Waitable, Slot]]:
        out: dict[Any, tuple[Waitable, Slot]] = {}
        for slot in self._dask():
            if not slot.dying:
                out[slot.sentinel] = (Waitable.EXIT, slot)
            if slot.task is not None and not slot.eof:
                out[slot.conn] = (Waitable.RESULT, slot)
        return out

    def send(self, slot: Slot, message: bytes) -> None:
        assert isinstance(slot, DaskSlot)
        # The next step of this slot may run on any worker: make the scheduler send every
        # blob every time; the remote side keeps its own account of what each child holds.
        slot.bodies, slot.classes, slot.snapshot = set(), set(), None
        token = f"wfaas-step-{uuid.uuid4().hex}"
        limit = memory_limit_of(slot.task) if slot.task is not None else None
        with self._lock:
            slot.token, slot.future, slot.where, slot.reported_rss = token, None, None, 0
        self._outbox.put((slot, token, message, limit))

    def receive(self, slot: Slot) -> wire.FromWorker | None:
        return WorkerPool.receive(slot)  # the reply travels the same local pipe as a local worker's

    def exit_of(self, slot: Slot) -> Exit:
        assert isinstance(slot, DaskSlot)
        return slot.exit or Exit(None, where=slot.where, detail="ended")

    def kill(self, slot: Slot, grace: float, done: Callable[[Slot, Exit], None], exit_: Exit | None = None) -> None:
        """Stop the step's remote process tree (SIGTERM, grace, SIGKILL); ``done`` once it is dead."""
        assert isinstance(slot, DaskSlot)
        slot.dying = True
        with self._lock:
            if exit_ is not None or slot.token is None:
                # Its process (or Dask worker) is already dead and the remote side killed its group.
                dead = exit_ or Exit(None, where=slot.where, detail="not running")
                _threads.start(done, f"wfaas-dask-killed-{slot.index}", slot, dead)
                return
            slot.kill_done = done
            token, future = slot.token, slot.future
        if future is not None:
            _threads.start(self._stop_remote, f"wfaas-dask-kill-{slot.index}", slot, token, grace)
        # else: the sender thread sees kill_done before submitting, and reports it done.

    def hurry(self, slot: Slot) -> None:
        assert isinstance(slot, DaskSlot)
        if slot.token is not None and slot.future is not None:
            _threads.start(self._stop_remote, f"wfaas-dask-hurry-{slot.index}", slot, slot.token, 0.0)

    def close(self, grace: float = 2.0) -> None:
        """Stop running steps' trees (after ``grace``), idle remote children, and what the backend started."""
        if self._closed:
            return
        self._closed = True
        busy = [s for s in self._dask() if s.token is not None and s.future is not None]
        for slot in busy:
            if slot.token is not None:
                self._stop_remote(slot, slot.token, grace)
        deadline = time.monotonic() + grace + 5.0
        for slot in busy:
            future = slot.future
            if future is not None:
                try:
                    self._distributed.wait([future], timeout=max(0.0, deadline - time.monotonic()))
                except Exception:  # noqa: BLE001 - a worker that does not answer is left to Dask
                    pass
        self._outbox.put(None)
        self._sender.join(timeout=5)
        try:
            _listen(self._client, self, stop=True)
            self._client.run(_dask_remote.close_children, on_error="ignore")
        except Exception:  # the cluster may be gone already; nothing is left to stop then
            log.debug("wfaas could not stop the Dask workers' idle step processes", exc_info=True)
        self._scattered.clear()
        for slot in self._dask():
            slot.conn.close()  # type: ignore[union-attr]
            slot._writer.close()
            os.close(slot.sentinel)
            os.close(slot._sentinel_w)
        self._backend.close()

    # -- sending (sender thread) ---------------------------------------------------

    def _send_loop(self) -> None:
        while True:
            item = self._outbox.get()
            if item is None:
                return
            slot, token, message, limit = item
            try:
                self._submit(slot, token, message, limit)
            except Exception as exc:  # reported as the step's error, never a hang
                log.warning("wfaas could not send a step to Dask", exc_info=True)
                self._reply_error(slot, token, exc)

    def _submit(self, slot: DaskSlot, token: str, message: bytes, limit: int | None) -> None:
        head: wire.RunStep = wire.loads(message)
        slot.task_id = head.task_id
        # The scheduler always sends the snapshot to a Dask slot (see DaskSlot): it travels as fields.
        assert head.snap is not None
        fields: dict[str, bytes] = pickle.loads(head.snap)
        # Objects (objects.py) are files on this machine: they go to the cluster encoded, once per content,
        # and Dask children work without an object store (the engine writes what they send back large).
        config: Any = fields.pop(large_values.OBJECTS_FIELD, None)
        refs = {n: b for n, b in fields.items() if large_values.is_ref(b)}
        large = {n: self._scatter_object(b, config[0], f"run {head.instance_id}, field {n}") for n, b in refs.items()}
        fields = {n: b for n, b in fields.items() if n not in refs}
        small = {n: b for n, b in fields.items() if len(b) <= self._backend.large_field_bytes}
        large |= {n: self._scatter(b) for n, b in fields.items() if len(b) > self._backend.large_field_bytes}
        head = head._replace(snap=None)
        with self._lock:
            if slot.token != token:
                return
            if slot.kill_done is not None:  # stopped before it was sent
                done, slot.kill_done, slot.token = slot.kill_done, None, None
                _threads.start(done, f"wfaas-dask-killed-{slot.index}", slot, Exit(None, detail="not started"))
                return
            paths = tuple(os.path.abspath(p or os.curdir) for p in sys.path)
            future = self._client.submit(
                _dask_remote.run_step,
                token,
                self._version,
                paths,
                head,
                small,
                large,
                self._topic,
                limit,
                key=token,
                pure=False,
                retries=0,
            )
            slot.future = future
        future.add_done_callback(lambda f: self._on_done(slot, token, f))

    def _scatter_object(self, ref: bytes, config: Any, what: str) -> Any:
        """A Dask future holding the object ``ref`` names, encoded inline: read and sent once per content."""
        key = large_values.ref_of(ref).digest.encode()
        future = self._scattered.get(key)
        if future is not None and future.status == "finished":
            self._scattered.move_to_end(key)
            return future
        value = large_values.ObjectStore.from_config(config).load(ref, what)
        return self._scatter(data_codec.encode_value(value), key)

    def _scatter(self, blob: bytes, digest: bytes | None = None) -> Any:
        """A Dask future holding ``blob``: sent to the cluster once, while it stays among the recent ones."""
        digest = digest or hashlib.blake2b(blob, digest_size=16).digest()
        future = self._scattered.get(digest)
        if future is not None and future.status == "finished":
            self._scattered.move_to_end(digest)
            return future
        [future] = self._client.scatter([blob], hash=False)
        self._scattered[digest] = future
        while len(self._scattered) > _SCATTERED_KEPT:
            self._scattered.popitem(last=False)
        return future

    # -- results (Dask's callback thread, its event loop) --------------------------

    def _on_done(self, slot: DaskSlot, token: str, future: Any) -> None:
        if slot.token != token:
            return  # already reported (its Dask worker's death came first)
        result: wire.RemoteReply | wire.RemoteExit | wire.RemoteStopped | None
        try:
            result = future.result()
        except concurrent.futures.CancelledError:
            result = None
        except self._distributed.KilledWorker as exc:
            address = getattr(exc.last_worker, "address", "?")
            result = wire.RemoteExit(None, 0, f"Dask worker {address}", False, _LEFT)
        except Exception as exc:  # noqa: BLE001 - e.g. wfaas missing on a worker: the step's error
            self._reply_error(slot, token, exc)
            return
        if isinstance(result, wire.RemoteReply):
            self._deliver(slot, token, result.reply, result.where)
        elif isinstance(result, wire.RemoteExit):
            exit_ = Exit(result.exitcode, result.last_rss, where=result.where, detail=result.detail)
            exit_.forced = result.forced
            self._ended(slot, token, exit_)
        elif isinstance(result, wire.RemoteStopped):
            self._ended(slot, token, Exit(None, where=result.where, detail="stopped before it started"))
        else:  # cancelled by someone else (its client restarted?) or by our kill of a queued task
            self._ended(slot, token, Exit(None, where=slot.where, detail="its Dask task was cancelled"))

    def _on_pushed(self, event: tuple[float, Any]) -> None:
        """What ``run_step`` pushed (on the client's event loop): a reply, delivered now (its result is
        then never fetched), or the RSS of a step over its memory limit, for the memory watchdog."""
        message = event[1]
        if not isinstance(message, (list, tuple)) or len(message) < 3:
            return  # Dask's own events on the client's topic (retry, cancel, ...)
        kind, token, *rest = message
        for slot in self._dask():
            if slot.token != token:
                continue
            if kind == _dask_remote.PUSH_REPLY:
                self._deliver(slot, token, *rest)
            elif kind == _dask_remote.PUSH_RSS:
                slot.reported_rss = int(rest[0])
            return

    def _deliver(self, slot: DaskSlot, token: str, reply: bytes, where: str) -> None:
        """The step's reply into its slot's pipe, once: pushed or fetched, whichever comes first."""
        with self._lock:
            if slot.token != token:
                return
            slot.where = where
            slot._writer.send_bytes(reply)
            done, slot.kill_done, slot.token = slot.kill_done, None, None
        if done is not None:  # it returned while being stopped: the result stands
            done(slot, Exit(None, where=where, detail="returned"))

    def _ended(self, slot: DaskSlot, token: str, exit_: Exit) -> None:
        """The step's process is gone: tell the kill that waited for it, or report a crash."""
        with self._lock:
            if slot.token != token:
                return
            done, slot.kill_done, slot.token = slot.kill_done, None, None
            if done is None:
                slot.exit = exit_
                os.write(slot._sentinel_w, b"x")
        if done is not None:
            done(slot, exit_)

    def _reply_error(self, slot: DaskSlot, token: str, exc: BaseException) -> None:
        error = RuntimeError(f"Dask could not run the step: {type(exc).__name__}: {exc}")
        reply = wire.failed(slot.task_id, error, format_traceback(exc))
        with self._lock:
            if slot.token != token:
                return
            slot._writer.send_bytes(wire.dumps(reply))
            done, slot.kill_done, slot.token = slot.kill_done, None, None
        if done is not None:
            done(slot, Exit(None, detail="failed to run"))

    def _on_cluster_event(self, event: tuple[float, Any]) -> None:
        """The Dask scheduler's "all" topic: a worker that left takes its running steps with it."""
        msg = event[1]
        if not isinstance(msg, dict) or msg.get("action") != "remove-worker":
            return
        keys = set(msg.get("processing-tasks") or ())
        address = msg.get("worker", "?")
        for slot in self._dask():
            token, future = slot.token, slot.future
            if token is None or token not in keys:
                continue
            self._ended(slot, token, Exit(None, where=f"Dask worker {address}", detail=_LEFT))
            if future is not None:
                # Otherwise Dask would run it again elsewhere, behind the retry policy's back.
                _threads.start(future.cancel, "wfaas-dask-cancel")

    def _stop_remote(self, slot: DaskSlot, token: str, grace: float) -> None:
        """Tell the workers to stop ``token`` (SIGTERM, ``grace``, SIGKILL); cancel it if none runs it."""
        try:
            found = self._client.run(_dask_remote.stop, token, grace, on_error="ignore", wait=True)
        except Exception:  # the cluster is gone: the future fails and reports it
            log.debug("wfaas could not reach the Dask workers to stop %s", token, exc_info=True)
            return
        if not any(found.values()) and slot.future is not None and slot.token == token:
            # Queued in Dask, not running anywhere: cancelled, it never starts (the
            # workers also remember the token as stopped, in case it starts meanwhile).
            slot.future.cancel()


# Engines sharing one client share its one handler of the scheduler's "all" topic, and of the
# client's own topic, where the Dask workers push replies.
_listeners: dict[int, list[DaskPool]] = {}
_listeners_lock = threading.Lock()


def _listen(client: Any, pool: DaskPool, *, stop: bool = False) -> None:
    with _listeners_lock:
        pools = _listeners.setdefault(id(client), [])
        first = not pools
        if stop:
            pools.remove(pool)
            if not pools:
                del _listeners[id(client)]
                client.unsubscribe_topic("all")
                client.unsubscribe_topic(str(client.id))
            return
        pools.append(pool)
    if first:

        def handler(event: tuple[float, Any]) -> None:
            for each in list(_listeners.get(id(client), ())):
                each._on_cluster_event(event)

        def pushed(event: tuple[float, Any]) -> None:
            for each in list(_listeners.get(id(client), ())):
                each._on_pushed(event)

        client.subscribe_topic("all", handler)
        client.subscribe_topic(str(client.id), pushed)


_LEFT = "died (the Dask worker left the cluster)"
# Large fields kept on the cluster at once; each is a few recent versions of a few fields.
_SCATTERED_KEPT = 16
