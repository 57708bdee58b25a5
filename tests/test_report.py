"""`wfaas-local report`: one HTML file that shows a run, checked as a person would see it.

A real run (a retry, a timeout, a skipped step) is written to a real SQLite
store by ``wfaas-local run``; its report is read as HTML, and then opened in
headless Chromium (Debian's ``chromium``): a screenshot that must show the
outcome colours, the rendered page that must name every step, and no console
message. Where Chromium is not installed the browser tests are skipped with
the reason, except where ``WFAAS_REQUIRE_CHROMIUM=1`` (CI sets it) makes that
a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from wfaas import Attempt, StepState, StepStatus, WorkflowState, WorkflowStatus
from wfaas.report import COLOURS, DRAW_LIMIT, critical_path, dag_layout, drawn_steps, nice_step, render_report

from conftest import wait_until

CLI = [sys.executable, "-m", "wfaas.command_line"]
STEPS = ["fetch", "flaky", "hang", "optional", "join"]

WORKFLOW = textwrap.dedent(
    """
    import time
    from dataclasses import dataclass
    from pathlib import Path

    from wfaas import Backoff, FailureAction, RetryPolicy, StepDefinition, WorkflowData, WorkflowDefinition


    @dataclass
    class Data(WorkflowData):
        marker: str = ""
        gate: str = ""
        total: int = 0


    def fetch(ctx):
        time.sleep(0.1)
        ctx.data.total += 1


    def flaky(ctx):
        marker = Path(ctx.data.marker)
        if not marker.exists():
            marker.touch()
            raise ConnectionError("service unavailable")


    def hang(ctx):
        time.sleep(60)


    def join(ctx):
        gate = Path(ctx.data.gate)
        deadline = time.monotonic() + 60
        while ctx.data.gate and not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        ctx.data.total += 10


    workflow = (
        WorkflowDefinition("report-demo", data_type=Data)
        .add_step(StepDefinition("fetch", "Fetch", fetch))
        .add_step(
            StepDefinition("flaky", "Flaky", flaky)
            .depends_on("fetch")
            .with_retry(RetryPolicy(max_attempts=3, backoff=Backoff.fixed(0.3)))
        )
        .add_step(
            StepDefinition("hang", "Hang", hang)
            .depends_on("fetch")
            .with_timeout(0.5)
            .with_failure_action(FailureAction.CONTINUE_NEXT_STEP)
        )
        .add_step(StepDefinition("optional", "Optional", join).depends_on("fetch").run_if(lambda ctx: False))
        .add_step(StepDefinition("join", "Join", join).depends_on("flaky").depends_on_any(["hang", "optional"]))
    )
    """
)


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{args}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report of a finished run with a retry, a timeout and a skipped step."""
    where = tmp_path_factory.mktemp("report")
    (where / "demo.py").write_text(WORKFLOW)
    data = f'{{"marker": "{where / "failed-once"}"}}'
    cli("run", "demo.py:workflow", "--data", data, "--store", "runs.sqlite", "--quiet", cwd=where)
    cli("report", "--store", "runs.sqlite", "-o", "report.html", cwd=where)
    return where / "report.html"


