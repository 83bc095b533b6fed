"""The ``checkmate`` command line, end to end.

Every command runs as a real ``python -m checkmate`` subprocess against real
stores (a local directory and a ``file://`` URL), and in-process through
``checkmate.cli.main`` on ``memory://`` (a memory store does not cross
processes). Task states are built with the real engine and the stages of
``tests/pipelines.py``; crashed and running tasks are real child processes.
"""

from __future__ import annotations

import json
import os
import pty
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import fsspec
import pydantic_core
import pytest
from colorama import Fore
from long_task import build_engine as build_long_task
from pipelines import CRASH_EXIT_CODE, Payload, make_stages, read_log
from pydantic import Field

from checkmate import (
    BaseStage,
    BaseStageState,
    BindLock,
    CheckMateEngine,
    FsspecTaskIO,
    LocalTaskIO,
    LockOwner,
    RetryPolicy,
    StageStatus,
    TaskIO,
)
from checkmate.catalog import load_task, render_task, scan_store
from checkmate.cli import main
from checkmate.naming import cancel_obj_name, lock_obj_name

TESTS_DIR = Path(__file__).resolve().parent
S = StageStatus
HOST = socket.gethostname()
LS_KEYS = {
    "task_id",
    "status",
    "stages_complete",
    "stages_total",
    "current_stage",
    "attempts",
    "last_update",
    "lock",
    "cancel_requested",
    "problems",
}
LOCK_KEYS = {"holder", "host", "pid", "state", "held", "acquired_at", "age_seconds", "lease"}


# ---------------------------------------------------------------------- helpers


@dataclass
class Store:
    """A real store, as the CLI, tests/pipelines.py and the engine name it."""

    kind: str
    arg: str
    spec: str
    io: TaskIO


def make_store(kind: str, tmp_path: Path) -> Store:
    if kind == "local":
        root = tmp_path / "store"
        root.mkdir()
        return Store(kind, str(root), f"local:{root}", LocalTaskIO(root))
    uri = (tmp_path / "fs-store").as_uri()
    return Store(kind, uri, uri, FsspecTaskIO(uri))


