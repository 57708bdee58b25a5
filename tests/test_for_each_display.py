"""How a for_each step's items are shown (API.md §12, issue 12): status, --step, --json, the live progress,
the HTML report, graph/plan and logs, compact at 10,000 items.

The display reads states and events; it runs nothing. So these tests build the
states (written to a real SQLite store through its public ``save``) and the
events themselves, and need no worker process.
"""

from __future__ import annotations

import heapq
import io
import itertools
import json
import random
import re
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from rich.console import Console
from wfaas import Attempt, ItemState, SqliteStore, StepState, StepStatus, WorkflowState, WorkflowStatus, events
from wfaas._cli_logs import print_failed_traceback, print_logs
from wfaas.capture import OUTPUT, AttemptLog
from wfaas.cli_progress import Progress
from wfaas.command_line import main
from wfaas.report import COLOURS, _secs, render_report, summary
from wfaas.report_items import LANE_LIMIT, SINGLE_LIMIT, _pack, _Span

from conftest import Data
from test_report import open_in_chromium, parse, with_class

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
IID = "f" * 32
DEPS = {"list": ([], []), "clean": (["list"], []), "report": (["clean"], [])}


def _done_step(start: datetime, seconds: float) -> StepState:
    end = start + timedelta(seconds=seconds)
    return StepState(StepStatus.SUCCEEDED, 1, start, end, history=[Attempt(1, "succeeded", start, end, wall=seconds)])


def run_state(
    n: int, *, workers: int = 4, fail_every: int = 0, running: int = 0, key: str = "part-{:05d}.csv"
) -> WorkflowState[Any]:
    """A run list -> clean (for_each over ``n`` items on ``workers`` workers) -> report, as a scheduler
    would have checkpointed it: every ``fail_every``-th item failed its 3 attempts, one in 25 timed out
    once then succeeded, the last ``running`` items are running."""
    rnd = random.Random(n)
    free = [(1.0, w) for w in range(workers)]
    items: dict[str, ItemState] = {}
    for i in range(n):
        k = key.format(i)
        failing = bool(fail_every) and i % fail_every == fail_every - 1
        plan = ["failed"] * 3 if failing else (["timed_out", "succeeded"] if i % 25 == 7 else ["succeeded"])
        history: list[Attempt] = []
        t, w = heapq.heappop(free)
        if i >= n - running:
            items[k] = ItemState(k, StepStatus.RUNNING, 1, T0 + timedelta(seconds=t))
            heapq.heappush(free, (float("inf"), w))  # its worker stays busy
            continue
        for number, outcome in enumerate(plan, 1):
            wall = rnd.uniform(0.2, 2.0)
            start, end = T0 + timedelta(seconds=t), T0 + timedelta(seconds=t + wall)
            error = None if outcome == "succeeded" else f"ValueError: bad row {i} in {k}"
            tb = None if error is None else f'Traceback (most recent call last):\n  File "etl.py", line 9\n{error}'
            signal = "SIGKILL" if outcome == "timed_out" else None
            history.append(Attempt(number, outcome, start, end, wall, wall * 0.9, 40 << 20, error=error, traceback=tb))
            history[-1] = Attempt(**{**history[-1].to_record(), "signal": signal})
            t += wall
        heapq.heappush(free, (t, w))
        status = StepStatus.FAILED if failing else StepStatus.SUCCEEDED
        where = f"step 'clean' [{k}] (attempt 3) of instance {IID} of workflow 'etl': "
        items[k] = ItemState(
            k, status, len(history), history[0].started_at, history[-1].finished_at,
            where + history[-1].error if failing and history[-1].error else None, history,
        )  # fmt: skip
    end = max((i.finished_at for i in items.values() if i.finished_at), default=T0 + timedelta(seconds=1))
    failed = any(i.status is StepStatus.FAILED for i in items.values())
    clean = StepState(StepStatus.RUNNING, 0, T0 + timedelta(seconds=1), items=items)
    if not running:
        clean.status, clean.finished_at = (StepStatus.FAILED if failed else StepStatus.SUCCEEDED), end
        clean.error = "some items failed" if failed else None
    report = StepState() if running or failed else _done_step(end, 0.5)
    status = WorkflowStatus.RUNNING if running else WorkflowStatus.FAILED if failed else WorkflowStatus.COMPLETED
    steps = {"list": _done_step(T0, 1.0), "clean": clean, "report": report}
    return WorkflowState(IID, "etl", status, Data(), steps, created_at=T0, updated_at=end + timedelta(seconds=0.5))


