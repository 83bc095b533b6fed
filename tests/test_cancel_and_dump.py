"""Cancel, task status, dumps, sync checks and cleanup.

Decisions 9 to 12 of the core-engine issue.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
from colorama import Fore
from conftest import state_snapshot
from pipelines import AddStage, Payload, PipeState, append_line, expected_value, read_log

from checkmate import (
    BindException,
    CheckMateEngine,
    RetryPolicy,
    StageStatus,
    TaskEngineException,
    TaskIO,
)

TASK = "job"
NAMES = ["extract", "transform", "load"]
S = StageStatus

PATHS: dict[StageStatus, list[StageStatus]] = {
    S.CREATED: [],
    S.RUNNING: [S.RUNNING],
    S.RETRY: [S.RUNNING, S.RETRY],
    S.COMPLETE: [S.RUNNING, S.COMPLETE],
    S.ERROR: [S.RUNNING, S.ERROR],
    S.CANCELED: [S.CANCELED],
}
"""How a stage gets from CREATED to each status."""


# ---------------------------------------------------------------------- helpers


class CancelStage(AddStage):
    """An AddStage that logs its cancel hook to ``log_path``."""

    def cancel(self) -> None:
        append_line(self.log_path, f"cancel {self.stage_name}")


class RecordingEngine(CheckMateEngine[Any, Any]):
    """Remembers every state_update_hook call as (stage name, status)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.updates: list[tuple[str, StageStatus]] = []

    def state_update_hook(self, stage: Any) -> None:
        self.updates.append((stage.stage_name, stage.state.status))


def stages(log: Path | None = None, **per_stage: dict[str, Any]) -> list[CancelStage]:
    return [
        CancelStage(
            stage_name=name,
            state=PipeState(),
            add=i + 1,
            log_path=str(log or ""),
            **per_stage.get(name, {}),
        )
        for i, name in enumerate(NAMES)
    ]


def engine_for(
    io: TaskIO, log: Path | None = None, cls: type[CheckMateEngine] = CheckMateEngine, **kwargs: Any
) -> CheckMateEngine:
    per_stage = kwargs.pop("per_stage", {})
    return cls(io, task_id=TASK, stage_templates=stages(log, **per_stage), **kwargs)


def snapshot(io: TaskIO) -> dict[str, bytes]:
    return state_snapshot(io)


def advance(engine: CheckMateEngine, targets: list[StageStatus]) -> None:
    """Move the bound engine's stages, in order, to the target statuses."""
    for stage, target in zip(engine.stages, targets, strict=True):
        for status in PATHS[target]:
            stage.update_status(f"test moves it to {status}", status, 1_700_000_000.0)


def persisted_statuses(io: TaskIO, engine: CheckMateEngine) -> list[str]:
    with engine:
        names = [s.obj_name for s in engine.stages]
    return [json.loads(io.read(n))["state"]["status"] for n in names]


def edited(data: bytes, target: StageStatus) -> bytes:
    """A CREATED stage object moved to ``target`` by editing its JSON consistently."""
    doc = json.loads(data)
    state = doc["state"]
    assert state["status"] == "CREATED"
    for status in PATHS[target]:
        if status is S.RUNNING:
            state["attempts"] += 1
        entry = dict(state["history"][-1])
        entry.update(
            attempt=state["attempts"],
            begin_status=state["status"],
            end_status=status.value,
            message=f"edited to {status}",
        )
        state["history"].append(entry)
        state["status"] = status.value
    return json.dumps(doc).encode()


def json_blocks(text: str) -> list[Any]:
    """Every indented JSON object of a dump (a line "{" up to the next line "}")."""
    blocks: list[Any] = []
    lines = text.splitlines()
    start: int | None = None
    for index, line in enumerate(lines):
        if line == "{" and start is None:
            start = index
        elif line == "}" and start is not None:
            blocks.append(json.loads("\n".join(lines[start : index + 1])))
            start = None
    return blocks


def sections(dump: str) -> list[str]:
    """The part of a dump about each stage: from its name up to the next stage's name."""
    positions = []
    offset = 0
    for name in NAMES:
        found = dump.find(name, offset)
        assert found >= 0, f"stage {name!r} missing from the dump"
        positions.append(found)
        offset = found + 1
    positions.append(len(dump))
    return [dump[positions[i] : positions[i + 1]] for i in range(len(NAMES))]


