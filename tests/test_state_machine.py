"""Property tests of the stage state machine (checkmate.transitions) and of a real engine.

The first half checks the pure functions against the rules of the issue
(decisions 2, 3, 5, 9 and 10). The second half drives a real engine on
``memory://`` with a hypothesis `RuleBasedStateMachine`: stages succeed or fail
as drawn, under a drawn retry policy, and after every step the persisted state
must be valid and match a small model of decision 3.
"""

from __future__ import annotations

import json
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import fsspec
import pytest
from conftest import state_snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from checkmate import (
    INACTIVE_STATES,
    BaseStage,
    BaseStageState,
    CheckMateEngine,
    FsspecTaskIO,
    RetryPolicy,
    SimpleRecordsResult,
    StageFailedError,
    StageStatus,
    TaskEngineException,
)
from checkmate.naming import stage_obj_name
from checkmate.transitions import (
    TRANSITIONS,
    aggregate_status,
    can_transition,
    find_invalid_pair,
    may_follow,
)

S = StageStatus
ALL = list(StageStatus)
TERMINAL = {S.COMPLETE, S.ERROR, S.CANCELED}
statuses = st.sampled_from(ALL)
status_lists = st.lists(statuses, min_size=1, max_size=12)

# ---------------------------------------------------------------- pure functions


def reference_aggregate(values: list[StageStatus]) -> StageStatus:
    """Decision 10, written out independently."""
    if all(v is S.COMPLETE for v in values):
        return S.COMPLETE
    for candidate in (S.ERROR, S.CANCELED, S.RUNNING, S.RETRY, S.UNBOUND):
        if candidate in values:
            return candidate
    return S.CREATED


def reference_may_follow(previous: StageStatus, current: StageStatus) -> bool:
    """A stage past CREATED must follow a COMPLETE one; CANCELED may follow CANCELED."""
    if current in (S.UNBOUND, S.CREATED):
        return True
    if previous is S.COMPLETE:
        return True
    return previous is S.CANCELED and current is S.CANCELED


@settings(max_examples=300, deadline=None)
@given(status_lists)
def test_aggregate_status_follows_decision_10(values: list[StageStatus]) -> None:
    assert aggregate_status(values) is reference_aggregate(values)
    # Order does not matter, and any iterable is accepted.
    assert aggregate_status(reversed(values)) is reference_aggregate(values)
    assert aggregate_status(iter(values)) is reference_aggregate(values)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([S.COMPLETE], S.COMPLETE),
        ([S.COMPLETE, S.COMPLETE, S.COMPLETE], S.COMPLETE),
        ([S.COMPLETE, S.CREATED], S.CREATED),
        ([S.CREATED, S.CREATED], S.CREATED),
        ([S.COMPLETE, S.RUNNING, S.CREATED], S.RUNNING),
        ([S.COMPLETE, S.RETRY, S.CREATED], S.RETRY),
        ([S.COMPLETE, S.ERROR, S.CREATED], S.ERROR),
        ([S.CANCELED, S.ERROR], S.ERROR),
        ([S.CANCELED, S.RUNNING], S.CANCELED),
        ([S.RETRY, S.RUNNING], S.RUNNING),
        ([S.UNBOUND, S.RETRY], S.RETRY),
        ([S.UNBOUND, S.CREATED], S.UNBOUND),
        ([S.COMPLETE, S.UNBOUND], S.UNBOUND),
    ],
)
def test_aggregate_status_examples(values: list[StageStatus], expected: StageStatus) -> None:
    assert aggregate_status(values) is expected


def test_transition_table_covers_every_status() -> None:
    assert set(TRANSITIONS) == set(ALL)
    for targets in TRANSITIONS.values():
        assert set(targets) <= set(ALL)


@pytest.mark.parametrize("status", sorted(TERMINAL))
def test_terminal_statuses_have_no_outgoing_transitions(status: StageStatus) -> None:
    assert not TRANSITIONS[status]
    assert not any(can_transition(status, target) for target in ALL)


def test_terminal_statuses_are_the_inactive_ones() -> None:
    assert {s for s in ALL if not TRANSITIONS[s]} == TERMINAL == set(INACTIVE_STATES)


@settings(max_examples=100, deadline=None)
@given(statuses, statuses)
def test_can_transition_agrees_with_the_table(begin: StageStatus, end: StageStatus) -> None:
    assert can_transition(begin, end) is (end in TRANSITIONS[begin])