@pytest.fixture
def saved(tmp_path: Path) -> Any:
    """Write a state to a real SQLite store through its public API; returns the store's path."""

    def save(state: WorkflowState[Any]) -> str:
        path = str(tmp_path / "runs.sqlite")
        store = SqliteStore(path)
        try:
            store.save(state)
        finally:
            store.close()
        return path

    return save


def cli(*args: str) -> Any:
    result = CliRunner(env={"COLUMNS": "80"}).invoke(main, list(args), catch_exceptions=False)
    return result


def fits(text: str, columns: int = 80) -> None:
    wide = [line for line in text.splitlines() if len(line) > columns]
    assert not wide, f"{len(wide)} lines wider than {columns} columns, e.g. {wide[0]!r}"


# -- status ------------------------------------------------------------------------------


def test_status_shows_a_for_each_step_as_one_line_with_its_failed_items_capped(saved: Any) -> None:
    store = saved(run_state(10_000, fail_every=700, running=2))  # 14 items failed
    result = cli("status", "--store", store)
    assert result.exit_code == 0, result.output
    out = result.output
    assert re.search(r"^  clean: \d+/10000 items done, 2 running, 14 failed$", out, re.M), out
    failed = re.findall(r"^    (part-\d{5}\.csv)  3 attempts  ValueError: bad row \d+ in \1$", out, re.M)
    assert len(failed) == 10 and failed[0] == "part-00699.csv", out  # the where-prefix is left out
    assert re.search(r"^    … and 4 more \(`wfaas-local status ffffffff --step clean` lists every item\)$", out, re.M)
    row = re.search(r"^clean\s+RUNNING\s+(\d+)\s", out, re.M)
    assert row is not None and int(row.group(1)) > 10_000  # the row sums its items' attempts
    assert len(out.splitlines()) < 30
    fits(out)


def test_status_of_an_ordinary_run_has_no_items_section(saved: Any) -> None:
    state = run_state(3)
    state.step_states["clean"] = _done_step(T0, 1.0)
    out = cli("status", "--store", saved(state)).output
    assert "items:" not in out and "items done" not in out


def test_status_step_lists_every_item_within_80_columns(saved: Any) -> None:
    store = saved(run_state(50, fail_every=20, key="a-rather-long-folder-name/with/a/file-{:03d}-of-the-batch.csv"))
    result = cli("status", "--store", store, "--step", "clean")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"step clean of etl {IID}: FAILED"
    assert lines[1] == "48/50 items done, 2 failed"
    rows = [line for line in lines if re.match(r"^…\S*\s+(SUCCEEDED|FAILED)\s+\d+\s+\d+\.\d\ds", line)]
    assert len(rows) == 50, result.output
    assert len({row.split()[0] for row in rows}) == 50  # long keys are cut where they differ: each stays apart
    assert "\n…ile-019-of-the-batch.csv   FAILED" in result.output
    assert any(re.search(r"FAILED\s+3\s+\d+\.\d\ds  ValueError: bad row 1", line) for line in rows)
    assert lines[-1] == "an item's tracebacks: wfaas-local status ffffffff --step 'clean[KEY]'"
    fits(result.output)


def test_status_step_of_one_item_shows_its_attempts_and_traceback(saved: Any) -> None:
    store = saved(run_state(30, fail_every=10))
    result = cli("status", "--store", store, "--step", "clean[part-00009.csv]")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"step clean[part-00009.csv] of etl {IID}: FAILED\n")
    assert len(re.findall(r"^attempt \d: failed", result.output, re.M)) == 3
    assert 'File "etl.py", line 9' in result.output
    as_json = json.loads(cli("status", "--store", store, "--step", "clean[part-00009.csv]", "--json").output)
    assert as_json["status"] == "FAILED" and len(as_json["history"]) == 3


def test_a_failed_run_prints_its_first_failed_items_traceback_and_the_commands_for_it() -> None:
    state = run_state(30, fail_every=10)
    state.status, state.failed_step = WorkflowStatus.FAILED, "clean"
    out = io.StringIO()
    print_failed_traceback(state, Console(file=out, width=200), " --store s.sqlite")
    text = out.getvalue()
    assert text.startswith("traceback of step clean[part-00009.csv] (attempt 3):\n"), text
    assert 'File "etl.py", line 9' in text
    assert f"wfaas-local logs {IID} 'clean[part-00009.csv]' --store s.sqlite" in text  # quoted: brackets glob