ANSI = re.compile(r"\x1b\[[0-9;]*m")


# ---------------------------------------------------------------------- decision 9: cancel

CANCEL_CASES = {
    "nothing_ran": ([S.CREATED, S.CREATED, S.CREATED], 0),
    "first_complete": ([S.COMPLETE, S.CREATED, S.CREATED], 1),
    "running": ([S.COMPLETE, S.RUNNING, S.CREATED], 1),
    "retry": ([S.COMPLETE, S.RETRY, S.CREATED], 1),
    "first_running": ([S.RUNNING, S.CREATED, S.CREATED], 0),
    "last_pending": ([S.COMPLETE, S.COMPLETE, S.CREATED], 2),
    "last_retry": ([S.COMPLETE, S.COMPLETE, S.RETRY], 2),
}


@pytest.mark.parametrize("case", sorted(CANCEL_CASES))
def test_cancel_cancels_the_current_stage_and_every_later_one(
    io: TaskIO, tmp_path: Path, case: str
) -> None:
    targets, current = CANCEL_CASES[case]
    log = tmp_path / "log.txt"
    engine = engine_for(io, log, cls=RecordingEngine)
    with engine:
        advance(engine, targets)
        engine.updates.clear()
        engine.cancel()
        assert read_log(log) == [f"cancel {NAMES[current]}"]
        statuses = [s.state.status for s in engine.stages]
        assert statuses == targets[:current] + [S.CANCELED] * (3 - current)
        for stage in engine.stages[current:]:
            last = stage.state.history[-1]
            assert last.end_status is S.CANCELED
            assert last.message
        assert engine.updates == [(name, S.CANCELED) for name in NAMES[current:]]
        assert engine.status is S.CANCELED
        assert engine.check_sync()
    assert engine.status is S.CANCELED
    assert persisted_statuses(io, engine) == [s.value for s in statuses]


