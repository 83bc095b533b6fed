"""The stage state machine: one table of allowed status changes, pure functions.

Every status change the engine makes is checked against `TRANSITIONS`, and
every combination of two consecutive stages against `may_follow`. Nothing else
in checkmate compares statuses to decide what is allowed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from .models import StageStatus

__all__ = [
    "TRANSITIONS",
    "aggregate_status",
    "can_transition",
    "find_invalid_pair",
    "may_follow",
    "mermaid_diagram",
]

_S = StageStatus

TRANSITIONS: Mapping[StageStatus, frozenset[StageStatus]] = {
    _S.UNBOUND: frozenset({_S.CREATED}),
    _S.CREATED: frozenset({_S.RUNNING, _S.ERROR, _S.CANCELED}),
    _S.RUNNING: frozenset({_S.COMPLETE, _S.RETRY, _S.ERROR, _S.CANCELED}),
    _S.RETRY: frozenset({_S.RUNNING, _S.ERROR, _S.CANCELED}),
    _S.COMPLETE: frozenset(),
    _S.ERROR: frozenset(),
    _S.CANCELED: frozenset(),
}
"""For each status, the statuses a stage may change to from it."""

_NOT_STARTED = frozenset({_S.UNBOUND, _S.CREATED})


def can_transition(begin: StageStatus, end: StageStatus) -> bool:
    """Tell whether a stage may change from ``begin`` to ``end``."""
    return end in TRANSITIONS[begin]


def may_follow(previous: StageStatus, current: StageStatus) -> bool:
    """Tell whether a stage in ``current`` may come right after one in ``previous``.

    A stage that has started (any status past CREATED) must follow a COMPLETE
    stage; a CANCELED stage may also follow a CANCELED one.
    """
    if current in _NOT_STARTED or previous is _S.COMPLETE:
        return True
    return current is _S.CANCELED and previous is _S.CANCELED


def find_invalid_pair(statuses: Sequence[StageStatus]) -> int | None:
    """Return the index of the first stage that may not follow its predecessor, or None."""
    for index in range(1, len(statuses)):
        if not may_follow(statuses[index - 1], statuses[index]):
            return index
    return None


_PRECEDENCE = (_S.ERROR, _S.CANCELED, _S.RUNNING, _S.RETRY, _S.UNBOUND)


def aggregate_status(statuses: Iterable[StageStatus]) -> StageStatus:
    """Derive a task's status from its stages' statuses.

    COMPLETE when every stage is; else the first of ERROR, CANCELED, RUNNING,
    RETRY, UNBOUND that any stage has; else CREATED.
    """
    present = set(statuses)
    if present == {_S.COMPLETE}:
        return _S.COMPLETE
    for status in _PRECEDENCE:
        if status in present:
            return status
    return _S.CREATED


def mermaid_diagram() -> str:
    """Return the state machine as a Mermaid ``stateDiagram-v2`` (used by the docs)."""
    lines = ["stateDiagram-v2"]
    for begin, ends in TRANSITIONS.items():
        lines.extend(
            f"    {begin.value} --> {end.value}"
            for end in sorted(ends, key=lambda status: list(StageStatus).index(status))
        )
    lines.extend(f"    {status.value} --> [*]" for status, ends in TRANSITIONS.items() if not ends)
    return "\n".join(lines)
