"""A write-ahead journal per directory: a durable write is one write + fdatasync.

On this kind of disk, making a write durable is cheap when it only overwrites
blocks that are already on disk, dearer when the file grows (its size must be
committed too), and creating a file, renaming over one, or deleting one whose
blocks are on disk costs far more. So a write to a directory only does this,
under an exclusive lock of the directory (flock across processes, a mutex
across threads):

- write one *batch* of records (each: the object's name, its full new bytes,
  their version digest, its position in the batch and the batch's size, a CRC
  of the header) into the directory's journal file ``.checkmate-journal``, just
  after its last record, and fdatasync it. From here on the write survives a
  crash or a power cut.

The journal is zero-filled ahead of its records: when a batch does not fit, the
file grows (geometrically, up to 4 MiB at a time) by a zero fill written with
that batch, and that one write is fsynced (a batch of 64 KiB or more is appended
without a fill). A batch counts only if every record
of it is whole and valid: a batch cut short (a crash, or a power cut that kept
only some of its pages) ends the journal where it starts, and the next batch
overwrites it. Pieces of it never count: a batch must start with its first
record. The file starts with a header holding a random id, new for every
journal file, so a process notices a journal that replaced the one it indexed.

The journal *is* the newest version of every object it names: reads take the
directory lock shared and look in the journal first, then in the plain file.
Each process keeps an index of name -> last record; it reads a journal whole
once (checking that no whole batch hides after bytes that are not one: damage
in the middle is refused, never cut off), and after that only looks at the
bytes just after its last known record: zeros mean nothing new. It tells that
the journal it holds open is still the one at that path (another process may
have checkpointed it) from ``/proc/self/fd`` where it can, not from a stat: a
stat makes the next write update the file's times on kernels with fine-grained
timestamps, and each fdatasync then writes the inode as well.

Each write is also published at once as a plain file, whole once visible (a
new file written unnamed and linked into place where the system can, else a
temp file renamed; not fsynced), except in directories whose publication is *deferred*: the engine
defers its task's directory while it holds the task, and syncs it at unbind.

A **checkpoint** publishes the journal into plain files and deletes it: each
object's newest bytes go to a temp file renamed into place (a delete unlinks
the file), one syncfs(2) makes them durable (an fsync per file when there are
at most 16, or where there is no syncfs), the directory is fsynced, and only
then is the journal unlinked.
`sync` publishes in the caller's thread and leaves only the durable part to a
background thread, which never creates a file. A crash in the middle leaves
the journal, which still holds the truth, and the next checkpoint publishes it
again. It runs
when the engine unbinds a task (`TaskIO.sync`, on a background thread), when
the journal grows past a size, and when the last object of a directory is
deleted.

Versions are content hashes, as on every other local store (`_versions`):
the record carries the hash of its bytes, so a compare-and-swap needs no read
and no hashing of the current object.

A large object (2 MiB or more) whose new version ends with the same whole
chunks as its last whole record in this journal is written as a **patch**: the
new head, and the place of that unchanged tail in the earlier record. Versions
hash chunks counted from the end, so only the head is hashed (the tail's chunk
digests are kept with the whole record, which this process holds in memory: a
few per directory). A patch never points at another patch, nor outside its
journal file; a checkpoint publishes head and tail joined.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import secrets
import struct
import threading
import weakref
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from ..errors import CorruptStateError, VersionConflict
from . import _files
from ._patches import PATCH_MIN, Base, Planned, keep_base, parse_patch, plan_large
from ._versions import content_version, digest_of
from .base import check_version

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["ANY", "JOURNAL_NAME", "JournaledDirectories", "flush_all", "parse_journal"]

logger = logging.getLogger(__name__)

JOURNAL_NAME = _files.JOURNAL_NAME
# The file starts with a header: magic, a random id (new for every journal file,
# so that a process notices a journal that replaced the one it indexed), and a
# CRC-32 of both. Records follow from _DATA_START.
_FILE_MAGIC = b"CMJF"
_FILE_HEAD = struct.Struct(">4s16sI")
_DATA_START = 32
_MAGIC = b"CMJ3"
# magic, data length, name length, op, position of the record in its batch, number
# of records in the batch, SHA-256 of the data (16 bytes); then a CRC-32 of those
# fields and the name.
_HEAD = struct.Struct(">4sIHBHH16s")
_CRC = struct.Struct(">I")
_HEADER_SIZE = _HEAD.size + _CRC.size
_PROBE = _HEADER_SIZE + 255  # a record's header and the longest file name
_WRITE, _DELETE, _PATCH = 0, 1, 2  # record ops (a patch: `_patches`)
_CHECKPOINT_BYTES = 64 * 2**20
_FSYNC_EACH_MAX = 16  # a checkpoint of at most this many files fsyncs each, not the file system
_MIN_ALLOCATION = 64 * 2**10  # zero-filled ahead of the records when a journal grows
_MAX_FILL = 4 * 2**20
# A batch this large is appended without a fill: the zeros would double what it
# writes, for an overwrite that saves one fsync's metadata (measured: a status
# change of a 235 KiB object went from 1.38-1.48x a plain file write to 1.15-1.27x).
_NO_FILL_BYTES = 64 * 2**10
_MAX_BATCH = 0xFFFF
_MAX_OPEN_DIRS = 64
_IOV_MAX = 512
_LIST_FIRST = 8  # write_many lists the directory first when given more objects
_PROC_FD = os.path.isdir("/proc/self/fd")  # Linux: a descriptor's path, without a stat


def _file_head(journal_id: bytes) -> bytes:
    head = _FILE_HEAD.pack(_FILE_MAGIC, journal_id, zlib.crc32(_FILE_MAGIC + journal_id))
    return head.ljust(_DATA_START, b"\0")


def _journal_id(head: bytes) -> bytes | None:
    """The id in a journal's file header; None if the header is not a valid one."""
    if len(head) < _FILE_HEAD.size:
        return None
    magic, journal_id, crc = _FILE_HEAD.unpack_from(head)
    if magic != _FILE_MAGIC or zlib.crc32(magic + journal_id) != crc:
        return None
    return bytes(journal_id)


