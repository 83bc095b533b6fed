"""The `TaskIO` contract: how the engine reads and writes its objects.

A TaskIO stores opaque byte strings under object names relative to its root
(``task-id/stage.json``). Implement the abstract methods to put checkmate on
any store; the engine relies only on the guarantees written here.
"""

from __future__ import annotations

import builtins
from abc import ABC, abstractmethod
from collections.abc import Iterable

__all__ = ["TaskIO"]


class TaskIO(ABC):
    """Abstract storage for a task's objects.

    Object names are relative to the TaskIO's root, use ``/`` as separator and
    never contain empty, ``.`` or ``..`` components.

    Attributes:
        supports_atomic_create: True when `create` is a real atomic
            create-if-absent that no racing writer can break. The engine only
            takes task locks on stores where this is True.
    """

    supports_atomic_create: bool = True

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
