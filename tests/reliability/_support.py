"""Shared helpers of the reliability suite: child processes, invariants, figures.

Everything here works on real stores and real processes. Child processes are
forked (``fork`` start method): each is a new process with its own pid, so a
lock left by a killed child is stale for the next one, exactly as after a
SIGKILL, but it starts in milliseconds instead of re-importing everything.

Scale: ``CHECKMATE_RELIABILITY_FULL=1`` selects the full variants (more seeds,
more fuzz cases); the default is the CI size.

Figures: when ``CHECKMATE_RELIABILITY_FIGURES`` names a file, every scenario
appends one JSON line with what it exercised (crash points, faults injected,
fuzz cases, processes, objects lost or corrupted). ``scripts/reliability_report.py``
sums them into ``docs/reliability.md``.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

TESTS_DIR = Path(__file__).resolve().parent.parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from pipelines import AddStage, append_line, make_stages, open_store, read_log  # noqa: E402

from checkmate import (  # noqa: E402
    CheckMateEngine,
    FsspecTaskIO,
    LocalTaskIO,
    LockOwner,
    RetryPolicy,
    TaskIO,
)
from checkmate.locking import LeaseRecord  # noqa: E402
from checkmate.naming import lock_obj_name, stage_obj_name  # noqa: E402
from checkmate.storage._journal import flush_all  # noqa: E402
from checkmate.testing import MUTATIONS, CrashingTaskIO, WrappingTaskIO  # noqa: E402

FULL = os.environ.get("CHECKMATE_RELIABILITY_FULL") == "1"
MODE = "full" if FULL else "ci"
FIGURES_ENV = "CHECKMATE_RELIABILITY_FIGURES"
TEMP_MARKER = ".cmtmp-"
MARKER_INFIX = ".takeover-"  # a plain lock's takeover marker: <lock>.takeover-<token>-<n>
SELFTEST_INFIX = ".selftest-"  # the lease self-test's scratch object: <lock>.selftest-<hex>

# The stage state machine as the core contract states it (kept independent of
# checkmate.transitions on purpose: the suite checks the engine, not itself).
ALLOWED = {
    "UNBOUND": {"CREATED"},
    "CREATED": {"RUNNING", "ERROR", "CANCELED"},
    "RUNNING": {"COMPLETE", "RETRY", "ERROR", "CANCELED"},
    "RETRY": {"RUNNING", "ERROR", "CANCELED"},
    "COMPLETE": set(),
    "ERROR": set(),
    "CANCELED": set(),
}


def scaled(ci: int, full: int) -> int:
    """The CI or the full size of a scenario."""
    return full if FULL else ci


def record(scenario: str, **figures: int) -> None:
    """Append one line of figures for the report (no-op unless the report asked for them)."""
    path = os.environ.get(FIGURES_ENV)
    if path:
        append_line(path, json.dumps({"scenario": scenario, "mode": MODE, **figures}))


def quiet_engine_logs() -> None:
    """In children: the engine's retry warnings are expected by the thousand; drop them."""
    logging.getLogger("checkmate").setLevel(logging.CRITICAL)


# ---------------------------------------------------------------- child processes

if "fork" not in multiprocessing.get_all_start_methods():  # pragma: no cover - Windows
    pytest.skip("the reliability suite forks child processes (POSIX)", allow_module_level=True)
_CTX = multiprocessing.get_context("fork")


def _fork_safe() -> None:
    """Fork with none of checkmate's threads alive: one holding a lock at fork time (a
    lease heartbeat, a journal checkpoint) would leave that lock held forever in the child.

    Every fork here happens while no engine is bound; background work the engine
    started at unbind (the journal's checkpoint thread) is waited for. Threads of
    other libraries that outlive a test are left alone: fsspec's event-loop thread
    (started by any earlier test on an async store) runs forever, and fsspec
    resets its loop and lock in a forked child itself.
    """
    ours = [t for t in threading.enumerate() if t.name.startswith("checkmate")]
    for thread in ours:
        thread.join(timeout=60)
    alive = [t.name for t in ours if t.is_alive()]
    assert not alive, f"checkmate threads alive at fork time: {alive}"


def _child_main(conn: Any, func: Callable[..., Any], args: tuple[Any, ...]) -> None:
    quiet_engine_logs()
    try:
        value = func(*args)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        conn.close()
        os._exit(1)
    flush_all()  # what interpreter exit does (an atexit hook), which os._exit skips
    conn.send(("ok", value))
    conn.close()
    os._exit(0)


