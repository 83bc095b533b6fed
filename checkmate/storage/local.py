"""`LocalTaskIO`: objects as files under a directory on local disk."""

from __future__ import annotations

import builtins
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..naming import check_obj_name
from ._localfs import LocalFiles
from .base import TaskIO

__all__ = ["LocalTaskIO"]


class LocalTaskIO(TaskIO):
    """Store objects as files below a root directory.

    Every write is durable before it returns and atomic for readers. On POSIX
    systems a write puts the new bytes in a per-directory journal and
    fdatasyncs it; reads look in the journal first. When the engine unbinds, the
    task's objects are published as plain files (each whole once visible) and a
    background checkpoint makes them durable and deletes the journal, so a
    finished task is plain JSON files.
    This keeps a durable checkpoint at one write + fdatasync, where creating or
    renaming files costs far more. Compare-and-swap runs under an exclusive
    lock of the directory (flock), so it is atomic between processes of one
    host.

    Args:
        root: The directory that holds all tasks (created on first write).

    Example:
        ```python
        io = LocalTaskIO("./state")
        ```
    """

    supports_atomic_create = True
    needs_self_test = False

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._root = Path(root).absolute()
        self._files = LocalFiles(self._root)
        self.supports_conditional_write = self._files.journaled

    @property
    def root(self) -> Path:
        """The absolute root directory."""
        return self._root

    def __repr__(self) -> str:
        return f"LocalTaskIO({str(self._root)!r})"

    def __getstate__(self) -> dict[str, str]:
        return {"root": str(self._root)}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.__init__(state["root"])  # type: ignore[misc]

    def _name(self, obj_name: str) -> str:
        return check_obj_name(obj_name)

    def read(self, obj_name: str) -> bytes:
        """Return the object's bytes (FileNotFoundError if absent)."""
        return self._files.read(self._name(obj_name))

    def read_versioned(self, obj_name: str) -> tuple[bytes, str]:
        """Return the object's bytes and content version."""
        return self._files.read_versioned(self._name(obj_name))

    def read_many_versioned(self, obj_names: Iterable[str]) -> dict[str, tuple[bytes, str]]:
        """Read several objects with their versions (one directory lock per directory)."""
        return self._files.read_many_versioned([self._name(n) for n in obj_names])

    def write(self, obj_name: str, data: bytes) -> None:
        """Atomically and durably create or replace the object."""
        self._files.write(self._name(obj_name), data)

    def create(self, obj_name: str, data: bytes) -> bool:
        """Atomically create the object if absent; False if it exists."""
        return self._files.create(self._name(obj_name), data)

    def write_if(self, obj_name: str, data: bytes, version: str | None) -> str:
        """Compare-and-swap the object (directory lock; version = content hash)."""
        if not self.supports_conditional_write:
            return super().write_if(obj_name, data, version)
        return self._files.write_if(self._name(obj_name), data, version)

    def write_many_if(self, items: Sequence[tuple[str, bytes, str | None]]) -> list[str]:
        """Compare-and-swap several objects: one journal write + fdatasync for a task's objects."""
        if not self.supports_conditional_write:
            return super().write_many_if(items)
        return self._files.write_many_if([(self._name(n), d, v) for n, d, v in items])

    def delete_if(self, obj_name: str, version: str) -> None:
        """Delete the object only if its version is ``version``."""
        if not self.supports_conditional_write:
            super().delete_if(obj_name, version)
            return
        self._files.delete_if(self._name(obj_name), version)

    def exists(self, obj_name: str) -> bool:
        """Tell whether the object exists."""
        return self._files.exists(self._name(obj_name))

    def delete(self, obj_name: str) -> None:
        """Delete the object if present (and its directories once empty)."""
        self._files.delete(self._name(obj_name))

    def list(self, prefix: str = "") -> builtins.list[str]:
        """Return the sorted names of all objects starting with ``prefix``."""
        return self._files.list(prefix)

    def sweep(self, prefix: str) -> int:
        """Delete temp files left below ``prefix`` by dead writers; return how many."""
        return self._files.sweep(prefix)

    def defer_publication(self, prefix: str) -> None:
        """Keep writes below ``prefix`` in the journal only, until `sync` publishes them."""
        self._files.defer(prefix)

    def sync(self, prefix: str) -> None:
        """Checkpoint the journals below ``prefix`` (files fsynced, journals deleted).

        Runs on a background thread: every write is durable already. Call
        `flush` to wait for it.
        """
        self._files.sync(prefix)

    def flush(self) -> None:
        """Wait until every checkpoint started by `sync` is done."""
        self._files.flush()

    def url(self, obj_name: str) -> str:
        """Return the object's ``file://`` URL."""
        return self._files.path(self._name(obj_name)).as_uri()
