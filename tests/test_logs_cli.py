"""Logs and tracebacks through the real CLI (API.md §13): logs, run's output and traceback, status --step, -v."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import read_pty, reap, wait_until

CLI = [sys.executable, "-m", "wfaas.command_line"]

PROGRAM = textwrap.dedent(
    """
    import os, sys, time
    from dataclasses import dataclass
    from wfaas import RetryPolicy, StepDefinition, WorkflowData, WorkflowDefinition

    @dataclass
    class Order(WorkflowData):
        count: str = "three"
        total: int = 0
        marker: str = ""

    def fetch(ctx):
        print("fetching 3 records")
        print("slow server", file=sys.stderr)
        os.write(1, b"raw line from fd 1\\n")
        print("\\x1b[2J\\x1b[Hscreen cleared")
        ctx.logger.info("fetched in 0.2 s")

    def wait(ctx):
        print("waiting for the marker")
        deadline = time.monotonic() + 60
        while ctx.data.marker and not os.path.exists(ctx.data.marker) and time.monotonic() < deadline:
            time.sleep(0.01)
        print("waited")

    def parse(ctx):
        ctx.logger.warning("count is a string: %r", ctx.data.count)
        ctx.data.total = double(ctx.data.count)

    def double(value):
        return int(value) * 2

    workflow = (
        WorkflowDefinition("orders", data_type=Order)
        .add_step(StepDefinition("fetch", "Fetch", fetch))
        .add_step(StepDefinition("wait", "Wait", wait).depends_on("fetch"))
        .add_step(
            StepDefinition("parse", "Parse", parse).depends_on("wait").with_retry(RetryPolicy(max_attempts=2))
        )
    )
    """
)

LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d\d\d (\S+) (\d+) (.*)$")


@pytest.fixture
def program(tmp_path: Path) -> Path:
    path = tmp_path / "orders.py"
    path.write_text(PROGRAM)
    return path


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def run_failing(program: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], str]:
    result = cli("run", f"{program}:workflow", *extra, cwd=program.parent)
    assert result.returncode == 1, result.stdout + result.stderr
    iid = result.stdout.splitlines()[0].split()[1]
    return result, iid


def test_run_prints_steps_output_prefixed_and_the_failed_steps_traceback(program: Path) -> None:
    result, _ = run_failing(program)
    out, err = result.stdout, result.stderr
    for text in ("fetching 3 records", "slow server", "raw line from fd 1"):
        assert re.search(rf"^\d\d:\d\d:\d\d fetch \| {text}$", out, re.M), out
    assert re.search(r"^\d\d:\d\d:\d\d parse \| WARNING: count is a string: 'three'$", out, re.M), out
    assert "fetched in 0.2 s" not in out  # an INFO record: shown with -v only
    assert "traceback of step parse (attempt 2):" in err
    assert f'File "{program}", line 28, in parse' in err
    assert "return int(value) * 2" in err
    assert "ValueError: invalid literal for int() with base 10: 'three'" in err
    assert "_worker.py" not in err


def test_verbose_and_log_level_choose_the_records_shown(program: Path) -> None:
    verbose, _ = run_failing(program, "-v")
    assert re.search(r"fetch \| INFO: fetched in 0.2 s$", verbose.stdout, re.M), verbose.stdout
    quiet, _ = run_failing(program, "--log-level", "error")
    assert "count is a string" not in quiet.stdout
    assert "fetching 3 records" in quiet.stdout  # printed lines are always shown


def test_logs_prints_every_attempts_lines_with_time_step_and_attempt(program: Path) -> None:
    _, iid = run_failing(program)
    result = cli("logs", iid[:6], cwd=program.parent)
    assert result.returncode == 0, result.stderr
    lines = [LINE.match(line) for line in result.stdout.splitlines()]
    assert all(lines), result.stdout
    seen = [(m.group(1), int(m.group(2)), m.group(3)) for m in lines if m]
    assert seen == [
        ("fetch", 1, "fetching 3 records"),
        ("fetch", 1, "slow server"),
        ("fetch", 1, "raw line from fd 1"),
        ("fetch", 1, "screen cleared"),  # click drops escape sequences when stdout is not a terminal
        ("wait", 1, "waiting for the marker"),
        ("wait", 1, "waited"),
        ("parse", 1, "WARNING: count is a string: 'three'"),
        ("parse", 2, "WARNING: count is a string: 'three'"),
    ]
    one = cli("logs", iid, "parse", "--attempt", "2", "-v", cwd=program.parent)
    assert [LINE.match(x).group(2) for x in one.stdout.splitlines()] == ["2"]  # type: ignore[union-attr]
    verbose = cli("logs", iid, "fetch", "-v", cwd=program.parent)
    assert "fetch 1 INFO: fetched in 0.2 s" in verbose.stdout
    missing = cli("logs", iid, "nosuch", cwd=program.parent)
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"Error: run {iid} has no step 'nosuch'; its steps: fetch, wait, parse"


def _reader(fd: int) -> Callable[[], str]:
    """A non-blocking reader of a child's output: each call returns everything read so far."""
    os.set_blocking(fd, False)
    seen = ""

    def read() -> str:
        nonlocal seen
        try:
            while chunk := os.read(fd, 65536):
                seen += chunk.decode()
        except BlockingIOError:
            pass
        return seen

    return read