@pytest.fixture(params=["local", "file"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    return make_store(str(request.param), tmp_path)


@pytest.fixture
def local(tmp_path: Path) -> Store:
    return make_store("local", tmp_path)


@pytest.fixture
def memory() -> Iterator[Store]:
    url = f"memory://checkmate-cli-tests/{uuid.uuid4().hex}"
    yield Store("memory", url, url, FsspecTaskIO(url))
    fs = fsspec.filesystem("memory")
    root = url.removeprefix("memory://")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NO_COLOR", None)
    return env


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``python -m checkmate ARGS`` in a subprocess, output piped."""
    return subprocess.run(
        [sys.executable, "-m", "checkmate", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=_env(),
    )


def cli_in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(stderr: str, *needles: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("checkmate: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def run_pipeline(spec: str, task_id: str, *options: str) -> subprocess.CompletedProcess[str]:
    """Run tests/pipelines.py (3 AddStages) in a child process."""
    return subprocess.run(
        [sys.executable, str(TESTS_DIR / "pipelines.py"), spec, task_id, *options],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def engine(io: TaskIO, task_id: str, **kwargs: Any) -> CheckMateEngine[Any, Any]:
    stages_kwargs = kwargs.pop("stages", {})
    return CheckMateEngine(
        io, task_id=task_id, stage_templates=make_stages(3, **stages_kwargs), **kwargs
    )


def completed(io: TaskIO, task_id: str) -> CheckMateEngine[Any, Any]:
    eng = engine(io, task_id)
    assert eng.execute() is S.COMPLETE
    return eng


def created(io: TaskIO, task_id: str, log: Path | None = None) -> CheckMateEngine[Any, Any]:
    eng = engine(io, task_id, stages={"log_path": str(log)} if log else {})
    with eng:
        pass
    return eng


def failed(io: TaskIO, task_id: str) -> CheckMateEngine[Any, Any]:
    eng = engine(io, task_id, stages={"per_stage": {"s1": {"fail_times": 1}}})
    with pytest.raises(Exception, match="planned failure"):
        eng.execute()
    assert eng.status is S.ERROR
    return eng


def retried(io: TaskIO, task_id: str) -> CheckMateEngine[Any, Any]:
    eng = engine(
        io,
        task_id,
        stages={"per_stage": {"s1": {"fail_times": 1}}},
        retry_policy=RetryPolicy.STAGE,
        max_attempts=2,
    )
    assert eng.execute() is S.COMPLETE
    return eng


def crashed(store: Store, task_id: str) -> int:
    """Run a task in a child that dies inside s1; return the dead child's pid."""
    run = run_pipeline(
        store.spec, task_id, "--crash-stage", "s1", "--policy", "STAGE", "--max-attempts", "2"
    )
    assert run.returncode == CRASH_EXIT_CODE, run.stdout + run.stderr
    owner = LockOwner.model_validate_json(store.io.read(lock_obj_name(task_id)))
    assert owner.is_dead()
    return owner.pid


def snapshot(io: TaskIO) -> dict[str, bytes]:
    return {name: io.read(name) for name in io.list("")}


def without_locks(objects: dict[str, bytes]) -> dict[str, bytes]:
    """The objects that are not lock objects (taking a lock rewrites a lease object)."""
    return {n: b for n, b in objects.items() if "/task~lock" not in n}


def stage_objects(io: TaskIO, task_id: str) -> list[str]:
    return [n for n in io.list(f"{task_id}/") if n.endswith(".json")]


def is_locked(io: TaskIO, task_id: str) -> bool:
    """A lock object exists that is not a released lease."""
    record = load_task(io, task_id)
    assert record is not None
    return record.locked


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll an observable condition, bounded in time."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def ls_json(store_arg: str, *extra: str) -> list[dict[str, Any]]:
    run = cli("ls", store_arg, "--json", *extra)
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert isinstance(data, list)
    return data


class CountingIO(TaskIO):
    """A real store that counts the TaskIO calls made on it."""

    def __init__(self, inner: TaskIO) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()
        self.supports_atomic_create = inner.supports_atomic_create

    def read(self, obj_name: str) -> bytes:
        self.calls["read"] += 1
        return self.inner.read(obj_name)

    def write(self, obj_name: str, data: bytes) -> None:
        self.calls["write"] += 1
        self.inner.write(obj_name, data)

    def create(self, obj_name: str, data: bytes) -> bool:
        self.calls["create"] += 1
        return self.inner.create(obj_name, data)

    def delete(self, obj_name: str) -> None:
        self.calls["delete"] += 1
        self.inner.delete(obj_name)

    def list(self, prefix: str = "") -> list[str]:
        self.calls["list"] += 1
        return self.inner.list(prefix)

    def url(self, obj_name: str) -> str:
        return self.inner.url(obj_name)

    def exists(self, obj_name: str) -> bool:
        self.calls["exists"] += 1
        return self.inner.exists(obj_name)

    def read_many(self, obj_names: Iterable[str]) -> dict[str, bytes]:
        self.calls["read_many"] += 1
        return self.inner.read_many(obj_names)


# A stage whose state holds values where json.dumps and pydantic disagree.
class RichState(BaseStageState[Payload]):
    ratio: float = 0.0
    big: float = 0.0
    label: str = ""
    tags: dict[str, list[float]] = Field(default_factory=dict)


class RichStage(BaseStage[RichState]):
    def execute_stage(self, previous_state_copy: RichState) -> None:
        self.state.ratio = 5.1e-05
        self.state.big = 1e16
        self.state.label = 'naïve — ✓ 😀 \u2028 "quoted" </tag>'
        self.state.tags = {"é": [1e-07, 0.1, 123456789.123456789]}
        self.state.result = Payload(value=1)


# ---------------------------------------------------------------------- ls


def test_ls_shows_one_line_per_task_with_status_progress_and_lock(store: Store) -> None:
    completed(store.io, "done")
    failed(store.io, "broken")
    created(store.io, "fresh")
    dead_pid = crashed(store, "crashed")
    with BindLock(store.io, lock_obj_name("fresh")):
        run = cli("ls", store.arg)
    assert run.returncode == 0, run.stderr
    assert "\x1b" not in run.stdout
    lines = run.stdout.splitlines()
    assert lines[0].split() == [
        "TASK", "STATUS", "STAGES", "CURRENT", "ATTEMPTS", "UPDATED", "LOCK", "NOTE"
    ]  # fmt: skip
    rows = {line.split()[0]: line for line in lines[1:]}
    assert sorted(rows) == ["broken", "crashed", "done", "fresh"]
    assert rows["done"].split()[1:5] == ["COMPLETE", "3/3", "-", "3"]
    assert rows["broken"].split()[1:5] == ["ERROR", "1/3", "s1", "2"]
    assert rows["crashed"].split()[1:5] == ["RUNNING", "1/3", "s1", "2"]
    assert rows["fresh"].split()[1:5] == ["CREATED", "0/3", "s0", "0"]
    assert f"{HOST}:{os.getpid()} (alive, " in rows["fresh"]
    assert f"{HOST}:{dead_pid} (dead, " in rows["crashed"]
    assert "interrupted" in rows["crashed"]
    assert rows["done"].split()[6] == "-"
    updated = rows["done"].split()[5]
    moment = datetime.strptime(updated, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert abs(datetime.now(timezone.utc) - moment) < timedelta(minutes=5)


def test_ls_json_shape_and_status_filter(store: Store) -> None:
    completed(store.io, "done")
    failed(store.io, "broken")
    dead_pid = crashed(store, "crashed")
    data = ls_json(store.arg)
    assert [t["task_id"] for t in data] == ["broken", "crashed", "done"]
    for task in data:
        assert set(task) == LS_KEYS
    by_id = {t["task_id"]: t for t in data}
    done = by_id["done"]
    assert done["status"] == "COMPLETE"
    assert (done["stages_complete"], done["stages_total"]) == (3, 3)
    assert done["current_stage"] is None
    assert done["attempts"] == 3
    assert done["lock"] is None
    assert done["cancel_requested"] is False
    assert done["problems"] == []
    assert datetime.fromisoformat(done["last_update"]).tzinfo is not None
    lock = by_id["crashed"]["lock"]
    assert set(lock) == LOCK_KEYS
    assert (lock["host"], lock["pid"], lock["state"]) == (HOST, dead_pid, "dead")
    assert lock["held"] is False
    assert lock["holder"] == f"{HOST}:{dead_pid}"
    if lock["lease"] is not None:
        assert lock["lease"]["epoch"] >= 1
        assert datetime.fromisoformat(lock["lease"]["expires_at"]).tzinfo is not None
    assert 0 <= lock["age_seconds"] < 300
    filtered = ls_json(store.arg, "--status", "error", "RUNNING")
    assert [t["task_id"] for t in filtered] == ["broken", "crashed"]
    assert ls_json(store.arg, "--status", "CANCELED") == []


def test_ls_makes_one_listing_and_one_batched_read(tmp_path: Path) -> None:
    io = LocalTaskIO(tmp_path / "store")
    for count in (3, 12):
        for i in range(count):
            if not io.list(f"t{i}/"):
                created(io, f"t{i}")
        with BindLock(io, lock_obj_name("t1")):
            counting = CountingIO(io)
            records = scan_store(counting)
        assert len(records) == count
        assert dict(counting.calls) == {"list": 1, "read_many": 1}
        assert next(r for r in records if r.task_id == "t1").lock is not None
        counting = CountingIO(io)
        assert load_task(counting, "t2") is not None
        assert dict(counting.calls) == {"list": 1, "read_many": 1}


def test_ls_of_an_empty_or_missing_store(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    run = cli("ls", str(empty))
    assert (run.returncode, run.stdout, run.stderr) == (0, "", "")
    assert ls_json(str(empty)) == []
    assert ls_json(empty.as_uri()) == []
    missing = cli("ls", str(tmp_path / "nope"))
    assert missing.returncode == 1
    assert_one_line_error(missing.stderr, "does not exist")


def test_ls_shows_a_task_with_a_corrupt_object_as_invalid(local: Store) -> None:
    completed(local.io, "done")
    completed(local.io, "hurt")
    local.io.write("hurt/s1.json", b'{"checkmate": {"format": 1}, "stage_name": ')
    data = {t["task_id"]: t for t in ls_json(local.arg)}
    assert data["done"]["status"] == "COMPLETE"
    assert data["hurt"]["status"] == "INVALID"
    assert "hurt/s1.json" in data["hurt"]["problems"][0]
    assert [t["task_id"] for t in ls_json(local.arg, "--status", "INVALID")] == ["hurt"]
    show = cli("show", local.arg, "hurt")
    assert show.returncode == 4
    assert "## Stage 1/2: s0" in show.stdout
    assert_one_line_error(show.stderr, "hurt/s1.json")


# ---------------------------------------------------------------------- show


@pytest.mark.parametrize("state", ["created", "complete", "error", "retried", "crashed"])
def test_show_is_the_markdown_of_dump_stages_from_persistence(store: Store, state: str) -> None:
    if state == "crashed":
        crashed(store, "job")
        eng = engine(store.io, "job", retry_policy=RetryPolicy.STAGE, max_attempts=2)
    else:
        build = {"created": created, "complete": completed, "error": failed, "retried": retried}
        eng = build[state](store.io, "job")
    expected = eng.dump_stages("persistence", color="", basenames_only=False)
    run = cli("show", store.arg, "job")
    assert run.returncode == 0, run.stderr
    assert run.stdout == expected
    record = load_task(store.io, "job")
    assert record is not None
    for color in (Fore.LIGHTWHITE_EX, Fore.RED, ""):
        assert render_task(store.io, record, color=color) == eng.dump_stages(
            "persistence", color=color
        )


def test_show_keeps_pydantic_formatting_of_floats_and_text(store: Store) -> None:
    stages = [
        RichStage(stage_name="rich", state=RichState()),
        RichStage(stage_name="Ünïcode stage ✓", state=RichState()),
    ]
    eng = CheckMateEngine(store.io, task_id="rich", stage_templates=stages)
    assert eng.execute() is S.COMPLETE
    run = cli("show", store.arg, "rich")
    assert run.returncode == 0, run.stderr
    assert run.stdout == eng.dump_stages("persistence", color="")
    assert '"ratio": 0.000051' in run.stdout  # json.dumps would say 5.1e-05
    stage = cli("show", store.arg, "rich", "--stage", "Ünïcode stage ✓")
    assert stage.returncode == 0, stage.stderr
    sections = run.stdout.split("## Stage ")
    assert stage.stdout == sections[0] + "## Stage " + sections[2]
    assert stage.stdout.startswith("# Task rich\n\n## Stage 2/2: Ünïcode stage ✓\n")


def test_show_one_stage(local: Store) -> None:
    eng = retried(local.io, "job")
    full = eng.dump_stages("persistence", color="")
    sections = full.split("## Stage ")
    run = cli("show", local.arg, "job", "--stage", "s1")
    assert run.returncode == 0, run.stderr
    assert run.stdout == sections[0] + "## Stage " + sections[2].removesuffix("\n")
    assert run.stdout.endswith("```\n")
    last = cli("show", local.arg, "job", "--stage", "s2")
    assert last.stdout == sections[0] + "## Stage " + sections[3]
    as_json = json.loads(cli("show", local.arg, "job", "--stage", "s1", "--json").stdout)
    assert [s["document"]["stage_name"] for s in as_json["stages"]] == ["s1"]


def test_show_json_is_the_persisted_documents(store: Store) -> None:
    completed(store.io, "job")
    run = cli("show", store.arg, "job", "--json")
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert set(data) == {"task_id", "status", "problems", "stages"}
    assert (data["task_id"], data["status"], data["problems"]) == ("job", "COMPLETE", [])
    for i, stage in enumerate(data["stages"]):
        assert set(stage) == {"object", "document"}
        assert stage["object"] == store.io.url(f"job/s{i}.json")
        assert stage["document"] == json.loads(store.io.read(f"job/s{i}.json"))


def test_show_and_history_of_unknown_task_or_stage(local: Store) -> None:
    completed(local.io, "job")
    for command in ("show", "history", "cancel", "unlock"):
        run = cli(command, local.arg, "nope")
        assert run.returncode == 1, (command, run.stderr)
        assert run.stdout == ""
        assert_one_line_error(run.stderr, "'nope'")
    stage = cli("show", local.arg, "job", "--stage", "s9")
    assert stage.returncode == 1
    assert_one_line_error(stage.stderr, "'s9'", "'s0', 's1', 's2'")
    stage_json = cli("show", local.arg, "job", "--stage", "s9", "--json")
    assert stage_json.returncode == 1


# ---------------------------------------------------------------------- history


def test_history_lists_every_entry_in_time_order(store: Store) -> None:
    eng = retried(store.io, "job")
    with eng:
        entries = [(s.stage_name, e) for s in eng.stages for e in s.state.history]
    run = cli("history", store.arg, "job")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "| time | stage | attempt | change | duration | message |"
    assert lines[1] == "|---|---|---|---|---|---|"
    rows = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[2:]]
    assert len(rows) == len(entries) == 11
    times = [datetime.fromisoformat(r[0]) for r in rows]
    assert times == sorted(times)
    assert rows[:3] == [
        [rows[0][0], f"s{i}", "0", "UNBOUND → CREATED", "0.000s", "stage created"] for i in range(3)
    ]
    retry = next(r for r in rows if r[3] == "RUNNING → RETRY")
    assert retry[1:3] == ["s1", "1"]
    assert "planned failure of s1 on attempt 1" in retry[5]
    assert retry[4].endswith("s")
    expected = sorted(
        ((datetime.fromisoformat(e.end_ts), n, e.begin_status.value, e.end_status.value)
         for n, e in entries),
        key=lambda t: (t[0], t[1]),
    )  # fmt: skip
    assert [(t, r[1], r[3]) for t, r in zip(times, rows, strict=True)] == [
        (t, n, f"{b} → {e}") for t, n, b, e in expected
    ]
    data = json.loads(cli("history", store.arg, "job", "--json").stdout)
    assert len(data) == 11
    assert set(data[0]) == {
        "stage", "position", "attempt", "begin_status", "end_status", "begin_ts", "end_ts",
        "message", "run_time_seconds",
    }  # fmt: skip
    assert [d["stage"] for d in data] == [r[1] for r in rows]


# ---------------------------------------------------------------------- colour


def _run_on_tty(*args: str) -> tuple[int, str]:
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "checkmate", *args],
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=subprocess.DEVNULL,
        env=_env(),
    )
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        code = proc.wait(timeout=60)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, b"".join(chunks).decode()


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_colour_only_on_a_terminal_and_never_with_no_color(local: Store) -> None:
    completed(local.io, "job")
    for command in (["ls", local.arg], ["show", local.arg, "job"], ["history", local.arg, "job"]):
        piped = cli(*command)
        assert piped.returncode == 0
        assert "\x1b" not in piped.stdout
        code, tty = _run_on_tty(*command)
        assert code == 0
        assert "\x1b[" in tty, command
        code, plain = _run_on_tty(*command, "--no-color")
        assert code == 0
        assert "\x1b" not in plain
        assert plain.replace("\r\n", "\n") == piped.stdout
    code, tty_show = _run_on_tty("show", local.arg, "job")
    assert Fore.LIGHTWHITE_EX + "# Task job" in tty_show


# ---------------------------------------------------------------------- unlock


def test_unlock_refuses_a_lock_held_by_a_live_process(store: Store) -> None:
    created(store.io, "job")
    lock_name = lock_obj_name("job")
    holder = BindLock(store.io, lock_name)
    holder.acquire()
    try:
        before = store.io.read(lock_name)
        run = cli("unlock", store.arg, "job")
        assert run.returncode == 3
        assert run.stdout == ""
        assert_one_line_error(run.stderr, "refused", f"{HOST}:{os.getpid()}", "alive")
        assert store.io.read(lock_name) == before
        forced = cli("unlock", store.arg, "job", "--force")
        assert forced.returncode == 0, forced.stderr
        assert f"forcibly removed the lock of task job, held by {HOST}:{os.getpid()}" in (
            forced.stdout
        )
        assert not is_locked(store.io, "job")
    finally:
        holder.release()
    assert engine(store.io, "job").execute() is S.COMPLETE


def test_unlock_removes_the_lock_of_a_dead_owner(store: Store) -> None:
    dead_pid = crashed(store, "job")
    run = cli("unlock", store.arg, "job", "--json")
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert set(data) == {"task_id", "was_locked", "lock", "removed", "released", "forced"}
    assert data["was_locked"] is True
    assert data["forced"] is False
    assert data["lock"]["holder"] == f"{HOST}:{dead_pid}"
    assert data["lock"]["state"] == "dead"
    if data["released"]:  # a lease stays, released, with a higher epoch
        after = json.loads(store.io.read(lock_obj_name("job")))
        assert after["state"] == "released"
        assert after["epoch"] == data["lock"]["lease"]["epoch"] + 1
    else:
        assert lock_obj_name("job") in data["removed"]
    assert not is_locked(store.io, "job")
    assert [n for n in store.io.list("job/") if "task~lock" not in n] == [
        "job/s0.json", "job/s1.json", "job/s2.json"
    ]  # fmt: skip
    again = cli("unlock", store.arg, "job")
    assert again.returncode == 0
    assert "task job is not locked" in again.stdout
    resumed = engine(store.io, "job", retry_policy=RetryPolicy.STAGE, max_attempts=2)
    assert resumed.execute(strict_recovery=True) is S.COMPLETE


def test_unlock_says_who_held_a_dead_lock(local: Store) -> None:
    dead_pid = crashed(local, "job")
    run = cli("unlock", local.arg, "job")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"removed the lock of task job, held by {HOST}:{dead_pid} (dead")


