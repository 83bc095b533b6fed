"""Bad input, fuzzed (issue 4, item 4: persisted objects).

A 3-stage task is left in a rich state (s0 COMPLETE after a failed attempt,
s1 RETRY after a failure and an interrupted attempt, s2 CREATED). Hypothesis
then replaces one of its objects (or its lock) with garbage: random bytes,
truncated JSON, valid JSON of the wrong shape, wrong types, unknown statuses,
out-of-order histories, huge values. Every case must end in a
`TaskEngineException` (never another exception, never a hang: each test has a
timeout), and every object must be left byte for byte as it was.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from _support import CreateOnlyTaskIO, InterruptStage, parse_lock, record, run_in_child, scaled
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pipelines import PipeState
from pydantic import ValidationError

from checkmate import (
    BindException,
    CheckMateEngine,
    FsspecTaskIO,
    LockOwner,
    RetryPolicy,
    TaskEngineException,
    TaskIO,
)
from checkmate.naming import lock_obj_name, stage_obj_name

TASK = "fuzz"
NAMES = ["s0", "s1", "s2"]
OBJECTS = [stage_obj_name(TASK, n) for n in NAMES]
LOCK = lock_obj_name(TASK)
EXAMPLES = scaled(150, 2000)
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
STATUSES = ["UNBOUND", "CREATED", "RUNNING", "RETRY", "ERROR", "COMPLETE", "CANCELED"]


def templates(interrupt: int = 0) -> list[InterruptStage]:
    """The task's stages; with ``interrupt``, s1 raises KeyboardInterrupt on that attempt
    (only to build the baseline: the fuzzed engines never interrupt)."""
    return [
        InterruptStage(stage_name="s0", state=PipeState(), add=1, fail_times=1),
        InterruptStage(
            stage_name="s1", state=PipeState(), add=2, fail_times=1, interrupt_on_attempt=interrupt
        ),
        InterruptStage(stage_name="s2", state=PipeState(), add=3),
    ]


def engine(io: TaskIO, interrupt: int = 0) -> Any:
    return CheckMateEngine(
        io,
        task_id=TASK,
        stage_templates=templates(interrupt),
        retry_policy=RetryPolicy.STAGE,
        max_attempts=3,
    )


def new_store() -> FsspecTaskIO:
    return FsspecTaskIO(f"memory://checkmate-fuzz/{uuid.uuid4().hex}")


def build_baseline() -> dict[str, bytes]:
    io = new_store()
    try:
        engine(io, interrupt=2).execute()
    except KeyboardInterrupt:
        pass
    objects = {name: io.read(name) for name in io.list("")}
    assert sorted(objects) == sorted([*OBJECTS, LOCK]), sorted(objects)
    assert parse_lock(objects[LOCK]) is not None
    statuses = [json.loads(objects[o])["state"]["status"] for o in OBJECTS]
    assert statuses == ["COMPLETE", "RETRY", "CREATED"], statuses
    return objects


BASELINE = build_baseline()
DOCS = {name: json.loads(data) for name, data in BASELINE.items()}


class Case:
    """One fuzz target: a store holding the baseline with one object replaced."""

    def __init__(self, create_only: bool = False) -> None:
        store = new_store()
        self.io: TaskIO = CreateOnlyTaskIO(store) if create_only else store

    def load(self, replaced: dict[str, bytes]) -> dict[str, bytes]:
        for name in self.io.list(""):
            self.io.delete(name)
        objects = {**BASELINE, **replaced}
        for name, data in objects.items():
            self.io.write(name, data)
        return objects

    def snapshot(self) -> dict[str, bytes]:
        return {name: self.io.read(name) for name in self.io.list("")}


def expect_refusal(case: Case, objects: dict[str, bytes], lock_garbage: bool = False) -> None:
    """execute() (and, for stage garbage, the read-only views) raise TaskEngineException
    and change nothing: no object at all for lock garbage; for stage garbage no object but
    the lock, which execute() may take and release (a lease records that in its object)."""
    calls: list[tuple[str, Callable[[Any], Any]]] = [("execute", lambda e: e.execute())]
    if not lock_garbage:
        calls += [
            ("status", lambda e: e.status),
            ("dump_stages", lambda e: e.dump_stages("persistence")),
            ("strict execute", lambda e: e.execute(strict_recovery=True)),
        ]
    for what, call in calls:
        eng = engine(case.io)
        refused: TaskEngineException | None = None
        try:
            call(eng)
        except TaskEngineException as exc:
            refused = exc
        assert refused is not None, f"{what} accepted the garbage"
        if lock_garbage:
            assert isinstance(refused, BindException), f"{what}: {refused!r}"
        after = case.snapshot()
        if not lock_garbage:
            record = parse_lock(after.pop(LOCK, b""))
            assert record is not None, f"{what} left no readable lock object"
            assert getattr(record, "state", "released") == "released", f"{what}: lock held"
            after[LOCK] = objects[LOCK]
        assert after == objects, f"{what} changed the objects"
        assert not eng.is_bound
    if not lock_garbage:
        assert engine(case.io).check_sync() is False


def run_fuzz(
    name: str,
    strategy: st.SearchStrategy[Any],
    lock_garbage: bool = False,
    create_only: bool = False,
) -> None:
    """Feed each generated {object: bytes} replacement to the engine; record the count."""
    case = Case(create_only)
    count = itertools.count()

    @SETTINGS
    @given(replaced=strategy)
    def check(replaced: dict[str, bytes]) -> None:
        next(count)
        objects = case.load(replaced)
        expect_refusal(case, objects, lock_garbage)

    try:
        check()
    finally:
        record("fuzz", fuzz_cases=next(count), **{f"fuzz_{name}": 1})


def dumps(doc: Any) -> bytes:
    return json.dumps(doc).encode()


targets = st.sampled_from(OBJECTS)
json_leaf = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_value = st.recursive(
    json_leaf,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def with_path(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    """A deep copy of ``doc`` with the item at ``path`` replaced (or deleted for ``...``)."""
    doc = copy.deepcopy(doc)
    node = doc
    for key in path[:-1]:
        node = node[key]
    if value is ...:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


def state_paths(obj: str) -> list[tuple[Any, ...]]:
    doc = DOCS[obj]
    paths: list[tuple[Any, ...]] = [("state", key) for key in doc["state"]]
    for index, entry in enumerate(doc["state"]["history"]):
        paths += [("state", "history", index, key) for key in entry]
    return paths


def rejected_by_model(state: Any) -> bool:
    try:
        PipeState.model_validate(state)
    except (ValidationError, ValueError, TypeError):
        return True
    return False


# ---------------------------------------------------------------- families


@pytest.mark.timeout(300)
def test_random_bytes() -> None:
    run_fuzz(
        "random_bytes",
        st.builds(lambda t, b: {t: b}, targets, st.binary(max_size=3000)),
    )


@pytest.mark.timeout(300)
def test_truncated_json() -> None:
    @st.composite
    def truncated(draw: Any) -> dict[str, bytes]:
        target = draw(targets)
        data = BASELINE[target]
        return {target: data[: draw(st.integers(0, len(data) - 1))]}

    run_fuzz("truncated", truncated())


@pytest.mark.timeout(300)
def test_valid_json_of_the_wrong_shape() -> None:
    @st.composite
    def wrong_shape(draw: Any) -> dict[str, bytes]:
        target = draw(targets)
        doc = DOCS[target]
        how = draw(st.sampled_from(["any", "drop", "state", "meta", "history"]))
        if how == "any":
            value = draw(json_value)
            assume(not (isinstance(value, dict) and "state" in value))
            return {target: dumps(value)}
        if how == "drop":  # a member the engine reads (for the others see test_fuzz_members)
            key = draw(st.sampled_from(["checkmate", "stage_name", "state"]))
            return {target: dumps(with_path(doc, (key,), ...))}
        key = {"state": ("state",), "meta": ("checkmate",), "history": ("state", "history")}[how]
        value = draw(json_value)
        assume(value != doc[key[0]] if len(key) == 1 else True)
        mutated = with_path(doc, key, value)
        assume(how == "meta" or rejected_by_model(mutated["state"]))
        return {target: dumps(mutated)}

    run_fuzz("wrong_shape", wrong_shape())


@pytest.mark.timeout(300)
def test_wrong_types() -> None:
    @st.composite
    def wrong_type(draw: Any) -> dict[str, bytes]:
        target = draw(targets)
        doc = DOCS[target]
        # The members the engine reads to identify the object (the others: test_unread_members)
        meta_paths = [
            ("checkmate", k) for k in ("format", "stage_class", "position", "stage_count")
        ] + [("stage_name",)]
        path = draw(st.sampled_from(state_paths(target) + meta_paths))
        if path[0] == "state":
            value = draw(json_value)
            mutated = with_path(doc, path, value)
            assume(rejected_by_model(mutated["state"]))
        else:
            # Not equal to any valid value even under Python's loose equality (True == 1).
            value = draw(
                st.none()
                | st.text(max_size=20)
                | st.lists(st.integers(), max_size=3)
                | st.dictionaries(st.text(max_size=4), st.integers(), max_size=2)
            )
            assume(value != doc[path[0]] if len(path) == 1 else value != doc[path[0]][path[1]])
            mutated = with_path(doc, path, value)
        return {target: dumps(mutated)}

    run_fuzz("wrong_types", wrong_type())


@pytest.mark.timeout(300)
def test_unknown_statuses() -> None:
    @st.composite
    def unknown_status(draw: Any) -> dict[str, bytes]:
        target = draw(targets)
        doc = DOCS[target]
        bogus = draw(
            st.text(max_size=12).filter(lambda s: s not in STATUSES)
            | st.sampled_from([s.lower() for s in STATUSES] + ["PAUSED", "DONE", " COMPLETE"])
        )
        entries = len(doc["state"]["history"])
        path = draw(
            st.sampled_from(
                [("state", "status")]
                + [
                    ("state", "history", i, k)
                    for i in range(entries)
                    for k in ("begin_status", "end_status")
                ]
            )
        )
        return {target: dumps(with_path(doc, path, bogus))}

    run_fuzz("unknown_statuses", unknown_status())


@pytest.mark.timeout(300)
def test_out_of_order_histories() -> None:
    @st.composite
    def out_of_order(draw: Any) -> dict[str, bytes]:
        target = draw(st.sampled_from(OBJECTS[:2]))  # the stages with several entries
        doc = DOCS[target]
        history = doc["state"]["history"]
        how = draw(st.sampled_from(["permute", "attempt back", "status mismatch", "duplicate"]))
        if how == "permute":
            order = draw(st.permutations(range(len(history))))
            assume(list(order) != list(range(len(history))))
            new = [history[i] for i in order]
        elif how == "attempt back":
            index = draw(st.integers(1, len(history) - 1))
            floor = history[index - 1]["attempt"]
            assume(floor > 0)
            new = copy.deepcopy(history)
            new[index]["attempt"] = draw(st.integers(0, floor - 1))
        elif how == "duplicate":
            index = draw(st.integers(1, len(history) - 1))
            new = [*history[: index + 1], history[index], *history[index + 1 :]]
        else:
            new = history
            status = draw(st.sampled_from([s for s in STATUSES if s != history[-1]["end_status"]]))
            return {target: dumps(with_path(doc, ("state", "status"), status))}
        return {target: dumps(with_path(doc, ("state", "history"), new))}

    run_fuzz("out_of_order", out_of_order())


@pytest.mark.timeout(300)
def test_huge_values() -> None:
    @st.composite
    def huge(draw: Any) -> dict[str, bytes]:
        target = draw(targets)
        doc = DOCS[target]
        how = draw(
            st.sampled_from(
                ["deep", "digits", "long name", "negative", "history attempt", "long status"]
            )
        )
        if how == "deep":
            depth = draw(st.integers(1_000, 200_000))
            field = draw(st.sampled_from(["note", "result", "history", "value"]))
            raw = dumps(with_path(doc, ("state", field), "@@"))
            return {target: raw.replace(b'"@@"', b"[" * depth + b"]" * depth)}
        if how == "digits":
            digits = draw(st.integers(5_000, 100_000))
            field = draw(st.sampled_from(["attempts", "value", "rollbacks"]))
            raw = dumps(with_path(doc, ("state", field), "@@"))
            return {target: raw.replace(b'"@@"', b"7" * digits)}
        if how == "long name":
            name = "x" * draw(st.integers(151, 1_000_000))
            path = draw(st.sampled_from([("state", "stage_name"), ("stage_name",)]))
            return {target: dumps(with_path(doc, path, name))}
        if how == "negative":
            field = draw(st.sampled_from(["attempts", "rollbacks_history"]))
            value = -draw(st.integers(1, 2**200))
            if field == "attempts":
                return {target: dumps(with_path(doc, ("state", "attempts"), value))}
            return {target: dumps(with_path(doc, ("state", "history", 0, "attempt"), value))}
        if how == "history attempt":
            last = len(doc["state"]["history"]) - 1
            value = draw(st.integers(doc["state"]["attempts"] + 2, 2**200))
            return {target: dumps(with_path(doc, ("state", "history", last, "attempt"), value))}
        bogus = "RUNNING" * draw(st.integers(2, 200_000))
        return {target: dumps(with_path(doc, ("state", "status"), bogus))}

    run_fuzz("huge_values", huge())


# ---------------------------------------------------------------- locks


@pytest.mark.timeout(300)
def test_lock_garbage() -> None:
    lease = json.loads(BASELINE[LOCK])  # a real lease record (released)
    owner = json.loads(LockOwner.for_this_process().model_dump_json())  # a plain lock record

    @st.composite
    def garbage(draw: Any) -> dict[str, bytes]:
        how = draw(st.sampled_from(["bytes", "truncated", "shape", "type", "foreign"]))
        valid = draw(st.sampled_from([lease, owner]))
        if how == "bytes":
            data = draw(st.binary(max_size=500))
        elif how == "truncated":
            full = dumps(valid)
            data = full[: draw(st.integers(0, len(full) - 1))]
        elif how == "shape":
            data = dumps(draw(json_value))
        elif how == "type":
            key = draw(st.sampled_from(sorted(valid)))
            data = dumps(with_path(valid, (key,), draw(json_value)))
        else:  # a well-formed plain lock of a process on another host: held, whatever its pid
            host = "elsewhere-" + "h" * draw(st.integers(0, 100_000))
            return {LOCK: dumps({**owner, "host": host, "pid": 1})}
        # Neither a lease nor a lock record: garbage. (A record that parses is a real lock,
        # and a dead owner's may rightly be taken over.)
        assume(parse_lock(data) is None)
        return {LOCK: data}

    run_fuzz("lock", garbage(), lock_garbage=True)


@pytest.mark.timeout(300)
def test_garbage_takeover_marker_of_a_stale_lock() -> None:
    """Plain lock objects (a store without compare-and-swap): a dead owner's lock, with
    garbage where a concurrent taker's marker would be."""
    dead_pid = run_in_child(os.getpid).value
    stale = LockOwner.for_this_process().model_copy(
        update={"pid": dead_pid, "pid_start": None, "token": uuid.uuid4().hex}
    )
    marker = f"{LOCK}.takeover-{stale.token}-0"
    stale_bytes = stale.model_dump_json().encode()

    run_fuzz(
        "takeover_marker",
        st.builds(
            lambda data: {LOCK: stale_bytes, marker: data},
            st.binary(max_size=300) | st.builds(dumps, json_value),
        ),
        lock_garbage=True,
        create_only=True,
    )