def _record_head(op: int, name: str, size: int, digest: bytes, at: int, count: int) -> bytes:
    """A record's bytes before its ``size`` bytes of data: header, header CRC, name."""
    raw_name = name.encode()
    head = _HEAD.pack(_MAGIC, size, len(raw_name), op, at, count, digest)
    crc = zlib.crc32(raw_name, zlib.crc32(head))
    return b"".join((head, _CRC.pack(crc), raw_name))


def _write_all_at(fd: int, parts: list[bytes | memoryview], offset: int) -> None:
    """Write every part, in order, from ``offset``, with few system calls (no copies)."""
    if len(parts) <= _IOV_MAX and os.pwritev(fd, parts, offset) == sum(map(len, parts)):
        return  # the usual case: one call wrote it all
    # A short write, or more parts than one call takes: (re)write them piece by piece.
    views = [memoryview(p) for p in parts if p]
    while views:
        written = os.pwritev(fd, views[:_IOV_MAX], offset)
        offset += written
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if written:
            views[0] = views[0][written:]


class _Entry(NamedTuple):
    """The newest journal record of one object (a patch's op is _WRITE too)."""

    op: int
    offset: int  # of the data (a patch's: of its new head), in the journal file
    size: int
    version: str
    tail_offset: int = 0  # a patch's: its unchanged tail, in an earlier record's data
    tail_size: int = 0


def _entry_data(fd: int, entry: _Entry) -> bytes:
    """The object's bytes that ``entry`` records (a patch: its head, then its tail)."""
    data = os.pread(fd, entry.size, entry.offset)
    if entry.tail_size:
        data += os.pread(fd, entry.tail_size, entry.tail_offset)
    return data


class _Record(NamedTuple):
    name: str
    entry: _Entry
    at: int  # position in its batch
    batch: int  # records in its batch
    end: int  # offset just after it, in the scanned buffer