@dataclass
class ChildResult:
    """How a child process ended: its exit code and what its function returned or raised."""

    exitcode: int | None
    kind: str  # "ok", "error" (an exception, ``value`` is the traceback) or "died" (no reply)
    value: Any = None


def run_in_child(func: Callable[..., Any], *args: Any, timeout: float = 120.0) -> ChildResult:
    """Run ``func(*args)`` in a new forked process and wait for it."""
    _fork_safe()
    recv, send = _CTX.Pipe(duplex=False)
    proc = _CTX.Process(target=_child_main, args=(send, func, args))
    proc.start()
    send.close()
    kind, value = "died", None
    try:
        if recv.poll(timeout):
            try:
                kind, value = recv.recv()
            except EOFError:
                pass
        proc.join(timeout)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
            raise AssertionError(f"child {func.__name__}{args!r} did not finish in {timeout}s")
        recv.close()
    return ChildResult(proc.exitcode, kind, value)


def start_child(target: Callable[..., Any], *args: Any) -> Any:
    """Start a forked process running ``target(*args)`` and return it (no reply channel)."""

    def main() -> None:
        quiet_engine_logs()
        try:
            target(*args)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)

    _fork_safe()
    proc = _CTX.Process(target=main)
    proc.start()
    return proc


def new_barrier(parties: int) -> Any:
    """A barrier shared with forked children (so they start racing together)."""
    return _CTX.Barrier(parties)


def warm_up() -> None:
    """Run a small pipeline in this process so forked children inherit a warm interpreter.

    The first run of an engine builds Pydantic validators and loads time zones
    (about 0.15 s); children forked after this start ready.
    """
    with tempfile.TemporaryDirectory() as tmp:
        for io in (LocalTaskIO(tmp), FsspecTaskIO(Path(tmp, "fs").as_uri())):
            CheckMateEngine(
                io,
                task_id="warm-up",
                stage_templates=make_stages(2, per_stage={"s1": {"fail_times": 1}}),
                retry_policy=RetryPolicy.STAGE,
                max_attempts=2,
            ).execute()


# ---------------------------------------------------------------- stores


class CreateOnlyTaskIO(WrappingTaskIO):
    """A real store presented without compare-and-swap, like object stores that only have
    create-if-absent: the engine then locks with plain lock objects instead of leases."""

    def __init__(self, inner: TaskIO) -> None:
        super().__init__(inner)
        self.supports_conditional_write = False


@dataclass(frozen=True)
class Store:
    """A store that several processes can share: its kind and its directory.

    Kinds: ``local`` (LocalTaskIO), ``file`` (FsspecTaskIO on file://),
    ``local-createlock`` (LocalTaskIO without compare-and-swap: lock objects, no leases).
    """

    kind: str
    root: Path

    @property
    def spec(self) -> str:
        """The spec ``pipelines.open_store`` understands (the createlock kind has none)."""
        if self.kind == "file":
            return self.root.as_uri()
        return f"local:{self.root}"

    def open(self) -> TaskIO:
        """A new TaskIO on this store."""
        io = open_store(self.spec)
        return CreateOnlyTaskIO(io) if self.kind == "local-createlock" else io


def temp_files(root: Path) -> list[str]:
    """Every file below ``root`` whose name carries the temp-file marker, once this
    process's background checkpoints (which write temp files of their own) are done."""
    flush_all()
    found = []
    for dirpath, _dirs, files in os.walk(root):
        found.extend(str(Path(dirpath) / f) for f in files if TEMP_MARKER in f)
    return sorted(found)


# ---------------------------------------------------------------- stages used by the suite


class ProbeStage(AddStage):
    """An AddStage that first checks, through the *inner* store, that its RUNNING is persisted.

    It appends ``"<stage> <attempt> ok"`` (or ``BAD <reason>``) to ``probe_log``.
    """

    probe_log: str = ""

    def execute_stage(self, previous_state_copy: Any) -> None:
        io = self.engine.io
        inner = getattr(io, "inner", io)
        reason = ""
        try:
            doc = json.loads(inner.read(self.obj_name))
            state = doc["state"]
            mine = self.state.history[-1].model_dump(mode="json")
            if state["status"] != "RUNNING":
                reason = f"persisted status is {state['status']}"
            elif state["attempts"] != self.state.attempts:
                reason = f"persisted attempts {state['attempts']} != {self.state.attempts}"
            elif state["history"][-1] != mine:
                reason = "persisted history does not end with this run's RUNNING entry"
        except Exception as exc:
            reason = f"cannot read own object: {exc!r}"
        verdict = "ok" if not reason else f"BAD {reason}"
        if self.probe_log:
            append_line(self.probe_log, f"{self.stage_name} {self.state.attempts} {verdict}")
        super().execute_stage(previous_state_copy)