# ---------------------------------------------------------------- explicit cases

S0, S1, S2 = OBJECTS


def mutate(obj: str, path: tuple[Any, ...], value: Any) -> dict[str, bytes]:
    return {obj: dumps(with_path(DOCS[obj], path, value))}


UNREAD = {
    "timezone-wrong-type": (S0, ("timezone",), 5),
    "timezone-unknown-zone": (S2, ("timezone",), "Mars/Olympus_Mons"),
    "description-wrong-type": (S2, ("description",), ["x"]),
    "config-wrong-type": (S2, ("add",), "three"),
    "meta-unknown-member": (S2, ("checkmate", "evil"), 1),
    "meta-epoch-wrong-type": (S2, ("checkmate", "epoch"), "one"),
    "meta-format-true": (S2, ("checkmate", "format"), True),
    "meta-format-float": (S2, ("checkmate", "format"), 1.0),
    "meta-position-true": (S1, ("checkmate", "position"), True),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "case",
    [
        pytest.param(
            v,
            id=k,
        )
        for k, v in UNREAD.items()
    ],
)
def test_unread_members(case: tuple[str, tuple[Any, ...], Any]) -> None:
    """Garbage in the members the engine does not use is still garbage."""
    obj, path, value = case
    fuzz = Case()
    expect_refusal(fuzz, fuzz.load(mutate(obj, path, value)))


def history_without_creation(obj: str) -> dict[str, bytes]:
    return mutate(obj, ("state", "history"), DOCS[obj]["state"]["history"][1:])


CONSISTENCY = {
    "created-with-attempts": mutate(S2, ("state", "attempts"), 7),
    "created-with-huge-attempts": mutate(S2, ("state", "attempts"), 10**30),
    "created-with-attempts-true": mutate(S2, ("state", "attempts"), True),
    "retry-with-attempts-beyond-history": mutate(S1, ("state", "attempts"), 2**40),
    "complete-with-empty-history": mutate(S0, ("state", "history"), []),
    "history-without-creation": history_without_creation(S0),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "replaced",
    [
        pytest.param(
            v,
            id=k,
        )
        for k, v in CONSISTENCY.items()
    ],
)
def test_impossible_states(replaced: dict[str, bytes]) -> None:
    """States no engine can have written: the counts disagree with the history."""
    fuzz = Case()
    expect_refusal(fuzz, fuzz.load(replaced))
