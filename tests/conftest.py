"""Shared fixtures: every behaviour test runs against each storage backend."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from checkmate import FsspecTaskIO, LocalTaskIO, TaskIO

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

BACKENDS = ["local", "memory", "file"]
"""Backends every behaviour test runs on; 'local' and 'file' are shareable between processes."""


def make_io(kind: str, tmp_path: Path) -> TaskIO:
    """Return a fresh, empty TaskIO of the given kind."""
    if kind == "local":
        return LocalTaskIO(tmp_path / "store")
    if kind == "memory":
        return FsspecTaskIO(f"memory://checkmate-tests/{uuid.uuid4().hex}")
    if kind == "file":
        return FsspecTaskIO((tmp_path / "fs-store").as_uri())
    raise ValueError(kind)


def store_spec(kind: str, tmp_path: Path) -> str:
    """The spec of a process-shareable store for tests/pipelines.py (local or file)."""
    if kind == "local":
        return f"local:{tmp_path / 'store'}"
    if kind == "file":
        return (tmp_path / "fs-store").as_uri()
    raise ValueError(f"{kind} cannot be shared between processes")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The name of the backend under test."""
    return str(request.param)


@pytest.fixture
def io(backend: str, tmp_path: Path) -> Iterator[TaskIO]:
    """A fresh, empty TaskIO for each backend."""
    task_io = make_io(backend, tmp_path)
    yield task_io
    if backend == "memory":
        fs = fsspec.filesystem("memory")
        root = task_io.url("x").removeprefix("memory://").rsplit("/", 1)[0]
        if fs.exists(root):
            fs.rm(root, recursive=True)


@pytest.fixture(params=["local", "file"])
def shared_backend(request: pytest.FixtureRequest) -> str:
    """A backend whose state several processes can share."""
    return str(request.param)


LOCK_BASENAME = "task~lock"


def is_lock_state(name: str) -> bool:
    """Tell whether an object holds a task's lock state (the lock, or a takeover marker)."""
    return name.rpartition("/")[2].startswith(LOCK_BASENAME)


def live_lock_objects(io: TaskIO, prefix: str = "") -> list[str]:
    """Lock-state objects that still hold a lock (a released lease does not)."""
    from checkmate import BindLock  # noqa: PLC0415

    return [
        name
        for name in io.list(prefix)
        if is_lock_state(name)
        and (not name.endswith("/" + LOCK_BASENAME) or BindLock.is_held(io, name))
    ]


def state_snapshot(io: TaskIO) -> dict[str, bytes]:
    """Every object except the lock's own (which taking and releasing may change)."""
    return {name: io.read(name) for name in io.list("") if not is_lock_state(name)}