class InterruptStage(AddStage):
    """An AddStage that raises KeyboardInterrupt or SystemExit on one attempt."""

    interrupt_on_attempt: int = 0
    interrupt_with: str = "KeyboardInterrupt"

    def execute_stage(self, previous_state_copy: Any) -> None:
        if self.state.attempts == self.interrupt_on_attempt:
            if self.log_path:
                append_line(self.log_path, f"{self.stage_name} {self.state.attempts} interrupted")
            if self.interrupt_with == "SystemExit":
                raise SystemExit(3)
            raise KeyboardInterrupt
        super().execute_stage(previous_state_copy)


class CrashAroundTaskIO(CrashingTaskIO):
    """`CrashingTaskIO` that also crashes "after" a k-th mutation that raised.

    The shipped double only crashes after a call that returned; a call that
    reached the store and was refused (a compare-and-swap on a stale version,
    as the lease self-test does on purpose) would let the process live on.
    """

    def _call(self, op: str, func: Callable[..., Any], *args: Any) -> Any:
        if op not in MUTATIONS:
            return func(*args)
        self.mutations += 1
        hit = self.mutations == self.crash_at
        if hit and self.when == "before":
            os._exit(self.exit_code)
        try:
            return func(*args)
        finally:
            if hit:
                os._exit(self.exit_code)


# ---------------------------------------------------------------- scripted faults


class ScriptedFaults(WrappingTaskIO):
    """Fail exactly the storage calls a rule picks: ``rule(op, args)`` returns
    None (let the call through), ``"before"`` (fail without effect) or
    ``"after"`` (let the call take effect, then fail as if the reply was lost).

    The deterministic counterpart of `FaultyTaskIO`, over a real store.
    """

    def __init__(self, inner: TaskIO, rule: Callable[[str, tuple[Any, ...]], str | None]) -> None:
        super().__init__(inner)
        self.rule = rule
        self.enabled = True
        self.faults = 0

    def _call(self, op: str, func: Callable[..., Any], *args: Any) -> Any:
        when = self.rule(op, args) if self.enabled else None
        if when == "before":
            self.faults += 1
            raise OSError(f"scripted fault before {op} {args[0]!r}")
        result = func(*args)
        if when == "after":
            self.faults += 1
            raise OSError(f"scripted fault after {op} {args[0]!r} took effect")
        return result


class ScriptedCrash(WrappingTaskIO):
    """Kill the process (``os._exit``) before or after the storage call a rule picks:
    ``rule(op, args)`` returns None, ``"before"`` or ``"after"``."""

    def __init__(
        self, inner: TaskIO, rule: Callable[[str, tuple[Any, ...]], str | None], exit_code: int
    ) -> None:
        super().__init__(inner)
        self.rule = rule
        self.exit_code = exit_code

    def _call(self, op: str, func: Callable[..., Any], *args: Any) -> Any:
        when = self.rule(op, args)
        if when == "before":
            os._exit(self.exit_code)
        try:
            return func(*args)
        finally:
            if when == "after":
                os._exit(self.exit_code)


# ---------------------------------------------------------------- invariants


def history_problems(state: dict[str, Any]) -> list[str]:
    """What is wrong with a persisted stage history (independent of the engine's checker)."""
    problems = []
    history = state.get("history", [])
    if not history:
        return ["empty history"]
    first = history[0]
    if (first["begin_status"], first["end_status"]) != ("UNBOUND", "CREATED"):
        problems.append(f"history starts with {first['begin_status']} -> {first['end_status']}")
    previous_end, previous_attempt = None, 0
    for index, entry in enumerate(history):
        begin, end, attempt = entry["begin_status"], entry["end_status"], entry["attempt"]
        if previous_end is not None and begin != previous_end:
            problems.append(f"entry {index} begins at {begin}, previous ended at {previous_end}")
        if end not in ALLOWED.get(begin, set()):
            problems.append(f"entry {index}: impossible change {begin} -> {end}")
        if attempt < previous_attempt:
            problems.append(f"entry {index}: attempt goes back {previous_attempt} -> {attempt}")
        previous_end, previous_attempt = end, attempt
    if previous_end != state["status"]:
        problems.append(f"history ends at {previous_end} but status is {state['status']}")
    return problems


