"""checkmate as a contender of the shared peer harness (``../shared/peer-bench``).

Same pipeline as the others: N stages, each takes the 1 KB `common.Payload` from the
previous stage's state and returns it (puts it in its own state), calling
``FAILER.enter(i)`` first, exactly like the other contenders' step bodies.

Variants:
  local        - `LocalTaskIO` in the worker's temp dir: every status change journaled
                 and made durable (fdatasync) before the engine goes on (the engine's
                 default local store);
                 the journal checkpoint that `unbind` starts runs on a background thread
  local_flush  - the same, and `run` also waits for that background checkpoint
                 (`LocalTaskIO.flush`): the whole cost of the run, nothing deferred
  memory       - `FsspecTaskIO("memory://...")`: the framework's own cost, no disk
Resume: stage 150's body raises on the first run; the stage body turns the injected
failure into an interruption (a BaseException, like a KeyboardInterrupt), which the
engine records as RETRY (attempt refunded) before unbinding. The resume path is the
engine's own: `execute()` of the same task id binds (lease, one read of the 200
stage objects), skips the 149 COMPLETE stages and runs stage 150.
"""

from __future__ import annotations

import os
import uuid

from common import FAILER, Payload, StepFailure, now

from checkmate import (
    BaseStage,
    BaseStageState,
    CheckMateEngine,
    FsspecTaskIO,
    LocalTaskIO,
    StageStatus,
)


class PipeState(BaseStageState[Payload]):
    payload: Payload | None = None


class Interrupted(BaseException):
    """The injected failure, as an interruption of the run (the task stays resumable)."""


class Step(BaseStage[PipeState]):
    index: int = 0

    def execute_stage(self, previous_state_copy: PipeState) -> None:
        try:
            FAILER.enter(self.index)
        except StepFailure as exc:
            raise Interrupted(str(exc)) from exc
        self.state.payload = previous_state_copy.payload


def make_stages(n: int, payload: Payload | None = None) -> list[Step]:
    stages = [Step(stage_name=f"s{i:04d}", index=i, state=PipeState()) for i in range(1, n + 1)]
    stages[0].state.payload = payload
    return stages


class Contender:
    def __init__(self, variant: str = "local") -> None:
        assert variant in ("local", "local_flush", "memory"), variant
        self.variant = variant

    def setup(self, workdir: str) -> None:
        self.workdir = workdir
        if self.variant == "memory":
            self.io = FsspecTaskIO(f"memory://peers-checkmate/{uuid.uuid4().hex}")
        else:
            self.io = LocalTaskIO(os.path.join(workdir, "tasks"))
        self.templates: dict[int, list[Step]] = {}

    def engine(self, n: int, run_id: str, payload: Payload) -> CheckMateEngine:
        stages = self.templates.get(n)
        if stages is None:
            stages = self.templates[n] = make_stages(n)
        stages[0].state.payload = payload  # the engine copies its templates
        return CheckMateEngine(self.io, task_id=run_id, stage_templates=stages)

    def run(self, n: int, run_id: str, payload: Payload, start: int = 1) -> Payload:
        del start  # the engine finds where to start from what it persisted
        with self.engine(n, run_id, payload) as engine:
            status = engine.execute()
            out = engine.stages[-1].state.payload
        assert status is StageStatus.COMPLETE, status
        assert out is not None
        if self.variant == "local_flush":
            self.io.flush()
        return out

    def resume(self, n: int, fail_at: int, run_id: str, payload: Payload) -> dict:
        FAILER.arm(fail_at)
        try:
            self.run(n, run_id, payload)
            raise AssertionError("injected failure did not fire")
        except Interrupted:
            pass
        if self.variant != "memory":
            self.io.flush()
        FAILER.marks.clear()
        t0 = now()
        with self.engine(n, run_id, payload) as engine:
            status = engine.execute()
        t_end = now()
        assert status is StageStatus.COMPLETE, status
        return {
            "to_fail_step_s": FAILER.marks[fail_at] - t0,
            "replay_s": FAILER.marks[fail_at] - t0,
            "total_resume_s": t_end - t0,
            "step_bodies_rerun": sum(1 for k in FAILER.marks if k < fail_at),
            "skipped": fail_at - 1,
        }

    def teardown(self) -> None:
        if self.variant != "memory":
            self.io.flush()
