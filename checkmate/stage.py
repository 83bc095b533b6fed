"""`BaseStage`: one step of a pipeline, with a typed, persisted state."""

from __future__ import annotations

import logging
import math
import time
from abc import ABC, abstractmethod
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import TaskEngineException, TaskStateError
from .models import STAGE_NAME_MAX_LENGTH, BaseStageState, StageStateHistoryEntry, StageStatus
from .naming import check_stage_name, stage_obj_name
from .transitions import can_transition

if TYPE_CHECKING:
    from typing_extensions import Self

    from .engine import CheckMateEngine

__all__ = ["STAGE_STATE", "BaseStage"]

logger = logging.getLogger(__name__)

STAGE_STATE = TypeVar("STAGE_STATE", bound=BaseStageState[Any])
"""Type variable for a stage's state model."""


def _iso(timestamp: float, zone: str) -> str:
    """``datetime.fromtimestamp(timestamp, ZoneInfo(zone)).isoformat()``, made faster."""
    global _last_iso  # noqa: PLW0603 - a one-entry cache
    last = _last_iso
    if last[0] == timestamp and last[1] == zone:
        return last[2]
    if zone == "UTC" and timestamp >= 0:
        text = _iso_utc(timestamp)
    else:
        text = datetime.fromtimestamp(timestamp, ZoneInfo(zone)).isoformat()
    _last_iso = (timestamp, zone, text)
    return text


def _iso_utc(timestamp: float) -> str:
    """The ISO-8601 text of a non-negative timestamp in UTC, as datetime gives it.

    The date and time of the whole second are formatted once per second.
    """
    global _utc_second  # noqa: PLW0603 - a one-entry cache
    fraction, whole = math.modf(timestamp)
    micro = round(fraction * 1e6)  # half to even, as datetime.fromtimestamp rounds
    second = int(whole)
    if micro >= 1_000_000:
        second, micro = second + 1, micro - 1_000_000
    if _utc_second[0] != second:
        _utc_second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    if micro:
        return f"{_utc_second[1]}.{micro:06d}+00:00"
    return f"{_utc_second[1]}+00:00"


_utc_second: tuple[int, str] = (-1, "")


# The last timestamp formatted: the engine formats one instant several times
# (every stage created at bind, the start of a run when it ends).
_last_iso: tuple[float, str, str] = (float("nan"), "", "")
# Time zone names known to be valid (a stage is validated at every copy).
_VALID_ZONES: set[str] = set()
_MAX_VALID_ZONES = 1024


# Per model class, the fields whose assignment is pydantic's plain one (no
# validation, nothing frozen, no custom __setattr__; empty otherwise): the
# engine's own updates of them go to the instance's __dict__, as pydantic would.
_PLAIN_FIELDS: dict[type, frozenset[str]] = {}


def _assign(model: BaseModel, name: str, value: Any) -> None:
    """``setattr(model, name, value)``, without pydantic's dispatch where it adds nothing."""
    cls = type(model)
    plain = _PLAIN_FIELDS.get(cls)
    if plain is None:
        config = cls.model_config
        fields = cls.model_fields
        simple = (
            cls.__setattr__ is BaseModel.__setattr__
            and not config.get("validate_assignment")
            and not config.get("frozen")
            and not any(f.frozen for f in fields.values())
        )
        plain = _PLAIN_FIELDS[cls] = frozenset(fields) if simple else frozenset()
    if name in plain:
        model.__dict__[name] = value
        model.__pydantic_fields_set__.add(name)
    else:
        setattr(model, name, value)


_ENTRY_FIELDS = tuple(StageStateHistoryEntry.model_fields)
_new_object = object.__new__
_set_attribute = object.__setattr__


def _history_entry(
    attempt: int,
    begin_status: StageStatus,
    end_status: StageStatus,
    begin_ts: str,
    end_ts: str,
    message: str,
    run_time_seconds: float,
) -> StageStateHistoryEntry:
    """A history entry from values made by the engine: what ``model_construct`` builds.

    The values need no validation, and every field is set, so the instance is
    built directly (several times faster than ``model_construct``).
    """
    return _construct(
        StageStateHistoryEntry,
        {
            "attempt": attempt,
            "begin_status": begin_status,
            "end_status": end_status,
            "begin_ts": begin_ts,
            "end_ts": end_ts,
            "message": message,
            "run_time_seconds": run_time_seconds,
        },
        set(_ENTRY_FIELDS),
    )


