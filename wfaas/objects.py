"""Large values: fields over ``inline_limit`` live in files named by their content hash, not in the store.

Where a field goes, and who pays what (API.md §14)::

    engine (start) / worker (a step replaced the field)
        --encode_field--> encoding over the limit? --ObjectStore.put--> <root>/<sha256 hex>
                          the checkpoint holds a reference blob (a pickled ObjectRef, ~120 bytes)
    worker --data.build--> ctx.data: unread large fields are descriptors on a subclass (lazydata.py)
        first read of ctx.data.frame --ObjectStore.load--> the value (out-of-band buffers memory-mapped)
    worker --diff_large--> a field read but not changed: compared with its file, not hashed, not written

``root`` is ``<store file>.objects/`` for a ``SqliteStore`` and a private
temporary folder (removed at close) for an ``InMemoryStore``. A file is
written once per content: under a shared ``flock`` on ``root/.lock``, an
existing file is touched instead of written again, a new one is written to a
temporary name, fsynced when the store's ``synchronous`` asks for it,
renamed, and the folder fsynced. A step replies only after that, so the
checkpoint that references an object commits after the object is complete;
a ``kill -9`` at any moment leaves at worst an unreferenced file or a
``.tmp-*`` file, which ``prune`` removes (``prune.py``).

File layout: ``MAGIC``, the number of sections and each one's length
(little-endian u64), then the sections, each starting on a 64-byte boundary:
the pickle itself, then its protocol-5 out-of-band buffers (numpy arrays'
data), which load as slices of a private (copy-on-write) memory map: no read,
no copy, and the value stays writable. The hash covers the header and the
sections; a worker verifies a file once (``_verified``, bounded) before its
first use, so a damaged file is one clear :class:`ObjectError`.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import functools
import mmap
import os
import pickle
import struct
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import data as _data  # data.py imports this module first: only its functions are used, at call time
from .errors import StoreError

__all__ = ["INLINE_LIMIT", "ObjectError", "ObjectRef", "ObjectStore"]

INLINE_LIMIT = 1 << 20
"""Fields whose encoding is larger go to an object file (``WorkflowEngine(inline_limit=...)``)."""

OBJECTS_FIELD = "__wfaas_objects__"
"""The snapshot entry that tells a worker where the objects are (``ObjectStore.config``); never a data field."""

MAGIC = b"WFAASOB1"
_ALIGN = 64
_CHUNK = 1 << 20
_VERIFIED_KEPT = 256
_PLAIN = (bytes, str, bytearray)
_SHM_MIN = 4 << 30


class ObjectError(StoreError):
    """Raised when a large value's file is missing or damaged; names the run, the field and the file."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (ObjectError, (str(self),))  # from a worker as itself (StoreError's rebuilds a StoreError)


class ObjectRef:
    """What a checkpoint holds for a large field: the content hash of its file and its size in bytes."""

    __slots__ = ("digest", "size")

    def __init__(self, digest: str, size: int) -> None:
        self.digest = digest
        self.size = size

    def __reduce__(self) -> tuple[Any, ...]:
        return (ObjectRef, (self.digest, self.size))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectRef) and other.digest == self.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    def __repr__(self) -> str:
        return f"ObjectRef({self.digest[:12]}..., {self.size} bytes)"


def ref_blob(digest: str, size: int) -> bytes:
    # Protocol 2, not 5: the blob then starts with a fixed prefix (no frame header) that no
    # field encoded by data.py (protocol 5) can start with, so is_ref is one comparison.
    return pickle.dumps(ObjectRef(digest, size), protocol=2)


_PREFIX = b"\x80\x02cwfaas.objects\nObjectRef\n"


def is_ref(blob: bytes | None) -> bool:
    """Whether an encoded field is a reference to an object file."""
    return blob is not None and blob.startswith(_PREFIX)


def ref_of(blob: bytes) -> ObjectRef:
    ref = pickle.loads(blob)
    assert isinstance(ref, ObjectRef)
    return ref


def digests_in(blobs: Any) -> set[str]:
    """The object digests the encoded fields ``blobs`` reference."""
    return {ref_of(b).digest for b in blobs if is_ref(b)}


