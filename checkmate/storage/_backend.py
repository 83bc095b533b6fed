"""Per-filesystem strategies behind `FsspecTaskIO`: one class per kind of store.

`FsspecTaskIO` resolves a URL to an fsspec filesystem, then delegates every
call, with full paths, to one of these. The generic strategy uses only
portable fsspec calls; the others use what their store offers natively.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from datetime import datetime, timezone
from io import BytesIO
from pathlib import Path
from typing import Any

from fsspec.implementations.memory import MemoryFile

from .._memo import BoundedMemo
from ..errors import VersionConflict
from ._localfs import LocalFiles
from .base import check_version, content_version

__all__ = ["Backend", "LocalFileBackend", "MemoryBackend"]

# fsspec's memory filesystem is one process-wide store; one lock makes
# create-if-absent and compare-and-swap atomic for every thread of the process.
_MEMORY_LOCK = threading.RLock()
# Paths a MemoryBackend has resolved to store keys (bounded: cleared when full).
# The versions of memory objects: one process-wide sequence (taken under _MEMORY_LOCK).
_GENERATIONS = itertools.count(1)


class Backend:
    """Portable fsspec operations: atomic writes, but no atomic create and no CAS."""

    atomic_create = False
    conditional_write = False
    min_rewrite_interval = 0.0
    needs_self_test = True

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

    def sync(self, prefix: str) -> None:
        """Nothing to do: every write is already in its final, durable form."""
        del prefix

    def flush(self) -> None:
        """Nothing to wait for."""

    def defer(self, prefix: str) -> None:
        """Nothing to defer: every write is already in its final form."""
        del prefix


def _check(path: str, version: str | None, current: bytes | None) -> None:
    check_version(path, version, None if current is None else content_version(current))


class MemoryBackend(Backend):
    """fsspec's process-wide memory store, made atomic with one process-wide lock.

    Works on the store's dict directly: one lookup or assignment per call.
    Each stored file remembers the version it was written with: a generation
    number, new with every write (a file written without checkmate has the
    hash of its bytes as version).
    """

    atomic_create = True
    conditional_write = True
    needs_self_test = False

    def __init__(self, fs: Any, root: str) -> None:
        super().__init__(fs, root)
        strip = fs._strip_protocol
        self._keys: BoundedMemo[str, str] = BoundedMemo(lambda path: str(strip(path)))

    def _key(self, path: str) -> str:
        return self._keys[path]

    def _put(self, key: str, data: bytes) -> str:
        # A generation number, like a GCS generation: unique to each write in the
        # process (a hash of the bytes would cost more); "g" keeps it apart from the
        # content hashes of objects written without checkmate.
        version = f"g{next(_GENERATIONS):x}"
        # What MemoryFile(fs, key, data) builds, with one clock read instead of two.
        stored = MemoryFile.__new__(MemoryFile)
        BytesIO.__init__(stored, data)
        stored.fs, stored.path = self.fs, key
        stored.created = stored.modified = datetime.now(tz=timezone.utc)
        stored.checkmate_version = version
        self.fs.store[key] = stored
        return version

    def _version(self, key: str) -> str | None:
        """The stored object's version (None if absent), without copying its bytes."""
        stored = self.fs.store.get(key)
        if stored is None:
            return None
        version = getattr(stored, "checkmate_version", None)
        return version or content_version(bytes(stored.getbuffer()))

    def _get(self, key: str) -> tuple[bytes, str] | None:
        stored = self.fs.store.get(key)
        if stored is None:
            return None
        data = bytes(stored.getbuffer())
        version = getattr(stored, "checkmate_version", None) or content_version(data)
        return data, version

    def find(self, start: str) -> list[str]:
        """Every object path below ``start``: one pass over a snapshot of the keys.

        The store is one dict for the whole process, so this is linear in all of
        its objects; it is kept to a bare prefix test per key.
        """
        key = self._key(start).rstrip("/")
        prefix = key + "/"
        return [k for k in tuple(self.fs.store) if k.startswith(prefix) or k == key]

    def read(self, path: str) -> bytes:
        """Return the object's bytes."""
        found = self._get(self._key(path))
        if found is None:
            raise FileNotFoundError(path)
        return found[0]

    def read_versioned(self, path: str) -> tuple[bytes, str]:
        """Return the object's bytes and version."""
        found = self._get(self._key(path))
        if found is None:
            raise FileNotFoundError(path)
        return found

    def write(self, path: str, data: bytes) -> None:
        """Replace the object (one dict assignment)."""
        with _MEMORY_LOCK:
            self._put(self._key(path), data)

    def _taken(self, key: str) -> bool:
        # Like an object store, memory lets an object and keys below it coexist.
        return key in self.fs.store or key in self.fs.pseudo_dirs

    def create(self, path: str, data: bytes) -> bool:
        """Atomic create-if-absent."""
        key = self._key(path)
        with _MEMORY_LOCK:
            if self._taken(key):
                return False
            self._put(key, data)
            return True

    def exists(self, path: str) -> bool:
        """Tell whether the object exists."""
        return self._key(path) in self.fs.store

    def write_if(self, path: str, data: bytes, version: str | None) -> str:
        """Atomic compare-and-swap."""
        key = self._key(path)
        with _MEMORY_LOCK:
            if version is None:
                if self._taken(key):
                    raise VersionConflict(f"{path} already exists", obj_name=path)
            elif self._version(key) != version:
                raise VersionConflict(f"{path} has changed or is gone", obj_name=path)
            return self._put(key, data)

    def delete_if(self, path: str, version: str) -> None:
        """Atomic conditional delete."""
        key = self._key(path)
        with _MEMORY_LOCK:
            found = self._get(key)
            if found is None or found[1] != version:
                raise VersionConflict(f"{path} has changed or is gone", obj_name=path)
            del self.fs.store[key]

    def read_many(self, paths: Sequence[str]) -> dict[str, bytes]:
        """Read several objects; missing ones are left out."""
        return {p: f[0] for p in paths if (f := self._get(self._key(p))) is not None}

    def read_many_versioned(self, paths: Sequence[str]) -> dict[str, tuple[bytes, str]]:
        """Read several objects with versions; missing ones are left out."""
        return {p: f for p in paths if (f := self._get(self._key(p))) is not None}