def unrecorded_runs(log_lines: Iterable[str], states: dict[str, dict[str, Any]]) -> list[str]:
    """Runs in the stages' log (``"<stage> <attempt>"``) that the final histories do not show.

    Every run must end in its history (RUNNING -> COMPLETE/RETRY/ERROR for its
    attempt, written by the run or by the recovery of a crashed run), and a
    COMPLETE stage's last run must be the one that completed it.
    """
    problems = []
    runs: dict[str, list[int]] = {}
    for line in log_lines:
        stage, attempt = line.split()[:2]
        runs.setdefault(stage, []).append(int(attempt))
    for stage, attempts in runs.items():
        history = states.get(stage, {}).get("history", [])
        ended = {e["attempt"] for e in history if e["begin_status"] == "RUNNING"}
        missing = sorted(set(attempts) - ended)
        if missing:
            problems.append(f"{stage}: runs {missing} are not in its history")
        completes = [e["attempt"] for e in history if e["end_status"] == "COMPLETE"]
        if states.get(stage, {}).get("status") == "COMPLETE" and completes != [max(attempts)]:
            problems.append(f"{stage}: completed by attempt {completes}, last run {max(attempts)}")
    return problems


def parse_lock(data: bytes) -> Any:
    """A lock object's record: a lease (`LeaseRecord`) or a plain `LockOwner`; None if neither."""
    for model in (LeaseRecord, LockOwner):
        try:
            return model.model_validate_json(data)
        except Exception:
            continue
    return None


@dataclass
class Inspection:
    """What a store holds for one task, read as plain JSON and through the state model."""

    objects: dict[str, bytes]
    states: dict[str, dict[str, Any]]  # stage name -> persisted state (JSON)
    lock_objects: list[str]
    problems: list[str]  # everything wrong: unreadable or inconsistent objects, temp files
    corrupt: set[str] = field(default_factory=set)  # objects that do not parse or are inconsistent
    lock_held: bool = False  # a lock object that is not a released lease
    scratch: list[str] = field(default_factory=list)  # the lease self-test's scratch objects

    @property
    def lock_leftovers(self) -> list[str]:
        """Lock state that a finished, unlocked task must not have: a held lock, or
        any other lock object (takeover markers)."""
        lock = [o for o in self.lock_objects if "." not in o.rpartition("/")[2]]
        others = [o for o in self.lock_objects if o not in lock]
        return (lock if self.lock_held else []) + others


def inspect_task(
    io: TaskIO,
    task_id: str,
    stage_names: Iterable[str],
    state_model: Any,
    root: Path | None = None,
) -> Inspection:
    """Read every object of a task and check that each parses and is consistent."""
    names = list(stage_names)
    by_object = {stage_obj_name(task_id, n): n for n in names}
    lock = lock_obj_name(task_id)
    problems: list[str] = []
    objects: dict[str, bytes] = {}
    states: dict[str, dict[str, Any]] = {}
    locks: list[str] = []
    corrupt: set[str] = set()
    scratch: list[str] = []
    held = False
    for obj in io.list(f"{task_id}/"):
        data = io.read(obj)
        objects[obj] = data
        if obj.startswith(f"{lock}{SELFTEST_INFIX}"):
            scratch.append(obj)  # not state: written and deleted by the lease self-test
            continue
        if obj.startswith(lock):
            locks.append(obj)
            record = parse_lock(data)
            if record is None:
                problems.append(f"{obj}: lock object does not parse")
                corrupt.add(obj)
            elif obj == lock:
                held = getattr(record, "state", "held") != "released"
            elif not obj.startswith(f"{lock}{MARKER_INFIX}"):
                problems.append(f"{obj}: unknown lock object")
            continue
        stage = by_object.get(obj)
        if stage is None:
            problems.append(f"{obj}: unexpected object")
            continue
        try:
            doc = json.loads(data)
            state_model.model_validate(doc["state"])
            meta = doc["checkmate"]
            assert meta["format"] == 1, meta
            assert doc["stage_name"] == stage, doc["stage_name"]
        except Exception as exc:
            problems.append(f"{obj}: does not parse: {exc!r}")
            corrupt.add(obj)
            continue
        states[stage] = doc["state"]
        inconsistent = history_problems(doc["state"])
        problems.extend(f"{obj}: {p}" for p in inconsistent)
        if inconsistent:
            corrupt.add(obj)
    if root is not None:
        problems.extend(f"temp file left: {t}" for t in temp_files(root))
    return Inspection(objects, states, locks, problems, corrupt, held, scratch)


