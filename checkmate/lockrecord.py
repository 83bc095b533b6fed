"""The records kept in lock objects: who holds a task, and (for leases) until when."""

from __future__ import annotations

import os
import time
import uuid
from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ._host import own_start_time, process_alive, this_host

__all__ = ["LeaseRecord", "LockOwner"]


class LockOwner(BaseModel):
    """The owner of a lock: enough to tell, on the same host, whether it still lives."""

    model_config = ConfigDict(extra="allow", frozen=True)

    format: int = 1
    """Version of the lock record format (1: lock object, 2: lease)."""
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
        return cls(**_this_process())

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


def _this_process() -> dict[str, object]:
    host = this_host()
    pid = os.getpid()
    return {
        "host": host.hostname,
        "boot_id": host.boot_id,
        "pid_namespace": host.pid_namespace,
        "pid": pid,
        "pid_start": own_start_time(),
        "token": uuid.uuid4().hex,
        "acquired_at": datetime.now(timezone.utc).isoformat(),
    }


class LeaseRecord(LockOwner):
    """A lease: a lock that expires unless its holder renews it.

    The object is never deleted while the task exists: releasing it keeps its
    epoch, so epochs only grow.
    """

    format: int = 2
    state: Literal["held", "released"] = "held"
    """Whether the lease is held or was released."""
    epoch: int = Field(ge=1)
    """The fencing token: +1 on every acquisition of the task."""
    ttl: float = Field(gt=0)
    """Lease length, seconds."""
    renewed_at: float
    """Wall-clock time (epoch seconds) of the last renewal."""
    expires_at: float
    """Wall-clock time (epoch seconds) the lease ends unless renewed."""
    nonce: str = Field(pattern=r"^[0-9a-f]{32}$")
    """Fresh on every write, so that no two writes have the same bytes."""

    @classmethod
    def new(cls, epoch: int, ttl: float, now: float | None = None) -> LeaseRecord:
        """Return a held lease for the calling process."""
        at = time.time() if now is None else now
        return cls(
            **_this_process(),
            epoch=epoch,
            ttl=ttl,
            renewed_at=at,
            expires_at=at + ttl,
            nonce=uuid.uuid4().hex,
        )

    def renewed(self, now: float) -> LeaseRecord:
        """Return this lease renewed at ``now``, with a fresh nonce."""
        return self.model_copy(
            update={"renewed_at": now, "expires_at": now + self.ttl, "nonce": uuid.uuid4().hex}
        )

    def released(self, now: float) -> LeaseRecord:
        """Return this lease released at ``now`` (same epoch), with a fresh nonce."""
        return self.model_copy(
            update={"state": "released", "expires_at": now, "nonce": uuid.uuid4().hex}
        )

    def is_live(self, now: float, skew: float = 0.0) -> bool:
        """Tell whether the lease is held and not past ``expires_at + skew``."""
        return self.state == "held" and now <= self.expires_at + skew

    def describe(self) -> str:
        """Return ``host:pid, epoch N, expires in Xs`` for messages."""
        left = self.expires_at - time.time()
        when = f"expires in {left:.0f}s" if left >= 0 else f"expired {-left:.0f}s ago"
        return f"{self.host}:{self.pid} (epoch {self.epoch}, {when})"
