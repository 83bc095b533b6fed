"""`BindLock`: the exclusive lock that keeps every other worker off a task.

Two kinds, chosen by what the store can do:

- on a store with compare-and-swap (``supports_conditional_write``: local
  disk, memory, S3, GCS, Azure) a **lease** (`checkmate.lease`): it expires
  unless renewed by a heartbeat, carries an epoch that fences out a holder
  that lost it, and is taken over after ``lock_ttl + lock_skew`` seconds
  without renewal, or at once when its owner is a dead process on this host;
- on a store with only atomic create, a **lock object** that never expires
  and is taken over only when its owner is a dead process on this same host
  (`checkmate._create_lock`).

A lock held by a process on another host is never judged by its pid: only an
expired lease frees it.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from types import TracebackType

from ._create_lock import CreateLock
from .errors import BindException, ConfigurationError, LockUnsupportedError
from .lease import Lease
from .lockrecord import LeaseRecord, LockOwner
from .retry import StorageRetry
from .storage.base import TaskIO

__all__ = ["DEFAULT_LOCK_SKEW", "DEFAULT_LOCK_TTL", "BindLock", "LeaseRecord", "LockOwner"]

logger = logging.getLogger(__name__)

DEFAULT_LOCK_TTL = 60.0
"""Seconds a lease lasts without renewal."""
DEFAULT_LOCK_SKEW = 5.0
"""Seconds of clock-skew margin before an expired lease may be taken over."""

_FIRST_DELAY = 0.005
_MAX_DELAY = 0.25


class BindLock:
    """An exclusive lock on a task, kept as an object through a `TaskIO`.

    Usable on its own as a context manager. Thread-safe.

    Args:
        task_io: The store that holds the lock object.
        obj_name: The lock object's name.
        acquire_timeout: None to try once; otherwise seconds to keep trying.
        lock_ttl: Lease length in seconds (stores with compare-and-swap);
            renewed every ``lock_ttl / 3`` seconds while held.
        lock_skew: Clock-skew margin: a lease is taken over only
            ``lock_skew`` seconds after it expired.
        storage_retry: How failed storage calls are retried (default `StorageRetry()`).

    Raises:
        ConfigurationError: A negative timeout, a non-positive ttl, or a ttl
            that would renew faster than the store allows.

    Example:
        ```python
        with BindLock(io, "jobs/nightly.lock", acquire_timeout=30) as lock:
            ...  # no other worker holds the lock here; lock.epoch fences side effects
        ```
    """

    def __init__(
        self,
        task_io: TaskIO,
        obj_name: str,
        acquire_timeout: float | None = None,
        *,
        lock_ttl: float = DEFAULT_LOCK_TTL,
        lock_skew: float = DEFAULT_LOCK_SKEW,
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
        self.lock_ttl = lock_ttl
        self.lock_skew = lock_skew
        self.storage_retry = storage_retry if storage_retry is not None else StorageRetry()
        self._thread_lock = threading.Lock()
        self._is_locked = False
        self._impl: Lease | CreateLock
        if task_io.supports_conditional_write:
            self._impl = Lease(task_io, obj_name, self.storage_retry, lock_ttl, lock_skew)
        else:
            self._impl = CreateLock(task_io, obj_name, self.storage_retry)

    @property
    def is_locked(self) -> bool:
        """True while this instance holds the lock."""
        return self._is_locked

    @property
    def is_lease(self) -> bool:
        """True when this lock is a lease (it expires, and fences with an epoch)."""
        return isinstance(self._impl, Lease)

    @property
    def owner(self) -> LockOwner | None:
        """This instance's owner record while it holds the lock, else None."""
        return self._impl.owner

    @property
    def epoch(self) -> int | None:
        """The fencing epoch while a lease is held; None otherwise."""
        return self._impl.epoch if self._is_locked else None

    @property
    def needs_seal(self) -> bool:
        """True when the lease was taken over from a holder that may still be alive."""
        return self._impl.needs_seal

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
            LockUnsupportedError: The store has no atomic create-if-absent, or
                fails the conditional-write self-test.
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
                holder = self._impl.try_acquire()
                if holder is None:
                    self._is_locked = True
                    logger.debug("acquired lock %s", self.obj_name)
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

    def check(self) -> None:
        """Raise `LeaseLostError` if this holder lost its lease (no-op for lock objects)."""
        self._impl.check()

    @property
    def lost(self) -> bool:
        """True when this holder's lease was lost (never for lock objects)."""
        return isinstance(self._impl, Lease) and self._impl.lost

    def mark_lost(self) -> None:
        """Record that the lease is lost (a fenced write was refused)."""
        if isinstance(self._impl, Lease):
            self._impl.mark_lost()

    def release(self, delete: bool = False) -> None:
        """Release the lock if this instance holds it; otherwise do nothing.

        A lease is marked released (its object stays, keeping the epoch), or
        deleted with ``delete`` (when the task's objects are removed); a lock
        object is always deleted. Nothing is written after a lease was lost.
        """
        with self._thread_lock:
            if not self._is_locked:
                return
            try:
                self._impl.release(delete)
            finally:
                self._is_locked = False
            logger.debug("released lock %s", self.obj_name)

    @staticmethod
    def is_held(task_io: TaskIO, obj_name: str, lock_skew: float = DEFAULT_LOCK_SKEW) -> bool:
        """Tell whether a lock is held on ``obj_name`` (a live lease, or a lock object)."""
        kind = Lease if task_io.supports_conditional_write else CreateLock
        return kind.is_held(task_io, obj_name, lock_skew)
