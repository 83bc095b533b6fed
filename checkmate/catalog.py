"""Read, render, cancel and delete tasks generically, without the user's stage classes.

Every stage object carries enough to be understood on its own: a ``checkmate``
member (format, stage class, position, stage count), the stage's name and its
state with ``task_id``, ``stage_name``, ``status``, ``attempts`` and
``history``. This module validates exactly that much with permissive Pydantic
models (user fields are kept as they are) and never imports user code. It is
what the ``checkmate`` command line tool is built on.

Both kinds of task lock are understood (see `LockInfo`): a lock object,
and a lease, whose object stays (released, keeping its epoch) after use.

Storage calls are few and batched:

- `scan_store` (``checkmate ls``) makes **two** `TaskIO` calls whatever the
  number of tasks: one ``io.list("")`` and one ``io.read_many(...)`` for every
  stage object and lock object found (none when the store is empty). On
  fsspec backends ``read_many`` is one batched fetch; `LocalTaskIO` reads the
  files one after another inside that call.
- `load_task` makes two calls for one task: ``io.list("<task_id>/")`` and one
  ``io.read_many``.

Example:
    ```python
    from checkmate import LocalTaskIO
    from checkmate.catalog import load_task, render_task, scan_store

    io = LocalTaskIO("state")
    for record in scan_store(io):
        print(record.task_id, record.status)
    record = load_task(io, "nightly-2026-11-22")
    if record is not None:
        print(render_task(io, record))
    ```
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import json
import logging
import time
import uuid
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pydantic_core
from colorama import Style
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import locking as _locking
from .codec import FORMAT_VERSION, META_KEY, check_history
from .errors import (
    BindException,
    ConfigurationError,
    TaskEngineException,
    TaskStateError,
    VersionConflict,
)
from .locking import BindLock, LockOwner
from .models import (
    CANCELABLE_STATES,
    STAGE_NAME_MAX_LENGTH,
    BaseStageState,
    StageStateHistoryEntry,
    StageStatus,
)
from .naming import (
    STAGE_SUFFIX,
    cancel_obj_name,
    check_task_id,
    lock_obj_name,
    stage_obj_name,
    task_prefix,
)
from .render import StageView, render_stages
from .storage import FsspecTaskIO, LocalTaskIO, TaskIO
from .transitions import aggregate_status, find_invalid_pair

__all__ = [
    "CLI_CANCEL_MESSAGE",
    "CancelOutcome",
    "CleanOutcome",
    "HistoryRow",
    "LockInfo",
    "LockRefusedError",
    "LockState",
    "StageDocument",
    "StageObjectMeta",
    "StoredStage",
    "StoredState",
    "TaskNotFoundError",
    "TaskRecord",
    "UnlockOutcome",
    "cancel_task",
    "delete_task",
    "history_rows",
    "load_task",
    "open_store",
    "parse_stage_object",
    "remove_lock",
    "render_task",
    "scan_store",
]

logger = logging.getLogger(__name__)

CLI_CANCEL_MESSAGE = "task canceled from the CLI"
"""The history message of a stage canceled at once by `cancel_task`."""

LEASE_SKEW = float(getattr(_locking, "DEFAULT_LOCK_SKEW", 5.0))
"""Seconds past ``expires_at`` before a lease counts as expired (the engine's clock-skew margin)."""

_LOCK_BASENAME = lock_obj_name("t").partition("/")[2]
_CANCEL_BASENAME = cancel_obj_name("t").partition("/")[2]


# ---------------------------------------------------------------------- errors


class TaskNotFoundError(TaskEngineException):
    """The store holds no task (or no stage) of that name."""


class LockRefusedError(TaskEngineException):
    """The operation was refused because the task is (or may be) locked by a live process."""


# ---------------------------------------------------------------------- models


class StageObjectMeta(BaseModel):
    """The ``checkmate`` member of a stage object."""

    model_config = ConfigDict(extra="allow", frozen=True)

    format: Literal[1]
    """Version of the stage object format."""
    stage_class: str
    """``module.QualName`` of the stage class that wrote the object."""
    position: int = Field(ge=0)
    """The stage's index in its task."""
    stage_count: int = Field(ge=1)
    """How many stages the task has."""


class StoredState(BaseStageState[Any]):
    """A persisted stage state: the engine's fields validated, user fields kept as they are."""

    model_config = ConfigDict(extra="allow")


class StageDocument(BaseModel):
    """A persisted stage object, validated without the user's stage class."""

    model_config = ConfigDict(extra="allow")

    checkmate: StageObjectMeta
    """The format metadata."""
    stage_name: str = Field(min_length=1, max_length=STAGE_NAME_MAX_LENGTH)
    """The stage's name."""
    description: str = ""
    """The stage's description."""
    timezone: str = "UTC"
    """The IANA time zone of the stage's history timestamps."""
    state: StoredState
    """The stage's state."""


@dataclass(frozen=True)
class StoredStage:
    """One stage object as found in the store.

    Attributes:
        obj_name: The object's name.
        data: The object's bytes.
        model: The validated view of the object.
    """

    obj_name: str
    data: bytes = field(repr=False)
    model: StageDocument

    @functools.cached_property
    def doc(self) -> dict[str, Any]:
        """The JSON document exactly as stored (key order and user fields kept)."""
        doc = json.loads(self.data)
        assert isinstance(doc, dict)
        return doc

    @property
    def stage_name(self) -> str:
        """The stage's name."""
        return self.model.stage_name

    @property
    def status(self) -> StageStatus:
        """The stage's status."""
        return self.model.state.status

    @property
    def position(self) -> int:
        """The stage's index in its task."""
        return self.model.checkmate.position

    @property
    def attempts(self) -> int:
        """How many times the stage has started running."""
        return self.model.state.attempts

    @property
    def history(self) -> list[StageStateHistoryEntry]:
        """The stage's history, oldest first."""
        return self.model.state.history


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
        acquired = _parse_ts(self.owner.acquired_at)
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
                moment = _parse_ts(entry.end_ts)
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


# ---------------------------------------------------------------------- reading


def _parse_ts(text: str) -> datetime | None:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment


def parse_stage_object(task_id: str, obj_name: str, data: bytes) -> StoredStage | str:
    """Parse and validate one stage object generically.

    Args:
        task_id: The task the object should belong to.
        obj_name: The object's name (it must be the name the engine gives the stage).
        data: The object's bytes.

    Returns:
        The stage, or the reason why the bytes are not a valid stage object of the task.
    """
    try:
        # One pass in pydantic-core: much faster than json.loads + validation.
        model = StageDocument.model_validate_json(data)
    except (ValidationError, ValueError, RecursionError) as exc:
        return _rejection(data, exc)
    state = model.state
    if model.checkmate.position >= model.checkmate.stage_count:
        return f"position {model.checkmate.position} is not below the stage count"
    if stage_obj_name(task_id, model.stage_name) != obj_name:
        return f"it holds stage {model.stage_name!r}, whose object name is not {obj_name!r}"
    if state.task_id != task_id or state.stage_name != model.stage_name:
        return f"its state belongs to task {state.task_id!r}, stage {state.stage_name!r}"
    if state.status is StageStatus.UNBOUND:
        return "a persisted stage cannot be UNBOUND"
    problem = check_history(state)
    if problem is not None:
        return problem
    return StoredStage(obj_name=obj_name, data=data, model=model)


def _rejection(data: bytes, exc: Exception) -> str:
    """Say why bytes that failed validation are not a stage object."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as err:
        return f"not valid JSON ({err})"
    if not isinstance(doc, dict):
        return "not a JSON object"
    meta = doc.get(META_KEY)
    if not isinstance(meta, dict):
        return f"no {META_KEY!r} member: not a checkmate stage object"
    if meta.get("format") != FORMAT_VERSION:
        return f"unsupported format {meta.get('format')!r} (this version reads {FORMAT_VERSION})"
    reason = " ".join(str(exc).split())
    return f"fails validation ({reason})"


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


def _require(io: TaskIO, task_id: str) -> TaskRecord:
    record = load_task(io, task_id)
    if record is None:
        raise TaskNotFoundError(f"no task {task_id!r} in {io!r}", task_id=task_id)
    return record


# ---------------------------------------------------------------------- rendering


def _state_json(state: Any) -> str:
    # pydantic_core formats values exactly as the engine's model_dump_json does
    # (json.dumps differs on floats such as 5e-05 and on non-ASCII text).
    return pydantic_core.to_json(state, indent=2).decode()


def render_task(
    io: TaskIO, record: TaskRecord, *, color: str = "", stage_name: str | None = None
) -> str:
    """Render a task as Markdown, exactly as ``engine.dump_stages("persistence")`` does.

    The result equals ``engine.dump_stages("persistence", color=color,
    basenames_only=False)`` of an engine with the task's stages on the same
    store (stages with no persisted object, which only a bind cut short can
    leave, are left out: their names are not known without the user's classes).

    Args:
        io: The store (object URLs come from it).
        record: The task.
        color: ANSI color prefix for headings; ``""`` for plain text.
        stage_name: Render only this stage's section (after the task heading).

    Raises:
        TaskNotFoundError: ``stage_name`` is not a stage of the task.
    """
    views = [
        StageView(
            stage_name=stage.stage_name,
            status=str(stage.status),
            location=io.url(stage.obj_name),
            state_json=_state_json(stage.doc["state"]),
        )
        for stage in record.stages
    ]
    text = render_stages(record.task_id, views, color=color)
    if stage_name is None:
        return text
    names = [view.stage_name for view in views]
    if stage_name not in names:
        raise TaskNotFoundError(
            f"task {record.task_id!r} has no stage {stage_name!r} (its stages: "
            f"{', '.join(repr(n) for n in names)})",
            task_id=record.task_id,
            stage_name=stage_name,
        )
    # Cut the full rendering at the stage headings, so the section is byte for
    # byte the one dump_stages shows (headings cannot occur inside the JSON
    # blocks: JSON strings hold no raw line breaks).
    total = len(views)
    starts: list[int] = []
    offset = 0
    for index, view in enumerate(views, start=1):
        marker = "\n" + _heading(color, f"## Stage {index}/{total}: {view.stage_name}") + "\n"
        offset = text.index(marker, offset) + 1
        starts.append(offset)
    position = names.index(stage_name)
    if position + 1 < total:
        section = text[starts[position] : starts[position + 1] - 1]
    else:
        section = text[starts[position] :]
    return text[: starts[0]] + section


def _heading(color: str, text: str) -> str:
    reset = Style.RESET_ALL if color else ""
    return f"{color}{text}{reset}"


@dataclass(frozen=True)
class HistoryRow:
    """One history entry of one stage, for a task-wide history in time order."""

    stage_name: str
    position: int
    index: int
    entry: StageStateHistoryEntry

    @property
    def at(self) -> datetime | None:
        """When the change happened (the entry's ``end_ts``), if it parses."""
        return _parse_ts(self.entry.end_ts)


def history_rows(record: TaskRecord) -> list[HistoryRow]:
    """Every history entry of every stage, in time order.

    Entries are ordered by when the change happened (``end_ts``); entries at the
    same moment by stage position, then by their order in the stage's history.
    Entries whose time cannot be parsed come last.
    """
    rows = [
        HistoryRow(stage.stage_name, stage.position, index, entry)
        for stage in record.stages
        for index, entry in enumerate(stage.history)
    ]
    epoch = datetime.fromtimestamp(0, timezone.utc)

    def key(row: HistoryRow) -> tuple[int, datetime, int, int]:
        moment = row.at
        return (moment is None, moment or epoch, row.position, row.index)

    return sorted(rows, key=key)


# ---------------------------------------------------------------------- cancel


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
        record = _require(io, task_id)
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
    record = _require(io, task_id)
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
        fresh = _require(io, task_id)
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
