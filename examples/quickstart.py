"""Quick start: one step that processes its input (API.md section 1).

Run it:  wfaas-local run examples/quickstart.py:workflow --data '{"input": "Hello"}'
or:      python examples/quickstart.py
"""

from __future__ import annotations

from dataclasses import dataclass

from wfaas import StepDefinition, StepResult, WorkflowContext, WorkflowData, WorkflowDefinition, WorkflowEngine


@dataclass
class MyData(WorkflowData):
    workflow_type = "my_workflow"
    input: str = "Hello, World!"
    result: str | None = None


def process(ctx: WorkflowContext[MyData]) -> StepResult:
    ctx.data.result = f"Processed: {ctx.data.input}"
    return StepResult.SUCCESS


workflow = WorkflowDefinition("process_workflow", "Process Workflow", data_type=MyData).add_step(
    StepDefinition("process", "Process Input", process)
)

if __name__ == "__main__":
    with WorkflowEngine() as engine:
        engine.register_workflow(workflow)
        iid = engine.start_workflow("process_workflow", MyData(input="Hello, World!"))
        print(engine.wait_for_completion(iid, "example", timeout=30))
        print(engine.get_status(iid).data.result)
