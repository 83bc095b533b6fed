"""Bad input from the user's side (issue 4, item 4: templates, state values, interrupts).

- Wrong templates (not a stage, a state of the wrong class built with
  ``model_construct``, the same instance twice, names that bypassed validation)
  raise a TaskEngineException before anything is written.
- A run that leaves a value JSON cannot hold in the state (``object()``,
  bytes that are not UTF-8, NaN, infinity, an int too long to parse back)
  counts as a failed run: it is retried or ends in ERROR per the policy, with
  a StateSerializationError as its error, and every persisted object stays
  readable.
- A stage raising KeyboardInterrupt or SystemExit: the engine records what it
  can, re-raises, releases the lock, and the task resumes with a plain
  ``execute()``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from _support import InterruptStage, inspect_task, record
from pipelines import AddStage, Payload, PipeState, append_line, make_stages, read_log

from checkmate import (
    BaseStage,
    BaseStageState,
    CheckMateEngine,
    LocalTaskIO,
    RetryPolicy,
    StageFailedError,
    StageStatus,
    StateSerializationError,
    TaskEngineException,
)
from checkmate.naming import stage_obj_name


class OtherState(BaseStageState[Payload]):
    other: int = 0


def _same_twice() -> list[Any]:
    stage = AddStage(stage_name="twice", state=PipeState())
    return [stage, stage]


def _constructed(**fields: Any) -> list[Any]:
    return [AddStage.model_construct(**fields)]


WRONG_TEMPLATES = {
    "not-a-stage": lambda: [object()],
    "a-state": lambda: [PipeState()],
    "a-stage-class": lambda: [AddStage],
    "a-dict": lambda: [{"stage_name": "s0", "state": {}}],
    "none": lambda: [None],
    "good-then-bad": lambda: [*make_stages(2), object()],
    "state-of-another-class": lambda: _constructed(stage_name="s0", state=OtherState()),
    "state-not-a-stage-state": lambda: _constructed(stage_name="s0", state=Payload()),
    "state-a-dict": lambda: _constructed(stage_name="s0", state={"value": 1}),
    "same-instance-twice": _same_twice,
    "same-name-twice": lambda: [*make_stages(1), *make_stages(1)],
    "no-templates": lambda: [],
}
CONSTRUCTED_NAMES = {
    "constructed-without-state": lambda: _constructed(stage_name="s0"),
    "constructed-without-name": lambda: _constructed(state=PipeState()),
    "constructed-empty-name": lambda: _constructed(stage_name="", state=PipeState()),
    "constructed-slash-name": lambda: _constructed(stage_name="../../x", state=PipeState()),
    "constructed-nul-name": lambda: _constructed(stage_name="a\x00b", state=PipeState()),
    "constructed-long-name": lambda: _constructed(stage_name="a" * 1000, state=PipeState()),
    "constructed-int-name": lambda: _constructed(stage_name=5, state=PipeState()),
    "constructed-bad-timezone": lambda: _constructed(
        stage_name="s0", state=PipeState(), timezone="Mars/Olympus_Mons"
    ),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "make",
    [pytest.param(f, id=k) for k, f in WRONG_TEMPLATES.items()]
    + [
        pytest.param(
            f,
            id=k,
        )
        for k, f in CONSTRUCTED_NAMES.items()
    ],
)
def test_wrong_templates_are_refused_before_anything_is_written(tmp_path: Path, make: Any) -> None:
    io = LocalTaskIO(tmp_path / "store")
    with pytest.raises(TaskEngineException):
        CheckMateEngine(io, task_id="templates", stage_templates=make()).execute()
    assert io.list("") == []
    record("bad_input", wrong_templates=1)


# ---------------------------------------------------------------- non-serialisable values


class AnyState(BaseStageState[Payload]):
    blob: Any = None
    number: float = 0.0


BAD_VALUES: dict[str, Any] = {
    "object": object(),
    "non-utf8-bytes": b"\xff\xfe",
    "int-too-long-to-parse": 10**5000,
}


class BadValueStage(BaseStage[AnyState]):
    """Puts ``BAD_VALUES[bad]`` in its state on attempt 1, a good value after (or always,
    with no ``bad``)."""

    bad: str = ""
    clean_rollback: bool = False
    log_path: str = ""

    def execute_stage(self, previous_state_copy: AnyState) -> None:
        attempt = self.state.attempts
        if self.log_path:
            append_line(self.log_path, f"{self.stage_name} {attempt}")
        value = BAD_VALUES[self.bad] if attempt == 1 and self.bad else 1.5
        if isinstance(value, float):
            self.state.number = value
        else:
            self.state.blob = value
        self.state.result = Payload(value=attempt)

    def rollback_stage(self) -> None:
        if self.clean_rollback:
            self.state.blob = None
            self.state.number = 0.0


def value_cases() -> list[Any]:
    cases = []
    for bad in BAD_VALUES:
        for clean in (False, True):
            marks: list[Any] = []
            rollback = "clean-rollback" if clean else "no-op-rollback"
            cases.append(pytest.param(bad, clean, id=f"{bad}-{rollback}", marks=marks))
    return cases


def bad_value_engine(io: Any, bad: str, clean: bool, log: str, policy: RetryPolicy) -> Any:
    stage = BadValueStage(
        stage_name="bad", state=AnyState(), bad=bad, clean_rollback=clean, log_path=log
    )
    after = BadValueStage(stage_name="after", state=AnyState())
    return CheckMateEngine(
        io,
        task_id="values",
        stage_templates=[stage, after],
        retry_policy=policy,
        max_attempts=1 if policy is RetryPolicy.NONE else 2,
    )


def persisted_bad_stage(io: Any) -> dict[str, Any]:
    seen = inspect_task(io, "values", ["bad", "after"], AnyState)
    problems = [p for p in seen.problems if "values/after" not in p]
    assert not problems, problems
    return json.loads(io.read(stage_obj_name("values", "bad")))["state"]  # type: ignore[no-any-return]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("bad", "clean"), value_cases())
def test_unserialisable_value_fails_the_run_and_is_retried(
    tmp_path: Path, bad: str, clean: bool
) -> None:
    io = LocalTaskIO(tmp_path / "store")
    log = str(tmp_path / "log")
    engine = bad_value_engine(io, bad, clean, log, RetryPolicy.STAGE)
    assert engine.execute() is StageStatus.COMPLETE
    assert read_log(log) == ["bad 1", "bad 2"]
    state = persisted_bad_stage(io)
    failed = [e for e in state["history"] if (e["attempt"], e["end_status"]) == (1, "RETRY")]
    assert failed, state["history"]
    assert "StateSerializationError" in failed[0]["message"]
    again = bad_value_engine(io, bad, clean, log, RetryPolicy.STAGE)
    assert again.status is StageStatus.COMPLETE  # still readable
    assert again.execute() is StageStatus.COMPLETE
    record("bad_input", unserialisable_values=1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("bad", "clean"), value_cases())
def test_unserialisable_value_without_retries_ends_in_error(
    tmp_path: Path, bad: str, clean: bool
) -> None:
    io = LocalTaskIO(tmp_path / "store")
    log = str(tmp_path / "log")
    with pytest.raises(StageFailedError) as info:
        bad_value_engine(io, bad, clean, log, RetryPolicy.NONE).execute()
    assert isinstance(info.value.__cause__, StateSerializationError)
    state = persisted_bad_stage(io)
    assert state["status"] == "ERROR"
    assert "StateSerializationError" in state["history"][-1]["message"]
    again = bad_value_engine(io, bad, clean, log, RetryPolicy.NONE)
    assert again.status is StageStatus.ERROR  # still readable
    record("bad_input", unserialisable_values=1)


# ---------------------------------------------------------------- KeyboardInterrupt, SystemExit


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["KeyboardInterrupt", "SystemExit"])
@pytest.mark.parametrize("policy", [RetryPolicy.NONE, RetryPolicy.STAGE])
def test_interrupt_is_recorded_reraised_and_resumable(
    tmp_path: Path, kind: str, policy: RetryPolicy
) -> None:
    io = LocalTaskIO(tmp_path / "store")
    log = str(tmp_path / "log")

    def engine(interrupt: int) -> Any:
        stages = [
            InterruptStage(
                stage_name=f"s{i}",
                state=PipeState(),
                add=i + 1,
                log_path=log,
                interrupt_on_attempt=interrupt if i == 1 else 0,
                interrupt_with=kind,
            )
            for i in range(3)
        ]
        return CheckMateEngine(
            io,
            task_id="interrupt",
            stage_templates=stages,
            retry_policy=policy,
            max_attempts=1 if policy is RetryPolicy.NONE else 2,
        )

    with pytest.raises(KeyboardInterrupt if kind == "KeyboardInterrupt" else SystemExit):
        engine(interrupt=1).execute()
    seen = inspect_task(io, "interrupt", ["s0", "s1", "s2"], PipeState)
    assert not seen.problems, seen.problems
    assert not seen.lock_held, "the lock was not released"
    s1 = seen.states["s1"]
    assert s1["status"] == "RETRY", s1["status"]
    assert kind in s1["history"][-1]["message"]
    assert [seen.states[n]["status"] for n in ("s0", "s2")] == ["COMPLETE", "CREATED"]
    # Resumable with a plain execute(): no strict_recovery, and the budget allows it.
    final = engine(interrupt=0)
    assert final.execute() is StageStatus.COMPLETE
    assert final.task_result.value == 6
    assert read_log(log) == ["s0 1", "s1 1 interrupted", f"s1 {s1['attempts'] + 1}", "s2 1"]
    record("bad_input", interrupts=1)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_infinity_round_trip(tmp_path: Path, value: float) -> None:
    """Not bad input: a float state field keeps NaN and infinities through storage."""
    io = LocalTaskIO(tmp_path / "store")

    class FloatState(BaseStageState[Any]):
        x: float = 0.0

    class SetX(BaseStage[FloatState]):
        def execute_stage(self, previous_state_copy: FloatState) -> None:
            self.state.x = value

    engine = CheckMateEngine(
        io, task_id="floats", stage_templates=[SetX(stage_name="x", state=FloatState())]
    )
    assert engine.execute() is StageStatus.COMPLETE
    with engine:
        stored = engine.stages[0].state.x
        assert engine.check_sync()
    assert repr(stored) == repr(value)
