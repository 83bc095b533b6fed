"""Operator actions on a stored task: cancel it, remove its lock, delete it."""

from __future__ import annotations

import copy
import json
import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pydantic_core

from ..errors import BindException, TaskStateError, VersionConflict
from ..locking import BindLock
from ..models import CANCELABLE_STATES, StageStateHistoryEntry, StageStatus
from ..naming import cancel_obj_name, check_task_id, lock_obj_name, task_prefix
from ..storage import TaskIO
from ._locks import LockInfo, LockState
from ._records import TaskRecord, require_task
from ._stored import LockRefusedError, StoredStage, TaskNotFoundError

__all__ = [
    "CLI_CANCEL_MESSAGE",
    "CancelOutcome",
    "CleanOutcome",
    "UnlockOutcome",
    "cancel_task",
    "delete_task",
    "remove_lock",
]

logger = logging.getLogger(__name__)


CLI_CANCEL_MESSAGE = "task canceled from the CLI"
"""The history message of a stage canceled at once by `cancel_task`."""


@dataclass(frozen=True)
class CancelOutcome:
    """What `cancel_task` did.

    Attributes:
        task_id: The task.
        canceled: Names of the stages set to CANCELED (empty if it was already canceled).
        already_canceled: True when the task was CANCELED before the call.
    """

    task_id: str
    canceled: tuple[str, ...]
    already_canceled: bool


def _iso_now(zone_name: str, now: float) -> str:
    try:
        zone = ZoneInfo(zone_name)
    except (ZoneInfoNotFoundError, ValueError):
        zone = ZoneInfo("UTC")
    return datetime.fromtimestamp(now, zone).isoformat()


def _encode(doc: Mapping[str, Any]) -> bytes:
    # The engine writes compact JSON with pydantic's formatting; so does this.
    return pydantic_core.to_json(doc)


def cancel_task(
    io: TaskIO,
    task_id: str,
    *,
    message: str = CLI_CANCEL_MESSAGE,
    lock_timeout: float | None = None,
) -> CancelOutcome:
    """Cancel a task that no process runs, at once, without the user's classes.

    Takes the task's `BindLock` (taking over a stale one, as the engine does),
    then sets the first stage that is not COMPLETE and every later stage in
    `CANCELABLE_STATES` to CANCELED, each with a history entry like the
    engine's, and deletes a pending cancellation request. Every other byte of
    each stage object stays as it was. Unlike `CheckMateEngine.cancel`, the
    stage's ``cancel()`` hook does not run: it is user code.

    Args:
        io: The store.
        task_id: The task.
        message: The history message of the change.
        lock_timeout: Passed to `BindLock` (None: one try).

    Returns:
        What was done.

    Raises:
        BindException: The task is locked by another owner (it may be running:
            use `checkmate.request_cancel` instead).
        TaskNotFoundError: No such task.
        TaskStateError: The task is COMPLETE or ERROR, or cannot be read reliably.
    """
    lock = BindLock(io, lock_obj_name(check_task_id(task_id)), lock_timeout)
    lock.acquire()
    try:
        record = require_task(io, task_id)
        status = record.status
        if status is None:
            raise TaskStateError(
                f"task {task_id!r} cannot be canceled: {record.problems[0]}", task_id=task_id
            )
        if status in (StageStatus.COMPLETE, StageStatus.ERROR):
            raise TaskStateError(
                f"task {task_id!r} is {status} and cannot be canceled", task_id=task_id
            )
        already = status is StageStatus.CANCELED
        changed: list[str] = []
        if not already:
            now = datetime.now(timezone.utc).timestamp()
            current = record.current_stage
            first = record.stages.index(current) if current is not None else len(record.stages)
            for stage in record.stages[first:]:
                if stage.status in CANCELABLE_STATES:
                    _write_canceled(io, stage, message, now)
                    changed.append(stage.stage_name)
        io.delete(cancel_obj_name(task_id))
    finally:
        lock.release()
    logger.info("canceled task %s (%s)", task_id, ", ".join(changed) or "already canceled")
    return CancelOutcome(task_id=task_id, canceled=tuple(changed), already_canceled=already)


