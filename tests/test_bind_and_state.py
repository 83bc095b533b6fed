"""Binding: persisted state that does not fit the templates, task ids, stage names,
the engine's stages and templates, and the public methods of `BaseStage`.

Decisions 6 and 7 of the core-engine issue, plus the bind-related API.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import pytest
from conftest import state_snapshot
from pipelines import AddStage, Payload, PipeState, expected_value, make_stages
from pydantic import ValidationError

from checkmate import (
    STAGE_NAME_MAX_LENGTH,
    BaseStage,
    BaseStageState,
    BindException,
    CheckMateEngine,
    StageStatus,
    TaskEngineException,
    TaskEngineState,
    TaskIO,
)

TASK = "job"


# ---------------------------------------------------------------------- helpers


class OtherAddStage(AddStage):
    """Same fields and state as AddStage, but another class."""


class OtherState(BaseStageState[Payload]):
    label: str = ""


class OtherStateStage(BaseStage[OtherState]):
    """A stage with a different state model."""

    def execute_stage(self, previous_state_copy: OtherState) -> None:
        self.state.label = "done"


class RecordingEngine(CheckMateEngine[Any, Any]):
    """Remembers every state_update_hook call as (stage name, status)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.updates: list[tuple[str, StageStatus]] = []

    def state_update_hook(self, stage: Any) -> None:
        self.updates.append((stage.stage_name, stage.state.status))


def snapshot(io: TaskIO) -> dict[str, bytes]:
    """Every object of the store with its bytes, but for the lock's own."""
    return state_snapshot(io)


def tree(path: Path) -> dict[str, bytes | None]:
    """Every file and directory below ``path`` (directories map to None)."""
    found: dict[str, bytes | None] = {}
    for entry in sorted(path.rglob("*")):
        rel = entry.relative_to(path).as_posix()
        found[rel] = entry.read_bytes() if entry.is_file() else None
    return found


def engine_for(io: TaskIO, stages: list[Any] | None = None, **kwargs: Any) -> CheckMateEngine:
    return CheckMateEngine(
        io, task_id=kwargs.pop("task_id", TASK), stage_templates=stages or make_stages(3), **kwargs
    )


def persist(io: TaskIO, progress: str) -> dict[str, str]:
    """Create task TASK (3 AddStages) as CREATED or COMPLETE; return stage name -> object name."""
    engine = engine_for(io)
    with engine:
        names = {s.stage_name: s.obj_name for s in engine.stages}
        if progress == "complete":
            assert engine.execute() is StageStatus.COMPLETE
    assert snapshot(io), "the task left no objects"
    return names


def assert_untouched(io: TaskIO, engine: CheckMateEngine, before: dict[str, bytes]) -> None:
    assert snapshot(io) == before
    assert engine.has_lockfile is False


def renamed() -> list[Any]:
    stages: list[Any] = make_stages(3)
    stages[1] = AddStage(stage_name="s1-renamed", state=PipeState(), add=2)
    return stages


def reordered() -> list[Any]:
    s0, s1, s2 = make_stages(3)
    return [s1, s0, s2]


def other_class() -> list[Any]:
    stages: list[Any] = make_stages(3)
    stages[1] = OtherAddStage(stage_name="s1", state=PipeState(), add=2)
    return stages


def other_state_class() -> list[Any]:
    stages: list[Any] = make_stages(3)
    stages[1] = OtherStateStage(stage_name="s1", state=OtherState())
    return stages


MISMATCHES: dict[str, Callable[[], list[Any]]] = {
    "renamed": renamed,
    "removed_last": lambda: make_stages(2),
    "removed_middle": lambda: [s for s in make_stages(3) if s.stage_name != "s1"],
    "added": lambda: make_stages(4),
    "reordered": reordered,
    "other_class": other_class,
    "other_state_class": other_state_class,
}


# ---------------------------------------------------------------------- decision 6: mismatch


@pytest.mark.parametrize("progress", ["created", "complete"])
@pytest.mark.parametrize("mismatch", sorted(MISMATCHES))
def test_bind_with_mismatching_templates_raises_and_changes_nothing(
    io: TaskIO, mismatch: str, progress: str
) -> None:
    persist(io, progress)
    before = snapshot(io)
    engine = engine_for(io, MISMATCHES[mismatch]())

    with pytest.raises(TaskEngineException) as info:
        engine.bind()
    assert not isinstance(info.value, BindException), "a template mismatch is not a lock problem"
    assert_untouched(io, engine, before)
    with pytest.raises(TaskEngineException):
        engine.unbind()  # the failed bind left the engine unbound


