"""The copy of the previous stage's state that each stage receives (`_copies.copy_state`)."""

from __future__ import annotations

from typing import Any, TypeVar

import pytest
from pydantic import BaseModel, Field, field_validator, model_validator

from checkmate import BaseStageState, StageStateHistoryEntry, StageStatus
from checkmate._copies import copy_model, copy_state

S = StageStatus


class Inner(BaseModel):
    items: list[int] = []


class Plain(BaseStageState[Inner]):
    note: str = ""
    inner: Inner = Inner()


class ChecksHistory(BaseStageState[Any]):
    """Counts its history entries when validated: a copy must be validated with them."""

    seen: int = 0

    @model_validator(mode="after")
    def _count(self) -> ChecksHistory:
        self.seen = len(self.history)
        return self


class ValidatesHistory(BaseStageState[Any]):
    @field_validator("history")
    @classmethod
    def _keep(cls, value: list[StageStateHistoryEntry]) -> list[StageStateHistoryEntry]:
        return value


class FrozenHistory(BaseStageState[Any]):
    history: list[StageStateHistoryEntry] = Field(default_factory=list, frozen=True)


def _entry(i: int) -> StageStateHistoryEntry:
    stamp = "2026-11-23T06:00:00.000000+00:00"
    return StageStateHistoryEntry(
        attempt=i,
        begin_status=S.CREATED,
        end_status=S.RUNNING,
        begin_ts=stamp,
        end_ts=stamp,
        message=f"attempt {i} started",
        run_time_seconds=0.0,
    )


_S = TypeVar("_S", bound=BaseStageState[Any])


def _with_history(state: _S, entries: int) -> _S:
    state.history.extend(_entry(i) for i in range(entries))
    return state


@pytest.mark.parametrize("entries", [0, 1, 40])
def test_a_copy_equals_the_full_copy_and_shares_only_the_frozen_entries(entries: int) -> None:
    state = _with_history(
        Plain(note="n", inner=Inner(items=[1, 2]), result=Inner(items=[3])), entries
    )
    copy = copy_state(state)
    assert copy == copy_model(state) == state
    assert copy.model_fields_set == copy_model(state).model_fields_set
    assert copy.history is not state.history
    assert all(a is b for a, b in zip(copy.history, state.history, strict=True))
    # everything mutable is the copy's own
    assert copy.inner is not state.inner
    assert copy.inner.items is not state.inner.items
    assert copy.result is not state.result
    copy.history.clear()
    copy.inner.items.append(9)
    assert len(state.history) == entries
    assert state.inner.items == [1, 2]


@pytest.mark.parametrize("cls", [ChecksHistory, ValidatesHistory, FrozenHistory])
def test_a_class_that_treats_its_history_its_own_way_gets_the_full_copy(cls: type[Any]) -> None:
    state = _with_history(cls(), 3)
    copy = copy_state(state)
    assert copy == copy_model(state)
    assert all(a is not b for a, b in zip(copy.history, state.history, strict=True))
    if cls is ChecksHistory:
        assert copy.seen == 3  # its validator saw the history
