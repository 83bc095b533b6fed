"""`CheckMateEngine`: binds stages to a task, runs them in order, checkpoints every change.

This is the one module that coordinates stages, storage, the lock and the
state machine. The engine is not thread-safe: use one engine per thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, Field, SkipValidation

from ._copies import copy_model, copy_state, copy_with_state, round_trip
from ._task_objects import TaskObjects
from .codec import class_path
from .errors import (
    ConfigurationError,
    InterruptedStageError,
    StageFailedError,
    StateMismatchError,
    StateSerializationError,
    TaskEngineException,
    TaskStateError,
)
from .locking import DEFAULT_LOCK_SKEW, DEFAULT_LOCK_TTL, BindLock
from .models import CANCELABLE_STATES, STAGE_RESULT, BaseStageState, RetryPolicy, StageStatus
from .naming import (
    cancel_obj_name,
    check_task_id,
    lock_obj_name,
    new_task_id,
    task_prefix,
)
from .retry import StorageRetry
from .stage import BaseStage
from .storage.base import TaskIO
from .transitions import aggregate_status, find_invalid_pair

if TYPE_CHECKING:
    from .render import StageView

__all__ = ["STAGE", "CheckMateEngine", "TaskEngineState"]

logger = logging.getLogger(__name__)

STAGE = TypeVar("STAGE", bound=BaseStage[Any])
"""Type variable for the stage class of an engine."""

_S = StageStatus
_T = TypeVar("_T")
Source = Literal["memory", "persistence"]
_HEADING_COLOR = "\x1b[97m"  # colorama's Fore.LIGHTWHITE_EX, without importing colorama


class TaskEngineState(BaseModel, Generic[STAGE]):
    """The engine's templates: what a task of this engine is made of."""

    stage_template_classes: list[str] = Field(..., title="Stage Template Classes")
    """``module.QualName`` of each template's class, in order."""
    stage_templates: list[SkipValidation[STAGE]] = Field(..., title="Stage Templates")
    """Private deep copies of the stage templates, in order."""


