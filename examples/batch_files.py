"""A batch data job: generate CSV files, clean each in parallel, aggregate, report.

generate ──▶ clean_00 … clean_49 (in parallel) ──▶ aggregate ──▶ report

Each clean step drops malformed rows of one file and writes a cleaned copy;
its row counts land in a dict field key by key, so 50 parallel steps never
conflict. Run it:  wfaas-local run examples/batch_files.py:workflow --workers 2
"""

from __future__ import annotations

import csv
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wfaas import StepDefinition, WorkflowData, WorkflowDefinition, WorkflowEngine

FILES = 50


@dataclass
class BatchData(WorkflowData):
    workdir: str = ""
    seed: int = 7
    counts: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    total: float = 0.0
    report: str = ""


def generate(ctx: Any) -> None:
    workdir = Path(ctx.data.workdir or tempfile.mkdtemp(prefix="wfaas-batch-"))
    (workdir / "raw").mkdir(parents=True, exist_ok=True)
    rng = random.Random(ctx.data.seed)
    for i in range(FILES):
        with open(workdir / "raw" / f"part{i:02d}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "amount"])
            for j in range(200):
                amount = "n/a" if rng.random() < 0.05 else f"{rng.uniform(0, 100):.2f}"
                w.writerow([f"{i}-{j}", amount])
    ctx.data.workdir = str(workdir)


def clean(i: int) -> Any:
    def body(ctx: Any) -> None:
        workdir = Path(ctx.data.workdir)
        (workdir / "clean").mkdir(exist_ok=True)
        kept, dropped = [], 0
        with open(workdir / "raw" / f"part{i:02d}.csv", newline="") as f:
            for row in csv.DictReader(f):
                try:
                    kept.append((row["id"], float(row["amount"])))
                except ValueError:
                    dropped += 1
        with open(workdir / "clean" / f"part{i:02d}.csv", "w", newline="") as f:
            csv.writer(f).writerows(kept)
        ctx.data.counts[f"part{i:02d}"] = len(kept)
        ctx.data.dropped[f"part{i:02d}"] = dropped

    return body


def aggregate(ctx: Any) -> None:
    total = 0.0
    for path in sorted(Path(ctx.data.workdir, "clean").glob("*.csv")):
        with open(path, newline="") as f:
            total += sum(float(amount) for _, amount in csv.reader(f))
    ctx.data.total = round(total, 2)


def report(ctx: Any) -> None:
    rows, bad = sum(ctx.data.counts.values()), sum(ctx.data.dropped.values())
    ctx.data.report = f"{len(ctx.data.counts)} files, {rows} rows kept, {bad} dropped, total amount {ctx.data.total}"
    Path(ctx.data.workdir, "report.txt").write_text(ctx.data.report + "\n")


workflow = WorkflowDefinition("batch_files", "Batch CSV cleaning", data_type=BatchData)
workflow.add_step(StepDefinition("generate", "Generate input files", generate))
for n in range(FILES):
    workflow.add_step(StepDefinition(f"clean_{n:02d}", f"Clean part {n}", clean(n)).depends_on(["generate"]))
workflow.add_step(
    StepDefinition("aggregate", "Aggregate", aggregate).depends_on([f"clean_{n:02d}" for n in range(FILES)])
)
workflow.add_step(StepDefinition("report", "Report", report).depends_on(["aggregate"]))

if __name__ == "__main__":
    with WorkflowEngine() as engine:
        engine.register_workflow(workflow)
        iid = engine.start_workflow("batch_files", BatchData())
        print(engine.wait_for_completion(iid, "batch", timeout=120))
        print(engine.get_status(iid).data.report)
