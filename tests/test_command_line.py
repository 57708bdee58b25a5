"""wfaas-local: every command and exit code, in-process with CliRunner and as real processes."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from wfaas.command_line import main

from conftest import read_pty, wait_until

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
CLI = [sys.executable, "-m", "wfaas.command_line"]

BLOCKING = textwrap.dedent(
    """
    import os, time
    from dataclasses import dataclass
    from wfaas import StepDefinition, WorkflowData, WorkflowDefinition

    @dataclass
    class D(WorkflowData):
        marker: str = ""

    def block(ctx):
        open(ctx.data.marker + ".pid", "w").write(str(os.getpid()))
        deadline = time.monotonic() + 120
        while not os.path.exists(ctx.data.marker) and time.monotonic() < deadline:
            time.sleep(0.01)

    workflow = WorkflowDefinition("blocking", data_type=D).add_step(StepDefinition("block", "Block", block))
    not_a_workflow = 42
    """
)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, *args: str) -> object:
    return runner.invoke(main, list(args), catch_exceptions=False)


def test_run_quickstart_prints_id_summary_and_data(runner: CliRunner, tmp_path: Path) -> None:
    store = str(tmp_path / "runs.sqlite")
    result = invoke(runner, "run", f"{EXAMPLES}/quickstart.py:workflow", "--data", '{"input": "Hi"}', "--store", store)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("run ")
    assert "COMPLETED" in result.output and "Processed: Hi" in result.output


def test_run_json_prints_the_final_state(runner: CliRunner, tmp_path: Path) -> None:
    store = str(tmp_path / "runs.sqlite")
    result = invoke(runner, "run", f"{EXAMPLES}/quickstart.py:workflow", "--json", "--store", store)
    assert result.exit_code == 0
    state = json.loads(result.stdout)
    assert state["status"] == "COMPLETED"
    assert state["steps"]["process"]["status"] == "SUCCEEDED"
    assert state["data"]["result"] == "Processed: Hello, World!"


@pytest.mark.parametrize(
    ("target", "data", "expected"),
    [
        ("no_such_module_xyz:workflow", None, "cannot import 'no_such_module_xyz'"),
        ("EXAMPLES/quickstart.py:nope", None, "has no attribute 'nope'; it defines: workflow"),
        ("EXAMPLES/quickstart.py:MyData", None, "not a WorkflowDefinition"),
        ("EXAMPLES/quickstart.py:workflow", '{"inptu": 1}', "has no field 'inptu'"),
        ("EXAMPLES/quickstart.py:workflow", "{not json", "not valid JSON"),
        ("EXAMPLES/quickstart.py:", None, "must look like"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(
    runner: CliRunner, tmp_path: Path, target: str, data: str | None, expected: str
) -> None:
    args = ["run", target.replace("EXAMPLES", str(EXAMPLES)), "--store", str(tmp_path / "s.sqlite")]
    if data:
        args += ["--data", data]
    result = runner.invoke(main, args)
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_failed_run_exits_1_then_resume_continues(runner: CliRunner, tmp_path: Path) -> None:
    store = str(tmp_path / "runs.sqlite")
    numbers = tmp_path / "numbers.txt"
    data = json.dumps({"input_file": str(numbers)})
    result = runner.invoke(main, ["run", f"{EXAMPLES}/resume.py:workflow", "--data", data, "--store", store])
    assert result.exit_code == 1
    iid = result.output.split()[1]
    assert f"wfaas-local resume {iid} --store {store}" in result.output
    assert "FAILED at step parse" in result.output
    numbers.write_text("1\n2\n3\n")
    result = invoke(runner, "resume", iid[:6], "--store", store)
    assert result.exit_code == 0, result.output
    state = json.loads(invoke(runner, "status", iid[:6], "--store", store, "--json").output)  # type: ignore[attr-defined]
    assert state["status"] == "COMPLETED" and state["data"]["total"] == 6
    assert state["steps"]["download"]["attempts"] == 1  # not run again
    assert state["steps"]["parse"]["attempts"] == 2


def test_status_list_and_id_prefixes(runner: CliRunner, tmp_path: Path) -> None:
    store = str(tmp_path / "runs.sqlite")
    ids = []
    for _ in range(3):
        out = invoke(runner, "run", f"{EXAMPLES}/quickstart.py:workflow", "--store", store, "--quiet").output  # type: ignore[attr-defined]
        ids.append(out.split()[1])
    listed = json.loads(invoke(runner, "list", "--store", store, "--json").output)  # type: ignore[attr-defined]
    assert [r["instance_id"] for r in listed] == ids[::-1]
    assert len(json.loads(invoke(runner, "list", "--store", store, "--json", "--limit", "2").output)) == 2  # type: ignore[attr-defined]
    assert json.loads(invoke(runner, "list", "--store", store, "--json", "--status", "failed").output) == []  # type: ignore[attr-defined]
    latest = json.loads(invoke(runner, "status", "--store", store, "--json").output)  # type: ignore[attr-defined]
    assert latest["instance_id"] == ids[-1]
    ambiguous = runner.invoke(main, ["status", "", "--store", store])
    assert ambiguous.exit_code == 2 and "ambiguous" in ambiguous.output
    unknown = runner.invoke(main, ["status", "zzzz", "--store", store])
    assert unknown.exit_code == 2 and "no run with id 'zzzz'" in unknown.output


def test_graph_check_and_plan(runner: CliRunner) -> None:
    target = f"{EXAMPLES}/dag.py:workflow"
    text = invoke(runner, "graph", target).output  # type: ignore[attr-defined]
    assert "combine ╌╌any╌╌▶ publish" not in text and "recompute ╌╌any╌╌▶ publish" in text
    assert "fetch_a ──all──▶ combine" in text
    dot = invoke(runner, "graph", target, "--dot").output  # type: ignore[attr-defined]
    assert dot.startswith('digraph "dag_example"') and "style=dashed" in dot
    check = invoke(runner, "check", f"{EXAMPLES}/batch_files.py:workflow")
    assert check.exit_code == 0 and "5 steps" in check.output  # type: ignore[attr-defined]
    plan = invoke(runner, "plan", target, "--data", '{"use_cache": true}').output  # type: ignore[attr-defined]
    assert "from_cache: run — after all of combine; run_if is true" in plan
    assert "recompute: skip" in plan
    assert "publish: run — after the first success of from_cache, recompute" in plan


def test_check_names_an_unsendable_body_as_register_workflow_does(runner: CliRunner, tmp_path: Path) -> None:
    """check encodes bodies with register_workflow's encoder, so both refuse a body in the same words."""
    (tmp_path / "unsendable_body.py").write_text(
        textwrap.dedent(
            """
            from wfaas import StepDefinition, StepResult, WorkflowDefinition

            def make():
                pending = (x for x in [1])  # a generator cannot be pickled

                def body(ctx):
                    return StepResult.SUCCESS if pending else StepResult.FAILURE

                return body

            workflow = WorkflowDefinition("unsendable").add_step(StepDefinition("held", "Held", make()))
            """
        )
    )
    from wfaas import WorkflowEngine
    from wfaas.cli_target import load_target
    from wfaas.errors import InvalidDefinition
    from wfaas.store import InMemoryStore

    definition = load_target(f"{tmp_path}/unsendable_body.py")
    with WorkflowEngine(store=InMemoryStore(), max_workers=1) as engine, pytest.raises(InvalidDefinition) as err:
        engine.register_workflow(definition)
    (problem,) = err.value.problems
    result = invoke(runner, "check", f"{tmp_path}/unsendable_body.py")
    assert result.exit_code == 2  # type: ignore[attr-defined]
    assert problem in result.output  # type: ignore[attr-defined]
    assert "step 'held'" in problem and "define it at module level" in problem