def _record(blob: bytes, offset: int, base: int) -> _Record | None:
    """The whole, valid record at ``offset`` of ``blob``, or None."""
    if offset + _HEADER_SIZE > len(blob):
        return None
    magic, size, name_len, op, at, count, digest = _HEAD.unpack_from(blob, offset)
    (crc,) = _CRC.unpack_from(blob, offset + _HEAD.size)
    start = offset + _HEADER_SIZE
    end = start + name_len + size
    if magic != _MAGIC or end > len(blob) or op not in (_WRITE, _DELETE, _PATCH) or at >= count:
        return None
    raw_name = blob[start : start + name_len]
    if zlib.crc32(raw_name, zlib.crc32(blob[offset : offset + _HEAD.size])) != crc:
        return None
    data = blob[start + name_len : end]
    if op == _WRITE and digest_of(data) != digest:
        return None
    try:
        name = raw_name.decode()
    except UnicodeDecodeError:
        return None
    prefix, tail = 0, (0, 0)
    if op == _PATCH:  # its tail lies in an earlier record of this journal file
        found = parse_patch(data, _DATA_START, base + offset)
        if found is None:
            return None
        prefix, tail = found[0], found[1:]
    entry = _Entry(
        _WRITE if op == _PATCH else op,
        base + start + name_len + prefix,
        size - prefix,
        digest.hex(),
        *tail,
    )
    return _Record(name, entry, at, count, end)


def _batch(blob: bytes, offset: int, base: int) -> tuple[list[_Record], int] | None:
    """The whole batch that starts at ``offset`` (every record valid), and its end."""
    first = _record(blob, offset, base)
    if first is None or first.at != 0:
        return None
    records = [first]
    end = first.end
    for at in range(1, first.batch):
        record = _record(blob, end, base)
        if record is None or record.at != at or record.batch != first.batch:
            return None  # torn: a write that never returned
        records.append(record)
        end = record.end
    return records, end


def _scan(blob: bytes, base: int = _DATA_START) -> tuple[dict[str, _Entry], int]:
    """Index the whole batches at the start of ``blob``; return the index and their length.

    A batch is applied only if every record of it is whole and valid: a batch cut
    short (a crash, or a power cut that kept only some of its pages) ends the
    journal where it starts, so none of its records counts.
    """
    index: dict[str, _Entry] = {}
    offset = 0
    while (found := _batch(blob, offset, base)) is not None:
        records, offset = found
        for record in records:
            index[record.name] = record.entry
    return index, offset


def _valid_batch_in(blob: bytes, base: int) -> bool:
    """Tell whether a whole, valid batch starts anywhere in ``blob``.

    Pieces of a torn batch (records after its first) are not one: only damage
    in the middle of the journal leaves whole batches behind it.
    """
    at = blob.find(_MAGIC)
    while at >= 0:
        if _batch(blob, at, base) is not None:
            return True
        at = blob.find(_MAGIC, at + 1)
    return False


def parse_journal(blob: bytes) -> dict[str, bytes | None]:
    """Return the last record of each name (None: deleted); stop at a torn batch."""
    if _journal_id(blob[:_DATA_START]) is None:
        return {}
    index, _ = _scan(blob[_DATA_START:])
    return {
        name: None
        if e.op == _DELETE
        else blob[e.offset : e.offset + e.size] + blob[e.tail_offset : e.tail_offset + e.tail_size]
        for name, e in index.items()
    }


class _Any:
    """Marker type: write whatever the current version is."""


ANY = _Any()


@dataclass
class _Dir:
    """What this process knows about one directory."""

    mutex: threading.Lock = field(default_factory=threading.Lock)
    dir_fd: int = -1
    dir_ino: int = -1
    journal_fd: int = -1
    journal_ino: int = -1
    journal_link: str = ""  # what /proc says the open journal is ('' where it cannot)
    journal_id: bytes = b""
    allocated: int = 0  # the journal file's size: zeros after its last record
    checked: bool = False  # the whole journal was read once (damage checked)
    indexed: int = 0  # offset of the end of the records parsed into ``index``
    published: int = 0  # records below this offset are published as files already
    index: dict[str, _Entry] = field(default_factory=dict)
    bases: dict[str, Base] = field(default_factory=dict)  # valid in this journal file only

    def clear_records(self) -> None:
        """Forget the indexed records (another journal file, or none)."""
        self.index.clear()
        self.bases.clear()


