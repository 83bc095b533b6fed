"""checkmate: a checkpointing multi-stage pipeline engine.

Write a pipeline as `BaseStage` subclasses with typed Pydantic states, run it
with `CheckMateEngine`, and resume it after a crash by running the same task id
again. Every status change is persisted through a `TaskIO`. Run many tasks at
once, on any executor, with `run_tasks`.
"""

import typing as _typing

from ._lazy import lazy_attributes as _lazy_attributes
from .cancellation import cancel_requested, request_cancel, withdraw_cancel
from .engine import STAGE, CheckMateEngine, TaskEngineState
from .errors import (
    BindException,
    ConfigurationError,
    CorruptStateError,
    InterruptedStageError,
    LeaseLostError,
    LockUnsupportedError,
    StageFailedError,
    StateMismatchError,
    StateSerializationError,
    StorageError,
    TaskEngineException,
    TaskStateError,
    VersionConflict,
)
from .locking import BindLock, LockOwner
from .models import (
    ACTIVE_STATES,
    CANCELABLE_STATES,
    INACTIVE_STATES,
    STAGE_NAME_MAX_LENGTH,
    STAGE_RESULT,
    BaseStageState,
    RecordStatus,
    RetryPolicy,
    SimpleRecordsResult,
    StageStateHistoryEntry,
    StageStatus,
)
from .retry import StorageRetry
from .stage import STAGE_STATE, BaseStage
from .storage.base import TaskIO

if _typing.TYPE_CHECKING:
    from .batch import BatchSummary, EngineFactory, TaskOutcome, TaskResult, run_tasks
    from .storage.fsspec_io import FsspecTaskIO
    from .storage.local import LocalTaskIO

__version__ = "0.1.0"

__all__ = [
    "ACTIVE_STATES",
    "BaseStage",
    "BaseStageState",
    "BatchSummary",
    "BindException",
    "BindLock",
    "CANCELABLE_STATES",
    "CheckMateEngine",
    "ConfigurationError",
    "CorruptStateError",
    "EngineFactory",
    "FsspecTaskIO",
    "INACTIVE_STATES",
    "InterruptedStageError",
    "LeaseLostError",
    "LocalTaskIO",
    "LockOwner",
    "LockUnsupportedError",
    "RecordStatus",
    "RetryPolicy",
    "STAGE",
    "STAGE_NAME_MAX_LENGTH",
    "STAGE_RESULT",
    "STAGE_STATE",
    "SimpleRecordsResult",
    "StageFailedError",
    "StageStateHistoryEntry",
    "StageStatus",
    "StateMismatchError",
    "StateSerializationError",
    "StorageError",
    "StorageRetry",
    "TaskEngineException",
    "TaskEngineState",
    "TaskIO",
    "TaskOutcome",
    "TaskResult",
    "TaskStateError",
    "VersionConflict",
    "cancel_requested",
    "request_cancel",
    "run_tasks",
    "withdraw_cancel",
    "__version__",
]

# Loaded on first use: the batch runner (multiprocessing, executors) and the
# concrete stores (fsspec) cost more to import than the rest of the package.
_LAZY = {
    "BatchSummary": "batch",
    "EngineFactory": "batch",
    "TaskOutcome": "batch",
    "TaskResult": "batch",
    "run_tasks": "batch",
    "FsspecTaskIO": "storage.fsspec_io",
    "LocalTaskIO": "storage.local",
}


if not _typing.TYPE_CHECKING:  # mypy sees the imports above, not an Any-typed __getattr__
    __getattr__, __dir__ = _lazy_attributes(__name__, _LAZY, globals())
