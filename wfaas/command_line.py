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

import dataclasses
import importlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import click

from . import _cli_logs, _signals, _threads, events
from .cli_text import plural, with_article
from .definition import WorkflowDefinition, topological_order
from .errors import InvalidDefinition, InvalidStateTransition, NotFound, SerializationError, StoreError, WorkflowError
from .states import Attempt, StepStatus, WorkflowState, WorkflowStatus
from .store import InMemoryStore, Record, StateStore

DEFAULT_STORE = ".wfaas/runs.sqlite"
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
INTERRUPT_CODES = frozenset({EXIT_INTERRUPTED, 128 + 15, 128 + 1})  # SIGINT, SIGTERM, SIGHUP


class UsageProblem(click.ClickException):
    """A usage or definition error: one line on stderr, exit code 2."""

    exit_code = EXIT_USAGE


def fail(message: str) -> NoReturn:
    raise UsageProblem(message)


# -- targets and data ------------------------------------------------------------


def absolute_target(target: str) -> str:
    """The target with a file path made absolute, as recorded with a run (resume works from anywhere)."""
    module_part, attr = split_target(target)
    if module_part.endswith(".py") or os.sep in module_part:
        return f"{Path(module_part).resolve()}:{attr}"
    return f"{module_part}:{attr}"


def split_target(target: str) -> tuple[str, str]:
    """(module or file, attribute) of a TARGET; without ``:attr`` the attribute is ``workflow``."""
    module_part, sep, attr = target.rpartition(":")
    return (module_part, attr) if sep else (target, "workflow")


def found_hint(module: Any) -> str:
    found = sorted(k for k, v in vars(module).items() if isinstance(v, WorkflowDefinition))
    return f"; it defines: {', '.join(found)}" if found else "; it defines no WorkflowDefinition"


def load_target(target: str) -> WorkflowDefinition:
    """The WorkflowDefinition named by ``module:attr`` or ``path/file.py:attr``."""
    module_part, attr = split_target(target)
    if not module_part or not attr:
        fail(f"target {target!r} must look like package.module:workflow or path/to/file.py:workflow")
    if module_part.endswith(".py") or os.sep in module_part:
        path = Path(module_part).resolve()
        if not path.is_file():
            fail(f"target {target!r}: no file {module_part}")
        # Workers import step functions by module name: the file's folder must be on sys.path
        # before the engine starts its workers.
        sys.path.insert(0, str(path.parent))
        module_name = path.stem
    else:
        module_name = module_part
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is a one-line usage error
        fail(f"target {target!r}: cannot import {module_name!r}: {type(exc).__name__}: {exc}")
    if not hasattr(module, attr):
        found = sorted(k for k, v in vars(module).items() if isinstance(v, WorkflowDefinition))
        hint = f"; it defines: {', '.join(found)}" if found else "; it defines no WorkflowDefinition"
        fail(f"target {target!r}: module {module_name!r} has no attribute {attr!r}{hint}")
    value = getattr(module, attr)
    if isinstance(value, type):
        fail(
            f"target {target!r}: {attr} is the class {value.__name__}, not a WorkflowDefinition; "
            f"name the definition (or a function returning one){found_hint(module)}"
        )
    if callable(value) and not isinstance(value, WorkflowDefinition):
        try:
            value = value()
        except Exception as exc:  # noqa: BLE001 - reported as a usage error
            fail(f"target {target!r}: calling {attr}() raised {type(exc).__name__}: {exc}")
    if not isinstance(value, WorkflowDefinition):
        fail(f"target {target!r}: {attr} is {with_article(type(value).__name__)}, not a WorkflowDefinition")
    problems = value.validate()
    if problems:
        fail(f"target {target!r}: invalid workflow {value.id!r}: " + "; ".join(problems))
    return value


