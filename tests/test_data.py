"""Workflow data: a copy per step, merging only what changed, conflicts, transient fields, context, errors.

Two steps "ran at the same time" here when both are roots of the DAG and the
engine has two workers; the later one is held back inside its worker until the
test has seen the first one succeed (a marker file, polled with a deadline).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from wfaas import (
    ContextValueNotFound,
    DataConflict,
    FunctionStep,
    RetryPolicy,
    SerializationError,
    StepDefinition,
    StepExecutor,
    StepFailed,
    StepStatus,
    TypeMismatch,
    WorkflowData,
    WorkflowDefinition,
    WorkflowEngine,
    transient,
)

from conftest import Data, wait_until

S = StepStatus
DEADLINE = 30.0


def wait_for(marker: Path) -> None:
    """Block the step (in its worker) until ``marker`` exists; fail loudly after a deadline."""
    deadline = time.monotonic() + DEADLINE
    while not marker.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{marker.name} never appeared")
        time.sleep(0.005)


def parallel(
    engine: WorkflowEngine,
    tmp_path: Path,
    first: Callable[[Any], Any],
    second: Callable[[Any], Any],
    data: Any = None,
    *,
    retry_second: int = 1,
) -> str:
    """Run ``first`` and ``second`` from one snapshot; ``second`` finishes after ``first`` succeeded."""
    go = tmp_path / "go"

    def held(ctx: Any) -> Any:
        if ctx.attempt == 1:
            wait_for(go)
        return second(ctx)

    wf = WorkflowDefinition("par", data_type=type(data) if data is not None else Data)
    wf.add_step(StepDefinition("first", "first", first))
    wf.add_step(StepDefinition("second", "second", held).with_retry(RetryPolicy(max_attempts=retry_second)))
    engine.register_workflow(wf)
    iid = engine.start_workflow("par", data if data is not None else Data())
    steps = lambda: engine.get_status(iid).step_states  # noqa: E731
    wait_until(lambda: steps()["first"].status is S.SUCCEEDED, 30, "the first step")
    assert steps()["second"].status is S.RUNNING  # it started from the same snapshot
    go.touch()
    return iid


# -- copies and merging --------------------------------------------------------------------------


def test_each_step_works_on_its_own_copy(engine: WorkflowEngine, tmp_path: Path) -> None:
    def first(ctx: Any) -> None:
        ctx.data.log.append("first")
        ctx.data.items["first"] = True

    def second(ctx: Any) -> None:
        # first already succeeded and was merged, but this step's copy is its own
        ctx.data.value = (list(ctx.data.log), dict(ctx.data.items))

    original = Data()
    iid = parallel(engine, tmp_path, first, second, original)
    engine.wait_for_completion(iid, timeout=30)
    state = engine.get_status(iid)
    assert state.data.value == ([], {})
    assert state.data.log == ["first"]
    assert state.data.items == {"first": True}
    # the caller's object was never touched, and get_status hands out copies
    assert original == Data()
    state.data.log.append("mutated by the caller")
    assert engine.get_status(iid).data.log == ["first"]


def test_steps_after_a_step_see_its_writes(engine: WorkflowEngine) -> None:
    def a(ctx: Any) -> None:
        ctx.data.n = 5

    def b(ctx: Any) -> None:
        ctx.data.log.append(f"n={ctx.data.n}")

    wf = WorkflowDefinition("seq", data_type=Data)
    wf.add_step(StepDefinition("a", "a", a)).add_step(StepDefinition("b", "b", b).depends_on(["a"]))
    engine.register_workflow(wf)
    iid = engine.start_workflow("seq", Data())
    engine.wait_for_completion(iid, timeout=30)
    assert engine.get_status(iid).data.log == ["n=5"]
    assert engine.get_status(iid).data.n == 5


def test_only_changed_fields_merge_back(engine: WorkflowEngine, tmp_path: Path) -> None:
    def first(ctx: Any) -> None:
        ctx.data.n = 1
        ctx.data.value = "from first"

    def second(ctx: Any) -> None:
        ctx.data.log.append("second")
        ctx.data.value = None  # the value of its snapshot: not a change, so no overwrite
        ctx.data.n = 0  # same

    iid = parallel(engine, tmp_path, first, second)
    engine.wait_for_completion(iid, timeout=30)
    data = engine.get_status(iid).data
    assert (data.n, data.value, data.log) == (1, "from first", ["second"])


def test_dict_key_deleted_by_one_and_set_by_the_other_conflicts(engine: WorkflowEngine, tmp_path: Path) -> None:
    def first(ctx: Any) -> None:
        del ctx.data.items["k"]

    def second(ctx: Any) -> None:
        ctx.data.items["k"] = "new"

    iid = parallel(engine, tmp_path, first, second, Data(items={"k": "old"}))
    with pytest.raises(DataConflict, match="items"):
        engine.wait_for_completion(iid, timeout=30)
    assert engine.get_status(iid).data.items == {}


# -- what can travel ---------------------------------------------------------------------------------


@dataclass
class WithConnection(WorkflowData):
    url: str = "db://x"
    conn: Any = transient()
    cache: dict[str, int] = transient(default_factory=dict)
    restored_in: list[int] = field(default_factory=list)
    seen: str = ""

    def restore(self) -> None:
        self.conn = sqlite3.connect(":memory:")  # neither pickle nor dill can send a connection
        self.restored_in = [*self.restored_in, os.getpid()]


def test_transient_fields_are_dropped_and_restored_in_the_worker(engine: WorkflowEngine) -> None:
    def use(ctx: Any) -> None:
        data = ctx.data
        data.seen = f"{type(data.conn).__name__}/{data.cache}/{os.getpid()}/{data.restored_in[-1]}"
        data.cache["x"] = 1  # transient: never travels back

    engine.register_workflow(WorkflowDefinition("t", data_type=WithConnection).add_step(StepDefinition("u", "u", use)))
    data = WithConnection()
    data.restore()  # the caller holds a live connection: it must not be sent
    data.cache["local"] = 1
    iid = engine.start_workflow("t", data)
    engine.wait_for_completion(iid, timeout=30)
    state = engine.get_status(iid)
    lock_type, cache, worker_pid, restored_pid = state.data.seen.split("/")
    assert lock_type == "Connection"
    assert cache == "{}"  # re-created from its default_factory, not the caller's
    assert worker_pid == restored_pid != str(os.getpid())  # restore() ran in the worker
    assert state.data.cache == {}


def test_unserializable_field_is_reported_at_start(engine: WorkflowEngine, tmp_path: Path) -> None:
    ran = tmp_path / "ran"

    def body(ctx: Any) -> None:
        ran.touch()

    engine.register_workflow(WorkflowDefinition("ser", data_type=Data).add_step(StepDefinition("s", "s", body)))
    before = set(engine.store.ids())
    conn = sqlite3.connect(":memory:")
    with pytest.raises(SerializationError) as info:
        engine.start_workflow("ser", Data(value=conn))
    conn.close()
    message = str(info.value)
    assert "Data.value" in message
    assert "Connection" in message
    assert "transient()" in message
    assert set(engine.store.ids()) == before  # no instance was created
    assert not ran.exists()


def test_unserializable_field_nested_in_a_container_is_named(engine: WorkflowEngine) -> None:
    engine.register_workflow(WorkflowDefinition("ser2", data_type=Data).add_step(StepDefinition("s", "s", noop)))
    with pytest.raises(SerializationError, match=r"Data\.items"):
        engine.start_workflow("ser2", Data(items={"rows": (i for i in range(3))}))


def noop(ctx: Any) -> None:
    pass


# -- the shared context ------------------------------------------------------------------------------


def test_context_values_are_shared_between_steps(engine: WorkflowEngine, tmp_path: Path) -> None:
    def a(ctx: Any) -> None:
        ctx.set("rows", 42)

    def b(ctx: Any) -> None:
        ctx.set("name", "b-wrote")

    def c(ctx: Any) -> None:
        ctx.data.value = (ctx.get("rows", type=int), ctx.get("name"), ctx.get("missing", "dflt"))

    wf = WorkflowDefinition("ctx", data_type=Data)
    wf.add_step(StepDefinition("a", "a", a)).add_step(StepDefinition("b", "b", b))
    wf.add_step(StepDefinition("c", "c", c).depends_on(["a", "b"]))
    engine.register_workflow(wf)
    iid = engine.start_workflow("ctx", Data())
    engine.wait_for_completion(iid, timeout=30)
    state = engine.get_status(iid)
    assert state.data.value == (42, "b-wrote", "dflt")
    assert state.context == {"rows": 42, "name": "b-wrote"}


def test_context_values_written_in_parallel_merge_key_by_key(engine: WorkflowEngine, tmp_path: Path) -> None:
    def first(ctx: Any) -> None:
        ctx.set("a", 1)
        ctx.set("same", "x")

    def second(ctx: Any) -> None:
        ctx.set("b", 2)
        ctx.set("same", "x")

    iid = parallel(engine, tmp_path, first, second)
    engine.wait_for_completion(iid, timeout=30)
    assert engine.get_status(iid).context == {"a": 1, "b": 2, "same": "x"}


def test_missing_context_key_and_type_mismatch(engine: WorkflowEngine) -> None:
    def writer(ctx: Any) -> None:
        ctx.set("name", "text")

    def probe(ctx: Any) -> None:
        found = []
        try:
            ctx.get("missing")
        except ContextValueNotFound as exc:
            found.append(f"{type(exc).__name__}:{exc.key}:{'missing' in str(exc)}")
        try:
            ctx.get("name", type=int)
        except TypeMismatch as exc:
            found.append(f"{type(exc).__name__}:{'str' in str(exc) and 'int' in str(exc)}")
        found.append(ctx.get("name", type=str))
        ctx.data.log.extend(found)

    wf = WorkflowDefinition("ctxerr", data_type=Data)
    wf.add_step(StepDefinition("w", "w", writer)).add_step(StepDefinition("p", "p", probe).depends_on(["w"]))
    engine.register_workflow(wf)
    iid = engine.start_workflow("ctxerr", Data())
    engine.wait_for_completion(iid, timeout=30)
    assert engine.get_status(iid).data.log == ["ContextValueNotFound:missing:True", "TypeMismatch:True", "text"]


def test_an_uncaught_missing_context_key_fails_the_step_with_its_cause(engine: WorkflowEngine) -> None:
    def reads(ctx: Any) -> None:
        ctx.get("never-set")

    engine.register_workflow(WorkflowDefinition("ctxfail", data_type=Data).add_step(StepDefinition("r", "r", reads)))
    iid = engine.start_workflow("ctxfail", Data())
    with pytest.raises(StepFailed) as info:
        engine.wait_for_completion(iid, timeout=30)
    assert isinstance(info.value.__cause__, ContextValueNotFound)
    assert "never-set" in str(info.value)


# -- errors come back with their cause -----------------------------------------------------------------


class InventoryError(Exception):
    """A user's own exception type, with an attribute."""

    def __init__(self, sku: str) -> None:
        super().__init__(f"out of stock: {sku}")
        self.sku = sku


