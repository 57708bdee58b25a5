"""Bad stores through the real CLI: damaged records, foreign databases, stores others could write, no store.

Each case is what a user sees from `wfaas-local` (a real process): one line
naming the file, the run and what to do, exit 2, no traceback; the damage
stays with the run whose record is bad; the file is left as it was.
"""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from wfaas import (
    SqliteStore,
    StepDefinition,
    StepFailed,
    StepState,
    StepStatus,
    StoreError,
    WorkflowDefinition,
    WorkflowEngine,
    WorkflowState,
    WorkflowStatus,
)

from conftest import Data

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "wfaas.command_line"]
S, W = StepStatus, WorkflowStatus


def cli(*args: str, cwd: Path, umask: int | None = None) -> subprocess.CompletedProcess[str]:
    # The tests folder on the path: the runs' data class is conftest.Data.
    path = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": path, "COLUMNS": "200"},
        preexec_fn=None if umask is None else (lambda: os.umask(umask)),
    )


def one_line_error(result: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def three_runs(tmp_path: Path) -> Iterator[Path]:
    """A store holding runs aaa (oldest), bbb and ccc (newest), all COMPLETED."""
    path = tmp_path / "runs.sqlite"
    store = SqliteStore(path)
    start = datetime.now(UTC)
    for i, iid in enumerate(["aaa", "bbb", "ccc"]):
        store.save(
            WorkflowState(
                instance_id=iid,
                workflow_id="wf",
                status=W.COMPLETED,
                data=Data(n=i, items={"k": i}),
                step_states={"a": StepState(S.SUCCEEDED, 1)},
                created_at=start + timedelta(seconds=i),
            )
        )
    store.close()
    yield path


def damage(path: Path, sql: str, *args: object) -> None:
    """Change the file with SQLite itself: the file stays sound, only wfaas's bytes are wrong."""
    with sqlite3.connect(path) as conn:
        conn.execute(sql, args)
    conn.close()
    with sqlite3.connect(path) as check:
        assert check.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    check.close()


def test_a_truncated_value_fails_only_its_run(three_runs: Path, tmp_path: Path) -> None:
    store = str(three_runs)
    damage(three_runs, "UPDATE wfaas SET value = substr(value, 1, 20) WHERE key = 'm/bbb'")
    damage(three_runs, "UPDATE wfaas SET value = substr(value, 1, 9) WHERE key = 'i/ccc/s/a'")

    listed = cli("list", "--store", store, cwd=tmp_path)
    line = one_line_error(listed)  # before the fix: UnpicklingError, a traceback, no list
    assert "bbb" in line and store in line, line
    assert "aaa" in listed.stdout and "ccc" in listed.stdout, listed.stdout

    for command in (["status", "bbb"], ["report", "bbb"], ["logs", "bbb"], ["resume", "bbb"], ["status", "ccc"]):
        line = one_line_error(cli(*command, "--store", store, cwd=tmp_path))
        assert command[1] in line and store in line and "damaged" in line, (command, line)
    ok = cli("status", "aaa", "--store", store, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    newest = cli("status", "--store", store, cwd=tmp_path)  # the newest run is damaged: say so, once
    assert newest.returncode == 2 and "ccc" in newest.stderr, newest.stderr


def test_a_garbled_key_fails_only_its_run(three_runs: Path, tmp_path: Path) -> None:
    store = str(three_runs)
    damage(three_runs, "UPDATE wfaas SET key = ? WHERE key = 'i/bbb/f/n'", "i/bbb/f/n\x00\x7f~garbled")
    damage(three_runs, "UPDATE wfaas SET key = ? WHERE key = 'i/ccc/x/class'", "i/ccc/\x01/class")
    for iid in ("bbb", "ccc"):
        line = one_line_error(cli("status", iid, "--store", store, cwd=tmp_path))
        assert iid in line and store in line and "damaged" in line, line
    ok = cli("status", "aaa", "--store", store, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert cli("list", "--store", store, cwd=tmp_path).returncode == 0


def test_a_sqlite_database_of_another_program_is_refused_and_left_untouched(tmp_path: Path) -> None:
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO users (name) VALUES ('ada')")
    conn.close()
    before = digest(other)
    workflow = f"{ROOT / 'examples' / 'quickstart.py'}:workflow"
    for command in (["run", workflow, "--data", '{"input": "hi"}'], ["list"], ["status"], ["resume", "x"]):
        line = one_line_error(cli(*command, "--store", str(other), cwd=tmp_path))
        assert "not a wfaas store" in line and str(other) in line, (command, line)
    assert digest(other) == before
    with sqlite3.connect(other) as conn:  # before the fix: a wfaas table beside users
        assert [n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")] == ["users"]
    conn.close()


@pytest.mark.parametrize(
    "command", [["status"], ["list"], ["report"], ["logs", "abc"], ["resume", "abc"], ["recover"], ["cancel", "abc"]]
)
def test_commands_that_read_never_create_a_store(tmp_path: Path, command: list[str]) -> None:
    line = one_line_error(cli(*command, cwd=tmp_path))
    # Before the fix: resume and recover made .wfaas/runs.sqlite here.
    assert not (tmp_path / ".wfaas").exists()
    assert "no wfaas store" in line and "--store" in line and "WFAAS_STORE" in line, line


def test_a_store_owned_by_another_user_is_refused_naming_the_owner(three_runs: Path, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    os.chown(three_runs, 65534, 65534)
    for command in (["status"], ["list"]):
        line = one_line_error(cli(*command, "--store", str(three_runs), cwd=tmp_path))
        assert "uid 65534" in line and "runs code" in line and str(three_runs) in line, line
    with pytest.raises(StoreError, match="uid 65534"):
        SqliteStore(three_runs, readonly=True)


def shared_group() -> int:
    """A group that is not the user's own private one (root may give a file any group)."""
    if os.geteuid() != 0:
        pytest.skip("giving a file to a shared group needs root")
    return 65534


@pytest.mark.parametrize("mode", [0o666, 0o620, 0o602])
def test_a_store_others_may_write_is_refused_naming_the_mode_and_the_fix(
    three_runs: Path, tmp_path: Path, mode: int
) -> None:
    if mode & 0o020:
        os.chown(three_runs, -1, shared_group())
    three_runs.chmod(mode)
    line = one_line_error(cli("status", "--store", str(three_runs), cwd=tmp_path))
    assert f"mode {mode:04o}" in line and f"chmod go-w {three_runs}" in line, line
    three_runs.chmod(0o600)
    assert cli("status", "--store", str(three_runs), cwd=tmp_path).returncode == 0


@pytest.mark.parametrize(("mode", "fix"), [(0o777, "chmod go-w"), (0o770, "chmod go-w"), (0o1777, "mkdir -m 700")])
def test_a_store_in_a_folder_others_may_write_is_refused(tmp_path: Path, mode: int, fix: str) -> None:
    folder = tmp_path / "shared"
    folder.mkdir()
    if mode == 0o770:
        os.chown(folder, -1, shared_group())
    folder.chmod(mode)
    path = folder / "runs.sqlite"
    with pytest.raises(StoreError) as caught:
        SqliteStore(path)
    message = str(caught.value)
    assert f"mode {mode:04o}" in message and str(folder) in message and fix in message, message
    assert not path.exists(), "nothing is created in a folder the store cannot trust"


def test_group_write_in_the_users_own_private_group_is_accepted(tmp_path: Path) -> None:
    # A umask of 002 with user-private groups (a common default) makes folders 0775: that group is the user.
    me = pwd.getpwuid(os.geteuid())
    group = grp.getgrgid(me.pw_gid)
    if group.gr_name != me.pw_name or set(group.gr_mem) - {me.pw_name}:
        pytest.skip(f"the user's group {group.gr_name} is not a private group")
    folder = tmp_path / "mine"
    folder.mkdir()
    folder.chmod(0o775)
    store = SqliteStore(folder / "runs.sqlite")
    store.close()
    (folder / "runs.sqlite").chmod(0o660)
    SqliteStore(folder / "runs.sqlite", readonly=True).close()


def test_new_store_folders_are_private_even_with_a_permissive_umask(tmp_path: Path) -> None:
    workflow = f"{ROOT / 'examples' / 'quickstart.py'}:workflow"
    ran = cli("run", workflow, "--data", '{"input": "hi"}', "--quiet", cwd=tmp_path, umask=0)
    assert ran.returncode == 0, ran.stderr
    assert stat.S_IMODE((tmp_path / ".wfaas").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / ".wfaas" / "runs.sqlite").stat().st_mode) == 0o600
    assert cli("list", cwd=tmp_path).returncode == 0


FAILING = """
from wfaas import StepDefinition, WorkflowDefinition
from conftest import Data

def boom(ctx):
    raise ValueError("no")

workflow = WorkflowDefinition("failing", data_type=Data).add_step(StepDefinition("boom", "boom", boom))
"""


def test_a_failure_with_an_in_memory_store_suggests_no_resume(tmp_path: Path) -> None:
    (tmp_path / "failing.py").write_text(FAILING)
    ran = cli("run", "failing.py:workflow", "--store", ":memory:", "--quiet", cwd=tmp_path)
    assert ran.returncode == 1, ran.stderr
    assert "wfaas-local resume" not in ran.stderr, ran.stderr  # before the fix: a resume that cannot work
    assert "cannot be resumed" in ran.stderr, ran.stderr


def put_item(ctx: object) -> None:
    ctx.data.items["x"] = 1  # type: ignore[attr-defined]


def fail_step(ctx: object) -> None:
    raise ValueError("fails on purpose")


def test_a_damaged_dict_key_fails_resume_and_status_of_its_run_only(three_runs: Path, tmp_path: Path) -> None:
    wf = WorkflowDefinition("keys", data_type=Data)
    wf.add_step(StepDefinition("put", "put", put_item))
    wf.add_step(StepDefinition("bad", "bad", fail_step).depends_on(["put"]))
    with WorkflowEngine(store=SqliteStore(three_runs), max_workers=1) as engine:
        engine.register_workflow(wf)
        iid = engine.start_workflow("keys", Data())
        with pytest.raises(StepFailed):
            engine.wait_for_completion(iid, timeout=60)
        engine.store.close()
    damage(three_runs, f"UPDATE wfaas SET value = substr(value, 1, 3) WHERE key LIKE 'i/{iid}/k/items/%'")
    with WorkflowEngine(store=SqliteStore(three_runs), max_workers=1) as engine:
        engine.register_workflow(wf)
        # Before the fix: a raw UnpicklingError from deep in resume.
        with pytest.raises(StoreError, match=f"run {iid}.*damaged"):
            engine.resume(iid)
        assert {s.instance_id for s in engine.store.list_all()} == {"aaa", "bbb", "ccc"}
        engine.store.close()
    line = one_line_error(cli("status", iid, "--store", str(three_runs), cwd=tmp_path))
    assert iid in line and "damaged" in line and str(three_runs) in line, line
