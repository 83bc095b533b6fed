"""`LocalTaskIO`: objects as files under a directory on local disk."""

from __future__ import annotations

import builtins
import os
from pathlib import Path

from ..naming import check_obj_name
from . import _files
from .base import TaskIO

__all__ = ["LocalTaskIO"]


class LocalTaskIO(TaskIO):
    """Store objects as files below a root directory.

    Writes go to an fsynced temp file that is renamed over the target, then the
    directory is fsynced, so a crash or power cut leaves the old or the new
    bytes. `create` hard-links a complete temp file into place, which is atomic
    even between processes.

    Args:
        root: The directory that holds all tasks (created on first write).

    Example:
        ```python
        io = LocalTaskIO("./state")
        ```
    """

    supports_atomic_create = True
    supports_conditional_write = _files.CAS_SUPPORTED

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._root = Path(root).absolute()

    @property
    def root(self) -> Path:
        """The absolute root directory."""
        return self._root

    def __repr__(self) -> str:
        return f"LocalTaskIO({str(self._root)!r})"

    def _path(self, obj_name: str) -> Path:
        return self._root.joinpath(*check_obj_name(obj_name).split("/"))

    def read(self, obj_name: str) -> bytes:
        """Return the object's bytes (FileNotFoundError if absent)."""
        return _files.read_file(self._path(obj_name))

    def write(self, obj_name: str, data: bytes) -> None:
        """Atomically and durably create or replace the object."""
        _files.atomic_write(self._path(obj_name), data)

    def create(self, obj_name: str, data: bytes) -> bool:
        """Atomically create the object if absent; False if it exists."""
        return _files.atomic_create(self._path(obj_name), data)

    def write_if(self, obj_name: str, data: bytes, version: str | None) -> str:
        """Compare-and-swap the object (flock-guarded; version = content hash)."""
        if not self.supports_conditional_write:
            return super().write_if(obj_name, data, version)
        return _files.cas_write(self._path(obj_name), data, version)

    def delete_if(self, obj_name: str, version: str) -> None:
        """Delete the object only if its version is ``version`` (flock-guarded)."""
        if not self.supports_conditional_write:
            super().delete_if(obj_name, version)
            return
        _files.cas_delete(self._path(obj_name), version, self._root)

    def exists(self, obj_name: str) -> bool:
        """Tell whether the object exists."""
        return self._path(obj_name).is_file()

    def delete(self, obj_name: str) -> None:
        """Delete the object if present (and its directories once empty)."""
        _files.delete_file(self._path(obj_name), self._root)

    def list(self, prefix: str = "") -> builtins.list[str]:
        """Return the sorted names of all objects starting with ``prefix``."""
        return _files.list_files(self._root, prefix)

    def sweep(self, prefix: str) -> int:
        """Delete temp files left below ``prefix`` by dead writers; return how many."""
        return _files.sweep_temp_files(self._root, prefix)

    def url(self, obj_name: str) -> str:
        """Return the object's ``file://`` URL."""
        return self._path(obj_name).as_uri()