class _Root:
    """The folder, shared by every view of one store; a temporary one is made on first need."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self.temporary = path is None
        self._lock = threading.Lock()
        self._finalizer: Any = None

    def get(self) -> Path:
        with self._lock:
            if self._path is None:
                # Named now, made by the first put (which may be a worker's): a store that never holds a
                # large value costs no folder. 16 random bytes: nobody can guess the name to plant a folder first.
                self._path = _memory_folder() / f"wfaas-objects-{os.urandom(16).hex()}"
                self._finalizer = weakref.finalize(self, _rmtree, str(self._path))
            return self._path

    @property
    def made(self) -> Path | None:
        return self._path

    def remove(self) -> None:
        if self._finalizer is not None:
            self._finalizer()


def _rmtree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _memory_folder() -> Path:
    """Where an in-memory store keeps large values: /dev/shm (memory, as the rest of that store) when it
    is large enough not to fill up at the first big array (a container's default is 64 MB), else the
    temporary folder. Writing them to a disk made a chain passing 5 MB per step wait on writeback."""
    try:
        st = os.statvfs("/dev/shm")
        if st.f_bavail * st.f_frsize >= _SHM_MIN and os.access("/dev/shm", os.W_OK):
            return Path("/dev/shm")
    except OSError:
        pass
    import tempfile

    return Path(tempfile.gettempdir())


class ObjectStore:
    """Object files by content hash in one folder: write once, verify, load (memory-mapped), delete.

    ``fsync``: files and the folder are fsynced before a reference to them
    may commit (the store's ``synchronous`` is FULL or EXTRA); without it a
    file is complete on disk for every process once ``put`` returns, which
    survives a ``kill -9`` but not a power cut.
    """

    def __init__(self, root: Path | None, *, fsync: bool = False, limit: int = INLINE_LIMIT) -> None:
        self._root = _Root(root)
        self.fsync = fsync
        self.limit = limit

    @classmethod
    def temporary(cls) -> ObjectStore:
        """A private temporary folder, made on first need and removed by :meth:`close` (or at exit)."""
        return cls(None)

    def limited(self, limit: int) -> ObjectStore:
        """The same folder with another ``inline_limit`` (each engine has its own)."""
        view = ObjectStore.__new__(ObjectStore)
        view._root, view.fsync, view.limit = self._root, self.fsync, int(limit)
        return view

    @property
    def root(self) -> Path:
        return self._root.get()

    @property
    def config(self) -> tuple[str, bool, int]:
        """What a worker needs to read and write these objects (sent with the data snapshot)."""
        return (str(self.root), self.fsync, self.limit)

    @classmethod
    def from_config(cls, config: tuple[str, bool, int]) -> ObjectStore:
        store = _by_config.get(config)
        if store is None:
            store = _by_config[config] = cls(Path(config[0]), fsync=config[1], limit=config[2])
        return store

    def path_of(self, digest: str) -> Path:
        return self.root / digest

    def close(self) -> None:
        """Remove a temporary folder (a store's folder stays)."""
        if self._root.temporary:
            self._root.remove()

    # -- writing -----------------------------------------------------------------

    def put(self, sections: list[memoryview]) -> bytes:
        """Write the sections as one object (once per content); its reference blob."""
        import hashlib  # here and in _check: OpenSSL's import is not a cost of ``import wfaas``

        header = MAGIC + struct.pack(f"<{len(sections) + 1}Q", len(sections), *(s.nbytes for s in sections))
        h = hashlib.sha256(header)
        for s in sections:
            h.update(s)
        digest = h.hexdigest()
        size = sum(s.nbytes for s in sections)
        root = self.root
        path = root / digest
        try:
            _make(root)
            with self._locked(fcntl.LOCK_SH):
                wrote = not _touch(path, _file_size(len(header), sections))
                if wrote:
                    self._write(path, header, sections)
        except OSError as exc:
            full = "the disk is full: free space there, then resume" if exc.errno == errno.ENOSPC else "fix the cause"
            raise StoreError(
                f"cannot write a large value ({size} bytes) to {root}: {exc.strerror or exc}; {full}",
                resumable=True,
            ) from exc
        if wrote:  # a file found there is checked by its first reader, as any other
            _verified[digest] = _identity(os.stat(path))
            _trim(_verified, _VERIFIED_KEPT)
        return ref_blob(digest, size)

    def _write(self, path: Path, header: bytes, sections: list[memoryview]) -> None:
        tmp = path.with_name(f".tmp-{path.name[:16]}-{os.getpid()}-{threading.get_ident()}")
        try:
            self._write_tmp(tmp, header, sections)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk leaves no partial file behind (a kill -9 may: prune)
            raise
        os.replace(tmp, path)
        if self.fsync:
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _write_tmp(self, tmp: Path, header: bytes, sections: list[memoryview]) -> None:
        with open(tmp, "wb") as f:
            f.write(header)
            pos = len(header)
            for s in sections:
                pad = -pos % _ALIGN
                f.write(b"\0" * pad)
                f.write(s)
                pos += pad + s.nbytes
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())

    @contextmanager
    def _locked(self, how: int) -> Iterator[None]:
        """``put`` holds it shared; ``prune`` exclusive while it deletes, so no touched file goes."""
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, how)
            yield
        finally:
            os.close(fd)

    # -- reading -----------------------------------------------------------------

    def load(self, blob: bytes, what: str, mapped: Any = None) -> Any:
        """The value a reference blob names (from ``mapped``, if ``open`` mapped it already); ``what``
        ("run X, field Y") is for the error."""
        ref = ref_of(blob)
        sections = self._check(ref, mapped if mapped is not None else self.open(blob, what), what)
        try:
            return pickle.loads(sections[0], buffers=sections[1:])
        except Exception as exc:  # a file that verified but does not decode: damaged all the same
            raise self._damaged(ref, what, f"{type(exc).__name__}: {exc}") from exc

    def same(self, blob: bytes, sections: list[memoryview], what: str) -> bool:
        """Whether the object ``blob`` references holds exactly these sections (compared, not hashed)."""
        ref = ref_of(blob)
        if sum(s.nbytes for s in sections) != ref.size:
            return False
        old = self._check(ref, self.open(blob, what), what)
        if [s.nbytes for s in old] != [s.nbytes for s in sections]:
            return False
        return all(_equal(a, b) for a, b in zip(old, sections, strict=True))

    def same_pickle(self, blob: bytes, value: Any, what: str) -> bool:
        """Whether the one-section object ``blob`` references is ``value``'s pickle, compared as it is made:
        the pickler hands a large ``bytes``/``bytearray`` to ``write`` as itself, so nothing is copied."""
        ref = ref_of(blob)
        old = self._check(ref, self.open(blob, what), what)
        if len(old) != 1:
            return False
        writer = _Compare(old[0])
        try:
            pickle.Pickler(writer, protocol=5).dump(value)
        except _Differs:
            return False
        return writer.pos == old[0].nbytes

    def open(self, blob: bytes, what: str, access: int = mmap.ACCESS_COPY) -> tuple[mmap.mmap, tuple[int, ...]]:
        """The object's file mapped (private: a value built on it may be changed in place), not yet checked.

        A mapped file stays readable after it is deleted: a state read from a store whose folder
        goes at close can still load its large fields afterwards.
        """
        path = self.path_of(ref_of(blob).digest)
        try:
            with open(path, "rb") as f:
                return mmap.mmap(f.fileno(), 0, access=access), _identity(os.fstat(f.fileno()))
        except FileNotFoundError:
            raise ObjectError(
                f"{what}: its value's file {path} is missing; restore it from a backup, or run the workflow "
                "again (`wfaas-local prune` removes finished runs)"
            ) from None
        except (OSError, ValueError) as exc:
            raise self._damaged(ref_of(blob), what, f"{type(exc).__name__}: {exc}") from exc

    def _check(self, ref: ObjectRef, mapped: tuple[mmap.mmap, tuple[int, ...]], what: str) -> list[memoryview]:
        """The sections of a mapped object, its hash verified unless this process verified that file already."""
        import hashlib

        mm, identity = mapped
        view = memoryview(mm)
        sections = self._sections(ref, view, what)
        if ref.digest not in _trusted and _verified.get(ref.digest) != identity:
            h = hashlib.sha256(view[: 8 + 8 * (len(sections) + 1)])
            for s in sections:
                h.update(s)
            if h.hexdigest() != ref.digest:
                raise self._damaged(ref, what, "its content does not match its hash")
            _verified[ref.digest] = identity
            _trim(_verified, _VERIFIED_KEPT)
        return sections

    def _sections(self, ref: ObjectRef, view: memoryview, what: str) -> list[memoryview]:
        try:
            if bytes(view[:8]) != MAGIC:
                raise ValueError("not an object file")
            (count,) = struct.unpack_from("<Q", view, 8)
            if count > 1 << 16:
                raise ValueError(f"{count} sections")
            lengths = struct.unpack_from(f"<{count}Q", view, 16)
            pos, out = 16 + 8 * count, []
            for n in lengths:
                pos += -pos % _ALIGN
                if pos + n > view.nbytes:
                    raise ValueError(f"truncated: {view.nbytes} bytes")
                out.append(view[pos : pos + n])
                pos += n
        except (ValueError, struct.error) as exc:
            raise self._damaged(ref, what, str(exc)) from exc
        return out

    def _damaged(self, ref: ObjectRef, what: str, detail: str) -> ObjectError:
        return ObjectError(
            f"{what}: its value's file {self.path_of(ref.digest)} is damaged ({detail}); restore it from a "
            "backup, or run the workflow again (`wfaas-local prune` removes finished runs)"
        )

    # -- deleting (prune.py decides what) ------------------------------------------

    def files(self) -> Iterator[os.DirEntry[str]]:
        """Object files and leftover temporary files (never the lock file)."""
        root = self._root.made if self._root.temporary else self.root
        if root is None or not root.is_dir():
            return
        with os.scandir(root) as it:
            for entry in it:
                if entry.name != ".lock" and entry.is_file(follow_symlinks=False):
                    yield entry

    def sweep(self, keep: set[str], before: float) -> tuple[int, int, int]:
        """Delete files not in ``keep`` last touched before ``before`` (a time.time()).

        Returns (files, bytes) freed, and how many files not in ``keep`` were
        kept because they are newer (a run may be about to reference them).
        """
        root = self._root.made if self._root.temporary else self.root
        if root is None or not root.is_dir():
            return 0, 0, 0
        removed = freed = recent = 0
        with self._locked(fcntl.LOCK_EX):
            for entry in list(self.files()):
                if entry.name in keep:
                    continue
                st = entry.stat(follow_symlinks=False)
                if st.st_mtime >= before:
                    recent += 1
                    continue
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    continue
                removed, freed = removed + 1, freed + st.st_size
        return removed, freed, recent

    def __repr__(self) -> str:
        return f"ObjectStore({str(self._root.made)!r})"


def _file_size(header: int, sections: list[memoryview]) -> int:
    pos = header
    for s in sections:
        pos += -pos % _ALIGN + s.nbytes
    return pos


def _touch(path: Path, size: int) -> bool:
    """The object is there, whole: touch it (one copy per content; the touch keeps prune off it)."""
    try:
        if os.stat(path).st_size != size:
            return False  # damaged (truncated): written again, in its place
        os.utime(path)
        return True
    except FileNotFoundError:
        return False


def _make(root: Path) -> None:
    """The folder, private; one that exists must be ours and not writable by others (its files are pickles)."""
    try:
        root.mkdir(mode=0o700)
    except FileExistsError:
        st = root.lstat()
        if not root.is_dir() or root.is_symlink() or st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise StoreError(
                f"{root} holds large values, which are pickles, but is not a private folder of this user "
                "(a symlink, another owner, or writable by others); move it aside or fix its owner and mode"
            ) from None


FRESH_KEPT = 32
"""Objects a run's snapshot names as written during this engine's life (``RunData.fresh``)."""
_trusted: collections.OrderedDict[str, None] = collections.OrderedDict()


def trust(digests: Any) -> None:
    """Objects this engine's workers wrote and checked moments ago: not hashed again on their first read
    here (a 5 MB value passed down a chain would pay its hash twice per step). A file from an earlier
    engine (a resumed run) is always checked."""
    for digest in digests:
        _trusted[digest] = None
    _trim(_trusted, _VERIFIED_KEPT)


_by_config: dict[tuple[str, bool, int], ObjectStore] = {}
# Objects this process verified (or wrote), by digest -> the file's identity then: a warm worker
# checks each file once, not at every load; a replaced or touched-up file is checked again.
_verified: collections.OrderedDict[str, tuple[int, ...]] = collections.OrderedDict()


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_ctime_ns)


