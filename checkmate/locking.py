"""`BindLock`: an exclusive task lock kept as an object in the task's store.

The lock object records its owner (host, boot, pid namespace, pid, process
start time, a random token, acquire time). It is taken with the store's atomic
create-if-absent. A lock whose owner is a dead process on this same host is
stale and is taken over atomically: the taker first creates a marker object
named after the stale owner's token (only one racer can), checks that the
lock still holds that owner, and only then overwrites it.

A lock held by a process on another host is never considered stale.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from types import TracebackType
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._host import process_alive, process_start_time, this_host
from .errors import BindException, ConfigurationError, LockUnsupportedError, StorageError
from .retry import StorageRetry
from .storage.base import TaskIO

__all__ = ["BindLock", "LockOwner"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_FIRST_DELAY = 0.005
_MAX_TAKEOVER_MARKERS = 64
_MARKER_INFIX = ".takeover-"
_MAX_DELAY = 0.25


class LockOwner(BaseModel):
    """The owner record stored in a lock object."""

    model_config = ConfigDict(extra="allow", frozen=True)

    format: int = 1
    """Version of the lock record format."""
    host: str = Field(min_length=1)
    """Host name of the owner."""
    boot_id: str | None = None
    """Kernel boot id of the owner's host (Linux)."""
    pid_namespace: str | None = None
    """The owner's pid namespace (Linux)."""
    pid: int = Field(gt=0)
    """The owner's process id."""
    pid_start: int | None = None
    """The owner's process start time, in clock ticks since boot (Linux)."""
    token: str = Field(pattern=r"^[0-9a-f]{32}$")
    """A random token unique to this acquisition."""
    acquired_at: str
    """ISO-8601 time the lock was acquired."""

    @classmethod
    def for_this_process(cls) -> LockOwner:
        """Return a new owner record for the calling process."""
        host = this_host()
        pid = os.getpid()
        return cls(
            host=host.hostname,
            boot_id=host.boot_id,
            pid_namespace=host.pid_namespace,
            pid=pid,
            pid_start=process_start_time(pid),
            token=uuid.uuid4().hex,
            acquired_at=datetime.now(timezone.utc).isoformat(),
        )

    def is_on_this_host(self) -> bool:
        """Tell whether the owner's pid can be checked here (same host, boot and pid namespace)."""
        host = this_host()
        return (
            self.host == host.hostname
            and self.boot_id == host.boot_id
            and self.pid_namespace == host.pid_namespace
        )

    def is_dead(self) -> bool:
        """Tell whether the owner is known to be dead (a gone process on this host)."""
        return self.is_on_this_host() and not process_alive(self.pid, self.pid_start)

    def describe(self) -> str:
        """Return ``host:pid (since <time>)`` for messages."""
        return f"{self.host}:{self.pid} (since {self.acquired_at})"


