"""Property tests of checkmate.naming: task ids, stage names and object names."""

from __future__ import annotations

import re

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from checkmate import STAGE_NAME_MAX_LENGTH, TaskEngineException
from checkmate.naming import (
    check_obj_name,
    check_stage_name,
    check_task_id,
    lock_obj_name,
    stage_file_stem,
    stage_obj_name,
    task_prefix,
)

SETTINGS = settings(max_examples=200, deadline=None)

# Decision 7: letters, digits, '.', '_', '-'; not starting with '.'; 1 to 128 characters.
TASK_ID_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
STEM_RE = re.compile(r"[A-Za-z0-9._~-]+")
WINDOWS_RESERVED = {"con", "prn", "aux", "nul"} | {
    f"{p}{i}" for p in ("com", "lpt") for i in range(10)
}

ID_CHARS = "abcXYZ019._-"
HOSTILE_CHARS = '/\\\x00 :*?"<>|~é\u00df\u0130\u212a\n\t%'


def is_valid_stage_name(name: str) -> bool:
    return (
        0 < len(name) <= STAGE_NAME_MAX_LENGTH
        and not any(c in name for c in "/\\\x00")
        and name not in {".", ".."}
    )


stage_names = st.text(min_size=1, max_size=STAGE_NAME_MAX_LENGTH).filter(is_valid_stage_name)
# Names that look like the plain, used-as-is kind, so collisions between plain
# and hashed stems get a real chance.
plain_like = st.text(alphabet="abcABC019._-~", min_size=1, max_size=12).filter(is_valid_stage_name)
any_stage_name = st.one_of(stage_names, plain_like)
task_ids = st.from_regex(TASK_ID_RE, fullmatch=True)


# ---------------------------------------------------------------- stage_file_stem


@SETTINGS
@given(st.lists(any_stage_name, min_size=2, max_size=30, unique=True))
@example(["a", "A"])
@example(["con", "Con", "CON"])
@example(["x.", "x"])
@example(["é", "e", "_"])
@example([".a", "a", "_a"])
def test_stage_file_stem_is_injective_even_case_insensitively(names: list[str]) -> None:
    stems = [stage_file_stem(n) for n in names]
    assert len(set(stems)) == len(names)
    assert len({s.lower() for s in stems}) == len(names)


@SETTINGS
@given(any_stage_name)
@example("é" * STAGE_NAME_MAX_LENGTH)
@example("\U0001f600" * STAGE_NAME_MAX_LENGTH)
@example("." * 3)
@example("..a")
@example("a" * STAGE_NAME_MAX_LENGTH)
def test_stage_file_stem_is_a_safe_file_name(name: str) -> None:
    stem = stage_file_stem(name)
    assert stem == stage_file_stem(name), "the stem must be deterministic"
    file_name = stem + ".json"
    assert len(file_name.encode("utf-8")) <= 255
    assert STEM_RE.fullmatch(stem), stem
    assert not stem.startswith(".")
    assert not stem.endswith(".")
    assert stem.split(".")[0].lower() not in WINDOWS_RESERVED


@SETTINGS
@given(
    st.sampled_from(sorted(WINDOWS_RESERVED)).flatmap(
        lambda word: st.tuples(
            st.sampled_from([word, word.upper(), word.title()]),
            st.text(alphabet="ab é.", max_size=5),
        )
    )
)
@example(("con", ".a b"))
def test_stage_file_stem_never_starts_with_a_windows_device_name(parts: tuple[str, str]) -> None:
    name = parts[0] + parts[1]
    assume(is_valid_stage_name(name))
    first = stage_file_stem(name).split(".")[0].lower()
    assert first not in WINDOWS_RESERVED, (name, stage_file_stem(name))


@SETTINGS
@given(st.text(max_size=STAGE_NAME_MAX_LENGTH + 5))
@example("")
@example(".")
@example("..")
@example("a/b")
@example("a\\b")
@example("a\x00b")
@example("x" * (STAGE_NAME_MAX_LENGTH + 1))
def test_check_stage_name_accepts_exactly_the_documented_names(name: str) -> None:
    if is_valid_stage_name(name):
        assert check_stage_name(name) == name
    else:
        with pytest.raises(ValueError):
            check_stage_name(name)


# ---------------------------------------------------------------- check_task_id