# The changes the decisions require the engine to make.
REQUIRED = {
    (S.UNBOUND, S.CREATED),  # bind persists a new stage (2)
    (S.CREATED, S.RUNNING),  # a stage starts (2)
    (S.RUNNING, S.COMPLETE),  # it succeeds (2)
    (S.RUNNING, S.RETRY),  # it fails with attempts left, or its crash is recovered (3, 5)
    (S.RUNNING, S.ERROR),  # it fails with no attempts left (3, 5)
    (S.RETRY, S.RUNNING),  # a retry starts (3)
    (S.CREATED, S.ERROR),  # GLOBAL budget spent as a stage would start (3)
    (S.RETRY, S.ERROR),  # GLOBAL budget spent as a retry would start (3)
    (S.CREATED, S.CANCELED),  # cancel (9)
    (S.RUNNING, S.CANCELED),
    (S.RETRY, S.CANCELED),
}


@pytest.mark.parametrize(("begin", "end"), sorted(REQUIRED))
def test_required_transitions_are_allowed(begin: StageStatus, end: StageStatus) -> None:
    assert can_transition(begin, end)


@settings(max_examples=100, deadline=None)
@given(statuses, statuses)
def test_no_transition_goes_back(begin: StageStatus, end: StageStatus) -> None:
    if end in (S.UNBOUND, S.CREATED) and begin is not S.UNBOUND:
        assert not can_transition(begin, end)
    if begin is end:
        assert not can_transition(begin, end), "a change must change the status"


def test_every_status_is_reachable_and_every_live_status_can_end() -> None:
    reachable = {S.UNBOUND}
    frontier = [S.UNBOUND]
    while frontier:
        for target in TRANSITIONS[frontier.pop()]:
            if target not in reachable:
                reachable.add(target)
                frontier.append(target)
    assert reachable == set(ALL)
    for status in set(ALL) - TERMINAL:
        seen, todo = {status}, [status]
        while todo:
            for target in TRANSITIONS[todo.pop()]:
                if target not in seen:
                    seen.add(target)
                    todo.append(target)
        assert seen & TERMINAL, f"{status} can never end"


@settings(max_examples=100, deadline=None)
@given(statuses, statuses)
def test_may_follow_follows_the_rule(previous: StageStatus, current: StageStatus) -> None:
    assert may_follow(previous, current) is reference_may_follow(previous, current)


@settings(max_examples=300, deadline=None)
@given(status_lists)
def test_find_invalid_pair_returns_the_first_bad_index(values: list[StageStatus]) -> None:
    expected = next(
        (i for i in range(1, len(values)) if not reference_may_follow(values[i - 1], values[i])),
        None,
    )
    assert find_invalid_pair(values) == expected


@st.composite
def engine_shaped(draw: st.DrawFn) -> list[StageStatus]:
    """Statuses an engine can leave: COMPLETE*, at most one started stage, then the rest."""
    done = draw(st.integers(0, 5))
    current = draw(st.sampled_from([S.CREATED, S.RUNNING, S.RETRY, S.ERROR, S.CANCELED]))
    rest = draw(st.integers(0, 5))
    tail = S.CANCELED if current is S.CANCELED else S.CREATED
    return [S.COMPLETE] * done + [current] + [tail] * rest


@settings(max_examples=100, deadline=None)
@given(engine_shaped())
def test_statuses_an_engine_leaves_are_accepted(values: list[StageStatus]) -> None:
    assert find_invalid_pair(values) is None


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.just(S.COMPLETE), max_size=3),
    st.sampled_from([S.CREATED, S.RUNNING, S.RETRY, S.ERROR]),
    st.sampled_from([S.RUNNING, S.RETRY, S.ERROR, S.COMPLETE]),
)
def test_a_started_stage_after_an_unfinished_one_is_rejected(
    done: list[StageStatus], previous: StageStatus, current: StageStatus
) -> None:
    values = [*done, previous, current]
    assert find_invalid_pair(values) == len(done) + 1


# ---------------------------------------------------------------- a real engine, driven


@dataclass
class World:
    """What the stages of one machine run consult and record."""

    io: FsspecTaskIO
    task_id: str
    outcomes: deque[bool] = field(default_factory=deque)
    runs: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


WORLDS: dict[str, World] = {}


class DrawnState(BaseStageState[SimpleRecordsResult]):
    scratch: int = 0
    rollbacks: int = 0