class JournaledDirectories:
    """Journaled, crash-safe objects as files below one root directory (POSIX only)."""

    def __init__(self, root: Path) -> None:
        assert fcntl is not None
        self.root = root
        self._dirs: dict[Path, _Dir] = {}
        self._guard = threading.Lock()
        # Close every descriptor when the store object goes away; not at exit, where
        # a checkpoint may still be using them (`flush_all` waits for it, and the
        # process's end closes them).
        weakref.finalize(self, _close_all, self._dirs).atexit = False
        self._pending: list[Path] = []
        self._worker: threading.Thread | None = None
        self._deferred: set[Path] = set()
        _LIVE.add(self)

    def _state(self, directory: Path) -> _Dir:
        state = self._dirs.get(directory)  # an atomic read; only a new entry needs the guard
        if state is not None:
            return state
        with self._guard:
            state = self._dirs.get(directory)
            if state is None:
                if len(self._dirs) >= _MAX_OPEN_DIRS:
                    self._evict()
                state = self._dirs[directory] = _Dir()
            return state

    def _evict(self) -> None:
        """Close the descriptors of idle directories (two per directory otherwise stay open)."""
        for directory, state in list(self._dirs.items()):
            if not state.mutex.acquire(blocking=False):
                continue  # in use right now
            try:
                _close_all({directory: state})
                del self._dirs[directory]
            finally:
                state.mutex.release()

    @contextlib.contextmanager
    def _locked(self, directory: Path, create: bool, shared: bool = False) -> Iterator[_Dir]:
        """Hold the directory's mutex and flock, with the journal's index up to date.

        Without ``create``, a missing directory yields a state with no journal.
        """
        state = self._state(directory)
        with state.mutex:
            while True:
                fd = state.dir_fd
                if fd < 0:
                    if create:
                        _files.make_dirs(directory)
                    try:
                        fd = os.open(directory, os.O_RDONLY)
                    except (FileNotFoundError, NotADirectoryError):
                        if not create:
                            _close_journal(state)
                            yield state
                            return
                        continue
                    state.dir_fd, state.dir_ino = fd, os.fstat(fd).st_ino
                fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
                try:
                    same = os.stat(directory).st_ino == state.dir_ino
                except (FileNotFoundError, NotADirectoryError):
                    same = False
                if not same:  # pruned (and maybe recreated) meanwhile: lock the new one
                    os.close(fd)  # releases the flock
                    state.dir_fd = -1
                    _close_journal(state)
                    continue
                try:
                    self._refresh(directory, state)
                    yield state
                    return
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ journal

    @staticmethod
    def _refresh(directory: Path, state: _Dir) -> None:
        """Bring the index up to date with the journal on disk (under the flock).

        The journal's size does not say where its records end (it is zero-filled
        ahead of them), so the bytes just after the last known record are read:
        nothing new unless a record starts there. A torn batch needs no cutting:
        the next write overwrites it.
        """
        path = os.path.join(directory, JOURNAL_NAME)
        if state.journal_link and _link_of(state.journal_fd) == state.journal_link:
            # Still the file at that path (a deleted one reads "... (deleted)"). Not
            # a stat: on file systems with fine-grained timestamps, a stat makes the
            # next write update the file's times, and then each fdatasync writes the
            # inode too (measured: 85 -> 130 µs per write on this disk).
            state.allocated = os.lseek(state.journal_fd, 0, os.SEEK_END)
        else:
            try:
                info = os.stat(path)
            except FileNotFoundError:
                _close_journal(state)  # checkpointed (or never written)
                return
            if state.journal_fd < 0 or info.st_ino != state.journal_ino:
                _close_journal(state)
                try:
                    state.journal_fd = os.open(path, os.O_RDWR)
                except PermissionError:  # a reader without write access (another user's CLI)
                    state.journal_fd = os.open(path, os.O_RDONLY)
                state.journal_ino = info.st_ino
            state.journal_link = _link_of(state.journal_fd)
            state.allocated = info.st_size
        journal_id = _journal_id(os.pread(state.journal_fd, _FILE_HEAD.size, 0))
        if journal_id is None:
            head = os.pread(state.journal_fd, 1 << 20, 0)
            if state.allocated >= _FILE_HEAD.size and head.strip(b"\0"):
                raise CorruptStateError(
                    f"the journal {path} has a damaged header; nothing was changed. Restore "
                    "it from a backup, or move it aside to fall back on the plain files "
                    "(older state)",
                    obj_name=str(path),
                )
            state.clear_records()  # created, but its first write never landed
            state.journal_id, state.indexed, state.published = b"", _DATA_START, _DATA_START
            return
        if journal_id != state.journal_id:  # another journal file than the one indexed
            state.clear_records()
            state.journal_id, state.indexed, state.published = journal_id, _DATA_START, _DATA_START
            state.checked = False
        if state.allocated <= state.indexed:
            return
        if state.checked and not os.pread(state.journal_fd, _PROBE, state.indexed).strip(b"\0"):
            return  # zeros after the last record: nothing new
        # Something follows (a record, or bytes that need a close look), or this is
        # the first look at this journal: read all of it, and check that no whole
        # batch hides after bytes that are not one.
        tail = os.pread(state.journal_fd, state.allocated - state.indexed, state.indexed)
        found, valid = _scan(tail, state.indexed)
        if valid < len(tail) and _valid_batch_in(tail[valid + 1 :], state.indexed + valid + 1):
            # Not a torn tail: whole batches follow the bad bytes. Skipping them
            # would lose writes that returned, so refuse and touch nothing.
            raise CorruptStateError(
                f"the journal {path} is damaged at byte {state.indexed + valid}, with whole "
                "records after the damage; nothing was changed. Restore the journal from a "
                "backup, or move it aside to fall back on the plain files (older state)",
                obj_name=str(path),
            )
        state.index.update(found)
        state.indexed += valid
        state.checked = True

    def _append(self, directory: Path, state: _Dir, op: int, name: str, data: bytes) -> str:
        """Write one record as a batch of its own; return the object's new version."""
        return self._append_many(directory, state, op, [(name, data)])[0]

    def _append_many(
        self, directory: Path, state: _Dir, op: int, items: list[tuple[str, bytes]]
    ) -> list[str]:
        """Append the items as one batch of records, made durable together; return versions.

        The records overwrite the zeros after the last one, so making them durable
        is an fdatasync of blocks already on disk (no metadata), the cheapest
        durable write there is. When the journal is full it grows, zero-filled
        ahead, and that write is fsynced.
        """
        new_file = state.journal_fd < 0 or not state.journal_id
        if new_file:
            self._create(directory, state)
        if op == _WRITE:
            records = [
                Planned(data, digest_of(data))
                if len(data) < PATCH_MIN
                else plan_large(state.bases.get(name), data)
                for name, data in items
            ]
        else:
            records = [Planned(data, bytes(16)) for _, data in items]
        heads = []
        for i, ((name, _), record) in enumerate(zip(items, records, strict=True)):
            first = i - i % _MAX_BATCH  # batches of at most _MAX_BATCH records
            count = min(_MAX_BATCH, len(items) - first)
            heads.append(
                _record_head(
                    _PATCH if record.prefix else op,
                    name,
                    record.size,
                    record.digest,
                    i - first,
                    count,
                )
            )
        parts = [p for h, r in zip(heads, records, strict=True) for p in (h, *r.parts)]
        size = sum(map(len, parts))
        start = state.indexed
        if new_file:
            parts.insert(0, _file_head(state.journal_id))
            start = 0
        end = state.indexed + size
        grow = end > state.allocated
        allocated = end
        if grow and size < _NO_FILL_BYTES:
            allocated = -(-(end + min(max(end, _MIN_ALLOCATION), _MAX_FILL)) // 4096) * 4096
            parts.append(bytes(allocated - end))
        try:
            _write_all_at(state.journal_fd, parts, start)
            if grow:
                os.fsync(state.journal_fd)
            else:
                os.fdatasync(state.journal_fd)
        except BaseException:
            # Whatever landed is a batch that never returned: make sure it never counts.
            with contextlib.suppress(OSError):
                os.pwrite(state.journal_fd, bytes(_HEADER_SIZE), state.indexed)
                if new_file:
                    os.pwrite(state.journal_fd, bytes(_DATA_START), 0)
            if new_file:
                state.journal_id = b""
            raise
        if new_file:
            _files.fsync_dir(directory)  # the new journal's name must survive a crash
        state.allocated = max(state.allocated, allocated)
        versions = []
        for (name, data), record, head in zip(items, records, heads, strict=True):
            version = record.digest.hex()
            at = state.indexed + len(head) + record.prefix
            state.index[name] = _Entry(op, at, record.size - record.prefix, version, *record.tail)
            if record.chunks:
                keep_base(state.bases, name, Base(data, at, record.chunks))
            elif not record.prefix:  # written whole and small, or deleted
                state.bases.pop(name, None)
            state.indexed += len(head) + record.size
            versions.append(version)
        return versions

    @staticmethod
    def _create(directory: Path, state: _Dir) -> None:
        """Open a new journal file (its header is written with its first batch)."""
        path = directory / JOURNAL_NAME
        if state.journal_fd < 0:
            state.journal_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            info = os.fstat(state.journal_fd)
            state.journal_ino, state.allocated = info.st_ino, info.st_size
            state.journal_link = _link_of(state.journal_fd)
        state.journal_id = secrets.token_bytes(16)
        state.indexed = state.published = _DATA_START
        state.checked = True
        state.clear_records()

    def _checkpoint(self, directory: Path, state: _Dir) -> None:
        """Publish the journal into plain, durable files, then delete it."""
        if state.journal_fd < 0:
            return
        self._publish(directory, state)
        written = [name for name, entry in state.index.items() if entry.op == _WRITE]
        # A few files get an fsync each, which waits for them alone. Many (a task's
        # stages) get one syncfs(2) where there is one (Linux): far cheaper than an
        # fsync per file, though it also waits for the file system's other dirty data.
        if len(written) <= _FSYNC_EACH_MAX or not _files.sync_filesystem(directory):
            for name in written:
                _files.fsync_file(directory / name)
        _files.fsync_dir(directory)
        (directory / JOURNAL_NAME).unlink(missing_ok=True)
        _files.fsync_dir(directory)
        _close_journal(state)

    @staticmethod
    def _publish(directory: Path, state: _Dir) -> None:
        """Make the records not yet published plain files, each whole once visible (no fsync).

        A new file is written unnamed and linked into place where the system
        can; an existing one is replaced with a temp file and a rename.
        """
        existing: set[str] | None = None
        for name, entry in state.index.items():
            if entry.offset < state.published:
                continue
            if entry.op == _DELETE:
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    (directory / name).unlink()
                continue
            data = _entry_data(state.journal_fd, entry)
            if existing is None:
                existing = _files.file_names(directory)
            if name in existing or not _files.publish_new(state.dir_fd, name, data):
                _files.publish(directory / name, data)
        state.published = state.indexed

    @staticmethod
    def _live_names(directory: Path, state: _Dir) -> set[str]:
        """The objects of the directory: plain files, overlaid with the journal."""
        try:
            names = {
                entry.name
                for entry in os.scandir(directory)
                if not _files.is_temp_name(entry.name) and entry.is_file()
            }
        except FileNotFoundError:
            names = set()
        for name, entry in state.index.items():
            if entry.op == _WRITE:
                names.add(name)
            else:
                names.discard(name)
        return names

    @staticmethod
    def _current(name: str, state: _Dir, versioned: bool = True) -> tuple[bytes | None, str | None]:
        """The bytes and version of object ``name`` of the locked directory; (None, None) if absent.

        A plain file is opened relative to the locked directory. Without
        ``versioned`` the version of a plain file is not computed (None).
        """
        entry = state.index.get(name)
        if entry is None:
            if state.dir_fd < 0:  # no such directory
                return None, None
            data = _files.read_or_none(name, state.dir_fd)
            if data is None or not versioned:
                return data, None
            return data, content_version(data)
        if entry.op == _DELETE:
            return None, None
        return _entry_data(state.journal_fd, entry), entry.version

    # ------------------------------------------------------------------ operations

    def read(self, path: Path) -> bytes:
        """The object's newest bytes (FileNotFoundError if absent)."""
        with self._locked(path.parent, create=False, shared=True) as state:
            data, _ = self._current(path.name, state, versioned=False)
        if data is None:
            raise FileNotFoundError(str(path))
        return data

    def read_versioned(self, path: Path) -> tuple[bytes, str]:
        """The object's newest bytes and version (FileNotFoundError if absent)."""
        with self._locked(path.parent, create=False, shared=True) as state:
            data, version = self._current(path.name, state)
        if data is None or version is None:
            raise FileNotFoundError(str(path))
        return data, version

    def read_many_in(self, directory: Path, names: list[str]) -> dict[str, tuple[bytes, str]]:
        """Several objects of one directory with their versions, under one shared lock."""
        found: dict[str, tuple[bytes, str]] = {}
        with self._locked(directory, create=False, shared=True) as state:
            for name in names:
                data, version = self._current(name, state)
                if data is not None and version is not None:
                    found[name] = (data, version)
        return found

    def exists(self, path: Path) -> bool:
        """Tell whether the object exists."""
        with self._locked(path.parent, create=False, shared=True) as state:
            return self._exists(path, state)

    @staticmethod
    def _exists(path: Path, state: _Dir) -> bool:
        entry = state.index.get(path.name)
        if entry is not None:
            return entry.op == _WRITE
        return path.is_file()

    def names(self, directory: Path) -> set[str]:
        """The object names of a directory: its files, overlaid with its journal."""
        with self._locked(directory, create=False, shared=True) as state:
            return self._live_names(directory, state)

    def write(self, path: Path, data: bytes, version: str | _Any | None = ANY) -> str:
        """Journal ``data`` as the object's newest bytes; return its version.

        With a ``version``, only if the object's current version is that (None:
        only if absent); otherwise `VersionConflict`.
        """
        return self.write_many([(path, data, version)])[0]

    def write_many(
        self, items: list[tuple[Path, bytes, str | _Any | None]], directory: Path | None = None
    ) -> list[str]:
        """Write several objects of one directory as one batch, made durable together.

        Every version is checked before anything is written: on a conflict,
        nothing is. ``directory`` is the items' parent directory (by default,
        the first item's).
        """
        if directory is None:
            directory = items[0][0].parent
        with self._locked(directory, create=True) as state:
            # Many objects at once (a new task's): one listing tells which are absent,
            # instead of a stat and a failed open each.
            listed = _files.file_names(directory) if len(items) > _LIST_FIRST else None
            for path, _, version in items:
                entry = state.index.get(path.name)
                if entry is not None and entry.op == _WRITE:
                    current: str | None = entry.version  # a file, not a directory
                elif listed is not None and path.name not in listed:
                    current = None  # neither a file nor a directory
                elif _files.is_directory(path):
                    if isinstance(version, _Any):
                        raise IsADirectoryError(str(path))
                    raise VersionConflict(f"{path} is a directory", obj_name=path.name)
                elif isinstance(version, _Any):
                    continue
                else:
                    current = self._current(path.name, state)[1]
                if not isinstance(version, _Any):
                    check_version(str(path), version, current)
            versions = self._append_many(
                directory, state, _WRITE, [(path.name, data) for path, data, _ in items]
            )
            if directory not in self._deferred:
                for path, data, _ in items:  # plain files at once; durable at the checkpoint
                    _files.publish(path, data)
                _PUBLISHED[directory] = self.root
            if state.indexed > _CHECKPOINT_BYTES:
                self._checkpoint(directory, state)
            return versions

    def create(self, path: Path, data: bytes) -> bool:
        """Create ``path`` if absent (checked under the lock); False if it exists."""
        try:
            self.write(path, data, None)
        except VersionConflict:
            return False
        return True

    def delete(self, path: Path, version: str | None = None) -> None:
        """Journal the object's deletion (if ``version`` is given, only if it matches).

        When no object is left in the directory, the journal is checkpointed at
        once, so the directory is removed with its last object.
        """
        directory = path.parent
        with self._locked(directory, create=False) as state:
            if version is not None:
                check_version(str(path), version, self._current(path.name, state)[1])
            elif not self._exists(path, state):
                return
            self._append(directory, state, _DELETE, path.name, b"")
            if directory not in self._deferred:
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    path.unlink()
                _PUBLISHED[directory] = self.root
            if not self._live_names(directory, state):
                self._checkpoint(directory, state)
        _files.prune_empty_dirs(directory, self.root)

    def defer(self, directory: Path) -> None:
        """Journal writes to ``directory`` without publishing them, until it is synced."""
        with self._guard:
            self._deferred.add(directory)

    def sync(self, directory: Path, wait: bool = True) -> None:
        """Checkpoint the directory and every directory below it.

        With ``wait=False`` the checkpoint runs on a background thread: every
        write is durable already, so nobody needs to wait for it. Writes to
        those directories are published at once again from now on.
        """
        with self._guard:
            self._deferred = {
                d for d in self._deferred if d != directory and directory not in d.parents
            }
        if not directory.is_dir():
            return
        found = [Path(p) for p, _dirs, files in os.walk(directory) if JOURNAL_NAME in files]
        if wait:
            for sub in found:
                self._checkpoint_now(sub)
            return
        # The files are published here, in the caller's thread; only making them
        # durable and deleting the journal is left to the background. So the
        # background never creates a file: a caller that deletes the directory
        # right after (a temporary directory) does not race it.
        for sub in found:
            with self._locked(sub, create=False) as state:
                if state.journal_fd >= 0:
                    self._publish(sub, state)
        with self._guard:
            self._pending.extend(found)
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(
                    target=self._drain, name="checkmate-journal-checkpoint", daemon=True
                )
                self._worker.start()

    def _checkpoint_now(self, directory: Path) -> None:
        _PUBLISHED.pop(directory, None)
        with self._locked(directory, create=False) as state:
            self._checkpoint(directory, state)
        self._forget(directory)
        _files.prune_empty_dirs(directory, self.root)

    def _forget(self, directory: Path) -> None:
        """Close an idle directory's descriptors (after its task was checkpointed)."""
        with self._guard:
            state = self._dirs.get(directory)
            if state is None or not state.mutex.acquire(blocking=False):
                return
            try:
                _close_all({directory: state})
                del self._dirs[directory]
            finally:
                state.mutex.release()

    def _drain(self) -> None:
        while True:
            with self._guard:
                if not self._pending:
                    self._worker = None
                    return
                directory = self._pending.pop(0)
            try:
                self._checkpoint_now(directory)
            except OSError as exc:  # the journal stays, and still holds the truth
                logger.warning("could not checkpoint the journal of %s: %r", directory, exc)

    def flush(self) -> None:
        """Wait until the background checkpoints asked for so far are done."""
        worker = self._worker
        if worker is not None:
            worker.join()


_LIVE: weakref.WeakSet[JournaledDirectories] = weakref.WeakSet()
# Directories whose journal holds writes that were published at once (outside
# a task's deferral), with their store's root: checkpointed at exit.
_PUBLISHED: dict[Path, Path] = {}


@atexit.register
def flush_all() -> None:
    """Finish this process's checkpoints (run at interpreter exit).

    Checkpoints the directories written outside a task's deferral and waits
    for the background ones. Without it, a journal stays beside those files
    (it still holds the truth, and any later checkpoint folds it in) and a
    checkpoint cut short would leave temp files (removed by the next bind).
    """
    for journaled in list(_LIVE):
        journaled.flush()
    pending = dict(_PUBLISHED)
    _PUBLISHED.clear()
    stores: dict[Path, JournaledDirectories] = {}
    for directory, root in pending.items():
        store = stores.setdefault(root, JournaledDirectories(root))
        try:
            store._checkpoint_now(directory)
        except OSError as exc:  # the journal stays, and still holds the truth
            logger.warning("could not checkpoint the journal of %s: %r", directory, exc)


def _link_of(fd: int) -> str:
    """The path /proc gives for an open descriptor; '' where that cannot be relied on."""
    if not (_PROC_FD and _proc_fd_marks_deleted()):
        return ""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


@functools.cache
def _proc_fd_marks_deleted() -> bool:
    """Tell whether /proc/self/fd shows that an open file was unlinked (checked once).

    Some sandboxes' /proc may not; relying on it there could append to a journal
    that another process checkpointed and deleted.
    """
    import tempfile  # noqa: PLC0415 - once per process, only where /proc exists

    try:
        fd, path = tempfile.mkstemp(prefix=".checkmate-probe-")
        try:
            before = os.readlink(f"/proc/self/fd/{fd}")
            os.unlink(path)
            after = os.readlink(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
    except OSError:
        return False
    return after == f"{before} (deleted)"


def _close_journal(state: _Dir) -> None:
    if state.journal_fd >= 0:
        with contextlib.suppress(OSError):
            os.close(state.journal_fd)
    state.journal_fd, state.journal_ino, state.indexed, state.published = -1, -1, 0, 0
    state.journal_link = ""
    state.journal_id, state.allocated, state.checked = b"", 0, False
    state.clear_records()


def _close_all(dirs: dict[Path, _Dir]) -> None:
    for state in dirs.values():
        _close_journal(state)
        if state.dir_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(state.dir_fd)
        state.dir_fd = -1
