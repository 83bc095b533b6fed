"""Writes that share one durable write: a new task's CREATED objects, and a stage's
COMPLETE with the next write, on stores that override `TaskIO.write_many_if`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from pipelines import AddStage, PipeState, make_stages

from checkmate import CheckMateEngine, LocalTaskIO, StageStatus, StorageError, StorageRetry

pytestmark = pytest.mark.skipif(
    not LocalTaskIO(".").supports_conditional_write, reason="the journal needs flock (POSIX)"
)


class RecordingIO(LocalTaskIO):
    """A local store that logs every stage write it receives, and the batches."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.calls: list[list[str]] = []

    def write_if(self, obj_name: str, data: bytes, version: str | None) -> str:
        self.calls.append([_label(obj_name, data)])
        return super().write_if(obj_name, data, version)

    def write_many_if(self, items: Sequence[tuple[str, bytes, str | None]]) -> list[str]:
        self.calls.append([_label(name, data) for name, data, _ in items])
        return super().write_many_if(items)

    def stage_calls(self) -> list[list[str]]:
        return [c for c in self.calls if not any(label.startswith("task~lock") for label in c)]


def _label(obj_name: str, data: bytes) -> str:
    base = obj_name.rpartition("/")[2]
    if base.startswith("task~lock"):
        return base
    return f"{base.removesuffix('.json')}:{json.loads(data)['state']['status']}"


def persisted(root: Path, task: str, names: list[str]) -> dict[str, str]:
    fresh = LocalTaskIO(root)  # another process's view: journal first, then files
    return {n: json.loads(fresh.read(f"{task}/{n}.json"))["state"]["status"] for n in names}


def test_creates_go_out_as_one_batch_and_each_complete_with_the_next_running(
    tmp_path: Path,
) -> None:
    io = RecordingIO(tmp_path)
    assert CheckMateEngine(io, "t", make_stages(3)).execute() is StageStatus.COMPLETE
    assert io.stage_calls() == [
        ["s0:CREATED", "s1:CREATED", "s2:CREATED"],
        ["s0:RUNNING"],
        ["s0:COMPLETE", "s1:RUNNING"],
        ["s1:COMPLETE", "s2:RUNNING"],
        ["s2:COMPLETE"],  # written on its own before execute() returns
    ]
    assert persisted(tmp_path, "t", ["s0", "s1", "s2"]) == dict.fromkeys(
        ["s0", "s1", "s2"], "COMPLETE"
    )


class Hooked(CheckMateEngine[Any, Any]):
    """Checks, in every state-update hook, that the change is already in storage."""

    def __init__(self, io: LocalTaskIO, *args: Any, **kwargs: Any) -> None:
        super().__init__(io, *args, **kwargs)
        self.seen: list[str] = []

    def state_update_hook(self, stage: Any) -> None:
        raw = LocalTaskIO(self.io.root).read(stage.obj_name)  # type: ignore[attr-defined]
        status = json.loads(raw)["state"]["status"]
        assert status == stage.state.status.value, (stage.stage_name, status)
        self.seen.append(f"{stage.stage_name}:{status}")


def test_the_hook_sees_each_change_in_order_and_only_once_it_is_durable(
    tmp_path: Path,
) -> None:
    engine = Hooked(LocalTaskIO(tmp_path), "t", make_stages(2))
    assert engine.execute() is StageStatus.COMPLETE
    assert engine.seen == [
        "s0:CREATED",
        "s1:CREATED",
        "s0:RUNNING",
        "s0:COMPLETE",
        "s1:RUNNING",
        "s1:COMPLETE",
    ]


class FailingCancelCheck(LocalTaskIO):
    """The cancellation check (an ``exists``) fails once a stage is COMPLETE."""

    armed = False

    def exists(self, obj_name: str) -> bool:
        if self.armed and obj_name.endswith("cancel~request"):
            raise OSError("store unreachable")
        return super().exists(obj_name)


class ArmingStage(AddStage):
    """Arms the store's failure while it runs: the next cancellation check fails."""

    def execute_stage(self, previous_state_copy: PipeState) -> None:
        super().execute_stage(previous_state_copy)
        io = self.engine.io
        assert isinstance(io, FailingCancelCheck)
        io.armed = True


def test_a_held_complete_is_written_when_execute_raises(tmp_path: Path) -> None:
    io = FailingCancelCheck(tmp_path)
    stages = [ArmingStage(stage_name="s0", state=PipeState()), *make_stages(2)[1:]]
    engine = CheckMateEngine(
        io, "t", stages, cancel_check_interval=0.0, storage_retry=StorageRetry(attempts=1)
    )
    with pytest.raises(StorageError):
        engine.execute()
    assert persisted(tmp_path, "t", ["s0", "s1"]) == {"s0": "COMPLETE", "s1": "CREATED"}