class DrawnStage(BaseStage[DrawnState]):
    """Succeeds or fails as its world's next drawn outcome says (success when none is left)."""

    world_key: str

    def execute_stage(self, previous_state_copy: DrawnState) -> None:
        world = WORLDS[self.world_key]
        world.runs.append(self.stage_name)
        # Decision 2: RUNNING, with the attempt already counted, is persisted first.
        raw = world.io.read(stage_obj_name(world.task_id, self.stage_name))
        persisted = json.loads(raw)["state"]
        if persisted["status"] != "RUNNING" or persisted["attempts"] != self.state.attempts:
            world.problems.append(
                f"{self.stage_name} runs but its object says {persisted['status']} "
                f"attempt {persisted['attempts']} (memory: attempt {self.state.attempts})"
            )
        self.state.scratch = 1
        if not (world.outcomes.popleft() if world.outcomes else True):
            raise RuntimeError(f"drawn failure of {self.stage_name}")
        self.state.result = SimpleRecordsResult(total_count=self.state.attempts)

    def rollback_stage(self) -> None:
        self.state.scratch = 0
        self.state.rollbacks += 1


@dataclass
class ModelStage:
    status: StageStatus = S.CREATED
    attempts: int = 0


class EngineMachine(RuleBasedStateMachine):
    """Execute (and sometimes cancel) one task again and again, checking everything persisted."""

    def __init__(self) -> None:
        super().__init__()
        self.key = ""
        self.bound_once = False

    @initialize(
        stage_count=st.integers(1, 4),
        policy=st.sampled_from([RetryPolicy.STAGE, RetryPolicy.GLOBAL, RetryPolicy.NONE]),
        max_attempts=st.integers(1, 5),
    )
    def setup(self, stage_count: int, policy: RetryPolicy, max_attempts: int) -> None:
        self.key = uuid.uuid4().hex
        self.root = f"checkmate-sm/{self.key}"
        self.world = World(io=FsspecTaskIO(f"memory://{self.root}"), task_id="task-1")
        WORLDS[self.key] = self.world
        self.names = [f"st{i}" for i in range(stage_count)]
        self.policy = policy
        self.max_attempts = 1 if policy is RetryPolicy.NONE else max_attempts
        self.model = [ModelStage() for _ in self.names]
        self.bound_once = False

    def teardown(self) -> None:
        WORLDS.pop(self.key, None)
        fs = fsspec.filesystem("memory")
        if self.key and fs.exists(f"/{self.root}"):
            fs.rm(f"/{self.root}", recursive=True)

    # -------------------------------------------------------------- helpers

    def engine(self) -> CheckMateEngine[Any, Any]:
        return CheckMateEngine(
            self.world.io,
            task_id=self.world.task_id,
            stage_templates=[
                DrawnStage(stage_name=name, state=DrawnState(), world_key=self.key)
                for name in self.names
            ],
            retry_policy=self.policy,
            max_attempts=self.max_attempts,
        )

    def raw(self) -> dict[str, bytes]:
        return state_snapshot(self.world.io)

    def persisted(self) -> list[dict[str, Any]]:
        io = self.world.io
        return [
            json.loads(io.read(stage_obj_name(self.world.task_id, name)))["state"]
            for name in self.names
        ]

    def budget_left(self, stage: ModelStage) -> bool:
        if self.policy is RetryPolicy.GLOBAL:
            return sum(s.attempts for s in self.model) < self.max_attempts
        return stage.attempts < self.max_attempts

    def model_execute(self, outcomes: list[bool]) -> tuple[bool, list[str], str | None]:
        """Decision 3 as a model.

        Returns whether execute() raises, the names of the stages that run, and
        the stage whose failed run ended the task in ERROR (if one did).
        """
        queue = deque(outcomes)
        ran: list[str] = []
        statuses = [s.status for s in self.model]
        if S.ERROR in statuses:
            return True, ran, None
        if S.CANCELED in statuses:
            return False, ran, None
        for name, stage in zip(self.names, self.model, strict=True):
            if stage.status is S.COMPLETE:
                continue
            while True:
                if not self.budget_left(stage):
                    stage.status = S.ERROR
                    return True, ran, None
                stage.attempts += 1
                ran.append(name)
                if queue.popleft() if queue else True:
                    stage.status = S.COMPLETE
                    break
                if self.budget_left(stage):
                    stage.status = S.RETRY
                    continue
                stage.status = S.ERROR
                return True, ran, name
        return False, ran, None

    # -------------------------------------------------------------- rules

    @rule(outcomes=st.lists(st.booleans(), max_size=8))
    def execute(self, outcomes: list[bool]) -> None:
        before_raw = self.raw()
        before = self.persisted() if self.bound_once else [None] * len(self.names)
        was_final = self.bound_once and aggregate_status(
            [S(s["status"]) for s in before if s is not None]
        ) in (S.ERROR, S.CANCELED, S.COMPLETE)
        expect_raise, expect_runs, failed_stage = self.model_execute(outcomes)
        self.world.outcomes = deque(outcomes)
        self.world.runs.clear()
        engine = self.engine()
        failure: TaskEngineException | None = None
        try:
            result = engine.execute()
        except TaskEngineException as exc:
            failure = exc
        else:
            assert result is aggregate_status([s.status for s in self.model])
        raised = failure is not None
        if failure is not None:
            # Decision 3: a stage that ends in ERROR makes execute() raise.
            assert isinstance(failure, StageFailedError), repr(failure)
            if failed_stage is not None:
                # ... and its __cause__ is the stage's last exception.
                cause = failure.__cause__
                assert isinstance(cause, RuntimeError), repr(cause)
                assert str(cause) == f"drawn failure of {failed_stage}"
        self.bound_once = True
        assert raised is expect_raise
        assert self.world.runs == expect_runs
        assert not self.world.problems, self.world.problems
        after = self.persisted()
        for name, old, new in zip(self.names, before, after, strict=True):
            if old is not None and old["status"] == "COMPLETE":
                assert name not in self.world.runs, f"COMPLETE stage {name} ran again"
                assert new == old
        if was_final:
            assert self.raw() == before_raw, "a finished task must not change"
        assert engine.status is aggregate_status([s.status for s in self.model])

    @precondition(lambda self: self.bound_once)
    @rule()
    def cancel(self) -> None:
        before_raw = self.raw()
        current = aggregate_status([s.status for s in self.model])
        engine = self.engine()
        self.world.runs.clear()
        if current in (S.COMPLETE, S.ERROR):
            with pytest.raises(TaskEngineException):
                engine.cancel()
            assert self.raw() == before_raw
            return
        engine.cancel()
        if current is S.CANCELED:
            assert self.raw() == before_raw, "canceling a CANCELED task does nothing"
        first = next(i for i, s in enumerate(self.model) if s.status is not S.COMPLETE)
        for stage in self.model[first:]:
            stage.status = S.CANCELED
        assert not self.world.runs
        assert engine.status is S.CANCELED

    # -------------------------------------------------------------- invariants

    @invariant()
    def persisted_state_is_valid(self) -> None:
        if not self.bound_once:
            return
        states = self.persisted()
        found = [S(state["status"]) for state in states]
        assert found == [s.status for s in self.model]
        assert [state["attempts"] for state in states] == [s.attempts for s in self.model]
        assert find_invalid_pair(found) is None
        for name, state in zip(self.names, states, strict=True):
            check_history(name, state)
        attempts = [state["attempts"] for state in states]
        if self.policy is RetryPolicy.GLOBAL:
            assert sum(attempts) <= self.max_attempts
        else:
            assert max(attempts) <= self.max_attempts
        assert not self.engine().has_lockfile, "a lock was left behind"


