"""Data models: stage statuses, retry policies, stage state and its history.

These are the persisted vocabulary of checkmate. A stage's state is a Pydantic
model derived from `BaseStageState`; it is stored as JSON under its own field
names so that any tool can read it without the user's classes.
"""

from __future__ import annotations

import operator
from enum import Enum
from typing import Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ACTIVE_STATES",
    "CANCELABLE_STATES",
    "INACTIVE_STATES",
    "STAGE_NAME_MAX_LENGTH",
    "STAGE_RESULT",
    "BaseStageState",
    "RecordStatus",
    "RetryPolicy",
    "SimpleRecordsResult",
    "StageStateHistoryEntry",
    "StageStatus",
]

STAGE_NAME_MAX_LENGTH = 150
"""The longest stage name allowed, in characters."""


class StageStatus(str, Enum):
    """The lifecycle status of a stage (and, aggregated, of a task).

    Each value is its name as a string, which is how it is persisted.
    """

    UNBOUND = "UNBOUND"
    """Not yet bound to an engine (never persisted)."""
    CREATED = "CREATED"
    """Bound and persisted, not started."""
    RUNNING = "RUNNING"
    """``execute_stage`` is running (or its process died inside it)."""
    RETRY = "RETRY"
    """The last run failed and the stage will run again."""
    ERROR = "ERROR"
    """The stage failed and will not run again."""
    COMPLETE = "COMPLETE"
    """The stage finished successfully; it never runs again."""
    CANCELED = "CANCELED"
    """The task was canceled before this stage could finish."""

    # The member's value without Enum's Python-level descriptor: pydantic reads it
    # for every status it serialises.
    value = property(operator.attrgetter("_value_"))

    def __str__(self) -> str:
        return str(self._value_)


class RetryPolicy(str, Enum):
    """How failed stages are retried."""

    NONE = "NONE"
    """No retries: the first failure ends the task (``max_attempts`` must be 1)."""
    STAGE = "STAGE"
    """Each stage may run up to ``max_attempts`` times."""
    GLOBAL = "GLOBAL"
    """All stages together may run ``max_attempts`` times, successful runs included."""

    def __str__(self) -> str:
        return self.value


class RecordStatus(str, Enum):
    """Outcome of processing one record, for stages that handle records."""

    SUCCESS = "success"
    ERROR = "error"
    UNPROCESSED = "unprocessed"

    def __str__(self) -> str:
        return self.value


ACTIVE_STATES = frozenset({StageStatus.CREATED, StageStatus.RUNNING, StageStatus.RETRY})
"""Statuses of a stage that still has work to do."""

CANCELABLE_STATES = frozenset(
    {StageStatus.UNBOUND, StageStatus.CREATED, StageStatus.RUNNING, StageStatus.RETRY}
)
"""Statuses from which a stage may be canceled."""

INACTIVE_STATES = frozenset({StageStatus.COMPLETE, StageStatus.CANCELED, StageStatus.ERROR})
"""Final statuses: a stage in one of them never runs again."""


class StageStateHistoryEntry(BaseModel):
    """One status change of a stage, as recorded in its history (immutable)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    attempt: int = Field(..., ge=0, title="Attempt")
    """The stage's attempt number when the change happened."""
    begin_status: StageStatus = Field(..., title="Begin Status")
    """The status before the change."""
    end_status: StageStatus = Field(..., title="End Status")
    """The status after the change."""
    begin_ts: str = Field(..., title="Start Timestamp")
    """ISO-8601 time (with offset, in the stage's timezone) the change began."""
    end_ts: str = Field(..., title="End Timestamp")
    """ISO-8601 time (with offset, in the stage's timezone) the change ended."""
    message: str = Field(..., title="Message")
    """What happened, in words."""
    run_time_seconds: float = Field(..., title="Run Time")
    """Seconds between ``begin_ts`` and ``end_ts``."""


STAGE_RESULT = TypeVar("STAGE_RESULT", bound=BaseModel)
"""Type variable for the result model of a stage."""


class BaseStageState(BaseModel, Generic[STAGE_RESULT]):
    """Base class of every stage's state.

    Subclass it with your own fields (give them defaults); the engine manages
    ``task_id``, ``stage_name``, ``status``, ``attempts`` and ``history``.
    Put what the task produces in ``result``: `CheckMateEngine.task_result`
    returns the ``result`` of the last COMPLETE stage.

    Example:
        ```python
        class Counts(BaseModel):
            rows: int = 0

        class EtlState(BaseStageState[Counts]):
            input_path: str = ""
        ```
    """

    model_config = ConfigDict(
        extra="forbid",
        strict=False,
        arbitrary_types_allowed=False,
        ser_json_inf_nan="constants",  # NaN and Infinity survive a round trip
    )

    task_id: str = Field(default="", title="Task ID")
    """The task this state belongs to (set at bind)."""
    stage_name: str = Field(default="", max_length=STAGE_NAME_MAX_LENGTH, title="Stage Name")
    """The stage this state belongs to (set at bind)."""
    status: StageStatus = Field(default=StageStatus.UNBOUND, title="Stage Status")
    """The stage's current status."""
    attempts: int = Field(default=0, ge=0, title="Run attempts")
    """How many times the stage has started running (0: never)."""
    history: list[StageStateHistoryEntry] = Field(default_factory=list, title="History")
    """Every status change of the stage, oldest first."""
    result: STAGE_RESULT | None = Field(default=None, title="Result")
    """What the stage produced; None until it completes."""


class SimpleRecordsResult(BaseModel):
    """A small result model with record counts, handy as a stage result."""

    model_config = ConfigDict(extra="forbid")

    total_count: int = Field(default=0, ge=0, title="Total Count")
    """Number of records seen."""
    success_count: int = Field(default=0, ge=0, title="Success Count")
    """Number of records processed successfully."""
    fail_count: int = Field(default=0, ge=0, title="Fail Count")
    """Number of records that failed."""
    unprocessed_count: int = Field(default=0, ge=0, title="Unprocessed Count")
    """Number of records not processed."""
    message: str | None = Field(default=None, title="Message")
    """A free-form summary."""