def build_data(definition: WorkflowDefinition, data: str | None, params: tuple[str, ...] = ()) -> Any:
    """The run's data: ``data_type(**fields)`` from JSON (``@file.json`` reads a file) and ``--param``s,
    each value checked against its field's type (:mod:`wfaas.params`)."""
    from .params import ParamError, build_fields

    fields: dict[str, Any] = {}
    if data:
        text = data
        if data.startswith("@"):
            try:
                text = Path(data[1:]).read_text()
            except OSError as exc:
                fail(f"--data {data}: cannot read the file: {exc}")
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as exc:
            fail(f"--data is not valid JSON: {exc}")
        if not isinstance(fields, dict):
            fail('--data must be a JSON object, e.g. \'{"input": "hello"}\'')
    cls = definition.data_type
    if cls is None:
        if fields or params:
            fail(f"--data given, but workflow {definition.id!r} declares no data_type to build it with")
        fail(f"workflow {definition.id!r} declares no data_type; the CLI cannot build its data")
    try:
        fields = build_fields(cls, fields, params)
    except ParamError as exc:
        fail(str(exc))
    try:
        return cls(**fields)
    except TypeError as exc:
        fail(f"--data: cannot build {cls.__name__}: {exc}")


def open_store(path: str, *, readonly: bool = False, must_exist: bool = False) -> StateStore:
    """The store at ``path``; commands that only read (``readonly``) or resume (``must_exist``) never create one."""
    if path == ":memory:":
        return InMemoryStore()
    from .sqlite_store import SqliteStore

    if (readonly or must_exist) and not os.path.lexists(path):
        fail(
            f"no wfaas store at {path}: nothing has run with it here, and this command never creates one; "
            "name the store with --store PATH or the WFAAS_STORE environment variable"
        )
    try:
        return SqliteStore(path, readonly=readonly, create=not must_exist)
    except StoreError as exc:
        fail(str(exc))


def read_metas(store: StateStore) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """Every run's meta, and one line per run whose record is damaged (the others are still shown)."""
    metas, damaged = [], []
    for iid in store.ids():
        try:
            meta = store.read_meta(iid)
        except StoreError as exc:
            damaged.append(str(exc))
            continue
        if meta is not None:
            metas.append((iid, meta))
    return metas, damaged


def load_state(store: StateStore, iid: str) -> WorkflowState[Any]:
    """A run's state; its data decoded where the run's own code can be imported."""
    return load_run(store, iid)[0]


def load_run(store: StateStore, iid: str, record: Record | None = None) -> tuple[WorkflowState[Any], Record]:
    """A run's state (as :func:`load_state`) and the stored record it was decoded from (or is given)."""
    from .store import record_to_state

    record = record or store.read(iid)
    if record is None:
        fail(f"no run {iid} in this store")
    origin = record.extra.get("origin")
    if origin:
        module_part = origin.rpartition(":")[0]
        if module_part.endswith(".py") or os.sep in module_part:
            sys.path.insert(0, str(Path(module_part).resolve().parent))
        elif os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
    try:
        return record_to_state(iid, record), record
    except Exception as exc:  # noqa: BLE001 - show the steps anyway
        state = record_to_state(iid, record, decode_data=False)
        state.data = f"(not decodable here: {type(exc).__name__}: {exc})"
        return state, record


def resolve_id(store: StateStore, prefix: str | None) -> str:
    """A full instance id from a unique prefix; no prefix: the newest run."""
    ids = store.ids()
    if prefix is None:
        if not ids:
            fail("no runs in this store yet; start one with `wfaas-local run TARGET`")
        readable, _ = read_metas(store)  # a damaged run is never the newest: it cannot be shown
        if not readable:
            fail(f"no readable run in this store: {store!r} holds only damaged records")
        metas = [(meta, i) for i, meta in readable]
        return max(metas, key=lambda m: m[0].get("created_at") or datetime.min.replace(tzinfo=UTC))[1]
    matches = [i for i in ids if i.startswith(prefix)]
    if not matches:
        fail(f"no run with id {prefix!r} in this store (`wfaas-local list` shows them)")
    if len(matches) > 1:
        fail(f"id prefix {prefix!r} is ambiguous: {', '.join(sorted(matches))}")
    return matches[0]


# -- output ------------------------------------------------------------------------


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def _fmt_seconds(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds:.2f}s"


