"""Each attempt's output, log records and traceback are captured in the worker and kept with the run (API.md §13)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from wfaas import (
    InMemoryStore,
    RetryPolicy,
    SqliteStore,
    StateStore,
    StepDefinition,
    WorkflowContext,
    WorkflowDefinition,
    WorkflowEngine,
    events,
)
from wfaas.capture import LIMIT, OUTPUT

from conftest import Data, collect, wait_for, wait_until

pytestmark = pytest.mark.usefixtures("no_leftovers")


def _talk(ctx: WorkflowContext[Data]) -> None:
    print("from print")
    print("from stderr", file=sys.stderr)
    os.write(1, b"from fd 1\n")
    subprocess.run(["sh", "-c", "echo from a child process; echo child stderr >&2"], check=True)
    ctx.logger.warning("a warning from ctx.logger")
    logging.getLogger("some.library").info("an info record from another logger")
    ctx.logger.debug("a debug record")
    if ctx.attempt == 1:
        _nested_failure(ctx)


def _nested_failure(ctx: WorkflowContext[Data]) -> None:
    int("three")


def _silent(ctx: WorkflowContext[Data]) -> None:
    ctx.data.n += 1


def _flood(ctx: WorkflowContext[Data]) -> None:
    line = b"x" * 1023 + b"\n"
    for _ in range(3 * 1024):  # 3 MiB
        os.write(1, line)
    print("the last line", flush=True)


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    if request.param == "memory":
        yield InMemoryStore()
    else:
        s = SqliteStore(tmp_path / "runs.sqlite")
        yield s
        s.close()


def _run(store: StateStore, wf: WorkflowDefinition) -> tuple[WorkflowEngine, str, list[events.WorkflowEvent]]:
    engine = WorkflowEngine(store=store, max_workers=1, grace_period=1.0)
    seen = collect(engine)
    engine.register_workflow(wf)
    iid = engine.start_workflow(wf.id, Data())
    try:
        engine.wait_for_completion(iid, timeout=60)
    except Exception:  # noqa: BLE001 - the tests look at the state
        pass
    engine.event_bus.flush()
    return engine, iid, seen


def test_output_records_and_traceback_are_kept_per_attempt(store: StateStore) -> None:
    wf = WorkflowDefinition("talker", data_type=Data).add_step(
        StepDefinition("talk", "Talk", _talk).with_retry(RetryPolicy(max_attempts=2))
    )
    before = time.time()
    engine, iid, seen = _run(store, wf)
    try:
        logs = store.read_logs(iid)
        assert [(log.step_id, log.attempt) for log in logs] == [("talk", 1), ("talk", 2)]
        for log in logs:
            texts = [text for _, _, text in log.lines]
            printed = [text for _, level, text in log.lines if level == OUTPUT]
            for expected in ("from print", "from stderr", "from fd 1", "from a child process", "child stderr"):
                assert expected in printed, (expected, texts)
            assert any("a warning from ctx.logger" in t for t in texts)
            assert any("an info record from another logger" in t for t in texts)
            levels = {level for _, level, _ in log.lines}
            assert {OUTPUT, logging.WARNING, logging.INFO, logging.DEBUG} <= levels
            assert all(before <= when <= time.time() for when, _, _ in log.lines)
            assert log.cut == 0
        state = engine.get_status(iid)
        first, second = state.step_states["talk"].history
        assert first.outcome == "failed" and second.outcome == "succeeded"
        tb = first.traceback
        assert tb is not None and tb.startswith("Traceback (most recent call last):")
        assert "test_capture.py" in tb and "_nested_failure" in tb and 'int("three")' in tb
        assert tb.rstrip().endswith("ValueError: invalid literal for int() with base 10: 'three'")
        assert "_worker.py" not in tb  # the worker's own frames are left out
        assert second.traceback is None
        outputs = [e for e in seen if isinstance(e, events.StepOutput)]
        for log in logs:  # published live and at the end: every line once, in order
            published = [line for e in outputs if e.attempt == log.attempt for line in e.lines]
            assert published == log.lines
    finally:
        engine.close()


def test_an_attempt_that_prints_nothing_keeps_no_log(store: StateStore) -> None:
    wf = WorkflowDefinition("silent", data_type=Data).add_step(StepDefinition("quiet", "Quiet", _silent))
    engine, iid, seen = _run(store, wf)
    try:
        assert engine.get_status(iid).data.n == 1
        assert store.read_logs(iid) == []
        assert not [e for e in seen if isinstance(e, events.StepOutput)]
    finally:
        engine.close()


def _say_my_name(ctx: WorkflowContext[Data]) -> None:
    os.write(2, f"fd 2 of {ctx.step_id}\n".encode())
    print(f"I am {ctx.step_id}", end="")  # no line end, last: what the capture gets as the attempt ends


def _many_lines(ctx: WorkflowContext[Data]) -> None:
    for n in range(20_000):
        print(n)


@pytest.mark.parametrize("watched", [False, True], ids=["unwatched", "watched"])
def test_each_step_of_a_chain_on_one_worker_keeps_only_what_it_printed(store: StateStore, watched: bool) -> None:
    # Unwatched, the worker replies before it ends the capture: what each attempt printed follows its
    # reply, while the engine has already sent the next step; the run ends once the last has come.
    # Watched (an event subscriber), the output comes with the reply: StepOutput before StepSucceeded.
    wf = WorkflowDefinition("names", data_type=Data)
    for i in range(12):
        named = StepDefinition(f"s{i}", f"s{i}", _say_my_name)
        wf.add_step(named.depends_on(f"s{i - 1}") if i else named)
    with WorkflowEngine(store=store, max_workers=1, grace_period=1.0) as engine:
        seen = collect(engine) if watched else []
        engine.register_workflow(wf)
        iid = engine.start_workflow(wf.id, Data())
        engine.wait_for_completion(iid, timeout=60)
        logs = {log.step_id: sorted(text for _, _, text in log.lines) for log in store.read_logs(iid)}
        engine.event_bus.flush()
    assert logs == {f"s{i}": [f"I am s{i}", f"fd 2 of s{i}"] for i in range(12)}
    if watched:
        order = [(e.step_id, type(e).__name__) for e in seen if isinstance(e, events.StepOutput | events.StepSucceeded)]
        ends = [n for n, (_, kind) in enumerate(order) if kind == "StepSucceeded"]
        assert [order[n - 1] for n in ends] == [(f"s{i}", "StepOutput") for i in range(12)]


def test_a_run_ends_once_the_output_of_its_last_attempts_is_in(store: StateStore) -> None:
    # Two last steps at once, so each worker replies before it sends what its step printed (the last
    # step of a run alone sends it in its reply); 20,000 lines take a while to follow the reply.
    wf = (
        WorkflowDefinition("two_last", data_type=Data)
        .add_step(StepDefinition("many", "Many", _many_lines))
        .add_step(StepDefinition("quiet", "Quiet", _silent))
    )
    with WorkflowEngine(store=store, max_workers=2, grace_period=1.0) as engine:
        engine.register_workflow(wf)
        iid = engine.start_workflow(wf.id, Data())
        engine.wait_for_completion(iid, timeout=60)
        [log] = store.read_logs(iid)
    assert log.step_id == "many" and [text for _, _, text in log.lines] == [str(n) for n in range(20_000)]


def test_an_attempt_keeps_the_last_mib_with_a_cut_marker(store: StateStore) -> None:
    wf = WorkflowDefinition("flood", data_type=Data).add_step(StepDefinition("flood", "Flood", _flood))
    engine, iid, _ = _run(store, wf)
    try:
        (log,) = store.read_logs(iid, "flood")
        kept = sum(len(text) + 1 for _, _, text in log.lines)
        assert kept <= LIMIT
        assert kept + log.cut == 3 * 1024 * 1024 + len("the last line\n")
        assert log.lines[-1][2] == "the last line"
    finally:
        engine.close()


def test_logs_are_removed_with_their_run(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "runs.sqlite")
    wf = WorkflowDefinition("talker", data_type=Data).add_step(StepDefinition("talk", "Talk", _talk))
    engine, iid, _ = _run(store, wf)
    engine.close()
    try:
        assert store.read_logs(iid)
        store.delete(iid)
        assert store.read_logs(iid) == []
    finally:
        store.close()


def _announce_then_wait(ctx: WorkflowContext[Data]) -> None:
    print("started", flush=True)
    wait_for(ctx.data.value)
    print("finished")


def test_lines_are_published_while_the_attempt_runs(tmp_path: Path) -> None:
    marker = tmp_path / "go"
    wf = WorkflowDefinition("live", data_type=Data).add_step(StepDefinition("slow", "Slow", _announce_then_wait))
    with WorkflowEngine(max_workers=1, grace_period=1.0) as engine:
        seen = collect(engine)
        engine.register_workflow(wf)
        iid = engine.start_workflow(wf.id, Data(value=str(marker)))

        def published() -> list[str]:
            return [text for e in list(seen) if isinstance(e, events.StepOutput) for _, _, text in e.lines]

        wait_until(lambda: "started" in published(), timeout=30, what="the line printed before the step waits")
        assert engine.get_status(iid).step_states["slow"].status.name == "RUNNING"
        marker.touch()
        engine.wait_for_completion(iid, timeout=60)
        engine.event_bus.flush()
        assert published() == ["started", "finished"]  # each line once
        (log,) = engine.store.read_logs(iid)
        assert [text for _, _, text in log.lines] == ["started", "finished"]


def _fail_until_fifth(ctx: WorkflowContext[Data]) -> None:
    print(f"attempt {ctx.attempt}")
    if ctx.attempt < 5:
        raise RuntimeError("not yet")


def test_logs_are_kept_for_the_attempts_the_history_keeps(store: StateStore, monkeypatch: pytest.MonkeyPatch) -> None:
    from wfaas import verdicts

    monkeypatch.setattr(verdicts, "HISTORY_KEPT", 2)
    wf = WorkflowDefinition("retried", data_type=Data).add_step(
        StepDefinition("flaky", "Flaky", _fail_until_fifth).with_retry(RetryPolicy(max_attempts=5))
    )
    engine, iid, _ = _run(store, wf)
    try:
        assert [a.number for a in engine.get_status(iid).step_states["flaky"].history] == [4, 5]
        assert [(log.attempt, log.lines[0][2]) for log in store.read_logs(iid)] == [(4, "attempt 4"), (5, "attempt 5")]
    finally:
        engine.close()


LEFTOVER = textwrap.dedent(
    """
    import os, subprocess, sys, time
    from dataclasses import dataclass
    from wfaas import StepDefinition, WorkflowData, WorkflowDefinition, WorkflowEngine

    @dataclass
    class D(WorkflowData):
        folder: str = ""

    def leave_a_child(ctx):
        go, done = os.path.join(ctx.data.folder, "go"), os.path.join(ctx.data.folder, "done")
        script = f"while [ ! -e {go} ]; do sleep 0.01; done; echo late from a child; touch {done}"
        subprocess.Popen(["sh", "-c", script])

    if __name__ == "__main__":
        folder = sys.argv[1]
        with WorkflowEngine(max_workers=1) as engine:
            engine.register_workflow(WorkflowDefinition("leftover", data_type=D).add_step(
                StepDefinition("leave", "Leave a child", leave_a_child)))
            iid = engine.start_workflow("leftover", D(folder=folder))
            engine.wait_for_completion(iid, timeout=60)
            open(os.path.join(folder, "go"), "w").close()  # the attempt is over: the child prints now
            deadline = time.monotonic() + 60
            while not os.path.exists(os.path.join(folder, "done")) and time.monotonic() < deadline:
                time.sleep(0.01)
            print(engine.store.read_logs(iid))
    """
)


def test_what_a_leftover_child_prints_between_attempts_reaches_the_workers_stderr(tmp_path: Path) -> None:
    # Before: the line went into the capture pipe while no attempt ran, and was dropped.
    (tmp_path / "leftover.py").write_text(LEFTOVER)
    result = subprocess.run(
        [sys.executable, "leftover.py", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "late from a child" in result.stderr
    assert "late from a child" not in result.stdout  # nor in the attempt's log, printed there


CRASH = textwrap.dedent(
    """
    import multiprocessing
    from wfaas.capture import Capture

    def worker():
        Capture()
        raise RuntimeError("the worker's own failure")

    if __name__ == "__main__":
        process = multiprocessing.get_context("forkserver").Process(target=worker)
        process.start()
        process.join()
    """
)


def test_a_worker_traceback_outside_any_attempt_reaches_its_stderr(tmp_path: Path) -> None:
    (tmp_path / "crash.py").write_text(CRASH)
    result = subprocess.run([sys.executable, "crash.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "RuntimeError: the worker's own failure" in result.stderr