def _foreign_lock(io: TaskIO, task_id: str, kind: str) -> dict[str, Any]:
    """Make the task's lock look held by pid 4242 of another host; return the record."""
    name = lock_obj_name(task_id)
    now = time.time()
    owner = {
        "host": "elsewhere.example",
        "boot_id": None,
        "pid_namespace": None,
        "pid": 4242,
        "pid_start": None,
        "token": uuid.uuid4().hex,
        "acquired_at": datetime.now(timezone.utc).isoformat(),
    }
    if kind == "lock-object":
        record: dict[str, Any] = {"format": 1, **owner}
    else:
        current = json.loads(io.read(name)) if io.exists(name) else {}
        if "epoch" not in current:
            pytest.skip("this store keeps lock objects, not leases")
        record = {
            **current,
            **owner,
            "state": "held",
            "epoch": current["epoch"] + 1,
            "renewed_at": now,
            "expires_at": now + 600 if kind == "live-lease" else now - 600,
            "nonce": uuid.uuid4().hex,
        }
    io.write(name, json.dumps(record).encode())
    return record


@pytest.mark.parametrize("kind", ["lock-object", "live-lease"])
def test_unlock_refuses_a_lock_from_another_host_unless_forced(store: Store, kind: str) -> None:
    created(store.io, "job")
    record = _foreign_lock(store.io, "job", kind)
    before = store.io.read(lock_obj_name("job"))
    run = cli("unlock", store.arg, "job")
    assert run.returncode == 3
    why = "another host" if kind == "lock-object" else "lease that has not expired"
    assert_one_line_error(run.stderr, "elsewhere.example:4242", why, "--force")
    assert store.io.read(lock_obj_name("job")) == before
    assert cli("clean", store.arg, "job").returncode == 3
    assert cli("cancel", store.arg, "job").stdout.startswith("task job is locked by elsewhere")
    forced = cli("unlock", store.arg, "job", "--force")
    assert forced.returncode == 0, forced.stderr
    state = "unknown" if kind == "lock-object" else "leased"
    assert f"held by elsewhere.example:4242 ({state}" in forced.stdout
    assert not is_locked(store.io, "job")
    if kind == "live-lease":
        after = json.loads(store.io.read(lock_obj_name("job")))
        assert (after["state"], after["epoch"]) == ("released", record["epoch"] + 1)
    else:
        assert not store.io.exists(lock_obj_name("job"))
    # The request written while it was locked cancels the task at its next run.
    assert engine(store.io, "job").execute() is S.CANCELED