def _duration(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return (end - start).total_seconds()


def state_json(state: WorkflowState[Any]) -> dict[str, Any]:
    """A run as plain JSON-able data."""
    data: Any = state.data
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        data = {k: v for k, v in vars(data).items()}
    return {
        "instance_id": state.instance_id,
        "workflow_id": state.workflow_id,
        "status": state.status.name,
        "error": state.error,
        "failed_step": state.failed_step,
        "created_at": state.created_at.isoformat() if state.created_at else None,
        "updated_at": state.updated_at.isoformat() if state.updated_at else None,
        "steps": {
            sid: {
                "status": s.status.name,
                "attempts": s.attempts,
                "started_at": s.started_at.isoformat() if s.started_at else None,
                "finished_at": s.finished_at.isoformat() if s.finished_at else None,
                "duration": _duration(s.started_at, s.finished_at),
                "error": s.error,
                "history": [attempt_json(a) for a in s.history],
            }
            for sid, s in state.step_states.items()
        },
        "data": json.loads(json.dumps(data, default=repr)),
    }


def attempt_json(attempt: Attempt) -> dict[str, Any]:
    """One attempt's figures as plain JSON-able data (times as ISO 8601)."""
    out = attempt.to_record()
    for key in ("started_at", "finished_at"):
        out[key] = out[key].isoformat() if out[key] else None
    return out


def _fmt_bytes(n: float | None) -> str:
    return "" if n is None else f"{n / 2**20:.0f} MiB"


def print_summary(state: WorkflowState[Any], console: Any, note: str | None = None) -> None:
    """The table of steps: status, attempts, and the last attempt's figures (waits summed over attempts)."""
    from .cli_tables import print_steps

    print_steps(state, console, note=note)


class Progress:
    """Follows a run's events: a live panel on a terminal, one line per event otherwise."""

    def __init__(self, total: int, *, live: bool, quiet: bool, console: Any) -> None:
        self.total = total
        # Keyed by step (and item): a resume seeds the steps already done, and an event for one of
        # them (or a rerun's) is not counted twice.
        self._done: set[tuple[str, str | None]] = set()
        self.active = True  # False once its run ended: `recover` follows several runs in turn
        self.running: dict[str, tuple[int, float]] = {}
        self.waiting: dict[str, str] = {}
        self.retries = 0
        self.started = time.monotonic()
        self.quiet = quiet
        self.console = console
        self._live: Any = None
        self._lock = threading.Lock()
        self._held: list[str] | None = []  # lines wait until the run id is printed (release)
        if live and not quiet:
            from rich.live import Live

            self._live = Live(get_renderable=self.render, console=console, refresh_per_second=8, transient=True)

    def __enter__(self) -> Progress:
        if self._live is not None:
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()
            elapsed = time.monotonic() - self.started
            retries = plural(self.retries, "retry", "retries")
            self.console.print(
                f"{self.done}/{plural(self.total, 'step')} done in {elapsed:.1f}s, {retries}", markup=False
            )

    @property
    def done(self) -> int:
        return len(self._done)

    def seed(self, state: WorkflowState[Any]) -> None:
        """Count the steps the run had finished before it was followed (a resume)."""
        with self._lock:
            for sid, s in state.step_states.items():
                if s.status in (StepStatus.SUCCEEDED, StepStatus.SKIPPED):
                    self._done.add((sid, None))

    def render(self) -> Any:
        from rich.table import Table
        from rich.text import Text

        with self._lock:
            now = time.monotonic()
            table = Table.grid(padding=(0, 2))
            table.add_row(
                f"[bold]{self.done}/{self.total}[/] {'step' if self.total == 1 else 'steps'} done",
                f"elapsed {now - self.started:.1f}s",
                f"retries {self.retries}",
            )
            for sid, (attempt, since) in sorted(self.running.items()):
                table.add_row(Text(f"  running {sid}"), f"attempt {attempt}", f"{now - since:.1f}s")
            for sid, why in sorted(self.waiting.items()):
                table.add_row(Text(f"  waiting {sid}"), why, "")
            return table

    def __call__(self, event: events.WorkflowEvent) -> None:
        if not self.active:
            return
        if isinstance(event, events.StepOutput):
            self._output(event)
            return
        with self._lock:
            line = self._apply(event)
        if line and self._live is None:
            important = isinstance(event, (events.WorkflowFailed, events.StepFailed)) and not getattr(
                event, "will_retry", False
            )
            if not self.quiet or important:
                stamp = event.timestamp.astimezone().strftime("%H:%M:%S")
                with self._lock:
                    if self._held is not None:
                        self._held.append(f"{stamp} {line}")
                        return
                self.console.print(f"{stamp} {line}", markup=False)

    def _output(self, e: events.StepOutput) -> None:
        """What an attempt printed and logged, each line prefixed with its step (above the live panel)."""
        if self.quiet:
            return
        for when, _, text in _cli_logs.shown(e.lines):
            prefix = f"{e.step_id} |" if self._live is not None else f"{_cli_logs.stamp(when)[:8]} {e.step_id} |"
            for line in _cli_logs.prefixed(prefix, text):
                with self._lock:
                    if self._held is not None:
                        self._held.append(line)
                        continue
                self.console.print(_cli_logs.safe(line) if self._live is not None else line, markup=False)

    def release(self) -> None:
        """Print the lines held back so far; from now on print as events come."""
        with self._lock:
            # Printed under the lock: an event line waits for the held ones before it (issue 13, defect 9).
            held, self._held = self._held or [], None
            for line in held:
                self.console.print(line, markup=False)

    def _apply(self, e: events.WorkflowEvent) -> str:
        if isinstance(e, events.StepStarted):
            self.waiting.pop(e.step_id, None)
            self.running[e.step_id] = (e.attempt, time.monotonic())
            self._done.discard((e.step_id, getattr(e, "item_key", None)))
            return f"{e.step_id}: started (attempt {e.attempt})"
        if isinstance(e, events.StepSucceeded):
            self.running.pop(e.step_id, None)
            self._done.add((e.step_id, getattr(e, "item_key", None)))
            return f"{e.step_id}: succeeded in {e.duration:.2f}s [{self.done}/{self.total}]"
        if isinstance(e, events.StepSkipped):
            self._done.add((e.step_id, getattr(e, "item_key", None)))
            return f"{e.step_id}: skipped ({e.reason}) [{self.done}/{self.total}]"
        if isinstance(e, events.StepFailed):
            self.running.pop(e.step_id, None)
            if not e.will_retry:
                self._done.add((e.step_id, getattr(e, "item_key", None)))
            return f"{e.step_id}: attempt {e.attempt} failed: {e.error}" + (" (will retry)" if e.will_retry else "")
        if isinstance(e, events.StepRetrying):
            self.retries += 1
            self.waiting[e.step_id] = f"backoff {e.delay:.2f}s"
            return f"{e.step_id}: retrying in {e.delay:.2f}s (attempt {e.attempt})"
        if isinstance(e, events.WorkflowCompleted):
            return f"workflow completed in {e.duration:.2f}s"
        if isinstance(e, events.WorkflowFailed):
            return f"workflow failed at step {e.failed_step}: {e.error}"
        if isinstance(e, events.WorkflowCancelled):
            return "workflow cancelled"
        if isinstance(e, events.WorkflowStarted):
            return "workflow started"
        return ""


# -- running -------------------------------------------------------------------------


def _cancel_quietly(engine: Any, instance_id: str) -> None:
    """Cancel gracefully; a run that finished (or was never here) meanwhile is no error."""
    try:
        engine.cancel_workflow(instance_id)
    except (InvalidStateTransition, NotFound):
        pass


@contextmanager
def _cancel_on_sigusr1(engine: Any, instance_ids: list[str]) -> Iterator[None]:
    """`wfaas-local cancel ID` from another terminal sends SIGUSR1: cancel gracefully."""

    def handler(signum: int, frame: object) -> None:
        for iid in list(instance_ids):
            _threads.start(_cancel_quietly, "wfaas-remote-cancel", engine, iid)

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR1, previous)


