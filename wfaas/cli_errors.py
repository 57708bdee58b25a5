"""The CLI's exit codes, and the exception that ends a command with one line on stderr.

As click does, the exit code lives on the exception class: a command raises,
and :class:`click.Group` prints ``Error: ...`` and exits with ``exit_code``.
"""

from __future__ import annotations

from typing import IO, Any, NoReturn

import click

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_USAGE", "INTERRUPT_CODES", "DamagedRuns", "UsageProblem", "fail"]

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
INTERRUPT_CODES = frozenset({EXIT_INTERRUPTED, 128 + 15, 128 + 1})  # SIGINT, SIGTERM, SIGHUP


class UsageProblem(click.ClickException):
    """A usage or definition error: one line on stderr, exit code 2."""

    exit_code = EXIT_USAGE


def fail(message: str) -> NoReturn:
    """End the command with ``message`` as one line on stderr, exit code 2."""
    raise UsageProblem(message)


class DamagedRuns(UsageProblem):
    """Runs a command could not read, after it showed the others: ``Error:`` and one line each, exit code 2."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("; ".join(lines))
        self.lines = lines

    def show(self, file: IO[Any] | None = None) -> None:
        """One line per damaged run, each as click prints an error."""
        for line in self.lines:
            click.echo(f"Error: {line}", err=file is None, file=file)