@pytest.mark.parametrize("auto_cleanup", [False, True])
@pytest.mark.parametrize("mismatch", sorted(MISMATCHES))
def test_execute_with_mismatching_templates_raises_and_changes_nothing(
    io: TaskIO, mismatch: str, auto_cleanup: bool
) -> None:
    persist(io, "complete")
    before = snapshot(io)
    engine = engine_for(io, MISMATCHES[mismatch](), auto_cleanup=auto_cleanup)

    with pytest.raises(TaskEngineException):
        engine.execute()
    assert_untouched(io, engine, before)
    with pytest.raises(TaskEngineException):
        engine.execute(strict_recovery=True)
    assert_untouched(io, engine, before)


@pytest.mark.parametrize("mismatch", sorted(MISMATCHES))
def test_status_with_mismatching_templates_raises(io: TaskIO, mismatch: str) -> None:
    persist(io, "complete")
    before = snapshot(io)
    engine = engine_for(io, MISMATCHES[mismatch]())
    with pytest.raises(TaskEngineException):
        _ = engine.status
    assert_untouched(io, engine, before)


def test_original_templates_still_resume_after_a_rejected_bind(io: TaskIO) -> None:
    persist(io, "created")
    for make in MISMATCHES.values():
        with pytest.raises(TaskEngineException):
            engine_for(io, make()).bind()
    engine = engine_for(io)
    assert engine.execute() is StageStatus.COMPLETE
    assert engine.task_result == Payload(value=expected_value(3))


# ---------------------------------------------------------------------- decision 6: corrupt


def edit_state(**changes: Any) -> Callable[[bytes], bytes]:
    """Return a corruption that sets fields of the persisted state."""

    def corrupt(data: bytes) -> bytes:
        doc = json.loads(data)
        doc["state"].update(changes)
        return json.dumps(doc).encode()

    return corrupt


def drop_state(data: bytes) -> bytes:
    doc = json.loads(data)
    del doc["state"]
    return json.dumps(doc).encode()