def _write_canceled(io: TaskIO, stage: StoredStage, message: str, now: float) -> None:
    doc = copy.deepcopy(stage.doc)
    state = doc["state"]
    stamp = _iso_now(stage.model.timezone, now)
    entry = StageStateHistoryEntry(
        attempt=stage.attempts,
        begin_status=stage.status,
        end_status=StageStatus.CANCELED,
        begin_ts=stamp,
        end_ts=stamp,
        message=message,
        run_time_seconds=0.0,
    )
    state["history"].append(entry.model_dump(mode="json"))
    state["status"] = StageStatus.CANCELED.value
    io.write(stage.obj_name, _encode(doc))


# ---------------------------------------------------------------------- unlock


@dataclass(frozen=True)
class UnlockOutcome:
    """What `remove_lock` did.

    Attributes:
        task_id: The task.
        lock: The lock found, or None when the task was not locked (no lock
            object, or a released lease).
        removed: Names of the objects deleted (a lock object, takeover markers).
        released: True when a lease was marked released instead of deleted
            (a lease object stays, keeping its epoch).
        forced: True when a lock that was not known to be stale was removed.
    """

    task_id: str
    lock: LockInfo | None
    removed: tuple[str, ...]
    released: bool
    forced: bool


def remove_lock(io: TaskIO, task_id: str, *, force: bool = False) -> UnlockOutcome:
    """Remove a task's lock when it is stale (or with ``force``).

    A stale lock (its owner is a dead process on this host, or its lease
    expired) is taken over exactly as the engine would (atomically, through
    `BindLock`) and released: a lock object is deleted, a lease is marked
    released with its epoch raised, so a former holder can never write again.

    Args:
        io: The store.
        task_id: The task.
        force: Also remove a lock whose holder is alive on this host, holds a
            live lease, or cannot be judged (another host, unreadable record).

    Returns:
        What was done (``lock`` is None when the task was not locked).

    Raises:
        TaskNotFoundError: The store holds no object of the task.
        LockRefusedError: The lock is held and ``force`` is False, or it
            changed while it was being removed.
    """
    lock_name = lock_obj_name(check_task_id(task_id))
    names = io.list(task_prefix(task_id))
    if not names:
        raise TaskNotFoundError(f"no task {task_id!r} in {io!r}", task_id=task_id)
    found = io.read_many([lock_name]) if lock_name in names else {}
    if lock_name not in found:
        return UnlockOutcome(task_id, None, (), released=False, forced=False)
    info = LockInfo.from_bytes(lock_name, found[lock_name])
    if info.state is LockState.RELEASED:
        return UnlockOutcome(task_id, None, (), released=False, forced=False)
    if info.held:
        if not force:
            raise LockRefusedError(_refusal(task_id, info), task_id=task_id, obj_name=lock_name)
        logger.warning("forcibly removing lock %s held by %s", lock_name, info.describe())
        return _force_unlock(io, task_id, info)
    taker = BindLock(io, lock_name)
    try:
        taker.acquire()
    except BindException as exc:
        raise LockRefusedError(
            f"task {task_id!r}: the stale lock of {info.holder()} could not be taken over "
            f"({exc}); use --force to remove it anyway",
            task_id=task_id,
            obj_name=lock_name,
        ) from exc
    try:
        # While we hold the lock, takeover markers left by crashed takers are junk.
        markers = [n for n in io.list(lock_name) if _MARKER_INFIX in n]
        removed = _delete_all(io, markers)
    finally:
        taker.release()
    lease = info.is_lease
    return UnlockOutcome(
        task_id, info, removed if lease else (lock_name, *removed), released=lease, forced=False
    )


_MARKER_INFIX = ".takeover-"


def _force_unlock(io: TaskIO, task_id: str, info: LockInfo) -> UnlockOutcome:
    """Remove a held lock: release a lease (epoch + 1), delete a lock object."""
    lock_name = info.obj_name
    markers = [n for n in io.list(lock_name) if _MARKER_INFIX in n]
    if info.is_lease and getattr(io, "supports_conditional_write", False):
        data, version = io.read_versioned(lock_name)
        if data != info.data:
            raise LockRefusedError(
                f"the lock of task {task_id!r} changed while it was being removed; try again",
                task_id=task_id,
                obj_name=lock_name,
            )
        record = json.loads(data)
        record.update(
            state="released",
            epoch=int(record["epoch"]) + 1,
            expires_at=time.time(),
            nonce=uuid.uuid4().hex,
        )
        try:
            io.write_if(lock_name, json.dumps(record).encode(), version)
        except VersionConflict as exc:
            raise LockRefusedError(
                f"the lock of task {task_id!r} changed while it was being removed; try again",
                task_id=task_id,
                obj_name=lock_name,
            ) from exc
        return UnlockOutcome(task_id, info, _delete_all(io, markers), released=True, forced=True)
    removed = _delete_all(io, [lock_name, *markers])
    return UnlockOutcome(task_id, info, removed, released=False, forced=True)