def test_status_step_of_an_unknown_item_is_one_line_exit_2(saved: Any) -> None:
    store = saved(run_state(5))
    result = CliRunner().invoke(main, ["status", "--store", store, "--step", "clean[nope]"])
    assert result.exit_code == 2
    assert "step 'clean' of run" in result.output and "has no item 'nope'" in result.output
    assert "Traceback" not in result.output


def test_status_json_carries_counts_and_every_item_one_per_line(saved: Any) -> None:
    """Tolerance: 5 s of CPU for reading, decoding and printing 10,000 items (about 1 s on an idle core)."""
    store = saved(run_state(10_000, fail_every=700, running=2))
    before = time.process_time()
    result = cli("status", "--store", store, "--json")
    cpu = time.process_time() - before
    assert result.exit_code == 0
    state = json.loads(result.output)
    clean = state["steps"]["clean"]
    assert (clean["items_total"], clean["items_failed"], clean["items_running"]) == (10_000, 14, 2)
    assert clean["items_done"] == 10_000 - 14 - 2
    assert list(clean["items"])[:2] == ["part-00000.csv", "part-00001.csv"]  # collection order
    item = clean["items"]["part-00699.csv"]
    assert item["status"] == "FAILED" and item["attempts"] == 3 and item["history"][2]["outcome"] == "failed"
    assert state["steps"]["list"]["items"] is None  # an ordinary step
    item_lines = [line for line in result.output.splitlines() if line.lstrip().startswith('"part-')]
    assert len(item_lines) == 10_000  # one line per item, not one per field
    assert len(result.output) < 7_000_000, len(result.output)  # 5.9 MB: about 590 bytes an item
    assert cpu < 5.0, f"{cpu:.2f} s"
    step_json = json.loads(cli("status", "--store", store, "--step", "clean", "--json").output)
    assert step_json["items_total"] == 10_000 and len(step_json["items"]) == 10_000


def test_status_json_of_a_for_each_step_whose_list_is_not_computed_yet(saved: Any) -> None:
    state = run_state(0, running=0)
    state.step_states["clean"] = StepState(StepStatus.PENDING, items={})
    result = cli("status", "--store", saved(state), "--json")
    clean = json.loads(result.output)["steps"]["clean"]
    assert clean["items"] == {} and clean["items_total"] == 0
    assert "\n  clean: list not computed yet\n" in cli("status", "--store", saved(state)).output
    listing = cli("status", "--store", saved(state), "--step", "clean").output
    assert listing.splitlines()[1] == "list not computed yet"
    assert "for each: list not computed yet" in render_report(state, DEPS)
    state.step_states["clean"] = StepState(StepStatus.SUCCEEDED, items={})  # an empty collection
    assert "\n  clean: no items\n" in cli("status", "--store", saved(state)).output


# -- the live progress --------------------------------------------------------------------


def item_events(n: int, fail: set[int], hold: int = 0) -> list[events.WorkflowEvent]:
    """Each item started then succeeded (or failed for good); the last ``hold`` only started."""
    now = datetime.now(UTC)
    out: list[events.WorkflowEvent] = []
    for i in range(n):
        key = f"k{i:05d}"
        out.append(events.StepStarted(IID, "etl", now, "clean", 1, item_key=key))
        if i >= n - hold:
            continue
        if i in fail:
            out.append(events.StepFailed(IID, "etl", now, "clean", 1, "ValueError: no", False, item_key=key))
        else:
            out.append(events.StepSucceeded(IID, "etl", now, "clean", 1, 0.01, item_key=key))
    return out


def screen(progress: Progress) -> str:
    out = Console(file=io.StringIO(), width=80, highlight=False)
    out.print(progress.render())
    text: str = out.file.getvalue()  # type: ignore[attr-defined]
    return text


