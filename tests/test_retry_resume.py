"""Retries, configuration errors, resume and crash recovery (in process).

Covers decision 3 and the in-process part of decision 5 of the core-engine
issue, plus KeyboardInterrupt, on every storage backend. A crash is simulated
by copying the task's stage objects at the moment of interest and writing them
back after the run: the store then holds exactly what a process that died at
that moment would have left.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import live_lock_objects, state_snapshot
from pipelines import AddStage, Payload, PipeState, expected_value

from checkmate import (
    CheckMateEngine,
    ConfigurationError,
    InterruptedStageError,
    RetryPolicy,
    StageFailedError,
    StageStatus,
    TaskEngineException,
    TaskIO,
)

S = StageStatus
STAGE = RetryPolicy.STAGE
GLOBAL = RetryPolicy.GLOBAL
NONE = RetryPolicy.NONE

# ----------------------------------------------------------------------------- helpers


class PlannedError(Exception):
    """Raised by a stage on purpose."""


class Probe:
    """What `ProbeStage`s of one test do and saw: an event log and per-stage actions."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.events: list[tuple[str, str, int]] = []
        self.raised: list[BaseException] = []
        self.on_run: dict[str, Callable[[ProbeStage, PipeState], None]] = {}
        self.on_rollback: dict[str, Callable[[ProbeStage], None]] = {}

    def runs(self, stage_name: str | None = None) -> list[tuple[str, int]]:
        """(stage, attempt) of every execute_stage call, in order."""
        return [
            (name, attempt)
            for event, name, attempt in self.events
            if event == "run" and (stage_name is None or name == stage_name)
        ]

    def rollbacks(self, stage_name: str) -> list[int]:
        """The attempt numbers at which ``stage_name`` was rolled back."""
        return [a for e, n, a in self.events if e == "rollback" and n == stage_name]

    def fail(self, stage_name: str, attempts: set[int] | None = None) -> None:
        """Make ``stage_name`` raise a fresh PlannedError (on the given attempts, or always)."""

        def action(stage: ProbeStage, _previous: PipeState) -> None:
            attempt = stage.state.attempts
            if attempts is None or attempt in attempts:
                exc = PlannedError(f"{stage.stage_name} attempt {attempt}")
                self.raised.append(exc)
                raise exc

        self.on_run[stage_name] = action


PROBES: dict[str, Probe] = {}


class ProbeStage(AddStage):
    """An AddStage that logs its runs and rollbacks to a `Probe` and runs its actions."""

    probe: str = ""

    def execute_stage(self, previous_state_copy: PipeState) -> None:
        probe = PROBES[self.probe]
        probe.events.append(("run", self.stage_name, self.state.attempts))
        action = probe.on_run.get(self.stage_name)
        if action is not None:
            action(self, previous_state_copy)
        super().execute_stage(previous_state_copy)

    def rollback_stage(self) -> None:
        probe = PROBES[self.probe]
        probe.events.append(("rollback", self.stage_name, self.state.attempts))
        action = probe.on_rollback.get(self.stage_name)
        if action is not None:
            action(self)
        super().rollback_stage()


