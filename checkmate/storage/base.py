"""The `TaskIO` contract: how the engine reads and writes its objects.

A TaskIO stores opaque byte strings under object names relative to its root
(``task-id/stage.json``). Implement the abstract methods to put checkmate on
any store; the engine relies only on the guarantees written here.
"""

from __future__ import annotations

import builtins
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence

from ..errors import VersionConflict
from ._versions import content_version

__all__ = ["TaskIO", "content_version"]


class TaskIO(ABC):
    """Abstract storage for a task's objects.

    Object names are relative to the TaskIO's root, use ``/`` as separator and
    never contain empty, ``.`` or ``..`` components.

    Versioned access (`read_versioned`, `write_if`, `delete_if`) is what
    leases and fencing are built on. A version is an opaque string that
    changes whenever the bytes change (an S3 ETag, a GCS generation, an Azure
    etag, or a hash of the content); writing identical bytes may keep the
    same version, so put a nonce in data whose rewrites must be told apart.

    Attributes:
        supports_atomic_create: True when `create` is a real atomic
            create-if-absent that no racing writer can break. The engine only
            takes task locks on stores where this is True.
        supports_conditional_write: True when `write_if` and `delete_if` are
            real compare-and-swap operations. Leases that expire, and fencing
            of a worker that lost its lease, need it; without it the engine
            falls back to locks that only a dead process on the same host
            loses.
        needs_self_test: False only for implementations whose conditional
            writes are known to be enforced (checkmate's own local and memory
            stores); others are checked once per process before a lease.
        min_rewrite_interval: The shortest interval, in seconds, at which the
            store accepts rewrites of one object (GCS: about 1 s); leases
            renew no faster.
    """

    supports_atomic_create: bool = True
    supports_conditional_write: bool = False
    min_rewrite_interval: float = 0.0
    needs_self_test: bool = True

    @abstractmethod
    def read(self, obj_name: str) -> bytes:
        """Return the object's bytes.

        Raises:
            FileNotFoundError: The object does not exist.
        """

    @abstractmethod
    def write(self, obj_name: str, data: bytes) -> None:
        """Create or replace the object, atomically.

        A concurrent reader sees either the old or the new bytes, never a mix or
        a truncated object.
        """

    @abstractmethod
    def create(self, obj_name: str, data: bytes) -> bool:
        """Create the object only if it does not exist, atomically.

        All-or-nothing for readers, like `write`.

        Returns:
            True if this call created the object, False if it already existed.
        """

    @abstractmethod
    def delete(self, obj_name: str) -> None:
        """Delete the object; do nothing if it does not exist."""

    @abstractmethod
    def list(self, prefix: str = "") -> builtins.list[str]:
        """Return every object name below the root that starts with ``prefix``.

        The search is recursive and the result sorted. Directories (on stores
        that have them) and the implementation's own temporary files are not
        objects and are not listed.
        """

    @abstractmethod
    def url(self, obj_name: str) -> str:
        """Return the full URL of the object (``file:///...``, ``s3://...``)."""

    def read_versioned(self, obj_name: str) -> tuple[bytes, str]:
        """Return the object's bytes and version, read together.

        The default hashes the bytes, which is right for any store whose
        `read` returns one whole version.

        Raises:
            FileNotFoundError: The object does not exist.
        """
        data = self.read(obj_name)
        return data, content_version(data)

    def write_if(self, obj_name: str, data: bytes, version: str | None) -> str:
        """Write the object only if its current version is ``version``; return the new one.

        ``version=None`` means "only if the object does not exist". Atomic when
        ``supports_conditional_write`` is True; the default is a best-effort
        check-then-write that a racing writer can break.

        Raises:
            VersionConflict: The object's version is not ``version`` (or it
                exists when ``version`` is None, or is gone when it is not).
        """
        if version is None:
            if not self.create(obj_name, data):
                raise _conflict(obj_name, "it already exists")
            return content_version(data)
        try:
            _, current = self.read_versioned(obj_name)
        except FileNotFoundError:
            current = None
        check_version(obj_name, version, current)
        self.write(obj_name, data)
        return content_version(data)

    def write_many_if(self, items: Sequence[tuple[str, bytes, str | None]]) -> builtins.list[str]:
        """`write_if` several objects, in order; return their new versions.

        Stores that can make several writes durable at once (the local
        journal: one write + fdatasync for all) override this. The default writes
        one after another and stops at the first error, so on failure any
        prefix of the items may have been written.

        Raises:
            VersionConflict: An object's version was not the expected one.
        """
        return [self.write_if(name, data, version) for name, data, version in items]

    def delete_if(self, obj_name: str, version: str) -> None:
        """Delete the object only if its current version is ``version``.

        Raises:
            VersionConflict: The object's version differs, or it is gone.
        """
        try:
            _, current = self.read_versioned(obj_name)
        except FileNotFoundError:
            current = None
        check_version(obj_name, version, current)
        self.delete(obj_name)

    def read_many_versioned(self, obj_names: Iterable[str]) -> dict[str, tuple[bytes, str]]:
        """Read several objects with their versions; missing ones are left out."""
        found: dict[str, tuple[bytes, str]] = {}
        for name in obj_names:
            try:
                found[name] = self.read_versioned(name)
            except FileNotFoundError:
                continue
        return found

    def exists(self, obj_name: str) -> bool:
        """Tell whether the object exists."""
        try:
            self.read(obj_name)
        except FileNotFoundError:
            return False
        return True

    def sweep(self, prefix: str) -> int:
        """Remove leftovers of interrupted writes below ``prefix``; return how many.

        The engine calls this at bind, while it holds the task's lock. Stores
        whose writes are atomic on the server leave nothing behind: the
        default does nothing.
        """
        del prefix
        return 0

    def defer_publication(self, prefix: str) -> None:
        """Allow objects below ``prefix`` to stay in a journal until `sync` is called for it.

        A hint: reads through any TaskIO of the store see every write at once,
        but a store that journals writes (like `LocalTaskIO`) may skip making
        each one a plain file until ``sync(prefix)``. The engine calls it when it
        binds a task and syncs at unbind. The default does nothing.
        """
        del prefix

    def sync(self, prefix: str) -> None:
        """Bring every write below ``prefix`` into its final, compact form.

        Writes are durable when they return; a store that journals them (like
        `LocalTaskIO`) folds the journal into the objects here. The engine
        calls it when it unbinds a task. The default does nothing.
        """
        del prefix

    def read_many(self, obj_names: Iterable[str]) -> dict[str, bytes]:
        """Read several objects; missing ones are left out of the result.

        Backends that can fetch in parallel or in batches override this; the
        default reads one object after another.
        """
        found: dict[str, bytes] = {}
        for name in obj_names:
            try:
                found[name] = self.read(name)
            except FileNotFoundError:
                continue
        return found


def check_version(obj_name: str, expected: str | None, current: str | None) -> None:
    """Raise `VersionConflict` unless ``current`` is ``expected`` (None: the object is absent).

    The one place that words a refused compare-and-swap, for every store.
    """
    if current == expected:
        return
    if current is None:
        why = "it does not exist"
    elif expected is None:
        why = "it already exists"
    else:
        why = f"its version is {current}, not {expected}"
    raise _conflict(obj_name, why)


def _conflict(obj_name: str, why: str) -> VersionConflict:
    return VersionConflict(f"conditional write of {obj_name!r} refused: {why}", obj_name=obj_name)