class CheckMateEngine(Generic[STAGE, STAGE_RESULT]):
    """Run a list of stages as one resumable task.

    Bind the engine (``with engine:`` or `bind`) to take the task's lock and
    load its persisted state, then `execute`. Run the same task id again after
    a crash and the engine resumes from the first stage that is not COMPLETE.

    Args:
        io: Where the task's objects live.
        task_id: The task's id; None generates a new one (uuid4 hex).
        stage_templates: The stages, in order (copied; the originals are not touched).
        retry_policy: How failed stages are retried.
        max_attempts: The attempt budget (per stage for STAGE, for the whole
            task for GLOBAL; must be 1 for NONE).
        bind_lock_timeout: None to try the lock once; else seconds to keep trying.
        auto_cleanup: Delete all of the task's objects on unbind, whatever the outcome.
        no_lock: Take no lock (only when nothing else can run the task).
        force_create: Treat the task as new without reading state; fail if state exists.
        storage_retry: How failed storage calls are retried (default: 5 tries
            within about 1.5 s); when the last try fails the engine raises
            `StorageError` and the task stays resumable.
        lock_ttl: Lease length in seconds on stores with compare-and-swap; a
            heartbeat renews it every ``lock_ttl / 3`` seconds while bound.
        lock_skew: Clock-skew margin: an expired lease is taken over only
            ``lock_skew`` seconds after it expired.
        cancel_check_interval: Seconds between two looks for a cancellation
            request (see `checkmate.request_cancel`) while the task runs.

    Raises:
        ConfigurationError: No templates, a template that is not a stage, a
            duplicate stage name or instance, NONE with ``max_attempts != 1``,
            ``max_attempts < 1``, or an invalid task id.

    Example:
        ```python
        engine = CheckMateEngine(LocalTaskIO("state"), task_id="nightly-2026-11-22",
                                 stage_templates=[Extract(...), Load(...)],
                                 retry_policy=RetryPolicy.STAGE, max_attempts=3)
        status = engine.execute()
        ```
    """

    def __init__(
        self,
        io: TaskIO,
        task_id: str | None = None,
        stage_templates: Sequence[STAGE] | None = None,
        retry_policy: RetryPolicy = RetryPolicy.NONE,
        max_attempts: int = 1,
        bind_lock_timeout: float | None = None,
        auto_cleanup: bool = False,
        no_lock: bool = False,
        force_create: bool = False,
        *,
        storage_retry: StorageRetry | None = None,
        cancel_check_interval: float = 2.0,
        lock_ttl: float = DEFAULT_LOCK_TTL,
        lock_skew: float = DEFAULT_LOCK_SKEW,
    ) -> None:
        if not isinstance(io, TaskIO):
            raise ConfigurationError(f"io must be a TaskIO, not {type(io).__name__}")
        self.task_id: str = new_task_id() if task_id is None else check_task_id(task_id)
        templates = self._check_templates(stage_templates)
        try:
            policy = RetryPolicy(retry_policy)
        except ValueError as exc:
            raise ConfigurationError(
                f"unknown retry_policy {retry_policy!r}", task_id=self.task_id
            ) from exc
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise ConfigurationError(
                f"max_attempts must be an integer >= 1, not {max_attempts!r}", task_id=self.task_id
            )
        if policy is RetryPolicy.NONE and max_attempts != 1:
            raise ConfigurationError(
                f"retry_policy NONE allows exactly one attempt, but max_attempts={max_attempts}; "
                "use RetryPolicy.STAGE or RetryPolicy.GLOBAL to retry",
                task_id=self.task_id,
            )
        if bind_lock_timeout is not None and bind_lock_timeout < 0:
            raise ConfigurationError(
                f"bind_lock_timeout must be None or >= 0, not {bind_lock_timeout!r}",
                task_id=self.task_id,
            )
        self.io = io
        self.retry_policy = policy
        self.max_attempts = max_attempts
        self.bind_lock_timeout = bind_lock_timeout
        self.auto_cleanup = auto_cleanup
        self.no_lock = no_lock
        self.force_create = force_create
        self.storage_retry = storage_retry if storage_retry is not None else StorageRetry()
        if lock_ttl <= 0 or lock_skew < 0:
            raise ConfigurationError(
                f"lock_ttl must be > 0 and lock_skew >= 0, not {lock_ttl!r} and {lock_skew!r}",
                task_id=self.task_id,
            )
        self.lock_ttl = lock_ttl
        self.lock_skew = lock_skew
        self.task_state: TaskEngineState[STAGE] = TaskEngineState(
            stage_template_classes=[class_path(type(t)) for t in templates],
            stage_templates=templates,
        )
        self._stage_list: list[STAGE] | None = None
        self._positions: dict[int, int] = {}
        self._objects = TaskObjects(
            io, self.task_id, self.task_state.stage_templates, self.storage_retry
        )
        # A held or batched write calls the hook once it has landed.
        self._objects.persisted = self._persisted
        self._lock: BindLock | None = None
        self._bound = False
        self._keep_state = False
        self._unsynced = False
        self.cancel_check_interval = cancel_check_interval
        self._cancel_seen = False
        self._cancel_checked_at: float | None = None

    def _check_templates(self, stage_templates: Sequence[STAGE] | None) -> list[STAGE]:
        if not stage_templates:
            raise ConfigurationError(
                f"task {self.task_id!r} has no stage templates; pass at least one stage",
                task_id=self.task_id,
            )
        templates = list(stage_templates)
        seen_ids: set[int] = set()
        seen_names: set[str] = set()
        for index, template in enumerate(templates):
            if not isinstance(template, BaseStage):
                raise ConfigurationError(
                    f"stage template {index} of task {self.task_id!r} is a "
                    f"{type(template).__name__}, not a BaseStage",
                    task_id=self.task_id,
                )
            name = getattr(template, "stage_name", None)
            state = getattr(template, "state", None)
            if not isinstance(name, str):
                raise ConfigurationError(
                    f"stage template {index} of task {self.task_id!r} has no valid stage_name",
                    task_id=self.task_id,
                )
            if not isinstance(state, BaseStageState):
                raise ConfigurationError(
                    f"stage {name!r} has a state of type {type(state).__name__}, "
                    "which is not a BaseStageState",
                    task_id=self.task_id,
                    stage_name=name,
                )
            declared = type(template).model_fields["state"].annotation
            if isinstance(declared, type) and not isinstance(state, declared):
                raise ConfigurationError(
                    f"stage {name!r} declares a state of type {declared.__name__} but holds a "
                    f"{type(state).__name__}",
                    task_id=self.task_id,
                    stage_name=name,
                )
            if id(template) in seen_ids:
                raise ConfigurationError(
                    f"stage {name!r} appears twice in the templates of task {self.task_id!r}; "
                    "create one instance per stage",
                    task_id=self.task_id,
                    stage_name=name,
                )
            if name in seen_names:
                raise ConfigurationError(
                    f"stage name {name!r} is used twice in task {self.task_id!r}; "
                    "stage names must be unique",
                    task_id=self.task_id,
                    stage_name=name,
                )
            seen_ids.add(id(template))
            seen_names.add(name)
        checked = []
        for index, template in enumerate(templates):
            # Re-validate: a template built with model_construct skipped every check.
            try:
                checked.append(round_trip(template))
            except Exception as exc:  # any way the template fails to round-trip
                raise ConfigurationError(
                    f"stage template {index} ({template.stage_name!r}) of task {self.task_id!r} "
                    f"is invalid: {exc}",
                    task_id=self.task_id,
                    stage_name=template.stage_name,
                ) from exc
        return checked

    def _fresh_stages(self) -> list[STAGE]:
        return [copy_model(t) for t in self.task_state.stage_templates]

    @property
    def _stages(self) -> list[STAGE]:
        # Unbound engines make their fresh copies only when someone looks.
        if self._stage_list is None:
            self._stages = self._fresh_stages()
        assert self._stage_list is not None
        return self._stage_list

    @_stages.setter
    def _stages(self, stages: list[STAGE]) -> None:
        self._stage_list = stages
        self._positions = {id(s): i for i, s in enumerate(stages)}

    def __repr__(self) -> str:
        state = "bound" if self._bound else "unbound"
        return f"<CheckMateEngine task_id={self.task_id!r} stages={len(self._stages)} {state}>"

    # ------------------------------------------------------------------ properties

    @property
    def stages(self) -> list[STAGE]:
        """The bound stages in order; while unbound, fresh copies of the templates."""
        return self._stages

    @property
    def is_bound(self) -> bool:
        """True while the engine is bound to its task."""
        return self._bound

    @property
    def lock_obj_name(self) -> str:
        """The name of the task's lock object."""
        return lock_obj_name(self.task_id)

    @property
    def lock_epoch(self) -> int | None:
        """The lease's fencing epoch while bound under a lease, else None.

        It grows with every acquisition of the task: pass it to external
        systems so they can refuse work from a worker that lost the task.
        """
        return self._lock.epoch if self._lock is not None and self._bound else None

    @property
    def has_lockfile(self) -> bool:
        """True while a lock object exists for the task, bound or not.

        A lock object does not prove that a process still runs the task.
        """
        return self._call(
            "check",
            self.lock_obj_name,
            BindLock.is_held,
            self.io,
            self.lock_obj_name,
            self.lock_skew,
        )

    @property
    def status(self) -> StageStatus:
        """The task's overall status (from memory when bound, else from storage).

        COMPLETE when every stage is; else ERROR, CANCELED, RUNNING, RETRY or
        UNBOUND if any stage is (in that order); else CREATED.

        Raises:
            TaskStateError: Two consecutive stages are in an impossible combination.
        """
        return self._aggregate(self._view())

    @property
    def task_result(self) -> STAGE_RESULT | None:
        """The ``result`` of the last COMPLETE stage, or None if no stage is COMPLETE."""
        for stage in reversed(self._view()):
            if stage.state.status is _S.COMPLETE:
                return stage.state.result  # type: ignore[no-any-return]
        return None

    @property
    def cumulative_attempts(self) -> int:
        """The number of attempts of all stages together."""
        return self._attempts(self._view())

    # ------------------------------------------------------------------ context manager

    def __enter__(self) -> CheckMateEngine[STAGE, STAGE_RESULT]:
        self.bind()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> Literal[False]:
        if self._bound:
            self.unbind()
        return False

    # ------------------------------------------------------------------ storage helpers

    def _call(self, action: str, obj_name: str, func: Callable[..., _T], *args: Any) -> _T:
        """Run one storage call with retries; a final failure becomes a StorageError."""
        return self._objects.call(action, obj_name, func, *args)

    def _persist_stage(
        self, stage: BaseStage[Any], create: bool = False, hold: bool = False
    ) -> bool:
        """Write a stage's object (fenced under a lease); called by `BaseStage.update_status`.

        With ``hold`` the write may wait for the next one, so that both become
        durable together (see `TaskObjects.write`); `_flush_held` ends the wait.
        A write that fails may still have landed (the reply was lost): the next
        `execute` re-reads the task before it goes on.

        Returns:
            True if the caller reports the change (`state_update_hook`); False if
            it is held, batched or written with a held one (the hook is then
            called when it lands).
        """
        try:
            return self._objects.write(self._positions[id(stage)], stage, create, hold)
        except BaseException:
            self._unsynced = True
            raise

    def _persisted(self, stage: Any) -> None:
        self.state_update_hook(stage)

    def _flush_held(self) -> None:
        """Write a held stage write now (before `execute` returns or raises)."""
        try:
            self._objects.flush_held()
        except BaseException:
            self._unsynced = True
            raise

    def _resync(self) -> None:
        """Reload every stage's state from storage after a status write failed."""
        states = self._objects.read_all(versioned=self._objects.fenced)
        for stage, state in zip(self._stages, states, strict=True):
            if state is not None:
                stage.state = state
        self._unsynced = False
        logger.info("task %s: reloaded its state after a failed write", self.task_id)

    def _load_stage_state(self, stage: BaseStage[Any]) -> BaseStageState[Any] | None:
        return self._objects.read_one(self._template_position(stage.stage_name))

    def _template_position(self, stage_name: str) -> int:
        for index, template in enumerate(self.task_state.stage_templates):
            if template.stage_name == stage_name:
                return index
        raise TaskStateError(
            f"stage {stage_name!r} is not part of task {self.task_id!r}",
            task_id=self.task_id,
            stage_name=stage_name,
        )

    def _view(self) -> list[STAGE]:
        """The stages to report on: bound ones, or copies loaded from storage."""
        if self._bound:
            return self._stages
        stages = self._fresh_stages()
        for stage, state in zip(stages, self._objects.read_all(), strict=True):
            if state is not None:
                stage.state = state
        return stages

    def _aggregate(self, stages: Sequence[BaseStage[Any]]) -> StageStatus:
        return self._check_statuses([stage.state.status for stage in stages])

    def _check_statuses(self, statuses: Sequence[StageStatus]) -> StageStatus:
        bad = find_invalid_pair(statuses)
        if bad is not None:
            names = [t.stage_name for t in self.task_state.stage_templates]
            raise TaskStateError(
                f"task {self.task_id!r} is in an impossible state: stage {names[bad]!r} is "
                f"{statuses[bad]} but the stage before it, {names[bad - 1]!r}, is "
                f"{statuses[bad - 1]}; the engine changed nothing. Inspect the task's objects",
                task_id=self.task_id,
                stage_name=names[bad],
            )
        return aggregate_status(statuses)

    # ------------------------------------------------------------------ bind / unbind

    def bind(self) -> None:
        """Take the task's lock and load (or create) its persisted state.

        A new task's stages are persisted as CREATED. A bind that fails leaves
        every persisted object as it was and releases the lock.

        Raises:
            TaskStateError: Already bound, or the persisted stages are in an
                impossible combination.
            BindException: The lock is held by another owner.
            StateMismatchError: Persisted stages differ from the templates, or
                ``force_create`` found existing state.
            CorruptStateError: A persisted object is invalid.
        """
        if self._bound:
            raise TaskStateError(
                f"engine for task {self.task_id!r} is already bound", task_id=self.task_id
            )
        self._objects.defer()
        lock = None if self.no_lock else self._new_lock()
        if lock is not None:
            lock.acquire()
        stages: list[STAGE] = []
        try:
            self._lock = lock
            self._objects.attach(lock)
            if lock is not None:
                prefix = task_prefix(self.task_id)
                self._call("sweep", prefix, self.io.sweep, prefix)
            states = self._states_for_bind()
            # A stage with a persisted state gets it without a copy of the template's.
            stages = [
                copy_model(template) if state is None else copy_with_state(template, state)
                for template, state in zip(self.task_state.stage_templates, states, strict=True)
            ]
            self._check_statuses([_S.CREATED if st is None else st.status for st in states])
            self._stages = stages
            for stage, state in zip(stages, states, strict=True):
                stage._attach(self, state)
            self._bound = True
            if lock is not None and lock.needs_seal:
                self._objects.seal(self._stages)
                self._aggregate(self._stages)
            now = time.time()
            with self._objects.creating():
                for stage, state in zip(stages, states, strict=True):
                    if state is None:
                        stage._record("stage created", _S.CREATED, now, now, create=True)
        except BaseException:
            for stage in stages:
                stage._detach()
            self._reset_unbound()
            if lock is not None:
                lock.release()
            raise
        logger.info("bound task %s (%s)", self.task_id, self._aggregate(stages))

    def _new_lock(self) -> BindLock:
        return BindLock(
            self.io,
            self.lock_obj_name,
            self.bind_lock_timeout,
            lock_ttl=self.lock_ttl,
            lock_skew=self.lock_skew,
            storage_retry=self.storage_retry,
        )

    def _reset_unbound(self) -> None:
        self._stage_list = None
        self._positions = {}
        self._bound = False
        self._lock = None
        self._objects.detach()
        self._unsynced = False
        self._keep_state = False
        self._cancel_seen = False

    def _states_for_bind(self) -> list[BaseStageState[Any] | None]:
        if not self.force_create:
            return self._objects.read_all(versioned=self._objects.fenced)
        existing = self._objects.existing_for_force_create()
        if existing is not None:
            raise StateMismatchError(
                f"force_create is set but task {self.task_id!r} already has state "
                f"({existing!r}); nothing was changed. Use a new task id, or drop "
                "force_create to resume the task",
                task_id=self.task_id,
                obj_name=existing,
            )
        return [None] * len(self.task_state.stage_templates)

    def unbind(self, clean: bool = False) -> None:
        """Release the lock and return to fresh copies of the templates.

        Args:
            clean: Also delete all of the task's objects (stages and lock);
                ``auto_cleanup`` makes this the default.

        Raises:
            TaskStateError: The engine is not bound.
        """
        if not self._bound:
            raise TaskStateError(
                f"engine for task {self.task_id!r} is not bound", task_id=self.task_id
            )
        # auto_cleanup never deletes a task that execute() refused to touch, and a
        # worker that lost its lease deletes nothing.
        clean = clean or (self.auto_cleanup and not self._keep_state)
        lock = self._lock
        compact = not clean and (lock is None or not lock.lost)
        try:
            if clean:
                if lock is not None:
                    lock.check()
                self._objects.delete_all(locked=lock is not None)
        finally:
            for stage in self._stages:
                stage._detach()
            self._reset_unbound()
            if lock is not None:
                lock.release(delete=clean)
        if compact:  # after the release, so that the lock's last write is folded in too
            self._objects.compact()
        logger.info(
            "unbound task %s%s",
            self.task_id,
            " and deleted its objects" if clean else "",
        )

    # ------------------------------------------------------------------ execution

    def execute(self, strict_recovery: bool = False) -> StageStatus:
        """Run the task from its first stage that is not COMPLETE.

        Binds for the call if the engine is not bound (and unbinds after).

        Args:
            strict_recovery: When a stage is found RUNNING (its process died),
                roll it back and retry it instead of raising.

        Returns:
            The task's final status: COMPLETE, or CANCELED for a canceled task.

        Raises:
            StageFailedError: A stage ended in ERROR (now or before); its
                ``__cause__`` is the stage's last exception.
            InterruptedStageError: A stage was found RUNNING and
                ``strict_recovery`` is False; nothing was changed.
        """
        if not self._bound:
            with self:
                return self._execute_and_flush(strict_recovery)
        return self._execute_and_flush(strict_recovery)

    def _execute_and_flush(self, strict_recovery: bool) -> StageStatus:
        try:
            return self._execute(strict_recovery)
        finally:
            self._flush_held()

    def _execute(self, strict_recovery: bool) -> StageStatus:
        if self._unsynced:
            self._resync()
        status = self._aggregate(self._stages)
        if status in (_S.COMPLETE, _S.CANCELED):
            return status
        if status is _S.ERROR:
            failed = next(s for s in self._stages if s.state.status is _S.ERROR)
            self._keep_state = True
            raise self._failure(failed, None)
        running = next((s for s in self._stages if s.state.status is _S.RUNNING), None)
        if running is not None and not strict_recovery:
            self._keep_state = True
            raise InterruptedStageError(
                f"stage {running.stage_name!r} of task {self.task_id!r} was interrupted: it is "
                f"RUNNING (attempt {running.state.attempts}) but no process runs it. Nothing was "
                "changed. Run again with execute(strict_recovery=True) to roll it back and "
                "retry it (this needs a retry policy with attempts to spare)",
                task_id=self.task_id,
                stage_name=running.stage_name,
            )
        self._cancel_checked_at = None
        for index, stage in enumerate(self._stages):
            if stage.state.status is _S.COMPLETE:
                continue
            if not self._run_stage(index, stage):
                self._cancel()
                return _S.CANCELED
        return self._aggregate(self._stages)

    def cancel_requested(self) -> bool:
        """Tell whether someone asked for this task to be canceled (`request_cancel`).

        Looks in storage at most once per ``cancel_check_interval`` seconds
        while bound; once a request was seen, stays True.
        """
        if self._cancel_seen:
            return True
        now = time.monotonic()
        last = self._cancel_checked_at
        if last is not None and now - last < self.cancel_check_interval:
            return False
        self._cancel_checked_at = now
        name = cancel_obj_name(self.task_id)
        self._cancel_seen = bool(self._call("check", name, self.io.exists, name))
        if self._cancel_seen:
            logger.info("task %s: cancellation requested", self.task_id)
        return self._cancel_seen

    def _budget_left(self, stage: BaseStage[Any]) -> bool:
        if self.retry_policy is RetryPolicy.GLOBAL:
            return self._attempts(self._stages) < self.max_attempts
        return int(stage.state.attempts) < self.max_attempts

    @staticmethod
    def _attempts(stages: Sequence[BaseStage[Any]]) -> int:
        return sum(int(stage.state.attempts) for stage in stages)

    def _failure(self, stage: BaseStage[Any], cause: BaseException | None) -> StageFailedError:
        history = stage.state.history
        detail = history[-1].message if history else "no message"
        attempts = int(stage.state.attempts)
        when = f"after {attempts} attempt(s)" if attempts else "before it could run"
        err = StageFailedError(
            f"task {self.task_id!r} failed at stage {stage.stage_name!r} {when}: "
            f"{detail}. The task will not run again; "
            "fix the cause and start a new task id (or unbind(clean=True) and rerun)",
            task_id=self.task_id,
            stage_name=stage.stage_name,
        )
        err.__cause__ = cause
        return err

    def _rollback(self, stage: BaseStage[Any], begin: float, reason: str) -> None:
        """Call the stage's rollback hook; on failure mark it ERROR and raise."""
        try:
            stage.rollback_stage()
        except Exception as exc:
            logger.exception(
                "rollback of stage %s of task %s failed", stage.stage_name, self.task_id
            )
            self._record_failure(stage, f"{reason}; rollback failed: {exc!r}", _S.ERROR, begin)
            raise self._failure(stage, exc) from exc

    def _recover_interrupted(self, stage: BaseStage[Any]) -> None:
        attempt = stage.state.attempts
        logger.warning(
            "stage %s of task %s was interrupted during attempt %d; recovering",
            stage.stage_name,
            self.task_id,
            attempt,
        )
        now = time.time()
        reason = f"attempt {attempt} was interrupted (its process died)"
        self._rollback(stage, now, reason)
        if self._budget_left(stage):
            stage._record(f"{reason}; will retry", _S.RETRY, now)
            return
        stage._record(
            f"{reason} and no attempts remain: a retry policy with attempts to spare "
            "(RetryPolicy.STAGE or GLOBAL with max_attempts > 1) is what makes crash recovery "
            "possible",
            _S.ERROR,
            now,
        )
        raise self._failure(stage, None)

    def _run_stage(self, index: int, stage: STAGE) -> bool:
        """Run one stage until COMPLETE (True); False when a cancellation was requested."""
        if stage.state.status is _S.RUNNING:
            self._recover_interrupted(stage)
        last_error: BaseException | None = None
        while True:
            if self.cancel_requested():
                return False
            if not self._budget_left(stage):
                now = time.time()
                stage._record(
                    f"attempt budget spent ({self.retry_policy} policy, max_attempts="
                    f"{self.max_attempts}); the stage did not run",
                    _S.ERROR,
                    now,
                )
                raise self._failure(stage, last_error)
            previous = stage.state if index == 0 else copy_state(self._stages[index - 1].state)
            attempt = stage.inc_attempts()
            begin = time.time()
            try:
                stage._record(f"attempt {attempt} started", _S.RUNNING, begin, begin)
            except BaseException:
                stage.state.attempts -= 1
                raise
            try:
                stage.execute_stage(previous)
            except Exception as exc:
                if self._cancel_seen:  # the stage stopped because it saw the request
                    return False
                last_error = exc
                self._stage_failed(stage, exc, attempt, begin)
                continue
            except BaseException as exc:
                self._interrupted(stage, begin, attempt, exc)
                raise
            if self._cancel_seen:  # it returned early, seeing the request
                return False
            try:
                # Held: the next stage's RUNNING (or whatever comes next) makes both
                # durable with one write; nothing runs in between.
                stage._record(f"attempt {attempt} completed", _S.COMPLETE, begin, hold=True)
            except StateSerializationError as exc:
                last_error = exc
                self._stage_failed(stage, exc, attempt, begin)
                continue
            return True

    def _stage_failed(
        self, stage: BaseStage[Any], exc: Exception, attempt: int, begin: float
    ) -> None:
        """Roll back a failed run; persist RETRY and return, or persist ERROR and raise."""
        logger.warning(
            "stage %s of task %s failed on attempt %d: %r",
            stage.stage_name,
            self.task_id,
            attempt,
            exc,
        )
        reason = f"attempt {attempt} failed: {exc!r}"
        self._rollback(stage, begin, reason)
        if self._budget_left(stage):
            self._record_failure(stage, f"{reason}; will retry", _S.RETRY, begin)
            return
        self._record_failure(stage, f"{reason}; no attempts left", _S.ERROR, begin)
        raise self._failure(stage, exc) from exc

    def _record_failure(
        self, stage: BaseStage[Any], message: str, status: StageStatus, begin: float
    ) -> None:
        """Persist RETRY or ERROR after a failed run.

        If the state the run (and its rollback) left cannot be saved as JSON,
        the state persisted when the run started is restored instead, so the
        failure is always recorded and the stage never stays RUNNING.
        """
        try:
            stage._record(message, status, begin)
        except StateSerializationError:
            restored = self._objects.read_one(self._positions[id(stage)])
            if restored is None:
                raise
            stage.state = restored
            stage._record(
                f"{message}; the state it left could not be saved, so the state from "
                "the start of the attempt was kept",
                status,
                begin,
            )

    def _interrupted(
        self, stage: BaseStage[Any], begin: float, attempt: int, exc: BaseException
    ) -> None:
        """Record a run stopped by KeyboardInterrupt/SystemExit so the task stays resumable."""
        name = type(exc).__name__
        try:
            stage.rollback_stage()
            stage._record(
                f"attempt {attempt} interrupted by {name}; the attempt is not counted",
                _S.RETRY,
                begin,
                refund_attempt=True,
            )
        except Exception:
            logger.exception(
                "could not record the %s of stage %s of task %s; it stays RUNNING "
                "(resume with strict_recovery=True)",
                name,
                stage.stage_name,
                self.task_id,
            )

    # ------------------------------------------------------------------ cancel

    def cancel(self) -> None:
        """Cancel the task: the current stage and every later stage become CANCELED.

        Calls ``cancel()`` on the first stage that is not COMPLETE. Binds for the
        call if the engine is not bound. Canceling a CANCELED task does nothing.

        Raises:
            TaskStateError: The task is COMPLETE or ERROR.
        """
        if not self._bound:
            with self:
                self._cancel()
            return
        self._cancel()

    def _cancel(self) -> None:
        status = self._aggregate(self._stages)
        if status in (_S.COMPLETE, _S.ERROR):
            raise TaskStateError(
                f"task {self.task_id!r} is {status} and cannot be canceled",
                task_id=self.task_id,
            )
        if status is _S.CANCELED:
            return
        first = next(i for i, s in enumerate(self._stages) if s.state.status is not _S.COMPLETE)
        current = self._stages[first]
        try:
            current.cancel()
        except Exception:
            logger.exception(
                "cancel hook of stage %s of task %s failed; canceling anyway",
                current.stage_name,
                self.task_id,
            )
        now = time.time()
        message = "task canceled on request" if self._cancel_seen else "task canceled"
        for stage in self._stages[first:]:
            if stage.state.status in CANCELABLE_STATES:
                stage._record(message, _S.CANCELED, now)
        request = cancel_obj_name(self.task_id)
        self._call("delete", request, self.io.delete, request)
        self._cancel_seen = False
        logger.info("canceled task %s at stage %s", self.task_id, current.stage_name)

    # ------------------------------------------------------------------ inspection

    def state_update_hook(self, stage: STAGE) -> None:
        """Called after every persisted status change of a stage; override to observe them."""

    def dump_stages(
        self,
        source: Source = "memory",
        color: str = _HEADING_COLOR,
        basenames_only: bool = False,
        source_in_heading: bool = False,
    ) -> str:
        """Return a Markdown summary of every stage: name, status, object and state.

        Args:
            source: ``"memory"`` for the engine's stages, ``"persistence"`` to
                read them from storage.
            color: ANSI color prefix for headings; ``""`` for plain text.
            basenames_only: Show only the object's base name instead of its URL.
            source_in_heading: Name the source in the heading (keep False to
                compare the two sources).

        Raises:
            TaskEngineException: ``source`` is unknown, or a persisted object is invalid.
        """
        from .render import render_stages  # noqa: PLC0415 - only needed for dumps

        views = self._stage_views(source, basenames_only)
        note = f"source: {source}" if source_in_heading else None
        return render_stages(self.task_id, views, color=color, heading_note=note)

    def _stage_views(self, source: str, basenames_only: bool) -> list[StageView]:
        from .render import StageView  # noqa: PLC0415 - only needed for dumps

        if source == "memory":
            states: list[BaseStageState[Any] | None] = [s.state for s in self._stages]
        elif source == "persistence":
            states = self._objects.read_all()
        else:
            raise TaskEngineException(
                f"unknown dump source {source!r}; use 'memory' or 'persistence'",
                task_id=self.task_id,
            )
        views = []
        templates = self.task_state.stage_templates
        for template, name, state in zip(templates, self._objects.names, states, strict=True):
            location = name.rpartition("/")[2] if basenames_only else self.io.url(name)
            views.append(
                StageView(
                    stage_name=template.stage_name,
                    status=str(state.status if state is not None else _S.UNBOUND),
                    location=location,
                    state_json=state.model_dump_json(indent=2) if state is not None else None,
                )
            )
        return views

    def log_stages(
        self,
        source: Source = "memory",
        color: str = _HEADING_COLOR,
        basenames_only: bool = False,
    ) -> None:
        """Log `dump_stages` output at INFO level through this module's logger."""
        logger.info("%s", self.dump_stages(source, color, basenames_only, source_in_heading=True))

    def check_sync(self) -> bool:
        """Tell whether the in-memory stages equal the persisted ones.

        Returns False (never raises) when a persisted object is missing or unreadable.
        """
        try:
            persisted = self._stage_views("persistence", basenames_only=False)
            if any(view.state_json is None for view in persisted):
                return False
            return persisted == self._stage_views("memory", basenames_only=False)
        except (TaskEngineException, OSError):
            return False
