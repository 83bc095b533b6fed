"""One implementation of every local-disk operation, for `LocalTaskIO` and ``file://``.

On POSIX, writes go through the per-directory journal (`_journal`): durable
with one write + fdatasync, published with a cheap rename, compare-and-swap
under a directory lock. Elsewhere (Windows) each write is a temp file, fsync,
rename and directory fsync, and compare-and-swap is not offered.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from .._memo import BoundedMemo
from . import _files
from ._journal import ANY, JournaledDirectories
from .base import content_version

__all__ = ["LocalFiles"]


class LocalFiles:
    """Objects as files below ``root`` (names are relative, '/'-separated, pre-checked)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.journaled = _files.CAS_SUPPORTED
        self._journal = JournaledDirectories(root) if self.journaled else None
        # A task's names come back with every write: the same Path objects each time
        # (their hashes and strings are computed once).
        self._paths: BoundedMemo[str, Path] = BoundedMemo(
            lambda name: root.joinpath(*name.split("/"))
        )

    def path(self, name: str) -> Path:
        """The file of an object name."""
        return self._paths[name]

    def _directory(self, head: str) -> Path:
        """The directory of the names that start with ``head/`` (``""``: the root)."""
        return self._paths[head] if head else self.root

    def read(self, name: str) -> bytes:
        """The object's bytes (FileNotFoundError if absent)."""
        path = self.path(name)
        if self._journal is not None:
            return self._journal.read(path)
        return _files.read_file(path)

    def read_versioned(self, name: str) -> tuple[bytes, str]:
        """The object's bytes and content version."""
        path = self.path(name)
        if self._journal is not None:
            return self._journal.read_versioned(path)
        data = _files.read_file(path)
        return data, content_version(data)

    def read_many_versioned(self, names: list[str]) -> dict[str, tuple[bytes, str]]:
        """Several objects with their versions; missing ones are left out."""
        found: dict[str, tuple[bytes, str]] = {}
        if self._journal is None:
            for name in names:
                data = _files.read_or_none(self.path(name))
                if data is not None:
                    found[name] = (data, content_version(data))
            return found
        by_dir: dict[str, list[str]] = {}
        for name in names:
            head, _, base = name.rpartition("/")
            by_dir.setdefault(head, []).append(base)
        for head, bases in by_dir.items():
            directory = self._directory(head)
            prefix = head + "/" if head else ""
            for base, got in self._journal.read_many_in(directory, bases).items():
                found[prefix + base] = got
        return found

    def write(self, name: str, data: bytes) -> None:
        """Durable, atomic replace."""
        if self._journal is None:
            _files.atomic_write(self.path(name), data)
        else:
            self._journal.write(self.path(name), data, ANY)

    def create(self, name: str, data: bytes) -> bool:
        """Durable, atomic create-if-absent."""
        if self._journal is None:
            return _files.atomic_create(self.path(name), data)
        return self._journal.create(self.path(name), data)

    def write_if(self, name: str, data: bytes, version: str | None) -> str:
        """Compare-and-swap on the content version (journaled only)."""
        assert self._journal is not None
        return self._journal.write(self.path(name), data, version)

    def write_many_if(self, items: list[tuple[str, bytes, str | None]]) -> list[str]:
        """Compare-and-swap several objects; one write + fdatasync in one directory (journaled)."""
        assert self._journal is not None
        heads = {name.rpartition("/")[0] for name, _, _ in items}
        if len(heads) == 1:
            return self._journal.write_many(
                [(self.path(n), d, v) for n, d, v in items], self._directory(heads.pop())
            )
        return [self.write_if(n, d, v) for n, d, v in items]

    def delete(self, name: str) -> None:
        """Delete if present, pruning directories left empty."""
        if self._journal is None:
            _files.delete_file(self.path(name), self.root)
        else:
            self._journal.delete(self.path(name))

    def delete_if(self, name: str, version: str) -> None:
        """Conditional delete (journaled only)."""
        assert self._journal is not None
        self._journal.delete(self.path(name), version)

    def exists(self, name: str) -> bool:
        """Tell whether the object exists."""
        path = self.path(name)
        if self._journal is not None:
            return self._journal.exists(path)
        return path.is_file()

    def list(self, prefix: str) -> list[str]:
        """Sorted names starting with ``prefix`` (journaled directories overlaid)."""
        if self._journal is None:
            return _files.list_files(self.root, prefix)
        start = _files.start_dir(self.root, prefix)
        if not start.is_dir():
            return []
        names: list[str] = []
        for dirpath, _dirs, files in os.walk(start):
            directory = Path(dirpath)
            rel = directory.relative_to(self.root).as_posix()
            base = "" if rel == "." else rel + "/"
            members: Iterable[str] = (
                # A journal (or a checkpoint of one, racing this walk): ask under its lock.
                self._journal.names(directory)
                if _files.JOURNAL_NAME in files
                else (f for f in files if not _files.is_temp_name(f))
            )
            names.extend(base + f for f in members if (base + f).startswith(prefix))
        names.sort()
        return names

    def sweep(self, prefix: str) -> int:
        """Remove temp files of dead writers below ``prefix``."""
        return _files.sweep_temp_files(self.root, prefix)

    def sync(self, prefix: str, wait: bool = False) -> None:
        """Checkpoint the journals below ``prefix`` into plain, durable files.

        By default on a background thread (writes are durable already); `flush`
        waits for it.
        """
        if self._journal is not None:
            self._journal.sync(_files.start_dir(self.root, prefix), wait=wait)

    def defer(self, prefix: str) -> None:
        """Publish writes below ``prefix`` only when they are synced (journaled only)."""
        if self._journal is not None:
            self._journal.defer(_files.start_dir(self.root, prefix))

    def flush(self) -> None:
        """Wait for background checkpoints."""
        if self._journal is not None:
            self._journal.flush()
