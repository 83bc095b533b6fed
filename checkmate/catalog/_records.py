"""Every object of a task read in one batch: `TaskRecord`, `scan_store`, `load_task`."""

from __future__ import annotations

import contextlib
import gc
import json
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..codec import META_KEY
from ..errors import ConfigurationError
from ..models import StageStatus
from ..naming import STAGE_SUFFIX, cancel_obj_name, check_task_id, lock_obj_name, task_prefix
from ..storage import FsspecTaskIO, LocalTaskIO, TaskIO
from ..transitions import aggregate_status, find_invalid_pair
from ._locks import LockInfo, LockState
from ._stored import StoredStage, TaskNotFoundError, parse_stage_object, parse_ts

__all__ = ["TaskRecord", "load_task", "open_store", "scan_store"]


_LOCK_BASENAME = lock_obj_name("t").partition("/")[2]
_CANCEL_BASENAME = cancel_obj_name("t").partition("/")[2]


@dataclass(frozen=True)
class TaskRecord:
    """Everything the store holds for one task, read generically.

    Attributes:
        task_id: The task's id.
        stages: The valid stage objects, ordered by position.
        lock: The task's lock object, or None when there is none (a released
            lease is kept as an object: see `locked`).
        lock_markers: Names of lock takeover markers (``<lock>.takeover-...``).
        cancel_requested: True when a cancellation request is pending.
        problems: Why the task cannot be read reliably (invalid objects,
            inconsistent stages); empty when it is sound.
        rejected: Names of ``.json`` objects under the task that are not valid
            stage objects (never modified or deleted by this module).
        others: Names of other objects under the task's prefix that do not
            belong to checkmate (never modified or deleted by this module).
        stage_count: How many stages the task has, as its objects say.
    """

    task_id: str
    stages: tuple[StoredStage, ...]
    lock: LockInfo | None
    lock_markers: tuple[str, ...]
    cancel_requested: bool
    problems: tuple[str, ...]
    rejected: tuple[str, ...]
    others: tuple[str, ...]
    stage_count: int

    @property
    def status(self) -> StageStatus | None:
        """The task's status as the engine computes it, or None if the task has problems.

        Stages with no object count as UNBOUND, as they do for the engine.
        """
        if self.problems:
            return None
        statuses = [stage.status for stage in self.stages]
        statuses += [StageStatus.UNBOUND] * (self.stage_count - len(self.stages))
        return aggregate_status(statuses)

    @property
    def locked(self) -> bool:
        """True when a lock object exists that is not a released lease (stale ones included)."""
        return self.lock is not None and self.lock.state is not LockState.RELEASED

    @property
    def stages_complete(self) -> int:
        """How many stages are COMPLETE."""
        return sum(stage.status is StageStatus.COMPLETE for stage in self.stages)

    @property
    def current_stage(self) -> StoredStage | None:
        """The first stage that is not COMPLETE (the one the task works on), if any."""
        return next((s for s in self.stages if s.status is not StageStatus.COMPLETE), None)

    @property
    def attempts(self) -> int:
        """The attempts of all stages together (the engine's ``cumulative_attempts``)."""
        return sum(stage.attempts for stage in self.stages)

    @property
    def last_update(self) -> str | None:
        """The ``end_ts`` of the latest history entry of any stage (ISO-8601), if any."""
        latest = self._latest()
        return None if latest is None else latest[1]

    @property
    def last_update_time(self) -> datetime | None:
        """`last_update` as an aware datetime (naive timestamps count as UTC), if any."""
        latest = self._latest()
        return None if latest is None else latest[0]

    def _latest(self) -> tuple[datetime, str] | None:
        latest: tuple[datetime, str] | None = None
        for stage in self.stages:
            for entry in stage.history:
                moment = parse_ts(entry.end_ts)
                if moment is not None and (latest is None or moment > latest[0]):
                    latest = (moment, entry.end_ts)
        return latest

    def find_stage(self, stage_name: str) -> StoredStage | None:
        """Return the stage named ``stage_name``, or None."""
        return next((s for s in self.stages if s.stage_name == stage_name), None)


# ---------------------------------------------------------------------- opening a store


def open_store(store: str, storage_options: Mapping[str, Any] | None = None) -> TaskIO:
    """Return the `TaskIO` for a store given as a local path or an fsspec URL.

    Args:
        store: A directory (`LocalTaskIO`) or a URL with a scheme such as
            ``file://``, ``memory://`` or ``s3://`` (`FsspecTaskIO`).
        storage_options: Options for the fsspec filesystem (URLs only).

    Raises:
        ConfigurationError: Storage options were given with a local path, the
            store is empty, or fsspec cannot open the URL (unknown protocol,
            backend package not installed, invalid option).
    """
    options = dict(storage_options or {})
    if not store:
        raise ConfigurationError("the store must be a directory or a URL, not an empty string")
    if "://" in store:
        try:
            return FsspecTaskIO(store, **options)
        except (ImportError, ValueError, TypeError) as exc:
            # Unknown protocol, missing backend package (s3fs, ...), bad option.
            raise ConfigurationError(f"cannot open store {store!r}: {exc}") from exc
    if options:
        raise ConfigurationError(
            f"storage options apply to URLs only, but {store!r} is a local path; "
            f"use file://{store} to pass options to fsspec"
        )
    return LocalTaskIO(store)


