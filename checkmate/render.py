"""Markdown rendering of a task's stages, for tests, logs and the CLI."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["StageView", "render_stages"]

_RESET = "\x1b[0m"  # colorama's Style.RESET_ALL


@dataclass(frozen=True)
class StageView:
    """What is shown of one stage."""

    stage_name: str
    status: str
    location: str
    state_json: str | None
    """The state as indented JSON, or None when it has no persisted object."""


def render_stages(
    task_id: str,
    stages: Sequence[StageView],
    *,
    color: str = "",
    heading_note: str | None = None,
) -> str:
    """Render stages as Markdown: a task heading, then each stage's status, object and state.

    Args:
        task_id: The task shown in the heading.
        stages: The stages, in order.
        color: An ANSI color prefix for headings (colorama ``Fore.*``); ``""``
            for plain text with no escape codes.
        heading_note: Extra text for the task heading (such as the source).
    """
    reset = _RESET if color else ""

    def heading(text: str) -> str:
        return f"{color}{text}{reset}"

    note = f" ({heading_note})" if heading_note else ""
    lines = [heading(f"# Task {task_id}{note}"), ""]
    total = len(stages)
    for index, view in enumerate(stages, start=1):
        lines.append(heading(f"## Stage {index}/{total}: {view.stage_name}"))
        lines.append("")
        lines.append(f"- status: {view.status}")
        lines.append(f"- object: {view.location}")
        lines.append("")
        if view.state_json is None:
            lines.append("_no persisted object_")
        else:
            lines.append("```json")
            lines.append(view.state_json)
            lines.append("```")
        lines.append("")
    return "\n".join(lines)