def test_the_panel_counts_items_without_a_line_per_item() -> None:
    """Tolerance: 2 s for 20,000 events and 100 renders (about 0.05 s on an idle core)."""
    progress = Progress(3, live=False, quiet=True, console=Console(file=io.StringIO()))
    progress.items_total = lambda sid: 10_000
    began = time.process_time()
    for e in item_events(10_000, fail={3, 5000}, hold=4):
        progress(e)
    for _ in range(100):
        text = screen(progress)
    assert time.process_time() - began < 2.0
    assert re.search(r"^\s+clean\s+9994/10000 items\s+4 running, 2 failed\s*$", text, re.M), text
    assert len(text.splitlines()) == 2  # the run's line and the step's: no line per item
    assert progress.done == 0  # items are not steps
    for e in item_events(10_000, fail=set())[-8:]:  # the 4 running items end
        progress(e)
    assert progress.done == 1  # the step, once all its items ended
    progress(events.StepSucceeded(IID, "etl", datetime.now(UTC), "clean", 1, 9.0))  # and its own event, if sent
    assert progress.done == 1 and "clean" not in screen(progress)


def test_the_panel_total_is_asked_once_the_state_has_the_list() -> None:
    progress = Progress(3, live=False, quiet=True, console=Console(file=io.StringIO()))
    asked: list[str] = []
    totals = iter([0, 50])  # the first ask comes before the list is checkpointed

    def items_total(sid: str) -> int:
        asked.append(sid)
        return next(totals)

    progress.items_total = items_total
    for e in item_events(3, fail=set(), hold=1):
        progress(e)
    assert asked == ["clean"] and "2/? items" in screen(progress)  # not asked again within TOTAL_RETRY
    progress.items["clean"].asked -= 60
    progress(events.StepSucceeded(IID, "etl", datetime.now(UTC), "clean", 1, 0.01, item_key="k00002"))
    assert asked == ["clean", "clean"] and "3/50 items" in screen(progress)


def test_line_mode_prints_item_failures_and_each_tenth_done() -> None:
    buf = io.StringIO()
    progress = Progress(3, live=False, quiet=False, console=Console(file=buf, width=200, highlight=False))
    progress.items_total = lambda sid: 1000
    progress.release()
    for e in item_events(1000, fail={150}):
        progress(e)
    lines = [line.split(" ", 1)[1] for line in buf.getvalue().splitlines()]
    assert lines[1] == "clean[k00150]: attempt 1 failed: ValueError: no"  # after the first tenth
    tenths = [line for line in lines if line.startswith("clean: ")]
    assert len(tenths) == 10 and tenths[-1] == "clean: 999/1000 items done, 1 failed", lines
    assert len(lines) == 11


def test_a_resume_seeds_the_items_done_before_it() -> None:
    progress = Progress(3, live=False, quiet=True, console=Console(file=io.StringIO()))
    progress.seed(run_state(50, fail_every=10))
    assert "45/50 items" in screen(progress)
    retry = events.StepStarted(IID, "etl", datetime.now(UTC), "clean", 4, item_key="part-00009.csv")
    progress(retry)
    assert re.search(r"45/50 items\s+1 running$", screen(progress), re.M)


def test_an_items_output_is_prefixed_with_step_and_key() -> None:
    buf = io.StringIO()
    progress = Progress(3, live=False, quiet=False, console=Console(file=buf, width=200, highlight=False))
    progress.release()
    line = (time.time(), OUTPUT, "cleaned 17 rows")
    progress(events.StepOutput(IID, "etl", datetime.now(UTC), "clean", 1, (line,), item_key="b.csv"))
    assert buf.getvalue().rstrip().endswith("clean[b.csv] | cleaned 17 rows")


# -- the report --------------------------------------------------------------------------


def clean_row(html: str) -> str:
    match = re.search(r'<g class="row" data-step="clean"[^>]*>.*?\n  </g>', html, re.S)
    assert match is not None
    return match.group(0)


def test_the_report_packs_50_items_into_lanes_one_bar_per_attempt() -> None:
    state = run_state(50, fail_every=20, running=2)
    html = render_report(state, DEPS, now=state.updated_at)
    page = parse(html)
    assert [a["data-step"] for a in with_class(page, "g", "row")] == ["list", "clean", "report"]
    row = clean_row(html)
    attempts = sum(len(i.history) for i in (state.step_states["clean"].items or {}).values())
    assert row.count('<g class="bar ') - row.count('<g class="bar density') == attempts + 2  # + 2 running
    assert "clean[part-00019.csv], attempt 3: failed" in row and "ValueError: bad row 19" in row
    lanes = set(re.findall(r'<rect x="[\d.]+" y="([\d.]+)" width="[\d.]+" height="9" rx="1"', row))
    assert len(lanes) == 4  # four workers: four lanes
    assert "for each: 46/50 items" in row
    assert "<dt>for each</dt><dd>clean: 46/50 items</dd>" in html  # the summary
    assert 'class="failed-items"' in html and "part-00039.csv: step &#39;clean&#39;" in html


