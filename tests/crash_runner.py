"""A 12-step workflow run, killed and recovered by the crash trials (tests and benchmarks).

    python crash_runner.py run STORE LOG      # start a run, wait for it; prints the instance id first
    python crash_runner.py recover STORE LOG  # resume every interrupted run; prints each final data as JSON
    python crash_runner.py fresh STORE LOG    # run once without interruption; prints the final data

Every execution of a step appends "<step id>" to LOG as it starts, so a
trial can count how often each step ran. The graph mixes a chain and fan-outs:

    a -> b0..b5 -> c -> d0, d1 -> e -> f
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from wfaas import SqliteStore, StepDefinition, WorkflowData, WorkflowDefinition, WorkflowEngine


@dataclass
class CrashData(WorkflowData):
    log: str = ""
    values: dict[str, int] = field(default_factory=dict)
    total: int = 0


def work(ctx: Any) -> None:
    with open(ctx.data.log, "a") as f:
        f.write(ctx.step_id + "\n")
    time.sleep(random.uniform(0.02, 0.12))
    ctx.data.values[ctx.step_id] = sum(map(ord, ctx.step_id))


def add_up(ctx: Any) -> None:
    work(ctx)
    ctx.data.total = sum(ctx.data.values.values())


def definition() -> WorkflowDefinition:
    wf = WorkflowDefinition("crash_trial", data_type=CrashData)
    wf.add_step(StepDefinition("a", "a", work))
    fan = [f"b{i}" for i in range(6)]
    for sid in fan:
        wf.add_step(StepDefinition(sid, sid, work).depends_on(["a"]))
    wf.add_step(StepDefinition("c", "c", add_up).depends_on(fan))
    wf.add_step(StepDefinition("d0", "d0", work).depends_on(["c"]))
    wf.add_step(StepDefinition("d1", "d1", work).depends_on(["c"]))
    wf.add_step(StepDefinition("e", "e", add_up).depends_on(["d0", "d1"]))
    wf.add_step(StepDefinition("f", "f", add_up).depends_on(["e"]))
    return wf


def main() -> None:
    mode, store_path, log = sys.argv[1:4]
    store = SqliteStore(store_path)
    with WorkflowEngine(store=store, max_workers=2) as engine:
        engine.register_workflow(definition())
        if mode == "recover":
            for iid in engine.recover():
                engine.wait_for_completion(iid, timeout=120)
                print(json.dumps(vars(engine.get_status(iid).data)), flush=True)
            return
        iid = engine.start_workflow("crash_trial", CrashData(log=log))
        print(iid, flush=True)
        engine.wait_for_completion(iid, timeout=120)
        if mode == "fresh":
            print(json.dumps(vars(engine.get_status(iid).data)), flush=True)
    store.close()


if __name__ == "__main__":
    main()
