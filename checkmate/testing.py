"""Test doubles for users' own test suites: fault-injecting and crashing TaskIOs.

`FaultyTaskIO` makes a seeded random fraction of storage calls fail, as a
flaky network store would. `CrashingTaskIO` kills the process just before or
just after the k-th mutating call, as a power cut would. Both wrap a real
`TaskIO`.
"""

from __future__ import annotations

import builtins
import os
import random
import threading
from collections.abc import Callable, Iterable
from typing import Any, Literal, TypeVar

from .storage.base import TaskIO

__all__ = ["CrashingTaskIO", "FaultyTaskIO", "WrappingTaskIO"]

_T = TypeVar("_T")


class WrappingTaskIO(TaskIO):
    """A TaskIO that forwards every call to another one; override `_call` to interfere."""

    def __init__(self, inner: TaskIO) -> None:
        self.inner = inner
        self.supports_atomic_create = inner.supports_atomic_create
        self.supports_conditional_write = inner.supports_conditional_write
        self.min_rewrite_interval = inner.min_rewrite_interval
        # needs_self_test stays True: a wrapper may change what the store enforces.

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"

    def _call(self, op: str, func: Callable[..., _T], *args: Any) -> _T:
        """Run one forwarded call; ``op`` names the TaskIO method."""
        del op
        return func(*args)

    def read(self, obj_name: str) -> bytes:
        """Forwarded `TaskIO.read`."""
        return self._call("read", self.inner.read, obj_name)

    def write(self, obj_name: str, data: bytes) -> None:
        """Forwarded `TaskIO.write`."""
        self._call("write", self.inner.write, obj_name, data)

    def create(self, obj_name: str, data: bytes) -> bool:
        """Forwarded `TaskIO.create`."""
        return self._call("create", self.inner.create, obj_name, data)

    def delete(self, obj_name: str) -> None:
        """Forwarded `TaskIO.delete`."""
        self._call("delete", self.inner.delete, obj_name)

    def list(self, prefix: str = "") -> builtins.list[str]:
        """Forwarded `TaskIO.list`."""
        return self._call("list", self.inner.list, prefix)

    def exists(self, obj_name: str) -> bool:
        """Forwarded `TaskIO.exists`."""
        return self._call("exists", self.inner.exists, obj_name)

    def url(self, obj_name: str) -> str:
        """Forwarded `TaskIO.url` (never interfered with)."""
        return self.inner.url(obj_name)

    def read_many(self, obj_names: Iterable[str]) -> dict[str, bytes]:
        """Forwarded `TaskIO.read_many`."""
        return self._call("read_many", self.inner.read_many, builtins.list(obj_names))

    def sweep(self, prefix: str) -> int:
        """Forwarded `TaskIO.sweep`."""
        return self._call("sweep", self.inner.sweep, prefix)

    def defer_publication(self, prefix: str) -> None:
        """Forwarded `TaskIO.defer_publication` (a hint, not a storage call)."""
        self.inner.defer_publication(prefix)

    def sync(self, prefix: str) -> None:
        """Forwarded `TaskIO.sync`."""
        self._call("sync", self.inner.sync, prefix)

    def read_versioned(self, obj_name: str) -> tuple[bytes, str]:
        """Forwarded `TaskIO.read_versioned`."""
        return self._call("read_versioned", self.inner.read_versioned, obj_name)

    def write_if(self, obj_name: str, data: bytes, version: str | None) -> str:
        """Forwarded `TaskIO.write_if`."""
        return self._call("write_if", self.inner.write_if, obj_name, data, version)

    def delete_if(self, obj_name: str, version: str) -> None:
        """Forwarded `TaskIO.delete_if`."""
        self._call("delete_if", self.inner.delete_if, obj_name, version)

    def read_many_versioned(self, obj_names: Iterable[str]) -> dict[str, tuple[bytes, str]]:
        """Forwarded `TaskIO.read_many_versioned`."""
        return self._call(
            "read_many_versioned", self.inner.read_many_versioned, builtins.list(obj_names)
        )


MUTATIONS = frozenset({"write", "create", "delete", "write_if", "delete_if"})


class FaultyTaskIO(WrappingTaskIO):
    """Fail a seeded random fraction of storage calls with OSError or TimeoutError.

    A failing mutation may fail *after* it took effect (the reply was lost),
    which is the hard case for callers.

    Args:
        inner: The real store.
        rate: Fraction of calls that fail, 0 to 1.
        seed: Seed of the random generator, for reproducible runs.
        ops: Which methods may fail (default: all but ``url``).

    Attributes:
        faults: How many faults were injected so far.
    """

    def __init__(
        self,
        inner: TaskIO,
        rate: float,
        seed: int = 0,
        ops: Iterable[str] = (
            "read",
            "write",
            "create",
            "delete",
            "list",
            "exists",
            "read_many",
            "read_versioned",
            "write_if",
            "delete_if",
            "read_many_versioned",
        ),
    ) -> None:
        super().__init__(inner)
        self.rate = rate
        self.ops = frozenset(ops)
        self.faults = 0
        self._random = random.Random(seed)  # noqa: S311
        self._lock = threading.Lock()
        self.enabled = True

    def _call(self, op: str, func: Callable[..., _T], *args: Any) -> _T:
        with self._lock:
            fail = self.enabled and op in self.ops and self._random.random() < self.rate
            after = fail and op in MUTATIONS and self._random.random() < 0.5
            kind = self._random.choice((OSError, TimeoutError)) if fail else OSError
        if fail and not after:
            self.faults += 1
            raise kind(f"injected fault before {op}")
        result = func(*args)
        if after:
            self.faults += 1
            raise kind(f"injected fault after {op} took effect")
        return result


class CrashingTaskIO(WrappingTaskIO):
    """Kill the process with ``os._exit`` around the k-th mutating storage call.

    Mutating calls are write, create, delete, write_if and delete_if.

    Use it in a child process; the parent then checks what a restart makes of
    the state left behind.

    Args:
        inner: The real store.
        crash_at: The 1-based number of the mutating call to crash at.
        when: ``"before"`` the call reaches the store, or ``"after"`` it did.
        exit_code: The exit code of the killed process.

    Attributes:
        mutations: How many mutating calls were made so far.
    """

    def __init__(
        self,
        inner: TaskIO,
        crash_at: int,
        when: Literal["before", "after"] = "before",
        exit_code: int = 86,
    ) -> None:
        super().__init__(inner)
        self.crash_at = crash_at
        self.when = when
        self.exit_code = exit_code
        self.mutations = 0

    def _call(self, op: str, func: Callable[..., _T], *args: Any) -> _T:
        if op not in MUTATIONS:
            return func(*args)
        self.mutations += 1
        hit = self.mutations == self.crash_at
        if hit and self.when == "before":
            os._exit(self.exit_code)
        result = func(*args)
        if hit:
            os._exit(self.exit_code)
        return result
