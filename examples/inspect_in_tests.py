"""Testing a pipeline: ``dump_stages``, ``check_sync``, ``memory://`` and a flaky store.

A pytest-style test module. Run it either way::

    python -m pytest examples/inspect_in_tests.py
    python examples/inspect_in_tests.py        # runs each test function, prints "ok"

It needs nothing but checkmate: the tests use plain ``assert`` and no pytest
fixtures. Each test gets its own ``memory://`` store, so they are fast and
independent; the same tests run unchanged on ``LocalTaskIO(tmp_path)``.
"""

from __future__ import annotations

import uuid

from pydantic import BaseModel, Field

from checkmate import (
    BaseStage,
    BaseStageState,
    CheckMateEngine,
    FsspecTaskIO,
    RetryPolicy,
    StageFailedError,
    StageStatus,
    StorageRetry,
    TaskIO,
)
from checkmate.testing import FaultyTaskIO

# ---------------------------------------------------------------- the pipeline under test


class WordCount(BaseModel):
    """What the pipeline produces."""

    words: int = 0


class DocState(BaseStageState[WordCount]):
    """The state every stage carries."""

    text: str = ""
    words: list[str] = Field(default_factory=list)


class Fetch(BaseStage[DocState]):
    """Stage 1: get the document."""

    text: str = "the quick brown fox"

    def execute_stage(self, previous_state_copy: DocState) -> None:
        self.state.text = self.text


class Split(BaseStage[DocState]):
    """Stage 2: split it; fails on the attempts listed in ``fail_on``."""

    fail_on: list[int] = Field(default_factory=list)

    def execute_stage(self, previous_state_copy: DocState) -> None:
        self.state.words = previous_state_copy.text.split()
        if self.state.attempts in self.fail_on:
            raise ValueError(f"bad input on attempt {self.state.attempts}")

    def rollback_stage(self) -> None:
        self.state.words = []


class Count(BaseStage[DocState]):
    """Stage 3: count the words."""

    def execute_stage(self, previous_state_copy: DocState) -> None:
        self.state.result = WordCount(words=len(previous_state_copy.words))


def make_engine(
    io: TaskIO, fail_on: list[int] | None = None, storage_retry: StorageRetry | None = None
) -> CheckMateEngine[BaseStage[DocState], WordCount]:
    """The pipeline, on ``io``, with a fixed task id."""
    return CheckMateEngine(
        io,
        task_id="doc-1",
        stage_templates=[
            Fetch(stage_name="fetch", state=DocState()),
            Split(stage_name="split", state=DocState(), fail_on=fail_on or []),
            Count(stage_name="count", state=DocState()),
        ],
        retry_policy=RetryPolicy.STAGE,
        max_attempts=2,
        storage_retry=storage_retry,
    )


def fresh_store() -> FsspecTaskIO:
    """A new, empty in-memory store (memory:// is shared by the whole process)."""
    return FsspecTaskIO(f"memory://tests-{uuid.uuid4().hex}")


# ---------------------------------------------------------------- the tests


def test_pipeline_completes_and_persists_every_stage() -> None:
    engine = make_engine(fresh_store())
    assert engine.execute() is StageStatus.COMPLETE
    assert engine.task_result == WordCount(words=4)
    with engine:  # bind again: load what was persisted
        assert engine.check_sync()  # memory == storage
        dump = engine.dump_stages("persistence", color="", basenames_only=True)
    assert dump.startswith("# Task doc-1")
    assert dump.count("- status: COMPLETE") == 3
    assert "- object: split.json" in dump
    assert '"words": 4' in dump


def test_memory_and_persistence_dumps_are_identical() -> None:
    engine = make_engine(fresh_store())
    engine.execute()
    with engine:
        in_memory = engine.dump_stages("memory", color="")
        persisted = engine.dump_stages("persistence", color="")
    assert in_memory == persisted


def test_a_failed_attempt_is_rolled_back_and_recorded() -> None:
    engine = make_engine(fresh_store(), fail_on=[1])
    assert engine.execute() is StageStatus.COMPLETE
    with engine:
        split = engine.stages[1]
        assert split.state.attempts == 2
        changes = [(e.begin_status.value, e.end_status.value) for e in split.state.history]
        assert changes == [
            ("UNBOUND", "CREATED"),
            ("CREATED", "RUNNING"),
            ("RUNNING", "RETRY"),
            ("RETRY", "RUNNING"),
            ("RUNNING", "COMPLETE"),
        ]
        assert "ValueError('bad input on attempt 1')" in split.state.history[2].message
        assert engine.check_sync()


def test_a_stage_out_of_attempts_fails_the_task() -> None:
    io = fresh_store()
    engine = make_engine(io, fail_on=[1, 2])
    error: StageFailedError | None = None
    try:
        engine.execute()
    except StageFailedError as exc:  # pytest.raises works too; this needs no pytest
        error = exc
    assert error is not None, "execute() should have raised StageFailedError"
    assert error.stage_name == "split"
    assert isinstance(error.__cause__, ValueError)  # the stage's own exception
    assert engine.status is StageStatus.ERROR  # unbound: read from storage
    dump = engine.dump_stages("persistence", color="", basenames_only=True)
    assert "## Stage 2/3: split\n\n- status: ERROR" in dump
    assert "## Stage 3/3: count\n\n- status: CREATED" in dump


def test_check_sync_notices_state_that_was_not_persisted() -> None:
    engine = make_engine(fresh_store())
    engine.execute()
    with engine:
        assert engine.check_sync()
        engine.stages[0].state.text = "changed in memory only"
        assert not engine.check_sync()


def test_the_pipeline_survives_a_flaky_store() -> None:
    # One storage call in five fails (some after taking effect); the engine
    # retries each failed call, so the task still completes, and what is
    # persisted is exactly what the engine holds.
    flaky = FaultyTaskIO(fresh_store(), rate=0.2, seed=7)
    # A wrapper is not trusted to enforce conditional writes, so the first
    # lease on it would run a self-test, whose calls are not retried. The
    # memory store underneath is known to enforce them: skip the self-test.
    flaky.needs_self_test = False
    engine = make_engine(flaky, storage_retry=StorageRetry(sleep=lambda _: None))
    assert engine.execute() is StageStatus.COMPLETE
    assert flaky.faults > 0
    flaky.enabled = False  # inspect without faults
    with engine:
        assert engine.check_sync()
        assert all(stage.state.status is StageStatus.COMPLETE for stage in engine.stages)


if __name__ == "__main__":
    tests = [(name, func) for name, func in sorted(globals().items()) if name.startswith("test_")]
    for name, func in tests:
        func()
        print(f"{name}: ok")
    print(f"ok: {len(tests)} tests passed")
