"""Per-filesystem strategies behind `FsspecTaskIO`: one class per kind of store.

`FsspecTaskIO` resolves a URL to an fsspec filesystem, then delegates every
call, with full paths, to one of these. The generic strategy uses only
portable fsspec calls; the others use what their store offers natively.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import VersionConflict
from . import _files
from .base import content_version

__all__ = ["Backend", "LocalFileBackend", "MemoryBackend"]

# fsspec's memory filesystem is one process-wide store; one lock makes
# create-if-absent and compare-and-swap atomic for every thread of the process.
_MEMORY_LOCK = threading.RLock()


class Backend:
    """Portable fsspec operations: atomic writes, but no atomic create and no CAS."""

    atomic_create = False
    conditional_write = False
    min_rewrite_interval = 0.0

    def __init__(self, fs: Any, root: str) -> None:
        self.fs = fs
        self.root = root

    def read(self, path: str) -> bytes:
        """Return the object's bytes."""
        return bytes(self.fs.cat_file(path))

    def write(self, path: str, data: bytes) -> None:
        """Replace the object (one PUT on object stores: atomic for readers)."""
        self.fs.pipe_file(path, data)

    def create(self, path: str, data: bytes) -> bool:
        """Best-effort create-if-absent (check, then write)."""
        if self.exists(path):
            return False
        self.fs.pipe_file(path, data)
        return True

    def exists(self, path: str) -> bool:
        """Tell whether the object exists (bypassing listing caches)."""
        self.fs.invalidate_cache(path)
        return bool(self.fs.isfile(path))

    def delete(self, path: str) -> None:
        """Delete the object if present."""
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            return

    def find(self, start: str) -> list[str]:
        """Every object path below ``start`` (stripped of the protocol)."""
        self.fs.invalidate_cache(start)
        try:
            found = self.fs.find(start, withdirs=False)
        except FileNotFoundError:
            return []
        return [self.fs._strip_protocol(p) for p in found]

    def read_many(self, paths: Sequence[str]) -> dict[str, bytes]:
        """Fetch several objects in one batched call; missing ones are left out."""
        if not paths:
            return {}
        fetched = self.fs.cat(list(paths), on_error="omit")
        if not isinstance(fetched, dict):
            fetched = {paths[0]: fetched}
        return {
            self.fs._strip_protocol(p): bytes(d)
            for p, d in fetched.items()
            if not isinstance(d, BaseException)
        }

    def read_versioned(self, path: str) -> tuple[bytes, str]:
        """Return bytes and content version."""
        data = self.read(path)
        return data, content_version(data)

    def read_many_versioned(self, paths: Sequence[str]) -> dict[str, tuple[bytes, str]]:
        """Batched `read_versioned`; missing objects are left out."""
        return {p: (d, content_version(d)) for p, d in self.read_many(paths).items()}

    def write_if(self, path: str, data: bytes, version: str | None) -> str:
        """Best-effort compare-and-swap (check, then write)."""
        current = self._current(path)
        _check(path, version, current)
        self.write(path, data)
        return content_version(data)

    def delete_if(self, path: str, version: str) -> None:
        """Best-effort conditional delete."""
        _check(path, version, self._current(path))
        self.delete(path)

    def _current(self, path: str) -> bytes | None:
        try:
            return self.read(path)
        except FileNotFoundError:
            return None

    def sweep(self, prefix: str) -> int:
        """Remove leftovers of interrupted writes (none on stores with atomic PUTs)."""
        del prefix
        return 0


def _check(path: str, version: str | None, current: bytes | None) -> None:
    if version is None:
        if current is not None:
            raise VersionConflict(f"{path} already exists", obj_name=path)
    elif current is None:
        raise VersionConflict(f"{path} does not exist", obj_name=path)
    elif content_version(current) != version:
        raise VersionConflict(f"{path} has changed", obj_name=path)


class MemoryBackend(Backend):
    """fsspec's process-wide memory store, made atomic with one process-wide lock."""

    atomic_create = True
    conditional_write = True

    def write(self, path: str, data: bytes) -> None:
        """Replace the object (one dict assignment)."""
        with _MEMORY_LOCK:
            self.fs.pipe_file(path, data)

    def create(self, path: str, data: bytes) -> bool:
        """Atomic create-if-absent."""
        with _MEMORY_LOCK:
            if self.fs.exists(path):  # a "directory" of that name blocks it too
                return False
            self.fs.pipe_file(path, data)
            return True

    def exists(self, path: str) -> bool:
        """Tell whether the object exists."""
        return bool(self.fs.isfile(path))

    def write_if(self, path: str, data: bytes, version: str | None) -> str:
        """Atomic compare-and-swap."""
        with _MEMORY_LOCK:
            if version is None and self.fs.exists(path):  # a "directory" blocks it too
                raise VersionConflict(f"{path} already exists", obj_name=path)
            return super().write_if(path, data, version)

    def delete_if(self, path: str, version: str) -> None:
        """Atomic conditional delete."""
        with _MEMORY_LOCK:
            super().delete_if(path, version)


class LocalFileBackend(Backend):
    """``file://`` paths: the same crash-safe primitives as `LocalTaskIO`."""

    atomic_create = True
    conditional_write = _files.CAS_SUPPORTED

    def read(self, path: str) -> bytes:
        """Return the file's bytes."""
        return _files.read_file(Path(path))

    def write(self, path: str, data: bytes) -> None:
        """Temp file, fsync, rename, fsync of the directory."""
        _files.atomic_write(Path(path), data)

    def create(self, path: str, data: bytes) -> bool:
        """Hard-link a complete temp file into place."""
        return _files.atomic_create(Path(path), data)

    def exists(self, path: str) -> bool:
        """Tell whether the file exists."""
        return Path(path).is_file()

    def delete(self, path: str) -> None:
        """Unlink, then prune the directories left empty (up to the root)."""
        _files.delete_file(Path(path), Path(self.root))

    def find(self, start: str) -> list[str]:
        """Every file below ``start``, temp files excluded."""
        root = Path(self.root)
        rel = Path(start).relative_to(root).as_posix() if start != self.root else ""
        prefix = rel + "/" if rel else ""
        return [f"{self.root}/{name}" for name in _files.list_files(root, prefix)]

    def read_many(self, paths: Sequence[str]) -> dict[str, bytes]:
        """Read files one after another (local reads are cheap)."""
        found = {}
        for path in paths:
            try:
                found[path] = self.read(path)
            except FileNotFoundError:
                continue
        return found

    def write_if(self, path: str, data: bytes, version: str | None) -> str:
        """flock-guarded compare-and-swap."""
        if not self.conditional_write:
            return super().write_if(path, data, version)
        return _files.cas_write(Path(path), data, version)

    def delete_if(self, path: str, version: str) -> None:
        """flock-guarded conditional delete."""
        if not self.conditional_write:
            super().delete_if(path, version)
            return
        _files.cas_delete(Path(path), version, Path(self.root))

    def sweep(self, prefix: str) -> int:
        """Delete temp files of dead writers."""
        return _files.sweep_temp_files(Path(self.root), prefix)