def follow(
    engine: Any, start: Any, verb: str, definition: WorkflowDefinition, *, quiet: bool, as_json: bool, store_path: str
) -> int:
    """Start a run with ``start()``, follow it with progress, print the outcome; returns the exit code."""
    out = _console(stderr=as_json)
    progress = Progress(
        len(definition.steps), live=out.is_terminal and not as_json, quiet=quiet or as_json, console=out
    )
    engine.event_bus.subscribe(progress)
    try:
        iid = start()
    except (WorkflowError, TypeError, ValueError) as exc:
        fail(str(exc).replace("\n", " "))
    resume_cmd = f"wfaas-local resume {iid}" + (f" --store {store_path}" if store_path != DEFAULT_STORE else "")
    how_in_a_line = f"continue it with: {resume_cmd}"
    how = f"continue it with:\n  {resume_cmd}"  # on a terminal the command gets a line of its own, to copy whole
    if store_path == ":memory:":  # nothing outlives this process: there is no run to resume
        how = how_in_a_line = (
            "it cannot be resumed (--store :memory: keeps no run): run it again, with a store file to resume later"
        )
    code = 0
    stopped: StoreError | None = None
    try:
        progress.seed(engine.get_status(iid))
        click.echo(f"{verb} {iid}", err=as_json)
        progress.release()
        with progress, _cancel_on_sigusr1(engine, [iid]):
            try:
                engine.wait_for_completion(iid)
            except StoreError as exc:
                stopped, code = exc, EXIT_FAILED
            except WorkflowError:
                code = EXIT_FAILED
            engine.event_bus.flush()
    except KeyboardInterrupt as exc:
        engine.force_cancel_all()  # wait_for_completion cancelled it, unless the signal came before
        engine.event_bus.flush()
        out.print(f"{_stopped_by(exc)}: the run was cancelled and checkpointed; {how}", markup=False)
        return _interrupt_code(exc)
    progress.active = False
    if stopped is not None:
        # The store could not take the run's last state: say why in one line, not what it holds.
        then = f"; {how_in_a_line}" if stopped.resumable else ""
        _console(stderr=True).print(f"STOPPED: {stopped}{then}", markup=False)
        return code
    state = engine.get_status(iid)
    if as_json:
        click.echo(json.dumps(state_json(state), indent=2))
    elif not quiet:
        print_summary(state, out)
    if state.status is WorkflowStatus.FAILED:
        from .cli_tables import step_error
        from .cli_text import shorten

        err = _console(stderr=True)
        failed = f"FAILED at step {state.failed_step}: {step_error(state.error or '')}"
        err.print(shorten(failed, err.width) if err.is_terminal else failed, markup=False)
        _cli_logs.print_failed_traceback(state, err, "" if store_path == DEFAULT_STORE else f" --store {store_path}")
        if store_path == ":memory:":
            err.print(how, markup=False)
        else:
            err.print(f"fix the cause, then continue with:\n  {resume_cmd}", markup=False)
    elif state.status is WorkflowStatus.CANCELLED:
        _console(stderr=True).print(f"CANCELLED; {how}", markup=False)
    return code


