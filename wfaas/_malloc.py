"""Freed large buffers go back to the system: glibc's mmap threshold kept at 128 KiB, once per process.

glibc serves a request of 128 KiB or more with a mapping of its own, given
back when freed, until the first such block is freed: then it raises the
threshold to that block's size (up to 32 MiB), so later blocks of that size
come from the heap, where a freed block stays part of the process. An engine
receives every step's changed fields and encodes snapshots and checkpoints,
block after block of the data's size, on its own threads (each with its heap):
30 runs of five 5 MB fields with SqliteStore leave its RSS at 110 MiB that
way, and at 36 MiB with the threshold fixed (issue 14; the growth with every
run was Python's: see ``_let_go`` in scheduler.py).
Setting the threshold turns the adjustment off; wfaas keeps it at glibc's
own starting value, 128 KiB: every block of that size or more is a mapping of
its own, given back when freed (a few page faults per MiB, small beside
encoding the data), and smaller ones (nearly everything Python allocates) are
served as before. A fixed 1 MiB did as well for 5 MB fields, but left the
in-memory store 20 % over the data it holds with 200 KiB fields (freed
transient buffers between the kept ones); at 128 KiB it is 2 %.
``MALLOC_MMAP_THRESHOLD_`` set in the environment wins; other C libraries are
left alone.

It is process-wide, so it is done by the engine (and documented there), not
on ``import wfaas``.
"""

from __future__ import annotations

import ctypes
import logging
import os

__all__ = ["MMAP_THRESHOLD", "tune"]

log = logging.getLogger("wfaas")

MMAP_THRESHOLD = 128 << 10
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
_tuned: bool | None = None


def _glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError, AttributeError):
        return False


def tune() -> bool:
    """Set the mmap threshold once per process; True if it is set (by us, now or before)."""
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not _glibc():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _tuned = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    if not _tuned:
        log.debug("wfaas: mallopt(M_MMAP_THRESHOLD) was refused; freed large buffers may stay in the heap")
    return _tuned