def test_logs_follow_streams_a_run_in_progress_and_ends_with_it(program: Path, tmp_path: Path) -> None:
    marker = tmp_path / "go"
    run = subprocess.Popen(
        [*CLI, "run", f"{program}:workflow", "--data", json.dumps({"marker": str(marker)})],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    follow = None
    try:
        assert run.stdout is not None
        run_out = _reader(run.stdout.fileno())
        first = wait_until(lambda: re.match(r"run (\w+)\n", run_out()), timeout=60, what="the run's id")
        iid = first.group(1)
        # The run shows a step's line while the step still runs.
        wait_until(lambda: re.search(r"wait \| waiting for the marker", run_out()), timeout=60, what="the live line")
        assert "waited" not in run_out()
        follow = subprocess.Popen(
            [*CLI, "logs", iid, "--follow"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert follow.stdout is not None
        read = _reader(follow.stdout.fileno())
        wait_until(lambda: "raw line from fd 1" in read(), timeout=60, what="fetch's lines while the run waits")
        assert follow.poll() is None, "follow goes on while the run does"
        assert "waited" not in read()
        marker.touch()
        follow.wait(timeout=60)
        assert follow.returncode == 0
        seen = read()
        assert "wait 1 waited" in seen and "parse 2 WARNING: count is a string" in seen
        run.wait(timeout=60)
    finally:
        reap(run)
        if follow is not None:
            reap(follow)
            if follow.stderr is not None:
                follow.stderr.close()


def test_status_step_shows_attempts_with_errors_and_tracebacks(program: Path) -> None:
    _, iid = run_failing(program)
    result = cli("status", iid, "--step", "parse", cwd=program.parent)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("Traceback (most recent call last):") == 2
    assert "attempt 1: failed" in out and "attempt 2: failed" in out
    assert "error: ValueError: invalid literal for int() with base 10: 'three'" in out
    assert "return int(value) * 2" in out
    whole = json.loads(cli("status", iid, "--json", cwd=program.parent).stdout)
    tb = whole["steps"]["parse"]["history"][-1]["traceback"]
    assert tb.startswith("Traceback") and "line 31, in double" in tb
    assert whole["steps"]["fetch"]["history"][0]["traceback"] is None
    step = json.loads(cli("status", iid, "--step", "parse", "--json", cwd=program.parent).stdout)
    assert step["history"][0]["traceback"].startswith("Traceback")


def test_on_a_terminal_step_output_appears_above_the_live_panel_prefixed(program: Path) -> None:
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [*CLI, "run", f"{program}:workflow"],
        cwd=program.parent,
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        env={**os.environ, "COLUMNS": "80", "TERM": "xterm"},
    )
    os.close(secondary)
    try:
        seen = read_pty(primary, proc, 90)
        proc.wait(timeout=30)
    finally:
        os.close(primary)
        reap(proc)
    text = seen.decode(errors="replace")
    assert proc.returncode == 1, text[-3000:]
    assert "steps done" in text  # the live panel was drawn
    for printed in ("fetching 3 records", "slow server", "raw line from fd 1"):
        # Every time the text reached the terminal, it came with its step's prefix: never raw from a worker.
        assert text.count(printed) == text.count(f"fetch | {printed}") >= 1, text[-3000:]
    assert "fetch | screen cleared" in text and "\x1b[2J" not in text  # a step cannot clear the screen
    assert "traceback of step parse (attempt 2):" in text
