"""``wfaas-local``: run and inspect workflows from the shell.

Exit codes: 0 the workflow completed (or the command did its job), 1 the
workflow failed or was cancelled, 2 bad usage or an invalid definition (one
clear line, never a traceback), 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP (the
first of them cancels the runs gracefully, a second kills their steps at
once; see ``_signals.py``).

A run records its TARGET (``module:attr`` or ``file.py:attr``) with its
checkpoints, so ``resume ID`` and ``recover`` find the definition again
without being told. ``cancel ID`` works from another terminal: ``run``
handles SIGUSR1 by cancelling its run gracefully, and records that signal as
the run owner's ``cancel_signal``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from . import _cli_logs, cli_items
from .cli_engine import close_engine, follow, interrupt_code, start_engine, stopped_by
from .cli_errors import EXIT_FAILED, EXIT_INTERRUPTED, INTERRUPT_CODES, DamagedRuns, UsageProblem, fail
from .cli_items import show_step
from .cli_store import DEFAULT_STORE, bulk, load_run, open_store, orphans_by_target, read_metas, resolve_id
from .cli_tables import runs_json, state_json
from .cli_target import absolute_target, build_data, load_target
from .cli_text import console, plural
from .definition import for_each_text, topological_order
from .errors import InvalidDefinition, SerializationError, StoreError
from .states import StepStatus, WorkflowStatus

dask_option = click.option(
    "--dask",
    metavar="ADDRESS",
    help="Run steps on a Dask cluster: its scheduler's address (tcp://host:8786), "
    "or local[:N] to start a local one of N worker processes. Workers need wfaas installed.",
)


class _Main(click.Group):
    """Every command: a store that turns out bad while a command reads it is one line, exit 2, no traceback;
    a signal that reaches no run (before the engine starts, in a read-only command) still exits 128 + N
    (click would print ``Aborted!`` and exit 1).
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except StoreError as exc:
            raise UsageProblem(str(exc).replace("\n", " ")) from exc
        except KeyboardInterrupt as exc:
            click.echo(stopped_by(exc), err=True)
            ctx.exit(interrupt_code(exc))


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="wfaas", prog_name="wfaas-local")
def main() -> None:
    """Run wfaas workflows on this machine and look at their runs.

    \b
    Example:
      wfaas-local run examples/quickstart.py:workflow --data '{"input": "hi"}'
      wfaas-local status
    """


store_option = click.option(
    "--store",
    default=DEFAULT_STORE,
    show_default=True,
    envvar="WFAAS_STORE",
    show_envvar=True,
    help="SQLite file holding the runs (:memory: for none).",
)

param_option = click.option(
    "--param",
    "params",
    multiple=True,
    metavar="FIELD=VALUE",
    help="Set one data field, VALUE read by the field's type (repeatable; over --data).",
)


@main.command()
@click.argument("target")
@click.option("--data", help="The data as JSON, or @file.json.")
@param_option
@store_option
@click.option("--workers", type=click.IntRange(min=1), help="Worker processes (default: CPU count).")
@click.option("--quiet", is_flag=True, help="Print only errors.")
@click.option("--json", "as_json", is_flag=True, help="Print the final state as JSON on stdout.")
@dask_option
@_cli_logs.log_level_option
def run(
    target: str,
    data: str | None,
    params: tuple[str, ...],
    store: str,
    workers: int | None,
    quiet: bool,
    as_json: bool,
    dask: str | None,
) -> None:
    """Run the workflow TARGET (module:attr or file.py:attr; no :attr means :workflow) and wait for it.

    \b
    Example:
      wfaas-local run examples/batch_files.py:workflow --workers 2
      wfaas-local run examples/batch_files.py:workflow --dask local:2
      wfaas-local run examples/resume.py --param input_file=/tmp/numbers.txt
    """
    definition = load_target(target)
    payload = build_data(definition, data, params)
    state_store = open_store(store)
    engine = start_engine(state_store, workers, absolute_target(target), dask)
    try:
        try:
            engine.register_workflow(definition)
        except InvalidDefinition as exc:
            fail(str(exc).replace("\n", " "))
        code = follow(
            engine,
            lambda: engine.start_workflow(definition.id, payload),
            "run",
            definition,
            quiet=quiet,
            as_json=as_json,
            store_path=store,
        )
    finally:
        close_engine(engine, state_store)
    sys.exit(code)