class BindLock:
    """An exclusive lock on a task, kept as an object through a `TaskIO`.

    Usable on its own as a context manager. Thread-safe.

    Args:
        task_io: The store that holds the lock object.
        obj_name: The lock object's name.
        acquire_timeout: None to try once; otherwise seconds to keep trying.
        storage_retry: How failed storage calls are retried (default `StorageRetry()`).

    Raises:
        ConfigurationError: ``acquire_timeout`` is negative.

    Example:
        ```python
        with BindLock(io, "jobs/nightly.lock", acquire_timeout=30):
            ...  # no other process holds the lock here
        ```
    """

    def __init__(
        self,
        task_io: TaskIO,
        obj_name: str,
        acquire_timeout: float | None = None,
        *,
        storage_retry: StorageRetry | None = None,
    ) -> None:
        if acquire_timeout is not None and acquire_timeout < 0:
            raise ConfigurationError(
                f"acquire_timeout must be None or >= 0, not {acquire_timeout!r}",
                obj_name=obj_name,
            )
        self.task_io = task_io
        self.obj_name = obj_name
        self.acquire_timeout = acquire_timeout
        self.storage_retry = storage_retry if storage_retry is not None else StorageRetry()
        self._is_locked = False
        self._thread_lock = threading.Lock()
        self._owner: LockOwner | None = None
        self._marker: str | None = None

    @property
    def is_locked(self) -> bool:
        """True while this instance holds the lock."""
        return self._is_locked

    @property
    def owner(self) -> LockOwner | None:
        """This instance's owner record while it holds the lock, else None."""
        return self._owner

    def __enter__(self) -> BindLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, waiting up to ``acquire_timeout`` seconds.

        Raises:
            BindException: The lock is held by another owner (or its object is
                unreadable, which counts as held) after the timeout.
            LockUnsupportedError: The store has no atomic create-if-absent.
        """
        if not self.task_io.supports_atomic_create:
            raise LockUnsupportedError(
                f"cannot lock {self.obj_name!r}: {self.task_io!r} has no atomic "
                "create-if-absent, and a lock that is not atomic is not a lock; use a store "
                "with conditional writes, or no_lock=True if only one process runs the task",
                obj_name=self.obj_name,
            )
        with self._thread_lock:
            if self._is_locked:
                raise BindException(
                    f"lock {self.obj_name!r} is already held by this BindLock",
                    obj_name=self.obj_name,
                )
            deadline = (
                None if self.acquire_timeout is None else time.monotonic() + self.acquire_timeout
            )
            delay = _FIRST_DELAY
            while True:
                holder = self._try_acquire()
                if holder is None:
                    return
                remaining = 0.0 if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    raise BindException(
                        f"cannot lock {self.obj_name!r}: {holder}. Wait for the holder to "
                        "finish, pass a bind_lock_timeout to wait for it, or remove the lock "
                        "object if you are sure no process holds it",
                        obj_name=self.obj_name,
                    )
                time.sleep(min(remaining, delay * random.uniform(0.5, 1.5)))  # noqa: S311
                delay = min(delay * 2, _MAX_DELAY)

    def _try_acquire(self) -> str | None:
        """Try once; return None on success, else why the lock is not ours."""
        mine = LockOwner.for_this_process()
        data = mine.model_dump_json().encode()
        if self._io(self.task_io.create, self.obj_name, data):
            self._taken(mine, marker=None)
            return None
        try:
            current_bytes = self._io(self.task_io.read, self.obj_name)
        except FileNotFoundError:
            return "it was released while we looked; try again"
        try:
            current = LockOwner.model_validate_json(current_bytes)
        except ValidationError:
            return "the lock object cannot be parsed, which counts as held"
        if current.token == mine.token:
            # An earlier try of our own create landed before its reply was lost.
            self._taken(mine, marker=None)
            return None
        if not current.is_dead():
            return f"it is held by {current.describe()}"
        return self._take_over(current, current_bytes, mine, data)

    def _take_over(
        self, stale: LockOwner, stale_bytes: bytes, mine: LockOwner, data: bytes
    ) -> str | None:
        # Markers are numbered: when a taker died holding marker n, marker n + 1
        # is free for the next one, so a crashed takeover never blocks the lock.
        for number in range(_MAX_TAKEOVER_MARKERS):
            marker = f"{self.obj_name}{_MARKER_INFIX}{stale.token}-{number}"
            if self._io(self.task_io.create, marker, data):
                break
            try:
                taker = LockOwner.model_validate_json(self._io(self.task_io.read, marker))
            except FileNotFoundError:
                return "a concurrent takeover just finished; try again"
            except ValidationError:
                taker = None
            if taker is not None and taker.token == mine.token:
                break  # an earlier try of our own create landed
            if taker is None or not taker.is_dead():
                return f"another process is taking over the stale lock of {stale.describe()}"
        else:
            return f"too many crashed takeovers of the stale lock of {stale.describe()}"
        try:
            still = self._io(self.task_io.read, self.obj_name)
        except FileNotFoundError:
            still = None
        if still != stale_bytes:
            self._io(self.task_io.delete, marker)
            return "the stale lock changed while we took it over; try again"
        self._io(self.task_io.write, self.obj_name, data)
        logger.warning("took over lock %s from dead process %s", self.obj_name, stale.describe())
        self._taken(mine, marker=marker)
        return None

    def _taken(self, owner: LockOwner, marker: str | None) -> None:
        self._owner = owner
        self._marker = marker
        self._is_locked = True
        logger.debug("acquired lock %s", self.obj_name)

    def release(self) -> None:
        """Release the lock if this instance holds it; otherwise do nothing.

        If another process took the lock over meanwhile, its lock is left alone.
        """
        with self._thread_lock:
            if not self._is_locked or self._owner is None:
                return
            try:
                try:
                    current_bytes = self._io(self.task_io.read, self.obj_name)
                    current: LockOwner | None = LockOwner.model_validate_json(current_bytes)
                except (FileNotFoundError, ValidationError):
                    current = None
                if current is not None and current.token == self._owner.token:
                    self._io(self.task_io.delete, self.obj_name)
                else:
                    logger.warning("lock %s is no longer ours; leaving it in place", self.obj_name)
                if self._marker is not None:
                    # Every takeover marker, also those of takers that crashed: none
                    # names our token, so no takeover in flight can depend on them.
                    for name in self._io(self.task_io.list, self.obj_name + _MARKER_INFIX):
                        self._io(self.task_io.delete, name)
            finally:
                self._is_locked = False
                self._owner = None
                self._marker = None
            logger.debug("released lock %s", self.obj_name)

    def _io(self, func: Callable[..., _T], *args: Any) -> _T:
        """Run one storage call with retries; a final failure becomes a StorageError."""
        try:
            return self.storage_retry.call(func, *args)
        except OSError as exc:
            if not StorageRetry.is_transient(exc):
                raise
            raise StorageError(
                f"storage failed while handling lock {self.obj_name!r}: {exc!r}; "
                "check the store and try again",
                obj_name=self.obj_name,
            ) from exc
