"""Leases, heartbeats and fencing (issue 3), with real processes on real servers.

Backends: local disk, ``memory://`` (in-process only: threads stand in for
processes), and the three emulators (moto for S3, fake-gcs-server for GCS,
Azurite for Azure Blob). ``file://`` shares its primitives with local disk
and is covered by the core suite. Races use 8 racers, except on moto, whose
check-then-write is not atomic under heavy contention (see
/work/shared/notes/object-stores.md): 4 there.

Waiting for a lease to expire is waiting on time by nature; every such wait
polls the lock record or ``has_lockfile`` with a deadline. Everything else is
synchronised with files, pipes and events.

Run as a script, this module is the worker the tests start in child processes
(``python tests/test_leases.py COMMAND JSON``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import EMULATED, backend_params, make_io, state_snapshot, store_spec
from pipelines import Payload, append_line, open_store, read_log

from checkmate import (
    BaseStage,
    BaseStageState,
    BindException,
    BindLock,
    CheckMateEngine,
    ConfigurationError,
    LeaseLostError,
    LockUnsupportedError,
    RetryPolicy,
    StageStatus,
    StorageRetry,
    TaskEngineException,
    TaskIO,
)
from checkmate.lease import SELFTEST_INFIX, _ScratchMark, self_test
from checkmate.locking import LeaseRecord
from checkmate.lockrecord import LockOwner
from checkmate.storage import LocalTaskIO
from checkmate.testing import WrappingTaskIO

_T = TypeVar("_T")

THIS_FILE = str(Path(__file__).resolve())
REPO_DIR = Path(__file__).resolve().parent.parent
TASK = "lease-task"
STAGES = 3
WAIT = 60.0
"""Upper bound of every wait (a test that hits it has failed)."""
SKEW = 0.2
SEND_GAP = 0.02
"""Seconds between a holder's last look at its deadline and the request it then sends."""
LEASE_BACKENDS = ["local", "memory", *EMULATED]
PROCESS_BACKENDS = ["local", *EMULATED]


def ttl_for(kind: str) -> float:
    """Short leases; GCS takes about one write per second per object, so 3 s there."""
    return 3.0 if kind == "gcs" else 1.5


def racers_for(kind: str) -> int:
    return 4 if kind == "s3" else 8


# ---------------------------------------------------------------------- stages


class LeaseState(BaseStageState[Payload]):
    value: int = 0
    epoch: int | None = None


class LeaseStage(BaseStage[LeaseState]):
    """Adds ``add`` to the previous value; logs every run with its epoch and pid.

    Config (template fields): ``log_path`` gets ``"<stage> <attempt> <epoch> <pid>"``
    per run; on attempt ``block_attempt`` the stage touches ``marker`` and then
    waits until ``proceed`` exists; ``run_for`` keeps it running that long.
    """

    add: int = 1
    log_path: str = ""
    marker: str = ""
    proceed: str = ""
    block_attempt: int = 1
    run_for: float = 0.0

    def execute_stage(self, previous_state_copy: LeaseState) -> None:
        attempt = self.state.attempts
        epoch = self.engine.lock_epoch
        if self.log_path:
            append_line(self.log_path, f"{self.stage_name} {attempt} {epoch} {outer_pid()}")
        if self.marker and attempt == self.block_attempt:
            append_line(self.marker, "entered")
            wait_until(lambda: Path(self.proceed).exists(), "the proceed file")
        if self.run_for:
            threading.Event().wait(self.run_for)
        self.state.epoch = epoch
        self.state.value = previous_state_copy.value + self.add
        self.state.result = Payload(value=self.state.value)


def make_lease_stages(n: int = STAGES, **config: Any) -> list[LeaseStage]:
    per_stage: dict[str, dict[str, Any]] = config.pop("per_stage", {})
    return [
        LeaseStage(
            stage_name=f"s{i}",
            state=LeaseState(),
            add=i + 1,
            **{**config, **per_stage.get(f"s{i}", {})},
        )
        for i in range(n)
    ]


def lease_engine(io: TaskIO, kind: str, **kwargs: Any) -> CheckMateEngine[Any, Any]:
    config = kwargs.pop("config", {})
    return CheckMateEngine(
        io,
        task_id=kwargs.pop("task_id", TASK),
        stage_templates=make_lease_stages(**config),
        retry_policy=RetryPolicy.STAGE,
        max_attempts=3,
        lock_ttl=kwargs.pop("lock_ttl", ttl_for(kind)),
        lock_skew=kwargs.pop("lock_skew", SKEW),
        **kwargs,
    )


# ---------------------------------------------------------------------- helpers


def outer_pid() -> int:
    """This process's pid as the host sees it (also inside a new pid namespace)."""
    try:
        return int(os.readlink("/proc/self"))
    except (OSError, ValueError):
        return os.getpid()


def wait_until(
    condition: Callable[[], _T], what: str, timeout: float = WAIT, interval: float = 0.01
) -> _T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def lock_record(io: TaskIO, name: str) -> LeaseRecord:
    return LeaseRecord.model_validate_json(io.read(name))


def stage_epochs(io: TaskIO) -> dict[str, int | None]:
    """The epoch recorded in each stage object's ``checkmate`` member."""
    return {
        name: json.loads(data)["checkmate"].get("epoch")
        for name, data in state_snapshot(io).items()
    }


