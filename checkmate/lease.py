"""Leases: task locks that expire, with an epoch that fences out a holder that lost them.

The lock object holds a `LeaseRecord`. Every change to it is a compare-and-swap
(`TaskIO.write_if`) on the version read before, so among any number of racing
workers exactly one wins:

- **acquire**: create the record (epoch 1) if there is none; take over a
  released lease, an expired one (past ``expires_at + skew``) or one whose
  owner is a dead process on this same host, with epoch + 1.
- **renew**: a heartbeat thread moves ``expires_at`` forward every ttl/3. The
  holder also keeps a local deadline, ``ttl`` after the start of its last
  successful renewal (monotonic clock); past it, the holder considers the
  lease lost even if no renewal failed, before any other worker can take it.
- **release**: the record goes to state "released", keeping its epoch. The
  object is never deleted while the task exists, so epochs only grow.

A holder that lost its lease raises `LeaseLostError` at its next write. A
write that was already under way is refused by the store, because the
engine writes stage objects with `write_if` on versions that the new owner
changed when it took over (see the engine's sealing).

What no lease can do: stop a paused former holder from doing *work*. Side
effects outside the store must carry the epoch (``engine.lock_epoch``) or be
idempotent.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import ValidationError

from .errors import ConfigurationError, LeaseLostError, LockUnsupportedError, VersionConflict
from .lockrecord import LeaseRecord, LockOwner
from .retry import StorageRetry, storage_call
from .storage.base import TaskIO

__all__ = ["SELFTEST_INFIX", "Lease", "self_test"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

_ONE_TRY = StorageRetry(attempts=1)
_TRUSTED: dict[str, bool] = {}
_TRUSTED_LOCK = threading.Lock()


def _store_key(io: TaskIO) -> str:
    return f"{type(io).__qualname__}:{io.url('x')}"


SELFTEST_INFIX = ".selftest-"
"""Infix of the self-test's scratch objects: ``<lock name>.selftest-<hex>``."""
_STALE_SCRATCH_AGE = 3600.0


def _sweep_scratch(io: TaskIO, scratch_name: str, call: Callable[..., Any]) -> None:
    """Delete scratch objects that earlier self-tests left behind when their process died.

    A scratch object is removed when its writer is a dead process on this host,
    or when it is older than an hour (no self-test lasts that long). Objects
    that do not parse as a self-test's are left alone.
    """
    now = time.time()
    for name in call(io.list, scratch_name + SELFTEST_INFIX):
        try:
            mark = _ScratchMark.model_validate_json(call(io.read, name))
        except FileNotFoundError:
            continue  # its own self-test finished meanwhile
        except ValidationError:
            logger.warning("leaving %s alone: not a self-test scratch object", name)
            continue
        if mark.is_dead() or now - mark.written_at > _STALE_SCRATCH_AGE:
            logger.info("removing self-test scratch object %s left by %s", name, mark.describe())
            call(io.delete, name)


class _ScratchMark(LockOwner):
    """What a self-test writes: who wrote it and when, plus a mark unique to each write."""

    written_at: float
    mark: str


def self_test(io: TaskIO, scratch_name: str, retry: StorageRetry | None = None) -> None:
    """Check once per store that conditional writes are enforced; refuse the store if not.

    Creates, conditionally rewrites and deletes a scratch object. A store that
    accepts a second create, or a write on a stale version, silently ignores
    preconditions (some S3-compatible servers do) and cannot hold a lease.
    Transient storage errors are retried; a retried write whose first try had
    landed is recognised by reading back its unique bytes. Scratch objects
    left by self-tests of dead processes are removed first.

    Raises:
        LockUnsupportedError: The store does not enforce preconditions.
        StorageError: The store kept failing.
    """
    if not io.needs_self_test:
        return
    key = _store_key(io)
    with _TRUSTED_LOCK:
        if _TRUSTED.get(key):
            return
    policy = retry if retry is not None else StorageRetry()
    name = f"{scratch_name}{SELFTEST_INFIX}{uuid.uuid4().hex}"

    def call(func: Callable[..., _T], *args: Any) -> _T:
        return storage_call(policy, "self-test", name, func, *args)

    def write(data: bytes, version: str | None) -> str:
        try:
            return call(io.write_if, name, data, version)
        except VersionConflict:
            current, current_version = call(io.read_versioned, name)
            if current != data:  # not an earlier try of ours that landed
                raise
            return current_version

    def refused(data: bytes, version: str | None) -> bool:
        try:
            call(io.write_if, name, data, version)
        except VersionConflict:
            return True
        return False

    _sweep_scratch(io, scratch_name, call)
    owner = LockOwner.for_this_process().model_dump()
    marks = [
        _ScratchMark(**owner, written_at=time.time(), mark=f"{i} {uuid.uuid4().hex}")
        .model_dump_json()
        .encode()
        for i in range(4)
    ]
    problem = None
    try:
        first = write(marks[0], None)
        if not refused(marks[1], None):
            problem = "a second create-if-absent of the same object succeeded"
        else:
            write(marks[2], first)
            if not refused(marks[3], first):
                problem = "a compare-and-swap on a stale version succeeded"
            elif call(io.read, name) != marks[2]:
                problem = "the object does not hold what the last successful write wrote"
    finally:
        call(io.delete, name)
    if problem is not None:
        raise LockUnsupportedError(
            f"refusing to lease on {io!r}: {problem}, so the store ignores preconditions "
            "and cannot keep two workers off one task. Use a store that enforces "
            "conditional writes, or no_lock=True if only one process runs the task",
            obj_name=scratch_name,
        )
    with _TRUSTED_LOCK:
        _TRUSTED[key] = True