CORRUPTIONS: dict[str, Callable[[bytes], bytes]] = {
    "not_json": lambda _: b"{this is not json",
    "empty": lambda _: b"",
    "truncated": lambda data: data[: len(data) // 2],
    "binary": lambda _: b"\xff\xfe\x00\x01\x80garbage",
    "json_list": lambda _: b"[1, 2, 3]",
    "json_null": lambda _: b"null",
    "json_string": lambda _: b'"CREATED"',
    "json_number": lambda _: b"42",
    "json_empty_object": lambda _: b"{}",
    "deeply_nested": lambda _: b"[" * 100_000 + b"]" * 100_000,
    "no_state": drop_state,
    "state_not_object": edit_state(),  # replaced below
    "attempts_negative": edit_state(attempts=-1),
    "attempts_not_int": edit_state(attempts="many"),
    "status_bogus": edit_state(status="BOGUS"),
    "status_lowercase": edit_state(status="complete"),
    "unknown_state_field": edit_state(surprise=1),
    "field_wrong_type": edit_state(value="not a number"),
    "result_wrong_shape": edit_state(result={"value": "x"}),
    "history_not_list": edit_state(history="none"),
    "history_entry_garbage": edit_state(history=[{"nonsense": True}]),
}


def _state_not_object(data: bytes) -> bytes:
    doc = json.loads(data)
    doc["state"] = "CREATED"
    return json.dumps(doc).encode()


CORRUPTIONS["state_not_object"] = _state_not_object


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_bind_with_corrupt_object_raises_naming_it_and_changes_nothing(
    io: TaskIO, corruption: str
) -> None:
    names = persist(io, "complete")
    victim = names["s1"]
    io.write(victim, CORRUPTIONS[corruption](io.read(victim)))
    before = snapshot(io)
    engine = engine_for(io)

    with pytest.raises(TaskEngineException) as info:
        engine.bind()
    assert not isinstance(info.value, BindException)
    assert victim in str(info.value), f"the error does not name {victim!r}: {info.value}"
    assert_untouched(io, engine, before)

    with pytest.raises(TaskEngineException) as info:
        engine.execute()
    assert victim in str(info.value)
    assert_untouched(io, engine, before)


@pytest.mark.parametrize("auto_cleanup", [False, True])
@pytest.mark.parametrize("corruption", ["not_json", "attempts_negative", "status_bogus"])
@pytest.mark.parametrize("position", ["s0", "s2"])
def test_corrupt_first_or_last_object_is_rejected(
    io: TaskIO, corruption: str, position: str, auto_cleanup: bool
) -> None:
    names = persist(io, "created")
    victim = names[position]
    io.write(victim, CORRUPTIONS[corruption](io.read(victim)))
    before = snapshot(io)
    engine = engine_for(io, auto_cleanup=auto_cleanup)
    with pytest.raises(TaskEngineException) as info:
        engine.execute()
    assert victim in str(info.value)
    assert_untouched(io, engine, before)


@pytest.mark.parametrize("corruption", ["not_json", "json_list", "status_bogus"])
def test_status_of_corrupt_task_raises_task_engine_exception(io: TaskIO, corruption: str) -> None:
    names = persist(io, "complete")
    io.write(names["s2"], CORRUPTIONS[corruption](io.read(names["s2"])))
    before = snapshot(io)
    engine = engine_for(io)
    with pytest.raises(TaskEngineException):
        _ = engine.status
    with pytest.raises(TaskEngineException):
        _ = engine.task_result
    assert_untouched(io, engine, before)


# ---------------------------------------------------------------------- interrupted stage


@pytest.mark.parametrize("auto_cleanup", [False, True])
def test_execute_finding_an_interrupted_stage_changes_nothing(
    io: TaskIO, auto_cleanup: bool
) -> None:
    with engine_for(io) as engine:
        first, second, _ = engine.stages
        for status in (StageStatus.RUNNING, StageStatus.COMPLETE):
            first.update_status("ran", status, 1_700_000_000.0)
        second.update_status("its process died", StageStatus.RUNNING, 1_700_000_000.0)
    before = snapshot(io)
    engine = engine_for(io, auto_cleanup=auto_cleanup)
    with pytest.raises(TaskEngineException) as info:
        engine.execute()
    assert "s1" in str(info.value), "the error does not name the interrupted stage"
    assert_untouched(io, engine, before)
    assert engine.status is StageStatus.RUNNING


# ---------------------------------------------------------------------- force_create


@pytest.mark.parametrize("auto_cleanup", [False, True])
def test_force_create_on_existing_state_raises_and_changes_nothing(
    io: TaskIO, auto_cleanup: bool
) -> None:
    persist(io, "complete")
    before = snapshot(io)
    engine = engine_for(io, force_create=True, auto_cleanup=auto_cleanup)
    with pytest.raises(TaskEngineException) as info:
        engine.bind()
    assert not isinstance(info.value, BindException)
    assert_untouched(io, engine, before)
    with pytest.raises(TaskEngineException):
        engine.execute()
    assert_untouched(io, engine, before)


def test_force_create_with_partial_existing_state_raises(io: TaskIO) -> None:
    names = persist(io, "created")
    io.delete(names["s0"])
    io.delete(names["s1"])
    before = snapshot(io)
    engine = engine_for(io, force_create=True)
    with pytest.raises(TaskEngineException):
        engine.execute()
    assert_untouched(io, engine, before)


def test_force_create_on_a_new_task_runs_it(io: TaskIO) -> None:
    engine = engine_for(io, force_create=True)
    assert engine.execute() is StageStatus.COMPLETE
    assert engine.task_result == Payload(value=expected_value(3))
    assert engine_for(io).status is StageStatus.COMPLETE


# ---------------------------------------------------------------------- decision 7: task ids


def test_task_id_none_generates_a_uuid4_hex(io: TaskIO) -> None:
    first = CheckMateEngine(io, task_id=None, stage_templates=make_stages(2))
    second = CheckMateEngine(io, stage_templates=make_stages(2))
    for engine in (first, second):
        assert re.fullmatch(r"[0-9a-f]{32}", engine.task_id), engine.task_id
    assert first.task_id != second.task_id
    assert io.list("") == [], "constructing an engine wrote something"

    assert first.execute() is StageStatus.COMPLETE
    again = CheckMateEngine(io, task_id=first.task_id, stage_templates=make_stages(2))
    assert again.status is StageStatus.COMPLETE
    assert again.task_result == Payload(value=expected_value(2))
    assert CheckMateEngine(io, task_id=second.task_id, stage_templates=make_stages(2)).status in (
        StageStatus.UNBOUND,
        StageStatus.CREATED,
    )


HOSTILE_TASK_IDS = [
    "",
    ".",
    "..",
    "../x",
    "../../escape",
    "a/b",
    "/abs",
    "x/",
    ".hidden",
    "a\\b",
    "..\\x",
    "x" * 129,
    "a b",
    " x",
    "é",
    "tâche",
    "a\x00b",
    "abc\n",
    "tab\tid",
    "a:b",
    "a*b",
    "a?b",
    "~user",
    "%2e%2e",
]


@pytest.mark.parametrize("task_id", HOSTILE_TASK_IDS, ids=repr)
def test_hostile_task_id_is_rejected_before_anything_is_written(
    io: TaskIO, tmp_path: Path, task_id: str
) -> None:
    memory_store = fsspec.filesystem("memory").store
    before = tree(tmp_path)
    memory_before = dict(memory_store)
    with pytest.raises(TaskEngineException):
        CheckMateEngine(io, task_id=task_id, stage_templates=make_stages(2))
    with pytest.raises(TaskEngineException):
        CheckMateEngine(io, task_id=task_id, stage_templates=make_stages(2), force_create=True)
    assert io.list("") == []
    assert tree(tmp_path) == before
    assert dict(memory_store) == memory_before


@pytest.mark.parametrize("task_id", [123, b"job", 1.5, ["job"]], ids=repr)
def test_non_string_task_id_is_rejected(io: TaskIO, task_id: Any) -> None:
    with pytest.raises(TaskEngineException):
        CheckMateEngine(io, task_id=task_id, stage_templates=make_stages(1))
    assert io.list("") == []


@pytest.mark.parametrize(
    "task_id", ["a", "0", "A-b_c.d", "x" * 128, "_x", "-x", "x.", "v1.2.3"], ids=repr
)
def test_safe_task_ids_are_accepted_and_work(io: TaskIO, task_id: str) -> None:
    engine = CheckMateEngine(io, task_id=task_id, stage_templates=make_stages(2))
    assert engine.task_id == task_id
    assert engine.execute() is StageStatus.COMPLETE
    again = CheckMateEngine(io, task_id=task_id, stage_templates=make_stages(2))
    assert again.status is StageStatus.COMPLETE
    assert again.task_result == Payload(value=expected_value(2))


def test_tasks_with_distinct_ids_do_not_share_state(io: TaskIO) -> None:
    done = engine_for(io, task_id="job-a")
    assert done.execute() is StageStatus.COMPLETE
    other = engine_for(io, task_id="job-b")
    assert other.status is not StageStatus.COMPLETE
    with other:
        assert other.status is StageStatus.CREATED
        assert [s.state.status for s in other.stages] == [StageStatus.CREATED] * 3


# ---------------------------------------------------------------------- decision 7: stage names

EXOTIC_STAGE_NAMES = [
    "é" * STAGE_NAME_MAX_LENGTH,
    "日" * STAGE_NAME_MAX_LENGTH,
    "🙂" * STAGE_NAME_MAX_LENGTH,
    "x" * STAGE_NAME_MAX_LENGTH,
    "Extract",
    "extract",
    "EXTRACT",
    "with space",
    " ",
    "...",
    ".hidden",
    "trailing.",
    "CON",
    "nul",
    'a:b*c?<>|"',
    "task.lock",
    "task",
    "s0.json",
    "new\nline",
    "tab\tname",
    "%2F",
    "\u00e9",
    "e\u0301",
    "Ä",
    "ä",
]


def basename_bytes(obj_name: str) -> int:
    return len(obj_name.rpartition("/")[2].encode("utf-8"))


def test_exotic_stage_names_work_end_to_end(io: TaskIO) -> None:
    def stages() -> list[AddStage]:
        return [
            AddStage(stage_name=name, state=PipeState(), add=i + 1)
            for i, name in enumerate(EXOTIC_STAGE_NAMES)
        ]

    engine = engine_for(io, stages())
    with engine:
        assert engine.execute() is StageStatus.COMPLETE
        obj_names = [s.obj_name for s in engine.stages]
        assert all(s.persistence_file_exists() for s in engine.stages)
    assert len(set(obj_names)) == len(EXOTIC_STAGE_NAMES)
    assert len({n.lower() for n in obj_names}) == len(obj_names), "case-only collision"
    for obj_name in io.list(""):
        assert basename_bytes(obj_name) <= 255, obj_name
    for stage_name, obj_name in zip(EXOTIC_STAGE_NAMES, obj_names, strict=True):
        doc = json.loads(io.read(obj_name))
        assert doc["stage_name"] == stage_name
        assert doc["state"]["status"] == "COMPLETE"

    again = engine_for(io, stages())
    assert again.status is StageStatus.COMPLETE
    assert again.task_result == Payload(value=expected_value(len(EXOTIC_STAGE_NAMES)))


def test_longest_multibyte_stage_name_works_on_every_backend(io: TaskIO) -> None:
    name = "é" * STAGE_NAME_MAX_LENGTH
    assert len(name.encode("utf-8")) == 300
    engine = engine_for(io, [AddStage(stage_name=name, state=PipeState(), add=5)])
    assert engine.execute() is StageStatus.COMPLETE
    assert engine.task_result == Payload(value=5)
    objects = io.list("")
    assert objects
    assert all(basename_bytes(n) <= 255 for n in objects)
    with engine:
        assert engine.stages[0].state.status is StageStatus.COMPLETE
        assert engine.stages[0].persistence_file_exists()
        assert engine.check_sync()


def test_case_distinct_stage_names_get_distinct_objects(io: TaskIO) -> None:
    def stages() -> list[AddStage]:
        return [
            AddStage(stage_name="Extract", state=PipeState(), add=1),
            AddStage(stage_name="extract", state=PipeState(), add=10),
        ]

    engine = engine_for(io, stages())
    with engine:
        assert engine.execute() is StageStatus.COMPLETE
        upper, lower = (s.obj_name for s in engine.stages)
    assert upper != lower
    assert upper.lower() != lower.lower()
    assert json.loads(io.read(upper))["state"]["value"] == 1
    assert json.loads(io.read(lower))["state"]["value"] == 11
    with engine_for(io, stages()) as again:
        assert [s.state.value for s in again.stages] == [1, 11]


INVALID_STAGE_NAMES = [
    "",
    "/",
    "a/b",
    "../x",
    "\\",
    "a\\b",
    "\x00",
    "a\x00b",
    ".",
    "..",
    "x" * (STAGE_NAME_MAX_LENGTH + 1),
    "é" * (STAGE_NAME_MAX_LENGTH + 1),
]


@pytest.mark.parametrize("name", INVALID_STAGE_NAMES, ids=repr)
def test_invalid_stage_name_is_rejected_at_construction(name: str) -> None:
    with pytest.raises((ValidationError, TaskEngineException)):
        AddStage(stage_name=name, state=PipeState())


def test_stage_name_at_the_length_limit_is_accepted() -> None:
    stage = AddStage(stage_name="x" * STAGE_NAME_MAX_LENGTH, state=PipeState())
    assert len(stage.stage_name) == STAGE_NAME_MAX_LENGTH == 150


# ---------------------------------------------------------------------- engine.stages


def test_unbound_stages_are_fresh_copies_of_the_templates(io: TaskIO) -> None:
    templates = make_stages(3)
    engine = engine_for(io, templates)
    stages = engine.stages
    assert [s.stage_name for s in stages] == ["s0", "s1", "s2"]
    for stage, template in zip(stages, templates, strict=True):
        assert stage is not template
        assert stage.state is not template.state
        assert stage.model_dump() == template.model_dump()
        assert stage.state.status is StageStatus.UNBOUND
    stages[0].state.value = 1234
    assert templates[0].state.value == 0


def test_bound_stages_are_the_instances_that_run(io: TaskIO) -> None:
    engine = engine_for(io)
    with engine:
        bound = engine.stages
        assert [id(s) for s in engine.stages] == [id(s) for s in bound]
        for stage in bound:
            assert stage.state.task_id == TASK
            assert stage.state.status is StageStatus.CREATED
            assert stage.volatile_engine_ref is engine
        assert [s.state.stage_name for s in bound] == ["s0", "s1", "s2"]
        assert engine.execute() is StageStatus.COMPLETE
        assert [s.state.value for s in bound] == [1, 3, 6]
        assert all(s.state.status is StageStatus.COMPLETE for s in bound)
    after = engine.stages
    for old, new in zip(bound, after, strict=True):
        assert new is not old
        assert new.state.status is StageStatus.UNBOUND
        assert new.volatile_engine_ref is None
        with pytest.raises(TaskEngineException):
            _ = new.obj_name


def test_bind_loads_persisted_state_into_the_stages(io: TaskIO) -> None:
    persist(io, "complete")
    with engine_for(io) as engine:
        assert [s.state.value for s in engine.stages] == [1, 3, 6]
        assert [s.state.attempts for s in engine.stages] == [1, 1, 1]
        assert [s.state.task_id for s in engine.stages] == [TASK] * 3
        assert [s.state.stage_name for s in engine.stages] == ["s0", "s1", "s2"]


def test_templates_are_never_modified_by_the_engine(io: TaskIO) -> None:
    templates = make_stages(3)
    dumps = [t.model_dump() for t in templates]
    engine = engine_for(io, templates)
    assert engine.execute() is StageStatus.COMPLETE
    with engine:
        pass
    assert [t.model_dump() for t in templates] == dumps
    assert all(t.volatile_engine_ref is None for t in templates)


# ---------------------------------------------------------------------- task_state


def test_task_state_holds_classes_and_private_copies(io: TaskIO) -> None:
    templates: list[Any] = make_stages(2)
    templates.append(OtherAddStage(stage_name="s2", state=PipeState(), add=3))
    engine = engine_for(io, templates)
    state = engine.task_state
    assert isinstance(state, TaskEngineState)
    classes = state.stage_template_classes
    assert len(classes) == 3
    assert all(isinstance(c, str) for c in classes)
    assert "AddStage" in classes[0]
    assert classes[0] == classes[1] != classes[2]
    assert "OtherAddStage" in classes[2]
    for copy, template in zip(state.stage_templates, templates, strict=True):
        assert copy is not template
        assert copy.state is not template.state
        assert copy.model_dump() == template.model_dump()


def test_mutating_a_template_after_construction_changes_nothing(io: TaskIO) -> None:
    templates = make_stages(3)
    engine = engine_for(io, templates)
    templates[0].add = 100
    templates[1].state.value = 999
    templates[2].description = "changed"
    assert engine.task_state.stage_templates[0].add == 1
    assert engine.task_state.stage_templates[1].state.value == 0
    assert engine.task_state.stage_templates[2].description == ""
    assert engine.execute() is StageStatus.COMPLETE
    assert engine.task_result == Payload(value=expected_value(3))


# ---------------------------------------------------------------------- context manager


def test_context_manager_binds_and_unbinds(io: TaskIO) -> None:
    engine = engine_for(io)
    rival = engine_for(io)
    with engine as entered:
        assert entered is engine
        assert engine.has_lockfile
        assert engine.stages[0].persistence_file_exists()
        with pytest.raises(BindException):
            rival.bind()
        assert engine.execute() is StageStatus.COMPLETE
    assert not engine.has_lockfile
    with pytest.raises(TaskEngineException):
        engine.unbind()
    with rival:
        assert rival.status is StageStatus.COMPLETE


def test_context_manager_unbinds_when_the_block_raises(io: TaskIO) -> None:
    engine = engine_for(io)
    with pytest.raises(KeyError), engine:
        raise KeyError("boom")
    assert not engine.has_lockfile
    with engine_for(io) as again:
        assert again.status is StageStatus.CREATED


def test_bind_twice_raises(io: TaskIO) -> None:
    engine = engine_for(io)
    with engine:
        before = snapshot(io)
        with pytest.raises(TaskEngineException):
            engine.bind()
        assert snapshot(io) == before
        assert engine.check_sync()


# ---------------------------------------------------------------------- BaseStage methods


def test_gen_obj_name_obj_name_and_url(io: TaskIO) -> None:
    templates = make_stages(3)
    engine = engine_for(io, templates)
    predicted = [t.gen_obj_name(engine) for t in templates]
    assert len(set(predicted)) == 3
    with pytest.raises(TaskEngineException):
        templates[0].gen_obj_name()
    with pytest.raises(TaskEngineException):
        _ = engine.stages[0].obj_name
    with pytest.raises(TaskEngineException):
        _ = engine.stages[0].url
    with engine:
        assert [s.obj_name for s in engine.stages] == predicted
        assert [s.gen_obj_name() for s in engine.stages] == predicted
        for stage in engine.stages:
            assert io.exists(stage.obj_name)
            assert stage.url == io.url(stage.obj_name)
    other = engine_for(io, task_id="other-job")
    assert templates[0].gen_obj_name(other) != predicted[0]


def test_inc_attempts_counts_up() -> None:
    stage = AddStage(stage_name="s", state=PipeState())
    assert stage.inc_attempts() == 1
    assert stage.inc_attempts() == 2
    assert stage.state.attempts == 2


def test_persistence_file_exists(io: TaskIO) -> None:
    engine = engine_for(io)
    with pytest.raises(TaskEngineException):
        engine.stages[0].persistence_file_exists()
    with engine:
        assert all(s.persistence_file_exists() for s in engine.stages)
        io.delete(engine.stages[1].obj_name)
        assert engine.stages[0].persistence_file_exists()
        assert not engine.stages[1].persistence_file_exists()


def test_update_status_persists_records_and_calls_the_hook(io: TaskIO) -> None:
    engine = RecordingEngine(io, task_id=TASK, stage_templates=make_stages(3))
    with engine:
        engine.updates.clear()
        stage = engine.stages[0]
        history_before = len(stage.state.history)
        stage.update_status("manual start", StageStatus.RUNNING, 1_700_000_000.0, 1_700_000_002.5)
        assert stage.state.status is StageStatus.RUNNING
        assert len(stage.state.history) == history_before + 1
        entry = stage.state.history[-1]
        assert entry.begin_status is StageStatus.CREATED
        assert entry.end_status is StageStatus.RUNNING
        assert entry.message == "manual start"
        assert entry.run_time_seconds == pytest.approx(2.5)
        assert entry.begin_ts.startswith("2023-11-14T22:13:20")
        assert entry.begin_ts.endswith("+00:00")
        assert engine.updates == [("s0", StageStatus.RUNNING)]
        assert engine.check_sync()
        doc = json.loads(io.read(stage.obj_name))
        assert doc["state"]["status"] == "RUNNING"
        assert doc["state"]["history"][-1]["message"] == "manual start"
    assert engine_for(io).status is StageStatus.RUNNING


@pytest.mark.parametrize(
    ("path", "invalid"),
    [
        ([], StageStatus.COMPLETE),
        ([], StageStatus.RETRY),
        ([], StageStatus.CREATED),
        ([], StageStatus.UNBOUND),
        ([StageStatus.RUNNING, StageStatus.COMPLETE], StageStatus.RUNNING),
        ([StageStatus.RUNNING, StageStatus.COMPLETE], StageStatus.CANCELED),
        ([StageStatus.ERROR], StageStatus.RUNNING),
        ([StageStatus.CANCELED], StageStatus.CREATED),
    ],
)
def test_update_status_rejects_an_invalid_transition(
    io: TaskIO, path: list[StageStatus], invalid: StageStatus
) -> None:
    engine = RecordingEngine(io, task_id=TASK, stage_templates=make_stages(1))
    with engine:
        stage = engine.stages[0]
        for status in path:
            stage.update_status("step", status, 1_700_000_000.0)
        before = snapshot(io)
        state_before = stage.state.model_dump()
        engine.updates.clear()
        with pytest.raises(TaskEngineException):
            stage.update_status("impossible", invalid, 1_700_000_000.0)
        assert snapshot(io) == before
        assert stage.state.model_dump() == state_before
        assert engine.updates == []
        assert engine.check_sync()


def test_update_status_of_an_unbound_stage_raises() -> None:
    stage = AddStage(stage_name="s", state=PipeState())
    with pytest.raises(TaskEngineException):
        stage.update_status("no engine", StageStatus.CREATED, 1_700_000_000.0)
    assert stage.state.status is StageStatus.UNBOUND
    assert stage.state.history == []


def test_stages_are_fresh_copies_again_after_an_unbound_execute(io: TaskIO) -> None:
    engine = engine_for(io)
    assert engine.execute() is StageStatus.COMPLETE
    for stage in engine.stages:
        assert stage.state.status is StageStatus.UNBOUND
        assert stage.state.value == 0
        assert stage.volatile_engine_ref is None
    assert engine.status is StageStatus.COMPLETE


def test_bind_to_engine_loads_state_and_refuses_a_second_bind(io: TaskIO) -> None:
    persist(io, "complete")
    with engine_for(io) as engine:
        with pytest.raises(TaskEngineException):
            engine.stages[0].bind_to_engine(engine)
        copy = engine.task_state.stage_templates[1].model_copy(deep=True)
        assert copy.bind_to_engine(engine) is copy
        assert copy.state.status is StageStatus.COMPLETE
        assert copy.state.value == 3
        assert copy.obj_name == engine.stages[1].obj_name