def check_history(name: str, state: dict[str, Any]) -> None:
    history = state["history"]
    assert history, f"{name} has no history"
    assert history[0]["begin_status"] == "UNBOUND"
    assert history[0]["end_status"] == "CREATED"
    previous_end = "UNBOUND"
    previous_attempt = 0
    for index, entry in enumerate(history):
        where = f"{name} history[{index}]"
        assert entry["begin_status"] == previous_end, where
        assert can_transition(S(entry["begin_status"]), S(entry["end_status"])), where
        assert entry["attempt"] >= previous_attempt, where
        assert entry["attempt"] <= state["attempts"], where
        assert entry["run_time_seconds"] >= 0, where
        for key in ("begin_ts", "end_ts"):
            assert datetime.fromisoformat(entry[key]).tzinfo is not None, where
        if entry["end_status"] == "RUNNING":
            # Each run has its own attempt number, one more than the last.
            assert entry["attempt"] == previous_attempt + 1, where
        previous_end = entry["end_status"]
        previous_attempt = entry["attempt"]
    assert previous_end == state["status"]
    runs = sum(1 for entry in history if entry["end_status"] == "RUNNING")
    assert runs == state["attempts"], f"{name}: {runs} runs recorded, attempts {state['attempts']}"
    if state["status"] == "COMPLETE":
        assert state["result"] == {
            **SimpleRecordsResult(total_count=state["attempts"]).model_dump()
        }


EngineMachine.TestCase.settings = settings(max_examples=50, stateful_step_count=10, deadline=None)
TestEngineMachine = EngineMachine.TestCase