@SETTINGS
@given(
    st.one_of(
        task_ids,
        st.text(alphabet=ID_CHARS, max_size=140),
        st.text(alphabet=ID_CHARS + HOSTILE_CHARS, max_size=20),
        st.text(max_size=20),
    )
)
@example("")
@example(".")
@example("..")
@example(".hidden")
@example("-dash")
@example("a" * 128)
@example("a" * 129)
@example("a/b")
@example("a\\b")
@example("a\nb")
@example("a\n")
@example("é")
@example("\u0661")  # ARABIC-INDIC DIGIT ONE: a digit, but not an ASCII one
@example("\u212a")  # KELVIN SIGN: lowercases to ASCII 'k'
def test_check_task_id_accepts_exactly_the_documented_set(task_id: str) -> None:
    if TASK_ID_RE.fullmatch(task_id):
        assert check_task_id(task_id) == task_id
    else:
        with pytest.raises(TaskEngineException):
            check_task_id(task_id)


@pytest.mark.parametrize("task_id", [None, 1, b"abc", ["abc"], 1.5])
def test_check_task_id_rejects_non_strings(task_id: object) -> None:
    with pytest.raises(TaskEngineException):
        check_task_id(task_id)


# ---------------------------------------------------------------- check_obj_name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "/",
        "/abs",
        "/abs/olute",
        "..",
        "../x",
        "a/../b",
        "a/..",
        ".",
        "./a",
        "a/./b",
        "a//b",
        "a/",
        "a\\b",
        "..\\x",
        "a\x00b",
    ],
)
def test_check_obj_name_rejects_unsafe_names(name: str) -> None:
    with pytest.raises(TaskEngineException):
        check_obj_name(name)


@pytest.mark.parametrize("name", ["a", "a/b", "task/s0.json", "t/.hidden", "a..b/c", "..a/b."])
def test_check_obj_name_accepts_relative_names(name: str) -> None:
    assert check_obj_name(name) == name


@SETTINGS
@given(st.lists(st.text(alphabet="ab./\\\x00", max_size=4), min_size=1, max_size=4))
def test_check_obj_name_matches_the_rule(parts: list[str]) -> None:
    name = "/".join(parts)
    segments = name.split("/")
    valid = (
        bool(name)
        and "\\" not in name
        and "\x00" not in name
        and all(seg not in {"", ".", ".."} for seg in segments)
    )
    if valid:
        assert check_obj_name(name) == name
    else:
        with pytest.raises(TaskEngineException):
            check_obj_name(name)


# ---------------------------------------------------------------- object names of a task


def _strictly_inside(name: str, prefix: str) -> bool:
    rest = name[len(prefix) :]
    return name.startswith(prefix) and bool(rest) and "/" not in rest and rest not in {".", ".."}


@SETTINGS
@given(task_ids, any_stage_name)
def test_stage_and_lock_objects_stay_inside_the_task_prefix(task_id: str, stage: str) -> None:
    prefix = task_prefix(task_id)
    assert prefix.endswith("/")
    stage_obj = stage_obj_name(task_id, stage)
    lock_obj = lock_obj_name(task_id)
    for name in (stage_obj, lock_obj):
        assert check_obj_name(name) == name
        assert _strictly_inside(name, prefix), name
    assert stage_obj != lock_obj
    # A different task's prefix never contains this task's objects.
    other = task_prefix(task_id + "x")
    assert not stage_obj.startswith(other)
    assert not lock_obj.startswith(other)


@SETTINGS
@given(task_ids, st.lists(any_stage_name, min_size=2, max_size=10, unique=True))
def test_distinct_stages_get_distinct_objects(task_id: str, names: list[str]) -> None:
    objs = [stage_obj_name(task_id, n) for n in names]
    assert len({o.lower() for o in objs}) == len(names)


LOCK_BASENAME = lock_obj_name("t").rpartition("/")[2]


@SETTINGS
@given(
    task_ids,
    st.one_of(
        any_stage_name,
        st.text(alphabet="ab.-~", max_size=4).map(LOCK_BASENAME.__add__),
        st.text(alphabet="ab.-~", max_size=4).map("task.lock".__add__),
    ),
)
@example("t", LOCK_BASENAME)
@example("t", "task.lock")
@example("t", "task~lock")
def test_no_stage_object_is_taken_for_lock_state(task_id: str, stage: str) -> None:
    """Decision 8: the lock's state is every object whose name starts with lock_obj_name."""
    assume(is_valid_stage_name(stage))
    assert not stage_obj_name(task_id, stage).startswith(lock_obj_name(task_id))