# The running command's signal handling: set up before its engine exists (the engine then leaves
# SIGTERM/SIGHUP to it), taken down when the engine closes.
_stop: _signals.StopOnSignals | None = None


def _stopped_by(exc: BaseException) -> str:
    signum = getattr(exc, "signum", signal.SIGINT)
    return "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"


def _interrupt_code(exc: BaseException) -> int:
    return int(getattr(exc, "exit_code", EXIT_INTERRUPTED))


def _engine(store: StateStore, workers: int | None, origin: str | None, dask: str | None = None) -> Any:
    from .engine import WorkflowEngine

    global _stop
    backend = None
    if dask is not None:
        from .dask_backend import DaskBackend

        backend = DaskBackend(dask)
        try:
            backend.connect()
        except (ImportError, OSError, RuntimeError, ValueError) as exc:
            store.close()
            fail(f"--dask {dask}: {exc}")
    if _stop is None:
        # print(), not click.echo: on a terminal the live panel's sys.stderr puts the line above the panel.
        _stop = _signals.StopOnSignals(lambda text: print(text, file=sys.stderr, flush=True)).__enter__()
    try:
        engine = WorkflowEngine(store=store, max_workers=workers, cancel_signal=int(signal.SIGUSR1), backend=backend)
    except BaseException:
        _stop.__exit__()
        _stop = None
        raise
    engine.origin = origin
    _stop.engine = engine
    return engine


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
            click.echo(_stopped_by(exc), err=True)
            ctx.exit(_interrupt_code(exc))


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
    engine = _engine(state_store, workers, absolute_target(target), dask)
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
        _close(engine, state_store)
    sys.exit(code)


