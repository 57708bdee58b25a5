"""Shared helpers: engines with real worker processes, waiting with deadlines, leak checks."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from wfaas import WorkflowData, WorkflowDefinition, WorkflowEngine, events
from wfaas import data as data_codec
from wfaas.engine import resumed_steps
from wfaas.rundata import RunData
from wfaas.runs import Compiled, Run, encode_bodies
from wfaas.scheduler import Scheduler
from wfaas.states import StepState, WorkflowState, WorkflowStatus
from wfaas.store import Checkpoint, InMemoryStore, record_to_state
from wfaas.testing import FakePool, VirtualClock


def pytest_configure(config: pytest.Config) -> None:
    """Let the programs the Ctrl-C tests start receive SIGINT, as from a terminal.

    A background job of a non-interactive shell (as CI may run us) starts with
    SIGINT ignored, and an ignored signal stays ignored across exec. A handled
    signal is reset to its default on exec. (A hook, not module code: workers
    that load a test's step import this module, and they must keep ignoring it.)
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    _cache_bytecode_of_the_programs_we_start()
    _start_forkserver_with_the_test_modules()


def _cache_bytecode_of_the_programs_we_start() -> None:
    """Let the hundreds of Python programs the suite starts (CLI runs, scripts, their forkservers) cache bytecode.

    Where PYTHONDONTWRITEBYTECODE is set (as on this project's machines), each
    of them compiled wfaas and the tests from source: about 0.05 s of CPU a
    program. The cache goes to a folder of its own under the temporary
    directory (PYTHONPYCACHEPREFIX), so the source tree stays as clean as the
    setting meant to keep it.
    """
    if os.environ.pop("PYTHONDONTWRITEBYTECODE", None) is not None:
        os.environ.setdefault("PYTHONPYCACHEPREFIX", os.path.join(tempfile.gettempdir(), "wfaas-tests-pycache"))
        # This process too, for the test modules it has yet to collect (pytest caches their rewritten code).
        sys.dont_write_bytecode = False
        sys.pycache_prefix = os.environ["PYTHONPYCACHEPREFIX"]


def _start_forkserver_with_the_test_modules() -> None:
    """Start the forkserver every engine of the suite shares with pytest and this module already imported.

    A worker imports the module of each step it runs, and steps live in test
    modules, which import pytest (about 0.1 s of CPU): paid by each of two
    workers of each engine, several hundred times a suite. Forked from a
    server that imported them once, workers start with them (the engine's own
    preload, which it sets only before the server starts, is kept).
    """
    from multiprocessing import forkserver

    forkserver.set_forkserver_preload(["wfaas._worker", "wfaas._guard", "dill", "psutil", "pytest", "conftest"])
    forkserver.ensure_running()


@dataclass
class Data(WorkflowData):
    """General-purpose data for tests: a counter, a log of step ids, a dict, a value."""

    n: int = 0
    log: list[str] = field(default_factory=list)
    items: dict[str, Any] = field(default_factory=dict)
    value: Any = None


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until truthy, failing the test after ``timeout`` seconds (never a bare sleep)."""
    deadline = time.monotonic() + timeout
    pause = 0.001
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def descendants(guards: bool = False) -> list[psutil.Process]:
    """Live (non-zombie) descendants of the test process: workers and what they started.

    The forkserver and multiprocessing's resource tracker (direct children,
    shared by every engine in the process, stdlib helpers) are left out; the
    workers forked from the forkserver are not, though their command line is
    the forkserver's. Each engine's guard process (named ``wfaas-guard``) is
    left out too unless ``guards``: it lives as long as its engine.
    """
    me = os.getpid()
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(p.cmdline())
            if p.ppid() == me and ("forkserver" in cmd or "resource_tracker" in cmd):
                continue
            if not guards and p.name() == "wfaas-guard":
                continue
        except psutil.Error:
            continue
        out.append(p)
    return out


@pytest.fixture
def no_leftovers() -> Iterator[None]:
    """After the test (and its engine), no worker or grandchild is left under the test process.

    The fault-test modules use it for every test: ``pytestmark = pytest.mark.usefixtures("no_leftovers")``.
    """
    yield
    wait_until(lambda: not descendants(guards=True), timeout=5, what="no child process left behind")


def collect(engine: WorkflowEngine) -> list[events.WorkflowEvent]:
    """Every event ``engine`` publishes from now on, in a list (``engine.event_bus.flush()`` before reading)."""
    seen: list[events.WorkflowEvent] = []
    engine.event_bus.subscribe(seen.append)
    return seen


def wait_for(path: str | os.PathLike[str], timeout: float = 60.0) -> None:
    """Inside a step: block until ``path`` exists, failing the attempt after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{os.fspath(path)} did not appear within {timeout} s")
        time.sleep(0.01)


