"""Seeded crash trials: SIGKILL a runner process at a random point of a 12-step run, resume, compare.

A trial (``crash_trial``) starts ``RUNNER`` (written to the trial's folder) on
a fresh SQLite store, waits until a random number of step executions have
started, waits a random few milliseconds more, and SIGKILLs the runner. What
the file holds then is exactly what had been committed. A fresh process then
resumes the instance (``recover()``, or ``resume(iid)`` on odd trials), and
the trial checks that

- no step whose SUCCEEDED had been committed before the kill ran again
  (every execution appends the step's id to a log file),
- none of those steps is lost (all still SUCCEEDED), and the run completes,
- the final data equals an uninterrupted run's,
- the file passes ``PRAGMA integrity_check`` (asked through plain sqlite3),
- the killed runner's workers did not outlive it.

``benchmarks/crash_trials.py`` runs the same trial many times.
"""

from __future__ import annotations

import collections
import json
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from conftest import reap

STEPS = [
    "load",
    "parse",
    "shard0",
    "shard1",
    "shard2",
    "shard3",
    "shard4",
    "merge",
    "enrich",
    "report",
    "archive",
    "publish",
]

RUNNER = textwrap.dedent(
    '''
    """A 12-step run on a SqliteStore, for crash trials.

        python runner.py run STORE LOG        start a run (prints the instance id), wait for it
        python runner.py recover STORE LOG    recover() every interrupted run, print each final state
        python runner.py resume STORE ID      resume(ID) unless it completed, print its final state
        python runner.py fresh STORE LOG      one uninterrupted run, print its final state

    load -> parse -> shard0..shard4 -> merge -> enrich -> report, archive -> publish
    Every execution of a step first appends "<step id>" to LOG, then takes 3-100 ms. A step
    reads only what its ancestors wrote, so the final data never depends on the timing.
    """
    import json, random, sys, time
    from dataclasses import dataclass, field
    from wfaas import SqliteStore, StepDefinition, WorkflowData, WorkflowDefinition, WorkflowEngine

    @dataclass
    class TrialData(WorkflowData):
        log: str = ""
        values: dict = field(default_factory=dict)
        chain: list = field(default_factory=list)
        total: int = 0

    def begin(ctx):
        with open(ctx.data.log, "a") as f:
            f.write(ctx.step_id + "\\n")
        time.sleep(random.uniform(0.003, 0.1))

    def chained(ctx):  # chain steps: each extends the list the previous one left
        begin(ctx)
        ctx.data.chain = ctx.data.chain + [ctx.step_id]
        ctx.data.values[ctx.step_id] = len(ctx.data.chain) * 11

    def shard(ctx):  # fan-out steps: each writes its own key
        begin(ctx)
        ctx.data.values[ctx.step_id] = sum(map(ord, ctx.step_id)) * int(ctx.step_id[-1]) + 1

    def merge(ctx):
        chained(ctx)
        ctx.data.total = sum(ctx.data.values.values())

    def enrich(ctx):
        chained(ctx)
        ctx.data.total = ctx.data.total * 3 + 1

    def report(ctx):
        begin(ctx)
        ctx.data.values["report"] = ctx.data.total % 997

    def archive(ctx):
        # Reads only what its ancestors wrote: "report" runs beside it, and after a resume
        # its result may already be in the data archive starts from.
        begin(ctx)
        shards = [k for k in ctx.data.values if k.startswith("shard")]
        ctx.data.values["archive"] = len(ctx.data.chain) * 1000 + len(shards)

    def publish(ctx):
        chained(ctx)
        ctx.data.total += ctx.data.values["report"] + ctx.data.values["archive"]

    def definition():
        wf = WorkflowDefinition("crash_trial", data_type=TrialData)
        wf.add_step(StepDefinition("load", "load", chained))
        wf.add_step(StepDefinition("parse", "parse", chained).depends_on(["load"]))
        shards = [f"shard{i}" for i in range(5)]
        for sid in shards:
            wf.add_step(StepDefinition(sid, sid, shard).depends_on(["parse"]))
        wf.add_step(StepDefinition("merge", "merge", merge).depends_on(shards))
        wf.add_step(StepDefinition("enrich", "enrich", enrich).depends_on(["merge"]))
        wf.add_step(StepDefinition("report", "report", report).depends_on(["enrich"]))
        wf.add_step(StepDefinition("archive", "archive", archive).depends_on(["enrich"]))
        wf.add_step(StepDefinition("publish", "publish", publish).depends_on(["report", "archive"]))
        return wf

    def show(engine, iid):
        state = engine.get_status(iid)
        data = {k: v for k, v in vars(state.data).items() if k != "log"}
        print(json.dumps({"iid": iid, "status": state.status.name, "data": data}), flush=True)

    if __name__ == "__main__":
        mode, store = sys.argv[1], sys.argv[2]
        with WorkflowEngine(store=SqliteStore(store), max_workers=2) as engine:
            engine.register_workflow(definition())
            if mode == "recover":
                for iid in engine.recover():
                    engine.wait_for_completion(iid, timeout=120)
                    show(engine, iid)
            elif mode == "resume":
                iid = sys.argv[3]
                if engine.get_status(iid).status.name != "COMPLETED":
                    engine.resume(iid)
                    engine.wait_for_completion(iid, timeout=120)
                show(engine, iid)
            else:
                iid = engine.start_workflow("crash_trial", TrialData(log=sys.argv[3]))
                print(iid, flush=True)
                engine.wait_for_completion(iid, timeout=120)
                if mode == "fresh":
                    show(engine, iid)
    '''
)


