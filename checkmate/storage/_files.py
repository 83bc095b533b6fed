"""Crash-safe file primitives shared by the local-disk backends."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

logger = logging.getLogger(__name__)

TEMP_MARKER = ".cmtmp-"
_DIR_FSYNC = os.name != "nt"
_MAKEDIRS_TRIES = 5


def is_temp_name(basename: str) -> bool:
    """Tell whether a file name is one of our temporary files."""
    return basename.startswith(".") and TEMP_MARKER in basename


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{TEMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}")


def _fsync_dir(directory: Path) -> None:
    if not _DIR_FSYNC:
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(path: Path, data: bytes) -> Path:
    """Write ``data`` to a fresh fsynced temp file beside ``path``; return its path.

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
            path.parent.mkdir(parents=True, exist_ok=True)
            _fsync_dir(path.parent.parent)
            continue
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        return tmp
    raise AssertionError("unreachable")  # pragma: no cover


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync of the directory."""
    tmp = _write_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_create(path: Path, data: bytes) -> bool:
    """Create ``path`` with ``data`` only if it does not exist; False if it does.

    The complete, fsynced temp file is hard-linked into place, so the link
    either fails or publishes all the bytes at once.
    """
    if path.exists():
        return False
    tmp = _write_temp(path, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return True


def read_file(path: Path) -> bytes:
    """Return the file's bytes; FileNotFoundError if it is absent or not a file."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except (IsADirectoryError, NotADirectoryError) as exc:
        raise FileNotFoundError(str(path)) from exc


def delete_file(path: Path, root: Path) -> None:
    """Delete ``path`` if present, then prune the empty directories up to ``root``."""
    try:
        path.unlink()
    except (FileNotFoundError, NotADirectoryError):
        return
    except IsADirectoryError:
        return
    parent = path.parent
    while parent != root and root in parent.parents:
        try:
            parent.rmdir()
        except OSError:
            break
        parent = parent.parent


def list_files(root: Path, prefix: str) -> list[str]:
    """Return the sorted '/'-joined names of the files below ``root`` starting with ``prefix``."""
    head, _, _ = prefix.rpartition("/")
    start = root.joinpath(*head.split("/")) if head else root
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
