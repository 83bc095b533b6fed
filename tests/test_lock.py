"""The task lock: `bind()` takes it, other binds wait or fail, stale locks are taken over.

Decision 8 of the core-engine issue, and `BindLock` on its own.
"""

from __future__ import annotations

import builtins
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from conftest import EMULATED, live_lock_objects, make_io, store_spec
from pipelines import Payload, expected_value, make_stages

from checkmate import (
    BindException,
    BindLock,
    CheckMateEngine,
    LockOwner,
    LockUnsupportedError,
    StageStatus,
    TaskEngineException,
    TaskIO,
)

TASK = "job"
TESTS_DIR = Path(__file__).resolve().parent
WAIT = 30.0
"""Upper bound for waits on threads and processes (never reached when things work)."""

LOCK_SCRIPT = """
import os, sys
sys.path.insert(0, sys.argv[1])
from pipelines import open_store
from checkmate import BindLock
lock = BindLock(open_store(sys.argv[2]), sys.argv[3])
lock.acquire()
print("locked", flush=True)
mode = sys.argv[4]
if mode == "exit":
    sys.exit(0)
if mode == "hold":
    sys.stdin.read()
    lock.release()
    print("released", flush=True)
"""

DYING_TAKEOVER_SCRIPT = """
import os, sys
sys.path.insert(0, sys.argv[1])
from pipelines import open_store
from checkmate import BindLock, TaskIO
inner = open_store(sys.argv[2])
die_after = int(sys.argv[4])
changes = 0

class DyingIO(TaskIO):
    # The real store; the process dies right after its die_after-th create/write/delete.
    def _changed(self):
        global changes
        changes += 1
        if changes == die_after:
            os._exit(9)
    def read(self, name): return inner.read(name)
    def write(self, name, data): inner.write(name, data); self._changed()
    def create(self, name, data):
        created = inner.create(name, data)
        self._changed()
        return created
    def delete(self, name): inner.delete(name); self._changed()
    def list(self, prefix=""): return inner.list(prefix)
    def url(self, name): return inner.url(name)
    def exists(self, name): return inner.exists(name)

BindLock(DyingIO(), sys.argv[3]).acquire()
print("locked", flush=True)
sys.exit(0)
"""


# ---------------------------------------------------------------------- helpers


class WrappedIO(TaskIO):
    """A real TaskIO seen through a thin wrapper.

    ``atomic`` sets ``supports_atomic_create``; ``create_refused`` is set the
    first time `create` reports that an object already exists.
    """

    def __init__(self, inner: TaskIO, atomic: bool = True) -> None:
        self.inner = inner
        self.supports_atomic_create = atomic
        self.create_refused = threading.Event()

    def read(self, obj_name: str) -> bytes:
        return self.inner.read(obj_name)

    def write(self, obj_name: str, data: bytes) -> None:
        self.inner.write(obj_name, data)

    def create(self, obj_name: str, data: bytes) -> bool:
        created = self.inner.create(obj_name, data)
        if not created:
            self.create_refused.set()
        return created

    def delete(self, obj_name: str) -> None:
        self.inner.delete(obj_name)

    def list(self, prefix: str = "") -> builtins.list[str]:
        return self.inner.list(prefix)

    def url(self, obj_name: str) -> str:
        return self.inner.url(obj_name)

    def exists(self, obj_name: str) -> bool:
        return self.inner.exists(obj_name)

    def read_many(self, obj_names: Iterable[str]) -> dict[str, bytes]:
        return self.inner.read_many(obj_names)


def snapshot(io: TaskIO) -> dict[str, bytes]:
    return {name: io.read(name) for name in io.list("")}


def engine_for(io: TaskIO, n: int = 3, **kwargs: Any) -> CheckMateEngine:
    return CheckMateEngine(io, task_id=TASK, stage_templates=make_stages(n), **kwargs)


def lock_objects(io: TaskIO, engine: CheckMateEngine) -> list[str]:
    """The objects that still hold the task's lock."""
    return live_lock_objects(io, engine.task_id + "/")


