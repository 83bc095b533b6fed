"""Shared fixtures: every behaviour test runs against each storage backend.

The backends are local disk (`LocalTaskIO`), fsspec's ``memory://`` and
``file://``, and three object-store emulators started for the session on
127.0.0.1 (see tests/emulators.py): ``s3`` (moto), ``gcs`` (fake-gcs-server)
and ``azure`` (Azurite). An emulator that is not installed makes its
parameters skip, unless ``CHECKMATE_REQUIRE_EMULATORS=1``, which makes the
session fail at once. ``-m "not emulator"`` leaves the emulators out.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest

from checkmate import FsspecTaskIO, LocalTaskIO, TaskIO

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

import emulators  # noqa: E402 - lives in TESTS_DIR

EMULATED = list(emulators.EMULATOR_KINDS)
"""Backends served by an emulator process: 's3', 'gcs', 'azure'."""
BACKENDS = ["local", "memory", "file", *EMULATED]
"""Backends every behaviour test runs on; all but 'memory' are shareable between processes."""
SHAREABLE = ["local", "file", *EMULATED]
"""Backends whose state several processes can share (`store_spec` works for them)."""

_EMULATED_ROOTS: dict[tuple[str, str], str] = {}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "emulator: runs against an object-store emulator (moto, fake-gcs, Azurite)"
    )
    if emulators.required():
        missing = [r for r in map(emulators.missing_reason, EMULATED) if r is not None]
        if missing:
            raise pytest.UsageError(
                f"{emulators.REQUIRE_ENV} is set but emulators are missing: "
                + "; ".join(missing)
                + ". Run scripts/install-emulators.sh"
            )


def backend_params(kinds: list[str]) -> list[Any]:
    """Pytest params for ``kinds``: emulated ones are marked, and skip when not installed."""
    params: list[Any] = []
    for kind in kinds:
        if kind not in EMULATED:
            params.append(kind)
            continue
        marks = [pytest.mark.emulator]
        reason = emulators.missing_reason(kind)
        if reason is not None:
            marks.append(pytest.mark.skip(reason=reason))
        params.append(pytest.param(kind, marks=marks))
    return params


def emulator_root(kind: str, tmp_path: Path) -> str:
    """The root URL of the emulated store of ``kind`` for this test (fresh, then stable)."""
    key = (kind, str(tmp_path))
    if key not in _EMULATED_ROOTS:
        _EMULATED_ROOTS[key] = emulators.get(kind).fresh_url()
    return _EMULATED_ROOTS[key]


def make_io(kind: str, tmp_path: Path) -> TaskIO:
    """Return a TaskIO of the given kind, empty on the first call for ``tmp_path``.

    Shareable kinds return the same store again for the same ``tmp_path``.
    Emulated kinds start their emulator if needed and use a fresh random
    prefix in the session's bucket (container).
    """
    if kind == "local":
        return LocalTaskIO(tmp_path / "store")
    if kind == "memory":
        return FsspecTaskIO(f"memory://checkmate-tests/{uuid.uuid4().hex}")
    if kind == "file":
        return FsspecTaskIO((tmp_path / "fs-store").as_uri())
    if kind in EMULATED:
        return FsspecTaskIO(emulator_root(kind, tmp_path), **emulators.get(kind).storage_options())
    raise ValueError(kind)


def store_spec(kind: str, tmp_path: Path) -> str:
    """The spec of a process-shareable store for tests/pipelines.py (the store of `make_io`).

    Emulated stores are plain URLs: child processes inherit the environment
    variables that point their clients at the emulators.
    """
    if kind == "local":
        return f"local:{tmp_path / 'store'}"
    if kind == "file":
        return (tmp_path / "fs-store").as_uri()
    if kind in EMULATED:
        return emulator_root(kind, tmp_path)
    raise ValueError(f"{kind} cannot be shared between processes")


@pytest.fixture(scope="session", autouse=True)
def _stop_emulators() -> Iterator[None]:
    """Stop, by PID, every emulator the session started (also when tests failed)."""
    yield
    emulators.stop_all()


def _emulator(kind: str) -> emulators.Emulator:
    reason = emulators.missing_reason(kind)
    if reason is not None:
        if emulators.required():
            pytest.fail(f"{emulators.REQUIRE_ENV} is set but {reason}")
        pytest.skip(reason)
    return emulators.get(kind)


@pytest.fixture(scope="session")
def s3_emulator() -> emulators.Emulator:
    """moto_server on 127.0.0.1 (S3), started once per session."""
    return _emulator("s3")


@pytest.fixture(scope="session")
def gcs_emulator() -> emulators.Emulator:
    """fake-gcs-server on 127.0.0.1 (GCS, in-memory backend), started once per session."""
    return _emulator("gcs")


@pytest.fixture(scope="session")
def azure_emulator() -> emulators.Emulator:
    """Azurite on 127.0.0.1 (Azure Blob, in-memory), started once per session."""
    return _emulator("azure")


@pytest.fixture(params=backend_params(BACKENDS))
def backend(request: pytest.FixtureRequest) -> str:
    """The name of the backend under test."""
    kind = str(request.param)
    if kind in EMULATED:
        request.getfixturevalue(f"{kind}_emulator")
    return kind


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