def test_the_reports_slowest_steps_and_critical_path_count_a_for_each_step_by_its_span_not_its_items_sum() -> None:
    state = run_state(50)
    clean = state.step_states["clean"]
    assert clean.started_at is not None and clean.finished_at is not None
    span = (clean.finished_at - clean.started_at).total_seconds()
    work = sum(a.wall or 0.0 for i in (clean.items or {}).values() for a in i.history)
    assert work > 2 * span  # 4 workers: the items' sum is work, not time
    bounds = (state.created_at or T0, state.updated_at or T0)
    figures = summary(state, DEPS, bounds)
    assert dict(figures["slowest"])["clean"] == _secs(span)
    assert dict(figures["critical_path"])["clean"] == _secs(span)


def test_the_report_at_10000_items_stays_small_and_fast() -> None:
    """Tolerance: 3 s of CPU to render (about 0.15 s on an idle core); 1 MB (about 0.5 MB)."""
    state = run_state(10_000, fail_every=100, workers=32)
    began = time.process_time()
    html = render_report(state, DEPS, now=state.updated_at)
    cpu = time.process_time() - began
    assert cpu < 3.0, f"{cpu:.2f} s"
    assert len(html) < 1_000_000, len(html)
    row = clean_row(html)
    assert row.count('<g class="bar ') < 3_000
    assert row.count('<g class="bar failed">') >= 100  # every item that failed for good keeps its own bars
    lanes = set(re.findall(r'<rect x="[\d.]+" y="([\d.]+)" width="[\d.]+" height="5" rx="1"', row))
    assert len(lanes) == LANE_LIMIT
    assert row.count('<g class="bar density">') > 100
    assert "for each: 9900/10000 items" in row


@pytest.mark.parametrize(("spans", "width"), [(60, 30.0), (400, 30.0)])
def test_lanes_hold_attempts_that_never_overlap_below_the_cap(spans: int, width: float) -> None:
    rnd = random.Random(7)
    starts = [rnd.uniform(0, 800) for _ in range(spans)]
    drawn = [_Span(str(i), "succeeded", x0, x0 + rnd.uniform(0.1, width), None) for i, x0 in enumerate(starts)]
    drawn.sort(key=lambda s: (s.x0, s.x1))
    at_once = max(sum(s.x0 <= t < s.x1 for s in drawn) for t in [s.x0 for s in drawn])
    lanes = _pack(drawn)
    assert sum(map(len, lanes)) == spans
    assert len(lanes) == min(at_once, LANE_LIMIT)
    if at_once <= LANE_LIMIT:
        for lane in lanes:
            assert all(a.x1 <= b.x0 for a, b in itertools.pairwise(lane))


@pytest.mark.parametrize("n", [50, 10_000])
def test_the_for_each_report_in_headless_chromium(n: int, tmp_path: Path) -> None:
    """The whole page renders without a console message; its timeline alone (no legend, badge or graph
    to lend it colours) shows each outcome's bars. Tolerance: 60 s for Chromium (about 2 s)."""
    from PIL import Image

    state = run_state(n, fail_every=20 if n == 50 else 100, running=2 if n == 50 else 0)
    html = render_report(state, DEPS, now=state.updated_at)
    page = tmp_path / f"report-{n}.html"
    page.write_text(html)
    began = time.monotonic()
    _, console = open_in_chromium(page, tmp_path, "--dump-dom")
    assert console == [] and time.monotonic() - began < 60
    timeline = re.search(r'<svg id="timeline".*?</svg>', html, re.S)
    style = re.search(r"<style>.*?</style>", html, re.S)
    assert timeline is not None and style is not None
    alone = tmp_path / "timeline.html"
    alone.write_text(f"<!DOCTYPE html><html><head>{style.group(0)}</head><body>{timeline.group(0)}</body></html>")
    shot = tmp_path / "timeline.png"
    _, console = open_in_chromium(alone, tmp_path, "--window-size=1280,400", f"--screenshot={shot}")
    assert console == []
    pixels = dict((colour, count) for count, colour in Image.open(shot).convert("RGB").getcolors(1 << 20) or [])
    for kind in ("succeeded", "failed", "timed_out", *(["running"] if n == 50 else [])):
        rgb = tuple(int(COLOURS[kind][i : i + 2], 16) for i in (1, 3, 5))
        assert pixels.get(rgb, 0) >= 20, f"{kind}: {pixels.get(rgb, 0)} pixels in the timeline of {n} items"


