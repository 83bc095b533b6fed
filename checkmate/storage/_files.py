"""Crash-safe file primitives shared by the local-disk backends."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import itertools
import logging
import os
import secrets
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

from .._host import process_alive, this_host
from ..naming import check_obj_name

CAS_SUPPORTED = fcntl is not None
"""Compare-and-swap needs flock(2), which Windows lacks."""

logger = logging.getLogger(__name__)

TEMP_MARKER = ".cmtmp-"
_DIR_FSYNC = os.name != "nt"
_MAKEDIRS_TRIES = 5
_STALE_TEMP_SECONDS = 3600.0
_FIRST_READ = 1 << 16
# Linux: a file can be written unnamed and linked into place through /proc once whole.
_TMPFILE = getattr(os, "O_TMPFILE", 0) if os.path.isdir("/proc/self/fd") else 0


def _host_tag() -> str:
    host = this_host()
    ident = f"{host.hostname}|{host.boot_id}|{host.pid_namespace}"
    return hashlib.sha256(ident.encode()).hexdigest()[:8]


JOURNAL_NAME = ".checkmate-journal"


def is_temp_name(basename: str) -> bool:
    """Tell whether a file name is one of ours that is not an object (temp file, journal)."""
    return basename.startswith(".") and (TEMP_MARKER in basename or basename == JOURNAL_NAME)


# (pid, "<host tag>-<pid>-<salt>") of this process; a fork gets its own.
_temp_stem: tuple[int, str] = (-1, "")
_temp_serial = itertools.count()


def _temp_path(path: Path | str) -> str:
    """A fresh temp file name beside ``path``: ``.<name>.cmtmp-<host>-<pid>-<salt><n>``.

    The writer's host tag and pid let a later sweep tell a dead writer's
    leftovers; a random salt (per process) and a counter keep names unique.
    """
    global _temp_stem  # noqa: PLW0603 - computed once per process
    pid = os.getpid()
    if _temp_stem[0] != pid:
        _temp_stem = (pid, f"{_host_tag()}-{pid}-{secrets.token_hex(4)}")
    head, name = os.path.split(os.fspath(path))
    return os.path.join(head, f".{name}{TEMP_MARKER}{_temp_stem[1]}{next(_temp_serial):x}")


def _fsync_path(path: Path) -> None:
    """Fsync a file or directory by path; nothing if it is gone (a concurrent delete)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """Fsync a directory, so that the names in it survive a crash (no-op on Windows)."""
    if _DIR_FSYNC:
        _fsync_path(directory)


def fsync_file(path: Path) -> None:
    """Fsync a file's data, if the file exists."""
    _fsync_path(path)