def _trim(cache: collections.OrderedDict[Any, Any], kept: int) -> None:
    while len(cache) > kept:
        cache.popitem(last=False)


@functools.cache
def _memcmp() -> Any:
    import ctypes

    memcmp = ctypes.CDLL(None).memcmp  # looked up at first use: not a cost of ``import wfaas``
    memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
    memcmp.restype = ctypes.c_int
    return memcmp


def _address(view: memoryview) -> tuple[Any, int] | None:
    """A C pointer to a contiguous buffer's bytes (and what keeps it alive), without copying them."""
    import ctypes

    if view.readonly:
        if isinstance(view.obj, bytes) and view.nbytes == len(view.obj):
            pointer = ctypes.c_char_p(view.obj)
            return pointer, ctypes.cast(pointer, ctypes.c_void_p).value or 0
        return None
    holder = ctypes.c_char.from_buffer(view)
    return holder, ctypes.addressof(holder)


def _equal(a: memoryview, b: memoryview) -> bool:
    """Byte-wise equality of two buffers of one size: memcmp where both expose their memory (the
    change check of a 200 MB array costs a few tens of ms, not the ~0.7 s of Python slices)."""
    if a.nbytes == 0:
        return True
    pa, pb = _address(a), _address(b)
    if pa is not None and pb is not None:
        return bool(_memcmp()(pa[1], pb[1], a.nbytes) == 0)
    return all(bytes(a[i : i + _CHUNK]) == bytes(b[i : i + _CHUNK]) for i in range(0, a.nbytes, _CHUNK))