@main.command()
@click.argument("instance_id", metavar="ID")
@click.option("--force", is_flag=True, help="Resume even if the workflow's steps or dependencies changed.")
@click.option("--rerun", multiple=True, metavar="STEP", help="Also run STEP and everything downstream again.")
@store_option
@click.option("--workers", type=click.IntRange(min=1), help="Worker processes (default: CPU count).")
@click.option("--quiet", is_flag=True, help="Print only errors.")
@dask_option
@_cli_logs.log_level_option
def resume(
    instance_id: str,
    force: bool,
    rerun: tuple[str, ...],
    store: str,
    workers: int | None,
    quiet: bool,
    dask: str | None,
) -> None:
    """Continue a failed, cancelled or interrupted run; succeeded steps do not run again.

    \b
    Example:
      wfaas-local resume 3f2a --rerun clean
    """
    state_store = open_store(store, must_exist=True)
    iid = resolve_id(state_store, instance_id)
    record = state_store.read(iid)
    assert record is not None
    origin = record.extra.get("origin")
    if not origin:
        fail(f"run {iid} was not started by wfaas-local; resume it from Python with engine.resume({iid!r})")
    definition = load_target(origin)
    from .cli_resume import resume_problem

    problem = resume_problem(iid, record, definition, rerun, force=force)
    if problem:
        state_store.close()
        fail(problem)
    engine = start_engine(state_store, workers, origin, dask)
    try:
        engine.register_workflow(definition)
        code = follow(
            engine,
            lambda: engine.resume(iid, rerun=list(rerun), force=force),
            "resumed",
            definition,
            quiet=quiet,
            as_json=False,
            store_path=store,
        )
    finally:
        close_engine(engine, state_store)
    sys.exit(code)


@main.command()
@store_option
@click.option("--workers", type=click.IntRange(min=1), help="Worker processes (default: CPU count).")
@click.option("--quiet", is_flag=True, help="Print only errors.")
@dask_option
@_cli_logs.log_level_option
def recover(store: str, workers: int | None, quiet: bool, dask: str | None) -> None:
    """Resume every run whose process died while it was running.

    \b
    Example:
      wfaas-local recover --store .wfaas/runs.sqlite
    """
    state_store = open_store(store, must_exist=True)
    origins, skipped = orphans_by_target(state_store)
    for line in skipped:
        click.echo(line, err=True)
    if not origins:
        click.echo("nothing to recover")
        state_store.close()
        return
    # Targets first: workers import step modules from the sys.path they start with.
    definitions = {origin: load_target(origin) for origin in origins}
    engine = start_engine(state_store, workers, None, dask)
    code = 0
    try:
        for definition in definitions.values():
            engine.register_workflow(definition)
        # One run after another, each followed as `resume` follows it (issue 13, defect 5).
        for origin, iid in [(origin, iid) for origin, iids in origins.items() for iid in iids]:
            code = max(
                code,
                follow(
                    engine,
                    lambda iid=iid: engine.resume(iid),
                    "recovered",
                    definitions[origin],
                    quiet=quiet,
                    as_json=False,
                    store_path=store,
                ),
            )
            if code in INTERRUPT_CODES:
                break
    finally:
        close_engine(engine, state_store)
    sys.exit(code)


@main.command()
@click.argument("instance_id", metavar="[ID]", required=False)
@store_option
@click.option("--json", "as_json", is_flag=True, help="Print the state as JSON.")
@click.option(
    "--step",
    metavar="STEP",
    help="Show this step's attempts, with errors and tracebacks (a for_each step: its items; 'STEP[KEY]': one item).",
)
@bulk
def status(instance_id: str | None, store: str, as_json: bool, step: str | None) -> None:
    """Show a run's steps (no ID: the newest run). Safe while the run is in progress.

    \b
    Example:
      wfaas-local status 3f2a --json
      wfaas-local status 3f2a --step parse
    """
    from .cli_tables import Selection, owner_note, print_steps

    state_store = open_store(store, readonly=True)
    try:
        iid = resolve_id(state_store, instance_id)
        record = state_store.read(iid)
        # A run of thousands of steps: decode only the steps the table shows (issue 13, defect 13).
        selection = None if as_json or step is not None or record is None else Selection.of_records(record.steps)
        if selection is not None and record is not None:
            record.steps = {sid: record.steps[sid] for sid in selection.ids}
        state, record = load_run(state_store, iid, record)
    finally:
        state_store.close()
    if step is not None:
        show_step(state, step, as_json)
        return
    note = owner_note(record.meta, iid, None if store == DEFAULT_STORE else store)
    if as_json:
        click.echo(cli_items.dumps({**state_json(state), "owner_gone": note is not None}))
    else:
        print_steps(state, console(), note=note, selection=selection)