def test_version_and_help_examples(runner: CliRunner) -> None:
    assert "wfaas-local, version" in invoke(runner, "--version").output  # type: ignore[attr-defined]
    for command in ("run", "resume", "recover", "status", "report", "list", "cancel", "graph", "check", "plan"):
        assert "Example:" in invoke(runner, command, "--help").output  # type: ignore[attr-defined]


def _start(tmp_path: Path, *extra: str, **kw: object) -> subprocess.Popen[str]:
    (tmp_path / "blocking_wf.py").write_text(BLOCKING)
    data = json.dumps({"marker": str(tmp_path / "go")})
    return subprocess.Popen(
        [
            *CLI,
            "run",
            f"{tmp_path}/blocking_wf.py:workflow",
            "--data",
            data,
            "--store",
            str(tmp_path / "r.sqlite"),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kw,  # type: ignore[arg-type]
    )


def test_ctrl_c_cancels_prints_resume_and_exits_130(tmp_path: Path) -> None:
    proc = _start(tmp_path)
    pidfile = tmp_path / "go.pid"
    worker = int(wait_until(lambda: pidfile.exists() and pidfile.read_text(), 30, "the step to start"))
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130, out
    assert "wfaas-local resume" in out
    wait_until(lambda: not _alive(worker), 5, "the step's worker to be gone")


def test_cancel_from_another_process(tmp_path: Path, runner: CliRunner) -> None:
    proc = _start(tmp_path)
    wait_until((tmp_path / "go.pid").exists, 30, "the step to start")
    store = str(tmp_path / "r.sqlite")
    iid = json.loads(invoke(runner, "list", "--store", store, "--json").output)[0]["instance_id"]  # type: ignore[attr-defined]
    result = invoke(runner, "cancel", iid[:8], "--store", store)
    assert result.exit_code == 0 and "CANCELLED" in result.output  # type: ignore[attr-defined]
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "CANCELLED" in out
    finished = runner.invoke(main, ["cancel", iid, "--store", store])
    assert finished.exit_code == 2 and "already finished" in finished.output


def test_progress_on_a_terminal(tmp_path: Path) -> None:
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [*CLI, "run", f"{EXAMPLES}/batch_files.py:workflow", "--store", str(tmp_path / "r.sqlite")],
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        env={**os.environ, "COLUMNS": "100", "TERM": "xterm"},
    )
    os.close(secondary)
    seen = read_pty(primary, proc, 90)
    proc.wait(timeout=30)
    os.close(primary)
    text = seen.decode(errors="replace")
    assert proc.returncode == 0, text[-2000:]
    assert "steps done" in text  # the live panel: done/total
    assert "/5" in text
    assert "COMPLETED" in text


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.mark.parametrize(
    "name",
    # scheduled waits two real seconds for its scheduled_at
    [
        "quickstart",
        "dag",
        "batch_files",
        "flaky_service",
        "flaky_rows",
        pytest.param("scheduled", marks=pytest.mark.slow),
    ],
)
def test_examples_run_through_the_cli(name: str, tmp_path: Path) -> None:
    result = subprocess.run(
        ["wfaas-local", "run", f"examples/{name}.py:workflow", "--store", str(tmp_path / "r.sqlite")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "COMPLETED" in result.stdout


@pytest.mark.parametrize("name", ["quickstart", "dag", "flaky_service", "flaky_rows", "batch_files"])
def test_examples_run_as_scripts(name: str) -> None:
    result = subprocess.run(
        [sys.executable, f"examples/{name}.py"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "completed successfully via workflow" in result.stdout


def test_data_from_a_file(runner: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "in.json").write_text('{"input": "from a file"}')
    result = invoke(
        runner,
        "run",
        f"{EXAMPLES}/quickstart.py:workflow",
        "--data",
        f"@{tmp_path}/in.json",
        "--json",
        "--store",
        str(tmp_path / "r.sqlite"),
    )
    assert json.loads(result.stdout)["data"]["result"] == "Processed: from a file"  # type: ignore[attr-defined]
    missing = runner.invoke(main, ["run", f"{EXAMPLES}/quickstart.py:workflow", "--data", "@/no/such.json"])
    assert missing.exit_code == 2 and "cannot read the file" in missing.output


def test_recover_after_kill_9_of_a_run(tmp_path: Path, runner: CliRunner) -> None:
    proc = _start(tmp_path)
    wait_until((tmp_path / "go.pid").exists, 30, "the step to start")
    os.killpg(proc.pid, signal.SIGKILL)  # the whole `wfaas-local run`, no goodbye
    proc.communicate(timeout=30)
    store = str(tmp_path / "r.sqlite")
    (iid,) = [r["instance_id"] for r in json.loads(invoke(runner, "list", "--store", store, "--json").output)]  # type: ignore[attr-defined]
    assert json.loads(invoke(runner, "status", iid, "--store", store, "--json").output)["status"] == "RUNNING"  # type: ignore[attr-defined]
    (tmp_path / "go").touch()  # the interrupted step can finish this time
    result = subprocess.run([*CLI, "recover", "--store", store], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"recovered {iid}" in result.stdout and f"{iid}: COMPLETED" in result.stdout
    again = subprocess.run([*CLI, "recover", "--store", store], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "nothing to recover" in again.stdout


def test_batch_files_lists_the_folder_it_is_given_at_run_time(tmp_path: Path) -> None:
    """issue 12: the folder comes with --data, once, and is listed when the run gets there (any cwd)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import batch_files
    finally:
        sys.path.remove(str(EXAMPLES))
    batch_files.make_sample_files(tmp_path / "in", 3, seed=1)
    args = [*CLI, "run", f"{EXAMPLES}/batch_files.py", "--store", str(tmp_path / "r.sqlite"), "--quiet"]
    given = json.dumps({"folder": str(tmp_path / "in")})
    ran = subprocess.run([*args, "--data", given], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert (tmp_path / "in" / "report.txt").read_text().startswith("3 files, ")
    nowhere = json.dumps({"folder": str(tmp_path / "nowhere")})
    missing = subprocess.run([*args, "--data", nowhere], capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0
    assert f"no folder {tmp_path / 'nowhere'}; pass --data" in missing.stdout + missing.stderr


SEES_MODULES = textwrap.dedent(
    """
    import sys
    from dataclasses import dataclass, field
    from wfaas import StepDefinition, WorkflowData, WorkflowDefinition

    @dataclass
    class D(WorkflowData):
        seen: list = field(default_factory=list)

    def look(ctx):
        ctx.data.seen = [m for m in ("click", "wfaas.command_line") if m in sys.modules]

    workflow = WorkflowDefinition("modules", data_type=D).add_step(StepDefinition("look", "look", look))
    """
)


@pytest.mark.parametrize(
    "command", [["wfaas-local"], [sys.executable, "-m", "wfaas.command_line"]], ids=["script", "-m"]
)
def test_the_clis_workers_do_not_import_the_cli(tmp_path: Path, command: list[str]) -> None:
    """multiprocessing makes each process it starts import the parent's __main__: here click and the whole CLI.

    A worker runs the target's steps and never the command line; the import cost
    each worker and the guard about 0.1 s of CPU before the first step.
    """
    (tmp_path / "modules.py").write_text(SEES_MODULES)
    store = str(tmp_path / "r.sqlite")
    result = subprocess.run(
        [*command, "run", f"{tmp_path}/modules.py:workflow", "--json", "--store", store],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["data"]["seen"] == []


def test_status_json_text_is_exactly_what_json_dumps_indents() -> None:
    # status --json indents with json's C encoder (issue 17): the text must stay json.dumps(indent=2)'s.
    import random

    from wfaas.cli_items import indented

    class Key(str):
        pass

    plain = [None, True, False, 0, -3, 10**30, 1.5, 1e-7, float("nan"), float("inf"), "", 'é\n"]}{,', Key("k")]
    keys = ["a", "b", "ü", 1, 2.5, None, True, "x\ny", Key("sub")]
    rng = random.Random(17)

    def value(depth: int) -> Any:
        roll = rng.random()
        if depth > 18 or roll < 0.45:
            return rng.choice(plain)
        n = rng.randint(0, 5)
        if roll < 0.75:
            return {rng.choice(keys): value(depth + 1) for _ in range(n)}
        return [value(depth + 1) for _ in range(n)] if roll < 0.9 else tuple(value(depth + 1) for _ in range(n))

    for _ in range(1000):  # 12 s for 5,000 on this machine: the default suite's longest test by far
        obj = value(0)
        assert indented(obj) == json.dumps(obj, indent=2), obj
    deep: Any = 1
    for _ in range(40):  # deeper than the cached indents
        deep = {"d": [deep, 2]}
    assert indented(deep) == json.dumps(deep, indent=2)


def test_status_and_report_decode_with_the_garbage_collector_paused_then_restore_it(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gc

    from wfaas import cli_store

    store = str(tmp_path / "runs.sqlite")
    iid = invoke(runner, "run", f"{EXAMPLES}/quickstart.py:workflow", "--store", store, "--quiet").output.split()[1]  # type: ignore[attr-defined]
    seen: list[bool] = []
    load_run = cli_store.load_run

    def spy(*args: Any) -> Any:
        seen.append(gc.isenabled())
        return load_run(*args)

    monkeypatch.setattr("wfaas.command_line.load_run", spy)
    assert gc.isenabled()
    assert invoke(runner, "status", iid, "--store", store, "--json").exit_code == 0  # type: ignore[attr-defined]
    assert gc.isenabled()
    assert invoke(runner, "report", iid, "--store", store, "-o", str(tmp_path / "r.html")).exit_code == 0  # type: ignore[attr-defined]
    assert gc.isenabled()
    assert seen == [False, False]