def reserve_stock(ctx: Any) -> None:
    raise InventoryError("sku-123")


def test_step_exception_is_the_cause_of_step_failed_with_remote_traceback(engine: WorkflowEngine) -> None:
    engine.register_workflow(
        WorkflowDefinition("exc", data_type=Data).add_step(StepDefinition("reserve", "Reserve", reserve_stock))
    )
    iid = engine.start_workflow("exc", Data())
    with pytest.raises(StepFailed) as info:
        engine.wait_for_completion(iid, timeout=30)
    error = info.value
    assert error.step_id == "reserve" and error.instance_id == iid
    assert "'reserve'" in str(error) and iid in str(error) and "out of stock: sku-123" in str(error)
    cause = error.__cause__
    assert type(cause) is InventoryError
    assert cause.sku == "sku-123"
    remote = cause.__cause__
    assert remote is not None
    text = str(remote)
    assert "Traceback" in text
    assert "reserve_stock" in text
    assert 'raise InventoryError("sku-123")' in text
    assert "InventoryError: out of stock: sku-123" in text


def test_an_exception_that_cannot_travel_still_comes_back_named(engine: WorkflowEngine) -> None:
    class Unpicklable(Exception):
        def __init__(self) -> None:
            super().__init__("holds a connection")
            self.conn = sqlite3.connect(":memory:")

    def body(ctx: Any) -> None:
        raise Unpicklable()

    engine.register_workflow(WorkflowDefinition("unp", data_type=Data).add_step(StepDefinition("s", "s", body)))
    iid = engine.start_workflow("unp", Data())
    with pytest.raises(StepFailed, match="holds a connection") as info:
        engine.wait_for_completion(iid, timeout=30)
    assert type(info.value.__cause__).__name__ == "RemoteError"  # a stand-in naming the original
    assert "Unpicklable" in str(info.value.__cause__)
    assert "Traceback" in str(info.value.__cause__.__cause__)