@main.command()
@click.argument("instance_id", metavar="[ID]", required=False)
@store_option
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True),
    help="The HTML file to write (default: wfaas-report-ID.html here).",
)
@bulk
def report(instance_id: str | None, store: str, output: str | None) -> None:
    """Write a run's report (no ID: the newest run): one HTML file, no server or network needed.

    A timeline with every attempt coloured by outcome, waits hatched, kills
    marked with their signal (hover a bar for its figures and error), the DAG,
    and a summary with the slowest steps and the critical path. A run in
    progress is drawn up to now.

    \b
    Example:
      wfaas-local report 3f2a -o report.html
    """
    from .report import render_report

    state_store = open_store(store, readonly=True)
    try:
        iid = resolve_id(state_store, instance_id)
        state, record = load_run(state_store, iid)
    finally:
        state_store.close()
    steps = (record.extra.get("fingerprint") or {}).get("steps", {})
    dependencies = {sid: (s["depends_on"], s["depends_on_any"]) for sid, s in steps.items()}
    html = render_report(state, dependencies, None if state.status.is_terminal else datetime.now(UTC))
    path = Path(output or f"wfaas-report-{iid[:8]}.html")
    try:
        path.write_text(html, encoding="utf-8")
    except OSError as exc:
        fail(f"cannot write the report to {path}: {exc.strerror}; choose another file with -o")
    click.echo(
        f"wrote {path} ({state.workflow_id} {iid}: {state.status.name}, {plural(len(state.step_states), 'step')})"
    )


@main.command(name="list")
@store_option
@click.option("--status", "status_filter", type=click.Choice([s.name for s in WorkflowStatus], case_sensitive=False))
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the runs as JSON.")
def list_runs(store: str, status_filter: str | None, limit: int, as_json: bool) -> None:
    """List runs, newest first.

    \b
    Example:
      wfaas-local list --status FAILED --limit 5
    """
    state_store = open_store(store, readonly=True)
    rows = []
    metas, damaged = read_metas(state_store)
    for iid, meta in metas:
        if status_filter and meta["status"] != status_filter.lower():
            continue
        rows.append((meta.get("created_at"), iid, meta))
    state_store.close()
    rows.sort(key=lambda r: r[0] or datetime.min.replace(tzinfo=UTC), reverse=True)
    rows = rows[:limit]
    if as_json:
        click.echo(json.dumps(runs_json(rows), indent=2))
        _exit_if_damaged(damaged)
        return
    from .cli_tables import owner_note, print_runs

    if not rows:
        which = f" {status_filter.upper()}" if status_filter else ""
        none = f"no{which} readable runs in {store}" if damaged else f"no{which} runs in {store} yet"
        click.echo(none if damaged else f"{none}; start one with `wfaas-local run TARGET`")
    else:
        store_arg = None if store == DEFAULT_STORE else store
        notes = {iid: n for _, iid, m in rows if (n := owner_note(m, iid, store_arg))}
        print_runs(rows, console(), notes)
    _exit_if_damaged(damaged)


def _exit_if_damaged(damaged: list[str]) -> None:
    """After showing the runs that could be read: one line per damaged run, exit 2."""
    if damaged:
        raise DamagedRuns(damaged)


