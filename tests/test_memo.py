"""`_memo.BoundedMemo`: per-name values computed once, forgotten all at once at the limit."""

from __future__ import annotations

import pytest

from checkmate._memo import BoundedMemo


def test_a_value_is_made_once_and_a_failure_is_not_kept() -> None:
    calls: list[str] = []

    def make(key: str) -> str:
        calls.append(key)
        if key == "bad":
            raise ValueError(key)
        return key.upper()

    memo: BoundedMemo[str, str] = BoundedMemo(make, limit=3)
    assert memo["a"] == "A"
    assert memo["a"] == "A"
    assert calls == ["a"]
    for _ in range(2):
        with pytest.raises(ValueError, match="bad"):
            memo["bad"]
    assert "bad" not in memo
    assert calls == ["a", "bad", "bad"]


def test_reaching_the_limit_forgets_everything_kept() -> None:
    memo: BoundedMemo[int, int] = BoundedMemo(lambda key: key * 2, limit=2)
    assert (memo[1], memo[2]) == (2, 4)
    assert memo[3] == 6
    assert dict(memo) == {3: 6}