# -- bodies: lambdas, closures, local classes ---------------------------------------------------------


def test_lambdas_and_closures_are_step_bodies(engine: WorkflowEngine) -> None:
    factor = 7
    suffix = ["-closure"]

    def helper(x: int) -> int:
        return x * factor

    def make_step(tag: str) -> Callable[[Any], None]:
        def step(ctx: Any) -> None:
            ctx.data.log.append(tag + suffix[0])

        return step

    wf = WorkflowDefinition("lam", data_type=Data)
    wf.add_step(StepDefinition("lam", "lambda", lambda ctx: setattr(ctx.data, "n", helper(6))))
    wf.add_step(StepDefinition("clo", "closure", make_step("made")).depends_on(["lam"]))
    wf.add_step(
        StepDefinition("fs", "function step", FunctionStep(lambda ctx: ctx.data.items.update(n=ctx.data.n))).depends_on(
            ["clo"]
        )
    )
    wf.add_step(StepDefinition("cond", "cond", make_step("cond")).depends_on(["fs"]).run_if(lambda c: c.data.n == 42))
    engine.register_workflow(wf)
    iid = engine.start_workflow("lam", Data())
    engine.wait_for_completion(iid, timeout=30)
    data = engine.get_status(iid).data
    assert data.n == 42
    assert data.log == ["made-closure", "cond-closure"]
    assert data.items == {"n": 42}


