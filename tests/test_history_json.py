"""A long history's JSON is kept between writes, and the bytes stay exactly pydantic's."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pipelines import PipeState, make_stages
from pydantic import ValidationError, field_serializer

from checkmate import (
    BaseStage,
    BaseStageState,
    CheckMateEngine,
    LocalTaskIO,
    StageStateHistoryEntry,
    StageStatus,
    codec,
)
from checkmate.codec import _SPLICE_OK, HistoryJSON, encode_stage

S = StageStatus
PREFIX = b'{"checkmate":{"format":1},'


def _entry(i: int, text: str = "") -> StageStateHistoryEntry:
    begin, end = (S.RUNNING, S.RETRY) if i % 2 else (S.RETRY, S.RUNNING)
    return StageStateHistoryEntry(
        attempt=i,
        begin_status=begin,
        end_status=end,
        begin_ts="2026-11-23T00:00:00+00:00",
        end_ts="2026-11-23T00:00:01+00:00",
        message=f'change {i} "quoted" \\ {text}',
        run_time_seconds=1.0,
    )


def _plain(stage: BaseStage[Any]) -> bytes:
    return encode_stage(stage, PREFIX, "t")


def test_history_entries_are_immutable() -> None:
    entry = _entry(1)
    with pytest.raises(ValidationError):
        entry.message = "rewritten"  # type: ignore[misc]


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("append"), st.integers(1, 40), st.text(max_size=20)),
            st.tuples(st.just("truncate"), st.integers(0, 80), st.just("")),
            st.tuples(st.just("replace"), st.integers(0, 80), st.text(max_size=20)),
        ),
        min_size=1,
        max_size=12,
    ),
    attempts=st.integers(0, 10**6),
    extra=st.text(max_size=30),
)
def test_kept_history_json_equals_a_fresh_serialisation(
    steps: list[tuple[str, int, str]], attempts: int, extra: str
) -> None:
    stage = make_stages(1)[0]
    stage.state.task_id = f'task "{extra}" attempts'
    stage.state.stage_name = '"attempts":1,'
    stage.state.attempts = attempts
    kept = HistoryJSON()
    for op, count, text in steps:
        history = stage.state.history
        if op == "append":
            history.extend(_entry(len(history) + i, text) for i in range(count))
        elif op == "truncate":
            del history[count:]
        else:  # a new list (a copy, or entries edited through model_copy)
            stage.state.history = [
                e.model_copy(update={"message": text}) if i == count else e
                for i, e in enumerate(history)
            ]
        assert encode_stage(stage, PREFIX, "t", kept) == _plain(stage)
        if len(stage.state.history) >= 32:  # long enough to be spliced, and it was
            assert kept.entries == stage.state.history
    assert _SPLICE_OK.get((type(stage), type(stage.state)), True)


class LoudState(BaseStageState[Any]):
    note: str = ""

    @field_serializer("history")
    def _loud(self, history: list[StageStateHistoryEntry]) -> list[dict[str, Any]]:
        return [{"m": e.message.upper()} for e in history]


class Loud(BaseStage[LoudState]):
    def execute_stage(self, previous_state_copy: LoudState) -> None:
        del previous_state_copy


def test_a_state_with_its_own_serialiser_is_written_by_pydantic_alone() -> None:
    stage = Loud(stage_name="loud", state=LoudState())
    stage.state.history.extend(_entry(i) for i in range(50))
    kept = HistoryJSON()
    for _ in range(2):
        data = encode_stage(stage, PREFIX, "t", kept)
        assert data == _plain(stage)
        assert json.loads(data)["state"]["history"][0] == {"m": _entry(0).message.upper()}
    assert kept.joined == b""  # never used
    assert _SPLICE_OK[(Loud, LoudState)] is False


def test_a_long_history_round_trips_through_the_engine(tmp_path: Any) -> None:
    io = LocalTaskIO(tmp_path)
    with CheckMateEngine(io, task_id="t", stage_templates=make_stages(1)) as engine:
        stage = engine.stages[0]
        for _ in range(40):
            stage.update_status("try", S.RUNNING, 0.0)
            stage.update_status("again", S.RETRY, 0.0)
        expected = stage.state.model_dump()
        name = stage.obj_name
    stored = json.loads(io.read(name))
    assert PipeState.model_validate(stored["state"]).model_dump() == expected
    assert len(stored["state"]["history"]) == 81


def test_stored_objects_decode_the_same_in_one_pass_and_the_careful_way(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A valid object is parsed and validated in one pass; the step-by-step path (which
    names what is wrong in a bad one) gives the same state."""
    io = LocalTaskIO(tmp_path)
    templates = make_stages(3)
    with CheckMateEngine(io, task_id="t", stage_templates=templates) as engine:
        engine.execute()
        names = [stage.obj_name for stage in engine.stages]
    objects = [io.read(name) for name in names]

    def decode(position: int) -> Any:
        return codec.decode_state(
            templates[position],
            objects[position],
            obj_name=names[position],
            task_id="t",
            position=position,
            stage_count=3,
        )

    fast = [codec._decode_fast(templates[i], objects[i], "t", i, 3) for i in range(3)]
    assert all(state is not None for state in fast)
    monkeypatch.setattr(codec, "_decode_fast", lambda *args: None)
    careful = [decode(i) for i in range(3)]
    assert [s.model_dump() for s in fast if s] == [s.model_dump() for s in careful]