def _refusal(task_id: str, info: LockInfo) -> str:
    why = {
        LockState.ALIVE: "its holder is a running process on this host",
        LockState.LEASED: "its holder, on another host, holds a lease that has not expired",
        LockState.UNKNOWN: "its holder runs on another host, where it may still be alive",
        LockState.UNREADABLE: "its lock record cannot be read, which counts as held",
    }.get(info.state, "it is held")
    return f"task {task_id!r} is locked by {info.describe()}: {why}; use --force to remove it"


def _delete_all(io: TaskIO, names: Iterable[str]) -> tuple[str, ...]:
    done = []
    for name in names:
        io.delete(name)
        done.append(name)
    return tuple(done)


# ---------------------------------------------------------------------- delete


@dataclass(frozen=True)
class CleanOutcome:
    """What `delete_task` did (or would do, on a dry run).

    Attributes:
        task_id: The task.
        deleted: Names of the objects deleted (or to delete).
        kept: Names of objects under the task's prefix that are not checkmate's
            (or not valid stage objects): never deleted.
        dry_run: True when nothing was deleted.
    """

    task_id: str
    deleted: tuple[str, ...]
    kept: tuple[str, ...]
    dry_run: bool


def _deletable(record: TaskRecord) -> list[str]:
    names = [stage.obj_name for stage in record.stages]
    if record.cancel_requested:
        names.append(cancel_obj_name(record.task_id))
    names.extend(record.lock_markers)
    return names


def delete_task(io: TaskIO, task_id: str, *, dry_run: bool = False) -> CleanOutcome:
    """Delete a task's objects: its stage objects, cancellation request and lock objects.

    Only objects that parse as the task's stage objects, its lock objects and
    its cancellation request are deleted; anything else under the task's
    prefix (a foreign file, an invalid ``.json``) is kept and reported. A
    locked task is refused, even when its lock is stale: remove the lock
    first (`remove_lock`). The deletion happens under the task's lock, so no
    engine can bind the task meanwhile; a released lease object goes last,
    and only if nobody took the lease since (a conditional delete).

    Args:
        io: The store.
        task_id: The task.
        dry_run: Only report what would be deleted.

    Raises:
        TaskNotFoundError: No such task.
        LockRefusedError: The task is locked (even by a dead process: unlock it first).
    """
    record = require_task(io, task_id)
    if record.lock is not None and record.locked:
        raise LockRefusedError(
            f"task {task_id!r} is locked by {record.lock.describe()}; it was not deleted "
            "(remove the lock first with `checkmate unlock` if no process runs it)",
            task_id=task_id,
            obj_name=record.lock.obj_name,
        )
    lock_name = lock_obj_name(task_id)
    if dry_run:
        doomed = _deletable(record)
        if record.lock is not None:
            doomed.append(lock_name)
        return CleanOutcome(task_id, tuple(doomed), (*record.rejected, *record.others), True)
    lock = BindLock(io, lock_name)
    try:
        lock.acquire()
    except BindException as exc:
        raise LockRefusedError(
            f"task {task_id!r} was locked meanwhile; it was not deleted ({exc})",
            task_id=task_id,
            obj_name=lock_name,
        ) from exc
    try:
        fresh = require_task(io, task_id)
        doomed = _deletable(fresh)
        kept = (*fresh.rejected, *fresh.others)
        _delete_all(io, doomed)
        io.sweep(task_prefix(task_id))
    finally:
        lock.release()
    if _delete_released_lease(io, lock_name):
        doomed.append(lock_name)
    logger.info("deleted task %s (%d objects)", task_id, len(doomed))
    return CleanOutcome(task_id, tuple(doomed), kept, dry_run=False)


def _delete_released_lease(io: TaskIO, lock_name: str) -> bool:
    """Delete a lease object left released by our own release, unless someone took it since."""
    try:
        data, version = io.read_versioned(lock_name)
    except FileNotFoundError:
        return False  # a lock object: release() deleted it
    info = LockInfo.from_bytes(lock_name, data)
    if info.state is not LockState.RELEASED:
        return False
    try:
        io.delete_if(lock_name, version)
    except (VersionConflict, FileNotFoundError):
        return False
    return True