class _Differs(Exception):
    """Stops a pickler at the first byte that differs (``_Compare``)."""


class _Compare:
    """A file for ``pickle.Pickler`` that compares what it is given with ``old`` instead of keeping it."""

    def __init__(self, old: memoryview) -> None:
        self.old, self.pos = old, 0

    def write(self, data: Any) -> int:
        view = memoryview(data)
        n, pos = view.nbytes, self.pos
        if pos + n > self.old.nbytes or not _equal(self.old[pos : pos + n], view.cast("B")):
            raise _Differs
        self.pos = pos + n
        return n


# -- encoding a field -------------------------------------------------------------


def _pickle(value: Any) -> tuple[bytes, list[pickle.PickleBuffer]]:
    """Protocol 5 with out-of-band buffers, or dill in-band where a worker could not load the pickle
    (the rules of ``data.encode_value``)."""
    buffers: list[pickle.PickleBuffer] = []
    if type(value) in _PLAIN:
        return pickle.dumps(value, protocol=5), buffers
    try:
        main = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    except Exception:  # noqa: BLE001 - any pickling failure means: let dill try (as data.encode_value)
        return _data.dill_dumps(value), []
    if b"__main__" in main:  # pickled by reference to a module a worker cannot import
        return _data.dill_dumps(value), []
    return main, buffers


