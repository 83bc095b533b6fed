"""Execution behaviour of the engine: stage order, checkpoints, hooks, execute()'s result.

Covers decisions 1, 2 and 4 of the core-engine issue, on every storage backend.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from conftest import live_lock_objects, state_snapshot
from pipelines import AddStage, Payload, PipeState, expected_value, make_stages

from checkmate import (
    BindException,
    BindLock,
    CheckMateEngine,
    RetryPolicy,
    StageFailedError,
    StageStatus,
    TaskEngineException,
    TaskIO,
)

S = StageStatus

# ----------------------------------------------------------------------------- helpers


class Probe:
    """What `ProbeStage`s of one test do and saw: an event log and per-stage actions."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.events: list[tuple[Any, ...]] = []
        self.on_run: dict[str, Callable[[ProbeStage, PipeState], None]] = {}
        self.on_rollback: dict[str, Callable[[ProbeStage], None]] = {}

    def runs(self, stage_name: str | None = None) -> list[tuple[str, int]]:
        """(stage, attempt) of every execute_stage call, in order."""
        return [
            (e[1], e[2])
            for e in self.events
            if e[0] == "run" and (stage_name is None or e[1] == stage_name)
        ]


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
    """Records every state_update_hook call with what storage held at that moment."""

    def __init__(self, *args: Any, probe: Probe, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.probe = probe

    def state_update_hook(self, stage: Any) -> None:
        persisted = json.loads(self.io.read(stage.obj_name))["state"]
        self.probe.events.append(
            (
                "hook",
                stage.stage_name,
                stage.state.status,
                stage.state.attempts,
                len(stage.state.history),
                persisted,
            )
        )


@pytest.fixture
def probe() -> Iterator[Probe]:
    key = uuid.uuid4().hex
    PROBES[key] = Probe(key)
    yield PROBES[key]
    del PROBES[key]


def probe_stages(probe: Probe, n: int = 3, **config: Any) -> list[ProbeStage]:
    """``n`` ProbeStages s0..s{n-1} adding 1..n; ``per_stage`` as in pipelines.make_stages."""
    per_stage: dict[str, dict[str, Any]] = config.pop("per_stage", {})
    return [
        ProbeStage(
            stage_name=f"s{i}",
            state=PipeState(),
            add=i + 1,
            probe=probe.key,
            **{**config, **per_stage.get(f"s{i}", {})},
        )
        for i in range(n)
    ]


def objects(io: TaskIO) -> dict[str, bytes]:
    """Every object of the store with its bytes, but for the lock's own."""
    return state_snapshot(io)


def persisted_state(io: TaskIO, engine: CheckMateEngine[Any, Any], index: int) -> dict[str, Any]:
    """The persisted state of stage ``index`` as plain JSON (works bound or unbound)."""
    name = engine.stages[index].gen_obj_name(engine)
    state: dict[str, Any] = json.loads(io.read(name))["state"]
    return state


def lock_objects(io: TaskIO, engine: CheckMateEngine[Any, Any]) -> list[str]:
    return live_lock_objects(io, engine.task_id + "/")


# ----------------------------------------------------------------------------- decision 1


def test_stages_run_in_order_each_after_the_previous_completed(io: TaskIO, probe: Probe) -> None:
    seen: list[tuple[str, list[str]]] = []

    def look(stage: ProbeStage, _previous: PipeState) -> None:
        engine = stage.engine
        statuses = [persisted_state(io, engine, i)["status"] for i in range(len(engine.stages))]
        seen.append((stage.stage_name, statuses))

    for name in ("s0", "s1", "s2", "s3"):
        probe.on_run[name] = look
    engine = CheckMateEngine(io, task_id="order", stage_templates=probe_stages(probe, 4))

    assert engine.execute() is S.COMPLETE

    assert probe.runs() == [("s0", 1), ("s1", 1), ("s2", 1), ("s3", 1)]
    assert seen == [
        ("s0", ["RUNNING", "CREATED", "CREATED", "CREATED"]),
        ("s1", ["COMPLETE", "RUNNING", "CREATED", "CREATED"]),
        ("s2", ["COMPLETE", "COMPLETE", "RUNNING", "CREATED"]),
        ("s3", ["COMPLETE", "COMPLETE", "COMPLETE", "RUNNING"]),
    ]
    assert engine.task_result == Payload(value=expected_value(4))


def test_first_stage_gets_its_own_state_as_previous(io: TaskIO, probe: Probe) -> None:
    identities: list[bool] = []

    def check(stage: ProbeStage, previous: PipeState) -> None:
        identities.append(previous is stage.state)
        # a write through previous_state_copy is a write to the stage's own state
        previous.value = 41

    probe.on_run["s0"] = check
    engine = CheckMateEngine(
        io,
        task_id="first",
        stage_templates=probe_stages(probe, 2, per_stage={"s0": {"fail_times": 1}}),
        retry_policy=RetryPolicy.STAGE,
        max_attempts=2,
    )

    with engine:
        assert engine.execute() is S.COMPLETE
        # the first stage's previous_state_copy is its own state, on every attempt
        assert identities == [True, True]
        # AddStage computed 41 (read back through previous) + 1
        assert engine.stages[0].state.value == 42
        assert engine.stages[1].state.value == 44
        assert persisted_state(io, engine, 0)["value"] == 42


def test_later_stages_get_a_deep_copy_of_the_previous_state(io: TaskIO, probe: Probe) -> None:
    received: list[tuple[str, int, bool, bool]] = []
    s0_bytes: dict[str, bytes] = {}

    def tamper(stage: ProbeStage, previous: PipeState) -> None:
        engine = stage.engine
        index = [s.stage_name for s in engine.stages].index(stage.stage_name)
        before = engine.stages[index - 1].state
        s0_bytes.setdefault("s0", io.read(engine.stages[0].obj_name))
        received.append(
            (
                stage.stage_name,
                stage.state.attempts,
                previous == before,
                previous is before,
            )
        )
        # mutate the copy deeply: none of it may reach the previous stage
        previous.note = "tampered"
        previous.history.clear()
        previous.result = None
        if stage.stage_name == "s1" and stage.state.attempts == 1:
            previous.value = 1000

    probe.on_run["s1"] = tamper
    probe.on_run["s2"] = tamper
    engine = CheckMateEngine(
        io,
        task_id="copies",
        stage_templates=probe_stages(probe, 3, per_stage={"s1": {"fail_times": 1}}),
        retry_policy=RetryPolicy.STAGE,
        max_attempts=2,
    )

    with engine:
        assert engine.execute() is S.COMPLETE

        # equal but not identical, on every attempt
        assert received == [
            ("s1", 1, True, False),
            ("s1", 2, True, False),
            ("s2", 1, True, False),
        ]
        s0, s1, s2 = (s.state for s in engine.stages)
        assert s0.note == "attempt 1 was here"
        assert s0.result == Payload(value=1)
        assert [h.end_status for h in s0.history] == [S.CREATED, S.RUNNING, S.COMPLETE]
        # s1's second attempt got a fresh copy: the first attempt's 1000 did not stick
        assert s1.value == 3
        assert s1.result == Payload(value=3)
        assert s2.value == 6
        # nothing leaked into what s0 persisted either
        assert persisted_state(io, engine, 0)["note"] == "attempt 1 was here"
        assert io.read(engine.stages[0].obj_name) == s0_bytes["s0"]
        assert engine.check_sync()


def test_task_result_is_the_result_of_the_last_complete_stage(io: TaskIO) -> None:
    stages = [
        AddStage(stage_name="s0", state=PipeState(), add=1),
        AddStage(stage_name="s1", state=PipeState(), add=10),
        AddStage(stage_name="s2", state=PipeState(), add=100, fail_times=1),
    ]
    engine = CheckMateEngine(io, task_id="result", stage_templates=stages)
    assert engine.task_result is None

    with pytest.raises(TaskEngineException):
        engine.execute()

    # s2 failed: the last COMPLETE stage is s1
    assert engine.status is S.ERROR
    assert engine.task_result == Payload(value=11)

    done = CheckMateEngine(
        io,
        task_id="result-ok",
        stage_templates=[
            AddStage(stage_name="s0", state=PipeState(), add=1),
            AddStage(stage_name="s1", state=PipeState(), add=10),
            AddStage(stage_name="s2", state=PipeState(), add=100),
        ],
    )
    with done:
        assert done.task_result is None
        done.execute()
        assert done.task_result == Payload(value=111)
    assert done.task_result == Payload(value=111)


# ----------------------------------------------------------------------------- decision 2


def test_bind_persists_every_stage_created_and_in_sync(io: TaskIO) -> None:
    engine = CheckMateEngine(io, task_id="bind", stage_templates=make_stages(3))
    with engine:
        assert engine.check_sync()
        for index, stage in enumerate(engine.stages):
            assert stage.persistence_file_exists()
            state = persisted_state(io, engine, index)
            assert state["status"] == "CREATED"
            assert state["attempts"] == 0
            assert state["task_id"] == "bind"
            assert state["stage_name"] == stage.stage_name
            [entry] = state["history"]
            assert (entry["begin_status"], entry["end_status"]) == ("UNBOUND", "CREATED")
            assert entry["attempt"] == 0
        assert engine.status is S.CREATED
    # visible to tools without binding
    assert engine.status is S.CREATED


def test_running_is_persisted_before_execute_stage_with_attempts_incremented(
    io: TaskIO, probe: Probe
) -> None:
    seen: list[tuple[int, str, int, dict[str, Any]]] = []

    def look(stage: ProbeStage, _previous: PipeState) -> None:
        doc = json.loads(io.read(stage.obj_name))["state"]
        seen.append((stage.state.attempts, doc["status"], doc["attempts"], doc["history"][-1]))

    probe.on_run["s1"] = look
    engine = CheckMateEngine(
        io,
        task_id="running",
        stage_templates=probe_stages(probe, 2, per_stage={"s1": {"fail_times": 2}}),
        retry_policy=RetryPolicy.STAGE,
        max_attempts=3,
    )

    assert engine.execute() is S.COMPLETE

    assert [s[0] for s in seen] == [1, 2, 3]
    for attempt, status, persisted_attempts, last in seen:
        assert status == "RUNNING"
        assert persisted_attempts == attempt
        assert last["end_status"] == "RUNNING"
        assert last["attempt"] == attempt
        assert last["begin_status"] == ("CREATED" if attempt == 1 else "RETRY")


def test_each_status_change_appends_one_history_entry(io: TaskIO, probe: Probe) -> None:
    engine = CheckMateEngine(
        io,
        task_id="history",
        stage_templates=probe_stages(probe, 3, per_stage={"s1": {"fail_times": 1}}),
        retry_policy=RetryPolicy.STAGE,
        max_attempts=2,
    )
    engine.execute()

    chains = [
        [
            (h["begin_status"], h["end_status"], h["attempt"])
            for h in persisted_state(io, engine, i)["history"]
        ]
        for i in range(3)
    ]
    assert chains[0] == [
        ("UNBOUND", "CREATED", 0),
        ("CREATED", "RUNNING", 1),
        ("RUNNING", "COMPLETE", 1),
    ]
    assert chains[1] == [
        ("UNBOUND", "CREATED", 0),
        ("CREATED", "RUNNING", 1),
        ("RUNNING", "RETRY", 1),
        ("RETRY", "RUNNING", 2),
        ("RUNNING", "COMPLETE", 2),
    ]
    assert chains[2] == chains[0]
    for i in range(3):
        for entry in persisted_state(io, engine, i)["history"]:
            assert isinstance(entry["message"], str)
            assert entry["message"]
            assert entry["run_time_seconds"] >= 0


@pytest.mark.parametrize(
    ("zone", "offset"),
    [("Asia/Kolkata", timedelta(hours=5, minutes=30)), ("UTC", timedelta(0))],
)
def test_history_timestamps_are_iso8601_in_the_stage_timezone(
    io: TaskIO, zone: str, offset: timedelta
) -> None:
    stages = [
        AddStage(stage_name="s0", state=PipeState(), timezone=zone),
        AddStage(stage_name="s1", state=PipeState(), timezone=zone, add=2, fail_times=1),
    ]
    engine = CheckMateEngine(
        io, task_id="tz", stage_templates=stages, retry_policy=RetryPolicy.STAGE, max_attempts=2
    )
    started = time.time()
    engine.execute()
    finished = time.time()

    for index in range(2):
        history = persisted_state(io, engine, index)["history"]
        assert len(history) >= 3
        for entry in history:
            begin = datetime.fromisoformat(entry["begin_ts"])
            end = datetime.fromisoformat(entry["end_ts"])
            assert begin.utcoffset() == offset
            assert end.utcoffset() == offset
            assert started - 1e-3 <= begin.timestamp() <= end.timestamp() <= finished + 1e-3
            assert entry["run_time_seconds"] == pytest.approx(
                (end - begin).total_seconds(), abs=1e-5
            )


def test_state_update_hook_runs_once_per_change_after_it_is_persisted(
    io: TaskIO, probe: Probe
) -> None:
    engine = RecordingEngine(
        io,
        task_id="hook",
        stage_templates=probe_stages(probe, 3, per_stage={"s1": {"fail_times": 1}}),
        retry_policy=RetryPolicy.STAGE,
        max_attempts=2,
        probe=probe,
    )
    engine.execute()
    hooks = [e for e in probe.events if e[0] == "hook"]

    # one call per history entry, in the order of the changes
    total_entries = sum(len(persisted_state(io, engine, i)["history"]) for i in range(3))
    assert len(hooks) == total_entries
    for name in ("s0", "s1", "s2"):
        index = int(name[1])
        history = persisted_state(io, engine, index)["history"]
        calls = [h for h in hooks if h[1] == name]
        assert [c[2] for c in calls] == [S(h["end_status"]) for h in history]
        for count, call in enumerate(calls, start=1):
            _, _, status, attempts, history_len, persisted = call
            # the change is already persisted when the hook runs
            assert history_len == count
            assert persisted["status"] == status.value
            assert persisted["attempts"] == attempts
            assert len(persisted["history"]) == count
    # hook calls come between runs: RUNNING before the run, the outcome after it
    order = [(e[0], e[1], e[2].value if e[0] == "hook" else e[2]) for e in probe.events]
    s1 = [o for o in order if o[1] == "s1"]
    assert s1 == [
        ("hook", "s1", "CREATED"),
        ("hook", "s1", "RUNNING"),
        ("run", "s1", 1),
        ("rollback", "s1", 1),
        ("hook", "s1", "RETRY"),
        ("hook", "s1", "RUNNING"),
        ("run", "s1", 2),
        ("hook", "s1", "COMPLETE"),
    ]


def test_state_persisted_with_retry_and_error_is_what_rollback_left(
    io: TaskIO, probe: Probe
) -> None:
    def rollback(stage: ProbeStage) -> None:
        # storage still says RUNNING: the outcome is persisted after the rollback
        assert json.loads(io.read(stage.obj_name))["state"]["status"] == "RUNNING"
        stage.state.value = -stage.state.attempts

    probe.on_rollback["s0"] = rollback
    engine = RecordingEngine(
        io,
        task_id="rollback",
        stage_templates=probe_stages(probe, 2, per_stage={"s0": {"fail_times": 2}}),
        retry_policy=RetryPolicy.STAGE,
        max_attempts=2,
        probe=probe,
    )

    with pytest.raises(StageFailedError):
        engine.execute()

    outcomes = [e for e in probe.events if e[0] == "hook" and e[2] in (S.RETRY, S.ERROR)]
    assert [(e[2], e[3]) for e in outcomes] == [(S.RETRY, 1), (S.ERROR, 2)]
    for _, _, status, attempts, _, persisted in outcomes:
        assert persisted["status"] == status.value
        # AddStage.execute_stage set note "attempt N was here"; rollback cleared it
        assert persisted["note"] == ""
        assert persisted["rollbacks"] == attempts
        assert persisted["value"] == -attempts
    final = persisted_state(io, engine, 0)
    assert (final["status"], final["note"], final["rollbacks"], final["value"]) == (
        "ERROR",
        "",
        2,
        -2,
    )


# ----------------------------------------------------------------------------- decision 4


def test_execute_returns_complete_and_persists_everything(io: TaskIO, probe: Probe) -> None:
    engine = CheckMateEngine(io, task_id="done", stage_templates=probe_stages(probe, 3))
    with engine:
        status = engine.execute()
        assert status is S.COMPLETE
        assert isinstance(status, StageStatus)
        assert engine.status is S.COMPLETE
        assert engine.check_sync()
        assert engine.cumulative_attempts == 3
    assert [persisted_state(io, engine, i)["status"] for i in range(3)] == ["COMPLETE"] * 3


def test_execute_on_a_complete_task_runs_nothing(io: TaskIO, probe: Probe) -> None:
    first = CheckMateEngine(io, task_id="again", stage_templates=probe_stages(probe, 3))
    assert first.execute() is S.COMPLETE
    before = objects(io)
    runs = len(probe.runs())

    # same engine, unbound
    assert first.execute() is S.COMPLETE
    # a new engine, bound
    second = CheckMateEngine(io, task_id="again", stage_templates=probe_stages(probe, 3))
    with second:
        assert second.execute() is S.COMPLETE
        assert second.execute() is S.COMPLETE
        assert second.task_result == Payload(value=expected_value(3))

    assert len(probe.runs()) == runs
    assert objects(io) == before


def test_execute_on_a_canceled_task_runs_nothing(io: TaskIO, probe: Probe) -> None:
    engine = CheckMateEngine(io, task_id="canceled", stage_templates=probe_stages(probe, 3))
    with engine:
        engine.cancel()
        assert engine.execute() is S.CANCELED
    before = objects(io)

    again = CheckMateEngine(io, task_id="canceled", stage_templates=probe_stages(probe, 3))
    assert again.execute() is S.CANCELED

    assert probe.runs() == []
    assert objects(io) == before
    assert again.status is S.CANCELED


def test_execute_on_an_error_task_raises_and_runs_nothing(io: TaskIO, probe: Probe) -> None:
    stages = probe_stages(probe, 3, per_stage={"s1": {"fail_times": 5}})
    with pytest.raises(TaskEngineException):
        CheckMateEngine(io, task_id="failed", stage_templates=stages).execute()
    before = objects(io)
    runs = len(probe.runs())

    again = CheckMateEngine(io, task_id="failed", stage_templates=probe_stages(probe, 3))
    with pytest.raises(TaskEngineException):
        again.execute()
    with again, pytest.raises(TaskEngineException):
        again.execute()

    assert len(probe.runs()) == runs
    assert objects(io) == before
    assert again.status is S.ERROR
    assert not again.has_lockfile


def test_unbound_execute_binds_for_the_call_and_unbinds_after(io: TaskIO, probe: Probe) -> None:
    during: list[tuple[bool, bool]] = []

    def look(stage: ProbeStage, _previous: PipeState) -> None:
        engine = stage.engine
        other = BindLock(io, engine.lock_obj_name)
        try:
            other.acquire()
        except BindException:
            held = True
        else:
            other.release()
            held = False
        during.append((engine.has_lockfile, held))

    probe.on_run["s1"] = look
    engine = CheckMateEngine(io, task_id="unbound", stage_templates=probe_stages(probe, 2))
    assert not engine.has_lockfile

    assert engine.execute() is S.COMPLETE

    # the lock was held while the stages ran...
    assert during == [(True, True)]
    # ...and released after: no lock object is left and the task can be bound again
    assert not engine.has_lockfile
    assert lock_objects(io, engine) == []
    assert [s.state.status for s in engine.stages] == [S.UNBOUND, S.UNBOUND]
    with BindLock(io, engine.lock_obj_name):
        pass
    with engine:
        assert engine.status is S.COMPLETE
    assert not engine.has_lockfile


def test_unbound_reads_persisted_state_without_the_lock(io: TaskIO, probe: Probe) -> None:
    observer = CheckMateEngine(io, task_id="observe", stage_templates=probe_stages(probe, 3))
    worker = CheckMateEngine(
        io,
        task_id="observe",
        stage_templates=probe_stages(probe, 3, per_stage={"s2": {"fail_times": 1}}),
        retry_policy=RetryPolicy.STAGE,
        max_attempts=2,
    )
    assert observer.status is S.UNBOUND
    assert observer.task_result is None
    assert observer.cumulative_attempts == 0

    with worker:
        assert observer.status is S.CREATED
        worker.execute()
        # the observer sees what the bound worker persisted, while it holds the lock
        assert worker.has_lockfile
        assert observer.status is S.COMPLETE
        assert observer.task_result == Payload(value=expected_value(3))
        assert observer.cumulative_attempts == 4

    with BindLock(io, observer.lock_obj_name):
        lock_before = {n: io.read(n) for n in lock_objects(io, observer)}
        assert lock_before
        assert observer.status is S.COMPLETE
        assert observer.task_result == Payload(value=expected_value(3))
        assert observer.cumulative_attempts == 4
        assert observer.has_lockfile
        # the reads neither took nor touched the lock
        assert {n: io.read(n) for n in lock_objects(io, observer)} == lock_before
        with pytest.raises(BindException):
            observer.bind()
