"""A batch data job: clean every CSV file of a folder in parallel, aggregate, report.

generate (only without a folder) ──▶ list ──▶ clean (for each file, in parallel) ──▶ aggregate ──▶ report

The folder is listed when the run gets there (``for_each``), not when the
workflow is defined: the same definition cleans 3 files or 3,000. Each file
is its own unit of work: it is retried on its own, checkpointed as it ends,
and a resume cleans only the files that were not done. Row counts land in a
dict field key by key, so files cleaned side by side never conflict.

Run it on your folder:
    wfaas-local run examples/batch_files.py --data '{"folder": "/data/incoming"}' --workers 4
or without a folder, on 50 generated sample files:
    wfaas-local run examples/batch_files.py
"""

from __future__ import annotations

import csv
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wfaas import RetryPolicy, StepDefinition, WorkflowData, WorkflowDefinition, WorkflowEngine


@dataclass
class BatchData(WorkflowData):
    folder: str = ""  # the CSV files to clean; empty: generate sample files in a fresh folder
    sample_files: int = 50
    seed: int = 7
    files: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    total: float = 0.0
    report: str = ""


def make_sample_files(folder: Path, n: int, seed: int) -> None:
    """``n`` CSV files of 200 rows, about 5 % of them malformed, in ``folder``."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        with open(folder / f"part{i:02d}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "amount"])
            for j in range(200):
                amount = "n/a" if rng.random() < 0.05 else f"{rng.uniform(0, 100):.2f}"
                w.writerow([f"{i}-{j}", amount])


def generate(ctx: Any) -> None:
    folder = Path(tempfile.mkdtemp(prefix="wfaas-batch-"))
    make_sample_files(folder, ctx.data.sample_files, ctx.data.seed)
    ctx.data.folder = str(folder)


def list_files(ctx: Any) -> None:
    folder = Path(ctx.data.folder)
    if not folder.is_dir():
        raise FileNotFoundError(f'no folder {folder}; pass --data \'{{"folder": "/path/to/csv/files"}}\'')
    ctx.data.files = sorted(str(p) for p in folder.glob("*.csv"))
    if not ctx.data.files:
        raise FileNotFoundError(f"no *.csv file in {folder}; nothing to clean")


def clean(ctx: Any) -> None:
    """One file (``ctx.item``): drop malformed rows, write a cleaned copy beside, count."""
    source = Path(ctx.item)
    out = source.parent / "clean"
    out.mkdir(exist_ok=True)
    kept, dropped = [], 0
    with open(source, newline="") as f:
        for row in csv.DictReader(f):
            try:
                kept.append((row["id"], float(row["amount"])))
            except (KeyError, TypeError, ValueError):
                dropped += 1
    with open(out / source.name, "w", newline="") as f:
        csv.writer(f).writerows(kept)
    ctx.data.counts[source.stem] = len(kept)
    ctx.data.dropped[source.stem] = dropped


def aggregate(ctx: Any) -> None:
    total = 0.0
    for name in ctx.data.files:
        with open(Path(name).parent / "clean" / Path(name).name, newline="") as f:
            total += sum(float(amount) for _, amount in csv.reader(f))
    ctx.data.total = round(total, 2)


def report(ctx: Any) -> None:
    rows, bad = sum(ctx.data.counts.values()), sum(ctx.data.dropped.values())
    ctx.data.report = f"{len(ctx.data.counts)} files, {rows} rows kept, {bad} dropped, total amount {ctx.data.total}"
    Path(ctx.data.folder, "report.txt").write_text(ctx.data.report + "\n")


def the_files(data: BatchData) -> list[str]:
    return data.files


workflow = (
    WorkflowDefinition("batch_files", "Batch CSV cleaning", data_type=BatchData)
    .add_step(StepDefinition("generate", "Generate sample files", generate).run_if(lambda ctx: not ctx.data.folder))
    .add_step(StepDefinition("list", "List the folder", list_files).depends_on(["generate"]))
    .add_step(
        StepDefinition("clean", "Clean one file", clean)
        .depends_on(["list"])
        .for_each(the_files)
        .with_retry(RetryPolicy(max_attempts=3))
    )
    .add_step(StepDefinition("aggregate", "Aggregate", aggregate).depends_on(["clean"]))
    .add_step(StepDefinition("report", "Report", report).depends_on(["aggregate"]))
)

if __name__ == "__main__":
    with WorkflowEngine() as engine:
        engine.register_workflow(workflow)
        iid = engine.start_workflow("batch_files", BatchData())
        print(engine.wait_for_completion(iid, "batch", timeout=120))
        print(engine.get_status(iid).data.report)
