"""The main paths end to end, with real workers: the short tour of what wfaas promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
from wfaas import (
    InvalidDefinition,
    SerializationError,
    SqliteStore,
    StepDefinition,
    StepFailed,
    WorkflowDefinition,
    WorkflowEngine,
    WorkflowStatus,
)

from conftest import Data, descendants


def add(n: int) -> Any:
    def body(ctx: Any) -> None:
        ctx.data.n += n
        ctx.data.log.append(ctx.step_id)

    return body


def put(key: str, value: Any) -> Any:
    def body(ctx: Any) -> None:
        ctx.data.items[key] = value

    return body


def test_step_exception_is_the_cause_with_remote_traceback(engine: WorkflowEngine) -> None:
    def boom(ctx: Any) -> None:
        raise KeyError("missing thing")

    engine.register_workflow(WorkflowDefinition("boom", data_type=Data).add_step(StepDefinition("b", "B", boom)))
    iid = engine.start_workflow("boom", Data())
    with pytest.raises(StepFailed) as info:
        engine.wait_for_completion(iid, timeout=30)
    assert isinstance(info.value.__cause__, KeyError)
    assert "boom" in str(info.value.__cause__.__cause__)  # the worker's traceback names the function
    assert info.value.step_id == "b" and info.value.instance_id == iid


def test_validation_lists_every_problem(engine: WorkflowEngine) -> None:
    wf = WorkflowDefinition("bad", data_type=Data)
    wf.add_step(StepDefinition("a", "A", add(1)).depends_on(["c"]))
    wf.add_step(StepDefinition("a", "dup", add(1)))
    wf.add_step(StepDefinition("b", "B", add(1)).depends_on(["nope"]))
    wf.add_step(StepDefinition("c", "C", add(1)).depends_on(["a"]))
    wf.add_step(StepDefinition("d", "D", 42))
    with pytest.raises(InvalidDefinition) as info:
        engine.register_workflow(wf)
    text = str(info.value)
    assert "duplicate step id 'a'" in text
    assert "unknown step 'nope'" in text
    assert "dependency cycle: a -> c -> a" in text
    assert "'d'" in text and "callable" in text
    assert len(info.value.problems) >= 4


def test_unserializable_field_is_named_before_running(engine: WorkflowEngine) -> None:
    engine.register_workflow(WorkflowDefinition("s", data_type=Data).add_step(StepDefinition("a", "A", add(1))))
    with pytest.raises(SerializationError, match=r"Data\.value \(generator\)"):
        engine.start_workflow("s", Data(value=(x for x in range(3))))


def test_sqlite_store_resume_skips_succeeded_steps(tmp_path: Path) -> None:
    log = tmp_path / "runs.log"
    marker = tmp_path / "fixed"

    def record(ctx: Any) -> None:
        with open(log, "a") as f:
            f.write(ctx.step_id + "\n")
        if ctx.step_id == "b" and not marker.exists():
            raise RuntimeError("input not fixed yet")
        ctx.data.log.append(ctx.step_id)

    wf = WorkflowDefinition("dur", data_type=Data)
    wf.add_step(StepDefinition("a", "a", record))
    wf.add_step(StepDefinition("b", "b", record).depends_on(["a"]))
    wf.add_step(StepDefinition("c", "c", record).depends_on(["b"]))
    store = SqliteStore(tmp_path / "runs.sqlite")
    with WorkflowEngine(store=store, max_workers=2) as engine:
        engine.register_workflow(wf)
        iid = engine.start_workflow("dur", Data())
        with pytest.raises(StepFailed):
            engine.wait_for_completion(iid, timeout=30)
    store.close()
    marker.touch()
    store = SqliteStore(tmp_path / "runs.sqlite")
    with WorkflowEngine(store=store, max_workers=2) as engine:
        engine.register_workflow(wf)
        assert engine.get_status(iid).status is WorkflowStatus.FAILED
        engine.resume(iid)
        engine.wait_for_completion(iid, timeout=30)
        assert engine.get_status(iid).data.log == ["a", "b", "c"]
    store.close()
    assert log.read_text().split() == ["a", "b", "b", "c"]


def test_engine_exit_leaves_no_worker_behind() -> None:
    with WorkflowEngine(max_workers=2) as engine:
        engine.register_workflow(WorkflowDefinition("n", data_type=Data).add_step(StepDefinition("a", "a", add(1))))
        engine.wait_for_completion(engine.start_workflow("n", Data()), timeout=30)
        workers = descendants()
        assert len(workers) == 2
    assert descendants() == []
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)


def drop(key: str) -> Any:
    def body(ctx: Any) -> None:
        del ctx.data.items[key]

    return body


def replace_items(ctx: Any) -> None:
    ctx.data.items = ["replaced", ctx.data.items["k0"]]  # no longer a dict: a whole write


@pytest.mark.parametrize("whole_write_at_end", [False, True])
def test_dict_fields_are_checkpointed_key_by_key(tmp_path: Path, whole_write_at_end: bool) -> None:
    path = tmp_path / "runs.sqlite"
    wf = WorkflowDefinition("keys", data_type=Data)
    for i in range(6):
        wf.add_step(StepDefinition(f"s{i}", "s", put(f"k{i}", i)))
    wf.add_step(StepDefinition("drop", "drop", drop("k5")).depends_on([f"s{i}" for i in range(6)]))
    if whole_write_at_end:
        wf.add_step(StepDefinition("replace", "replace", replace_items).depends_on(["drop"]))
    store = SqliteStore(path)
    with WorkflowEngine(store=store, max_workers=2) as engine:
        engine.register_workflow(wf)
        iid = engine.start_workflow("keys", Data(items={"k0": "old", "keep": True}))
        engine.wait_for_completion(iid, timeout=30)
    record = store.read(iid)
    store.close()
    assert record is not None
    if whole_write_at_end:
        assert record.deltas == {}  # a whole write supersedes the key records
    else:
        assert len(record.deltas["items"]) == 6  # k0..k5, k5 as a deletion: O(keys changed)
    reader = SqliteStore(path, readonly=True)
    items = reader.load(iid).data.items
    reader.close()
    expected = {"keep": True, **{f"k{i}": i for i in range(5)}}
    assert items == (["replaced", 0] if whole_write_at_end else expected)


def test_import_wfaas_loads_each_name_on_first_use() -> None:
    # `import wfaas` loads no submodule (issue 17: import time); every public name still
    # resolves, to the object its module defines, and `from wfaas import *` gives them all.
    code = (
        "import sys, importlib, wfaas\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('wfaas.') or m in ('dill', 'psutil', 'sqlite3'))\n"
        "print(loaded)\n"
        "names = {}\n"
        "exec('from wfaas import *', names)\n"
        "missing = [n for n in wfaas.__all__ if n not in names]\n"
        "wrong = [n for n, home in wfaas._HOME.items() if names[n] is not "
        "getattr(importlib.import_module('wfaas.' + home), n)]\n"
        "print(missing, wrong, wfaas.events.__name__, 'WorkflowEngine' in dir(wfaas))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.splitlines() == ["[]", "[] [] wfaas.events True"], out.stdout + out.stderr