@dataclass
class RunTracker:
    """Follows a task across runs: no COMPLETE stage runs again, histories only grow.

    Call `observe` after every process that touched the task. ``log_path`` is
    the file where each stage run appends ``"<stage> <attempt>"``.
    """

    log_path: str
    completed_at: dict[str, int] = field(default_factory=dict)
    histories: dict[str, list[Any]] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)
    reruns: list[str] = field(default_factory=list)
    rewritten: list[str] = field(default_factory=list)

    def observe(self, inspection: Inspection) -> None:
        """Record what a run left behind and check it against what earlier runs left."""
        log = read_log(self.log_path)
        for stage, state in inspection.states.items():
            before = self.histories.get(stage, [])
            if state["history"][: len(before)] != before:
                self.rewritten.append(f"{stage}: persisted history was rewritten")
            self.histories[stage] = state["history"]
            if state["status"] == "COMPLETE" and stage not in self.completed_at:
                self.completed_at[stage] = len(log)
        for stage, position in self.completed_at.items():
            status = inspection.states.get(stage, {}).get("status")
            if status != "COMPLETE":
                self.lost.append(f"{stage}: was COMPLETE, now {status}")
            again = [line for line in log[position:] if line.split()[0] == stage]
            if again:
                self.reruns.append(f"{stage}: ran again after COMPLETE: {again}")
        duplicates = {line for line in log if log.count(line) > 1}
        if duplicates:
            self.reruns.append(f"the same attempt ran twice: {sorted(duplicates)}")

    @property
    def problems(self) -> list[str]:
        """Every violation seen so far."""
        return [*self.lost, *self.reruns, *self.rewritten]


# ---------------------------------------------------------------- power cuts, replayed from strace

_PROC_FD = re.compile(r"/proc/self/fd/(\d+)")
STRACE_CALLS = (
    "openat,open,creat,write,pwrite64,writev,pwritev,pwritev2,lseek,ftruncate,fsync,fdatasync,syncfs,rename,"
    "renameat,renameat2,link,linkat,unlink,unlinkat,mkdir,mkdirat,rmdir,close,dup,dup2,dup3"
)
"""The system calls `PowerCutModel` needs (``strace -f -qq -xx -y -s 8388608 -e trace=...``)."""

# The result may name the fd's file: <path>, and "(deleted)" for an O_TMPFILE one.
_CALL = re.compile(r"^(\d+)\s+(\w+)\((.*)\)\s+=\s+(-?\d+)(?:<[^>]*>(?:\(deleted\))?)?(?:\s.*)?$")
_HEX = re.compile(r'"((?:\\x[0-9a-f]{2})*)"(\.\.\.)?')


def _hex(text: str) -> bytes:
    return bytes.fromhex(text.replace("\\x", ""))


def _split_args(args: str) -> list[str]:
    # With -xx every string and every fd path is hex-escaped: no comma, quote or bracket
    # can hide inside one, so a plain split is exact (writev's iovec spans several).
    return [a.strip() for a in args.split(", ")] if args else []


@dataclass
class _Inode:
    is_dir: bool
    data: bytearray = field(default_factory=bytearray)
    durable: bytes | None = None  # the content a power cut now would leave (files)


