"""The Dask backend: the same workflows and fault guarantees on a ``distributed`` cluster.

One ``LocalCluster(processes=True, n_workers=2)`` serves the whole module (a
cluster takes seconds to start). Everything runs on this machine, so the
tests can see the remote step processes with psutil: a timed-out step's
process must be gone, and SIGKILL of a step's process or of its whole Dask
worker must fail only that attempt (``WorkerCrashed``), retried, while a
concurrent step on the other worker goes on untouched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

distributed = pytest.importorskip("distributed")

from wfaas import (  # noqa: E402 - only once distributed is known to be there
    DaskBackend,
    RetryPolicy,
    StepDefinition,
    StepTimeout,
    WorkerCrashed,
    WorkflowDefinition,
    WorkflowEngine,
    WorkflowStatus,
    events,
)
from wfaas.dask_backend import check_versions  # noqa: E402
from wfaas.objects import is_ref  # noqa: E402

from conftest import Data, alive, wait_for_text, wait_until, write_atomic  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

pytestmark = [pytest.mark.dask, pytest.mark.slow]


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    import dask

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    dask_client = distributed.Client(cluster)
    try:
        yield dask_client
    finally:
        dask_client.close()
        cluster.close()


@pytest.fixture
def dengine(client: Any) -> Iterator[WorkflowEngine]:
    client.wait_for_workers(2, timeout=60)  # a worker killed by an earlier test is back
    with WorkflowEngine(backend=DaskBackend(client), grace_period=1.0) as eng:
        yield eng


# -- the examples --------------------------------------------------------------------


def test_examples_give_the_same_data_as_local(dengine: WorkflowEngine, tmp_path: Path) -> None:
    import batch_files
    import dag
    import flaky_service
    import quickstart

    assert dengine.max_workers == 2  # the cluster's threads
    batch_files.make_sample_files(tmp_path, 12, seed=3)
    runs = {}
    for module, data in [
        (quickstart, quickstart.MyData(input="on dask")),
        (dag, dag.DagData()),
        (flaky_service, flaky_service.FlakyData()),
        (batch_files, batch_files.BatchData(folder=str(tmp_path))),
    ]:
        dengine.register_workflow(module.workflow)
        runs[module.__name__] = dengine.start_workflow(module.workflow.id, data)
    for iid in runs.values():
        dengine.wait_for_completion(iid, timeout=90)
    data = {name: dengine.get_status(iid).data for name, iid in runs.items()}
    assert data["quickstart"].result == "Processed: on dask"
    assert (data["dag"].parts, data["dag"].total, data["dag"].source) == ({"a": 1, "b": 2, "c": 3}, 6, "recomputed")
    assert data["flaky_service"].response.startswith("200 OK after 3 attempts")
    assert len(data["batch_files"].counts) == 12  # the files made below, listed at run time
    assert data["batch_files"].report == (tmp_path / "report.txt").read_text().strip()
    steps = dengine.get_status(runs["flaky_service"]).step_states
    assert steps["call_service"].attempts == 3
    assert steps["optional_enrich"].status.value == "failed"


def _item_once_flaky(ctx: Any) -> None:
    if ctx.item == "b" and ctx.attempt == 1:
        raise RuntimeError("b fails its first attempt")
    ctx.data.items[ctx.item_key] = (ctx.item * 2, ctx.attempt)


def test_for_each_items_run_on_the_cluster_each_retried_on_its_own(dengine: WorkflowEngine) -> None:
    step = StepDefinition("e", "e", _item_once_flaky).for_each(lambda data: data.log).with_retry(RetryPolicy(2))
    dengine.register_workflow(WorkflowDefinition("items", "items", data_type=Data).add_step(step))
    iid = dengine.start_workflow("items", Data(log=["a", "b", "c"]))
    dengine.wait_for_completion(iid, timeout=90)
    state = dengine.get_status(iid)
    assert state.data.items == {"a": ("aa", 1), "b": ("bb", 2), "c": ("cc", 1)}
    assert [i.attempts for i in (state.step_states["e"].items or {}).values()] == [1, 2, 1]


# -- large fields --------------------------------------------------------------------


def _read_big(ctx: Any) -> None:
    ctx.data.items[ctx.step_id] = (len(ctx.data.value), ctx.data.value[-1])


def test_large_fields_reach_every_step(dengine: WorkflowEngine) -> None:
    """A 5 MB field (scattered once, not sent with each step) reaches a fan-out and a chain."""
    wf = WorkflowDefinition("big", "big", data_type=Data)
    for i in range(4):
        wf.add_step(StepDefinition(f"fan{i}", "fan", _read_big))
    wf.add_step(StepDefinition("after", "after", _read_big).depends_on([f"fan{i}" for i in range(4)]))
    dengine.register_workflow(wf)
    big = b"x" * (5 * 2**20 - 1) + b"!"
    iid = dengine.start_workflow("big", Data(value=big))
    dengine.wait_for_completion(iid, timeout=60)
    items = dengine.get_status(iid).data.items
    assert items == {s: (len(big), ord("!")) for s in [*(f"fan{i}" for i in range(4)), "after"]}


def _grow_big(ctx: Any) -> None:
    ctx.data.value = ctx.data.value + b"?"


def test_large_values_go_to_the_cluster_as_objects_and_come_back_as_objects(dengine: WorkflowEngine) -> None:
    """A field the engine holds as an object (objects.py) reaches Dask steps; one a Dask step writes is
    written to the engine's object folder (not into the store's records)."""
    wf = WorkflowDefinition("grow_big", "grow_big", data_type=Data)
    wf.add_step(StepDefinition("grow", "grow", _grow_big))
    wf.add_step(StepDefinition("read", "read", _read_big).depends_on(["grow"]))
    dengine.register_workflow(wf)
    big = b"y" * (3 * 2**20)
    iid = dengine.start_workflow("grow_big", Data(value=big))
    dengine.wait_for_completion(iid, timeout=60)
    state = dengine.get_status(iid)
    assert state.data.items == {"read": (len(big) + 1, ord("?"))}
    record = dengine.store.read(iid)
    assert record is not None and is_ref(record.fields["value"])
    objects = dengine.store.objects
    assert objects is not None
    assert len([p for p in objects.root.iterdir() if not p.name.startswith(".")]) == 2  # before and after


def _bump(ctx: Any) -> None:
    ctx.data.n += 1


def _write_64k(ctx: Any) -> None:
    ctx.data.value = os.urandom(64 * 1024)


def test_small_replies_are_pushed_and_a_large_one_fetched_each_delivered_once(
    dengine: WorkflowEngine, client: Any
) -> None:
    # Issue 17: a reply of at most 16 KiB comes back as a Dask event as the step ends (no fetch of the
    # task's result); a larger one is fetched. A reply delivered twice would be taken for the next step's.
    wf = WorkflowDefinition("replies", "replies", data_type=Data)
    sids = ["a", "big", "b", "c", "d"]
    for i, sid in enumerate(sids):
        step = StepDefinition(sid, sid, _write_64k if sid == "big" else _bump)
        wf.add_step(step.depends_on([sids[i - 1]]) if i else step)
    dengine.register_workflow(wf)
    started = time.time()
    iid = dengine.start_workflow("replies", Data())
    dengine.wait_for_completion(iid, timeout=60)
    state = dengine.get_status(iid)
    assert state.data.n == 4 and len(state.data.value) == 64 * 1024
    assert [state.step_states[s].attempts for s in sids] == [1] * 5
    # The client's own topic, shared by the engines of this module's client: this run's events only.
    events = client.get_events(str(client.id))
    pushed = [msg for at, msg in events if at >= started and isinstance(msg, tuple | list) and msg[0] == "reply"]
    assert len(pushed) == 4, [len(m[2]) for m in pushed]


# -- faults --------------------------------------------------------------------------


def _hang(ctx: Any) -> None:
    write_atomic(ctx.data.value, str(os.getpid()))
    time.sleep(60)  # in C: only a signal stops it


def test_timeout_kills_the_remote_step_process(dengine: WorkflowEngine, client: Any, tmp_path: Path) -> None:
    wf = WorkflowDefinition("hang", "hang", data_type=Data)
    # The timeout runs from dispatch: 3 s leaves room to start the remote step process on a loaded machine.
    wf.add_step(StepDefinition("hang", "hang", _hang).with_timeout(3))
    dengine.register_workflow(wf)
    pid_file = tmp_path / "pid"
    started = time.monotonic()
    iid = dengine.start_workflow("hang", Data(value=str(pid_file)))
    pid = int(wait_for_text(pid_file))
    assert alive(pid)
    with pytest.raises(StepTimeout) as info:
        dengine.wait_for_completion(iid, timeout=30)
    assert not alive(pid), "the timed-out step's remote process still runs"
    assert time.monotonic() - started < 3 + 1.0 + 5.0  # timeout + grace + Dask round trips, with room
    assert f"pid {pid} on Dask worker tcp://" in str(info.value)  # it ran remotely, and was named there


def _hog(ctx: Any) -> None:
    """10 MiB at a time up to 600 MiB, each chunk resident, recording how far it got; then hold it."""
    folder = Path(ctx.data.value)
    write_atomic(folder / "pid", str(os.getpid()))
    held = []
    for n in range(10, 601, 10):
        held.append(b"\x01" * (10 * 2**20))
        write_atomic(folder / "progress", str(n))
        time.sleep(0.01)  # ~1 GiB/s: the limit's sampling has time to act, as in test_memory_limit
    time.sleep(30)


def test_memory_limit_stops_the_remote_step(dengine: WorkflowEngine, tmp_path: Path) -> None:
    # Issue 17: with_memory_limit holds on Dask workers too (sampled there, stopped by the driver).
    wf = WorkflowDefinition("hog", "hog", data_type=Data)
    wf.add_step(StepDefinition("hog", "hog", _hog).with_memory_limit(100 * 2**20))
    dengine.register_workflow(wf)
    started = time.monotonic()
    iid = dengine.start_workflow("hog", Data(value=str(tmp_path)))
    with pytest.raises(WorkerCrashed) as info:
        dengine.wait_for_completion(iid, timeout=60)
    assert time.monotonic() - started < 25  # stopped, not left to hold its memory for 30 s
    message = str(info.value)
    assert "memory limit of 100 MiB" in message and "on Dask worker tcp://" in message, message
    assert int((tmp_path / "progress").read_text()) < 600
    assert not alive(int((tmp_path / "pid").read_text()))


def _hang_with_escapers(ctx: Any) -> None:
    folder = Path(ctx.data.value)
    middle = os.fork()  # a daemon: fork, setsid, fork, the middle one exits
    if middle == 0:
        os.setsid()
        if os.fork() == 0:
            write_atomic(folder / "daemon.pid", str(os.getpid()))
            os.execvp("sleep", ["sleep", "120"])
        os._exit(0)
    os.waitpid(middle, 0)
    stubborn = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 120; true"])
    wait_until((folder / "daemon.pid").exists, timeout=30, what="the daemon")
    (its_sleep,) = wait_until(psutil.Process(stubborn.pid).children, timeout=30, what="the stubborn shell's sleep")
    pids = [os.getpid(), stubborn.pid, its_sleep.pid, int((folder / "daemon.pid").read_text())]
    write_atomic(folder / "pids", " ".join(map(str, pids)))
    time.sleep(60)


def test_timeout_on_dask_kills_daemons_and_names_the_sigkill_it_took(dengine: WorkflowEngine, tmp_path: Path) -> None:
    wf = WorkflowDefinition("escapers", "escapers", data_type=Data)
    wf.add_step(StepDefinition("hang", "hang", _hang_with_escapers).with_timeout(3))
    dengine.register_workflow(wf)
    iid = dengine.start_workflow("escapers", Data(value=str(tmp_path)))
    pids = [int(p) for p in wait_for_text(tmp_path / "pids").split()]
    try:
        with pytest.raises(StepTimeout) as info:
            dengine.wait_for_completion(iid, timeout=30)
        # Marked only once dead: the daemon, and the child that ignored SIGTERM until the grace period ended.
        assert [p for p in pids if alive(p)] == [], "processes of the timed-out remote step still run"
        assert "outlived SIGTERM and the grace period: killed by SIGKILL" in str(info.value), str(info.value)
    finally:
        for p in pids:
            if alive(p):
                os.kill(p, signal.SIGKILL)


def _victim(ctx: Any) -> None:
    folder = Path(ctx.data.value)
    if ctx.attempt == 1:
        write_atomic(folder / "victim.pid", str(os.getpid()))
        time.sleep(60)
    write_atomic(folder / "victim.retried", str(ctx.attempt))
    ctx.data.items["victim"] = ctx.attempt


def _bystander(ctx: Any) -> None:
    folder = Path(ctx.data.value)
    write_atomic(folder / "bystander.pid", str(os.getpid()))
    wait_until((folder / "go").exists, timeout=60, what="the test's go-ahead")
    ctx.data.items["bystander"] = os.getpid()


@pytest.mark.parametrize("target", ["step process", "dask worker"])
def test_a_killed_worker_fails_only_its_step_which_is_retried(
    dengine: WorkflowEngine, client: Any, tmp_path: Path, target: str
) -> None:
    wf = WorkflowDefinition("kill", "kill", data_type=Data)
    wf.add_step(StepDefinition("victim", "victim", _victim).with_retry(RetryPolicy(max_attempts=3)))
    wf.add_step(StepDefinition("bystander", "bystander", _bystander))
    dengine.register_workflow(wf)
    seen: list[Any] = []
    dengine.event_bus.subscribe(seen.append)
    iid = dengine.start_workflow("kill", Data(value=str(tmp_path)))
    victim = int(wait_for_text(tmp_path / "victim.pid"))
    bystander = int(wait_for_text(tmp_path / "bystander.pid"))
    workers = set(client.run(os.getpid).values())
    owner = next(p.pid for p in psutil.Process(victim).parents() if p.pid in workers)
    assert owner not in {p.pid for p in psutil.Process(bystander).parents()}, "both steps on one worker"
    os.kill(victim if target == "step process" else owner, signal.SIGKILL)
    wait_for_text(tmp_path / "victim.retried")
    assert alive(bystander)
    (tmp_path / "go").write_text("go")
    dengine.wait_for_completion(iid, timeout=60)
    state = dengine.get_status(iid)
    assert state.data.items == {"victim": 2, "bystander": bystander}
    assert (state.step_states["victim"].attempts, state.step_states["bystander"].attempts) == (2, 1)
    failed = [e for e in seen if isinstance(e, events.StepFailed)]
    assert len(failed) == 1 and failed[0].step_id == "victim" and failed[0].will_retry
    assert "WorkerCrashed" in failed[0].error or "worker process" in failed[0].error
    if target == "dask worker":
        assert "Dask worker" in failed[0].error and "left the cluster" in failed[0].error
    else:
        assert f"pid {victim} on Dask worker" in failed[0].error and "SIGKILL" in failed[0].error


# -- connecting and the command line -----------------------------------------------


class _FakeClient:
    def __init__(self, found: dict[str, Any]) -> None:
        self.found = found

    def run(self, fn: Any) -> dict[str, Any]:
        return self.found


def test_a_version_mismatch_is_refused_with_what_to_install() -> None:
    import wfaas

    python = "{}.{}".format(*sys.version_info[:2])
    check_versions(_FakeClient({"tcp://a:1": {"wfaas": wfaas.__version__, "python": python}}))
    with pytest.raises(RuntimeError) as info:
        check_versions(
            _FakeClient(
                {
                    "tcp://a:1": {"wfaas": wfaas.__version__, "python": python},
                    "tcp://b:2": {"wfaas": "0.0.1", "python": python},
                    "tcp://c:3": {"wfaas": None, "python": python},
                }
            )
        )
    message = str(info.value)
    assert f"driver has wfaas {wfaas.__version__}, worker tcp://b:2 has 0.0.1" in message
    assert "worker tcp://c:3 does not have it" in message
    assert f"pip install 'wfaas[dask]=={wfaas.__version__}'" in message
    assert "tcp://a:1" not in message


def test_the_real_workers_pass_the_version_check(client: Any) -> None:
    check_versions(client)


def test_cli_runs_on_a_scheduler_address_and_resumes_after_the_driver_died(client: Any, tmp_path: Path) -> None:
    """`wfaas-local run --dask ADDRESS`; the driver dies mid-step; its remote step dies too; resume finishes."""
    address = client.scheduler.address
    store = tmp_path / "runs.sqlite"
    target = tmp_path / "twostep.py"
    target.write_text(TWO_STEPS)
    cli = str(Path(sys.executable).parent / "wfaas-local")
    data = json.dumps({"folder": str(tmp_path)})
    driver = subprocess.Popen(
        [cli, "run", f"{target}:workflow", "--data", data, "--store", str(store), "--dask", address, "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        step = int(wait_for_text(tmp_path / "second.pid", timeout=60))
        driver.kill()
        driver.wait(timeout=10)
        # Its Dask client is gone, so its task is released and the step process killed.
        wait_until(lambda: not alive(step), timeout=15, what="the dead driver's remote step to be stopped")
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(timeout=10)
    (tmp_path / "release").write_text("go")
    ids = subprocess.run(
        [cli, "list", "--store", str(store), "--json"], capture_output=True, text=True, timeout=60, check=True
    )
    [run] = json.loads(ids.stdout)
    resumed = subprocess.run(
        [cli, "resume", run["instance_id"], "--store", str(store), "--dask", address],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "COMPLETED" in resumed.stdout
    first_runs = (tmp_path / "first.count").read_text()
    assert first_runs == "x", "the step that succeeded before the driver died ran again"


TWO_STEPS = """
import os
from dataclasses import dataclass
from pathlib import Path

from wfaas import StepDefinition, WorkflowData, WorkflowDefinition


@dataclass
class D(WorkflowData):
    folder: str = ""
    done: int = 0


def first(ctx):
    with open(Path(ctx.data.folder, "first.count"), "a") as f:
        f.write("x")
    ctx.data.done += 1


def second(ctx):
    folder = Path(ctx.data.folder)
    (folder / "second.tmp").write_text(str(os.getpid()))
    os.replace(folder / "second.tmp", folder / "second.pid")
    import time

    while not (folder / "release").exists():
        time.sleep(0.05)  # the test's signal, in a file: it lives in another process
    ctx.data.done += 1


workflow = (
    WorkflowDefinition("twostep", "two steps", data_type=D)
    .add_step(StepDefinition("first", "first", first))
    .add_step(StepDefinition("second", "second", second).depends_on(["first"]))
)
"""


def test_importing_wfaas_does_not_import_distributed() -> None:
    code = "import sys, wfaas; wfaas.DaskBackend; print('distributed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


_ = WorkflowStatus  # re-exported names used in messages above
