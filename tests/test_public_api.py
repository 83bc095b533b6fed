"""The public surface: exactly what __all__ names, documented, and the docs in sync."""

from __future__ import annotations

import inspect
import pickle
from pathlib import Path

import checkmate
from checkmate import (
    BindException,
    ConfigurationError,
    StorageError,
    TaskEngineException,
)
from checkmate.transitions import mermaid_diagram

ROOT = Path(__file__).resolve().parent.parent


def test_all_is_sorted_and_complete() -> None:
    # dir(), not vars(): the heavy names are loaded on first use (module __getattr__).
    public = {name for name in dir(checkmate) if not name.startswith("_")}
    modules = {name for name in public if inspect.ismodule(getattr(checkmate, name))}
    assert set(checkmate.__all__) - {"__version__"} == public - modules
    names = [n for n in checkmate.__all__ if n != "__version__"]
    assert names == sorted(names)


def test_every_public_name_has_a_docstring() -> None:
    for name in checkmate.__all__:
        value = getattr(checkmate, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert inspect.getdoc(value), name
            for attr, member in vars(value).items():
                if attr.startswith("_") or not callable(member):
                    continue
                assert inspect.getdoc(member), f"{name}.{attr}"


def test_py_typed_is_shipped() -> None:
    assert (Path(checkmate.__file__).parent / "py.typed").exists()


def test_errors_form_one_family() -> None:
    for name in checkmate.__all__:
        value = getattr(checkmate, name)
        if inspect.isclass(value) and issubclass(value, BaseException):
            assert issubclass(value, TaskEngineException), name
    assert issubclass(BindException, TaskEngineException)
    assert issubclass(ConfigurationError, ValueError)
    assert issubclass(StorageError, OSError)


def test_errors_pickle_with_their_fields() -> None:
    err = StorageError("boom", task_id="t", stage_name="s", obj_name="t/s.json")
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is StorageError
    assert (str(copy), copy.task_id, copy.stage_name, copy.obj_name) == (
        "boom",
        "t",
        "s",
        "t/s.json",
    )


def test_docs_state_diagram_matches_the_transition_table() -> None:
    concepts = (ROOT / "docs" / "concepts.md").read_text()
    assert mermaid_diagram() in concepts