def _write_temp(path: Path, data: bytes, durable: bool) -> str:
    """Write ``data`` to a fresh temp file beside ``path`` (fsynced if ``durable``).

    Creates missing parent directories, retrying if a concurrent delete prunes
    them in between.
    """
    for attempt in range(_MAKEDIRS_TRIES):
        tmp = _temp_path(path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileNotFoundError:
            if attempt == _MAKEDIRS_TRIES - 1:
                raise
            make_dirs(path.parent)
            continue
        try:
            _write_all(fd, data)
            if durable:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink_quietly(tmp)
            raise
        os.close(fd)
        return tmp
    raise AssertionError("unreachable")  # pragma: no cover


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _replace(tmp: str, path: Path) -> None:
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def is_directory(path: Path) -> bool:
    """Tell whether ``path`` is a directory (one stat; False if absent)."""
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False


def file_names(directory: Path) -> set[str]:
    """The names in ``directory`` (empty if it does not exist)."""
    try:
        return set(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return set()


def make_dirs(directory: Path) -> None:
    """Create ``directory`` and its parents, fsyncing each parent that gained an entry."""
    if directory.is_dir():
        return
    make_dirs(directory.parent)
    try:
        directory.mkdir()
    except FileExistsError:
        return
    fsync_dir(directory.parent)


def _load_syncfs() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func: Callable[[int], int] = libc.syncfs
    except (OSError, AttributeError):
        return None
    return func


_SYNCFS = _load_syncfs()


def sync_filesystem(directory: Path) -> bool:
    """Flush everything written to the file system of ``directory`` (syncfs(2), Linux).

    Returns:
        False where syncfs is not available (the caller fsyncs file by file).
    """
    if _SYNCFS is None:
        return False
    fd = os.open(directory, os.O_RDONLY)
    try:
        if _SYNCFS(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs: {os.strerror(err)}", str(directory))
    finally:
        os.close(fd)
    return True


def publish(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically (temp file + rename) without forcing it to disk."""
    _replace(_write_temp(path, data, durable=False), path)


def publish_new(dir_fd: int, name: str, data: bytes) -> bool:
    """Create file ``name`` in the directory open as ``dir_fd``, whole once visible (no fsync).

    The file is written unnamed (``O_TMPFILE``) and linked into place: no temp
    name to create and rename away (measured: 23 µs a file instead of 34).
    Returns False, having done nothing, if the name exists or the system
    cannot (not Linux, or a file system without ``O_TMPFILE``): use `publish`.
    """
    if not _TMPFILE:
        return False
    try:
        fd = os.open(".", _TMPFILE | os.O_WRONLY, 0o644, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        _write_all(fd, data)
        os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dir_fd, follow_symlinks=True)
    except OSError:  # the name exists, or this system cannot link it: nothing is left behind
        return False
    finally:
        os.close(fd)
    return True


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync of the directory."""
    _replace(_write_temp(path, data, durable=True), path)
    fsync_dir(path.parent)


def atomic_create(path: Path, data: bytes) -> bool:
    """Create ``path`` with ``data`` only if it does not exist; False if it does.

    The complete, fsynced temp file is hard-linked into place, so the link
    either fails or publishes all the bytes at once.
    """
    if path.exists():
        return False
    tmp = _write_temp(path, data, durable=True)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        _unlink_quietly(tmp)
    fsync_dir(path.parent)
    return True


def read_file(path: Path | str, dir_fd: int | None = None) -> bytes:
    """Return the file's bytes; FileNotFoundError if it is absent or not a file.

    With ``dir_fd``, ``path`` is relative to that open directory.
    """
    try:
        fd = os.open(path, os.O_RDONLY, dir_fd=dir_fd)
    except NotADirectoryError as exc:
        raise FileNotFoundError(str(path)) from exc
    try:
        data = os.read(fd, _FIRST_READ)
        if len(data) < _FIRST_READ:  # a short read of a regular file: its end
            return data
        chunks = [data]
        size = max(os.fstat(fd).st_size, 1)
        while chunk := os.read(fd, size):
            chunks.append(chunk)
        return b"".join(chunks)
    except IsADirectoryError as exc:
        raise FileNotFoundError(str(path)) from exc
    finally:
        os.close(fd)


def delete_file(path: Path, root: Path) -> None:
    """Delete ``path`` if present, then prune the empty directories up to ``root``."""
    try:
        path.unlink()
    except (FileNotFoundError, NotADirectoryError):
        return
    except IsADirectoryError:
        return
    prune_empty_dirs(path.parent, root)


def prune_empty_dirs(directory: Path, root: Path) -> None:
    """Remove ``directory`` and its parents while they are empty, up to ``root``."""
    parent = directory
    while parent != root and root in parent.parents:
        try:
            parent.rmdir()
        except OSError:
            break
        parent = parent.parent


def start_dir(root: Path, prefix: str) -> Path:
    """The directory below ``root`` that holds every name starting with ``prefix``."""
    head, _, _ = prefix.rpartition("/")
    return root.joinpath(*check_obj_name(head).split("/")) if head else root


def list_files(root: Path, prefix: str) -> list[str]:
    """Return the sorted '/'-joined names of the files below ``root`` starting with ``prefix``."""
    start = start_dir(root, prefix)
    if not start.is_dir():
        return []
    names: list[str] = []
    for dirpath, _dirnames, filenames in os.walk(start):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        base = "" if rel_dir == "." else rel_dir + "/"
        for filename in filenames:
            if is_temp_name(filename):
                continue
            name = base + filename
            if name.startswith(prefix):
                names.append(name)
    names.sort()
    return names


def _temp_is_stale(path: Path, now: float) -> bool:
    """A temp file is stale when its writer is a dead process of this host, or it is old."""
    tag = path.name.rpartition(TEMP_MARKER)[2].split("-")
    mine = len(tag) == 3 and tag[0] == _host_tag() and tag[1].isdigit()
    if mine and not process_alive(int(tag[1]), None):
        return True
    try:
        return now - path.stat().st_mtime > _STALE_TEMP_SECONDS
    except FileNotFoundError:
        return False


def sweep_temp_files(root: Path, prefix: str) -> int:
    """Delete stale temp files below ``root`` whose names start with ``prefix``.

    Returns:
        How many files were removed.
    """
    start = start_dir(root, prefix)
    if not start.is_dir():
        return 0
    removed = 0
    now = time.time()
    for dirpath, _dirnames, filenames in os.walk(start):
        for filename in filenames:
            if not (filename.startswith(".") and TEMP_MARKER in filename):
                continue
            path = Path(dirpath) / filename
            if _temp_is_stale(path, now):
                path.unlink(missing_ok=True)
                removed += 1
                logger.info("removed stale temp file %s", path)
    return removed


def read_or_none(path: Path | str, dir_fd: int | None = None) -> bytes | None:
    """The file's bytes, or None if it does not exist (``dir_fd`` as in `read_file`)."""
    try:
        return read_file(path, dir_fd)
    except FileNotFoundError:
        return None