@dataclass
class _Listing:
    candidates: list[str] = field(default_factory=list)
    lock: str | None = None
    markers: list[str] = field(default_factory=list)
    cancel: bool = False
    others: list[str] = field(default_factory=list)


def _group(names: Iterable[str], only: Collection[str] | None = None) -> dict[str, _Listing]:
    groups: dict[str, _Listing] = {}
    for name in names:
        task_id, sep, rest = name.partition("/")
        if not sep or not rest or (only is not None and task_id not in only):
            continue
        listing = groups.get(task_id)
        if listing is None:
            try:
                check_task_id(task_id)
            except ConfigurationError:
                continue
            listing = groups[task_id] = _Listing()
        if rest == _LOCK_BASENAME:
            listing.lock = name
        elif rest.startswith(_LOCK_BASENAME):
            listing.markers.append(name)
        elif rest == _CANCEL_BASENAME:
            listing.cancel = True
        elif rest.endswith(STAGE_SUFFIX):
            listing.candidates.append(name)
        else:
            listing.others.append(name)
    return groups


def _claims_checkmate(data: bytes) -> bool:
    """Tell whether invalid bytes at least look like they were meant as a stage object."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and isinstance(doc.get(META_KEY), dict)


def _build(task_id: str, listing: _Listing, data: Mapping[str, bytes]) -> TaskRecord | None:
    """Assemble a task from its listing and the bytes read; None if it is not a task."""
    stages: list[StoredStage] = []
    problems: list[str] = []
    rejected: list[str] = []
    claimed = False
    for name in listing.candidates:
        raw = data.get(name)
        if raw is None:  # deleted between the listing and the read
            continue
        parsed = parse_stage_object(task_id, name, raw)
        if isinstance(parsed, StoredStage):
            stages.append(parsed)
            continue
        rejected.append(name)
        claimed = claimed or _claims_checkmate(raw)
        problems.append(f"object {name!r} is not a valid stage object: {parsed}")
    lock = None
    if listing.lock is not None and listing.lock in data:  # absent: released since the listing
        lock = LockInfo.from_bytes(listing.lock, data[listing.lock])
    if not (stages or claimed or lock is not None or listing.cancel):
        return None
    stages.sort(key=lambda s: s.position)
    counts = {s.model.checkmate.stage_count for s in stages}
    stage_count = max(counts) if counts else 0
    if len(counts) > 1:
        problems.append(f"its stage objects disagree on the number of stages ({sorted(counts)})")
    positions = [s.position for s in stages]
    if len(set(positions)) != len(positions):
        problems.append("two stage objects claim the same position")
    names = [s.stage_name for s in stages]
    if len(set(names)) != len(names):
        problems.append("two stage objects have the same stage name")
    if not problems and len(stages) == stage_count:
        bad = find_invalid_pair([s.status for s in stages])
        if bad is not None:
            problems.append(
                f"impossible state: stage {names[bad]!r} is {stages[bad].status} but the stage "
                f"before it, {names[bad - 1]!r}, is {stages[bad - 1].status}"
            )
    return TaskRecord(
        task_id=task_id,
        stages=tuple(stages),
        lock=lock,
        lock_markers=tuple(listing.markers),
        cancel_requested=listing.cancel,
        problems=tuple(problems),
        rejected=tuple(rejected),
        others=tuple(listing.others),
        stage_count=stage_count,
    )


def _read_groups(io: TaskIO, groups: Mapping[str, _Listing]) -> list[TaskRecord]:
    wanted: list[str] = []
    for listing in groups.values():
        wanted.extend(listing.candidates)
        if listing.lock is not None:
            wanted.append(listing.lock)
    data = io.read_many(wanted) if wanted else {}
    records = []
    with _gc_paused():
        for task_id in sorted(groups):
            record = _build(task_id, groups[task_id], data)
            if record is not None:
                records.append(record)
    return records


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while many objects are parsed.

    Parsing creates many container objects but no reference cycles; the
    collections they trigger, each over a growing heap, cost twice as much
    as the parsing itself on 10,000 tasks.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def scan_store(io: TaskIO, task_ids: Collection[str] | None = None) -> list[TaskRecord]:
    """Read every task of a store (or only ``task_ids``) with two storage calls.

    One ``io.list("")`` finds every object; one ``io.read_many`` reads every
    stage object and lock object (skipped when there is nothing to read).
    A top-level folder is a task when it holds a stage object (valid, or at
    least carrying a ``checkmate`` member), a lock or a cancellation request;
    other folders are not checkmate's and are ignored.

    Args:
        io: The store.
        task_ids: Restrict the result to these tasks.

    Returns:
        The tasks, sorted by id.
    """
    only = None if task_ids is None else set(task_ids)
    return _read_groups(io, _group(io.list(""), only))


def load_task(io: TaskIO, task_id: str) -> TaskRecord | None:
    """Read one task with two storage calls (a listing of its prefix, one batched read).

    Raises:
        ConfigurationError: ``task_id`` is not a valid task id.

    Returns:
        The task, or None when the store holds no such task.
    """
    check_task_id(task_id)
    groups = _group(io.list(task_prefix(task_id)), {task_id})
    records = _read_groups(io, groups)
    return records[0] if records else None


def require_task(io: TaskIO, task_id: str) -> TaskRecord:
    """`load_task`, raising `TaskNotFoundError` where the store has no such task."""
    record = load_task(io, task_id)
    if record is None:
        raise TaskNotFoundError(f"no task {task_id!r} in {io!r}", task_id=task_id)
    return record