class Elements(HTMLParser):
    """Every element's tag and attributes, and the page's text."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(html: str) -> Elements:
    parser = Elements()
    parser.feed(html)
    return parser


def with_class(page: Elements, tag: str, name: str) -> list[dict[str, str | None]]:
    return [a for t, a in page.elements if t == tag and name in (a.get("class") or "").split()]


def test_the_report_draws_every_step_attempt_wait_and_kill(report: Path) -> None:
    page = parse(report.read_text())
    rows = [a["data-step"] for a in with_class(page, "g", "row")]
    nodes = [a["data-step"] for a in with_class(page, "g", "node")]
    assert rows == STEPS and sorted(nodes) == sorted(STEPS)
    outcomes = {kind for kind in COLOURS if with_class(page, "g", kind)}
    assert {"succeeded", "failed", "timed_out"} <= outcomes
    assert with_class(page, "g", "wait"), "the retry's backoff is drawn as a wait"
    text = " ".join(page.text)
    assert re.search(r"✕ SIG(TERM|KILL)", text), "the timeout's kill is marked with its signal"
    assert len(with_class(page, "text", "note")) == 1  # "skipped" on the row of the step run_if skipped
    assert "service unavailable" in text  # the failed attempt's error, in its bar's tooltip


def test_the_report_is_one_self_contained_file(report: Path) -> None:
    page = parse(report.read_text())
    assert not [t for t, _ in page.elements if t in ("script", "link", "img", "iframe")]
    refs = [v for _, attrs in page.elements for k, v in attrs.items() if k in ("src", "href") and v]
    assert all(v.startswith("#") or v.startswith("url(#") for v in refs), refs


def test_status_json_has_the_figures_the_report_draws(report: Path) -> None:
    where = report.parent
    state = json.loads(cli("status", "--store", "runs.sqlite", "--json", cwd=where).stdout)
    hang = state["steps"]["hang"]["history"]
    assert [a["outcome"] for a in hang] == ["timed_out"] and hang[0]["signal"] in ("SIGTERM", "SIGKILL")
    flaky = state["steps"]["flaky"]["history"]
    assert [a["outcome"] for a in flaky] == ["failed", "succeeded"]
    assert flaky[1]["wait_kind"] == "backoff" and flaky[1]["waited"] >= 0.3


def test_a_run_in_progress_has_a_report(tmp_path: Path) -> None:
    (tmp_path / "demo.py").write_text(WORKFLOW)
    gate = tmp_path / "gate"
    data = f'{{"marker": "{tmp_path / "failed-once"}", "gate": "{gate}"}}'
    run = subprocess.Popen(
        [*CLI, "run", "demo.py:workflow", "--data", data, "--store", "runs.sqlite", "--quiet"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def join_is_running() -> bool:
            status = subprocess.run(
                [*CLI, "status", "--store", "runs.sqlite", "--json"], cwd=tmp_path, capture_output=True, text=True
            )
            return status.returncode == 0 and json.loads(status.stdout)["steps"]["join"]["status"] == "RUNNING"

        wait_until(lambda: (tmp_path / "runs.sqlite").exists() and join_is_running(), 60, "step join to run")
        cli("report", "--store", "runs.sqlite", "-o", "live.html", cwd=tmp_path)
        page = parse((tmp_path / "live.html").read_text())
        assert [a["data-step"] for a in with_class(page, "g", "row")] == STEPS
        assert with_class(page, "g", "running"), "the running step is drawn up to now"
        assert "RUNNING" in " ".join(page.text)
    finally:
        gate.touch()
        out, _ = run.communicate(timeout=60)
    assert run.returncode == 0, out


# -- in a browser ----------------------------------------------------------------------

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
]


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("WFAAS_REQUIRE_CHROMIUM") == "1":
            pytest.fail("WFAAS_REQUIRE_CHROMIUM=1 but chromium is not installed (apt-get install chromium)")
        pytest.skip("headless Chromium is not installed here: apt-get install chromium")
    return path


def open_in_chromium(page: Path, tmp_path: Path, *mode: str) -> tuple[str, list[str]]:
    """Run Chromium on a page: its output, and every console message it logged."""
    result = subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *mode, page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout, [line for line in result.stderr.splitlines() if ":CONSOLE" in line]


def test_the_console_check_catches_a_page_that_logs_an_error(tmp_path: Path) -> None:
    page = tmp_path / "bad.html"
    page.write_text('<p>x</p><script>console.error("something broke")</script>')
    _, console = open_in_chromium(page, tmp_path, "--dump-dom")
    assert any("something broke" in line for line in console)


def test_the_report_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    from PIL import Image

    dom, console = open_in_chromium(report, tmp_path, "--dump-dom")
    assert console == []
    rendered = parse(dom)
    assert [a["data-step"] for a in with_class(rendered, "g", "row")] == STEPS
    shot = tmp_path / "report.png"
    _, console = open_in_chromium(report, tmp_path, "--window-size=1280,1000", f"--screenshot={shot}")
    assert console == []
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 1000)
    colours = {colour for _, colour in image.getcolors(maxcolors=1 << 20) or []}
    for outcome in ("succeeded", "failed", "timed_out"):
        rgb = tuple(int(COLOURS[outcome][i : i + 2], 16) for i in (1, 3, 5))
        assert rgb in colours, f"no {outcome} bar visible in the screenshot"


# -- the geometry, without a run ------------------------------------------------------------


def _state(steps: dict[str, StepState]) -> WorkflowState[Any]:
    return WorkflowState("i" * 32, "w", WorkflowStatus.COMPLETED, None, steps)


def _done(start: datetime, seconds: float) -> StepState:
    end = start + timedelta(seconds=seconds)
    attempt = Attempt(1, "succeeded", start, end, wall=seconds)
    return StepState(StepStatus.SUCCEEDED, 1, start, end, history=[attempt])


def test_critical_path_follows_the_dependency_that_let_each_step_start() -> None:
    t = datetime(2026, 1, 1, tzinfo=UTC)
    steps = {
        "a": _done(t, 1),
        "slow": _done(t + timedelta(seconds=1), 5),
        "fast": _done(t + timedelta(seconds=1), 1),
        "first_of": _done(t + timedelta(seconds=2), 1),  # depends_on_any: the first to finish let it start
        "join": _done(t + timedelta(seconds=6), 1),
    }
    deps = {
        "a": ([], []),
        "slow": (["a"], []),
        "fast": (["a"], []),
        "first_of": ([], ["slow", "fast"]),
        "join": (["slow", "first_of"], []),
    }
    state = _state(steps)
    assert critical_path(state, deps) == ["a", "slow", "join"]
    deps["join"] = (["first_of"], [])
    assert critical_path(state, deps) == ["a", "fast", "first_of", "join"]


def test_a_large_run_draws_the_limit_even_when_its_critical_path_is_among_the_longest() -> None:
    t = datetime(2026, 1, 1, tzinfo=UTC)
    # Independent steps: the critical path is the step that finished last, which is also the longest.
    steps = {f"s{i:03d}": _done(t, 1 + i / 1000) for i in range(DRAW_LIMIT + 100)}
    drawn, note = drawn_steps(_state(steps), {sid: ([], []) for sid in steps})
    assert len(drawn.step_states) == DRAW_LIMIT
    assert note is not None and f"show {DRAW_LIMIT} of them" in note
    assert "s299" in drawn.step_states and "s000" not in drawn.step_states


def test_dag_columns_are_one_past_the_deepest_dependency() -> None:
    t = datetime(2026, 1, 1, tzinfo=UTC)
    state = _state({s: _done(t, 1) for s in ("a", "b", "c", "d")})
    nodes, edges, _, _ = dag_layout(state, {"a": ([], []), "b": (["a"], []), "c": ([], []), "d": (["b"], ["c"])})
    column = {n.step_id: n.x for n in nodes}
    assert column["a"] == column["c"] < column["b"] < column["d"]
    assert sorted(e.any_ for e in edges) == [False, False, True]


@pytest.mark.parametrize(("span", "step"), [(1.14, 0.2), (60, 10), (0.003, 0.0005), (3600, 500)])
def test_axis_ticks_are_round_numbers(span: float, step: float) -> None:
    assert nice_step(span) == pytest.approx(step)


def test_render_escapes_what_steps_and_errors_say() -> None:
    t = datetime(2026, 1, 1, tzinfo=UTC)
    step = _done(t, 1)
    step.error = "<script>alert(1)</script>"
    html = render_report(_state({"<b>x</b>": step}), {"<b>x</b>": ([], [])})
    assert "<script>" not in html and "&lt;script&gt;" in html and "&lt;b&gt;x&lt;/b&gt;" in html


def test_a_failed_attempts_traceback_is_on_its_bar_and_in_the_steps_table_escaped() -> None:
    t = datetime(2026, 1, 1, tzinfo=UTC)
    tb = 'Traceback (most recent call last):\n  File "steps.py", line 3, in parse\n    if a < b and "<i>":\n'
    tb += "ValueError: bad"
    failed = Attempt(1, "failed", t, t + timedelta(seconds=1), wall=1.0, error="ValueError: bad", traceback=tb)
    step = StepState(StepStatus.FAILED, 1, t, t + timedelta(seconds=1), error="ValueError: bad", history=[failed])
    html = render_report(_state({"parse": step}), {"parse": ([], [])})
    escaped = tb.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&#34;")
    assert "<i>" not in html
    title = re.search(r"<title>parse, attempt 1: failed.*?</title>", html, re.S)
    assert title is not None and escaped in title.group(0)  # the failed bar's tooltip
    row = re.search(r'<tr data-step="parse">.*?</tr>', html, re.S)
    assert row is not None and escaped in row.group(0)  # the steps table