class Lease:
    """One worker's lease on one task (used through `BindLock`)."""

    def __init__(
        self,
        io: TaskIO,
        obj_name: str,
        retry: StorageRetry,
        ttl: float,
        skew: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        interval = io.min_rewrite_interval
        if ttl <= 0 or skew < 0:
            raise ConfigurationError(
                f"lock_ttl must be > 0 and lock_skew >= 0, not {ttl!r} and {skew!r}",
                obj_name=obj_name,
            )
        if ttl / 3 < interval:
            raise ConfigurationError(
                f"lock_ttl={ttl} would renew the lease every {ttl / 3:.2f}s, faster than "
                f"{io!r} allows one write per object ({interval}s); use lock_ttl >= "
                f"{3 * interval:g}",
                obj_name=obj_name,
            )
        self.io = io
        self.obj_name = obj_name
        self.retry = retry
        self.ttl = ttl
        self.skew = skew
        self.clock = clock
        self.owner: LeaseRecord | None = None
        self.needs_seal = False
        self._version: str | None = None
        self._deadline = 0.0
        self._lost = False
        self._state_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def epoch(self) -> int | None:
        """The epoch of the held lease, else None."""
        return self.owner.epoch if self.owner is not None else None

    def _io(self, func: Callable[..., _T], *args: Any) -> _T:
        return storage_call(self.retry, "lease", self.obj_name, func, *args)

    # -------------------------------------------------------------- acquire

    def try_acquire(self) -> str | None:
        """Try once; return None on success, else why the lease is not ours."""
        self_test(self.io, self.obj_name, self.retry)
        started = time.monotonic()
        now = self.clock()
        try:
            current_bytes, version = self._io(self.io.read_versioned, self.obj_name)
        except FileNotFoundError:
            return self._install(LeaseRecord.new(epoch=1, ttl=self.ttl, now=now), None, started)
        try:
            current = LeaseRecord.model_validate_json(current_bytes)
        except ValidationError:
            return self._take_lock_object(current_bytes, version, now, started)
        if current.is_live(now, self.skew) and not current.is_dead():
            return f"it is held by {current.describe()}"
        mine = LeaseRecord.new(epoch=current.epoch + 1, ttl=self.ttl, now=now)
        reason = self._install(mine, version, started)
        if reason is None and current.state == "held":
            # Only an expired lease can have a live former holder to fence out;
            # a dead process on this host writes nothing more.
            self.needs_seal = not current.is_dead()
            logger.warning(
                "took over lease %s from %s (%s); now epoch %d",
                self.obj_name,
                current.describe(),
                "dead process" if current.is_dead() else "expired",
                mine.epoch,
            )
        return reason

    def _take_lock_object(
        self, data: bytes, version: str, now: float, started: float
    ) -> str | None:
        """A plain lock object (no lease): held unless its owner is a dead local process."""
        try:
            holder = LockOwner.model_validate_json(data)
        except ValidationError:
            return "the lock object cannot be parsed, which counts as held"
        if not holder.is_dead():
            return f"it is held by {holder.describe()} (a lock object without a lease)"
        logger.warning("took over lock %s from dead process %s", self.obj_name, holder.describe())
        return self._install(LeaseRecord.new(epoch=1, ttl=self.ttl, now=now), version, started)

    def _install(self, mine: LeaseRecord, version: str | None, started: float) -> str | None:
        data = mine.model_dump_json().encode()
        new_version: str | None
        try:
            new_version = self._io(self.io.write_if, self.obj_name, data, version)
        except VersionConflict:
            new_version = self._mine_after_conflict(mine)
            if new_version is None:
                return "another worker took it at the same moment"
        with self._state_lock:
            self.owner = mine
            self._version = new_version
            self._deadline = started + self.ttl
            self._lost = False
        self._start_heartbeat()
        return None

    def _mine_after_conflict(self, mine: LeaseRecord) -> str | None:
        """After a refused write: is the stored lease still ours (a write whose reply was lost)?

        Ours means the same acquisition (token) and epoch, still held: an earlier
        try of this write, or an earlier renewal, landed. The stored record is
        adopted, but the local deadline is not extended for it.
        """
        try:
            data, version = self._io(self.io.read_versioned, self.obj_name)
            record = LeaseRecord.model_validate_json(data)
        except (FileNotFoundError, ValidationError):
            return None
        if (record.token, record.epoch, record.state) != (mine.token, mine.epoch, "held"):
            return None
        if record.nonce != mine.nonce:
            with self._state_lock:
                self.owner = record
                self._version = version
        return version

    # -------------------------------------------------------------- holding

    def check(self) -> None:
        """Raise `LeaseLostError` if the lease was lost or its local deadline passed."""
        if not self._lost and time.monotonic() <= self._deadline:
            return  # the hot path: no lock needed to read two plain attributes
        with self._state_lock:
            if not self._lost:
                self._lost = True
                logger.error("lease %s passed its local deadline", self.obj_name)
            epoch = self.epoch
        raise LeaseLostError(
            f"lease {self.obj_name!r} (epoch {epoch}) was lost: another worker may own "
            "the task now, so this one stops and writes nothing more",
            obj_name=self.obj_name,
        )

    @property
    def lost(self) -> bool:
        """True once the lease is known lost (taken over, or past its local deadline)."""
        return self._lost or (self.owner is not None and time.monotonic() > self._deadline)

    def mark_lost(self) -> None:
        """Record that the lease is lost (a fenced write was refused)."""
        with self._state_lock:
            self._lost = True

    def renew(self) -> bool:
        """Renew once; True if renewed. Check `lost` to tell a failed try from a lost lease."""
        started = time.monotonic()
        with self._state_lock:
            owner, version = self.owner, self._version
            if not self._lost and started > self._deadline:
                self._lost = True  # past the local deadline: never come back to life
                logger.error("lease %s passed its local deadline", self.obj_name)
            lost = self._lost
        if owner is None or lost:
            return False
        mine = owner.renewed(self.clock())
        new_version: str | None
        try:
            # One try: the heartbeat loop retries on its own schedule, and a retry
            # must never be sent after the local deadline.
            new_version = storage_call(
                _ONE_TRY,
                "renew lease",
                self.obj_name,
                self.io.write_if,
                self.obj_name,
                mine.model_dump_json().encode(),
                version,
            )
        except VersionConflict:
            new_version = self._mine_after_conflict(mine)
            if new_version is None:
                logger.error("lease %s was taken over", self.obj_name)
                self.mark_lost()
                return False
            if self.owner is not None and self.owner.nonce != mine.nonce:
                return False  # an earlier renewal had landed: adopted; renew again soon
        except Exception as exc:  # storage trouble: keep trying until the deadline
            logger.warning("could not renew lease %s: %r", self.obj_name, exc)
            with self._state_lock:
                if time.monotonic() > self._deadline:
                    self._lost = True
            return False  # not renewed: the heartbeat tries again soon
        with self._state_lock:
            if self._lost:
                return False
            self.owner = mine
            self._version = new_version
            self._deadline = started + self.ttl
        return True

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._beat, name=f"checkmate-lease:{self.obj_name}", daemon=True
        )
        self._thread.start()

    def _beat(self) -> None:
        period = self.ttl / 3
        wait = period
        while not self._stop.wait(wait):
            if self.renew():
                wait = period
            elif self._lost:
                return
            else:
                wait = min(period, max(self.ttl / 20, 0.05))  # failing: retry sooner

    def _stop_heartbeat(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    # -------------------------------------------------------------- release

    def release(self, delete: bool = False) -> None:
        """Stop renewing and mark the lease released, keeping its epoch.

        With ``delete`` (the task's objects are being removed), delete the
        lease object instead, if it is still ours. Nothing is written after
        the lease was lost.
        """
        self._stop_heartbeat()
        with self._state_lock:
            owner, version, lost = self.owner, self._version, self._lost
            self.owner = None
            self._version = None
        if owner is None or lost:
            return
        data = owner.released(self.clock()).model_dump_json().encode()
        try:
            if delete and version is not None:
                self._io(self.io.delete_if, self.obj_name, version)
            else:
                self._io(self.io.write_if, self.obj_name, data, version)
        except VersionConflict:
            logger.warning("lease %s was taken over before release", self.obj_name)

    @staticmethod
    def is_held(io: TaskIO, obj_name: str, skew: float) -> bool:
        """Tell whether the lock object holds a live lease (owner liveness not considered)."""
        del skew
        try:
            record = LeaseRecord.model_validate_json(io.read(obj_name))
        except FileNotFoundError:
            return False
        except ValidationError:
            return True  # unreadable: treat as held, like acquire does
        return record.is_live(time.time())
