"""``wfaas-local prune``: remove finished runs and the large values no remaining run needs (``prune.py``)."""

from __future__ import annotations

import click

from .cli_errors import fail
from .cli_store import DEFAULT_STORE, open_store
from .cli_text import plural
from .prune import GRACE, parse_duration
from .states import WorkflowStatus

_FINISHED = [s.name for s in WorkflowStatus if s.is_terminal]


@click.command()
@click.option(
    "--store",
    default=DEFAULT_STORE,
    show_default=True,
    envvar="WFAAS_STORE",
    show_envvar=True,
    help="SQLite file holding the runs.",
)
@click.option("--older-than", metavar="DURATION", help="Only runs that ended at least this long ago (7d, 12h, 30m).")
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(_FINISHED, case_sensitive=False),
    help="Only runs that ended with this status (repeatable; default: every finished run).",
)
def prune(store: str, older_than: str | None, statuses: tuple[str, ...]) -> None:
    """Remove finished runs, the large values no remaining run references, and compact the store.

    A run in progress is never touched, nor anything it references or may be
    writing (see README "Large values").

    \b
    Example:
      wfaas-local prune --older-than 7d --status COMPLETED
    """
    try:
        age = parse_duration(older_than) if older_than is not None else None
    except ValueError as exc:
        fail(f"--older-than: {exc}")
    state_store = open_store(store, must_exist=True)
    try:
        result = state_store.prune(age, statuses or None)
    finally:
        state_store.close()
    freed = result.object_bytes / 1e6
    runs, files = plural(len(result.runs), "finished run"), plural(result.objects, "large value file")
    click.echo(f"removed {runs} and {files} ({freed:.1f} MB); {store} compacted")
    if result.recent:
        click.echo(
            f"kept {plural(result.recent, 'unreferenced large value file')} written in the last {GRACE:.0f} s "
            "(a run may be about to use it); prune again later to remove it"
        )
