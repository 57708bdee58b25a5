"""SqliteStore: the StateStore API on a real file, the engine on it, file modes, pragmas, bad files, readers.

Everything here uses real SQLite files in ``tmp_path``. Bad-file cases are
opened in a fresh interpreter (as `wfaas-local` would): the check is what a
user sees — a ``StoreError`` naming the file, no traceback on stderr, no hang,
and the file left exactly as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pickle
import sqlite3
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from wfaas import (
    Attempt,
    FailureAction,
    InMemoryStore,
    NotFound,
    SqliteStore,
    StateStore,
    StepDefinition,
    StepFailed,
    StepResult,
    StepState,
    StepStatus,
    StoreError,
    WorkflowDefinition,
    WorkflowEngine,
    WorkflowState,
    WorkflowStatus,
)
from wfaas.sqlite_store import FORMAT_VERSION
from wfaas.store import Checkpoint

from conftest import Data, reap, wait_until

S, W = StepStatus, WorkflowStatus


# -- the StateStore API, on both stores ----------------------------------------------


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    if request.param == "memory":
        yield InMemoryStore()
        return
    st = SqliteStore(tmp_path / "runs.sqlite")
    yield st
    st.close()


def state(
    iid: str,
    status: WorkflowStatus = W.RUNNING,
    *,
    n: int = 0,
    created: datetime | None = None,
    steps: dict[str, StepState] | None = None,
    context: dict[str, Any] | None = None,
) -> WorkflowState[Data]:
    return WorkflowState(
        instance_id=iid,
        workflow_id="wf",
        status=status,
        data=Data(n=n, log=["x"], items={"k": n}),
        step_states=steps if steps is not None else {"a": StepState(S.SUCCEEDED, 1), "b": StepState()},
        created_at=created,
        context=context or {},
    )


def test_save_then_load_gives_back_the_whole_instance(store: StateStore) -> None:
    started = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    original = state("i1", W.FAILED, n=7, created=started, context={"token": "abc", "count": 3})
    original.error, original.failed_step = "boom", "b"
    original.step_states["b"] = StepState(S.FAILED, 2, started, started, "ValueError: boom")
    store.save(original)
    loaded = store.load("i1")
    assert loaded.instance_id == "i1"
    assert loaded.workflow_id == "wf"
    assert loaded.status is W.FAILED
    assert loaded.data == Data(n=7, log=["x"], items={"k": 7})
    assert loaded.error == "boom"
    assert loaded.failed_step == "b"
    assert loaded.created_at == started
    assert loaded.updated_at is not None
    assert loaded.context == {"token": "abc", "count": 3}
    assert loaded.step_states == original.step_states


def test_attempts_read_back_whole_from_this_versions_records_and_older_or_newer_ones(store: StateStore) -> None:
    started = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    attempt = Attempt(2, "failed", started, started, 0.5, 0.25, 1 << 20, 1.5, "retry", 0.1, 1, "SIGKILL", "e", "tb")
    original = state("i1", W.FAILED)
    original.step_states["b"] = StepState(S.FAILED, 2, started, started, "e", history=[attempt])
    store.save(original)
    (loaded,) = store.load("i1").step_states["b"].history
    assert loaded == attempt and repr(loaded) == repr(attempt) and loaded.to_record() == attempt.to_record()
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.wall = 1.0  # type: ignore[misc]
    older = Attempt.from_record({"number": 1, "outcome": "succeeded"})  # fields added since default
    assert older.to_record() == Attempt(1, "succeeded").to_record()
    assert Attempt.from_record({**attempt.to_record(), "added_later": 1}) == attempt


def test_save_replaces_what_was_there(store: StateStore) -> None:
    store.save(state("i1", n=1, context={"k": 1}))
    store.save(state("i1", W.COMPLETED, n=2, steps={"a": StepState(S.SUCCEEDED, 1)}))
    loaded = store.load("i1")
    assert loaded.status is W.COMPLETED
    assert loaded.data.n == 2
    assert loaded.context == {}
    # "Write a whole instance (replacing what was there)": a step the new state lacks is gone.
    assert list(loaded.step_states) == ["a"]


def test_update_applies_the_function_and_saves(store: StateStore) -> None:
    store.save(state("i1", n=1))

    def change(st: WorkflowState[Data]) -> None:
        st.data.n += 41
        st.data.items["new"] = True
        st.status = W.CANCELLED
        st.step_states["b"] = StepState(S.CANCELLED, 1)

    store.update("i1", change)
    loaded = store.load("i1")
    assert loaded.data.n == 42
    assert loaded.data.items == {"k": 1, "new": True}
    assert loaded.status is W.CANCELLED
    assert loaded.step_states["b"].status is S.CANCELLED


def test_unknown_ids_raise_not_found(store: StateStore) -> None:
    store.save(state("known"))
    with pytest.raises(NotFound, match="nope"):
        store.load("nope")
    with pytest.raises(NotFound, match="nope"):
        store.delete("nope")
    with pytest.raises(NotFound, match="nope"):
        store.update("nope", lambda s: None)
    with pytest.raises(NotFound, match="nope"):
        store.is_cancelled("nope")
    with pytest.raises(NotFound, match="nope"):
        store.get_context("nope")
    assert store.cleanup_if_terminal("nope") is False
    assert [s.instance_id for s in store.list_all()] == ["known"]


def test_delete_removes_only_that_instance(store: StateStore) -> None:
    store.save(state("i1"))
    store.save(state("i2"))
    store.delete("i1")
    with pytest.raises(NotFound):
        store.load("i1")
    assert store.load("i2").data.n == 0
    assert [s.instance_id for s in store.list_all()] == ["i2"]


def test_list_all_newest_first_and_list_active_leaves_finished_out(store: StateStore) -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    statuses = [W.PENDING, W.RUNNING, W.COMPLETED, W.FAILED, W.CANCELLED]
    for i, st in enumerate(statuses):
        store.save(state(f"i{i}", st, created=t0 + timedelta(minutes=i)))
    assert [s.instance_id for s in store.list_all()] == ["i4", "i3", "i2", "i1", "i0"]
    active = store.list_active()
    assert [s.instance_id for s in active] == ["i1", "i0"]
    assert all(s.data.items == {"k": 0} for s in active)


def test_is_cancelled(store: StateStore) -> None:
    store.save(state("c", W.CANCELLED))
    store.save(state("f", W.FAILED))
    store.save(state("r", W.RUNNING))
    assert store.is_cancelled("c") is True
    assert store.is_cancelled("f") is False
    assert store.is_cancelled("r") is False


def test_cleanup_old_workflows_removes_only_old_finished_instances(store: StateStore) -> None:
    for iid, st in [("done", W.COMPLETED), ("failed", W.FAILED), ("cancelled", W.CANCELLED), ("running", W.RUNNING)]:
        store.save(state(iid, st))
    now = datetime.now(UTC)
    assert store.cleanup_old_workflows(3600, now=now) == 0  # all updated just now
    later = now + timedelta(hours=2)
    assert store.cleanup_old_workflows(timedelta(hours=1), now=later) == 3
    assert [s.instance_id for s in store.list_all()] == ["running"]
    assert store.cleanup_old_workflows(0, now=later) == 0  # never removes a live instance


def test_get_context_reads_data_and_shared_values(store: StateStore) -> None:
    store.save(state("i1", n=5, context={"token": "abc"}))
    ctx = store.get_context("i1")
    assert ctx.instance_id == "i1"
    assert ctx.workflow_id == "wf"
    assert ctx.data.n == 5
    assert ctx.get("token") == "abc"
    assert ctx.get("missing", 9) == 9


def test_cleanup_if_terminal(store: StateStore) -> None:
    store.save(state("run", W.RUNNING))
    store.save(state("done", W.COMPLETED))
    assert store.cleanup_if_terminal("run") is False
    assert store.cleanup_if_terminal("done") is True
    assert store.cleanup_if_terminal("done") is False
    assert [s.instance_id for s in store.list_all()] == ["run"]


# -- SqliteStore on disk ---------------------------------------------------------------


def test_instances_survive_closing_and_reopening(tmp_path: Path) -> None:
    path = tmp_path / "runs.sqlite"
    first = SqliteStore(path)
    first.save(state("i1", W.FAILED, n=3, context={"k": [1, 2]}))
    first.close()
    second = SqliteStore(path)
    loaded = second.load("i1")
    assert (loaded.status, loaded.data.n, loaded.context) == (W.FAILED, 3, {"k": [1, 2]})
    second.close()
    # What another program sees: one row per record, the instance's meta under m/<id>.
    with sqlite3.connect(path) as conn:
        keys = {k for (k,) in conn.execute("SELECT key FROM wfaas")}
    assert "m/i1" in keys
    assert "wfaas/format" in keys
    assert {"i/i1/s/a", "i/i1/s/b"} <= keys


def test_new_store_files_are_private_to_the_owner(tmp_path: Path) -> None:
    old = os.umask(0)  # even with a permissive umask
    try:
        path = tmp_path / "sub" / "runs.sqlite"  # the missing directory is created
        st = SqliteStore(path)
        st.save(state("i1"))
        created = [path, Path(f"{path}-wal"), Path(f"{path}-shm")]
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in created if p.exists()}
        st.close()
    finally:
        os.umask(old)
    assert modes[path.name] == 0o600, modes
    assert all(mode == 0o600 for mode in modes.values()), modes


@pytest.mark.parametrize(("setting", "value"), [("NORMAL", 1), ("FULL", 2)])
def test_journal_mode_is_wal_and_synchronous_is_set_on_the_stores_connection(
    tmp_path: Path, setting: str, value: int
) -> None:
    path = tmp_path / "runs.sqlite"
    st = SqliteStore(path, synchronous=setting)
    st.save(state("i1"))
    try:
        # journal_mode=WAL is a property of the file: any connection sees it.
        with sqlite3.connect(path) as other:
            assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        # synchronous is per connection (a fresh one says FULL, 2): ask the store's own,
        # the one that commits the checkpoints.
        writer = st._writer._conn  # type: ignore[union-attr]
        assert writer.execute("PRAGMA synchronous").fetchone()[0] == value
        assert writer.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        st.close()


def test_synchronous_must_be_a_crash_safe_setting(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="synchronous"):
        SqliteStore(tmp_path / "runs.sqlite", synchronous="OFF")
    assert not (tmp_path / "runs.sqlite").exists()


def test_write_now_commits_in_the_callers_thread_yet_never_before_a_queued_write(tmp_path: Path) -> None:
    # Issue 17: the scheduler's commit that the next step waits on skips the hand-off to the writer
    # thread, but a transaction queued before it must still commit first (the file keeps the order).
    st = SqliteStore(tmp_path / "runs.sqlite")
    writer = st._writer
    assert writer is not None
    answers: list[tuple[int, Exception | None]] = []

    def meta(n: int) -> list[Checkpoint]:
        return [Checkpoint("i1", meta={"workflow_id": "wf", "status": "running", "n": n})]

    def done(error: Exception | None) -> None:
        answers.append((threading.get_ident(), error))

    try:
        st.write_now(meta(1), done)
        assert answers == [(threading.get_ident(), None)]  # committed, and answered, right here
        assert (st.read_meta("i1") or {})["n"] == 1
        gate, check = threading.Event(), writer._check
        writer._check = lambda: (gate.wait(5), check())[1]  # the writer thread holds its first job here
        st.write_async(meta(2), done)
        st.write_async(meta(3), done)  # queued behind it
        st.write_now(meta(4), done)  # queued too: it returns without an answer, and blocks nothing
        assert len(answers) == 1
        gate.set()
        wait_until(lambda: len(answers) == 4, 30)
        assert [error for _, error in answers] == [None] * 4
        assert threading.get_ident() not in {ident for ident, _ in answers[1:]}
        assert (st.read_meta("i1") or {})["n"] == 4  # the last one asked for is the last one committed
    finally:
        st.close()


def test_integrity_check_of_a_sound_store(tmp_path: Path) -> None:
    st = SqliteStore(tmp_path / "runs.sqlite")
    for i in range(20):
        st.save(state(f"i{i}", n=i))
    assert st.integrity_check() == "ok"
    st.close()


def test_read_only_store_reads_and_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "runs.sqlite"
    writer = SqliteStore(path)
    writer.save(state("i1", n=4))
    reader = SqliteStore(path, readonly=True)
    try:
        assert reader.load("i1").data.n == 4
        with pytest.raises(StoreError, match="read-only"):
            reader.save(state("i2"))
        writer.save(state("i1", n=5))
        assert reader.load("i1").data.n == 5  # sees commits made after it opened
    finally:
        reader.close()
        writer.close()


# -- the engine on a SqliteStore ----------------------------------------------------------


def put_key(ctx: Any) -> None:
    ctx.data.items[ctx.step_id] = len(ctx.step_id)


def start(ctx: Any) -> None:
    ctx.data.n = 1
    ctx.set("token", "t-1")


def total(ctx: Any) -> None:
    ctx.data.n = sum(ctx.data.items.values()) + (ctx.get("token") == "t-1")


def broken(ctx: Any) -> StepResult:
    raise ValueError("broken on purpose")


def test_engine_on_a_sqlite_store_runs_and_get_status_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "runs.sqlite"
    wf = WorkflowDefinition("durable", data_type=Data)
    wf.add_step(StepDefinition("start", "start", start))
    for sid in ("x", "yy", "zzz"):
        wf.add_step(StepDefinition(sid, sid, put_key).depends_on(["start"]))
    wf.add_step(StepDefinition("skipped", "skipped", put_key).depends_on(["start"]).run_if(lambda ctx: False))
    wf.add_step(
        StepDefinition("optional", "optional", broken)
        .depends_on(["start"])
        .with_failure_action(FailureAction.CONTINUE_NEXT_STEP)
    )
    wf.add_step(StepDefinition("total", "total", total).depends_on(["x", "yy", "zzz", "skipped", "optional"]))
    failing = WorkflowDefinition("failing", data_type=Data)
    failing.add_step(StepDefinition("ok", "ok", put_key))
    failing.add_step(StepDefinition("bad", "bad", broken).depends_on(["ok"]))
    failing.add_step(StepDefinition("never", "never", put_key).depends_on(["bad"]))

    with WorkflowEngine(store=SqliteStore(path), max_workers=2, grace_period=1.0) as engine:
        engine.register_workflow(wf)
        engine.register_workflow(failing)
        iid = engine.start_workflow("durable", Data())
        bad = engine.start_workflow("failing", Data())
        assert engine.wait_for_completion(iid, "d", timeout=60) == "d completed successfully via workflow"
        with pytest.raises(StepFailed, match="broken on purpose"):
            engine.wait_for_completion(bad, timeout=60)
        status = engine.get_status(iid)
        assert status.status is W.COMPLETED
        assert status.data.n == 1 + 2 + 3 + 1
        assert status.data.items == {"x": 1, "yy": 2, "zzz": 3}
        assert status.context == {"token": "t-1"}
        expected_steps = {
            "start": S.SUCCEEDED,
            "x": S.SUCCEEDED,
            "yy": S.SUCCEEDED,
            "zzz": S.SUCCEEDED,
            "skipped": S.SKIPPED,
            "optional": S.FAILED,
            "total": S.SUCCEEDED,
        }
        assert {sid: s.status for sid, s in status.step_states.items()} == expected_steps
        assert list(status.step_states) == list(expected_steps)  # definition order

        # A separate store on the same file, as another process would open it, sees the same.
        other = SqliteStore(path, readonly=True)
        try:
            from_file = other.load(iid)
            assert from_file.status is W.COMPLETED
            assert from_file.data == status.data
            assert {sid: s.status for sid, s in from_file.step_states.items()} == expected_steps
            failed = other.load(bad)
            assert failed.status is W.FAILED
            assert failed.failed_step == "bad"
            assert "broken on purpose" in (failed.error or "")
            assert failed.step_states["never"].status is S.PENDING
            assert failed.data.items == {"ok": 2}
            assert {s.instance_id for s in other.list_all()} == {iid, bad}
            assert other.list_active() == []
            assert other.integrity_check() == "ok"
        finally:
            other.close()


# -- bad files: a StoreError naming the file, never a traceback, a hang or a recreated store --

PROBE = textwrap.dedent(
    """
    import json, os, sys
    from wfaas import SqliteStore, StoreError
    path, options = sys.argv[1], json.loads(sys.argv[2])
    calls = options.pop("calls", ["list_all", "integrity_check"])
    damage = options.pop("damage_after_open", None)  # (bytes from the end, length): garbage written there
    if options.pop("as_nobody", False):  # a real unprivileged process (the test runs as root)
        os.setgid(65534)
        os.setuid(65534)
    try:
        store = SqliteStore(path, **options)
    except StoreError as exc:
        print(json.dumps({"outcome": "StoreError", "message": str(exc), "when": "open"}))
        sys.exit(0)
    if damage:
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) - damage[0])
            f.write(bytes(range(256)) * (damage[1] // 256))
    try:
        done = {}
        for call in calls:
            result = getattr(store, call)()
            done[call] = len(result) if isinstance(result, list) else result
    except StoreError as exc:
        print(json.dumps({"outcome": "StoreError", "message": str(exc), "when": call}))
    except Exception as exc:
        print(json.dumps({"outcome": type(exc).__name__, "message": str(exc), "when": call}))
    else:
        print(json.dumps({"outcome": "opened", **done}))
    store.close()
    """
)


def probe(tmp_path: Path, path: Path, timeout: float = 30, **options: Any) -> dict[str, Any]:
    """Open ``path`` with SqliteStore in a fresh interpreter (then call ``calls``): what it printed, and its stderr."""
    script = tmp_path / "probe_store.py"
    script.write_text(PROBE)
    try:
        proc = subprocess.run(
            [sys.executable, str(script), str(path), json.dumps(options)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd="/",
            # The data class (conftest.Data), and the wfaas under test (a PYTHONPATH given to the tests).
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
            },
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"opening/reading {path} hung: no answer in {timeout} s (stderr: {exc.stderr!r})"
        ) from None
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["stderr"] = proc.stderr
    return result


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_refused(result: dict[str, Any], path: Path) -> None:
    assert result["outcome"] == "StoreError", result
    assert str(path) in result["message"], result
    assert "Traceback" not in result["stderr"], f"a traceback reached the user:\n{result['stderr']}"


def filled_store(path: Path, instances: int = 40) -> None:
    st = SqliteStore(path)
    for i in range(instances):
        st.save(state(f"i{i:02d}", W.COMPLETED, n=i))
        st.update(f"i{i:02d}", lambda s: setattr(s.data, "value", "x" * 3000))
    st.close()
    assert not Path(f"{path}-wal").exists()  # checkpointed into the main file on close


def test_a_file_that_is_not_sqlite_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("my notes, not a database\n" * 50)
    before = digest(path)
    result = probe(tmp_path, path)
    assert_refused(result, path)
    assert "not a wfaas store" in result["message"] or "not an SQLite" in result["message"]
    assert digest(path) == before


def test_a_sqlite_header_followed_by_garbage_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "runs.sqlite"
    path.write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 32)
    before = digest(path)
    result = probe(tmp_path, path)
    assert_refused(result, path)
    assert digest(path) == before


def damaged_store(path: Path) -> str:
    """A store whose first page (the schema) is intact but whose data pages are garbage; returns its digest."""
    filled_store(path)
    raw = bytearray(path.read_bytes())
    assert len(raw) > 20 * 4096
    raw[-10 * 4096 : -2 * 4096] = bytes(range(256)) * 128
    path.write_bytes(bytes(raw))
    return digest(path)


def test_a_store_with_damaged_data_pages_is_refused_when_read(tmp_path: Path) -> None:
    path = tmp_path / "runs.sqlite"
    before = damaged_store(path)
    result = probe(tmp_path, path, calls=["list_all"])
    # Refused at open, or when read: never a raw sqlite3 error or a traceback.
    assert_refused(result, path)
    assert digest(path) == before


def test_integrity_check_reports_a_damaged_store_instead_of_hanging(tmp_path: Path) -> None:
    path = tmp_path / "runs.sqlite"
    before = damaged_store(path)
    result = probe(tmp_path, path, timeout=15, calls=["integrity_check"])
    if result["outcome"] == "opened":
        assert result["integrity_check"] != "ok"
        assert "Traceback" not in result["stderr"], result["stderr"]
    else:
        assert_refused(result, path)
    assert digest(path) == before


def test_integrity_check_reports_damage_that_appeared_after_the_store_was_opened(tmp_path: Path) -> None:
    # integrity_check() is the way to find out that a store went bad (a disk error, another
    # program writing into it): it must answer, not hang.
    path = tmp_path / "runs.sqlite"
    filled_store(path)
    assert path.stat().st_size > 20 * 4096
    result = probe(tmp_path, path, timeout=15, calls=["integrity_check"], damage_after_open=[10 * 4096, 8 * 4096])
    if result["outcome"] == "opened":
        assert result["integrity_check"] != "ok"
    else:
        assert_refused(result, path)
    assert "Traceback" not in result["stderr"], result["stderr"]


def test_a_directory_as_store_path_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "runs"
    folder.mkdir()
    result = probe(tmp_path, folder)
    assert_refused(result, folder)
    assert "directory" in result["message"]
    assert list(folder.iterdir()) == []


def test_a_store_written_by_a_newer_format_is_refused_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "runs.sqlite"
    filled_store(path, instances=3)
    with sqlite3.connect(path) as conn:  # what a future wfaas would have written
        conn.execute(
            "REPLACE INTO wfaas (key, value) VALUES (?, ?)", ("wfaas/format", pickle.dumps(FORMAT_VERSION + 1))
        )
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = digest(path)
    for options in ({}, {"readonly": True}):
        result = probe(tmp_path, path, **options)
        assert_refused(result, path)
        assert "newer" in result["message"]
    assert digest(path) == before
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM wfaas WHERE key LIKE 'm/%'").fetchone()[0] == 3


def test_a_read_only_open_of_a_missing_store_does_not_create_one(tmp_path: Path) -> None:
    path = tmp_path / "missing.sqlite"
    result = probe(tmp_path, path, readonly=True)
    assert_refused(result, path)
    assert not path.exists()


@pytest.fixture
def locked_dir() -> Iterator[Path]:
    """``<tmp>/ro`` without write permission, inside a directory any user can enter."""
    base = Path(tempfile.mkdtemp(prefix="wfaas-perm-"))
    base.chmod(0o755)
    (base / "ro").mkdir()
    (base / "rw").mkdir()
    # Writable by the probe, and by no one else: a store in a folder others may write is refused.
    (base / "rw").chmod(0o700)
    if os.geteuid() == 0:
        os.chown(base / "rw", 65534, 65534)
    yield base / "ro"
    (base / "ro").chmod(0o755)
    subprocess.run(["rm", "-rf", str(base)], check=True)


def unprivileged() -> dict[str, Any]:
    # Root may write anywhere, so a permission check run as root proves nothing: when the
    # tests run as root, the probe drops to uid/gid 65534 (nobody) after importing wfaas.
    return {"as_nobody": True} if os.geteuid() == 0 else {}


def test_a_new_store_in_a_directory_without_write_permission_is_refused(locked_dir: Path) -> None:
    work = locked_dir.parent
    writable = work / "rw" / "runs.sqlite"
    # The same (possibly unprivileged) probe can create a store where it may write ...
    assert probe(work, writable, **unprivileged())["outcome"] == "opened"
    locked_dir.chmod(0o555)
    path = locked_dir / "runs.sqlite"
    result = probe(work, path, **unprivileged())
    # ... and is refused where it may not.
    assert_refused(result, path)
    assert "permission" in result["message"] or "writable" in result["message"]
    assert list(locked_dir.iterdir()) == []


def test_an_existing_store_in_a_directory_without_write_permission_is_refused(locked_dir: Path) -> None:
    path = locked_dir / "runs.sqlite"
    filled_store(path, instances=2)
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)  # the user's own store, in a directory they cannot write
    locked_dir.chmod(0o555)
    before = digest(path)
    result = probe(locked_dir.parent, path, **unprivileged())
    assert_refused(result, path)
    # SQLite needs to create runs.sqlite-wal next to it: the user must be told it is about
    # the directory's permissions, not advised to move a damaged file aside.
    assert "permission" in result["message"] or "writable" in result["message"], result["message"]
    assert digest(path) == before


def test_a_read_only_open_in_a_directory_without_write_permission_never_calls_a_sound_store_damaged(
    locked_dir: Path,
) -> None:
    # `wfaas-local status` on a store the user may read but whose directory they cannot write
    # (another user's run folder, a read-only mount). SQLite's WAL wants runs.sqlite-shm there.
    path = locked_dir / "runs.sqlite"
    filled_store(path, instances=2)
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)
    locked_dir.chmod(0o555)
    before = digest(path)
    result = probe(locked_dir.parent, path, readonly=True, calls=["list_all"], **unprivileged())
    if result["outcome"] == "opened":
        assert result["list_all"] == 2
    else:
        # Refusing is acceptable; telling the user a sound store is damaged and to move it
        # aside ("its runs are lost") is not.
        assert_refused(result, path)
        assert "damaged" not in result["message"], result["message"]
        assert "permission" in result["message"] or "writable" in result["message"], result["message"]
    assert digest(path) == before


# -- another process reads while a run writes ------------------------------------------------

WRITER = textwrap.dedent(
    """
    import os, sys, time
    from dataclasses import dataclass, field
    from wfaas import SqliteStore, StepDefinition, WorkflowData, WorkflowDefinition, WorkflowEngine

    @dataclass
    class ChainData(WorkflowData):
        seen: list = field(default_factory=list)
        items: dict = field(default_factory=dict)

    def step(ctx):
        ctx.data.seen = ctx.data.seen + [ctx.step_id]
        ctx.data.items[ctx.step_id] = len(ctx.data.seen)

    def gate(ctx):
        # Holds the run open until the test has read the store mid-run.
        open(sys.argv[2] + ".started", "w").close()
        deadline = time.monotonic() + 60
        while not os.path.exists(sys.argv[2]):
            if time.monotonic() > deadline:
                raise TimeoutError("the test never released the gate")
            time.sleep(0.01)
        step(ctx)

    if __name__ == "__main__":
        wf = WorkflowDefinition("readers", data_type=ChainData)
        previous = None
        for i in range(30):
            sid = f"s{i:02d}"
            s = StepDefinition(sid, sid, gate if sid == "s10" else step)
            wf.add_step(s.depends_on([previous]) if previous else s)
            previous = sid
        with WorkflowEngine(store=SqliteStore(sys.argv[1]), max_workers=2) as engine:
            engine.register_workflow(wf)
            iid = engine.start_workflow("readers", ChainData())
            print(iid, flush=True)
            engine.wait_for_completion(iid, timeout=120)
    """
)


@contextlib.contextmanager
def writer_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, Path]]:
    """A process running a 30-step chain on ``runs.sqlite`` whose step s10 waits for the file ``release``."""
    path, release = tmp_path / "runs.sqlite", tmp_path / "release"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(path), str(release)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        iid = proc.stdout.readline().strip()  # printed once start_workflow returned: the run is committed
        assert iid, "the writer printed no instance id"
        yield proc, iid, release
    finally:
        release.touch()
        try:
            proc.wait(timeout=60)
        finally:
            reap(proc)


def succeeded(st: WorkflowState[Any]) -> list[str]:
    return [sid for sid, s in st.step_states.items() if s.status is S.SUCCEEDED]


def test_another_process_reads_the_store_while_a_run_writes_it(tmp_path: Path) -> None:
    with writer_process(tmp_path) as (proc, iid, release):
        reader = SqliteStore(tmp_path / "runs.sqlite", readonly=True)
        try:
            wait_until((tmp_path / "release.started").exists, 60, "the run to reach s10")

            def first_ten() -> WorkflowState[Any] | None:
                st = reader.load(iid)
                return st if len(succeeded(st)) == 10 else None

            mid = wait_until(first_ten, 10, "s00-s09 to be committed")
            assert mid.status is W.RUNNING
            assert mid.owner is not None
            assert mid.owner["pid"] == proc.pid
            assert succeeded(mid) == [f"s{i:02d}" for i in range(10)]
            assert mid.data.seen == succeeded(mid)
            release.touch()
            # Keep reading while the writer commits the remaining 20 steps.
            progress = set()

            def finished() -> bool:
                st = reader.load(iid)
                progress.add(len(succeeded(st)))
                return st.status is W.COMPLETED

            wait_until(finished, 60, "the run to complete, read from the other process")
            assert proc.wait(timeout=60) == 0
            final = reader.load(iid)
            assert final.data.seen == [f"s{i:02d}" for i in range(30)]
            assert final.data.items == {f"s{i:02d}": i + 1 for i in range(30)}
            assert final.owner is None
            assert max(progress) == 30
            assert reader.integrity_check() == "ok"
        finally:
            reader.close()


def test_a_running_step_is_visible_as_running_to_another_process(tmp_path: Path) -> None:
    with writer_process(tmp_path) as (_, iid, _release):
        reader = SqliteStore(tmp_path / "runs.sqlite", readonly=True)
        try:
            wait_until((tmp_path / "release.started").exists, 60, "step s10 to start")
            # s10 has been running (in a worker) since before the file appeared; its RUNNING
            # status and start time are a step change, to be committed like any other.
            seen = []

            def s10_running() -> StepState | None:
                step = reader.load(iid).step_states["s10"]
                seen.append(step.status.name)
                return step if step.status is S.RUNNING else None

            try:
                gate = wait_until(s10_running, 5, "the store to show s10 RUNNING")
            except AssertionError:
                raise AssertionError(
                    f"s10 runs in a worker, but for 5 s the store showed it as {sorted(set(seen))}, never RUNNING"
                ) from None
            assert gate.attempts == 1
            assert gate.started_at is not None
        finally:
            reader.close()


def test_the_file_keeps_sqlitedicts_layout(tmp_path: Path) -> None:
    # wfaas writes with the standard library's sqlite3 (README "Durability"); the file stays
    # what sqlitedict reads, so tools built on it keep working.
    from sqlitedict import SqliteDict

    path = tmp_path / "runs.sqlite"
    st = SqliteStore(path)
    st.save(state("i1", W.FAILED, n=3))
    st.close()
    with SqliteDict(str(path), tablename="wfaas", flag="r", journal_mode="WAL") as view:
        assert view["wfaas/format"] == FORMAT_VERSION
        assert view["m/i1"]["status"] == W.FAILED.value
        assert view["i/i1/s/a"]["status"] == S.SUCCEEDED.value


# -- dict fields, key by key (from test_basics) ----------------------------------------------


def put(key: str, value: Any) -> Any:
    def body(ctx: Any) -> None:
        ctx.data.items[key] = value

    return body


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