@dataclass
class TrialResult:
    """What one trial saw."""

    number: int
    kill_after_starts: int
    jitter: float
    mode: str
    interrupted: bool = False  # the run was still RUNNING in the file after the kill
    committed: list[str] = field(default_factory=list)  # SUCCEEDED in the file after the kill
    reruns_of_succeeded: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    ran_again: list[str] = field(default_factory=list)  # interrupted steps that ran again (allowed)
    never_ran: list[str] = field(default_factory=list)
    final_status: str = ""
    data_matches: bool = False
    integrity: str = ""
    orphans: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            not self.reruns_of_succeeded
            and not self.lost
            and not self.never_ran
            and not self.orphans
            and self.final_status == "COMPLETED"
            and self.data_matches
            and self.integrity == "ok"
        )

    def line(self) -> str:
        where = "mid-run" if self.interrupted else "after the end"
        return (
            f"trial {self.number:2d}: killed {where} (after {self.kill_after_starts:2d} step starts + "
            f"{self.jitter * 1000:3.0f} ms), {len(self.committed):2d}/12 committed, {self.mode:7s}: "
            f"re-ran succeeded {self.reruns_of_succeeded or 0}, lost {self.lost or 0}, "
            f"re-ran interrupted {self.ran_again or 0}, {self.final_status}, "
            f"data {'same' if self.data_matches else 'DIFFERENT'}, integrity {self.integrity}"
            + (f", ORPHANS {self.orphans}" if self.orphans else "")
        )


def write_runner(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "runner.py"
    script.write_text(RUNNER)
    return script


def run_runner(script: Path, *args: str) -> list[dict[str, Any]]:
    """Run the runner to its end; the JSON states it printed."""
    proc = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=180, cwd=script.parent
    )
    if proc.returncode != 0:
        raise RuntimeError(f"runner {args} exited with {proc.returncode}:\n{proc.stderr}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def reference_data(folder: Path) -> dict[str, Any]:
    """The final data of an uninterrupted run."""
    script = write_runner(folder)
    (state,) = run_runner(script, "fresh", str(folder / "fresh.sqlite"), str(folder / "fresh.log"))
    assert state["status"] == "COMPLETED", state
    data: dict[str, Any] = state["data"]
    return data


def executions(log: Path) -> collections.Counter[str]:
    return collections.Counter(log.read_text().split()) if log.exists() else collections.Counter()


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.001)


