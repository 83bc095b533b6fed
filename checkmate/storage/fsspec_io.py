"""`FsspecTaskIO`: objects on any fsspec filesystem (memory, local, S3, ...)."""

from __future__ import annotations

import builtins
import logging
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from ..naming import check_obj_name
from . import _files
from .base import TaskIO

__all__ = ["FsspecTaskIO"]

logger = logging.getLogger(__name__)

# fsspec's memory filesystem is one process-wide store; one lock makes
# create-if-absent atomic for every thread of the process.
_MEMORY_LOCK = threading.Lock()
# Backends whose pipe_file(mode="create") is a native conditional PUT.
_NATIVE_CREATE = frozenset({"s3", "s3a"})


class FsspecTaskIO(TaskIO):
    """Store objects on any fsspec filesystem, given by URL.

    ``memory://`` and ``file://`` get truly atomic `create` (a process-wide lock,
    and the same hard-link protocol as `LocalTaskIO`); S3 uses its native
    conditional PUT. On a backend with no native create-if-absent, `create` is
    only best effort and ``supports_atomic_create`` is False, so the engine
    refuses to take a lock there.

    Args:
        url: Root URL, such as ``memory://tasks``, ``file:///var/tasks`` or
            ``s3://bucket/tasks``.
        **storage_options: Passed to the fsspec filesystem (credentials,
            endpoint, ...).

    Example:
        ```python
        io = FsspecTaskIO("s3://my-bucket/pipelines", anon=False)
        ```
    """

    def __init__(self, url: str, **storage_options: Any) -> None:
        self._url = url
        self._storage_options = storage_options
        fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self._fs: fsspec.AbstractFileSystem = fs
        self._root = str(root).rstrip("/")
        protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
        self._protocol = str(protocols[0])
        self._local = isinstance(fs, LocalFileSystem)
        self._memory = isinstance(fs, MemoryFileSystem)
        self.supports_atomic_create = (
            self._local or self._memory or bool(_NATIVE_CREATE.intersection(protocols))
        )

    def __repr__(self) -> str:
        return f"FsspecTaskIO({self._url!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self._url, "storage_options": self._storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], **state["storage_options"])  # type: ignore[misc]

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The underlying fsspec filesystem."""
        return self._fs

    def _path(self, obj_name: str) -> str:
        return f"{self._root}/{check_obj_name(obj_name)}"

    def _local_path(self, obj_name: str) -> Path:
        return Path(self._path(obj_name))

    def read(self, obj_name: str) -> bytes:
        """Return the object's bytes (FileNotFoundError if absent)."""
        if self._local:
            return _files.read_file(self._local_path(obj_name))
        data = self._fs.cat_file(self._path(obj_name))
        return bytes(data)

    def write(self, obj_name: str, data: bytes) -> None:
        """Create or replace the object with one atomic store operation."""
        if self._local:
            _files.atomic_write(self._local_path(obj_name), data)
            return
        self._fs.pipe_file(self._path(obj_name), data)

    def create(self, obj_name: str, data: bytes) -> bool:
        """Create the object if absent; False if it exists (see the class notes)."""
        path = self._path(obj_name)
        if self._local:
            return _files.atomic_create(Path(path), data)
        if self._memory:
            with _MEMORY_LOCK:
                if self._fs.exists(path):
                    return False
                self._fs.pipe_file(path, data)
                return True
        if self.supports_atomic_create:
            try:
                self._fs.pipe_file(path, data, mode="create")
            except FileExistsError:
                return False
            return True
        if self._fs.exists(path):
            return False
        self._fs.pipe_file(path, data)
        return True

    def exists(self, obj_name: str) -> bool:
        """Tell whether the object exists."""
        path = self._path(obj_name)
        if self._local:
            return Path(path).is_file()
        self._fs.invalidate_cache(path)
        return bool(self._fs.isfile(path))

    def delete(self, obj_name: str) -> None:
        """Delete the object if present."""
        path = self._path(obj_name)
        if self._local:
            _files.delete_file(Path(path), Path(self._root))
            return
        try:
            self._fs.rm_file(path)
        except FileNotFoundError:
            return

    def list(self, prefix: str = "") -> builtins.list[str]:
        """Return the sorted names of all objects starting with ``prefix``."""
        if self._local:
            return _files.list_files(Path(self._root), prefix)
        head, _, _ = prefix.rpartition("/")
        start = f"{self._root}/{check_obj_name(head)}" if head else self._root
        self._fs.invalidate_cache(start)
        try:
            found = self._fs.find(start, withdirs=False)
        except FileNotFoundError:
            return []
        root = self._fs._strip_protocol(self._root).rstrip("/") + "/"
        names = []
        for path in found:
            stripped = self._fs._strip_protocol(path)
            if not stripped.startswith(root):
                continue
            name = stripped[len(root) :]
            if name.startswith(prefix) and name:
                names.append(name)
        names.sort()
        return names

    def sweep(self, prefix: str) -> int:
        """On local files, delete temp files left by dead writers; elsewhere nothing."""
        if self._local:
            return _files.sweep_temp_files(Path(self._root), prefix)
        return 0

    def url(self, obj_name: str) -> str:
        """Return the object's full URL, with the backend's protocol."""
        path = self._path(obj_name)
        if self._local:
            return Path(path).as_uri()
        return f"{self._protocol}://{path.lstrip('/')}"

    def read_many(self, obj_names: Iterable[str]) -> dict[str, bytes]:
        """Read several objects in one batched call; missing ones are left out."""
        names = builtins.list(obj_names)
        if self._local or not names:
            return super().read_many(names)
        by_path = {self._fs._strip_protocol(self._path(n)): n for n in names}
        fetched = self._fs.cat(builtins.list(by_path), on_error="omit")
        if not isinstance(fetched, dict):
            fetched = {next(iter(by_path)): fetched}
        found: dict[str, bytes] = {}
        for path, data in fetched.items():
            name = by_path.get(self._fs._strip_protocol(path))
            if name is not None and not isinstance(data, BaseException):
                found[name] = bytes(data)
        return found
