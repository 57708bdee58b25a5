"""A run that fails on bad input, is fixed, and resumed without redoing finished work.

    wfaas-local run examples/resume.py:workflow --data '{"input_file": "/tmp/numbers.txt"}'
        # fails at step "parse": the file has a bad line; prints `wfaas-local resume ID`
    printf '1\n2\n3\n' > /tmp/numbers.txt
    wfaas-local resume ID
        # "download" is not run again; "parse" and "total" run; the run COMPLETES

``download`` writes a file with one bad line (only if the file does not exist
yet); ``parse`` fails on it; after fixing the file, ``resume`` continues from
``parse``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wfaas import StepDefinition, StepFailed, WorkflowData, WorkflowDefinition, WorkflowEngine


@dataclass
class ResumeData(WorkflowData):
    input_file: str = "/tmp/wfaas-numbers.txt"
    numbers: list[int] = field(default_factory=list)
    total: int = 0


def download(ctx: Any) -> None:
    path = Path(ctx.data.input_file)
    if not path.exists():
        path.write_text("1\n2\nthree\n")


def parse(ctx: Any) -> None:
    lines = Path(ctx.data.input_file).read_text().split()
    ctx.data.numbers = [int(x) for x in lines]  # ValueError on "three": fix the file, then resume


def total(ctx: Any) -> None:
    ctx.data.total = sum(ctx.data.numbers)


workflow = (
    WorkflowDefinition("resume_example", "Fail, fix, resume", data_type=ResumeData)
    .add_step(StepDefinition("download", "Download", download))
    .add_step(StepDefinition("parse", "Parse", parse).depends_on(["download"]))
    .add_step(StepDefinition("total", "Total", total).depends_on(["parse"]))
)

if __name__ == "__main__":
    with WorkflowEngine() as engine:
        engine.register_workflow(workflow)
        iid = engine.start_workflow("resume_example", ResumeData())
        try:
            engine.wait_for_completion(iid, timeout=60)
        except StepFailed as exc:
            print("failed as expected:", exc)
            Path(ResumeData().input_file).write_text("1\n2\n3\n")
            engine.resume(iid)
            print(engine.wait_for_completion(iid, "resume", timeout=60))
        print(engine.get_status(iid).data.total)