def integrity(path: Path) -> str:
    """``PRAGMA integrity_check`` on a plain sqlite3 connection of its own."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as conn:
        rows = conn.execute("PRAGMA integrity_check").fetchall()
    conn.close()
    return "; ".join(str(r[0]) for r in rows)


def crash_trial(folder: Path, number: int, rng: random.Random, expected: dict[str, Any]) -> TrialResult:
    """One trial: run, SIGKILL at a random point, resume in a fresh process, check."""
    from wfaas import SqliteStore, StepStatus

    script = write_runner(folder)
    store, log = folder / "runs.sqlite", folder / "steps.log"
    result = TrialResult(number, rng.randint(1, len(STEPS)), rng.uniform(0.0, 0.08), rng.choice(["recover", "resume"]))

    proc = subprocess.Popen(
        [sys.executable, str(script), "run", str(store), str(log)], stdout=subprocess.PIPE, text=True, cwd=folder
    )
    try:
        assert proc.stdout is not None
        iid = proc.stdout.readline().strip()  # start_workflow returned: the run is committed
        if not iid:
            raise RuntimeError(f"trial {number}: the runner printed no instance id (exit {proc.wait(30)})")
        started = lambda: sum(executions(log).values()) >= result.kill_after_starts  # noqa: E731
        wait_for(lambda: started() or proc.poll() is not None, 60, f"{result.kill_after_starts} step starts")
        # The random part of the kill point, a few ms past that step start (not a synchronisation).
        time.sleep(result.jitter)
        family = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        reap(proc)
    # Workers exit on their own once their engine is gone; anything still alive is an orphan.
    _, still_alive = psutil.wait_procs(family, timeout=15)
    result.orphans = [p.pid for p in still_alive]
    for p in still_alive:
        p.kill()  # started (indirectly) by this trial: do not leave them to the next one
    psutil.wait_procs(still_alive, timeout=10)

    reader = SqliteStore(store, readonly=True)
    try:
        at_kill = reader.load(iid)
    finally:
        reader.close()
    result.interrupted = at_kill.status.name == "RUNNING"
    result.committed = [sid for sid in STEPS if at_kill.step_states[sid].status is StepStatus.SUCCEEDED]
    before = executions(log)

    if result.mode == "recover":
        states = run_runner(script, "recover", str(store), str(log))
        assert [s["iid"] for s in states] == ([iid] if result.interrupted else []), states
    else:
        states = run_runner(script, "resume", str(store), iid)

    after = executions(log)
    checker = SqliteStore(store, readonly=True)
    try:
        final = checker.load(iid)
    finally:
        checker.close()
    result.integrity = integrity(store)
    result.final_status = final.status.name
    result.reruns_of_succeeded = [s for s in result.committed if after[s] != before[s]]
    result.lost = [s for s in result.committed if final.step_states[s].status is not StepStatus.SUCCEEDED]
    result.ran_again = [s for s in STEPS if after[s] > 1 and s not in result.reruns_of_succeeded]
    result.never_ran = [s for s in STEPS if after[s] == 0]
    data = {k: v for k, v in vars(final.data).items() if k != "log"}
    result.data_matches = data == expected and (not states or states[-1]["data"] == expected)
    return result


# -- the test -------------------------------------------------------------------------------------

TRIALS = 5
SEED = 20261125


@pytest.mark.slow  # kills the runner at random real-time moments; no timing tolerance: it checks data only
@pytest.mark.timeout(300)
def test_sigkill_at_random_points_then_resume_loses_and_repeats_nothing_committed(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    expected = reference_data(tmp_path / "reference")
    results = []
    for n in range(TRIALS):
        r = crash_trial(tmp_path / f"trial{n}", n, rng, expected)
        results.append(r)
        assert r.reruns_of_succeeded == [], f"committed steps ran again: {r.line()}"
        assert r.lost == [], f"committed steps lost: {r.line()}"
        assert r.final_status == "COMPLETED", r.line()
        assert r.never_ran == [], r.line()
        assert r.data_matches, f"final data differs from an uninterrupted run's: {r.line()}"
        assert r.integrity == "ok", r.line()
        assert r.orphans == [], f"the killed runner's processes outlived it: {r.line()}"
    # The trials really interrupted runs, at different points.
    assert sum(r.interrupted for r in results) >= 3, [r.line() for r in results]
    assert len({len(r.committed) for r in results}) >= 2, [r.line() for r in results]
