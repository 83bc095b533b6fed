"""Security of paths and objects (issue 4, item 6).

- Task ids and stage names never address an object outside the task's prefix:
  hypothesis draws ids and names, every storage call the engine makes names
  an object under ``<task_id>/``, every file on disk lands in the task's
  directory, and distinct stage names get distinct objects (also on a
  case-insensitive file system). Ids that are not a safe path component are
  refused before anything is written.
- State is read only through Pydantic models: a stage object that names
  another class or module (``os.system``, a module that would run code on
  import) is refused with StateMismatchError and nothing is imported; data
  that looks like a serialised object stays plain data.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from _support import record, scaled
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pipelines import Payload, PipeState, make_stages

from checkmate import (
    STAGE_NAME_MAX_LENGTH,
    BaseStage,
    BaseStageState,
    CheckMateEngine,
    ConfigurationError,
    LocalTaskIO,
    RetryPolicy,
    StageStatus,
    StateMismatchError,
    TaskIO,
)
from checkmate.naming import cancel_obj_name, lock_obj_name, stage_obj_name
from checkmate.testing import WrappingTaskIO

PACKAGE_DIR = Path(__import__("checkmate").__file__).resolve().parent
SAFE_ID = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9._\-]{0,127}")


class RecordingTaskIO(WrappingTaskIO):
    """Forwards every call to a real store and records the object name (or prefix) it names."""

    def __init__(self, inner: TaskIO) -> None:
        super().__init__(inner)
        self.names: list[tuple[str, str]] = []

    def _call(self, op: str, func: Any, *args: Any) -> Any:
        first = args[0] if args else ""
        for name in first if isinstance(first, list) else [first]:
            self.names.append((op, str(name)))
        return func(*args)


class NamedStage(BaseStage[PipeState]):
    def execute_stage(self, previous_state_copy: PipeState) -> None:
        self.state.value = previous_state_copy.value + 1
        self.state.result = Payload(value=self.state.value)


task_ids = st.from_regex(SAFE_ID, fullmatch=True)
stage_names = st.text(min_size=1, max_size=STAGE_NAME_MAX_LENGTH).filter(
    lambda n: not any(c in n for c in "/\\\x00") and n not in {".", ".."}
)
hostile_names = st.sampled_from(
    [
        "...",
        ". ",
        "task~lock",
        "cancel~request",
        "con",
        "NUL.txt",
        "s0.json",
        "..%2f..%2fetc",
        "~",
        "é" * STAGE_NAME_MAX_LENGTH,
        "e\u0301",  # the same text as "é", decomposed
        "A",
        "a",
        " ",
        "\u202e",
    ]
)


@pytest.mark.timeout(600)
def test_objects_stay_inside_the_task_prefix() -> None:
    checked = 0

    @settings(
        max_examples=scaled(120, 1500),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(
        task_id=task_ids,
        names=st.lists(stage_names | hostile_names, min_size=1, max_size=4, unique=True),
    )
    def check(task_id: str, names: list[str]) -> None:
        nonlocal checked
        checked += 1
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "store"
            io = RecordingTaskIO(LocalTaskIO(root))
            stages = [NamedStage(stage_name=n, state=PipeState()) for n in names]
            engine = CheckMateEngine(
                io, task_id=task_id, stage_templates=stages, retry_policy=RetryPolicy.NONE
            )
            assert engine.execute() is StageStatus.COMPLETE
            assert engine.task_result.value == len(names)
            prefix = f"{task_id}/"
            outside = [(op, n) for op, n in io.names if not n.startswith(prefix)]
            assert not outside, outside
            for dirpath, _dirs, files in os.walk(root):
                for name in files:
                    relative = (Path(dirpath) / name).relative_to(root)
                    assert relative.parts[0] == task_id, relative
                    assert len(name.encode()) <= 255
            objects = [stage_obj_name(task_id, n) for n in names]
            assert len({o.casefold() for o in objects}) == len(names), objects
            specials = {lock_obj_name(task_id), cancel_obj_name(task_id)}
            assert not [o for o in objects if any(o.startswith(s) for s in specials)]
            assert sorted(objects) == sorted(n for n in io.inner.list(prefix) if n in objects)

    check()
    record("security", names_checked=checked)


@pytest.mark.timeout(300)
def test_unsafe_task_ids_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    checked = 0
    root = tmp_path / "store"

    @settings(max_examples=scaled(200, 3000), deadline=None)
    @given(
        task_id=st.text(max_size=200)
        | st.sampled_from(["", ".", "..", "../x", "a/b", "a\\b", ".hidden", "x" * 129, "a\x00"])
    )
    def check(task_id: str) -> None:
        nonlocal checked
        assume(not SAFE_ID.fullmatch(task_id))
        checked += 1
        with pytest.raises(ConfigurationError):
            CheckMateEngine(LocalTaskIO(root), task_id=task_id, stage_templates=make_stages(1))
        assert not root.exists()

    check()
    record("security", task_ids_refused=checked)


# ---------------------------------------------------------------- no import, no pickle

EVIL_MODULE = "checkmate_evil_probe"


@pytest.fixture
def evil_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A module on sys.path that, if anything imports it, leaves a marker file behind."""
    marker = tmp_path / "imported"
    code = f"open({str(marker)!r}, 'w').write('imported')\nprint('evil module imported')\n"
    (tmp_path / f"{EVIL_MODULE}.py").write_text(
        code + "class AddStage:\n    pass\ndef system(*a):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(EVIL_MODULE, None)
    return marker


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "stage_class",
    [
        "os.system",
        "subprocess.Popen",
        "builtins.eval",
        "pickle.loads",
        f"{EVIL_MODULE}.AddStage",
        f"{EVIL_MODULE}.system",
        "pipelines.AddStage.__init__",
        "",
    ],
)
def test_stage_class_from_storage_is_never_imported(
    tmp_path: Path, evil_module: Path, stage_class: str
) -> None:
    io = LocalTaskIO(tmp_path / "store")

    def engine() -> Any:
        return CheckMateEngine(io, task_id="sec", stage_templates=make_stages(2))

    with engine():
        pass  # the task exists; every lazy import of a bind has happened
    name = stage_obj_name("sec", "s1")
    doc = json.loads(io.read(name))
    doc["checkmate"]["stage_class"] = stage_class
    data = json.dumps(doc).encode()
    io.write(name, data)
    modules = set(sys.modules)
    with pytest.raises(StateMismatchError):
        engine().execute()
    with pytest.raises(StateMismatchError):
        engine().status  # noqa: B018
    assert set(sys.modules) - modules == set()
    assert EVIL_MODULE not in sys.modules
    assert not evil_module.exists(), "a module named in storage was imported"
    assert io.read(name) == data
    record("security", class_names_refused=1)


