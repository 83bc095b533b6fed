"""A task's stages and history as text, for the command line."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pydantic_core
from colorama import Style

from ..models import StageStateHistoryEntry
from ..render import StageView, render_stages
from ..storage import TaskIO
from ._records import TaskRecord
from ._stored import TaskNotFoundError, parse_ts

__all__ = ["HistoryRow", "history_rows", "render_task"]


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
        return parse_ts(self.entry.end_ts)


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
