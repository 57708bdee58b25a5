"""The CLI driving an engine: start it with the CLI's signal handling, follow a run to its end, close it.

The first SIGINT/SIGTERM/SIGHUP cancels the runs gracefully, a second kills
their steps at once (``_signals.py``); SIGUSR1 (``wfaas-local cancel ID``
from another terminal) cancels gracefully. :func:`follow` returns the exit
code the command ends with.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from . import _cli_logs, _signals, _threads, cli_items
from .cli_errors import EXIT_FAILED, EXIT_INTERRUPTED, fail
from .cli_progress import Progress
from .cli_store import DEFAULT_STORE
from .cli_tables import print_steps, state_json, step_error
from .cli_text import console, shorten
from .definition import WorkflowDefinition
from .errors import InvalidStateTransition, NotFound, StoreError, WorkflowError
from .states import WorkflowState, WorkflowStatus
from .store import StateStore

__all__ = ["close_engine", "follow", "interrupt_code", "start_engine", "stopped_by"]


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
    out = console(stderr=as_json)
    progress = Progress(
        len(definition.steps), live=out.is_terminal and not as_json, quiet=quiet or as_json, console=out
    )
    engine.event_bus.subscribe(progress)
    try:
        iid = start()
    except (WorkflowError, TypeError, ValueError) as exc:
        fail(str(exc).replace("\n", " "))
    # No event carries how many items a for_each step has: the panel asks the run's state, once per step.
    progress.items_total = lambda sid: engine.get_status(iid).step_states[sid].items_total
    resume_cmd, how = _resume_hint(iid, store_path)
    how_in_a_line = how if store_path == ":memory:" else f"continue it with: {resume_cmd}"
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
        out.print(f"{stopped_by(exc)}: the run was cancelled and checkpointed; {how}", markup=False)
        return interrupt_code(exc)
    progress.active = False
    if stopped is not None:
        # The store could not take the run's last state: say why in one line, not what it holds.
        then = f"; {how_in_a_line}" if stopped.resumable else ""  # one line, like any error
        console(stderr=True).print(f"STOPPED: {stopped}{then}", markup=False)
        return code
    _print_outcome(engine.get_status(iid), out, quiet=quiet, as_json=as_json, store_path=store_path)
    return code


def _resume_hint(iid: str, store_path: str) -> tuple[str, str]:
    """The command that continues run ``iid``, and how to say so after it stopped."""
    resume_cmd = f"wfaas-local resume {iid}" + (f" --store {store_path}" if store_path != DEFAULT_STORE else "")
    if store_path == ":memory:":  # nothing outlives this process: there is no run to resume
        return (
            resume_cmd,
            "it cannot be resumed (--store :memory: keeps no run): run it again, with a store file to resume later",
        )
    return resume_cmd, f"continue it with:\n  {resume_cmd}"  # a line of its own: it is copied whole


def _print_outcome(state: WorkflowState[Any], out: Any, *, quiet: bool, as_json: bool, store_path: str) -> None:
    """The finished run: its table (or JSON), and for a failed or cancelled one why and how to continue."""
    resume_cmd, how = _resume_hint(state.instance_id, store_path)
    if as_json:
        click.echo(cli_items.dumps(state_json(state)))
    elif not quiet:
        print_steps(state, out)
    if state.status is WorkflowStatus.FAILED:
        err = console(stderr=True)
        failed = f"FAILED at step {state.failed_step}: {step_error(state.error or '')}"
        err.print(shorten(failed, err.width) if err.is_terminal else failed, markup=False)
        _cli_logs.print_failed_traceback(state, err, "" if store_path == DEFAULT_STORE else f" --store {store_path}")
        if store_path == ":memory:":
            err.print(how, markup=False)
        else:
            err.print(f"fix the cause, then continue with:\n  {resume_cmd}", markup=False)
    elif state.status is WorkflowStatus.CANCELLED:
        console(stderr=True).print(f"CANCELLED; {how}", markup=False)


# The running command's signal handling: set up before its engine exists (the engine then leaves
# SIGTERM/SIGHUP to it), taken down when the engine closes.
_stop: _signals.StopOnSignals | None = None


def stopped_by(exc: BaseException) -> str:
    """``interrupted`` (Ctrl-C) or ``stopped by SIGTERM``: what ended the command."""
    signum = getattr(exc, "signum", signal.SIGINT)
    return "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"


def interrupt_code(exc: BaseException) -> int:
    """128 + the signal's number (130 for Ctrl-C)."""
    return int(getattr(exc, "exit_code", EXIT_INTERRUPTED))


def start_engine(store: StateStore, workers: int | None, origin: str | None, dask: str | None = None) -> Any:
    """The engine for a command that runs steps (on Dask with ``dask``), with the CLI's signal handling."""
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
    _workers_skip_the_cli()
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


def _workers_skip_the_cli() -> None:
    """Start workers and the guard without importing the CLI: they run the target's steps, never a command.

    multiprocessing has each process it starts import the parent's ``__main__``
    first, for functions defined there; for ``wfaas-local`` that is the CLI with
    click, about 0.1 s of CPU in each worker and the guard before the first
    step. Nothing of ours lives in it (the target is imported by its own name),
    so it is left out by hiding where it came from.
    """
    main = sys.modules.get("__main__")
    if main is not None:
        main.__spec__ = None
        main.__dict__.pop("__file__", None)


def close_engine(engine: Any, store: StateStore) -> None:
    """Stop what still runs, close the engine and the store, take our signal handlers down (unless one came)."""
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