class PowerCutModel:
    """Replays a process's file system calls and says what a power cut would leave.

    The model is the conservative one POSIX allows: after a power cut, a file
    holds what was last fsynced *on it* (nothing if never), and a directory
    holds the entries it had when it was last fsynced (only those). Anything
    else may be lost. ``crash_states()`` yields, after every fsync and every
    time the process wrote to its stdout (what it claims is done), the tree
    that would survive.

    Only paths below ``top`` (a directory that exists, durably, before the
    trace) are modelled.
    """

    def __init__(self, top: Path) -> None:
        self.top = str(top)
        self.inodes: dict[int, _Inode] = {0: _Inode(is_dir=True)}
        self.paths: dict[str, int] = {self.top: 0}  # directory path -> inode
        self.entries: dict[str, dict[str, int]] = {self.top: {}}
        self.durable: dict[str, dict[str, int]] = {self.top: {}}
        self.fds: dict[int, list[Any]] = {}  # fd -> [inode, position, append]
        self.cwd = self.top

    def preexisting_dir(self, path: Path) -> None:
        """Declare a directory below ``top`` that existed, durably, before the trace."""
        parent, name = os.path.split(str(path))
        ino = self._new(is_dir=True)
        self.entries[parent][name] = ino
        self.durable[parent][name] = ino
        self.paths[str(path)] = ino
        self.entries[str(path)] = {}
        self.durable[str(path)] = {}

    def _new(self, is_dir: bool) -> int:
        ino = len(self.inodes)
        self.inodes[ino] = _Inode(is_dir=is_dir)
        return ino

    def _path(self, dirfd: str | None, raw: str) -> str:
        path = _hex(raw.strip('"')).decode("utf-8", "surrogateescape")
        if os.path.isabs(path):
            return os.path.normpath(path)
        base = self.cwd
        if dirfd is not None and not dirfd.startswith("AT_FDCWD"):
            base = _hex(dirfd.partition("<")[2].rstrip(">")).decode("utf-8", "surrogateescape")
        return os.path.normpath(os.path.join(base, path))

    def _tracked(self, path: str) -> bool:
        return os.path.dirname(path) in self.entries

    @staticmethod
    def _fd(arg: str) -> int:
        return int(arg.partition("<")[0])

    def crash_states(self, lines: Iterable[str]) -> Iterator[tuple[str, dict[str, Any]]]:
        """Replay the trace; yield (label, tree) at every point a power cut is modelled.

        A tree maps names to bytes (files) or to trees (directories), from ``top``.
        """
        pending: dict[str, str] = {}
        for raw in lines:
            line = raw.rstrip("\n")
            pid = line.split(" ", 1)[0]
            if line.endswith("<unfinished ...>"):
                pending[pid] = line[: -len("<unfinished ...>")]
                continue
            if "resumed>" in line and pid in pending:
                line = pending.pop(pid) + line.split("resumed>", 1)[1]
            match = _CALL.match(line)
            if match is None or int(match.group(4)) < 0:
                continue
            call, args, ret = match.group(2), _split_args(match.group(3)), int(match.group(4))
            label = self._apply(call, args, ret)
            if label is not None:
                yield label, self.tree()

    def _apply(self, call: str, args: list[str], ret: int) -> str | None:
        if call in ("open", "openat", "creat"):
            dirfd = args[0] if call == "openat" else None
            path_arg, flags = (args[1], args[2]) if call == "openat" else (args[0], args[1:2])
            path = self._path(dirfd, path_arg)
            flags = flags if isinstance(flags, str) else "O_CREAT|O_TRUNC"
            if "O_TMPFILE" in flags:  # a new file with no name, in directory ``path``
                if path in self.paths:
                    self.fds[ret] = [self._new(is_dir=False), 0, False]
                return None
            if path in self.paths:
                self.fds[ret] = [self.paths[path], 0, False]
            elif self._tracked(path):
                parent, name = os.path.split(path)
                ino = self.entries[parent].get(name)
                if ino is None:
                    if "O_CREAT" not in flags:
                        return None
                    ino = self.entries[parent][name] = self._new(is_dir=False)
                if "O_TRUNC" in flags:
                    del self.inodes[ino].data[:]
                self.fds[ret] = [ino, 0, "O_APPEND" in flags]
            return None
        if call in ("write", "pwrite64", "writev", "pwritev", "pwritev2"):
            fd = self._fd(args[0])
            if fd == 1 and call == "write":
                data = _HEX.match(args[1])
                return "stdout " + _hex(data.group(1)).decode(errors="replace") if data else None
            if fd not in self.fds:
                return None
            # writev(fd, [{iov_base=...}, ...], count), pwritev(..., count, offset),
            # pwritev2(..., count, offset, flags)
            tail = {"writev": 1, "pwritev": 2, "pwritev2": 3}.get(call)
            if tail is not None:
                iovec = ", ".join(args[1:-tail])
                chunks = list(_HEX.finditer(iovec))
                count = int(args[-tail])
                assert len(chunks) == count, "strace abbreviated the iovec array"
                assert not any(m.group(2) for m in chunks), "strace cut a write short"
                data = b"".join(_hex(m.group(1)) for m in chunks)[:ret]
            else:
                data_match = _HEX.match(args[1])
                assert data_match is not None, args
                assert not data_match.group(2), "strace cut a write short: raise its -s"
                data = _hex(data_match.group(1))[:ret]
            ino, pos, append = self.fds[fd]
            buf = self.inodes[ino].data
            if call in ("pwrite64", "pwritev", "pwritev2"):
                at = int(args[-2] if call == "pwritev2" else args[-1])
            else:
                at = len(buf) if append else pos
            if len(buf) < at:
                buf.extend(b"\0" * (at - len(buf)))
            buf[at : at + len(data)] = data
            if call == "write":
                self.fds[fd][1] = at + len(data)
            return None
        if call == "lseek" and self._fd(args[0]) in self.fds:
            self.fds[self._fd(args[0])][1] = ret
        elif call == "ftruncate" and self._fd(args[0]) in self.fds:
            buf = self.inodes[self.fds[self._fd(args[0])][0]].data
            size = int(args[1])
            del buf[size:]
            buf.extend(b"\0" * (size - len(buf)))
        elif call in ("fsync", "fdatasync") and self._fd(args[0]) in self.fds:
            ino = self.fds[self._fd(args[0])][0]
            node = self.inodes[ino]
            if node.is_dir:
                path = next(p for p, i in self.paths.items() if i == ino)
                self.durable[path] = dict(self.entries[path])
            else:
                node.durable = bytes(node.data)
            return f"{call} #{ino}"
        elif call == "syncfs" and ret == 0:
            # Everything on the file system is on disk: every file's data, every entry.
            for node in self.inodes.values():
                if not node.is_dir:
                    node.durable = bytes(node.data)
            for path, entries in self.entries.items():
                self.durable[path] = dict(entries)
            return "syncfs"
        elif call == "close":
            self.fds.pop(self._fd(args[0]), None)
        elif call in ("dup", "dup2", "dup3") and self._fd(args[0]) in self.fds:
            self.fds[ret] = list(self.fds[self._fd(args[0])])
        elif call in ("rename", "renameat", "renameat2", "link", "linkat"):
            two = call in ("rename", "link")
            old = self._path(None if two else args[0], args[0] if two else args[1])
            new = self._path(None if two else args[2], args[1] if two else args[3])
            unnamed = _PROC_FD.fullmatch(old)  # linkat of an O_TMPFILE file through /proc
            if unnamed is not None and self._tracked(new) and int(unnamed[1]) in self.fds:
                np_, nn = os.path.split(new)
                self.entries[np_][nn] = self.fds[int(unnamed[1])][0]
            elif self._tracked(old) and self._tracked(new):
                op, on = os.path.split(old)
                np_, nn = os.path.split(new)
                ino = self.entries[op][on]
                if call.startswith("rename"):
                    del self.entries[op][on]
                self.entries[np_][nn] = ino
        elif call in ("unlink", "unlinkat", "rmdir"):
            path = self._path(
                args[0] if call == "unlinkat" else None, args[1 if call == "unlinkat" else 0]
            )
            if self._tracked(path):
                parent, name = os.path.split(path)
                self.entries[parent].pop(name, None)
        elif call in ("mkdir", "mkdirat"):
            path = self._path(
                args[0] if call == "mkdirat" else None, args[1 if call == "mkdirat" else 0]
            )
            if self._tracked(path):
                parent, name = os.path.split(path)
                ino = self.entries[parent][name] = self._new(is_dir=True)
                self.paths[path] = ino
                self.entries[path] = {}
                self.durable.setdefault(path, {})
        return None

    def tree(self, path: str | None = None) -> dict[str, Any]:
        """What a power cut now would leave below ``path`` (default: ``top``)."""
        path = self.top if path is None else path
        out: dict[str, Any] = {}
        for name, ino in self.durable.get(path, {}).items():
            node = self.inodes[ino]
            child = os.path.join(path, name)
            out[name] = self.tree(child) if node.is_dir else (node.durable or b"")
        return out


def materialize(tree: dict[str, Any], dest: Path) -> None:
    """Write a `PowerCutModel` tree to disk."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, value in tree.items():
        if isinstance(value, dict):
            materialize(value, dest / name)
        else:
            (dest / name).write_bytes(value)
