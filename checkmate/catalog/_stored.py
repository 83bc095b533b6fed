"""What a stored stage object is, read generically: its models and its parser."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..codec import FORMAT_VERSION, META_KEY, check_history
from ..errors import TaskEngineException
from ..models import STAGE_NAME_MAX_LENGTH, BaseStageState, StageStateHistoryEntry, StageStatus
from ..naming import stage_obj_name

__all__ = [
    "LockRefusedError",
    "StageDocument",
    "StageObjectMeta",
    "StoredStage",
    "StoredState",
    "TaskNotFoundError",
    "parse_stage_object",
]


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


# ---------------------------------------------------------------------- reading


def parse_ts(text: str) -> datetime | None:
    """An ISO 8601 timestamp as an aware datetime (UTC if it has no zone); None if invalid."""
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