def foreign_expired_lease(epoch: int, ttl: float) -> bytes:
    """A lease of another host that expired a minute ago (its holder may still be alive)."""
    now = time.time()
    return (
        LeaseRecord(
            host="elsewhere.invalid",
            pid=4242,
            token=uuid.uuid4().hex,
            acquired_at=datetime.now(timezone.utc).isoformat(),
            epoch=epoch,
            ttl=ttl,
            renewed_at=now - ttl - 60,
            expires_at=now - 60,
            nonce=uuid.uuid4().hex,
        )
        .model_dump_json()
        .encode()
    )


@functools.cache
def unshare_prefix() -> list[str] | None:
    """A command prefix that runs a process in a new pid namespace, i.e. as "another host".

    Two processes in different pid namespaces cannot judge each other's pids,
    so the engine treats them as different hosts (issue 3: containers sharing a
    hostname are not the same host). None where user namespaces are unavailable.
    """
    prefix = ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--kill-child"]
    try:
        subprocess.run([*prefix, "true"], check=True, capture_output=True, timeout=WAIT)
    except (OSError, subprocess.SubprocessError):
        return None
    return prefix


class Child:
    """A worker process (this file run as a script) that talks JSON lines on stdout."""

    def __init__(self, command: str, config: dict[str, Any], workdir: Path, prefix=()) -> None:
        self.err_path = workdir / f"child-{command}-{uuid.uuid4().hex[:8]}.err"
        with self.err_path.open("w") as err:
            self.proc = subprocess.Popen(
                [*prefix, sys.executable, THIS_FILE, command, json.dumps(config)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                cwd=REPO_DIR,
            )
        self.events: queue.Queue[str | None] = queue.Queue()
        self.worker_pid: int | None = None
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.put(line)
        self.events.put(None)

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def next(self, timeout: float = WAIT) -> dict[str, Any]:
        """The next event the worker prints; fails if it exits or stays silent."""
        try:
            line = self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"worker silent for {timeout:.0f}s:\n{self.stderr()}") from None
        if line is None:
            self.events.put(None)
            code = self.proc.wait(timeout=WAIT)
            raise AssertionError(f"worker exited with {code} instead:\n{self.stderr()}")
        event: dict[str, Any] = json.loads(line)
        if "pid" in event:
            self.worker_pid = event["pid"]
        return event

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = WAIT) -> None:
        """Wait for a clean exit (stdin closed first)."""
        with contextlib.suppress(BrokenPipeError, OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        code = self.proc.wait(timeout=timeout)
        assert code == 0, f"worker exited with {code}:\n{self.stderr()}"
        assert "Traceback" not in self.stderr(), self.stderr()

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the worker's Python process, by its pid."""
        pid = self.worker_pid if self.worker_pid is not None else self.proc.pid
        os.kill(pid, signum)

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            for signum in (signal.SIGCONT, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    self.signal(signum)
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(timeout=WAIT)
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                if stream is not None:
                    stream.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Child]]:
    """Start worker processes; any left at the end of the test is killed by its pid."""
    children: list[Child] = []

    def start(command: str, config: dict[str, Any], prefix: Any = ()) -> Child:
        child = Child(command, config, tmp_path, prefix)
        children.append(child)
        return child

    yield start
    for child in children:
        child.cleanup()


class Store:
    """The store under test, as in-process TaskIO and as a spec for workers."""

    def __init__(self, kind: str, tmp_path: Path) -> None:
        self.kind = kind
        self.tmp_path = tmp_path
        self.io = make_io(kind, tmp_path)
        self.spec = store_spec(kind, tmp_path) if kind != "memory" else ""
        self.ttl = ttl_for(kind)
        self.log = tmp_path / "stage-runs.log"

    def worker_config(self, **extra: Any) -> dict[str, Any]:
        config = {"store": self.spec, "task": TASK, "ttl": self.ttl, "skew": SKEW}
        config.update(extra)
        return config

    def engine(self, **kwargs: Any) -> CheckMateEngine[Any, Any]:
        return lease_engine(self.io, self.kind, **kwargs)

    @property
    def lock_name(self) -> str:
        return self.engine().lock_obj_name

    def record(self) -> LeaseRecord:
        return lock_record(self.io, self.lock_name)


@pytest.fixture(params=backend_params(LEASE_BACKENDS))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    kind = str(request.param)
    if kind in EMULATED:
        request.getfixturevalue(f"{kind}_emulator")
    return Store(kind, tmp_path)


@pytest.fixture(params=backend_params(PROCESS_BACKENDS))
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """A store several processes share."""
    kind = str(request.param)
    if kind in EMULATED:
        request.getfixturevalue(f"{kind}_emulator")
    return Store(kind, tmp_path)


class Freezable(WrappingTaskIO):
    """A holder's view of the store that can be "paused": every call blocks until thawed.

    ``freeze_on(op, args)``, if given, freezes the store when it returns True,
    *before* that call reaches the store: the call itself blocks too.
    """

    def __init__(
        self, inner: TaskIO, freeze_on: Callable[[str, tuple[Any, ...]], bool] | None = None
    ) -> None:
        super().__init__(inner)
        self.freeze_on = freeze_on
        self.frozen = threading.Event()
        self.thawed = threading.Event()

    def _call(self, op: str, func: Callable[..., _T], *args: Any) -> _T:
        if self.freeze_on is not None and not self.frozen.is_set() and self.freeze_on(op, args):
            self.frozen.set()
        if self.frozen.is_set():
            self.thawed.wait(timeout=2 * WAIT)
        return func(*args)


