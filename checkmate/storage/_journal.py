"""A write-ahead journal per directory: durable local writes without the cost of renames.

On this kind of disk, fsync is cheap (tens of microseconds) but renaming over,
or deleting, a file whose blocks are already on disk costs about a millisecond.
So every write to a directory does this, under an exclusive lock of the
directory (flock across processes, a mutex across threads):

1. append one record (the object's name and full new bytes, with a CRC) to the
   directory's journal file ``.checkmate-journal`` and fsync it: from here on
   the write survives a crash or a power cut;
2. publish the bytes with a temp file and an atomic rename, without fsync: a
   reader sees the old or the new bytes, never a mix, and the old file was
   never fsynced, so replacing it is cheap.

A checkpoint fsyncs every file the journal names, then the directory, then
deletes the journal. It runs when the journal grows past a size, when the
engine unbinds a task (`TaskIO.sync`), and as recovery: the first time a
process touches a directory that has a journal, it replays it under the lock
(rewriting, durably, every object whose bytes differ from the journal's last
record for it: after a power cut those renames may be lost), then checkpoints.
Replaying is idempotent; a torn record at the journal's end (a crash in the
middle of an append) is ignored, and that write had not returned.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import threading
import weakref
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import VersionConflict
from . import _files

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["ANY", "JOURNAL_NAME", "JournaledDirectories", "parse_journal"]

logger = logging.getLogger(__name__)

JOURNAL_NAME = _files.JOURNAL_NAME
_MAGIC = b"CMJ1"
_HEADER = struct.Struct(">4sIIHB")  # magic, data length, crc32, name length, op
_WRITE, _DELETE = 0, 1
_CHECKPOINT_BYTES = 4 * 2**20
_MAX_OPEN_DIRS = 64


def _record(op: int, name: str, data: bytes) -> bytes:
    raw_name = name.encode()
    crc = zlib.crc32(data, zlib.crc32(raw_name, op))
    return _HEADER.pack(_MAGIC, len(data), crc, len(raw_name), op) + raw_name + data


def parse_journal(blob: bytes) -> dict[str, bytes | None]:
    """Return the last record of each name (None: deleted); stop at a torn record."""
    return _scan(blob)[0]


def _valid_length(blob: bytes) -> int:
    """How many leading bytes of a journal hold whole, valid records."""
    return _scan(blob)[1]


def _scan(blob: bytes) -> tuple[dict[str, bytes | None], int]:
    last: dict[str, bytes | None] = {}
    offset = 0
    while offset + _HEADER.size <= len(blob):
        magic, size, crc, name_len, op = _HEADER.unpack_from(blob, offset)
        start = offset + _HEADER.size
        end = start + name_len + size
        if magic != _MAGIC or end > len(blob) or op not in (_WRITE, _DELETE):
            break
        raw_name = blob[start : start + name_len]
        data = blob[start + name_len : end]
        if zlib.crc32(data, zlib.crc32(raw_name, op)) != crc:
            break
        last[raw_name.decode()] = data if op == _WRITE else None
        offset = end
    return last, offset


class _Any:
    """Marker type: write whatever the current version is."""


ANY = _Any()


@dataclass
class _Dir:
    """What this process knows about one directory."""

    mutex: threading.Lock = field(default_factory=threading.Lock)
    recovered: bool = False
    dir_fd: int = -1
    journal_fd: int = -1
    journal_ino: int = -1
    journal_size: int = 0
    named: set[str] = field(default_factory=set)


class JournaledDirectories:
    """Journaled, crash-safe writes to files below one root directory (POSIX only)."""

    def __init__(self, root: Path) -> None:
        assert fcntl is not None
        self.root = root
        self._dirs: dict[Path, _Dir] = {}
        self._guard = threading.Lock()
        # Close every descriptor when the store object goes away.
        weakref.finalize(self, _close_all, self._dirs)
        self._pending: list[Path] = []
        self._worker: threading.Thread | None = None

    def _state(self, directory: Path) -> _Dir:
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
                self._close_journal(state)
                if state.dir_fd >= 0:
                    os.close(state.dir_fd)
                    state.dir_fd = -1
                del self._dirs[directory]
            finally:
                state.mutex.release()

    @contextlib.contextmanager
    def _locked(self, directory: Path, create: bool) -> Iterator[_Dir]:
        """Hold the directory's mutex and flock; recover its journal on first use."""
        state = self._state(directory)
        with state.mutex:
            while True:
                if create:
                    _files.make_dirs(directory)
                fd = state.dir_fd
                if fd < 0:
                    try:
                        fd = os.open(directory, os.O_RDONLY)
                    except FileNotFoundError:
                        if not create:
                            yield state
                            return
                        continue
                    state.dir_fd = fd
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    same = os.stat(directory).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if not same:  # pruned (and maybe recreated) meanwhile: lock the new one
                    os.close(fd)  # releases the flock
                    state.dir_fd = -1
                    self._close_journal(state)
                    continue
                try:
                    if not state.recovered:
                        self._recover(directory, state)
                    yield state
                    return
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ journal

    def _journal_path(self, directory: Path) -> Path:
        return directory / JOURNAL_NAME

    def _journal(self, directory: Path, state: _Dir) -> int:
        """The open journal of the directory, (re)opened if another process retired it."""
        path = self._journal_path(directory)
        try:
            ino = os.stat(path).st_ino
        except FileNotFoundError:
            ino = -1
        if state.journal_fd >= 0 and ino == state.journal_ino:
            return state.journal_fd
        self._close_journal(state)
        state.named.clear()  # whoever retired the journal made those files durable
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        info = os.fstat(fd)
        if ino != info.st_ino:
            _files.fsync_dir(directory)  # the new journal's name must survive a crash
        elif info.st_size:
            # A writer that died in the middle of an append may have left a torn
            # record: cut it off, or every record after it would be unreadable.
            valid = _valid_length(path.read_bytes())
            if valid < info.st_size:
                os.ftruncate(fd, valid)
                os.fsync(fd)
                info = os.fstat(fd)
        state.journal_fd, state.journal_ino, state.journal_size = fd, info.st_ino, info.st_size
        return fd

    @staticmethod
    def _close_journal(state: _Dir) -> None:
        if state.journal_fd >= 0:
            os.close(state.journal_fd)
        state.journal_fd, state.journal_ino, state.journal_size = -1, -1, 0

    def _append(self, directory: Path, state: _Dir, op: int, name: str, data: bytes) -> None:
        fd = self._journal(directory, state)
        size = os.fstat(fd).st_size
        if size != state.journal_size:
            # Other processes appended since our last record. A writer that died in
            # the middle of an append leaves a torn record: cut it off first, or
            # every record after it would be unreadable.
            tail = os.pread(fd, size - state.journal_size, state.journal_size)
            valid = state.journal_size + _valid_length(tail)
            if valid < size:
                os.ftruncate(fd, valid)
                os.fsync(fd)
            state.journal_size = valid
        record = _record(op, name, data)
        view = memoryview(record)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        state.journal_size += len(record)
        state.named.add(name)

    def _checkpoint(self, directory: Path, state: _Dir) -> None:
        """Make every file the journal names durable, then delete the journal."""
        path = self._journal_path(directory)
        if not path.exists():
            self._close_journal(state)
            return
        names = set(state.named) | set(parse_journal(path.read_bytes()))
        for name in names:
            _files.fsync_file(directory / name)
        _files.fsync_dir(directory)
        path.unlink(missing_ok=True)
        _files.fsync_dir(directory)
        self._close_journal(state)
        state.named.clear()

    def _recover(self, directory: Path, state: _Dir) -> None:
        state.recovered = True
        path = self._journal_path(directory)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return
        replayed = 0
        for name, data in parse_journal(blob).items():
            target = directory / name
            current = _files.read_or_none(target)
            if current == data:
                continue
            replayed += 1
            if data is None:
                target.unlink(missing_ok=True)
            else:
                _files.atomic_write(target, data)
        logger.info("replayed journal of %s (%d object(s) restored)", directory, replayed)
        self._checkpoint(directory, state)

    def _publish(
        self, directory: Path, state: _Dir, path: Path, data: bytes, current: bytes | None
    ) -> None:
        """Journal, then rename into place; if the rename fails, journal the old bytes back."""
        self._append(directory, state, _WRITE, path.name, data)
        try:
            _files.publish(path, data)
        except BaseException:
            if current is None:
                self._append(directory, state, _DELETE, path.name, b"")
            else:
                self._append(directory, state, _WRITE, path.name, current)
            raise
        if state.journal_size > _CHECKPOINT_BYTES:
            self._checkpoint(directory, state)

    # ------------------------------------------------------------------ operations

    def recover(self, directory: Path) -> None:
        """Replay the directory's journal, if any, the first time this process looks at it."""
        state = self._state(directory)
        if state.recovered:
            return
        if not self._journal_path(directory).exists():
            state.recovered = True
            return
        with self._locked(directory, create=False):
            pass

    def write(self, path: Path, data: bytes, version: str | _Any | None = ANY) -> None:
        """Journal and publish ``data`` at ``path``.

        With a ``version``, only if the file's content version is that (None:
        only if absent); otherwise `VersionConflict`.
        """
        directory = path.parent
        with self._locked(directory, create=True) as state:
            if path.is_dir():
                if version is None:
                    raise VersionConflict(f"{path} is a directory", obj_name=path.name)
                raise IsADirectoryError(str(path))
            current = _files.read_or_none(path)
            if not isinstance(version, _Any):
                _files.check_version(path, version, current)
            self._publish(directory, state, path, data, current)

    def create(self, path: Path, data: bytes) -> bool:
        """Create ``path`` if absent (checked under the lock); False if it exists."""
        directory = path.parent
        with self._locked(directory, create=True) as state:
            if path.exists():
                return False
            self._publish(directory, state, path, data, None)
            return True

    def delete(self, path: Path, version: str | None = None) -> None:
        """Journal and delete ``path`` (if ``version`` is given, only if it matches)."""
        directory = path.parent
        with self._locked(directory, create=False) as state:
            current = _files.read_or_none(path)
            if version is not None:
                _files.check_version(path, version, current)
            if current is None:
                return
            self._append(directory, state, _DELETE, path.name, b"")
            path.unlink(missing_ok=True)
            if _only_journal_left(directory):
                self._checkpoint(directory, state)
        _files.prune_empty_dirs(directory, self.root)

    def sync(self, directory: Path, wait: bool = True) -> None:
        """Checkpoint the directory and every directory below it.

        With ``wait=False`` the checkpoint runs on a background thread: every
        write is durable already, so nobody needs to wait for it.
        """
        if not directory.is_dir():
            return
        found = [Path(p) for p, _dirs, files in os.walk(directory) if JOURNAL_NAME in files]
        if wait:
            for sub in found:
                self._checkpoint_now(sub)
            return
        with self._guard:
            self._pending.extend(found)
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(
                    target=self._drain, name="checkmate-journal-checkpoint", daemon=True
                )
                self._worker.start()

    def _checkpoint_now(self, directory: Path) -> None:
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
            except OSError as exc:  # the journal stays; the next access replays it
                logger.warning("could not checkpoint the journal of %s: %r", directory, exc)

    def flush(self) -> None:
        """Wait until the background checkpoints asked for so far are done."""
        worker = self._worker
        if worker is not None:
            worker.join()


def _close_all(dirs: dict[Path, _Dir]) -> None:
    for state in dirs.values():
        for fd in (state.journal_fd, state.dir_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        state.journal_fd = state.dir_fd = -1


def _only_journal_left(directory: Path) -> bool:
    try:
        return os.listdir(directory) in ([], [JOURNAL_NAME])
    except FileNotFoundError:
        return False