def _close(engine: Any, store: StateStore) -> None:
    global _stop
    try:
        engine.force_cancel_all(grace=0.0) if engine.active_instances() else None
    except KeyboardInterrupt:
        pass
    engine.close()
    store.close()
    if _stop is not None:
        _stop.engine = None
        if _stop.signum is None:  # after a signal ours stay: one more must not raise on the way out
            _stop.__exit__()
            _stop = None


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
    engine = _engine(state_store, workers, origin, dask)
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
        _close(engine, state_store)
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
    from .engine import owner_alive

    state_store = open_store(store, must_exist=True)
    origins: dict[str, list[str]] = {}
    metas, damaged = read_metas(state_store)
    for line in damaged:  # the damage stays with its run: the others are recovered
        click.echo(f"skipping: {line}", err=True)
    for iid, meta in metas:
        if meta.get("status") in ("running", "pending") and not owner_alive(meta.get("owner") or {}):
            try:
                record = state_store.read(iid)
            except StoreError as exc:
                click.echo(f"skipping: {exc}", err=True)
                continue
            origin = record.extra.get("origin") if record else None
            if origin:
                origins.setdefault(origin, []).append(iid)
            else:
                click.echo(f"skipping {iid}: not started by wfaas-local (resume it from Python)", err=True)
    if not origins:
        click.echo("nothing to recover")
        state_store.close()
        return
    # Targets first: workers import step modules from the sys.path they start with.
    definitions = {origin: load_target(origin) for origin in origins}
    engine = _engine(state_store, workers, None, dask)
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
        _close(engine, state_store)
    sys.exit(code)


@main.command()
@click.argument("instance_id", metavar="[ID]", required=False)
@store_option
@click.option("--json", "as_json", is_flag=True, help="Print the state as JSON.")
@click.option("--step", metavar="STEP", help="Show this step's attempts, with errors and tracebacks.")
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
        if step not in state.step_states:
            fail(f"run {state.instance_id} has no step {step!r}; its steps: {', '.join(state.step_states)}")
        if as_json:
            click.echo(json.dumps(state_json(state)["steps"][step], indent=2))
        else:
            _cli_logs.print_step(state, step, _console())
        return
    note = owner_note(record.meta, iid, None if store == DEFAULT_STORE else store)
    if as_json:
        click.echo(json.dumps({**state_json(state), "owner_gone": note is not None}, indent=2))
    else:
        print_steps(state, _console(), note=note, selection=selection)


@main.command()
@click.argument("instance_id", metavar="[ID]", required=False)
@store_option
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True),
    help="The HTML file to write (default: wfaas-report-ID.html here).",
)
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
    from .cli_tables import owner_note, run_duration

    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "instance_id": iid,
                        "workflow_id": m["workflow_id"],
                        "status": m["status"].upper(),
                        "created_at": created.isoformat() if created else None,
                        "error": m.get("error"),
                        "duration": run_duration(m),
                        "owner_gone": owner_note(m, iid, None) is not None,
                    }
                    for created, iid, m in rows
                ],
                indent=2,
            )
        )
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
        print_runs(rows, _console(), notes)
    _exit_if_damaged(damaged)