@contextmanager
def child(spec: str, name: str, mode: str) -> Iterator[subprocess.Popen[str]]:
    """Run a process that takes lock ``name`` in store ``spec``; yield once it holds it.

    Leaving the block closes the child's pipes and kills it if it still runs.
    """
    with subprocess.Popen(
        [sys.executable, "-c", LOCK_SCRIPT, str(TESTS_DIR), spec, name, mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.strip() == "locked", f"child did not take the lock: {line!r}"
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=WAIT)


def take_lock_and_exit(spec: str, name: str) -> None:
    """Run a process that takes lock ``name`` and exits without releasing it."""
    out = subprocess.run(
        [sys.executable, "-c", LOCK_SCRIPT, str(TESTS_DIR), spec, name, "exit"],
        check=True,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert out.stdout.strip() == "locked"


def dead_pid() -> int:
    """The pid of a process of this host that has exited (and been reaped)."""
    out = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    return int(out.stdout)


def make_stale_lock(backend: str, tmp_path: Path, io: TaskIO, name: str) -> None:
    """Leave lock ``name`` owned by a dead process of this host.

    Shareable stores get a real one (a child takes the lock and exits); the
    memory store, which no other process can see, gets the same record written
    for a process that has exited.
    """
    if backend in ("local", "file"):
        take_lock_and_exit(store_spec(backend, tmp_path), name)
    else:
        owner = LockOwner.for_this_process().model_copy(
            update={"pid": dead_pid(), "pid_start": None, "token": uuid.uuid4().hex}
        )
        io.write(name, owner.model_dump_json().encode())
    assert io.exists(name)


def foreign_owner(**changes: Any) -> bytes:
    """A lock record owned by a process of another host."""
    fields: dict[str, Any] = {
        "host": "elsewhere.invalid",
        "pid": 1,
        "token": uuid.uuid4().hex,
        "acquired_at": datetime.now(timezone.utc).isoformat(),
    }
    fields.update(changes)
    return LockOwner(**fields).model_dump_json().encode()


def race(count: int, target: Any) -> list[Any]:
    """Run ``target(i)`` in ``count`` threads started together; return their results."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count

    def run(index: int) -> None:
        try:
            barrier.wait(timeout=WAIT)
            results[index] = target(index)
        except BaseException as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert not any(t.is_alive() for t in threads), "a racing thread hangs"
    return results


# ---------------------------------------------------------------------- bind takes the lock


def test_bind_takes_the_lock_and_unbind_releases_it(io: TaskIO) -> None:
    engine = engine_for(io)
    observer = engine_for(io)
    assert not engine.has_lockfile
    engine.bind()
    try:
        assert engine.has_lockfile
        assert observer.has_lockfile, "an unbound engine must see the lock too"
        assert lock_objects(io, engine)
    finally:
        engine.unbind()
    assert not engine.has_lockfile
    assert not observer.has_lockfile
    assert lock_objects(io, engine) == []


def test_lock_records_this_process_as_owner(io: TaskIO) -> None:
    engine = engine_for(io)
    with engine:
        first = io.read(engine.lock_obj_name)
    with engine:
        second = io.read(engine.lock_obj_name)
    record = json.loads(first)
    assert isinstance(record, dict)
    values = {str(v) for v in record.values()}
    assert str(os.getpid()) in values
    assert socket.gethostname() in values
    assert first != second, "two acquisitions must be told apart (token, time)"


def test_unbound_engine_reads_state_without_the_lock(io: TaskIO) -> None:
    engine = engine_for(io)
    with engine:
        assert engine.execute() is StageStatus.COMPLETE
        reader = engine_for(io)
        lock_bytes = io.read(engine.lock_obj_name)
        assert reader.status is StageStatus.COMPLETE
        assert reader.task_result == Payload(value=expected_value(3))
        assert reader.cumulative_attempts == 3
        assert io.read(engine.lock_obj_name) == lock_bytes


def test_second_engine_cannot_bind_while_the_first_holds_the_lock(io: TaskIO) -> None:
    holder = engine_for(io)
    with holder:
        before = snapshot(io)
        rival = engine_for(io)
        start = time.monotonic()
        with pytest.raises(BindException) as info:
            rival.bind()
        assert time.monotonic() - start < 5.0, "bind_lock_timeout=None must not wait"
        assert holder.lock_obj_name in str(info.value)
        with pytest.raises(BindException):
            rival.execute()
        assert snapshot(io) == before, "a refused bind changed the store"
        assert holder.has_lockfile
        assert holder.execute() is StageStatus.COMPLETE
    assert not holder.has_lockfile
    with rival:
        assert rival.status is StageStatus.COMPLETE


def test_bind_with_a_timeout_waits_then_raises(io: TaskIO) -> None:
    with engine_for(io) as holder:
        before = snapshot(io)
        rival = engine_for(io, bind_lock_timeout=0.2)
        start = time.monotonic()
        with pytest.raises(BindException):
            rival.bind()
        elapsed = time.monotonic() - start
        assert elapsed >= 0.2, f"gave up after {elapsed:.3f}s, before the timeout"
        assert elapsed < 10.0
        assert snapshot(io) == before
        assert holder.has_lockfile


def test_bind_with_a_timeout_succeeds_once_the_holder_releases(io: TaskIO) -> None:
    watched = WrappedIO(io)  # a TaskIO with create only: a lock object, not a lease
    holder = engine_for(watched)
    holder.bind()
    waiter = engine_for(watched, bind_lock_timeout=WAIT)
    released = threading.Event()

    def release_when_the_waiter_waits() -> None:
        if watched.create_refused.wait(WAIT):
            holder.unbind()
            released.set()

    releaser = threading.Thread(target=release_when_the_waiter_waits)
    releaser.start()
    try:
        waiter.bind()
    finally:
        releaser.join(WAIT)
    assert released.is_set(), "the waiter never found the lock held"
    try:
        assert waiter.has_lockfile
        assert waiter.execute() is StageStatus.COMPLETE
        with pytest.raises(BindException):
            engine_for(io).bind()
    finally:
        waiter.unbind()
    assert not waiter.has_lockfile


# ---------------------------------------------------------------------- unreadable locks

GARBAGE_LOCKS = {
    "empty": b"",
    "not_json": b"locked by someone",
    "binary": b"\xff\xfe\x00\x80",
    "json_list": b"[]",
    "json_null": b"null",
    "json_empty_object": b"{}",
    "missing_fields": b'{"host": "x"}',
    "pid_zero": b'{"host": "x", "pid": 0, "token": "' + b"0" * 32 + b'", "acquired_at": "t"}',
    "truncated": foreign_owner()[:20],
}


@pytest.mark.parametrize("garbage", sorted(GARBAGE_LOCKS))
@pytest.mark.parametrize("timeout", [None, 0.05])
def test_unparsable_lock_counts_as_held(io: TaskIO, garbage: str, timeout: float | None) -> None:
    engine = engine_for(io, bind_lock_timeout=timeout)
    io.write(engine.lock_obj_name, GARBAGE_LOCKS[garbage])
    before = snapshot(io)
    with pytest.raises(BindException) as info:
        engine.bind()
    assert engine.lock_obj_name in str(info.value)
    assert snapshot(io) == before
    assert engine.has_lockfile
    with pytest.raises(BindException):
        engine.execute()
    assert snapshot(io) == before


def test_lock_name_that_cannot_be_read_as_an_object_counts_as_held(
    io: TaskIO, backend: str
) -> None:
    if backend in EMULATED or backend == "memory":
        pytest.skip("object stores have no folders: an object and a key below it coexist")
    engine = engine_for(io, bind_lock_timeout=0.05)
    io.write(f"{engine.lock_obj_name}/inside", b"the lock's name is taken by a folder")
    before = snapshot(io)
    with pytest.raises(BindException) as info:
        engine.bind()
    assert engine.lock_obj_name in str(info.value)
    assert snapshot(io) == before


def test_unparsable_lock_on_an_existing_task_changes_nothing(io: TaskIO) -> None:
    engine = engine_for(io)
    with engine:
        engine.stages[0].update_status("started", StageStatus.RUNNING, time.time())
    io.write(engine.lock_obj_name, b"\x00garbage")
    before = snapshot(io)
    with pytest.raises(BindException):
        engine.execute(strict_recovery=True)
    with pytest.raises(BindException):
        engine.cancel()
    assert snapshot(io) == before


def test_lock_of_another_host_is_never_taken_over(io: TaskIO) -> None:
    engine = engine_for(io, bind_lock_timeout=0.05)
    io.write(engine.lock_obj_name, foreign_owner())
    before = snapshot(io)
    with pytest.raises(BindException):
        engine.bind()
    assert snapshot(io) == before


def test_lock_naming_an_impossible_pid_is_held_or_taken_over_cleanly(io: TaskIO) -> None:
    engine = engine_for(io)
    record = LockOwner.for_this_process().model_copy(
        update={"pid": 2**40, "pid_start": None, "token": uuid.uuid4().hex}
    )
    io.write(engine.lock_obj_name, record.model_dump_json().encode())
    before = snapshot(io)
    try:
        engine.bind()
    except BindException:
        assert snapshot(io) == before
    else:
        assert engine.execute() is StageStatus.COMPLETE
        engine.unbind()
        assert lock_objects(io, engine) == []


# ---------------------------------------------------------------------- stale locks


def test_lock_of_a_process_that_exited_is_taken_over(
    io: TaskIO, backend: str, tmp_path: Path
) -> None:
    engine = engine_for(io)
    make_stale_lock(backend, tmp_path, io, engine.lock_obj_name)
    assert engine.has_lockfile
    engine.bind()
    try:
        assert engine.has_lockfile
        with pytest.raises(BindException):
            engine_for(io).bind()
        assert engine.execute() is StageStatus.COMPLETE
    finally:
        engine.unbind()
    assert not engine.has_lockfile
    assert lock_objects(io, engine) == []
    assert engine.task_result == Payload(value=expected_value(3))


def test_lock_of_a_killed_process_is_taken_over(shared_backend: str, tmp_path: Path) -> None:
    io = make_io(shared_backend, tmp_path)
    engine = engine_for(io)
    with child(store_spec(shared_backend, tmp_path), engine.lock_obj_name, "hold") as proc:
        with pytest.raises(BindException):
            engine.bind()
        proc.kill()
        proc.wait(timeout=WAIT)
    assert engine.has_lockfile
    assert engine.execute() is StageStatus.COMPLETE
    assert lock_objects(io, engine) == []


def test_lock_of_a_live_process_is_respected_until_released(
    shared_backend: str, tmp_path: Path
) -> None:
    io = make_io(shared_backend, tmp_path)
    engine = engine_for(io, bind_lock_timeout=0.1)
    with child(store_spec(shared_backend, tmp_path), engine.lock_obj_name, "hold") as proc:
        lock_bytes = io.read(engine.lock_obj_name)
        with pytest.raises(BindException):
            engine.bind()
        assert io.read(engine.lock_obj_name) == lock_bytes
        out, _ = proc.communicate("", timeout=WAIT)
        assert "released" in out
        assert proc.returncode == 0
    assert not engine.has_lockfile
    assert engine.execute() is StageStatus.COMPLETE


@pytest.mark.parametrize(
    "die_after",
    [
        1,
        2,
        3,
        4,
    ],
)
def test_a_takeover_interrupted_by_a_crash_can_be_taken_over_again(
    shared_backend: str, tmp_path: Path, die_after: int
) -> None:
    """A process that dies at any step of taking over a stale lock leaves it stale."""
    io = make_io(shared_backend, tmp_path)
    engine = engine_for(io, bind_lock_timeout=1.0)
    spec = store_spec(shared_backend, tmp_path)
    take_lock_and_exit(spec, engine.lock_obj_name)
    script_args = [engine.lock_obj_name, str(die_after)]
    subprocess.run(
        [sys.executable, "-c", DYING_TAKEOVER_SCRIPT, str(TESTS_DIR), spec, *script_args],
        check=False,
        capture_output=True,
        timeout=WAIT,
    )
    assert engine.has_lockfile
    engine.bind()
    try:
        assert engine.execute() is StageStatus.COMPLETE
    finally:
        engine.unbind()
    assert not engine.has_lockfile
    again = engine_for(io)
    again.bind()
    assert again.status is StageStatus.COMPLETE
    again.unbind(clean=True)
    assert live_lock_objects(io) == []


def test_racing_takeovers_of_a_stale_lock_have_one_winner(
    io: TaskIO, backend: str, tmp_path: Path
) -> None:
    name = "jobs/nightly.lock"
    make_stale_lock(backend, tmp_path, io, name)
    locks = [BindLock(io, name) for _ in range(8)]

    def take(index: int) -> str:
        try:
            locks[index].acquire()
        except BindException:
            return "lost"
        return "won"

    results = race(8, take)
    assert sorted(map(str, results)) == ["lost"] * 7 + ["won"], results
    locks[results.index("won")].release()
    assert live_lock_objects(io) == []


# ---------------------------------------------------------------------- racing binds


def test_racing_bindlocks_have_exactly_one_winner(io: TaskIO) -> None:
    name = "jobs/nightly.lock"
    for _ in range(5):
        locks = [BindLock(io, name) for _ in range(8)]

        def take(index: int, locks: list[BindLock] = locks) -> str:
            try:
                locks[index].acquire()
            except BindException:
                return "lost"
            return "won"

        results = race(8, take)
        assert sorted(map(str, results)) == ["lost"] * 7 + ["won"], results
        assert io.exists(name)
        locks[results.index("won")].release()
        assert live_lock_objects(io) == []


def test_one_bindlock_shared_by_racing_threads_is_acquired_once(io: TaskIO) -> None:
    lock = BindLock(io, "jobs/nightly.lock")

    def take(_: int) -> str:
        try:
            lock.acquire()
        except BindException:
            return "lost"
        return "won"

    results = race(8, take)
    assert sorted(map(str, results)) == ["lost"] * 7 + ["won"], results
    lock.release()
    assert live_lock_objects(io) == []


def test_racing_engines_bind_one_at_a_time(io: TaskIO) -> None:
    engines = [engine_for(io) for _ in range(8)]

    def bind(index: int) -> str:
        try:
            engines[index].bind()
        except BindException:
            return "lost"
        return "won"

    results = race(8, bind)
    assert sorted(map(str, results)) == ["lost"] * 7 + ["won"], results
    winner = engines[results.index("won")]
    assert winner.execute() is StageStatus.COMPLETE
    winner.unbind()
    assert not winner.has_lockfile
    assert engine_for(io).status is StageStatus.COMPLETE


# ---------------------------------------------------------------------- BindLock on its own


def test_bindlock_as_a_context_manager(io: TaskIO) -> None:
    name = "jobs/nightly.lock"
    with BindLock(io, name) as lock:
        assert isinstance(lock, BindLock)
        assert io.exists(name)
        with pytest.raises(BindException) as info:
            BindLock(io, name).acquire()
        assert name in str(info.value)
        BindLock(io, name).release()  # not the owner: must not free the lock
        assert io.exists(name)
    assert live_lock_objects(io) == []
    with BindLock(io, name):
        assert io.exists(name)
    assert live_lock_objects(io) == []


def test_bindlock_is_released_when_the_block_raises(io: TaskIO) -> None:
    name = "jobs/nightly.lock"
    with pytest.raises(KeyError), BindLock(io, name):
        raise KeyError("boom")
    assert live_lock_objects(io) == []
    BindLock(io, name).acquire()
    assert io.exists(name)


def test_bindlock_timeout_waits_then_raises(io: TaskIO) -> None:
    name = "jobs/nightly.lock"
    with BindLock(io, name):
        start = time.monotonic()
        with pytest.raises(BindException):
            BindLock(io, name, acquire_timeout=0.2).acquire()
        assert time.monotonic() - start >= 0.2


def test_bindlocks_on_different_names_are_independent(io: TaskIO) -> None:
    with BindLock(io, "a/task.lock"), BindLock(io, "b/task.lock"):
        assert io.exists("a/task.lock")
        assert io.exists("b/task.lock")
    assert live_lock_objects(io) == []


def test_bindlock_release_leaves_a_lock_it_no_longer_owns(io: TaskIO) -> None:
    name = "jobs/nightly.lock"
    lock = BindLock(io, name)
    lock.acquire()
    theirs = foreign_owner()
    io.write(name, theirs)
    lock.release()
    assert io.read(name) == theirs


# ------------------------------------------------------------ no_lock and stores without locks


def test_no_lock_takes_no_lock(io: TaskIO) -> None:
    engine = engine_for(io, no_lock=True)
    with engine:
        assert not engine.has_lockfile
        assert lock_objects(io, engine) == []
        assert engine.execute() is StageStatus.COMPLETE
    assert not engine.has_lockfile
    assert engine.task_result == Payload(value=expected_value(3))


def test_store_without_atomic_create_refuses_to_lock(io: TaskIO) -> None:
    store = WrappedIO(io, atomic=False)
    engine = engine_for(store)
    with pytest.raises(LockUnsupportedError) as info:
        engine.bind()
    assert isinstance(info.value, TaskEngineException)
    with pytest.raises(LockUnsupportedError):
        engine.execute()
    with pytest.raises(LockUnsupportedError):
        BindLock(store, "jobs/nightly.lock").acquire()
    assert live_lock_objects(io) == []


def test_store_without_atomic_create_keeps_existing_state_untouched(io: TaskIO) -> None:
    assert engine_for(io).execute() is StageStatus.COMPLETE
    before = snapshot(io)
    with pytest.raises(LockUnsupportedError):
        engine_for(WrappedIO(io, atomic=False)).bind()
    assert snapshot(io) == before


def test_no_lock_works_on_a_store_without_atomic_create(io: TaskIO) -> None:
    store = WrappedIO(io, atomic=False)
    engine = engine_for(store, no_lock=True)
    assert engine.execute() is StageStatus.COMPLETE
    assert engine.task_result == Payload(value=expected_value(3))
    assert not engine.has_lockfile
    assert engine_for(store, no_lock=True).status is StageStatus.COMPLETE
    with engine_for(store, no_lock=True) as again:
        assert again.check_sync()
        assert [s.state.value for s in again.stages] == [1, 3, 6]