@pytest.fixture
def engine() -> Iterator[WorkflowEngine]:
    """A real engine with two worker processes, closed after the test."""
    with WorkflowEngine(max_workers=2, grace_period=1.0) as eng:
        yield eng


@pytest.fixture
def clock() -> VirtualClock:
    """A virtual clock that jumps to the next timer whenever no step runs."""
    return VirtualClock(autojump=True)


@pytest.fixture
def vengine(clock: VirtualClock) -> Iterator[WorkflowEngine]:
    """A real engine whose timers (delay, backoff, scheduled_at, timeouts) run on ``clock``."""
    with WorkflowEngine(max_workers=2, clock=clock, grace_period=1.0) as eng:
        yield eng


# -- fault-test helpers (processes, PID files) ---------------------------------------


def alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (dead, not yet reaped by its parent) counts as dead."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def write_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` so that a reader sees the whole file or none (for PID files written by steps)."""
    tmp = f"{os.fspath(path)}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def wait_for_text(path: str | os.PathLike[str], timeout: float = 30.0) -> str:
    """Wait for a file written with :func:`write_atomic` and return its text."""
    file = Path(path)
    return str(wait_until(lambda: file.exists() and file.read_text(), timeout, f"file {file}"))


def reap(proc: subprocess.Popen[Any]) -> None:
    """Kill a test's child program if it still runs, wait for it, and close its stdout."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)
    if proc.stdout is not None:
        proc.stdout.close()


# -- the scheduler without processes: tick() with a fake pool and a virtual clock --------


class HeldStore(InMemoryStore):
    """An in-memory store whose writes commit only when the test says (``commit``), or fail (``fail``)."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[tuple[list[Checkpoint], Callable[[Exception | None], None]]] = []
        self.writes = 0
        self.kinds: list[str] = []  # "async" or "now" (write_now: something waits on it), per write

    def write_async(self, checkpoints: list[Checkpoint], done: Callable[[Exception | None], None]) -> None:
        self.writes += 1
        self.kinds.append("async")
        self.held.append((checkpoints, done))

    def write_now(self, checkpoints: list[Checkpoint], done: Callable[[Exception | None], None]) -> None:
        self.write_async(checkpoints, done)
        self.kinds[-1] = "now"

    def commit(self) -> None:
        """Commit every held write, in order (on the test's thread, as a store thread would, later)."""
        while self.held:
            checkpoints, done = self.held.pop(0)
            self.write(checkpoints)
            done(None)

    def fail(self, error: Exception) -> None:
        while self.held:
            _, done = self.held.pop(0)
            done(error)


