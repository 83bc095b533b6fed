"""Type-checked (never run): pins the public API's signatures for users of mypy."""

from __future__ import annotations

from pydantic import BaseModel

from checkmate import (
    BaseStage,
    BaseStageState,
    BindLock,
    CheckMateEngine,
    FsspecTaskIO,
    LocalTaskIO,
    RetryPolicy,
    StageStatus,
    TaskIO,
)


class Result(BaseModel):
    rows: int = 0


class State(BaseStageState[Result]):
    rows: int = 0


class Load(BaseStage[State]):
    def execute_stage(self, previous_state_copy: State) -> None:
        self.state.rows = previous_state_copy.rows + 1
        self.state.result = Result(rows=self.state.rows)


def use_api(io: TaskIO) -> None:
    engine: CheckMateEngine[Load, Result] = CheckMateEngine(
        io,
        task_id="t",
        stage_templates=[Load(stage_name="load", state=State())],
        retry_policy=RetryPolicy.STAGE,
        max_attempts=2,
        bind_lock_timeout=1.0,
        auto_cleanup=False,
        no_lock=False,
        force_create=False,
    )
    status: StageStatus = engine.execute(strict_recovery=True)
    result: Result | None = engine.task_result
    attempts: int = engine.cumulative_attempts
    with engine as bound:
        text: str = bound.dump_stages("persistence", color="", basenames_only=True)
        in_sync: bool = bound.check_sync()
        stages: list[Load] = bound.stages
        bound.log_stages("memory")
    engine.unbind  # noqa: B018
    with BindLock(LocalTaskIO("/tmp/x"), "t/task.lock", acquire_timeout=None) as lock:
        held: bool = lock.is_locked
    memory: TaskIO = FsspecTaskIO("memory://x")
    del status, result, attempts, text, in_sync, stages, held, memory