@main.command()
@click.argument("instance_id", metavar="ID")
@store_option
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for the run to stop.")
def cancel(instance_id: str, store: str, timeout: float) -> None:
    """Cancel a run in progress, from any terminal: its running steps are stopped.

    \b
    Example:
      wfaas-local cancel 3f2a
    """
    from .engine import owner_alive

    state_store = open_store(store, readonly=True)
    try:
        iid = resolve_id(state_store, instance_id)
        meta = state_store.read_meta(iid) or {}
        status_now = WorkflowStatus(meta.get("status", "pending"))
        if status_now.is_terminal:
            fail(f"run {iid} has already finished ({status_now.name}); nothing to cancel")
        owner = meta.get("owner") or {}
        if not owner_alive(owner):
            fail(f"run {iid} is not running (its process {owner.get('pid')} is gone); `wfaas-local recover` resumes it")
        sig = owner.get("cancel_signal")
        if not sig:
            fail(f"run {iid} runs in process {owner.get('pid')}, which does not accept remote cancel; stop it there")
        os.kill(int(owner["pid"]), int(sig))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            meta = state_store.read_meta(iid) or {}
            if WorkflowStatus(meta["status"]).is_terminal:
                click.echo(f"run {iid}: {meta['status'].upper()}")
                return
            time.sleep(0.05)  # another process writes the store; there is nothing to block on
        click.echo(f"run {iid} did not stop within {timeout} s", err=True)
        sys.exit(EXIT_FAILED)
    finally:
        state_store.close()


@main.command()
@click.argument("target")
@click.option("--dot", is_flag=True, help="Print Graphviz dot instead of text.")
def graph(target: str, dot: bool) -> None:
    """Draw the DAG of TARGET: each step with what it waits for.

    \b
    Example:
      wfaas-local graph examples/dag.py:workflow --dot | dot -Tpng > dag.png
    """
    from .report import depths

    definition = load_target(target)
    if dot:
        click.echo(f'digraph "{definition.id}" {{')
        click.echo("  rankdir=LR;")
        for s in definition.steps:
            mark = for_each_text(s)
            # A for_each step is drawn as a stack of boxes (Graphviz's box3d), its cap under its name.
            extra = f'\\n{mark}", shape=box3d' if s.items is not None else (f'\\n{mark}"' if mark else '"')
            click.echo(f'  "{s.id}" [label="{s.id}\\n{s.name}{extra}];')
            for dep in s.dependencies:
                click.echo(f'  "{dep}" -> "{s.id}";')
            for dep in s.any_dependencies:
                click.echo(f'  "{dep}" -> "{s.id}" [style=dashed, label="any"];')
        click.echo("}")
        return
    click.echo(definition.explain())
    click.echo("")
    deps = {s.id: (list(s.dependencies), list(s.any_dependencies)) for s in definition.steps}
    levels = depths([s.id for s in topological_order(definition)], deps)  # the report's columns
    for level in range(max(levels.values()) + 1):
        by_id = {s.id: s for s in definition.steps}
        names = [sid + (" (for each)" if by_id[sid].items else "") for sid, lv in levels.items() if lv == level]
        click.echo(f"  [{level}] " + "   ".join(names))
        for s in definition.steps:
            if levels[s.id] == level:
                for dep in s.dependencies:
                    click.echo(f"        {dep} ──all──▶ {s.id}")
                for dep in s.any_dependencies:
                    click.echo(f"        {dep} ╌╌any╌╌▶ {s.id}")


@main.command()
@click.argument("target")
def check(target: str) -> None:
    """Pre-flight: validate TARGET, serialize every step body and the default data.

    \b
    Example:
      wfaas-local check examples/batch_files.py:workflow
    """
    import pickle

    from .data import encode_fields
    from .runs import encode_bodies

    definition = load_target(target)
    # The encoder register_workflow uses, then loaded back as a worker loads it.
    bodies, problems = encode_bodies(definition)
    first = {id(s.body): s.id for s in reversed(definition.steps)}
    for key, blob in bodies.items():
        try:
            pickle.loads(blob)
        except Exception as exc:  # noqa: BLE001 - each failure is listed
            problems.append(f"step {first[key]!r}: its body cannot be loaded in a worker: {type(exc).__name__}: {exc}")
    size = 0
    if definition.data_type is not None:
        try:
            fields = encode_fields(definition.data_type(), where=f"{definition.data_type.__name__}()")
            size = sum(map(len, fields.values()))
        except SerializationError as exc:
            problems.append(str(exc))
        except TypeError as exc:
            problems.append(f"{definition.data_type.__name__}() needs arguments: {exc}")
    if problems:
        fail(f"{target}: " + "; ".join(problems))
    steps, size_text = plural(len(definition.steps), "step"), plural(size, "byte")
    click.echo(f"ok: workflow {definition.id!r}, {steps}, default data {size_text} encoded")