class Ticker:
    """A ``Scheduler`` over a ``FakePool`` and a ``VirtualClock``, turned by hand on the test's thread.

    No thread and no process is started: ``turn()`` calls ``tick(max_wait=0)``;
    ``pool`` plays the workers (``execute``, ``crash``, ``end_kill``), ``clock``
    the time (``advance``).
    """

    def __init__(
        self,
        workers: int = 2,
        store: InMemoryStore | None = None,
        grace: float = 1.0,
        depth: int = 1,
        watched: bool = True,
    ) -> None:
        self.clock = VirtualClock()
        self.pool = FakePool(workers, depth)
        self.pool.start()
        self.store = store if store is not None else InMemoryStore()
        self.bus = events.EventBus()
        self._events: list[Any] = []
        if watched:  # else no event subscriber at all, and events() sees none
            self.bus.subscribe(self._events.append)
        self.scheduler = Scheduler(self.pool, self.store, self.bus, self.clock, grace, {"pid": os.getpid()})

    def start(self, definition: WorkflowDefinition, data: Any = None, turns: int = 3) -> str:
        """Start a run the way ``WorkflowEngine.start_workflow`` does, then turn."""
        problems = definition.validate()
        bodies, unsendable = encode_bodies(definition)
        assert not problems + unsendable, problems + unsendable
        compiled = Compiled(definition, bodies)
        data = data if data is not None else (definition.data_type or Data)()
        fields = data_codec.encode_fields(data, where="test")
        cls_blob = data_codec.encode_value(type(data))
        iid = uuid.uuid4().hex
        run = Run(iid, compiled, type(data), cls_blob, RunData(fields), created_at=self.clock.now())
        run.data.dirty_fields.update(fields)
        run.extra = {"class": cls_blob, "fingerprint": compiled.fingerprint}
        self.scheduler.start_run(run, None, set())
        self.turn(turns)
        return iid

    def resume(self, definition: WorkflowDefinition, iid: str, reruns: set[str] | None = None, turns: int = 3) -> None:
        """Resume a stored run in this ticker's scheduler, from its store, the way ``WorkflowEngine.resume`` does."""
        record = self.store.read(iid)
        assert record is not None, f"instance {iid} was never checkpointed"
        compiled = Compiled(definition, encode_bodies(definition)[0])
        fields = RunData(dict(record.resolved_fields()))
        run = Run(iid, compiled, Data, record.extra["class"], fields, record.meta["created_at"])
        run.status = WorkflowStatus(record.meta["status"])
        self.scheduler.start_run(run, resumed_steps(record, compiled), reruns or set())
        self.turn(turns)

    def turn(self, n: int = 3) -> None:
        for _ in range(n):
            self.scheduler.tick(max_wait=0)

    def run(self, step_id: str, turns: int = 3) -> None:
        """The worker running ``step_id`` runs its body here and replies; the scheduler takes it in."""
        self.pool.execute(step_id)
        self.turn(turns)

    def advance(self, seconds: float, turns: int = 3) -> None:
        self.clock.advance(seconds)
        self.turn(turns)

    def busy(self) -> set[str]:
        return set(self.pool.busy())

    def turn_due(self) -> bool:
        """The next wait returns at once (or within ``loopio.SOON``): another turn was asked for, or it was woken."""
        woken = select.select([self.scheduler.wake.fd], [], [], 0)[0]
        return bool(self.scheduler._again or self.scheduler._soon or woken or self.scheduler._commands)

    def status(self, iid: str) -> WorkflowStatus:
        """Running or not completed: the scheduler's handle says; completed: the store does (as for the engine)."""
        finished = self.scheduler.outcomes.get(iid)
        if finished is not None:
            return finished.status
        meta = self.store.read_meta(iid)
        assert meta is not None, f"instance {iid} is neither running here nor stored"
        return WorkflowStatus(meta["status"])

    def state(self, iid: str) -> WorkflowState[Any]:
        record = self.store.read(iid)
        assert record is not None, f"instance {iid} was never checkpointed"
        return record_to_state(iid, record)

    def step(self, iid: str, step_id: str) -> StepState:
        return self.state(iid).step_states[step_id]

    def events(self, kind: type | None = None) -> list[Any]:
        assert self.bus.flush(5.0)
        return [e for e in self._events if kind is None or isinstance(e, kind)]

    def close(self) -> None:
        self.bus.close()
        self.scheduler.wake.close()
        self.pool.close()


@pytest.fixture
def ticker() -> Iterator[Ticker]:
    t = Ticker()
    yield t
    t.close()


def read_pty(primary: int, proc: subprocess.Popen[bytes], seconds: float) -> bytes:
    """All that ``proc`` wrote to its pseudo-terminal until it ended, or ``seconds`` passed."""
    seen = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([primary], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(primary, 65536)
            except OSError:
                break  # EIO: every writer of the terminal has closed it
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    return seen