def encode_field(value: Any, objects: ObjectStore) -> bytes:
    """The field's encoding: inline when small, else written as an object and its reference blob."""
    if isinstance(value, dict):
        # A dict stays in the store, merged and checkpointed key by key: steps writing distinct keys
        # of one dict do not conflict, and a step's checkpoint costs what it changed, not the dict.
        return _data.encode_value(value)
    main, buffers = _pickle(value)
    if not buffers:  # the usual case, on every field of every step: no more work than encode_value
        return main if len(main) <= objects.limit else objects.put([memoryview(main)])
    parts = [memoryview(main), *(b.raw() for b in buffers)]
    if sum(p.nbytes for p in parts) > objects.limit:
        return objects.put(parts)
    return _data.encode_value(value)  # small after all: its buffers go in-band


def diff_large(value: Any, old: bytes, objects: ObjectStore, what: str) -> bytes | None:
    """A read large field after the step: None if unchanged, else its new encoding (written if large)."""
    if isinstance(value, dict):
        return encode_field(value, objects)
    if type(value) in _PLAIN and objects.same_pickle(old, value, what):
        return None
    main, buffers = _pickle(value)
    parts = [memoryview(main), *(b.raw() for b in buffers)]
    if objects.same(old, parts, what):
        return None
    if sum(p.nbytes for p in parts) > objects.limit:
        return objects.put(parts)
    return main if not buffers else _data.encode_value(value)
