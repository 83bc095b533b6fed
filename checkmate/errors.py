"""The exceptions checkmate raises on purpose.

Every error the engine raises deliberately derives from `TaskEngineException`,
so one ``except TaskEngineException`` catches them all. Each carries the task,
stage and object it concerns (when known) as attributes, and its message says
what to do next. Where a builtin fits, the error subclasses it too, so existing
handlers keep working::

    TaskEngineException
    ├── ConfigurationError (also ValueError)   bad arguments, ids, names, templates
    ├── StateSerializationError (also TypeError) a state holds a value JSON cannot hold
    ├── BindException                          the task's lock could not be taken
    │   └── LockUnsupportedError               the store cannot provide an atomic lock
    ├── TaskStateError                         the operation does not fit the task's state
    │   ├── StateMismatchError                 persisted stages differ from the templates
    │   ├── InterruptedStageError              a stage was left RUNNING by a dead process
    │   └── StageFailedError                   a stage ended in ERROR
    ├── LeaseLostError                         another worker took the task over; stop
    ├── VersionConflict                        a conditional write found another version
    ├── CorruptStateError                      a persisted object cannot be parsed or validated
    └── StorageError (also OSError)            a storage call failed
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BindException",
    "ConfigurationError",
    "CorruptStateError",
    "InterruptedStageError",
    "LeaseLostError",
    "LockUnsupportedError",
    "StageFailedError",
    "StateMismatchError",
    "StateSerializationError",
    "StorageError",
    "TaskEngineException",
    "TaskStateError",
    "VersionConflict",
]


class TaskEngineException(Exception):
    """Base of every error the engine raises on purpose.

    Attributes:
        message: The human-readable explanation, including what to do.
        task_id: The task concerned, if known.
        stage_name: The stage concerned, if known.
        obj_name: The storage object concerned, if known.
    """

    def __init__(
        self,
        message: str,
        *,
        task_id: str | None = None,
        stage_name: str | None = None,
        obj_name: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.task_id = task_id
        self.stage_name = stage_name
        self.obj_name = obj_name

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only fields would be lost by the default pickling of exceptions;
        # errors must travel intact between worker processes.
        return (
            _rebuild,
            (type(self), self.message, self.task_id, self.stage_name, self.obj_name),
            self.__dict__,
        )


def _rebuild(
    cls: type[TaskEngineException],
    message: str,
    task_id: str | None,
    stage_name: str | None,
    obj_name: str | None,
) -> TaskEngineException:
    err = cls.__new__(cls)
    TaskEngineException.__init__(
        err, message, task_id=task_id, stage_name=stage_name, obj_name=obj_name
    )
    return err


class ConfigurationError(TaskEngineException, ValueError):
    """An argument, task id, stage name or stage template is invalid.

    Raised before anything is written to storage.
    """


class StateSerializationError(TaskEngineException, TypeError):
    """A stage's state holds a value that cannot be saved as JSON.

    Raised by a run that produced such a value, it counts as a failure of that
    run (rolled back, retried per the policy).
    """


class BindException(TaskEngineException):
    """The task's lock could not be acquired (held by another owner, or unreadable)."""


class LockUnsupportedError(BindException):
    """The storage backend has no atomic create-if-absent, so it cannot hold a lock.

    Use a backend with conditional writes, or pass ``no_lock=True`` when only one
    process can ever run the task.
    """


class TaskStateError(TaskEngineException):
    """The requested operation does not fit the task's current state."""


class StateMismatchError(TaskStateError):
    """The persisted stages differ from the engine's templates (names, classes or order)."""


class InterruptedStageError(TaskStateError):
    """A stage was found RUNNING: the process that ran it died inside it.

    Run again with ``execute(strict_recovery=True)`` to roll the stage back and
    retry it (this needs a retry policy with attempts to spare).
    """


class StageFailedError(TaskStateError):
    """A stage ended in ERROR; ``__cause__`` is the stage's last exception, if any."""


class LeaseLostError(TaskEngineException):
    """This worker lost the task's lease: it was taken over, or could not be renewed in time.

    The engine stops at once and writes nothing more. Another worker owns the
    task now; do not retry in this process.
    """


class VersionConflict(TaskEngineException):
    """A conditional write or delete found a version other than the expected one."""


class CorruptStateError(TaskEngineException):
    """A persisted object is not valid JSON or fails validation. It is left untouched."""


class StorageError(TaskEngineException, OSError):
    """A storage call failed; ``__cause__`` is the backend's error."""