_M = TypeVar("_M", bound=BaseModel)


def _construct(
    cls: type[_M],
    values: dict[str, Any],
    fields_set: set[str],
    extra: dict[str, Any] | None = None,
    private: dict[str, Any] | None = None,
) -> _M:
    """An instance of ``cls`` holding ``values`` as they are (no validation, no copy).

    What ``model_construct`` builds, without its per-field work: for values
    that are valid already.
    """
    model = _new_object(cls)
    _set_attribute(model, "__dict__", values)
    _set_attribute(model, "__pydantic_fields_set__", fields_set)
    _set_attribute(model, "__pydantic_extra__", extra)
    _set_attribute(model, "__pydantic_private__", private)
    return model


class BaseStage(BaseModel, ABC, Generic[STAGE_STATE]):
    """One stage of a pipeline: subclass it and implement `execute_stage`.

    The stage's work reads inputs from ``previous_state_copy`` (and its own
    fields) and writes its outputs into ``self.state``. The engine persists the
    state at every status change; never change ``state.status`` yourself.

    Example:
        ```python
        class Extract(BaseStage[EtlState]):
            def execute_stage(self, previous_state_copy: EtlState) -> None:
                self.state.rows = load_rows(self.state.input_path)
        ```
    """

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    stage_name: str = Field(..., min_length=1, max_length=STAGE_NAME_MAX_LENGTH, title="Stage Name")
    """Unique name of the stage within its task; it names the stage's object."""
    description: str = Field(default="", title="Stage Description")
    """Short human-readable description."""
    state: STAGE_STATE = Field(..., title="Stage State")
    """The stage's persisted state."""
    timezone: str = Field(default="UTC", title="Timezone")
    """IANA time zone used for the timestamps in the stage's history."""
    volatile_engine_ref: Any = Field(default=None, title="Task", exclude=True, repr=False)
    """The engine the stage is bound to (set by the engine; never persisted)."""

    @field_validator("stage_name")
    @classmethod
    def _check_stage_name(cls, value: str) -> str:
        return check_stage_name(value)

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        if value in _VALID_ZONES:
            return value
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown IANA time zone {value!r}") from exc
        if len(_VALID_ZONES) < _MAX_VALID_ZONES:
            _VALID_ZONES.add(value)
        return value

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> Self:
        # A copy of a bound stage is unbound: never deep-copy the engine.
        memo = {} if memo is None else memo
        if self.volatile_engine_ref is not None:
            memo[id(self.volatile_engine_ref)] = None
        return super().__deepcopy__(memo)

    @abstractmethod
    def execute_stage(self, previous_state_copy: STAGE_STATE) -> None:
        """Do the stage's work; raise on failure.

        Args:
            previous_state_copy: For the first stage, a reference to this
                stage's own state; for later stages, a deep copy of the
                previous stage's state. Do not modify it.
        """

    def rollback_stage(self) -> None:
        """Undo partial work after `execute_stage` raised (no-op by default).

        Called before the stage is retried or marked ERROR, and when a run
        interrupted by a crash is recovered. The state persisted with RETRY or
        ERROR is the state as this method leaves it.
        """

    def cancel(self) -> None:
        """Clean up when the task is canceled while this stage is current (no-op by default)."""

    def cancel_requested(self) -> bool:
        """Tell whether the task's cancellation was requested; poll it in long work.

        Cheap to call often: storage is consulted at most every
        ``cancel_check_interval`` seconds. Return (or raise) from
        `execute_stage` to stop early; the engine then cancels the task.
        """
        return bool(self.engine.cancel_requested())

    @property
    def engine(self) -> CheckMateEngine[Any, Any]:
        """The engine this stage is bound to.

        Raises:
            TaskStateError: The stage is not bound.
        """
        engine = self.volatile_engine_ref
        if engine is None:
            raise TaskStateError(
                f"stage {self.stage_name!r} is not bound to an engine; bind the engine first",
                stage_name=self.stage_name,
            )
        return engine  # type: ignore[no-any-return]

    def bind_to_engine(self, task_engine: CheckMateEngine[Any, Any]) -> Self:
        """Bind the stage to an engine, loading its persisted state if there is one.

        Returns:
            The stage itself.

        Raises:
            TaskEngineException: The stage is already bound, or its persisted
                object is corrupt or does not match.
        """
        state = task_engine._load_stage_state(self)
        self._attach(task_engine, state)  # type: ignore[arg-type]
        return self

    def _attach(self, engine: CheckMateEngine[Any, Any], state: STAGE_STATE | None) -> None:
        if self.volatile_engine_ref is not None:
            raise TaskEngineException(
                f"stage {self.stage_name!r} is already bound to an engine",
                task_id=engine.task_id,
                stage_name=self.stage_name,
            )
        if state is not None:
            _assign(self, "state", state)
        _assign(self.state, "task_id", engine.task_id)
        _assign(self.state, "stage_name", self.stage_name)
        _assign(self, "volatile_engine_ref", engine)

    def _detach(self) -> None:
        self.volatile_engine_ref = None

    def gen_obj_name(self, engine: CheckMateEngine[Any, Any] | None = None) -> str:
        """Return the name of this stage's object for ``engine`` (default: the bound engine)."""
        task_engine = engine if engine is not None else self.engine
        return stage_obj_name(task_engine.task_id, self.stage_name)

    @property
    def obj_name(self) -> str:
        """The name of this stage's object (the stage must be bound)."""
        return self.gen_obj_name()

    @property
    def url(self) -> str:
        """The full URL of this stage's object (the stage must be bound)."""
        return str(self.engine.io.url(self.obj_name))

    def inc_attempts(self) -> int:
        """Add one to ``state.attempts`` and return the new count."""
        _assign(self.state, "attempts", self.state.attempts + 1)
        return self.state.attempts

    def persistence_file_exists(self) -> bool:
        """Tell whether this stage's object exists in the engine's store."""
        return bool(self.engine.io.exists(self.obj_name))

    def update_status(
        self,
        message: str,
        status: StageStatus,
        begin_ts: float,
        end_ts: float | None = None,
    ) -> None:
        """Change the stage's status, record it in the history and persist it.

        Appends one `StageStateHistoryEntry`, writes the stage's object, then
        calls the engine's ``state_update_hook``. If the write fails, the
        in-memory state is left as it was.

        Args:
            message: What happened, in words.
            status: The new status.
            begin_ts: When the change (or the run it concludes) began, epoch seconds.
            end_ts: When it ended, epoch seconds (default: now).

        Raises:
            TaskStateError: The status change is not allowed.
            StorageError: The stage's object could not be written.
        """
        self._record(message, status, begin_ts, end_ts)

    def _record(
        self,
        message: str,
        status: StageStatus,
        begin_ts: float,
        end_ts: float | None = None,
        *,
        refund_attempt: bool = False,
        create: bool = False,
        hold: bool = False,
    ) -> None:
        engine = self.engine
        state = self.state
        begin_status = state.status
        if not can_transition(begin_status, status):
            raise TaskStateError(
                f"stage {self.stage_name!r} of task {engine.task_id!r} cannot change "
                f"from {begin_status} to {status}",
                task_id=engine.task_id,
                stage_name=self.stage_name,
            )
        end = time.time() if end_ts is None else end_ts
        attempts = state.attempts
        zone = self.timezone
        begin_iso = _iso(begin_ts, zone)
        entry = _history_entry(
            attempts,
            begin_status,
            status,
            begin_iso,
            begin_iso if end == begin_ts else _iso(end, zone),
            message,
            max(0.0, end - begin_ts),
        )
        state.history.append(entry)
        _assign(state, "status", status)
        if refund_attempt:
            _assign(state, "attempts", max(0, attempts - 1))
        try:
            persisted = engine._persist_stage(self, create=create, hold=hold)
        except BaseException:
            state.history.pop()
            _assign(state, "status", begin_status)
            _assign(state, "attempts", attempts)
            raise
        logger.debug(
            "task %s stage %s: %s -> %s (%s)",
            engine.task_id,
            self.stage_name,
            begin_status,
            status,
            message,
        )
        if persisted:  # else the engine calls the hook once the write lands
            engine.state_update_hook(self)
