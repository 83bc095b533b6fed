"""A bounded memo for per-name values computed on hot paths (checked names, paths)."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeVar

__all__ = ["BoundedMemo"]

_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")


class BoundedMemo(dict[_K, _V]):
    """``memo[key]`` is ``make(key)``, computed once and kept: a hit is one dict lookup.

    When ``limit`` entries are kept, all are forgotten at once (a task's names
    come back with every storage call; a cache of them needs no eviction order).
    If ``make`` raises, nothing is kept.
    """

    def __init__(self, make: Callable[[_K], _V], limit: int = 4096) -> None:
        super().__init__()
        self._make = make
        self._limit = limit

    def __missing__(self, key: _K) -> _V:
        value = self._make(key)
        if len(self) >= self._limit:
            self.clear()
        self[key] = value
        return value