class RecordingEngine(CheckMateEngine[Any, Any]):
    """Records (stage, new status, persisted status) at every state_update_hook call."""

    def __init__(self, *args: Any, hook_log: list[tuple[str, str, str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hook_log = hook_log

    def state_update_hook(self, stage: Any) -> None:
        persisted = json.loads(self.io.read(stage.obj_name))["state"]["status"]
        self.hook_log.append((stage.stage_name, stage.state.status.value, persisted))


@pytest.fixture
def probe() -> Iterator[Probe]:
    key = uuid.uuid4().hex
    PROBES[key] = Probe(key)
    yield PROBES[key]
    del PROBES[key]


def probe_stages(probe: Probe, n: int = 3) -> list[ProbeStage]:
    """``n`` ProbeStages s0..s{n-1} adding 1..n."""
    return [
        ProbeStage(stage_name=f"s{i}", state=PipeState(), add=i + 1, probe=probe.key)
        for i in range(n)
    ]


def make_engine(
    io: TaskIO,
    probe: Probe,
    task_id: str,
    policy: RetryPolicy = NONE,
    max_attempts: int = 1,
    n: int = 3,
) -> CheckMateEngine[Any, Any]:
    return CheckMateEngine(
        io,
        task_id=task_id,
        stage_templates=probe_stages(probe, n),
        retry_policy=policy,
        max_attempts=max_attempts,
    )


def objects(io: TaskIO) -> dict[str, bytes]:
    """Every object of the store with its bytes, but for the lock's own."""
    return state_snapshot(io)


def state_of(io: TaskIO, engine: CheckMateEngine[Any, Any], index: int) -> dict[str, Any]:
    """The persisted state of stage ``index`` as plain JSON (works bound or unbound)."""
    name = engine.stages[index].gen_obj_name(engine)
    state: dict[str, Any] = json.loads(io.read(name))["state"]
    return state


def statuses(io: TaskIO, engine: CheckMateEngine[Any, Any]) -> list[str]:
    return [state_of(io, engine, i)["status"] for i in range(len(engine.stages))]


def changes(
    io: TaskIO, engine: CheckMateEngine[Any, Any], index: int
) -> list[tuple[str, str, int]]:
    return [
        (h["begin_status"], h["end_status"], h["attempt"])
        for h in state_of(io, engine, index)["history"]
    ]


def capture(stage: ProbeStage) -> dict[str, bytes]:
    """The bytes of every stage object of the stage's task, read from inside a run."""
    engine = stage.engine
    return {s.obj_name: engine.io.read(s.obj_name) for s in engine.stages}


def restore(io: TaskIO, image: dict[str, bytes]) -> None:
    for name, data in image.items():
        io.write(name, data)


def crash_inside(io: TaskIO, probe: Probe, task_id: str, stage_name: str, **kwargs: Any) -> None:
    """Leave the task as if its process died inside ``stage_name``'s first run."""
    image: dict[str, bytes] = {}

    def grab(stage: ProbeStage, _previous: PipeState) -> None:
        if not image:
            image.update(capture(stage))

    probe.on_run[stage_name] = grab
    engine = make_engine(io, probe, task_id, **kwargs)
    # what happens after the image was taken does not matter: it is overwritten
    with contextlib.suppress(TaskEngineException):
        engine.execute()
    del probe.on_run[stage_name]
    assert image
    restore(io, image)
    assert engine.status is S.RUNNING
    assert not engine.has_lockfile


# ----------------------------------------------------------------------------- decision 3


def test_none_policy_does_not_retry(io: TaskIO, probe: Probe) -> None:
    probe.fail("s1", {1})
    engine = make_engine(io, probe, "none")

    with engine:
        with pytest.raises(StageFailedError) as info:
            engine.execute()
        assert [s.state.status for s in engine.stages] == [S.COMPLETE, S.ERROR, S.CREATED]
        assert engine.check_sync()

    assert probe.runs() == [("s0", 1), ("s1", 1)]
    assert probe.rollbacks("s1") == [1]
    assert info.value.__cause__ is probe.raised[-1]
    assert statuses(io, engine) == ["COMPLETE", "ERROR", "CREATED"]
    assert changes(io, engine, 1)[-1] == ("RUNNING", "ERROR", 1)
    assert engine.status is S.ERROR


def test_stage_policy_gives_each_stage_max_attempts(io: TaskIO, probe: Probe) -> None:
    probe.fail("s0", {1, 2})
    probe.fail("s1", {1, 2})
    engine = make_engine(io, probe, "stage", STAGE, 3)

    assert engine.execute() is S.COMPLETE

    assert probe.runs() == [
        ("s0", 1),
        ("s0", 2),
        ("s0", 3),
        ("s1", 1),
        ("s1", 2),
        ("s1", 3),
        ("s2", 1),
    ]
    assert probe.rollbacks("s0") == [1, 2]
    assert probe.rollbacks("s1") == [1, 2]
    assert changes(io, engine, 1) == [
        ("UNBOUND", "CREATED", 0),
        ("CREATED", "RUNNING", 1),
        ("RUNNING", "RETRY", 1),
        ("RETRY", "RUNNING", 2),
        ("RUNNING", "RETRY", 2),
        ("RETRY", "RUNNING", 3),
        ("RUNNING", "COMPLETE", 3),
    ]
    assert engine.task_result == Payload(value=expected_value(3))
    assert engine.cumulative_attempts == 7


def test_stage_policy_exhausted_goes_error_with_the_last_exception(
    io: TaskIO, probe: Probe
) -> None:
    probe.fail("s1")
    engine = make_engine(io, probe, "exhaust", STAGE, 3)

    with pytest.raises(TaskEngineException) as info:
        engine.execute()

    assert isinstance(info.value, StageFailedError)
    assert probe.runs("s1") == [("s1", 1), ("s1", 2), ("s1", 3)]
    assert probe.rollbacks("s1") == [1, 2, 3]
    assert len(probe.raised) == 3
    assert info.value.__cause__ is probe.raised[-1]
    assert str(info.value.__cause__) == "s1 attempt 3"
    assert statuses(io, engine) == ["COMPLETE", "ERROR", "CREATED"]
    assert state_of(io, engine, 1)["attempts"] == 3
    assert changes(io, engine, 2) == [("UNBOUND", "CREATED", 0)]
    assert probe.runs("s2") == []
    assert not engine.has_lockfile


def test_global_budget_counts_successful_runs(io: TaskIO, probe: Probe) -> None:
    probe.fail("s0", {1})
    engine = make_engine(io, probe, "global", GLOBAL, 3)

    with pytest.raises(StageFailedError):
        engine.execute()

    # s0 twice + s1 once spend the budget of 3: s2 goes ERROR without running
    assert probe.runs() == [("s0", 1), ("s0", 2), ("s1", 1)]
    assert statuses(io, engine) == ["COMPLETE", "COMPLETE", "ERROR"]
    assert changes(io, engine, 2) == [("UNBOUND", "CREATED", 0), ("CREATED", "ERROR", 0)]
    assert state_of(io, engine, 2)["attempts"] == 0
    assert engine.cumulative_attempts == 3
    assert engine.status is S.ERROR
    assert engine.task_result == Payload(value=3)


def test_global_budget_large_enough_completes(io: TaskIO, probe: Probe) -> None:
    probe.fail("s0", {1})
    probe.fail("s2", {1})
    engine = make_engine(io, probe, "global-ok", GLOBAL, 5)

    assert engine.execute() is S.COMPLETE

    assert probe.runs() == [("s0", 1), ("s0", 2), ("s1", 1), ("s2", 1), ("s2", 2)]
    assert engine.cumulative_attempts == 5


def test_global_budget_spent_by_a_failure_starts_no_retry(io: TaskIO, probe: Probe) -> None:
    probe.fail("s1")
    engine = make_engine(io, probe, "global-retry", GLOBAL, 3)

    with pytest.raises(StageFailedError) as info:
        engine.execute()

    # s0 (1) + s1 (2) = 3: no retry of s1 is started
    assert probe.runs() == [("s0", 1), ("s1", 1), ("s1", 2)]
    assert probe.rollbacks("s1") == [1, 2]
    assert info.value.__cause__ is probe.raised[-1]
    assert statuses(io, engine) == ["COMPLETE", "ERROR", "CREATED"]


def test_rollback_runs_before_each_retry_and_error_is_persisted(io: TaskIO, probe: Probe) -> None:
    hook_log: list[tuple[str, str, str]] = []
    probe.fail("s1")

    def rollback(stage: ProbeStage) -> None:
        hook_log.append((stage.stage_name, "rollback", state_of(io, stage.engine, 1)["status"]))

    probe.on_rollback["s1"] = rollback
    engine = RecordingEngine(
        io,
        task_id="rb-order",
        stage_templates=probe_stages(probe, 3),
        retry_policy=STAGE,
        max_attempts=2,
        hook_log=hook_log,
    )

    with pytest.raises(StageFailedError):
        engine.execute()

    s1 = [entry[1:] for entry in hook_log if entry[0] == "s1"]
    assert s1 == [
        ("CREATED", "CREATED"),
        ("RUNNING", "RUNNING"),
        ("rollback", "RUNNING"),
        ("RETRY", "RETRY"),
        ("RUNNING", "RUNNING"),
        ("rollback", "RUNNING"),
        ("ERROR", "ERROR"),
    ]
    assert [entry[1] for entry in hook_log if entry[0] == "s2"] == ["CREATED"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"stage_templates": None},
        {"stage_templates": []},
        {"retry_policy": NONE, "max_attempts": 2},
        {"retry_policy": NONE, "max_attempts": 0},
        {"retry_policy": STAGE, "max_attempts": 0},
        {"retry_policy": GLOBAL, "max_attempts": 0},
        {"retry_policy": STAGE, "max_attempts": -1},
    ],
    ids=["templates-none", "templates-empty", "none-2", "none-0", "stage-0", "global-0", "neg"],
)
def test_bad_configuration_raises_before_anything_is_written(
    io: TaskIO, kwargs: dict[str, Any]
) -> None:
    args: dict[str, Any] = {"stage_templates": [AddStage(stage_name="s0", state=PipeState())]}
    args.update(kwargs)

    with pytest.raises(TaskEngineException) as info:
        CheckMateEngine(io, task_id="bad", **args)

    assert isinstance(info.value, ConfigurationError)
    assert io.list("") == []


@pytest.mark.parametrize(("policy", "max_attempts"), [(STAGE, 1), (GLOBAL, 1), (STAGE, 2)])
def test_retrying_policies_accept_any_positive_budget(
    io: TaskIO, policy: RetryPolicy, max_attempts: int
) -> None:
    engine = CheckMateEngine(
        io,
        task_id="ok",
        stage_templates=[AddStage(stage_name="s0", state=PipeState())],
        retry_policy=policy,
        max_attempts=max_attempts,
    )
    assert engine.execute() is S.COMPLETE


def test_unbound_execute_that_fails_leaves_no_lock(io: TaskIO, probe: Probe) -> None:
    probe.fail("s0")
    engine = make_engine(io, probe, "nolock")
    with pytest.raises(StageFailedError):
        engine.execute()
    assert not engine.has_lockfile
    assert live_lock_objects(io) == []


# ----------------------------------------------------------------------------- decision 5


def test_resume_continues_from_the_first_stage_not_complete(io: TaskIO, probe: Probe) -> None:
    crash_inside(io, probe, "resume", "s2", policy=STAGE, max_attempts=2, n=4)
    first_runs = len(probe.runs())

    engine = make_engine(io, probe, "resume", STAGE, 2, n=4)
    assert engine.execute(strict_recovery=True) is S.COMPLETE

    # s0 and s1 were COMPLETE: they never ran again
    assert probe.runs()[first_runs:] == [("s2", 2), ("s3", 1)]
    assert engine.task_result == Payload(value=expected_value(4))
    assert [state_of(io, engine, i)["attempts"] for i in range(4)] == [1, 1, 2, 1]

    # and a COMPLETE task resumed again runs nothing
    assert make_engine(io, probe, "resume", STAGE, 2, n=4).execute() is S.COMPLETE
    assert len(probe.runs()) == first_runs + 2


def test_stage_found_in_retry_is_simply_retried(io: TaskIO, probe: Probe) -> None:
    image: dict[str, bytes] = {}

    class SnapshotAtRetry(CheckMateEngine[Any, Any]):
        def state_update_hook(self, stage: Any) -> None:
            if stage.stage_name == "s1" and stage.state.status is S.RETRY and not image:
                image.update(capture(stage))

    probe.fail("s1", {1})
    SnapshotAtRetry(
        io,
        task_id="retry-found",
        stage_templates=probe_stages(probe, 3),
        retry_policy=STAGE,
        max_attempts=3,
    ).execute()
    restore(io, image)
    probe.on_run.clear()
    engine = make_engine(io, probe, "retry-found", STAGE, 3)
    assert engine.status is S.RETRY
    first_runs = len(probe.runs())

    # no strict_recovery needed
    assert engine.execute() is S.COMPLETE

    assert probe.runs()[first_runs:] == [("s1", 2), ("s2", 1)]
    assert probe.rollbacks("s1") == [1]
    assert changes(io, engine, 1)[2:] == [
        ("RUNNING", "RETRY", 1),
        ("RETRY", "RUNNING", 2),
        ("RUNNING", "COMPLETE", 2),
    ]


def test_stage_found_in_retry_with_the_global_budget_spent_goes_error(
    io: TaskIO, probe: Probe
) -> None:
    image: dict[str, bytes] = {}

    class SnapshotAtRetry(CheckMateEngine[Any, Any]):
        def state_update_hook(self, stage: Any) -> None:
            if stage.stage_name == "s1" and stage.state.status is S.RETRY and not image:
                image.update(capture(stage))

    probe.fail("s1", {1})
    SnapshotAtRetry(
        io,
        task_id="retry-spent",
        stage_templates=probe_stages(probe, 3),
        retry_policy=GLOBAL,
        max_attempts=5,
    ).execute()
    restore(io, image)
    probe.on_run.clear()
    first_runs = len(probe.runs())

    # resumed with a smaller global budget: s0 + s1 already used 2
    engine = make_engine(io, probe, "retry-spent", GLOBAL, 2)
    with pytest.raises(StageFailedError):
        engine.execute()

    assert probe.runs()[first_runs:] == []
    assert statuses(io, engine) == ["COMPLETE", "ERROR", "CREATED"]
    assert changes(io, engine, 1)[-1] == ("RETRY", "ERROR", 1)


def test_interrupted_stage_without_strict_recovery_raises_and_changes_nothing(
    io: TaskIO, probe: Probe
) -> None:
    crash_inside(io, probe, "interrupted", "s1", policy=STAGE, max_attempts=3)
    before = objects(io)
    first_runs = len(probe.runs())
    engine = make_engine(io, probe, "interrupted", STAGE, 3)

    with pytest.raises(TaskEngineException) as info:
        engine.execute()

    assert isinstance(info.value, InterruptedStageError)
    assert "'s1'" in str(info.value)
    assert "strict_recovery" in str(info.value)
    assert objects(io) == before
    assert len(probe.runs()) == first_runs
    assert probe.rollbacks("s1") == []
    assert not engine.has_lockfile

    # bound, the same: nothing changes
    with engine:
        with pytest.raises(InterruptedStageError):
            engine.execute()
        assert engine.status is S.RUNNING
    assert objects(io) == before


@pytest.mark.parametrize(
    ("policy", "max_attempts", "expected_attempts"),
    [(STAGE, 3, [1, 2, 1]), (STAGE, 2, [1, 2, 1]), (GLOBAL, 4, [1, 2, 1])],
)
def test_strict_recovery_rolls_back_and_reruns_counting_the_attempt_once(
    io: TaskIO,
    probe: Probe,
    caplog: pytest.LogCaptureFixture,
    policy: RetryPolicy,
    max_attempts: int,
    expected_attempts: list[int],
) -> None:
    crash_inside(io, probe, "recover", "s1", policy=policy, max_attempts=max_attempts)
    first_runs = len(probe.runs())
    engine = make_engine(io, probe, "recover", policy, max_attempts)

    with caplog.at_level(logging.WARNING, logger="checkmate"):
        assert engine.execute(strict_recovery=True) is S.COMPLETE

    assert any(
        r.levelno == logging.WARNING and r.name.startswith("checkmate") for r in caplog.records
    )
    assert probe.runs()[first_runs:] == [("s1", 2), ("s2", 1)]
    assert probe.rollbacks("s1") == [1]
    # rollback_stage of AddStage counted itself in the state
    assert state_of(io, engine, 1)["rollbacks"] == 1
    assert [state_of(io, engine, i)["attempts"] for i in range(3)] == expected_attempts
    assert engine.cumulative_attempts == sum(expected_attempts)
    assert changes(io, engine, 1) == [
        ("UNBOUND", "CREATED", 0),
        ("CREATED", "RUNNING", 1),
        ("RUNNING", "RETRY", 1),
        ("RETRY", "RUNNING", 2),
        ("RUNNING", "COMPLETE", 2),
    ]
    assert engine.task_result == Payload(value=expected_value(3))
    assert not engine.has_lockfile


@pytest.mark.parametrize(
    ("policy", "max_attempts"),
    [(NONE, 1), (STAGE, 1), (GLOBAL, 2)],
)
def test_strict_recovery_without_attempts_to_spare_goes_error(
    io: TaskIO, probe: Probe, policy: RetryPolicy, max_attempts: int
) -> None:
    crash_inside(io, probe, "no-spare", "s1", policy=policy, max_attempts=max_attempts)
    first_runs = len(probe.runs())
    engine = make_engine(io, probe, "no-spare", policy, max_attempts)

    with pytest.raises(TaskEngineException):
        engine.execute(strict_recovery=True)

    assert probe.runs()[first_runs:] == []
    assert probe.rollbacks("s1") == [1]
    assert statuses(io, engine) == ["COMPLETE", "ERROR", "CREATED"]
    s1 = state_of(io, engine, 1)
    assert s1["attempts"] == 1
    assert s1["rollbacks"] == 1
    last = s1["history"][-1]
    assert (last["begin_status"], last["end_status"]) == ("RUNNING", "ERROR")
    assert "retry policy" in last["message"].lower()
    assert engine.status is S.ERROR
    assert not engine.has_lockfile


# ----------------------------------------------------------------------------- KeyboardInterrupt


@pytest.mark.parametrize(("policy", "max_attempts"), [(NONE, 1), (STAGE, 2)])
def test_keyboard_interrupt_propagates_and_the_task_stays_resumable(
    io: TaskIO, probe: Probe, policy: RetryPolicy, max_attempts: int
) -> None:
    interrupted: list[int] = []

    def interrupt(stage: ProbeStage, _previous: PipeState) -> None:
        if not interrupted:
            interrupted.append(stage.state.attempts)
            raise KeyboardInterrupt

    probe.on_run["s1"] = interrupt
    engine = make_engine(io, probe, "ctrl-c", policy, max_attempts)

    with pytest.raises(KeyboardInterrupt):
        engine.execute()

    assert interrupted == [1]
    assert statuses(io, engine)[0] == "COMPLETE"
    assert statuses(io, engine)[2] == "CREATED"
    assert not engine.has_lockfile
    runs = len(probe.runs())

    # a plain second run finishes the task; s0 does not run again
    assert make_engine(io, probe, "ctrl-c", policy, max_attempts).execute() is S.COMPLETE
    assert [name for name, _ in probe.runs()[runs:]] == ["s1", "s2"]
    assert engine.task_result == Payload(value=expected_value(3))


def test_keyboard_interrupt_in_a_bound_engine_keeps_it_usable(io: TaskIO, probe: Probe) -> None:
    interrupted: list[int] = []

    def interrupt(stage: ProbeStage, _previous: PipeState) -> None:
        if not interrupted:
            interrupted.append(stage.state.attempts)
            raise KeyboardInterrupt

    probe.on_run["s0"] = interrupt
    engine = make_engine(io, probe, "ctrl-c-bound")
    with engine:
        with pytest.raises(KeyboardInterrupt):
            engine.execute()
        # memory and storage agree on what the interrupt left
        assert engine.check_sync()
        assert engine.execute() is S.COMPLETE
        assert engine.check_sync()
    assert not engine.has_lockfile
    assert [name for name, _ in probe.runs()] == ["s0", "s0", "s1", "s2"]
    assert engine.task_result == Payload(value=expected_value(3))
