"""The store's file on disk: created private to its owner, and refused when someone else could have written it.

Opening a store unpickles what it holds, so it runs code from it: as ssh does
with keys, :func:`trust` refuses a store, its ``-wal``/``-shm`` files or its
folder that belong to another user or that a group or others may write.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from pathlib import Path

from .errors import StoreError

__all__ = ["create_file", "trust"]


def create_file(path: Path) -> None:
    """Create an empty store file readable by its owner only, and its folder (the owner's alone) if missing."""
    parent = path.parent
    if not parent.exists():
        try:
            # A folder wfaas makes for its store is the owner's alone (the store is code: see trust).
            parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the directory {parent} for the wfaas store: {exc}") from exc
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StoreError(f"cannot create the wfaas store {path}: no write permission on {parent}; choose another path")
    # No O_EXCL: processes creating one store at once all open the same file (issue 14 item 6).
    # Runs can hold anything a step wrote: readable by the owner only.
    try:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, stat.S_IRUSR | stat.S_IWUSR))
    except OSError as exc:
        raise StoreError(f"cannot create the wfaas store {path}: {exc}; choose another path") from exc


def trust(path: Path) -> None:
    """Refuse a store that someone else could have written: opening it runs code from it.

    As ssh does with keys: the file, its ``-wal``/``-shm`` and its folder
    must belong to this user (or root) and be writable by no group and no
    other user.
    """
    me = os.geteuid()
    folder = path.parent
    for what, target in (
        ("the wfaas store", path),
        ("the write-ahead log of the wfaas store", Path(f"{path}-wal")),
        ("the shared-memory file of the wfaas store", Path(f"{path}-shm")),
        ("the folder of the wfaas store", folder),
    ):
        try:
            st = os.stat(target)
        except FileNotFoundError:
            continue
        shown = path if target == path else f"{path} ({target})"
        if st.st_uid not in (me, 0):
            raise StoreError(
                f"refusing {what} {shown}: it belongs to {_user(st.st_uid)}, not to you ({_user(me)}), and "
                "opening a store runs code from it (it holds pickles); if you trust it, copy the store "
                "into a folder of your own and open the copy, or run as its owner"
            )
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not (
            st.st_mode & stat.S_IWOTH == 0 and _private_group(st.st_gid, me)
        ):
            whom = (
                "its group and others"
                if st.st_mode & stat.S_IWGRP and st.st_mode & stat.S_IWOTH
                else ("its group" if st.st_mode & stat.S_IWGRP else "others")
            )
            fix = (
                f"chmod go-w {target}"
                if target != folder or not st.st_mode & stat.S_ISVTX
                else f"put the store in a folder of your own (mkdir -m 700 DIR) instead of {folder}"
            )
            raise StoreError(
                f"refusing {what} {shown}: it is writable by {whom} (mode {stat.S_IMODE(st.st_mode):04o}), "
                f"and opening a store runs code from it (it holds pickles); if that is not intended: {fix}"
            )


def _private_group(gid: int, uid: int) -> bool:
    """A user's own group (named after them, no other member): group-writable is then owner-writable.

    That is what a umask of 002 with user-private groups gives (Debian's ssh accepts it too).
    """
    try:
        user, group = pwd.getpwuid(uid), grp.getgrgid(gid)
    except KeyError:
        return False
    return user.pw_gid == gid and group.gr_name == user.pw_name and set(group.gr_mem) <= {user.pw_name}


def _user(uid: int) -> str:
    try:
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"