def test_closures_of_one_family_are_encoded_by_dill_once_and_each_runs_with_its_own_cells(
    engine: WorkflowEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wfaas import bodies

    dilled: list[Any] = []
    dill_dumps = bodies.dill_dumps
    monkeypatch.setattr(bodies, "dill_dumps", lambda body: dilled.append(body) or dill_dumps(body))
    scale = 3

    def make_step(i: int, tag: str, raw: bytes, ratio: float, nothing: None) -> Callable[[Any], None]:
        def step(ctx: Any) -> None:
            ctx.data.items[tag] = (i * scale, raw, ratio, nothing)

        return step

    def make_listed(tags: list[str]) -> Callable[[Any], None]:  # a list in its cell: dill, each by itself
        def listed(ctx: Any) -> None:
            ctx.data.log.extend(tags)

        return listed

    wf = WorkflowDefinition("family", data_type=Data)
    for i in range(6):
        wf.add_step(StepDefinition(f"s{i}", "step", make_step(i, f"t{i}", bytes([i]), i / 4, None)))
    wf.add_step(StepDefinition("a", "listed", make_listed(["a"])))
    wf.add_step(StepDefinition("b", "listed", make_listed(["b"])).depends_on(["a"]))
    engine.register_workflow(wf)
    assert [getattr(body, "__name__", "") for body in dilled] == ["step", "listed", "listed"]
    iid = engine.start_workflow("family", Data())
    engine.wait_for_completion(iid, timeout=30)
    data = engine.get_status(iid).data
    assert data.items == {f"t{i}": (i * scale, bytes([i]), i / 4, None) for i in range(6)}
    assert data.log == ["a", "b"]


def test_a_data_class_defined_in_a_function_travels(engine: WorkflowEngine) -> None:
    @dataclass
    class Local(WorkflowData):
        text: str = ""
        out: str = ""

    def shout(ctx: Any) -> None:
        ctx.data.out = ctx.data.text.upper()

    engine.register_workflow(WorkflowDefinition("local", data_type=Local).add_step(StepDefinition("s", "s", shout)))
    iid = engine.start_workflow("local", Local(text="hi"))
    engine.wait_for_completion(iid, timeout=30)
    assert engine.get_status(iid).data.out == "HI"


# -- data_type -------------------------------------------------------------------------------------------


@dataclass
class Other(WorkflowData):
    x: int = 0


def test_data_of_another_type_is_refused_at_start(engine: WorkflowEngine) -> None:
    engine.register_workflow(WorkflowDefinition("typed", data_type=Data).add_step(StepDefinition("s", "s", noop)))
    before = set(engine.store.ids())
    with pytest.raises(TypeError, match="Data") as info:
        engine.start_workflow("typed", Other())
    assert "Other" in str(info.value)
    assert set(engine.store.ids()) == before


def test_no_data_builds_the_data_type(engine: WorkflowEngine) -> None:
    def count(ctx: Any) -> None:
        ctx.data.n += 1

    engine.register_workflow(WorkflowDefinition("dflt", data_type=Data).add_step(StepDefinition("s", "s", count)))
    iid = engine.start_workflow("dflt")
    engine.wait_for_completion(iid, timeout=30)
    assert engine.get_status(iid).data == Data(n=1)


def test_without_data_type_any_data_object_is_accepted(engine: WorkflowEngine) -> None:
    def count(ctx: Any) -> None:
        ctx.data.x += 1

    engine.register_workflow(WorkflowDefinition("untyped").add_step(StepDefinition("s", "s", count)))
    iid = engine.start_workflow("untyped", Other(x=1))
    engine.wait_for_completion(iid, timeout=30)
    assert engine.get_status(iid).data == Other(x=2)


def test_parallel_equal_values_in_different_order_are_no_conflict(engine: WorkflowEngine, tmp_path: Path) -> None:
    # equal values (==), encoded differently: a dict built in another insertion order
    def first(ctx: Any) -> None:
        ctx.data.value = {"x": 1, "y": 2}

    def second(ctx: Any) -> None:
        ctx.data.value = {"y": 2, "x": 1}

    iid = parallel(engine, tmp_path, first, second)
    engine.wait_for_completion(iid, timeout=30)
    assert engine.get_status(iid).data.value == {"x": 1, "y": 2}


def test_parallel_equal_dict_key_values_in_different_order_are_no_conflict(
    engine: WorkflowEngine, tmp_path: Path
) -> None:
    def first(ctx: Any) -> None:
        ctx.data.items["k"] = {"x": 1, "y": 2}

    def second(ctx: Any) -> None:
        ctx.data.items["k"] = {"y": 2, "x": 1}

    iid = parallel(engine, tmp_path, first, second)
    engine.wait_for_completion(iid, timeout=30)
    assert engine.get_status(iid).data.items == {"k": {"x": 1, "y": 2}}


def test_a_step_that_replaces_ctx_data_keeps_its_writes(engine: WorkflowEngine) -> None:
    # `ctx.data = replace(ctx.data, ...)` is natural Python; what it wrote must not vanish silently
    def body(ctx: Any) -> None:
        ctx.data = Data(n=5, log=["replaced"])

    engine.register_workflow(WorkflowDefinition("repl", data_type=Data).add_step(StepDefinition("s", "s", body)))
    iid = engine.start_workflow("repl", Data())
    try:
        engine.wait_for_completion(iid, timeout=30)
    except StepFailed as exc:  # refusing the assignment loudly is fine too
        assert "data" in str(exc)
        return
    data = engine.get_status(iid).data
    assert (data.n, data.log) == (5, ["replaced"]), "the step's writes were silently dropped"


class Plain:
    """Workflow data need not be a dataclass."""

    def __init__(self) -> None:
        self.x = 1


def test_a_plain_class_is_workflow_data(engine: WorkflowEngine) -> None:
    def bump(ctx: Any) -> None:
        ctx.data.x += 1

    engine.register_workflow(WorkflowDefinition("plain").add_step(StepDefinition("s", "s", bump)))
    iid = engine.start_workflow("plain", Plain())
    engine.wait_for_completion(iid, timeout=30)
    assert engine.get_status(iid).data.x == 2


class ConflictingWithHooks(StepExecutor[Data]):
    """Writes ``value``; its first attempt is held until ``go`` exists, so it conflicts with ``first``."""

    def __init__(self, go: str, log: str) -> None:
        self.go = go
        self.log = log

    def execute(self, ctx: Any) -> None:
        if ctx.attempt == 1:
            wait_for(Path(self.go))
        ctx.data.value = "second"

    def on_success(self, ctx: Any) -> None:
        with open(self.log, "a") as f:
            f.write(f"on_success:attempt{ctx.attempt}\n")

    def on_failure(self, ctx: Any, error: BaseException) -> None:
        with open(self.log, "a") as f:
            f.write(f"on_failure:{type(error).__name__}\n")


@pytest.mark.parametrize("attempts", [1, 2])
def test_on_success_is_not_called_for_an_attempt_that_ends_in_a_conflict(
    engine: WorkflowEngine, tmp_path: Path, attempts: int
) -> None:
    go, log = tmp_path / "go", tmp_path / "log"

    def first(ctx: Any) -> None:
        ctx.data.value = "first"

    wf = WorkflowDefinition("hooks", data_type=Data)
    wf.add_step(StepDefinition("first", "first", first))
    wf.add_step(
        StepDefinition("second", "second", ConflictingWithHooks(str(go), str(log))).with_retry(
            RetryPolicy(max_attempts=attempts)
        )
    )
    engine.register_workflow(wf)
    iid = engine.start_workflow("hooks", Data())
    wait_until(lambda: engine.get_status(iid).step_states["first"].status is S.SUCCEEDED, 30, "the first step")
    go.touch()
    if attempts == 1:
        # the only attempt failed with DataConflict: the step failed for good, on_failure once, on_success never
        with pytest.raises(DataConflict):
            engine.wait_for_completion(iid, timeout=30)
        assert log.read_text().split() == ["on_failure:DataConflict"]
    else:
        # the retry succeeded: on_success once, for attempt 2
        engine.wait_for_completion(iid, timeout=30)
        assert engine.get_status(iid).data.value == "second"
        assert log.read_text().split() == ["on_success:attempt2"]


def test_replacing_a_dict_field_while_another_step_wrote_a_key_conflicts(
    engine: WorkflowEngine, tmp_path: Path
) -> None:
    def first(ctx: Any) -> None:
        ctx.data.items["a"] = 1

    def second(ctx: Any) -> None:
        ctx.data.items = None  # replaces the whole field, and first's key with it

    iid = parallel(engine, tmp_path, first, second, Data(items={"old": 0}))
    with pytest.raises(DataConflict, match="items"):
        engine.wait_for_completion(iid, timeout=30)
    assert engine.get_status(iid).data.items == {"old": 0, "a": 1}  # first's write was not lost


def test_workflow_type_defaults_to_the_class_name() -> None:
    """API.md: ``workflow_type`` is optional and defaults to the class name (issue 14)."""

    @dataclass
    class Bag(WorkflowData):
        n: int = 0

    class Named(WorkflowData):
        workflow_type = "named"

    class SubOfNamed(Named):
        pass

    class SubOfBag(Bag):
        pass

    assert Bag.workflow_type == "Bag"
    assert Bag().workflow_type == "Bag"
    assert "workflow_type" not in vars(Bag())  # a class attribute: it does not travel as a field
    assert Named.workflow_type == "named"
    assert SubOfNamed.workflow_type == "named"  # an explicit type is inherited
    assert SubOfBag.workflow_type == "SubOfBag"  # a default one is not


def test_the_idempotency_key_names_the_instance_and_the_step(engine: WorkflowEngine) -> None:
    def key(ctx: Any) -> None:
        ctx.data.value = ctx.idempotency_key

    engine.register_workflow(WorkflowDefinition("idem", data_type=Data).add_step(StepDefinition("r", "r", key)))
    iid = engine.start_workflow("idem", Data())
    engine.wait_for_completion(iid, timeout=30)
    assert engine.get_status(iid).data.value == f"{iid}:r"