@main.command()
@click.argument("target", required=False)
@click.option("--resume", "resume_id", metavar="ID", help="Plan the resume of this run instead of a new one.")
@click.option("--data", help="The data as JSON, or @file.json (for run_if).")
@param_option
@store_option
def plan(target: str | None, resume_id: str | None, data: str | None, params: tuple[str, ...], store: str) -> None:
    """Say, for each step, whether it will run, be skipped, wait, or is already done — without running anything.

    With --resume, TARGET may be left out: the run recorded it.

    \b
    Example:
      wfaas-local plan examples/dag.py:workflow --data '{"use_cache": true}'
      wfaas-local plan --resume 3f2a
    """
    from .cli_plan import plan_lines

    done: dict[str, str] = {}
    items_done: dict[str, tuple[int, int]] = {}
    if resume_id:
        from .cli_resume import resume_problem

        state_store = open_store(store, readonly=True)
        try:
            iid = resolve_id(state_store, resume_id)
            state, record = load_run(state_store, iid)
        finally:
            state_store.close()
        origin = target or record.extra.get("origin")
        if not origin:
            fail(f"run {iid} did not record its workflow (not started by wfaas-local); name it as TARGET")
        definition = load_target(origin)
        problem = resume_problem(iid, record, definition)
        if problem:
            fail(problem)
        payload = state.data
        done = {
            sid: s.status.name
            for sid, s in state.step_states.items()
            if s.status in (StepStatus.SUCCEEDED, StepStatus.SKIPPED)
        }
        items_done = {sid: (s.items_done, s.items_total) for sid, s in state.step_states.items() if s.items}
    elif target is None:
        fail("plan needs a TARGET (module:attr or file.py:attr), or --resume ID")
    else:
        definition = load_target(target)
        payload = build_data(definition, data, params)
    for line in plan_lines(definition, payload, done, datetime.now(UTC), items_done):
        click.echo(line)


@main.command()
@click.argument("instance_id", metavar="ID")
@click.argument("step", required=False)
@click.option("--attempt", type=click.IntRange(min=1), help="Only this attempt (counted from 1).")
@click.option("-f", "--follow", is_flag=True, help="Keep printing as attempts of a run in progress end; stop with it.")
@store_option
@_cli_logs.log_level_option
def logs(instance_id: str, step: str | None, attempt: int | None, follow: bool, store: str) -> None:
    """Print what a run's steps printed and logged, one line each: time, step[item], attempt, text.

    Printed lines (stdout and stderr, C code and child processes included) are
    always shown; log records from WARNING up unless -v or --log-level says.
    Each attempt keeps its last 1 MiB.

    \b
    Example:
      wfaas-local logs 3f2a
      wfaas-local logs 3f2a parse --attempt 2
      wfaas-local logs 3f2a 'clean[b.csv]'
      wfaas-local logs 3f2a --follow
    """
    state_store = open_store(store, readonly=True)
    try:
        iid = resolve_id(state_store, instance_id)
        record = state_store.read(iid)
        sid, item = cli_items.split_item(step) if step and record and step not in record.steps else (step, None)
        if sid is not None and record is not None and sid not in record.steps:
            known = (record.extra.get("fingerprint") or {}).get("steps") or record.steps  # in definition order
            fail(f"run {iid} has no step {sid!r}; its steps: {', '.join(known)}")
        try:
            found = _cli_logs.print_logs(state_store, iid, sid, attempt, follow, click.echo, item=item)
        except KeyboardInterrupt:
            sys.exit(EXIT_INTERRUPTED)
    finally:
        state_store.close()
    if not found:
        what = f"step {step}" if step else f"run {iid}"
        click.echo(f"{what}: no output or log records were captured", err=True)


from .cli_prune import prune  # noqa: E402 - a command of its own module, added to the group here

main.add_command(prune)

if __name__ == "__main__":  # pragma: no cover
    main()