def test_unlock_takes_over_an_expired_lease_without_force(store: Store) -> None:
    created(store.io, "job")
    record = _foreign_lock(store.io, "job", "expired-lease")
    run = cli("unlock", store.arg, "job")
    assert run.returncode == 0, run.stderr
    assert "held by elsewhere.example:4242 (expired" in run.stdout
    after = json.loads(store.io.read(lock_obj_name("job")))
    assert after["state"] == "released"
    assert after["epoch"] == record["epoch"] + 1
    assert engine(store.io, "job").execute() is S.COMPLETE


def test_unlock_refuses_an_unreadable_lock_unless_forced(local: Store) -> None:
    created(local.io, "job")
    local.io.write(lock_obj_name("job"), b"garbage")
    run = cli("unlock", local.arg, "job")
    assert run.returncode == 3
    assert_one_line_error(run.stderr, "cannot be read")
    assert cli("unlock", local.arg, "job", "--force").returncode == 0
    assert not local.io.exists(lock_obj_name("job"))


# ---------------------------------------------------------------------- cancel


def _assert_canceled_in_place(
    before: dict[str, bytes], after: dict[str, bytes], canceled: dict[str, str]
) -> None:
    """Each canceled stage object is the old document plus one history entry."""
    for name, old_status in canceled.items():
        doc = json.loads(after[name])
        entry = doc["state"]["history"].pop()
        assert doc["state"]["status"] == "CANCELED"
        assert entry["begin_status"] == old_status
        assert entry["end_status"] == "CANCELED"
        assert entry["message"] == "task canceled from the CLI"
        assert entry["run_time_seconds"] == 0.0
        assert entry["attempt"] == doc["state"]["attempts"]
        assert datetime.fromisoformat(entry["end_ts"]).tzinfo is not None
        assert list(entry) == [
            "attempt", "begin_status", "end_status", "begin_ts", "end_ts", "message",
            "run_time_seconds",
        ]  # fmt: skip
        doc["state"]["status"] = old_status
        assert pydantic_core.to_json(doc) == before[name], name
        # Byte for byte: the same head up to the status, the same tail after the history.
        head = before[name][: before[name].index(b'"status":')]
        tail = before[name][before[name].index(b'],"result":') :]
        assert after[name].startswith(head), name
        assert after[name].endswith(tail), name
    for name in (set(before) & set(after)) - set(canceled):
        if "/task~lock" not in name:
            assert after[name] == before[name], name