class OpenState(BaseStageState[Payload]):
    anything: Any = None
    text: str = ""


class OpenStage(BaseStage[OpenState]):
    def execute_stage(self, previous_state_copy: OpenState) -> None:
        self.state.result = Payload(value=1)


PAYLOADS = [
    {"py/object": "os.system", "py/reduce": [{"py/function": "os.system"}, ["true"]]},
    {"__reduce__": ["os.system", ["true"]], "__class__": "subprocess.Popen"},
    {"$type": "System.Diagnostics.Process", "!!python/object/apply:os.system": ["true"]},
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("payload", PAYLOADS)
def test_serialised_object_lookalikes_stay_plain_data(tmp_path: Path, payload: Any) -> None:
    io = LocalTaskIO(tmp_path / "store")

    def engine() -> Any:
        return CheckMateEngine(
            io, task_id="data", stage_templates=[OpenStage(stage_name="s", state=OpenState())]
        )

    with engine():
        pass
    name = stage_obj_name("data", "s")
    doc = json.loads(io.read(name))
    doc["state"]["anything"] = payload
    doc["state"]["text"] = "gASVIQAAAAAAAACMBXBvc2l4lIwGc3lzdGVtlJOUjAR0cnVllIWUUpQu"  # a pickle
    io.write(name, json.dumps(doc).encode())
    modules = set(sys.modules)
    with engine() as bound:
        state = bound.stages[0].state
        assert state.anything == payload
        assert type(state.anything) is dict
        assert isinstance(state.text, str)
    assert set(sys.modules) - modules == set()


def test_the_package_has_no_deserialiser_that_runs_code() -> None:
    """No pickle/marshal/shelve/YAML loading, eval or exec anywhere in checkmate: stored
    bytes only ever go through json and Pydantic. (Dynamic imports of names given on the
    command line are fine; names read from storage are covered by the tests above.)"""
    pattern = re.compile(
        r"\b(pickle|cPickle|marshal|dill|cloudpickle|jsonpickle)\.(loads?|Unpickler)\b"
        r"|^\s*(import|from)\s+(shelve|dill|cloudpickle|jsonpickle)\b"
        r"|\byaml\.(load|unsafe_load|full_load)\(|(?<![.\w])(eval|exec|__import__)\(",
        re.MULTILINE,
    )
    found = [
        f"{path.relative_to(PACKAGE_DIR)}: {match.group(0).strip()}"
        for path in sorted(PACKAGE_DIR.rglob("*.py"))
        for match in pattern.finditer(path.read_text())
    ]
    assert not found, found
