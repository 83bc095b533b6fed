"""What a batch run reports: each task's `TaskResult` and the `BatchSummary`."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ..models import StageStatus

__all__ = ["BatchInterrupted", "BatchSummary", "TaskOutcome", "TaskResult"]


class TaskOutcome(str, Enum):
    """How a task of a batch ended (`TaskResult.outcome`)."""

    COMPLETE = "complete"
    """The task is COMPLETE (now, or it already was)."""
    CANCELED = "canceled"
    """The task is CANCELED (someone canceled it)."""
    FAILED = "failed"
    """A stage ended in ERROR: the task will not run again (not retried)."""
    NEEDS_RECOVERY = "needs_recovery"
    """A stage was found RUNNING after a crash and ``strict_recovery`` was off."""
    ERROR = "error"
    """The task could not be run: the factory or the store failed, its state is
    corrupt or does not match the stages, or its worker kept dying."""
    HELD = "held"
    """Another worker still held the task when the batch gave up on it
    (``hold_timeout``) or was interrupted."""
    INTERRUPTED = "interrupted"
    """The task was running when the batch was interrupted; it is resumable."""
    NOT_RUN = "not_run"
    """The batch stopped before the task ran."""

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class TaskResult:
    """What happened to one task of a batch.

    Attributes:
        task_id: The task.
        outcome: How it ended.
        status: The task's status as its last run saw it (COMPLETE, ERROR,
            ...); None when no run got that far (held, not run, factory error).
        attempts: How many times the task was handed to a worker (each skip
            while it was held counts).
        stage_attempts: The engine's attempts of all stages together, as the
            last run saw them (`CheckMateEngine.cumulative_attempts`), or None.
        held: How many times it was found held by another worker.
        error: The error message, for any outcome but COMPLETE.
        error_type: The error's class name.
        started_at: When its first run started (seconds since the epoch), or None.
        finished_at: When its last run ended (seconds since the epoch), or None.
        run_seconds: Seconds spent in workers, all runs together.
        worker: ``host:pid`` of the worker of its last run, or None.
    """

    task_id: str
    outcome: TaskOutcome
    status: StageStatus | None = None
    attempts: int = 0
    stage_attempts: int | None = None
    held: int = 0
    error: str | None = None
    error_type: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    run_seconds: float = 0.0
    worker: str | None = None

    @property
    def ok(self) -> bool:
        """True when the task is COMPLETE."""
        return self.outcome is TaskOutcome.COMPLETE

    def to_dict(self) -> dict[str, Any]:
        """Return the result as plain JSON-ready data."""
        return {
            "task_id": self.task_id,
            "status": self.status.value if self.status is not None else None,
            "outcome": self.outcome.value,
            "attempts": self.attempts,
            "stage_attempts": self.stage_attempts,
            "held": self.held,
            "error": self.error,
            "error_type": self.error_type,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "run_seconds": round(self.run_seconds, 6),
            "worker": self.worker,
        }


@dataclass(frozen=True)
class BatchSummary:
    """The result of `run_tasks`: one `TaskResult` per task id, in the order given.

    Attributes:
        results: The results by task id, in the order of the task ids.
        started_at: When the batch started (seconds since the epoch).
        finished_at: When it ended (seconds since the epoch).
        interrupted: True when Ctrl-C stopped it (see `BatchInterrupted`).
    """

    results: Mapping[str, TaskResult]
    started_at: float
    finished_at: float
    interrupted: bool = False

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self) -> Iterator[TaskResult]:
        return iter(self.results.values())

    def __getitem__(self, task_id: str) -> TaskResult:
        return self.results[task_id]

    @property
    def elapsed(self) -> float:
        """Seconds from start to end."""
        return self.finished_at - self.started_at

    @property
    def all_complete(self) -> bool:
        """True when every task is COMPLETE (also for an empty batch)."""
        return all(result.ok for result in self.results.values())

    @property
    def not_complete(self) -> list[TaskResult]:
        """The results of every task that is not COMPLETE, in task order."""
        return [result for result in self.results.values() if not result.ok]

    def counts(self) -> dict[TaskOutcome, int]:
        """Return how many tasks ended with each outcome (outcomes that occur only)."""
        counted: dict[TaskOutcome, int] = {}
        for result in self.results.values():
            counted[result.outcome] = counted.get(result.outcome, 0) + 1
        return counted

    def describe(self) -> str:
        """Return a one-line account, such as ``200 tasks in 12.3s: 199 complete, 1 failed``."""
        counted = self.counts()
        parts = [f"{counted[o]} {o.value.replace('_', ' ')}" for o in TaskOutcome if o in counted]
        note = " (interrupted)" if self.interrupted else ""
        return f"{len(self.results)} tasks in {self.elapsed:.1f}s{note}: " + (
            ", ".join(parts) or "nothing to do"
        )

    def to_dicts(self) -> list[dict[str, Any]]:
        """Return every result as JSON-ready data, in task order."""
        return [result.to_dict() for result in self.results.values()]


class BatchInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped `run_tasks`; ``summary`` holds what was done (a partial `BatchSummary`).

    It is a `KeyboardInterrupt`, so a program that does not catch it stops as
    on any Ctrl-C. Every task is resumable: run the batch again.
    """

    def __init__(self, summary: BatchSummary) -> None:
        super().__init__(f"batch interrupted: {summary.describe()}")
        self.summary = summary

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.summary,))