class Unreachable(WrappingTaskIO):
    """A store that can become unreachable: every call then fails with OSError.

    Records every mutating call that was *sent* (reached this wrapper), with
    its monotonic time and whether it got through.
    """

    MUTATIONS = frozenset({"write", "create", "delete", "write_if", "delete_if"})

    def __init__(
        self, inner: TaskIO, cut_on: Callable[[str, tuple[Any, ...]], bool] | None = None
    ) -> None:
        super().__init__(inner)
        self.down = False
        self.cut_on = cut_on
        self.went_down = threading.Event()
        self.sent: list[tuple[float, str, str, bool]] = []
        self._lock = threading.Lock()

    def cut(self) -> None:
        self.down = True
        self.went_down.set()

    def deadline_bound(self, ttl: float) -> float:
        """A time no earlier than the holder's local deadline once the store is down.

        The deadline is ttl after the start of the holder's last successful
        renewal, which started before it reached this wrapper.
        """
        renewals = [t for t, op, name, ok in self.sent if ok and name.endswith("task~lock")]
        return max(renewals) + ttl

    def _call(self, op: str, func: Callable[..., _T], *args: Any) -> _T:
        at = time.monotonic()
        if self.cut_on is not None and not self.went_down.is_set() and self.cut_on(op, args):
            self.cut()
        down = self.down
        if op in self.MUTATIONS:
            with self._lock:
                self.sent.append((at, op, str(args[0]), not down))
        if down:
            raise ConnectionResetError(f"store unreachable ({op})")
        return func(*args)


class LostReply(WrappingTaskIO):
    """The first call that ``matches`` reaches the store, but its reply is lost (OSError)."""

    def __init__(self, inner: TaskIO, matches: Callable[[str, tuple[Any, ...]], bool]) -> None:
        super().__init__(inner)
        self.matches = matches
        self.lost = threading.Event()

    def _call(self, op: str, func: Callable[..., _T], *args: Any) -> _T:
        result = func(*args)
        if not self.lost.is_set() and self.matches(op, args):
            self.lost.set()
            raise ConnectionResetError(f"the reply to {op} was lost (it took effect)")
        return result


class IgnoresPreconditions(WrappingTaskIO):
    """A store that accepts conditional writes but ignores the conditions (like s3rver)."""

    def __init__(self, inner: TaskIO, keep_create: bool) -> None:
        super().__init__(inner)
        self.keep_create = keep_create

    def write_if(self, obj_name: str, data: bytes, version: str | None) -> str:
        if version is None and self.keep_create:
            return self.inner.write_if(obj_name, data, None)
        self.inner.write(obj_name, data)
        return self.inner.read_versioned(obj_name)[1]