def _exit_if_damaged(damaged: list[str]) -> None:
    """After showing the runs that could be read: one line per damaged run, exit 2."""
    for line in damaged:
        click.echo(f"Error: {line}", err=True)
    if damaged:
        sys.exit(EXIT_USAGE)


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
    definition = load_target(target)
    if dot:
        click.echo(f'digraph "{definition.id}" {{')
        click.echo("  rankdir=LR;")
        for s in definition.steps:
            click.echo(f'  "{s.id}" [label="{s.id}\\n{s.name}"];')
            for dep in s.dependencies:
                click.echo(f'  "{dep}" -> "{s.id}";')
            for dep in s.any_dependencies:
                click.echo(f'  "{dep}" -> "{s.id}" [style=dashed, label="any"];')
        click.echo("}")
        return
    click.echo(definition.explain())
    click.echo("")
    levels: dict[str, int] = {}
    for s in topological_order(definition):
        deps = [*s.dependencies, *s.any_dependencies]
        levels[s.id] = 1 + max((levels[d] for d in deps), default=-1)
    for level in range(max(levels.values()) + 1):
        names = [sid for sid, lv in levels.items() if lv == level]
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

    import dill

    from .data import encode_fields

    definition = load_target(target)
    problems = []
    for s in definition.steps:
        try:
            pickle.loads(dill.dumps(s.body, recurse=True))
        except Exception as exc:  # noqa: BLE001 - each failure is listed
            problems.append(f"step {s.id!r}: the body cannot be sent to a worker: {type(exc).__name__}: {exc}")
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
    from .steps import WorkflowContext

    done: dict[str, str] = {}
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
    elif target is None:
        fail("plan needs a TARGET (module:attr or file.py:attr), or --resume ID")
    else:
        definition = load_target(target)
        payload = build_data(definition, data, params)
    now = datetime.now(UTC)
    for s in topological_order(definition):
        if s.id in done:
            click.echo(f"{s.id}: already {done[s.id]} in that run; will not run again")
            continue
        why = []
        if s.dependencies:
            why.append("after all of " + ", ".join(s.dependencies))
        if s.any_dependencies:
            why.append("after the first success of " + ", ".join(s.any_dependencies) + " (or all finished)")
        verdict = "run"
        if s.condition is not None:
            ctx: WorkflowContext[Any] = WorkflowContext(
                payload, instance_id="plan", workflow_id=definition.id, step_id=s.id, attempt=1
            )
            try:
                holds = bool(s.condition(ctx))
                verdict = "run" if holds else "skip"
                why.append(f"run_if is {'true' if holds else 'false'} on the current data")
            except Exception as exc:  # noqa: BLE001 - reported, not raised
                verdict = "fail"
                why.append(f"run_if raises {type(exc).__name__}: {exc}")
        if s.delay:
            why.append(f"then waits {s.delay:g}s")
        if s.schedule is not None:
            when = "now (already due)" if s.schedule <= now else s.schedule.isoformat()
            why.append(f"not before {when}")
        click.echo(f"{s.id}: {verdict}" + (f" — {'; '.join(why)}" if why else " — no dependencies, starts at once"))


@main.command()
@click.argument("instance_id", metavar="ID")
@click.argument("step", required=False)
@click.option("--attempt", type=click.IntRange(min=1), help="Only this attempt (counted from 1).")
@click.option("-f", "--follow", is_flag=True, help="Keep printing as attempts of a run in progress end; stop with it.")
@store_option
@_cli_logs.log_level_option
def logs(instance_id: str, step: str | None, attempt: int | None, follow: bool, store: str) -> None:
    """Print what a run's steps printed and logged, one line each: time, step, attempt, text.

    Printed lines (stdout and stderr, C code and child processes included) are
    always shown; log records from WARNING up unless -v or --log-level says.
    Each attempt keeps its last 1 MiB.

    \b
    Example:
      wfaas-local logs 3f2a
      wfaas-local logs 3f2a parse --attempt 2
      wfaas-local logs 3f2a --follow
    """
    state_store = open_store(store, readonly=True)
    try:
        iid = resolve_id(state_store, instance_id)
        record = state_store.read(iid)
        if step is not None and record is not None and step not in record.steps:
            known = (record.extra.get("fingerprint") or {}).get("steps") or record.steps  # in definition order
            fail(f"run {iid} has no step {step!r}; its steps: {', '.join(known)}")
        try:
            found = _cli_logs.print_logs(state_store, iid, step, attempt, follow, click.echo)
        except KeyboardInterrupt:
            sys.exit(EXIT_INTERRUPTED)
    finally:
        state_store.close()
    if not found:
        what = f"step {step}" if step else f"run {iid}"
        click.echo(f"{what}: no output or log records were captured", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
