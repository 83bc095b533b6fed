"""checkmate: a checkpointing multi-stage pipeline engine.

Write a pipeline as `BaseStage` subclasses with typed Pydantic states, run it
with `CheckMateEngine`, and resume it after a crash by running the same task id
again. Every status change is persisted through a `TaskIO`. Run many tasks at
once, on any executor, with `run_tasks`.
"""

from .batch import BatchSummary, EngineFactory, TaskOutcome, TaskResult, run_tasks
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
from .storage import FsspecTaskIO, LocalTaskIO, TaskIO

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