def test_cancel_of_an_idle_task_cancels_it_at_once(store: Store, tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    created(store.io, "job", log=log)
    before = snapshot(store.io)
    run = cli("cancel", store.arg, "job")
    assert run.returncode == 0, run.stderr
    assert "canceled task job at once" in run.stdout
    assert "s0, s1, s2 now CANCELED" in run.stdout
    after = snapshot(store.io)
    assert set(after) == set(before)
    _assert_canceled_in_place(before, after, {f"job/s{i}.json": "CREATED" for i in range(3)})
    eng = engine(store.io, "job", stages={"log_path": str(log)})
    assert eng.status is S.CANCELED
    assert eng.execute() is S.CANCELED
    assert read_log(log) == [], "a canceled task ran a stage"
    again = cli("cancel", store.arg, "job", "--json")
    assert again.returncode == 0
    assert json.loads(again.stdout) == {
        "task_id": "job",
        "holder": None,
        "canceled_stages": [],
        "action": "already_canceled",
    }
    assert without_locks(snapshot(store.io)) == without_locks(after)


def test_cancel_of_a_crashed_task_takes_over_its_dead_lock(store: Store, tmp_path: Path) -> None:
    crashed(store, "job")
    store.io.write(cancel_obj_name("job"), b"{}")  # a stale request is consumed too
    before = snapshot(store.io)
    run = cli("cancel", store.arg, "job", "--json")
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert (data["action"], data["canceled_stages"]) == ("canceled", ["s1", "s2"])
    after = snapshot(store.io)
    assert sorted(without_locks(after)) == ["job/s0.json", "job/s1.json", "job/s2.json"]
    assert not is_locked(store.io, "job")
    _assert_canceled_in_place(before, after, {"job/s1.json": "RUNNING", "job/s2.json": "CREATED"})
    log = tmp_path / "log.txt"
    eng = engine(
        store.io, "job", stages={"log_path": str(log)}, retry_policy=RetryPolicy.STAGE,
        max_attempts=2,
    )  # fmt: skip
    assert eng.execute(strict_recovery=True) is S.CANCELED
    assert read_log(log) == []
    with eng:
        assert [s.state.status for s in eng.stages] == [S.COMPLETE, S.CANCELED, S.CANCELED]


@pytest.mark.parametrize("state", ["complete", "error"])
def test_cancel_of_a_finished_task_is_refused(local: Store, state: str) -> None:
    (completed if state == "complete" else failed)(local.io, "job")
    before = snapshot(local.io)
    run = cli("cancel", local.arg, "job")
    assert run.returncode == 3
    assert_one_line_error(run.stderr, "refused", "cannot be canceled")
    assert snapshot(local.io) == before


def test_cancel_of_a_running_task_is_requested_and_its_engine_cancels(
    store: Store, tmp_path: Path
) -> None:
    ready = tmp_path / "ready"
    log = tmp_path / "log.txt"
    child = subprocess.Popen(
        [sys.executable, str(TESTS_DIR / "long_task.py"), store.spec, "job", str(ready), str(log)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: ready.exists() or child.poll() is not None, "the long stage to start")
        assert child.poll() is None, child.communicate()
        run = cli("cancel", store.arg, "job")
        assert run.returncode == 0, run.stderr
        assert "cancellation requested" in run.stdout
        assert f"locked by {HOST}:{child.pid} (alive" in run.stdout
        out, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, err
    assert out.splitlines()[-1] == "CANCELED"
    assert read_log(log) == ["s0 1", "cancel s0"], "s1 ran, or the cancel hook did not"
    eng = build_long_task(store.spec, "job", str(ready), str(log))
    assert eng.status is S.CANCELED
    with eng:
        assert [s.state.status for s in eng.stages] == [S.CANCELED, S.CANCELED]
        assert eng.stages[0].state.history[-1].message == "task canceled on request"
    assert not store.io.exists(cancel_obj_name("job"))
    assert not is_locked(store.io, "job")


def test_cancel_of_a_task_locked_elsewhere_writes_a_request(local: Store, tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    created(local.io, "job", log=log)
    with BindLock(local.io, lock_obj_name("job")):
        run = cli("cancel", local.arg, "job", "--json")
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert data["action"] == "requested"
    assert data["holder"] == f"{HOST}:{os.getpid()}"
    assert local.io.exists(cancel_obj_name("job"))
    assert [t["cancel_requested"] for t in ls_json(local.arg)] == [True]
    # The next engine to run the task sees the request before running anything.
    eng = engine(local.io, "job", stages={"log_path": str(log)})
    assert eng.execute() is S.CANCELED
    assert read_log(log) == []
    assert not local.io.exists(cancel_obj_name("job"))


# ---------------------------------------------------------------------- clean


def _age_task(io: TaskIO, task_id: str, days: float) -> None:
    """Move every history timestamp of a task ``days`` into the past."""
    for name in io.list(f"{task_id}/"):
        if not name.endswith(".json"):
            continue
        doc = json.loads(io.read(name))
        for entry in doc["state"]["history"]:
            for key in ("begin_ts", "end_ts"):
                moment = datetime.fromisoformat(entry[key]) - timedelta(days=days)
                entry[key] = moment.isoformat()
        io.write(name, json.dumps(doc).encode())


def test_clean_by_status_and_age_with_dry_run(store: Store) -> None:
    completed(store.io, "old-done")
    completed(store.io, "new-done")
    failed(store.io, "old-error")
    _age_task(store.io, "old-done", 30)
    _age_task(store.io, "old-error", 30)
    assert engine(store.io, "old-done").status is S.COMPLETE  # still a valid task
    before = snapshot(store.io)
    doomed = sorted(n for n in before if n.startswith("old-done/"))
    assert doomed[:3] == ["old-done/s0.json", "old-done/s1.json", "old-done/s2.json"]
    dry = cli("clean", store.arg, "--status", "COMPLETE", "--older-than", "7d", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == [
        f"would delete task old-done ({len(doomed)} objects)",
        *(f"  {name}" for name in doomed),
    ]
    assert snapshot(store.io) == before
    run = cli("clean", store.arg, "--status", "COMPLETE", "--older-than", "7d", "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {
        "dry_run": False,
        "tasks": [{"task_id": "old-done", "deleted": doomed, "kept": []}],
        "refused": [],
    }
    assert store.io.list("old-done/") == []
    after = snapshot(store.io)
    assert after == {n: b for n, b in before.items() if not n.startswith("old-done/")}
    by_age = cli("clean", store.arg, "--older-than", "1w")
    assert by_age.returncode == 0
    assert by_age.stdout.startswith("deleted task old-error (")
    assert [t["task_id"] for t in ls_json(store.arg)] == ["new-done"]
    nothing = cli("clean", store.arg, "--status", "ERROR")
    assert (nothing.returncode, nothing.stdout) == (0, "no task matches; nothing to do\n")


def test_clean_named_tasks(store: Store) -> None:
    completed(store.io, "a")
    created(store.io, "b")
    completed(store.io, "c")
    missing = cli("clean", store.arg, "a", "zzz")
    assert missing.returncode == 1
    assert_one_line_error(missing.stderr, "'zzz'", "nothing was deleted")
    assert len(stage_objects(store.io, "a")) == 3
    run = cli("clean", store.arg, "a", "b")
    assert run.returncode == 0, run.stderr
    assert [t["task_id"] for t in ls_json(store.arg)] == ["c"]


def test_clean_refuses_locked_tasks(store: Store) -> None:
    completed(store.io, "free")
    completed(store.io, "held")
    crashed(store, "dead")
    before = snapshot(store.io)
    with BindLock(store.io, lock_obj_name("held")):
        run = cli("clean", store.arg, "free", "held", "dead")
    assert run.returncode == 3
    assert run.stdout.startswith("deleted task free (")
    errors = run.stderr.strip().splitlines()
    assert len(errors) == 2
    assert "'held'" in errors[0]
    assert f"{HOST}:{os.getpid()}" in errors[0]
    assert "'dead'" in errors[1]
    assert "(dead, " in errors[1]
    assert "unlock" in errors[1]
    assert "Traceback" not in run.stderr
    assert without_locks(snapshot(store.io)) == {
        n: b for n, b in without_locks(before).items() if not n.startswith("free/")
    }
    assert store.io.read(lock_obj_name("dead")) == before[lock_obj_name("dead")]
    assert store.io.list("free/") == []
    assert len(stage_objects(store.io, "held")) == 3
    assert engine(store.io, "held").status is S.COMPLETE
    by_status = cli("clean", store.arg, "--status", "RUNNING")
    assert by_status.returncode == 3
    assert store.io.exists(lock_obj_name("dead"))


def test_clean_never_deletes_a_foreign_object(store: Store) -> None:
    completed(store.io, "job")
    completed(store.io, "other")
    foreign = {
        "job/notes.txt": b"mine",
        "job/report.json": b'{"rows": 3}',
        "job/sub/deep.json": b"{}",
        "job/s9.json": store.io.read("other/s0.json"),  # another task's stage object
        "job/broken.json": b'{"checkmate": {"format": 1}}',
        "data/export.json": b'{"checkmate": "not a stage"}',
        "loose.json": b"{}",
    }
    for name, data in foreign.items():
        store.io.write(name, data)
    dry = json.loads(cli("clean", store.arg, "job", "--dry-run", "--json").stdout)
    assert [n for n in dry["tasks"][0]["deleted"] if "task~lock" not in n] == [
        "job/s0.json", "job/s1.json", "job/s2.json"
    ]  # fmt: skip
    assert sorted(dry["tasks"][0]["kept"]) == sorted(n for n in foreign if n.startswith("job/"))
    run = cli("clean", store.arg, "job")
    assert run.returncode == 0, run.stderr
    assert "kept job/notes.txt" in run.stdout
    remaining = snapshot(store.io)
    for name, data in foreign.items():
        assert remaining[name] == data, name
    assert sorted(n for n in remaining if n.startswith("job/")) == sorted(
        n for n in foreign if n.startswith("job/")
    )
    assert len(stage_objects(store.io, "other")) == 3


@pytest.mark.parametrize(
    "args",
    [
        ["clean", "{store}"],
        ["clean", "{store}", "job", "--status", "COMPLETE"],
        ["clean", "{store}", "--older-than", "seven days"],
        ["clean", "{store}", "--status", "DONE"],
        ["ls", "{store}", "--status", "FINISHED"],
        ["show", "{store}", "../etc"],
        ["show", "{store}"],
        ["frobnicate", "{store}"],
        [],
        ["ls", "{store}", "--storage-option", "novalue"],
        ["ls", "{store}", "--storage-option", "auto_mkdir=true"],
    ],
)
def test_usage_errors_exit_2_with_one_line(local: Store, args: list[str]) -> None:
    completed(local.io, "job")
    before = snapshot(local.io)
    run = cli(*(a.format(store=local.arg) for a in args))
    assert run.returncode == 2, run.stderr
    assert run.stdout == ""
    assert_one_line_error(run.stderr)
    assert snapshot(local.io) == before


def test_storage_options_are_passed_to_fsspec(tmp_path: Path) -> None:
    uri = (tmp_path / "fs-store").as_uri()
    completed(FsspecTaskIO(uri), "job")
    run = cli("ls", uri, "--storage-option", "auto_mkdir=true", "-o", "skip_instance_cache=true")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[1].split()[:2] == ["job", "COMPLETE"]
    before_command = cli("--storage-option", "auto_mkdir=false", "--json", "ls", uri)
    assert before_command.returncode == 0, before_command.stderr
    assert json.loads(before_command.stdout)[0]["task_id"] == "job"
    unknown = cli("ls", "nosuchprotocol://bucket/tasks")
    assert unknown.returncode == 2
    assert_one_line_error(unknown.stderr, "nosuchprotocol")


def test_help_version_and_console_script() -> None:
    run = cli("--help")
    assert run.returncode == 0
    for command in ("ls", "show", "history", "unlock", "cancel", "clean"):
        assert command in run.stdout
    version = cli("--version")
    assert version.returncode == 0
    assert version.stdout.startswith("checkmate ")
    scripts = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")}
    assert scripts.get("checkmate") == "checkmate.cli:main"


# ---------------------------------------------------------------------- memory://, in-process


def test_every_command_on_a_memory_store_in_process(
    memory: Store, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    eng = completed(memory.io, "done")
    failed(memory.io, "broken")
    log = tmp_path / "log.txt"
    created(memory.io, "idle", log=log)

    code, out, err = cli_in_process(capsys, "ls", memory.arg, "--json")
    assert (code, err) == (0, "")
    assert [(t["task_id"], t["status"]) for t in json.loads(out)] == [
        ("broken", "ERROR"), ("done", "COMPLETE"), ("idle", "CREATED"),
    ]  # fmt: skip
    code, out, _ = cli_in_process(capsys, "ls", memory.arg)
    assert code == 0
    assert "\x1b" not in out
    assert len(out.splitlines()) == 4

    code, out, _ = cli_in_process(capsys, "show", memory.arg, "done")
    assert code == 0
    assert out == eng.dump_stages("persistence", color="")
    assert "memory://" in out

    code, out, _ = cli_in_process(capsys, "history", memory.arg, "broken", "--json")
    assert code == 0
    assert json.loads(out)[-1]["end_status"] == "ERROR"

    with BindLock(memory.io, lock_obj_name("idle")):
        code, out, err = cli_in_process(capsys, "unlock", memory.arg, "idle")
        assert code == 3
        assert_one_line_error(err, f"{HOST}:{os.getpid()}")
        code, out, err = cli_in_process(capsys, "clean", memory.arg, "idle")
        assert code == 3
    code, out, _ = cli_in_process(capsys, "cancel", memory.arg, "idle")
    assert code == 0, out
    assert "at once" in out
    idle = engine(memory.io, "idle", stages={"log_path": str(log)})
    assert idle.execute() is S.CANCELED
    assert read_log(log) == []

    code, out, err = cli_in_process(capsys, "cancel", memory.arg, "done")
    assert code == 3
    code, out, err = cli_in_process(capsys, "show", memory.arg, "missing")
    assert code == 1
    assert_one_line_error(err, "'missing'")

    code, out, _ = cli_in_process(capsys, "clean", memory.arg, "--status", "CANCELED", "ERROR")
    assert code == 0
    assert "deleted task broken" in out
    assert "deleted task idle" in out
    code, out, _ = cli_in_process(capsys, "ls", memory.arg, "--json")
    assert [t["task_id"] for t in json.loads(out)] == ["done"]
    code, _, err = cli_in_process(capsys, "ls")
    assert code == 2
    assert_one_line_error(err)
