"""A task's lock or lease, read from its object without the lease classes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import locking as _locking
from ..locking import LockOwner
from ._stored import parse_ts

__all__ = ["LEASE_SKEW", "LockInfo", "LockState"]


LEASE_SKEW = float(getattr(_locking, "DEFAULT_LOCK_SKEW", 5.0))
"""Seconds past ``expires_at`` before a lease counts as expired (the engine's clock-skew margin)."""


class LockState(str, Enum):
    """What can be told about a task's lock from here."""

    ALIVE = "alive"
    """Held by a running process on this host."""
    LEASED = "leased"
    """Held by a process on another host whose lease has not expired."""
    UNKNOWN = "unknown"
    """Held (a lock object without a lease) by a process on another host: it
    cannot be checked from here, so it counts as held."""
    UNREADABLE = "unreadable"
    """The lock object cannot be parsed; it counts as held."""
    DEAD = "dead"
    """Held by a process on this host that no longer exists: the lock is stale."""
    EXPIRED = "expired"
    """A lease nobody renewed in time: stale, any worker may take it over."""
    RELEASED = "released"
    """A lease its holder released: the task is not locked (the object keeps
    the lease's epoch)."""

    def __str__(self) -> str:
        return self.value


_HELD_STATES = frozenset(
    {LockState.ALIVE, LockState.LEASED, LockState.UNKNOWN, LockState.UNREADABLE}
)


class _LeaseFields(BaseModel):
    """The lease part of a lock record (format 2), read without the lease classes."""

    model_config = ConfigDict(extra="ignore")

    state: Literal["held", "released"] = "held"
    epoch: int = Field(ge=1)
    expires_at: float


@dataclass(frozen=True)
class LockInfo:
    """A task's lock object and what is known of its holder.

    Both kinds of lock are understood: a lock object (owner record only) and
    a lease (owner record plus ``state``, ``epoch`` and ``expires_at``).

    Attributes:
        obj_name: The lock object's name.
        owner: The owner record, or None when it cannot be parsed.
        state: What can be told of the lock (see `LockState`).
        data: The lock object's bytes as read.
        epoch: The lease's epoch (None for a lock object).
        expires_at: When the lease ends unless renewed, epoch seconds (None
            for a lock object).
    """

    obj_name: str
    owner: LockOwner | None
    state: LockState
    data: bytes = field(repr=False)
    epoch: int | None = None
    expires_at: float | None = None

    @classmethod
    def from_bytes(cls, obj_name: str, data: bytes, now: float | None = None) -> LockInfo:
        """Parse a lock object and judge its holder.

        Args:
            obj_name: The lock object's name.
            data: Its bytes.
            now: The current time, epoch seconds (default: now).
        """
        try:
            owner = LockOwner.model_validate_json(data)
            extra = owner.model_extra or {}
            lease = _LeaseFields.model_validate(extra) if "expires_at" in extra else None
        except ValidationError:
            return cls(obj_name, None, LockState.UNREADABLE, data)
        current = time.time() if now is None else now
        if lease is None:
            if owner.is_dead():
                state = LockState.DEAD
            elif owner.is_on_this_host():
                state = LockState.ALIVE
            else:
                state = LockState.UNKNOWN
            return cls(obj_name, owner, state, data)
        if lease.state == "released":
            state = LockState.RELEASED
        elif owner.is_dead():
            state = LockState.DEAD
        elif current > lease.expires_at + LEASE_SKEW:
            state = LockState.EXPIRED
        elif owner.is_on_this_host():
            state = LockState.ALIVE
        else:
            state = LockState.LEASED
        return cls(obj_name, owner, state, data, lease.epoch, lease.expires_at)

    @property
    def held(self) -> bool:
        """True when the lock counts as held by a live (or unknowable) holder."""
        return self.state in _HELD_STATES

    @property
    def is_lease(self) -> bool:
        """True for a lease, False for a lock object."""
        return self.epoch is not None

    def age_seconds(self, now: datetime | None = None) -> float | None:
        """Seconds since the lock was acquired, or None if unknown."""
        if self.owner is None:
            return None
        acquired = parse_ts(self.owner.acquired_at)
        if acquired is None:
            return None
        current = now if now is not None else datetime.now(timezone.utc)
        return max(0.0, (current - acquired).total_seconds())

    def expires_in(self, now: float | None = None) -> float | None:
        """Seconds until the lease expires (negative: expired), or None for a lock object."""
        if self.expires_at is None:
            return None
        return self.expires_at - (time.time() if now is None else now)

    def holder(self) -> str:
        """``host:pid``, or a note that the record is unreadable."""
        if self.owner is None:
            return "an unreadable lock record"
        return f"{self.owner.host}:{self.owner.pid}"

    def describe(self) -> str:
        """``host:pid (alive, acquired at ...)`` for messages."""
        if self.owner is None:
            return f"{self.holder()} ({self.obj_name!r})"
        lease = ""
        left = self.expires_in()
        if left is not None:
            when = f"expires in {left:.0f}s" if left >= 0 else f"expired {-left:.0f}s ago"
            lease = f", lease epoch {self.epoch} {when}"
        return f"{self.holder()} ({self.state}, acquired at {self.owner.acquired_at}{lease})"