def test_cancel_is_persisted_and_the_task_never_runs_again(io: TaskIO, tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    engine = engine_for(io, log)
    with engine:
        advance(engine, [S.COMPLETE, S.CREATED, S.CREATED])
        engine.cancel()
    again = engine_for(io, log)
    assert again.status is S.CANCELED
    assert again.execute() is S.CANCELED
    assert read_log(log) == ["cancel transform"], "a canceled task ran a stage"


def test_canceling_a_canceled_task_does_nothing(io: TaskIO, tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    engine = engine_for(io, log, cls=RecordingEngine)
    with engine:
        engine.cancel()
        before = snapshot(io)
        engine.updates.clear()
        engine.cancel()
        assert snapshot(io) == before
        assert engine.updates == []
    with engine:
        engine.cancel()
    after = {n: b for n, b in snapshot(io).items() if not n.startswith(engine.lock_obj_name)}
    assert after == {n: b for n, b in before.items() if not n.startswith(engine.lock_obj_name)}
    assert read_log(log) == ["cancel extract"]
    assert engine.status is S.CANCELED


def test_canceling_a_task_left_half_canceled_does_nothing(io: TaskIO, tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    write_combination(io, [S.COMPLETE, S.CANCELED, S.CREATED])
    engine = engine_for(io, log, cls=RecordingEngine)
    assert engine.status is S.CANCELED
    before = snapshot(io)
    with engine:
        engine.cancel()
        assert engine.updates == []
    assert snapshot(io) == before
    assert read_log(log) == []


def test_complete_task_cannot_be_canceled(io: TaskIO, tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    engine = engine_for(io, log)
    with engine:
        assert engine.execute() is S.COMPLETE
        before = snapshot(io)
        with pytest.raises(TaskEngineException):
            engine.cancel()
        assert snapshot(io) == before
        assert engine.status is S.COMPLETE
        assert engine.check_sync()
    assert not any(line.startswith("cancel") for line in read_log(log))


def test_failed_task_cannot_be_canceled(io: TaskIO, tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    engine = engine_for(io, log, per_stage={"transform": {"fail_times": 1}})
    with engine:
        with pytest.raises(TaskEngineException):
            engine.execute()
        assert engine.status is S.ERROR
        before = snapshot(io)
        with pytest.raises(TaskEngineException):
            engine.cancel()
        assert snapshot(io) == before
        assert [s.state.status for s in engine.stages] == [S.COMPLETE, S.ERROR, S.CREATED]
    assert not any(line.startswith("cancel") for line in read_log(log))
    assert engine.status is S.ERROR


# ---------------------------------------------------------------------- decision 10: status

STATUS_CASES = [
    ([S.CREATED, S.CREATED, S.CREATED], S.CREATED),
    ([S.COMPLETE, S.CREATED, S.CREATED], S.CREATED),
    ([S.COMPLETE, S.COMPLETE, S.CREATED], S.CREATED),
    ([S.RUNNING, S.CREATED, S.CREATED], S.RUNNING),
    ([S.COMPLETE, S.RUNNING, S.CREATED], S.RUNNING),
    ([S.COMPLETE, S.COMPLETE, S.RUNNING], S.RUNNING),
    ([S.RETRY, S.CREATED, S.CREATED], S.RETRY),
    ([S.COMPLETE, S.RETRY, S.CREATED], S.RETRY),
    ([S.ERROR, S.CREATED, S.CREATED], S.ERROR),
    ([S.COMPLETE, S.ERROR, S.CREATED], S.ERROR),
    ([S.COMPLETE, S.COMPLETE, S.ERROR], S.ERROR),
    ([S.CANCELED, S.CANCELED, S.CANCELED], S.CANCELED),
    ([S.COMPLETE, S.CANCELED, S.CANCELED], S.CANCELED),
    ([S.COMPLETE, S.CANCELED, S.CREATED], S.CANCELED),
    ([S.CANCELED, S.CREATED, S.CREATED], S.CANCELED),
    ([S.COMPLETE, S.COMPLETE, S.COMPLETE], S.COMPLETE),
]


@pytest.mark.parametrize(("targets", "expected"), STATUS_CASES, ids=str)
def test_status_aggregates_the_stages(
    io: TaskIO, targets: list[StageStatus], expected: StageStatus
) -> None:
    engine = engine_for(io)
    with engine:
        advance(engine, targets)
        assert engine.status is expected
    assert engine.status is expected, "the persisted state gives another status"
    with engine_for(io) as again:
        assert again.status is expected
        assert [s.state.status for s in again.stages] == targets


def test_status_of_a_task_that_was_never_bound_is_unbound(io: TaskIO) -> None:
    engine = engine_for(io)
    assert engine.status is S.UNBOUND
    assert engine.task_result is None
    assert engine.cumulative_attempts == 0
    assert io.list("") == [], "reading the status wrote something"


def test_status_is_unbound_when_a_stage_object_is_missing(io: TaskIO) -> None:
    engine = engine_for(io)
    with engine:
        assert engine.execute() is S.COMPLETE
        last = engine.stages[2].obj_name
    io.delete(last)
    assert engine.status is S.UNBOUND
    assert engine.task_result == Payload(value=1 + 2)


IMPOSSIBLE = [
    [S.CREATED, S.COMPLETE, S.CREATED],
    [S.CREATED, S.RUNNING, S.CREATED],
    [S.CREATED, S.CREATED, S.ERROR],
    [S.CREATED, S.CREATED, S.COMPLETE],
    [S.RETRY, S.RUNNING, S.CREATED],
    [S.RUNNING, S.COMPLETE, S.CREATED],
    [S.RUNNING, S.RUNNING, S.CREATED],
    [S.ERROR, S.CANCELED, S.CANCELED],
    [S.ERROR, S.ERROR, S.CREATED],
    [S.CANCELED, S.COMPLETE, S.CREATED],
    [S.COMPLETE, S.CREATED, S.COMPLETE],
    [S.COMPLETE, S.CANCELED, S.RUNNING],
    [S.CANCELED, S.RETRY, S.CREATED],
]


def write_combination(io: TaskIO, targets: list[StageStatus]) -> None:
    """Persist task TASK with its stages in ``targets``, by editing CREATED objects."""
    engine = engine_for(io)
    with engine:
        names = [s.obj_name for s in engine.stages]
    for name, target in zip(names, targets, strict=True):
        io.write(name, edited(io.read(name), target))


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        ([S.COMPLETE, S.RUNNING, S.CREATED], S.RUNNING),
        ([S.COMPLETE, S.COMPLETE, S.COMPLETE], S.COMPLETE),
        ([S.COMPLETE, S.CANCELED, S.CANCELED], S.CANCELED),
    ],
    ids=str,
)
def test_edited_objects_of_a_possible_combination_are_accepted(
    io: TaskIO, targets: list[StageStatus], expected: StageStatus
) -> None:
    """Control for the test below: the JSON edit itself yields valid objects."""
    write_combination(io, targets)
    assert engine_for(io).status is expected
    with engine_for(io) as engine:
        assert [s.state.status for s in engine.stages] == targets


@pytest.mark.parametrize("targets", IMPOSSIBLE, ids=str)
def test_impossible_combination_raises_and_changes_nothing(
    io: TaskIO, targets: list[StageStatus]
) -> None:
    write_combination(io, targets)
    before = snapshot(io)
    engine = engine_for(io)
    with pytest.raises(TaskEngineException):
        _ = engine.status
    with pytest.raises(TaskEngineException) as info:
        engine.bind()
    assert not isinstance(info.value, BindException)
    with pytest.raises(TaskEngineException):
        engine.execute(strict_recovery=True)
    with pytest.raises(TaskEngineException):
        engine.cancel()
    assert snapshot(io) == before
    assert not engine.has_lockfile


# ---------------------------------------------------------------------- decision 11: dumps


def test_dump_shows_each_stage_with_status_object_and_state(io: TaskIO) -> None:
    engine = engine_for(io)
    with engine:
        advance(engine, [S.COMPLETE, S.RETRY, S.CREATED])
        dump = engine.dump_stages(color="")
        heading = next(line for line in dump.splitlines() if line.strip())
        assert heading.startswith("#")
        assert TASK in heading
        for stage, section in zip(engine.stages, sections(dump), strict=True):
            assert stage.state.status.value in section
            assert io.url(stage.obj_name) in section
            blocks = json_blocks(section)
            assert blocks == [stage.state.model_dump(mode="json")]
        for block_line in (line for line in dump.splitlines() if '"status"' in line):
            assert block_line.startswith(" "), "the state JSON is not indented"


def test_dump_with_basenames_only_hides_the_full_url(io: TaskIO) -> None:
    engine = engine_for(io)
    with engine:
        dump = engine.dump_stages(color="", basenames_only=True)
        for stage, section in zip(engine.stages, sections(dump), strict=True):
            url = io.url(stage.obj_name)
            assert url not in dump
            assert url.rpartition("/")[2] in section
        full = engine.dump_stages(color="")
        assert all(io.url(s.obj_name) in full for s in engine.stages)


def test_dump_colors(io: TaskIO) -> None:
    engine = engine_for(io)
    with engine:
        plain = engine.dump_stages(color="")
        colored = engine.dump_stages()
        red = engine.dump_stages(color=Fore.RED)
    assert "\x1b" not in plain
    assert "\x1b" in colored
    assert Fore.RED in red
    assert ANSI.sub("", colored) == plain
    assert ANSI.sub("", red) == plain


@pytest.mark.parametrize("moment", ["after_bind", "partial", "after_execute", "canceled"])
def test_dump_of_memory_equals_dump_of_persistence(io: TaskIO, moment: str) -> None:
    engine = engine_for(io)
    with engine:
        if moment == "partial":
            advance(engine, [S.COMPLETE, S.RETRY, S.CREATED])
        elif moment == "after_execute":
            engine.execute()
        elif moment == "canceled":
            engine.cancel()
        for kwargs in ({}, {"color": ""}, {"basenames_only": True}):
            memory = engine.dump_stages("memory", **kwargs)
            assert memory == engine.dump_stages("persistence", **kwargs)
        assert engine.check_sync()


def test_dump_of_persistence_while_unbound_shows_the_stored_state(io: TaskIO) -> None:
    engine = engine_for(io)
    assert engine.execute() is S.COMPLETE
    dump = engine.dump_stages("persistence", color="")
    states = json_blocks(dump)
    assert [s["status"] for s in states] == ["COMPLETE"] * 3
    assert [s["value"] for s in states] == [1, 3, 6]


def test_source_in_heading_names_the_source(io: TaskIO) -> None:
    engine = engine_for(io)
    with engine:
        for source in ("memory", "persistence"):
            dump = engine.dump_stages(source, color="", source_in_heading=True)
            heading = next(line for line in dump.splitlines() if line.strip())
            assert source in heading
            assert TASK in heading
            plain = engine.dump_stages(source, color="")
            assert source not in next(line for line in plain.splitlines() if line.strip())


@pytest.mark.parametrize("source", ["disk", "", "Memory", "persistent"])
def test_unknown_dump_source_raises(io: TaskIO, source: str) -> None:
    engine = engine_for(io)
    with engine:
        with pytest.raises(TaskEngineException):
            engine.dump_stages(source)  # type: ignore[arg-type]
        with pytest.raises(TaskEngineException):
            engine.log_stages(source)  # type: ignore[arg-type]


def test_check_sync(io: TaskIO) -> None:
    engine = engine_for(io)
    with engine:
        assert engine.check_sync() is True
        engine.execute()
        assert engine.check_sync() is True
        stage = engine.stages[1]
        original = io.read(stage.obj_name)

        stage.state.note = "changed only in memory"
        assert engine.check_sync() is False
        stage.state.note = json.loads(original)["state"]["note"]
        assert engine.check_sync() is True

        io.delete(stage.obj_name)
        assert engine.check_sync() is False
        for garbage in (b"", b"{not json", b"[]", b"\xff\xfe"):
            io.write(stage.obj_name, garbage)
            assert engine.check_sync() is False
        io.write(stage.obj_name, original)
        assert engine.check_sync() is True


def test_log_stages_emits_the_dump_through_logging(
    io: TaskIO, caplog: pytest.LogCaptureFixture
) -> None:
    engine = engine_for(io)
    with engine:
        engine.execute()
        with caplog.at_level(logging.DEBUG):
            caplog.clear()
            engine.log_stages(color="")
            engine.log_stages("persistence", color="", basenames_only=True)
    messages = [r.getMessage() for r in caplog.records]
    memory = next(m for m in messages if TASK in m and all(n in m for n in NAMES))
    assert "COMPLETE" in memory
    assert "\x1b" not in memory
    with engine:
        persisted_dump = engine.dump_stages("persistence", color="", basenames_only=True)
    assert any(json_blocks(m) == json_blocks(persisted_dump) for m in messages)


# ---------------------------------------------------------------------- decision 12: cleanup

FOREIGN = {
    "README.txt": b"not the engine's",
    f"{TASK}/notes.txt": b"written by a person",
    f"{TASK}.txt": b"sibling of the task prefix",
    f"{TASK}-2/data.bin": b"\x00\x01",
    f"{TASK}2/extract.json": b"another task's object",
    "other/deep/file.json": b"{}",
}


def put_foreign(io: TaskIO) -> None:
    for name, data in FOREIGN.items():
        io.write(name, data)


@pytest.mark.parametrize("progress", ["created", "complete", "error", "canceled"])
def test_unbind_clean_removes_every_task_object_and_nothing_else(io: TaskIO, progress: str) -> None:
    put_foreign(io)
    engine = engine_for(io, per_stage={"load": {"fail_times": 1}} if progress == "error" else {})
    engine.bind()
    if progress == "complete":
        assert engine.execute() is S.COMPLETE
    elif progress == "error":
        with pytest.raises(TaskEngineException):
            engine.execute()
    elif progress == "canceled":
        engine.cancel()
    assert set(snapshot(io)) > set(FOREIGN)
    engine.unbind(clean=True)
    assert snapshot(io) == FOREIGN
    assert not engine.has_lockfile


def test_unbind_clean_removes_objects_corrupted_while_bound(io: TaskIO) -> None:
    put_foreign(io)
    engine = engine_for(io)
    engine.bind()
    io.write(engine.stages[0].obj_name, b"{corrupt")
    io.delete(engine.stages[1].obj_name)
    engine.unbind(clean=True)
    assert snapshot(io) == FOREIGN


def test_unbind_clean_on_an_empty_store_leaves_it_empty(io: TaskIO) -> None:
    engine = engine_for(io)
    with engine:
        engine.execute()
        engine.unbind(clean=True)
        assert io.list("") == []
    again = engine_for(io)
    assert again.status is S.UNBOUND
    with again:
        assert again.status is S.CREATED


def test_unbind_without_clean_keeps_the_stage_objects(io: TaskIO) -> None:
    engine = engine_for(io)
    with engine:
        engine.execute()
        names = [s.obj_name for s in engine.stages]
        kept = {n: io.read(n) for n in names}
    assert {n: io.read(n) for n in names} == kept
    assert not engine.has_lockfile
    assert engine.status is S.COMPLETE


def test_unbind_clean_with_no_lock(io: TaskIO) -> None:
    put_foreign(io)
    engine = engine_for(io, no_lock=True)
    engine.bind()
    engine.execute()
    engine.unbind(clean=True)
    assert snapshot(io) == FOREIGN


def test_auto_cleanup_removes_the_task_after_the_block(io: TaskIO) -> None:
    put_foreign(io)
    engine = engine_for(io, auto_cleanup=True)
    with engine:
        assert engine.execute() is S.COMPLETE
        result = engine.task_result
        assert engine.has_lockfile
    assert result == Payload(value=expected_value(3))
    assert snapshot(io) == FOREIGN
    assert not engine.has_lockfile


def test_auto_cleanup_with_an_unbound_execute(io: TaskIO) -> None:
    put_foreign(io)
    engine = engine_for(io, auto_cleanup=True)
    assert engine.execute() is S.COMPLETE
    assert snapshot(io) == FOREIGN


def test_auto_cleanup_whatever_the_outcome(io: TaskIO) -> None:
    put_foreign(io)
    engine = engine_for(io, auto_cleanup=True, per_stage={"transform": {"fail_times": 1}})
    with pytest.raises(TaskEngineException):
        engine.execute()
    assert snapshot(io) == FOREIGN
    engine = engine_for(
        io,
        auto_cleanup=True,
        retry_policy=RetryPolicy.STAGE,
        max_attempts=2,
        per_stage={"transform": {"fail_times": 1}},
    )
    engine.bind()
    engine.unbind()
    assert snapshot(io) == FOREIGN


def test_unbind_when_not_bound_raises(io: TaskIO) -> None:
    engine = engine_for(io)
    with pytest.raises(TaskEngineException):
        engine.unbind()
    with pytest.raises(TaskEngineException):
        engine.unbind(clean=True)
    engine.bind()
    engine.unbind()
    with pytest.raises(TaskEngineException):
        engine.unbind()
    assert engine.status is S.CREATED


def test_foreign_objects_survive_a_whole_run(io: TaskIO) -> None:
    put_foreign(io)
    engine = engine_for(io)
    assert engine.execute() is S.COMPLETE
    with engine:
        engine.dump_stages("persistence")
        assert engine.check_sync()
    assert {n: b for n, b in snapshot(io).items() if n in FOREIGN} == FOREIGN


def test_stage_objects_persist_the_state_by_field_name(io: TaskIO) -> None:
    engine = engine_for(io)
    with engine:
        engine.execute()
        docs = [json.loads(io.read(s.obj_name)) for s in engine.stages]
    for name, doc, value in zip(NAMES, docs, [1, 3, 6], strict=True):
        assert doc["stage_name"] == name
        assert doc["state"]["value"] == value
        assert doc["state"]["result"] == {"value": value}
        assert doc["state"]["status"] == "COMPLETE"
        assert doc["state"]["task_id"] == TASK


def test_fresh_engine_after_execute_sees_same_dump(io: TaskIO) -> None:
    first = engine_for(io)
    with first:
        first.execute()
        dump = first.dump_stages(color="")
    with engine_for(io) as second:
        assert second.dump_stages(color="") == dump
        assert second.dump_stages("persistence", color="") == dump
