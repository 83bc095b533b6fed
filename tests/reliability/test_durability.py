"""Durability on local disk (issue 4, item 3).

- Power cuts, whatever the store's write scheme (rename, hard link, journal):
  a real run is traced with ``strace``, its file system calls are replayed in
  `PowerCutModel`, and at every fsync and every time the process claims
  progress (a stage starts, ``execute()`` returned COMPLETE) the files a power
  cut would leave (only what was fsynced: file data fsynced on the file,
  directory entries fsynced on the directory) are rebuilt. A new engine must
  read them, find at least what was claimed, and resume the task.
- A temp file left by a writer killed mid-write (SIGKILL while a child writes a
  large object through the real store) is ignored by ``list()``, does not stop
  the task, and is removed at the next bind; temp files of live writers (and of
  writers on other hosts) are never removed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from _support import (
    STRACE_CALLS,
    TEMP_MARKER,
    PowerCutModel,
    Store,
    inspect_task,
    materialize,
    new_barrier,
    record,
    start_child,
    temp_files,
    warm_up,
)
from pipelines import PipeState, make_stages, open_store

from checkmate import CheckMateEngine, RetryPolicy, StageStatus, TaskEngineException
from checkmate.naming import lock_obj_name, stage_obj_name

TASK = "durable"
NAMES = ["s0", "s1"]
BIG = 48 * 1024 * 1024  # long enough to write that a SIGKILL lands mid-write


@pytest.fixture(autouse=True, scope="module")
def _warm() -> None:
    warm_up()


def engine(store: Store) -> Any:
    return CheckMateEngine(
        store.open(),
        task_id=TASK,
        stage_templates=make_stages(2),
        retry_policy=RetryPolicy.STAGE,
        max_attempts=2,
    )


def write_forever(spec: str, name: str, data: bytes) -> None:
    """In a child: keep replacing one object with a large (valid) version of itself."""
    io = open_store(spec)
    while True:
        io.write(name, data)


def leave_dead_writer_temp(store: Store) -> Path:
    """Kill a child in the middle of a write; return the temp file it left behind.

    The task exists (bound once); the child rewrites s0's object with the same
    JSON padded by spaces (still valid), so whichever version a reader sees parses.
    """
    with engine(store):
        pass
    name = stage_obj_name(TASK, "s0")
    data = store.open().read(name) + b" " * BIG
    task_dir = store.root / TASK
    for _ in range(10):
        proc = start_child(write_forever, store.spec, name, data)
        deadline = time.monotonic() + 60
        while not temp_files(task_dir):  # wait for a write to be in progress
            assert time.monotonic() < deadline, "the writer never started a write"
            assert proc.is_alive(), "the writer died on its own"
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        assert proc.exitcode == -signal.SIGKILL
        left = temp_files(task_dir)
        if left:  # else the write finished between our look and the kill: again
            assert len(left) == 1, left
            return Path(left[0])
    raise AssertionError("could not kill a writer in the middle of a write")


def objects_of_the_task() -> list[str]:
    """What list() shows of the task: its stage objects and its lock object (a lease
    object stays after release; a plain lock object would be gone)."""
    return sorted([*(stage_obj_name(TASK, n) for n in NAMES), lock_obj_name(TASK)])


def temp_name_for(pid: int, like: Path, target: str = "s1.json") -> str:
    """A temp file name of the store's scheme (host tag copied from a real one) for ``pid``."""
    tag = like.name.rpartition(TEMP_MARKER)[2].split("-")
    return f".{target}{TEMP_MARKER}{tag[0]}-{pid}-0123abcd"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["local", "file"])
def test_dead_writers_temp_file_is_ignored_and_sweepable(tmp_path: Path, kind: str) -> None:
    store = Store(kind, tmp_path / "store")
    temp = leave_dead_writer_temp(store)
    assert temp.exists()  # empty or partly written: the writer died at any point of it
    io = store.open()
    assert io.list(f"{TASK}/") == objects_of_the_task()
    assert all(TEMP_MARKER not in n for n in io.list(""))
    seen = inspect_task(io, TASK, NAMES, PipeState)
    assert not seen.problems, seen.problems
    assert io.sweep(f"{TASK}/") == 1
    assert temp_files(store.root) == []
    record("durability", dead_writer_temps=1, temps_swept=1)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["local", "file"])
