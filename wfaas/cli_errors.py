"""The CLI's exit codes, and the exception that ends a command with one line on stderr.

As click does, the exit code lives on the exception class: a command raises,
and :class:`click.Group` prints ``Error: ...`` and exits with ``exit_code``.
"""

from __future__ import annotations

from typing import NoReturn

import click

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_USAGE", "INTERRUPT_CODES", "UsageProblem", "fail"]

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
INTERRUPT_CODES = frozenset({EXIT_INTERRUPTED, 128 + 15, 128 + 1})  # SIGINT, SIGTERM, SIGHUP


class UsageProblem(click.ClickException):
    """A usage or definition error: one line on stderr, exit code 2."""

    exit_code = EXIT_USAGE


def fail(message: str) -> NoReturn:
    """End the command with ``message`` as one line on stderr, exit code 2."""
    raise UsageProblem(message)
