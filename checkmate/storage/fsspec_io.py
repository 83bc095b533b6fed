"""`FsspecTaskIO`: objects on any fsspec filesystem (memory, local, S3, GCS, Azure, ...)."""

from __future__ import annotations

import builtins
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from ..naming import check_obj_name
from ._backend import Backend, LocalFileBackend, MemoryBackend
from .base import TaskIO

__all__ = ["FsspecTaskIO"]

logger = logging.getLogger(__name__)

# Object names whose paths an FsspecTaskIO remembers (bounded: cleared when full).


def _backend_for(fs: Any, root: str, protocols: tuple[str, ...]) -> Backend:
    if isinstance(fs, LocalFileSystem):
        return LocalFileBackend(fs, root)
    if isinstance(fs, MemoryFileSystem):
        return MemoryBackend(fs, root)
    if {"s3", "s3a"} & set(protocols):
        from ._s3 import S3Backend  # noqa: PLC0415 - s3fs is an optional extra

        return S3Backend(fs, root)
    if {"gs", "gcs"} & set(protocols):
        from ._gcs import GCSBackend  # noqa: PLC0415 - gcsfs is an optional extra

        return GCSBackend(fs, root)
    if {"az", "abfs", "abfss"} & set(protocols):
        from ._azure import AzureBackend  # noqa: PLC0415 - adlfs is an optional extra

        return AzureBackend(fs, root)
    return Backend(fs, root)


class FsspecTaskIO(TaskIO):
    """Store objects on any fsspec filesystem, given by URL.

    What each store guarantees:

    | store | atomic create | compare-and-swap |
    |---|---|---|
    | ``memory://`` | yes (process-wide lock) | yes |
    | ``file://`` | yes (hard link of a complete temp file) | yes (flock) |
    | ``s3://`` | yes (``If-None-Match``) | yes (``If-Match``) |
    | ``gs://`` | yes (``ifGenerationMatch=0``) | yes (``ifGenerationMatch``) |
    | ``az://`` / ``abfs://`` | yes (``If-None-Match``) | yes (etag match condition) |
    | anything else | no | no |

    On a store without atomic create the engine refuses to take a lock.
    S3-compatible servers that silently ignore conditions exist; the engine
    runs a fail-closed self-test before it trusts a store with a lease.

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
        self._fs: Any = fs
        self._root = str(root).rstrip("/")
        protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
        self._protocol = str(protocols[0])
        self._backend = _backend_for(fs, self._root, tuple(str(p) for p in protocols))
        self.supports_atomic_create = self._backend.atomic_create
        self.supports_conditional_write = self._backend.conditional_write
        self.min_rewrite_interval = self._backend.min_rewrite_interval
        self.needs_self_test = self._backend.needs_self_test

    def __repr__(self) -> str:
        return f"FsspecTaskIO({self._url!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self._url, "storage_options": self._storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], **state["storage_options"])  # type: ignore[misc]

    @property
    def fs(self) -> Any:
        """The underlying fsspec filesystem."""
        return self._fs

    def _path(self, obj_name: str) -> str:
        return f"{self._root}/{check_obj_name(obj_name)}"

    def _name(self, path: str) -> str | None:
        root = self._fs._strip_protocol(self._root).rstrip("/") + "/"
        stripped = self._fs._strip_protocol(path)
        return stripped[len(root) :] if stripped.startswith(root) else None

    def read(self, obj_name: str) -> bytes:
        """Return the object's bytes (FileNotFoundError if absent)."""
        return self._backend.read(self._path(obj_name))

    def write(self, obj_name: str, data: bytes) -> None:
        """Create or replace the object with one atomic store operation."""
        self._backend.write(self._path(obj_name), data)

    def create(self, obj_name: str, data: bytes) -> bool:
        """Create the object if absent; False if it exists (see the class notes)."""
        return self._backend.create(self._path(obj_name), data)

    def exists(self, obj_name: str) -> bool:
        """Tell whether the object exists."""
        return self._backend.exists(self._path(obj_name))

    def delete(self, obj_name: str) -> None:
        """Delete the object if present."""
        self._backend.delete(self._path(obj_name))

    def read_versioned(self, obj_name: str) -> tuple[bytes, str]:
        """Return the object's bytes and version, read together."""
        return self._backend.read_versioned(self._path(obj_name))

    def write_if(self, obj_name: str, data: bytes, version: str | None) -> str:
        """Write only if the object's version is ``version`` (None: absent); return the new one."""
        return self._backend.write_if(self._path(obj_name), data, version)

    def delete_if(self, obj_name: str, version: str) -> None:
        """Delete only if the object's version is ``version``."""
        self._backend.delete_if(self._path(obj_name), version)

    def list(self, prefix: str = "") -> builtins.list[str]:
        """Return the sorted names of all objects starting with ``prefix``."""
        head, _, _ = prefix.rpartition("/")
        start = f"{self._root}/{check_obj_name(head)}" if head else self._root
        names = [self._name(path) for path in self._backend.find(start)]
        return sorted(n for n in names if n and n.startswith(prefix))

    def url(self, obj_name: str) -> str:
        """Return the object's full URL, with the backend's protocol."""
        path = self._path(obj_name)
        if isinstance(self._backend, LocalFileBackend):
            return Path(path).as_uri()
        return f"{self._protocol}://{path.lstrip('/')}"

    def read_many(self, obj_names: Iterable[str]) -> dict[str, bytes]:
        """Read several objects in one batched call; missing ones are left out."""
        by_path = {self._fs._strip_protocol(self._path(n)): n for n in obj_names}
        fetched = self._backend.read_many(builtins.list(by_path))
        return {by_path[p]: d for p, d in fetched.items() if p in by_path}

    def read_many_versioned(self, obj_names: Iterable[str]) -> dict[str, tuple[bytes, str]]:
        """Read several objects with their versions, batched; missing ones are left out."""
        by_path = {self._fs._strip_protocol(self._path(n)): n for n in obj_names}
        fetched = self._backend.read_many_versioned(builtins.list(by_path))
        return {by_path[p]: d for p, d in fetched.items() if p in by_path}

    def sweep(self, prefix: str) -> int:
        """On local files, delete temp files left by dead writers; elsewhere nothing."""
        return self._backend.sweep(prefix)

    def defer_publication(self, prefix: str) -> None:
        """On local files, keep writes below ``prefix`` in the journal until `sync`."""
        self._backend.defer(prefix)

    def sync(self, prefix: str) -> None:
        """On local files, checkpoint the journals below ``prefix``; elsewhere nothing.

        The checkpoint runs on a background thread; `flush` waits for it.
        """
        self._backend.sync(prefix)

    def flush(self) -> None:
        """Wait until every checkpoint started by `sync` is done (local files only)."""
        self._backend.flush()