class LocalFileBackend(Backend):
    """``file://`` paths: the same crash-safe implementation as `LocalTaskIO`."""

    atomic_create = True
    needs_self_test = False

    def __init__(self, fs: Any, root: str) -> None:
        super().__init__(fs, root)
        self.files = LocalFiles(Path(root))
        self.conditional_write = self.files.journaled
        self._prefix = root.rstrip("/") + "/"

    def _name(self, path: str) -> str:
        return path[len(self._prefix) :]

    def read(self, path: str) -> bytes:
        """Return the file's bytes."""
        return self.files.read(self._name(path))

    def read_versioned(self, path: str) -> tuple[bytes, str]:
        """Return the file's bytes and content version."""
        return self.files.read_versioned(self._name(path))

    def write(self, path: str, data: bytes) -> None:
        """Durable, atomic replace."""
        self.files.write(self._name(path), data)

    def create(self, path: str, data: bytes) -> bool:
        """Durable, atomic create-if-absent."""
        return self.files.create(self._name(path), data)

    def exists(self, path: str) -> bool:
        """Tell whether the file exists."""
        return self.files.exists(self._name(path))

    def delete(self, path: str) -> None:
        """Delete, pruning directories left empty."""
        self.files.delete(self._name(path))

    def find(self, start: str) -> list[str]:
        """Every object file below ``start``."""
        rel = start[len(self._prefix) :] if start.startswith(self._prefix) else ""
        names = self.files.list(rel + "/" if rel else "")
        return [self._prefix + name for name in names]

    def read_many(self, paths: Sequence[str]) -> dict[str, bytes]:
        """Read files (one directory lock per directory)."""
        return {p: got[0] for p, got in self.read_many_versioned(paths).items()}

    def read_many_versioned(self, paths: Sequence[str]) -> dict[str, tuple[bytes, str]]:
        """Read files with their versions (one directory lock per directory)."""
        names = {self._name(p): p for p in paths}
        return {names[n]: got for n, got in self.files.read_many_versioned(list(names)).items()}

    def write_if(self, path: str, data: bytes, version: str | None) -> str:
        """Compare-and-swap under the directory lock."""
        if not self.conditional_write:
            return super().write_if(path, data, version)
        return self.files.write_if(self._name(path), data, version)

    def delete_if(self, path: str, version: str) -> None:
        """Conditional delete under the directory lock."""
        if not self.conditional_write:
            super().delete_if(path, version)
            return
        self.files.delete_if(self._name(path), version)

    def sweep(self, prefix: str) -> int:
        """Delete temp files of dead writers."""
        return self.files.sweep(prefix)

    def sync(self, prefix: str) -> None:
        """Checkpoint the journals below ``prefix`` (on a background thread)."""
        self.files.sync(prefix)

    def flush(self) -> None:
        """Wait for background checkpoints."""
        self.files.flush()

    def defer(self, prefix: str) -> None:
        """Keep writes below ``prefix`` in the journal until `sync`."""
        self.files.defer(prefix)
