"""Starting wfaas's helper threads so that signals for the program reach its main thread.

A signal sent to the process (Ctrl-C's SIGINT, `wfaas-local cancel`'s SIGUSR1)
goes to any one thread that does not block it. Python runs its handler in the
main thread, but only once that thread runs again: if the kernel picked a
helper thread, a main thread blocked in ``wait_for_completion`` is never
interrupted and Ctrl-C does nothing. So every thread wfaas starts blocks these
signals (a new thread inherits the mask of the one that starts it), leaving
the main thread as the one that receives them.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

_PROCESS_SIGNALS = {
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGALRM,
}


@contextmanager
def signals_blocked() -> Iterator[None]:
    """Block the process-directed signals in this thread for the block (threads started in it inherit that)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _PROCESS_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def start(target: Callable[..., Any], name: str, *args: Any) -> threading.Thread:
    """Start a daemon thread that never receives the program's signals."""
    thread = threading.Thread(target=target, args=args, name=name, daemon=True)
    with signals_blocked():
        thread.start()
    return thread