def run_in_thread(target: Callable[[], _T]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``target`` in a thread; the dict gets its ``result`` or ``error``."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = target()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


# ---------------------------------------------------------------------- races


def bind_race(store: Store, count: int, spawn: Callable[..., Child]) -> list[dict[str, Any]]:
    """``count`` workers try once, together, to bind the task; each holds what it got.

    Returns their reports; all holders release only after every racer reported.
    Processes on shareable stores, threads on ``memory://``.
    """
    if store.kind != "memory":
        children = [spawn("bind", store.worker_config()) for _ in range(count)]
        for child in children:
            assert child.next()["event"] == "ready"
        for child in children:
            child.send("go")
        reports = [child.next() for child in children]
        for child in children:
            child.send("release")
        for child in children:
            assert child.next()["event"] == "released"
            child.finish()
        return reports
    barrier = threading.Barrier(count)
    everyone_reported = threading.Event()
    reports: list[dict[str, Any]] = []
    guard = threading.Lock()

    self_test(store.io, "warm-up/lock")  # once per process: the threads then really race

    def racer() -> None:
        engine = store.engine()
        barrier.wait(timeout=WAIT)
        report = try_bind(engine)
        with guard:
            reports.append(report)
            if len(reports) == count:
                everyone_reported.set()
        everyone_reported.wait(timeout=WAIT)
        if engine.is_bound:
            engine.unbind()

    threads = [threading.Thread(target=racer) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=WAIT)
    assert len(reports) == count
    return reports


def try_bind(engine: CheckMateEngine[Any, Any]) -> dict[str, Any]:
    try:
        engine.bind()
    except BindException as exc:
        return {"event": "bound", "won": False, "error": type(exc).__name__, "pid": outer_pid()}
    return {"event": "bound", "won": True, "epoch": engine.lock_epoch, "pid": outer_pid()}


def test_racing_processes_bind_one_task_exactly_one_holds_it(
    store: Store, spawn: Callable[..., Child]
) -> None:
    count = racers_for(store.kind)
    reports = bind_race(store, count, spawn)
    winners = [r for r in reports if r["won"]]
    assert len(winners) == 1, reports
    assert winners[0]["epoch"] == 1
    assert {r["error"] for r in reports if not r["won"]} == {"BindException"}, reports
    record = store.record()
    assert (record.epoch, record.state) == (1, "released")
    assert record.pid == winners[0]["pid"]
    assert store.engine().status is StageStatus.CREATED


def test_racing_takeovers_of_an_expired_lease_exactly_one_wins_with_the_next_epoch(
    store: Store, spawn: Callable[..., Child]
) -> None:
    engine = store.engine()
    with engine:
        pass  # the task exists: its stages are CREATED, persisted at epoch 1
    store.io.write(engine.lock_obj_name, foreign_expired_lease(epoch=7, ttl=store.ttl))
    assert not engine.has_lockfile
    before = state_snapshot(store.io)
    count = racers_for(store.kind)
    reports = bind_race(store, count, spawn)
    winners = [r for r in reports if r["won"]]
    assert len(winners) == 1, reports
    assert winners[0]["epoch"] == 8
    assert {r["error"] for r in reports if not r["won"]} == {"BindException"}, reports
    record = store.record()
    assert (record.epoch, record.pid, record.state) == (8, winners[0]["pid"], "released")
    # The winner took the lease from a holder that may be alive: it sealed every
    # stage object under its epoch, changing nothing but the epoch.
    assert set(stage_epochs(store.io).values()) == {8}
    after = state_snapshot(store.io)
    assert after.keys() == before.keys()
    for name, data in after.items():
        assert json.loads(data)["state"] == json.loads(before[name])["state"]


# ---------------------------------------------------------------------- crashed holders


def block_config(store: Store, stage: str = "s1") -> dict[str, Any]:
    """Stage config that makes ``stage`` announce itself, then wait for a file."""
    marker = store.tmp_path / f"{stage}-entered"
    proceed = store.tmp_path / f"{stage}-proceed"
    return {
        "log_path": str(store.log),
        "per_stage": {stage: {"marker": str(marker), "proceed": str(proceed)}},
    }


def runs(store: Store) -> list[tuple[str, int, int, int]]:
    """Every stage run so far: (stage, attempt, epoch, pid)."""
    out = []
    for line in read_log(store.log):
        stage, attempt, epoch, pid = line.split()
        out.append((stage, int(attempt), int(epoch), int(pid)))
    return out


def start_blocked_holder(store: Store, spawn: Callable[..., Child], prefix: Any = ()) -> Child:
    """A worker that runs the task and stops inside s1 (attempt 1), holding the lease."""
    holder = spawn("run", store.worker_config(config=block_config(store)), prefix)
    assert holder.next()["event"] == "started"
    wait_until(lambda: (store.tmp_path / "s1-entered").exists(), "the holder to enter s1")
    return holder


def test_holder_killed_on_this_host_is_taken_over_at_once_without_sealing(
    shared: Store, spawn: Callable[..., Child]
) -> None:
    holder = start_blocked_holder(shared, spawn)
    holder.signal(signal.SIGKILL)
    holder.proc.wait(timeout=WAIT)
    engine = shared.engine(config=block_config(shared))
    dead = shared.record()
    held = engine.has_lockfile
    if time.time() < dead.expires_at:
        # has_lockfile does not consider whether the owner lives; the lease has not expired.
        assert held is True
    before = state_snapshot(shared.io)
    engine.bind()  # one try: the owner is a dead process of this host
    try:
        assert engine.lock_epoch == 2
        assert shared.record().epoch == 2
        # A dead process writes nothing more: no sealing, nothing rewritten.
        assert state_snapshot(shared.io) == before
        assert engine.execute(strict_recovery=True) is StageStatus.COMPLETE
    finally:
        engine.unbind()
    me, them = outer_pid(), holder.worker_pid
    assert runs(shared) == [
        ("s0", 1, 1, them),
        ("s1", 1, 1, them),
        ("s1", 2, 2, me),
        ("s2", 1, 2, me),
    ]
    assert engine.task_result.value == 6


def test_holder_of_another_host_killed_is_taken_over_after_ttl_and_skew(
    shared: Store, spawn: Callable[..., Child]
) -> None:
    prefix = unshare_prefix()
    if prefix is None:
        pytest.skip("user and pid namespaces are unavailable (unshare failed)")
    holder = start_blocked_holder(shared, spawn, prefix)
    holder.signal(signal.SIGKILL)
    holder.proc.wait(timeout=WAIT)
    dead = shared.record()
    assert dead.pid != holder.worker_pid  # it recorded its pid in its own namespace
    engine = shared.engine(config=block_config(shared))
    if time.time() < dead.expires_at - 0.5:  # well before expiry, whatever the bind costs
        with pytest.raises(BindException, match="held by"):
            engine.bind()
    before = state_snapshot(shared.io)
    engine.bind_lock_timeout = WAIT
    engine.bind()  # keeps trying until the lease is past its expiry plus the margin
    try:
        record = shared.record()
        assert record.renewed_at >= dead.expires_at + SKEW
        assert engine.lock_epoch == record.epoch == 2
        # The former holder may be alive (another host): its objects are sealed.
        assert set(stage_epochs(shared.io).values()) == {2}
        for name, data in state_snapshot(shared.io).items():
            assert json.loads(data)["state"] == json.loads(before[name])["state"]
        assert engine.execute(strict_recovery=True) is StageStatus.COMPLETE
    finally:
        engine.unbind()
    me, them = outer_pid(), holder.worker_pid
    assert runs(shared) == [
        ("s0", 1, 1, them),
        ("s1", 1, 1, them),
        ("s1", 2, 2, me),
        ("s2", 1, 2, me),
    ]


def test_stopped_holder_resumed_after_a_takeover_raises_lease_lost_and_writes_nothing(
    shared: Store, spawn: Callable[..., Child]
) -> None:
    holder = start_blocked_holder(shared, spawn)
    holder.signal(signal.SIGSTOP)
    engine = shared.engine()
    # The stopped holder no longer renews: its lease expires (it is alive, which
    # has_lockfile does not consider).
    wait_until(lambda: not engine.has_lockfile, "the stopped holder's lease to expire")
    assert time.time() > shared.record().expires_at
    # Another worker takes the task over once the lease is past expiry + skew, and finishes it.
    successor = spawn(
        "run",
        shared.worker_config(timeout=WAIT, strict=True, config={"log_path": str(shared.log)}),
    )
    assert successor.next()["event"] == "started"
    done = successor.next()
    assert (done["status"], done["epoch"]) == ("COMPLETE", 2), done
    successor.finish()
    objects = state_snapshot(shared.io)
    lock_bytes = shared.io.read(shared.lock_name)
    assert (shared.record().epoch, shared.record().state) == (2, "released")
    # The zombie wakes up inside s1 and goes on.
    (shared.tmp_path / "s1-proceed").touch()
    holder.signal(signal.SIGCONT)
    report = holder.next()
    assert report["error"] == "LeaseLostError", report
    holder.finish()
    assert state_snapshot(shared.io) == objects, "the zombie changed the new owner's state"
    assert shared.io.read(shared.lock_name) == lock_bytes, "the zombie wrote the lock"
    assert [(s, a, e) for s, a, e, _ in runs(shared)] == [
        ("s0", 1, 1),
        ("s1", 1, 1),
        ("s1", 2, 2),
        ("s2", 1, 2),
    ]
    assert shared.engine().status is StageStatus.COMPLETE


# ---------------------------------------------------------------------- heartbeats


def rival_attempts(store: Store, spawn: Callable[..., Child], stop: threading.Event) -> Any:
    """Start a rival that tries to bind the task over and over until ``stop``.

    Returns a function that stops it and returns its attempts: (time, outcome).
    """
    if store.kind != "memory":
        stop_file = store.tmp_path / "rival-stop"
        rival = spawn("rival", store.worker_config(stop=str(stop_file)))
        assert rival.next()["event"] == "ready"

        def finish_process() -> list[tuple[float, str]]:
            stop_file.touch()
            attempts = rival.next()["attempts"]
            rival.finish()
            return [tuple(a) for a in attempts]

        return finish_process
    thread, outcome = run_in_thread(lambda: rival_loop(store.io, store.kind, stop.is_set))

    def finish_thread() -> list[tuple[float, str]]:
        stop.set()
        thread.join(timeout=WAIT)
        if "error" in outcome:
            raise outcome["error"]
        return list(outcome["result"])

    return finish_thread


def rival_loop(io: TaskIO, kind: str, stopped: Callable[[], bool]) -> list[tuple[float, str]]:
    attempts = []
    while not stopped():
        engine = lease_engine(io, kind)
        at = time.time()
        try:
            engine.bind()
        except BindException:
            attempts.append((at, "held"))
        except TaskEngineException as exc:
            attempts.append((at, type(exc).__name__))
        else:
            attempts.append((at, "won"))
            engine.unbind()
        threading.Event().wait(0.1)  # pacing, not synchronisation
    return attempts


def test_heartbeats_keep_the_lease_through_a_stage_five_times_the_ttl(
    store: Store, spawn: Callable[..., Child]
) -> None:
    long = 5 * store.ttl
    engine = store.engine(
        config={"log_path": str(store.log), "per_stage": {"s1": {"run_for": long}}}
    )
    with engine:
        bound_at = time.time()
        first = store.record()
        stop_rival = rival_attempts(store, spawn, threading.Event())
        try:
            status = engine.execute()
        finally:
            attempts = stop_rival()
        assert status is StageStatus.COMPLETE
        assert engine.lock_epoch == 1
        last = store.record()
    assert (last.epoch, last.nonce != first.nonce) == (1, True)
    assert last.renewed_at > bound_at + long - store.ttl, "the lease was not renewed"
    late = [a for a in attempts if a[0] > bound_at + store.ttl + SKEW]
    assert len(late) >= 3, f"the rival did not try after the first ttl: {attempts}"
    assert {outcome for _, outcome in attempts} == {"held"}, attempts
    assert [(s, a, e) for s, a, e, _ in runs(store)] == [("s0", 1, 1), ("s1", 1, 1), ("s2", 1, 1)]


# ---------------------------------------------------------------------- fencing in-process


def test_holder_whose_store_becomes_unreachable_stops_at_its_local_deadline(
    store: Store,
) -> None:
    """Past its local deadline a holder sends nothing, even when the store comes back."""
    link = Unreachable(store.io)
    ttl = store.ttl
    cut: dict[str, Any] = {}

    class CutsTheStore(LeaseStage):
        def execute_stage(self, previous_state_copy: LeaseState) -> None:
            cut["objects"] = state_snapshot(store.io)
            link.cut()
            cut["deadline_bound"] = link.deadline_bound(ttl)
            wait_until(lambda: time.monotonic() > cut["deadline_bound"] + 0.3, "the local deadline")
            link.down = False  # the store is back: a holder that went on would now succeed
            # Give a holder that wrongly went on the time to renew (and be caught).
            threading.Event().wait(ttl / 2)
            super().execute_stage(previous_state_copy)

    stages = make_lease_stages()
    stages[1] = CutsTheStore(stage_name="s1", state=LeaseState(), add=2)
    engine = CheckMateEngine(
        link,
        task_id=TASK,
        stage_templates=stages,
        retry_policy=RetryPolicy.STAGE,
        max_attempts=3,
        lock_ttl=ttl,
        lock_skew=SKEW,
    )
    error: BaseException | None = None
    try:
        engine.execute()
    except LeaseLostError as exc:
        error = exc
    late = late_sends(link, cut["deadline_bound"])
    assert not late, f"writes sent after the local deadline (seconds after it, call): {late}"
    assert isinstance(error, LeaseLostError), "the holder went on after its local deadline"
    assert state_snapshot(store.io) == cut["objects"]
    record = store.record()
    assert (record.epoch, record.state) == (1, "held"), "the lost holder wrote the lock"


def late_sends(link: Unreachable, bound: float) -> list[tuple[float, str, str]]:
    """Mutating calls sent after ``bound`` (seconds after it, call, object).

    A check of the deadline and the request it lets through cannot be one
    atomic step: the few milliseconds between them are allowed.
    """
    late = [(round(t - bound, 3), op, name) for t, op, name, _ in link.sent]
    return [entry for entry in late if entry[0] > SEND_GAP]


def test_retries_of_a_stage_write_stop_at_the_local_deadline(store: Store) -> None:
    """A stage write that keeps failing is not retried past the holder's local deadline.

    The store goes down as the holder sends s1's COMPLETE (its checks passed)
    and comes back after the deadline. Retries are configured to outlast the
    lease (``storage_retry`` is the user's to choose): whatever the
    configuration, nothing may be sent after the deadline, and the holder
    stops with LeaseLostError.
    """
    link = Unreachable(store.io, cut_on=stage_write("s1", "COMPLETE"))
    ttl = store.ttl
    before: dict[str, bytes] = {}
    bound: list[float] = []

    def bring_back() -> None:
        link.went_down.wait(timeout=WAIT)
        bound.append(link.deadline_bound(ttl))
        wait_until(lambda: time.monotonic() > bound[0] + 0.3, "the local deadline")
        link.down = False

    class Snapshots(LeaseStage):
        def execute_stage(self, previous_state_copy: LeaseState) -> None:
            before.update(state_snapshot(store.io))
            super().execute_stage(previous_state_copy)

    stages = make_lease_stages()
    stages[1] = Snapshots(stage_name="s1", state=LeaseState(), add=2)
    engine = CheckMateEngine(
        link,
        task_id=TASK,
        stage_templates=stages,
        retry_policy=RetryPolicy.STAGE,
        max_attempts=3,
        lock_ttl=ttl,
        lock_skew=SKEW,
        storage_retry=StorageRetry(attempts=40, initial_delay=0.1, max_delay=0.2),
    )
    watcher, _ = run_in_thread(bring_back)
    error: BaseException | None = None
    try:
        engine.execute()
    except TaskEngineException as exc:
        error = exc
    watcher.join(timeout=WAIT)
    late = late_sends(link, bound[0])
    assert not late, f"writes sent after the local deadline (seconds after it, call): {late}"
    assert isinstance(error, LeaseLostError), repr(error)
    assert state_snapshot(store.io) == before, "a write landed after the local deadline"


def stage_write(stage: str, status: str) -> Callable[[str, tuple[Any, ...]], bool]:
    """Match the holder's conditional write that persists ``stage`` as ``status``."""

    def matches(op: str, args: tuple[Any, ...]) -> bool:
        return (
            op == "write_if"
            and args[0].endswith(f"/{stage}.json")
            and f'"status":"{status}"'.encode() in args[1]
        )

    return matches


@pytest.mark.parametrize("successor_finishes", [False, True], ids=["successor-binds", "finishes"])
def test_write_paused_after_the_checks_fails_after_a_takeover(
    store: Store, spawn: Callable[..., Child], successor_finishes: bool
) -> None:
    paused = Freezable(store.io, freeze_on=stage_write("s1", "COMPLETE"))
    holder = lease_engine(paused, store.kind, config={"log_path": str(store.log)})
    thread, outcome = run_in_thread(holder.execute)
    wait_until(paused.frozen.is_set, "the holder to start writing s1 as COMPLETE")
    # The holder passed its lease checks and is stuck inside the write, its
    # heartbeat too: the lease expires, and another worker takes over.
    if store.kind == "memory":
        successor = store.engine(bind_lock_timeout=WAIT)
        successor.bind()
        assert successor.lock_epoch == 2
        if successor_finishes:
            assert successor.execute(strict_recovery=True) is StageStatus.COMPLETE
            successor.unbind()
    else:
        successor = spawn("bind", store.worker_config(timeout=WAIT, execute=successor_finishes))
        assert successor.next()["event"] == "ready"
        successor.send("go")
        report = successor.next()
        assert (report["won"], report["epoch"]) == (True, 2), report
        if successor_finishes:
            successor.send("release")
            assert successor.next()["event"] == "released"
            successor.finish()
    objects = state_snapshot(store.io)
    assert set(stage_epochs(store.io).values()) == {2}, "the successor did not seal"
    paused.thawed.set()
    thread.join(timeout=WAIT)
    assert isinstance(outcome.get("error"), LeaseLostError), outcome
    assert state_snapshot(store.io) == objects, "the paused write landed"
    if not successor_finishes:  # the successor, still bound, is unaffected
        if store.kind == "memory":
            assert successor.execute(strict_recovery=True) is StageStatus.COMPLETE
            successor.unbind()
        else:
            successor.send("execute")
            assert successor.next()["status"] == "COMPLETE"
            successor.send("release")
            assert successor.next()["event"] == "released"
            successor.finish()
    final = store.engine()
    assert final.status is StageStatus.COMPLETE
    assert final.task_result.value == 6


def lock_write(held: bool, nth: int = 1) -> Callable[[str, tuple[Any, ...]], bool]:
    """Match the ``nth`` conditional write of the lock (an acquire or a renewal when held)."""
    seen = [0]

    def matches(op: str, args: tuple[Any, ...]) -> bool:
        if op != "write_if" or not args[0].endswith("task~lock"):
            return False
        record = json.loads(args[1])
        if record.get("state") != ("held" if held else "released"):
            return False
        seen[0] += 1
        return seen[0] == nth

    return matches


@pytest.mark.parametrize(
    "what",
    [
        "acquire",
        "renewal",
        "stage-write",
    ],
)
def test_a_write_whose_reply_was_lost_is_recognised_as_ours(store: Store, what: str) -> None:
    """Ambiguous retries: the write landed, the reply did not; the holder goes on."""
    if what == "acquire":
        matches = lock_write(held=True, nth=1)
    elif what == "renewal":
        matches = lock_write(held=True, nth=2)
    else:
        matches = stage_write("s1", "COMPLETE")
    flaky = LostReply(store.io, matches)
    # s1 runs long enough for a few renewals.
    engine = lease_engine(flaky, store.kind, config={"per_stage": {"s1": {"run_for": store.ttl}}})
    assert engine.execute() is StageStatus.COMPLETE
    assert flaky.lost.is_set(), "no reply was lost"
    assert engine.task_result.value == 6
    assert (store.record().epoch, store.record().state) == (1, "released")


# ---------------------------------------------------------------------- self-test, epochs


@pytest.mark.parametrize("keep_create", [False, True], ids=["ignores-all", "ignores-versions"])
def test_self_test_refuses_a_store_that_ignores_preconditions(
    store: Store, keep_create: bool
) -> None:
    liar = IgnoresPreconditions(store.io, keep_create=keep_create)
    engine = lease_engine(liar, store.kind)
    with pytest.raises(LockUnsupportedError, match="ignores preconditions"):
        engine.bind()
    with pytest.raises(LockUnsupportedError, match="ignores preconditions"):
        BindLock(liar, "elsewhere/lock", lock_ttl=store.ttl, lock_skew=SKEW).acquire()
    assert not engine.is_bound
    assert store.io.list("") == [], "a refused store must be left as it was"
    # The same store, honest, is accepted.
    with lease_engine(WrappingTaskIO(store.io), store.kind) as honest:
        assert honest.lock_epoch == 1


def test_self_test_removes_only_scratch_objects_of_dead_or_long_gone_writers(
    tmp_path: Path,
) -> None:
    """A crash during the self-test leaves its scratch object; the next self-test on the
    store removes those of dead local processes and those older than an hour, and
    nothing else."""
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    me = LockOwner.for_this_process().model_dump()
    now = time.time()
    marks = {
        "dead": {**me, "pid": int(gone.stdout), "pid_start": None, "written_at": now},
        "live": {**me, "written_at": now},
        "old-remote": {**me, "host": "elsewhere", "written_at": now - 7200},
        "new-remote": {**me, "host": "elsewhere", "written_at": now - 60},
    }
    inner = LocalTaskIO(tmp_path / "store")
    prefix = f"t/task~lock{SELFTEST_INFIX}"
    for key, fields in marks.items():
        inner.write(prefix + key, _ScratchMark(**fields, mark="x").model_dump_json().encode())
    inner.write(prefix + "garbage", b"not a self-test's")
    self_test(WrappingTaskIO(inner), "t/task~lock")
    assert inner.list("t/") == [prefix + k for k in ("garbage", "live", "new-remote")]


def test_epochs_strictly_increase_across_acquisitions_and_takeovers(store: Store) -> None:
    epochs = []
    engine = store.engine()
    assert engine.lock_epoch is None
    with engine:
        epochs.append(engine.lock_epoch)
    assert engine.lock_epoch is None
    lock = BindLock(store.io, engine.lock_obj_name, lock_ttl=store.ttl, lock_skew=SKEW)
    for _ in range(2):
        with lock:
            epochs.append(lock.epoch)
        assert lock.epoch is None
        assert (store.record().state, store.record().epoch) == ("released", epochs[-1])
    # A holder that stops renewing (paused) loses the lease to a takeover.
    paused = Freezable(store.io)
    holder = BindLock(paused, engine.lock_obj_name, lock_ttl=store.ttl, lock_skew=SKEW)
    holder.acquire()
    epochs.append(holder.epoch)
    paused.frozen.set()
    successor = store.engine(bind_lock_timeout=WAIT)
    with successor:
        epochs.append(successor.lock_epoch)
        paused.thawed.set()
        holder.release()  # lost: writes nothing
        assert store.record().epoch == successor.lock_epoch
        assert store.record().state == "held"
    # A lease of another host that expired.
    store.io.write(engine.lock_obj_name, foreign_expired_lease(epoch=epochs[-1], ttl=store.ttl))
    with engine:
        epochs.append(engine.lock_epoch)
    assert epochs == [1, 2, 3, 4, 5, 6]
    assert store.record().epoch == 6


def test_lease_lost_error_is_a_task_engine_exception_not_a_bind_exception() -> None:
    assert LeaseLostError.__bases__ == (TaskEngineException,)
    assert not issubclass(LeaseLostError, BindException)


def test_lock_epoch_is_none_unless_bound_under_a_lease(store: Store) -> None:
    engine = store.engine()
    assert engine.lock_epoch is None
    with engine:
        assert engine.lock_epoch == 1
    assert engine.lock_epoch is None
    unlocked = store.engine(no_lock=True)
    with unlocked:
        assert unlocked.lock_epoch is None


def test_has_lockfile_follows_the_lease_not_the_lock_object(store: Store) -> None:
    engine = store.engine()
    observer = store.engine()
    assert not observer.has_lockfile
    with engine:
        assert observer.has_lockfile
        assert engine.has_lockfile
    assert store.io.exists(engine.lock_obj_name), "a released lease keeps its object"
    assert not observer.has_lockfile
    paused = Freezable(store.io)
    holder = BindLock(paused, engine.lock_obj_name, lock_ttl=store.ttl, lock_skew=SKEW)
    holder.acquire()
    try:
        paused.frozen.set()
        record = store.record()
        checked_at = time.time()
        held = observer.has_lockfile
        if time.time() < record.expires_at:
            assert held, "a lease that has not expired is held"
        if checked_at > record.expires_at:
            assert not held, "an expired lease is not held"
        wait_until(lambda: not observer.has_lockfile, "the lease to expire")
        assert time.time() > store.record().expires_at
    finally:
        paused.thawed.set()
        holder.release()


@pytest.mark.parametrize("kind", backend_params(["gcs"]))
def test_gcs_refuses_a_ttl_that_renews_faster_than_once_a_second(
    kind: str, tmp_path: Path, gcs_emulator: Any
) -> None:
    io = make_io(kind, tmp_path)
    with pytest.raises(ConfigurationError, match="lock_ttl"):
        BindLock(io, "t/lock", lock_ttl=2.9)
    engine = lease_engine(io, kind, lock_ttl=2.9)
    with pytest.raises(ConfigurationError, match="lock_ttl"):
        engine.bind()
    assert io.list("") == []
    with lease_engine(io, kind, lock_ttl=3.0) as fine:
        assert fine.lock_epoch == 1


# ---------------------------------------------------------------------- the worker


def emit(event: dict[str, Any]) -> None:
    print(json.dumps(event), flush=True)


def worker_main(argv: list[str]) -> int:
    """Entry point of the worker processes the tests start."""
    command, raw = argv
    config = json.loads(raw)
    io = open_store(config["store"])
    kind = "gcs" if config["store"].startswith(("gs://", "gcs://")) else "other"

    def engine(**kwargs: Any) -> CheckMateEngine[Any, Any]:
        return lease_engine(io, kind, lock_ttl=config["ttl"], lock_skew=config["skew"], **kwargs)

    self_test(io, "warm-up/lock")  # once per process, outside the task: racers then really race
    if command == "bind":
        eng = engine(bind_lock_timeout=config.get("timeout"))
        emit({"event": "ready", "pid": outer_pid()})
        sys.stdin.readline()
        emit(try_bind(eng))
        for line in sys.stdin:
            if line.strip() == "execute" and eng.is_bound:
                emit({"event": "done", "status": eng.execute(strict_recovery=True).value})
            elif line.strip() == "release":
                break
        if config.get("execute") and eng.is_bound:
            eng.execute(strict_recovery=True)
        if eng.is_bound:
            eng.unbind()
        emit({"event": "released"})
        return 0
    if command == "run":
        eng = engine(bind_lock_timeout=config.get("timeout"), config=config.get("config", {}))
        emit({"event": "started", "pid": outer_pid()})
        epochs: list[int | None] = []
        eng.state_update_hook = lambda stage: epochs.append(eng.lock_epoch)
        try:
            status = eng.execute(strict_recovery=config.get("strict", False))
        except TaskEngineException as exc:
            emit({"event": "done", "error": type(exc).__name__, "message": str(exc)})
            return 0
        emit({"event": "done", "status": status.value, "epoch": epochs[-1] if epochs else None})
        return 0
    if command == "rival":
        stop = Path(config["stop"])
        emit({"event": "ready", "pid": outer_pid()})
        attempts = rival_loop(io, kind, stop.exists)
        emit({"event": "attempts", "attempts": attempts})
        sys.stdin.readline()
        return 0
    raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    from test_leases import worker_main as _main  # the classes of the importable module

    sys.exit(_main(sys.argv[1:]))