def test_single_bars_are_capped_per_step_and_batches_account_for_every_other_attempt() -> None:
    state = run_state(3_000, fail_every=2)  # 1,500 items failed 3 times each: far more than SINGLE_LIMIT
    row = clean_row(render_report(state, DEPS, now=state.updated_at))
    singles = len(re.findall(r"<title>clean\[[^\]]+\], attempt \d", row))
    alone = len(re.findall(r"<title>clean\[[^\]]+\]: ", row))  # a batch of one
    batched = sum(int(n) for n in re.findall(r"<title>clean: (\d+) item attempts", row))
    assert singles == SINGLE_LIMIT
    assert singles + alone + batched == sum(len(i.history) for i in (state.step_states["clean"].items or {}).values())


# -- graph, plan, logs -----------------------------------------------------------------------

ETL = textwrap.dedent(
    """
    from dataclasses import dataclass, field
    from wfaas import StepDefinition, WorkflowData, WorkflowDefinition

    @dataclass
    class D(WorkflowData):
        files: list = field(default_factory=list)

    def noop(ctx):
        pass

    workflow = (
        WorkflowDefinition("etl", "ETL", data_type=D)
        .add_step(StepDefinition("list", "List files", noop))
        .add_step(
            StepDefinition("clean", "Clean one file", noop)
            .depends_on(["list"]).for_each(lambda d: d.files).with_concurrency(4)
        )
        .add_step(StepDefinition("report", "Report", noop).depends_on(["clean"]))
    )
    """
)


def test_graph_and_plan_mark_the_for_each_step_and_its_cap(tmp_path: Path) -> None:
    (tmp_path / "etl.py").write_text(ETL)
    target = f"{tmp_path}/etl.py:workflow"
    graph = cli("graph", target).output
    assert "  clean [Clean one file] <- after all of list  (for each, at most 4 at once)" in graph
    assert "  [1] clean (for each)" in graph and "report (for each)" not in graph
    dot = cli("graph", target, "--dot").output
    assert '"clean" [label="clean\\nClean one file\\nfor each, at most 4 at once", shape=box3d];' in dot
    assert '"report" [label="report\\nReport"];' in dot
    plan = cli("plan", target).output.splitlines()
    assert plan[1] == (
        "clean: run for each item of its list (computed when it is ready) — after all of list; at most 4 at once"
    )
    assert plan[2] == "report: run — after all of clean"


class _Logs:
    """A store's read side as ``logs`` uses it: a finished run and these attempt logs."""

    def __init__(self, logs: list[AttemptLog]) -> None:
        self.logs = logs

    def read_meta(self, iid: str) -> dict[str, Any]:
        return {"status": "completed"}

    def read_logs(self, iid: str, step: str | None = None) -> list[AttemptLog]:
        return [log for log in self.logs if step is None or log.step_id == step]


def test_logs_prefix_an_items_lines_with_step_and_key() -> None:
    t = datetime(2026, 1, 1, 12, 0, 0).timestamp()
    logs = [
        AttemptLog("clean", 1, [(t + 1, OUTPUT, "b done")], item_key="b.csv"),
        AttemptLog("clean", 1, [(t, OUTPUT, "a done")], item_key="a.csv"),  # the same attempt number
        AttemptLog("list", 1, [(t - 1, OUTPUT, "listed")]),
    ]
    printed: list[str] = []
    assert print_logs(_Logs(logs), IID, None, None, False, printed.append) == 3  # type: ignore[arg-type]
    assert [line.split(" ", 1)[1] for line in printed] == [
        "list 1 listed",
        "clean[a.csv] 1 a done",
        "clean[b.csv] 1 b done",
    ]
    printed.clear()
    assert print_logs(_Logs(logs), IID, "clean", None, False, printed.append, item="b.csv") == 1  # type: ignore[arg-type]
    assert [line.split(" ", 1)[1] for line in printed] == ["clean[b.csv] 1 b done"]
