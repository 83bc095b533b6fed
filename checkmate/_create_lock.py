"""Locks for stores with atomic create but no compare-and-swap.

The lock object is created with `TaskIO.create` and deleted on release. It
never expires: only a lock whose owner is a dead process on this same host is
taken over, through a numbered marker object that at most one taker can create.

A lock that this process may have left in the store without holding it (an
acquisition whose create failed after it may have landed, a release that
failed) is *abandoned*: its token is remembered, and the next acquisition in
this process takes the object over. Other processes still see a live owner
and wait until this process exits, as with any held lock object.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import ValidationError

from .lockrecord import LockOwner
from .retry import StorageRetry, storage_call
from .storage.base import TaskIO

__all__ = ["CreateLock"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_MAX_TAKEOVER_MARKERS = 64
MARKER_INFIX = ".takeover-"

_ABANDONED: set[tuple[str, str]] = set()  # (lock object's URL, token)
_ABANDONED_LOCK = threading.Lock()


def _abandon(io: TaskIO, obj_name: str, *tokens: str) -> None:
    with _ABANDONED_LOCK:
        _ABANDONED.update((io.url(obj_name), token) for token in tokens)


def _claim(io: TaskIO, obj_name: str, token: str) -> bool:
    """Take an abandoned token of this process; at most one caller gets it."""
    key = (io.url(obj_name), token)
    with _ABANDONED_LOCK:
        if key not in _ABANDONED:
            return False
        _ABANDONED.discard(key)
        return True


class CreateLock:
    """Create-if-absent lock with same-host dead-owner takeover (no fencing, no expiry)."""

    needs_seal = False
    epoch: int | None = None

    def __init__(self, io: TaskIO, obj_name: str, retry: StorageRetry) -> None:
        self.io = io
        self.obj_name = obj_name
        self.retry = retry
        self.owner: LockOwner | None = None

    def _io(self, func: Callable[..., _T], *args: Any) -> _T:
        return storage_call(self.retry, "lock", self.obj_name, func, *args)

    def check(self) -> None:
        """Nothing to check: this lock cannot be lost to another live process."""

    def try_acquire(self) -> str | None:
        """Try once; return None on success, else why the lock is not ours."""
        mine = LockOwner.for_this_process()
        data = mine.model_dump_json().encode()
        try:
            if self._io(self.io.create, self.obj_name, data):
                self.owner = mine
                return None
            current_bytes = self._io(self.io.read, self.obj_name)
        except FileNotFoundError:
            return "it was released while we looked; try again"
        except BaseException:
            _abandon(self.io, self.obj_name, mine.token)  # the create may have landed
            raise
        try:
            current = LockOwner.model_validate_json(current_bytes)
        except ValidationError:
            return "the lock object cannot be parsed, which counts as held"
        if current.token == mine.token:
            # An earlier try of our own create landed before its reply was lost.
            self.owner = mine
            return None
        if _claim(self.io, self.obj_name, current.token):
            return self._reclaim(current, mine, data)
        if not current.is_dead():
            return f"it is held by {current.describe()}"
        return self._take_over(current, current_bytes, mine, data)

    def _reclaim(self, abandoned: LockOwner, mine: LockOwner, data: bytes) -> str | None:
        """Overwrite a lock object this process abandoned (no other process may touch it)."""
        try:
            self._io(self.io.write, self.obj_name, data)
        except BaseException:
            _abandon(self.io, self.obj_name, abandoned.token, mine.token)
            raise
        logger.warning("reclaimed lock %s abandoned by this process", self.obj_name)
        self.owner = mine
        return None

    def _take_over(
        self, stale: LockOwner, stale_bytes: bytes, mine: LockOwner, data: bytes
    ) -> str | None:
        # Markers are numbered: when a taker died holding marker n, marker n + 1
        # is free for the next one, so a crashed takeover never blocks the lock.
        for number in range(_MAX_TAKEOVER_MARKERS):
            marker = f"{self.obj_name}{MARKER_INFIX}{stale.token}-{number}"
            if self._io(self.io.create, marker, data):
                break
            try:
                taker = LockOwner.model_validate_json(self._io(self.io.read, marker))
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
            still = self._io(self.io.read, self.obj_name)
        except FileNotFoundError:
            still = None
        if still != stale_bytes:
            self._io(self.io.delete, marker)
            return "the stale lock changed while we took it over; try again"
        self._io(self.io.write, self.obj_name, data)
        logger.warning("took over lock %s from dead process %s", self.obj_name, stale.describe())
        self.owner = mine
        return None

    def release(self, delete: bool = True) -> None:
        """Delete the lock object if it is still ours, and any takeover markers."""
        del delete  # a lock object is always deleted
        if self.owner is None:
            return
        token = self.owner.token
        try:
            try:
                current: LockOwner | None = LockOwner.model_validate_json(
                    self._io(self.io.read, self.obj_name)
                )
            except (FileNotFoundError, ValidationError):
                current = None
            if current is not None and current.token == self.owner.token:
                self._io(self.io.delete, self.obj_name)
            else:
                logger.warning("lock %s is no longer ours; leaving it in place", self.obj_name)
            # Every takeover marker, also those of takers (or releasers) that
            # crashed: none names our token, so no takeover in flight needs them.
            for name in self._io(self.io.list, self.obj_name + MARKER_INFIX):
                self._io(self.io.delete, name)
        except BaseException:
            _abandon(self.io, self.obj_name, token)  # the object may still name us
            raise
        finally:
            self.owner = None

    @staticmethod
    def is_held(io: TaskIO, obj_name: str, skew: float) -> bool:
        """Tell whether a lock object exists."""
        del skew
        return io.exists(obj_name)