def test_dead_writers_temp_file_is_removed_at_the_next_bind(tmp_path: Path, kind: str) -> None:
    store = Store(kind, tmp_path / "store")
    leave_dead_writer_temp(store)
    assert engine(store).execute() is StageStatus.COMPLETE
    assert temp_files(store.root) == []


def wait_forever(barrier: Any) -> None:
    barrier.wait()  # released by the parent at the end of the test


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["local", "file"])
def test_live_and_foreign_writers_temp_files_are_never_removed(tmp_path: Path, kind: str) -> None:
    store = Store(kind, tmp_path / "store")
    dead = leave_dead_writer_temp(store)
    dead.unlink()
    barrier = new_barrier(2)
    live = start_child(wait_forever, barrier)
    try:
        task_dir = store.root / TASK
        kept = [
            task_dir / temp_name_for(live.pid, dead),  # a live writer of this host
            task_dir / temp_name_for(os.getpid(), dead),  # this very process
            task_dir / f".s1.json{TEMP_MARKER}0badc0de-{live.pid + 1}-0123abcd",  # another host
        ]
        for path in kept:
            path.write_bytes(b"half-written")
        io = store.open()
        assert io.list(f"{TASK}/") == objects_of_the_task()
        assert io.sweep(f"{TASK}/") == 0
        assert engine(store).execute() is StageStatus.COMPLETE
        assert sorted(temp_files(store.root)) == sorted(str(p) for p in kept)
        assert all(p.read_bytes() == b"half-written" for p in kept)
    finally:
        barrier.wait()
        live.join()
    record("durability", live_temps_kept=len(kept))


# ---------------------------------------------------------------- power cuts, replayed from strace

CHILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import pipelines
    from checkmate import CheckMateEngine, RetryPolicy

    class AddStage(pipelines.AddStage):  # tells the world when it starts
        def execute_stage(self, previous_state_copy):
            sys.stdout.write(f"START {{self.stage_name}} {{self.state.attempts}}\\n")
            sys.stdout.flush()
            super().execute_stage(previous_state_copy)

    engine = CheckMateEngine(
        pipelines.open_store({spec!r}),
        task_id={task!r},
        stage_templates=[
            AddStage(stage_name=f"s{{i}}", state=pipelines.PipeState(), add=i + 1,
                     fail_times=int(i == 1))
            for i in range(3)
        ],
        retry_policy=RetryPolicy.STAGE,
        max_attempts={attempts},
    )
    status = engine.execute()
    sys.stdout.write("REPORTED " + status.value + "\\n")
    sys.stdout.flush()
    """
)
ATTEMPTS = 4  # room for the planned failure and for runs a power cut interrupts


def power_engine(store: Store) -> Any:
    return CheckMateEngine(
        store.open(),
        task_id=TASK,
        stage_templates=make_stages(3, per_stage={"s1": {"fail_times": 1}}),
        retry_policy=RetryPolicy.STAGE,
        max_attempts=ATTEMPTS,
    )


def strace_run(tmp_path: Path, store: Store) -> list[str]:
    """Run the pipeline in a fresh interpreter under strace; return the trace lines."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed")
    script = tmp_path / "child.py"
    tests_dir = str(Path(__file__).resolve().parent.parent)
    script.write_text(CHILD.format(tests=tests_dir, spec=store.spec, task=TASK, attempts=ATTEMPTS))
    trace = tmp_path / "trace.txt"
    command = [strace, "-f", "-qq", "-xx", "-y", "-s", "8388608", "-e", f"trace={STRACE_CALLS}"]
    proc = subprocess.run(
        [*command, "-o", str(trace), sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0 and "ptrace" in proc.stderr.lower():
        pytest.skip(f"strace cannot trace here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "REPORTED COMPLETE", proc.stdout
    return trace.read_text().splitlines()


def claimed(said: list[str]) -> dict[str, tuple[str, int]]:
    """What the process has claimed so far (stdout): per stage, the least persisted state.

    A stage that started attempt a has its RUNNING of attempt a persisted (core
    decision 2), and every stage before it is COMPLETE; after the report, all are.
    """
    claims: dict[str, tuple[str, int]] = {}
    for text in said:
        words = text.split()
        if words[:1] == ["START"]:
            stage, attempt = words[1], int(words[2])
            for before in range(int(stage[1:])):
                claims[f"s{before}"] = ("COMPLETE", 1)
            claims[stage] = ("STARTED", attempt)
        elif words[:2] == ["REPORTED", "COMPLETE"]:
            claims = {f"s{i}": ("COMPLETE", 1) for i in range(3)}
    return claims


def power_cuts(tmp_path: Path, kind: str, root_exists: bool) -> tuple[int, list[str]]:
    """Run the task under strace, then check every state a power cut could leave.

    After every fsync, and every time the process said something (a stage
    starts, execute() returned COMPLETE): the surviving files are written to a
    fresh directory. A new engine must read them without error, find at least
    what the process had claimed (each started stage's RUNNING, each earlier
    stage COMPLETE, all COMPLETE after the report), and resume the task to
    completion.
    """
    top = tmp_path / "power"
    top.mkdir()
    store = Store(kind, top / "store")
    model = PowerCutModel(top)
    if root_exists:
        store.root.mkdir()
        model.preexisting_dir(store.root)
    lines = strace_run(tmp_path, store)
    problems = []
    states = 0
    said: list[str] = []
    for number, (label, tree) in enumerate(model.crash_states(lines)):
        states += 1
        if label.startswith("stdout "):
            said.append(label.removeprefix("stdout "))
        cut = Store(kind, tmp_path / f"cut{number}" / "store")
        materialize(tree, cut.root.parent)
        where = f"power cut {number} (after {label.strip()!r})"
        try:
            power_engine(cut).status  # noqa: B018  (reads every object; raises if corrupt)
            seen = persisted_statuses(cut)
            for stage, (want, attempt) in claimed(said).items():
                status, attempts = seen.get(stage, ("CREATED", 0))
                if want == "COMPLETE" and status != "COMPLETE":
                    problems.append(f"{where}: {stage} was COMPLETE, now {status}")
                if want == "STARTED" and attempts < attempt:
                    problems.append(f"{where}: {stage} ran attempt {attempt}, persisted {attempts}")
            final = power_engine(cut)
            if final.execute(strict_recovery=True) is not StageStatus.COMPLETE:
                problems.append(f"{where}: could not be resumed")
            elif final.task_result.value != 1 + 2 + 3:
                problems.append(f"{where}: wrong result {final.task_result}")
        except TaskEngineException as exc:
            problems.append(f"{where}: {type(exc).__name__}: {exc}")
        seen = inspect_task(cut.open(), TASK, ["s0", "s1", "s2"], PipeState)
        problems.extend(f"{where}: {p}" for p in seen.problems)
    if "REPORTED COMPLETE" not in [t.strip() for t in said]:
        problems.append("the report is not in the trace")
    return states, problems


def persisted_statuses(store: Store) -> dict[str, tuple[str, int]]:
    """Each stage's persisted (status, attempts), read through the store (which recovers)."""
    seen = inspect_task(store.open(), TASK, ["s0", "s1", "s2"], PipeState)
    return {n: (s["status"], s["attempts"]) for n, s in seen.states.items()}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["local", "file"])
def test_power_cut_at_every_fsync(tmp_path: Path, kind: str) -> None:
    states, problems = power_cuts(tmp_path, kind, root_exists=True)
    record("durability", power_cut_states=states, objects_lost=len(problems))
    assert not problems, "\n".join(problems)
    assert states > 5


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["local", "file"])
def test_power_cut_when_the_run_created_the_store(tmp_path: Path, kind: str) -> None:
    _states, problems = power_cuts(tmp_path, kind, root_exists=False)
    assert not problems, "\n".join(problems)
