"""Crash and resume with real processes (decisions 2, 3, 5, 6 and 8).

A child process runs tests/pipelines.py and dies inside a stage (``os._exit``
or SIGKILL); a second process then resumes the task from the same store.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import live_lock_objects, make_io, state_snapshot, store_spec
from pipelines import CRASH_EXIT_CODE, expected_value, make_stages, read_log

from checkmate import BindException, CheckMateEngine, LockOwner, RetryPolicy, TaskIO
from checkmate.naming import stage_obj_name

TESTS_DIR = Path(__file__).resolve().parent
SCRIPT = str(TESTS_DIR / "pipelines.py")
TASK = "crash-task"
STAGES = ["s0", "s1", "s2"]
TIMEOUT = 60


def run_pipeline(spec: str, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, SCRIPT, spec, TASK, *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def stage_state(io: TaskIO, name: str) -> dict[str, Any]:
    """A stage's persisted state, read as plain JSON (no user classes needed)."""
    return json.loads(io.read(stage_obj_name(TASK, name)))["state"]  # type: ignore[no-any-return]


def engine_for(io: TaskIO, policy: RetryPolicy, max_attempts: int, log: Path | None = None) -> Any:
    return CheckMateEngine(
        io,
        task_id=TASK,
        stage_templates=make_stages(3, log_path=str(log) if log else ""),
        retry_policy=policy,
        max_attempts=max_attempts,
    )


def lock_objects(io: TaskIO) -> list[str]:
    """Lock-state objects that still hold a lock."""
    return live_lock_objects(io)


def stage_snapshot(io: TaskIO) -> dict[str, bytes]:
    """Every persisted object except the lock's."""
    return state_snapshot(io)


def interrupted_entries(state: dict[str, Any]) -> list[dict[str, Any]]:
    """History entries that end a run without the stage completing it: the crashed run."""
    return [
        entry
        for entry in state["history"]
        if entry["begin_status"] == "RUNNING" and entry["end_status"] in ("RETRY", "ERROR")
    ]


def check_history_chain(state: dict[str, Any]) -> None:
    previous, attempt = "UNBOUND", 0
    for entry in state["history"]:
        assert entry["begin_status"] == previous
        assert entry["attempt"] >= attempt
        previous, attempt = entry["end_status"], entry["attempt"]
    assert previous == state["status"]


@pytest.fixture
def store(shared_backend: str, tmp_path: Path) -> tuple[str, TaskIO, Path]:
    """(spec for the script, a TaskIO on the same store, log path)."""
    return store_spec(shared_backend, tmp_path), make_io(shared_backend, tmp_path), tmp_path / "log"


def crash(spec: str, log: Path, stage: str, *policy: str) -> None:
    first = run_pipeline(spec, "--log", str(log), "--crash-stage", stage, *policy)
    assert first.returncode == CRASH_EXIT_CODE, (first.stdout, first.stderr)


STAGE3 = ("--policy", "STAGE", "--max-attempts", "3")


def test_crash_leaves_the_stage_running_with_its_attempt_counted(store: Any) -> None:
    spec, io, log = store
    crash(spec, log, "s1", *STAGE3)
    assert read_log(log) == ["s0 1", "s1 1"]
    states = [stage_state(io, name) for name in STAGES]
    assert [s["status"] for s in states] == ["COMPLETE", "RUNNING", "CREATED"]
    assert [s["attempts"] for s in states] == [1, 1, 0]
    assert engine_for(io, RetryPolicy.STAGE, 3).status.value == "RUNNING"
    assert lock_objects(io), "the dead process's lock is still there"


def test_plain_rerun_reports_the_interrupted_stage_and_changes_nothing(store: Any) -> None:
    spec, io, log = store
    crash(spec, log, "s1", *STAGE3)
    before = stage_snapshot(io)
    second = run_pipeline(spec, "--log", str(log), *STAGE3)
    assert second.returncode == 3, (second.stdout, second.stderr)
    assert second.stdout.startswith("InterruptedStageError:"), second.stdout
    assert "'s1'" in second.stdout
    assert "strict_recovery" in second.stdout
    assert stage_snapshot(io) == before, "no persisted byte may change"
    assert lock_objects(io) == [], "the lock was taken (from the dead owner) and released"
    assert read_log(log) == ["s0 1", "s1 1"], "nothing ran"
    # Still the same answer the next time.
    third = run_pipeline(spec, "--log", str(log), *STAGE3)
    assert third.stdout.startswith("InterruptedStageError:"), third.stdout
    assert stage_snapshot(io) == before


@pytest.mark.parametrize("crash_stage", STAGES, ids=["first", "middle", "last"])
def test_strict_rerun_with_stage_policy_completes(store: Any, crash_stage: str) -> None:
    spec, io, log = store
    crash(spec, log, crash_stage, *STAGE3)
    second = run_pipeline(spec, "--log", str(log), "--strict", *STAGE3)
    assert second.returncode == 0, (second.stdout, second.stderr)
    assert second.stdout.strip() == "COMPLETE"

    runs = read_log(log)
    expected_runs = []
    for name in STAGES:
        expected_runs.append(f"{name} 1")
        if name == crash_stage:
            expected_runs.append(f"{name} 2")
    assert runs == expected_runs
    for name in STAGES:
        # The one successful run of each stage (the crashed run never finished).
        successful = [line for line in runs if line.startswith(f"{name} ")][-1:]
        assert len(successful) == 1

    for name in STAGES:
        state = stage_state(io, name)
        check_history_chain(state)
        assert state["status"] == "COMPLETE"
        if name == crash_stage:
            assert state["attempts"] == 2, "the interrupted attempt is counted once"
            interrupted = interrupted_entries(state)
            assert len(interrupted) == 1, state["history"]
            assert interrupted[0]["attempt"] == 1
            assert interrupted[0]["end_status"] == "RETRY"
            starts = [e["attempt"] for e in state["history"] if e["end_status"] == "RUNNING"]
            assert starts == [1, 2]
            assert state["rollbacks"] == 1, "rollback_stage() ran for the interrupted run"
        else:
            assert state["attempts"] == 1
            assert interrupted_entries(state) == []
            assert state["rollbacks"] == 0
    engine = engine_for(io, RetryPolicy.STAGE, 3)
    assert engine.status.value == "COMPLETE"
    assert engine.task_result.value == expected_value(3)
    assert engine.cumulative_attempts == 4
    assert lock_objects(io) == []


def test_strict_rerun_with_none_policy_ends_in_error(store: Any) -> None:
    spec, io, log = store
    crash(spec, log, "s1")
    second = run_pipeline(spec, "--log", str(log), "--strict")
    assert second.returncode == 3, (second.stdout, second.stderr)
    assert "retry policy" in second.stdout.lower(), second.stdout
    assert read_log(log) == ["s0 1", "s1 1"], "the stage did not run again"
    states = {name: stage_state(io, name) for name in STAGES}
    assert [states[n]["status"] for n in STAGES] == ["COMPLETE", "ERROR", "CREATED"]
    s1 = states["s1"]
    check_history_chain(s1)
    assert s1["attempts"] == 1, "the interrupted attempt is not counted twice"
    assert len(interrupted_entries(s1)) == 1
    last = s1["history"][-1]
    assert (last["begin_status"], last["end_status"]) == ("RUNNING", "ERROR")
    assert "retry policy" in last["message"].lower()
    assert states["s2"]["attempts"] == 0
    assert lock_objects(io) == []

    # An ERROR task raises again and runs nothing (decision 4).
    before = stage_snapshot(io)
    third = run_pipeline(spec, "--log", str(log), "--strict")
    assert third.returncode == 3
    assert stage_snapshot(io) == before
    assert read_log(log) == ["s0 1", "s1 1"]


@pytest.mark.parametrize(("max_attempts", "outcome"), [(4, "COMPLETE"), (3, "ERROR")])
def test_strict_rerun_with_global_policy_counts_the_crashed_run(
    store: Any, max_attempts: int, outcome: str
) -> None:
    spec, io, log = store
    policy = ("--policy", "GLOBAL", "--max-attempts", str(max_attempts))
    crash(spec, log, "s1", *policy)
    second = run_pipeline(spec, "--log", str(log), "--strict", *policy)
    states = [stage_state(io, name) for name in STAGES]
    # s0 1 + s1 1 (crashed) + s1 2 = 3 runs; a fourth is needed for s2.
    assert sum(s["attempts"] for s in states) <= max_attempts
    if outcome == "COMPLETE":
        assert second.returncode == 0, (second.stdout, second.stderr)
        assert read_log(log) == ["s0 1", "s1 1", "s1 2", "s2 1"]
        assert [s["status"] for s in states] == ["COMPLETE"] * 3
    else:
        assert second.returncode == 3, (second.stdout, second.stderr)
        assert read_log(log) == ["s0 1", "s1 1", "s1 2"]
        assert [s["status"] for s in states] == ["COMPLETE", "COMPLETE", "ERROR"]
        assert states[2]["attempts"] == 0, "s2 went to ERROR without running"
    assert states[1]["attempts"] == 2
    assert lock_objects(io) == []


@pytest.mark.parametrize(("max_attempts", "outcome"), [(3, "COMPLETE"), (2, "ERROR")])
def test_crash_during_a_retry_is_recovered_within_the_budget(
    store: Any, max_attempts: int, outcome: str
) -> None:
    spec, io, log = store
    policy = ("--policy", "STAGE", "--max-attempts", str(max_attempts))
    # Attempt 1 of s1 fails on purpose, attempt 2 crashes the process.
    first = run_pipeline(
        spec, "--log", str(log), "--fail-stage", "s1", "--fail-times", "1",
        "--crash-stage", "s1", "--crash-attempt", "2", *policy,
    )  # fmt: skip
    assert first.returncode == CRASH_EXIT_CODE, (first.stdout, first.stderr)
    assert read_log(log) == ["s0 1", "s1 1", "s1 2"]
    second = run_pipeline(spec, "--log", str(log), "--strict", *policy)
    s1 = stage_state(io, "s1")
    check_history_chain(s1)
    ends = [(e["attempt"], e["begin_status"], e["end_status"]) for e in s1["history"]]
    assert (1, "RUNNING", "RETRY") in ends
    assert (2, "RUNNING", "RETRY" if outcome == "COMPLETE" else "ERROR") in ends
    assert s1["rollbacks"] == 2
    if outcome == "COMPLETE":
        assert second.returncode == 0, (second.stdout, second.stderr)
        assert read_log(log) == ["s0 1", "s1 1", "s1 2", "s1 3", "s2 1"]
        assert (s1["status"], s1["attempts"]) == ("COMPLETE", 3)
    else:
        assert second.returncode == 3, (second.stdout, second.stderr)
        assert "retry policy" in second.stdout.lower(), second.stdout
        assert read_log(log) == ["s0 1", "s1 1", "s1 2"]
        assert (s1["status"], s1["attempts"]) == ("ERROR", 2)
    assert lock_objects(io) == []


def double_crash(spec: str, log: Path) -> subprocess.CompletedProcess[str]:
    """Crash in s1, crash again in the run that recovers it, then resume."""
    crash(spec, log, "s1", *STAGE3)
    again = run_pipeline(
        spec, "--log", str(log), "--strict", "--crash-stage", "s1", "--crash-attempt", "2", *STAGE3
    )
    assert again.returncode == CRASH_EXIT_CODE, (again.stdout, again.stderr)
    return run_pipeline(spec, "--log", str(log), "--strict", *STAGE3)


def test_a_crash_of_the_recovering_run_is_recovered_too(store: Any) -> None:
    spec, io, log = store
    final = double_crash(spec, log)
    assert final.returncode == 0, (final.stdout, final.stderr)
    assert final.stdout.strip() == "COMPLETE"
    assert read_log(log) == ["s0 1", "s1 1", "s1 2", "s1 3", "s2 1"]
    s1 = stage_state(io, "s1")
    check_history_chain(s1)
    assert s1["attempts"] == 3
    assert [e["attempt"] for e in interrupted_entries(s1)] == [1, 2]
    assert s1["rollbacks"] == 2
    assert not engine_for(io, RetryPolicy.STAGE, 3).has_lockfile


def test_a_double_crash_leaves_no_lock_state_behind(store: Any) -> None:
    spec, io, log = store
    final = double_crash(spec, log)
    assert final.returncode == 0, (final.stdout, final.stderr)
    assert lock_objects(io) == []


def test_the_dead_process_lock_is_taken_over_at_once(store: Any) -> None:
    spec, io, log = store
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, spec, TASK, "--log", str(log), "--crash-stage", "s1", *STAGE3],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == CRASH_EXIT_CODE, (out, err)
    engine = engine_for(io, RetryPolicy.STAGE, 3, log)
    assert engine.has_lockfile
    held = LockOwner.model_validate_json(io.read(engine.lock_obj_name))
    assert held.pid == proc.pid

    # bind_lock_timeout=None: one try, no waiting. It must succeed at once.
    started = time.monotonic()
    engine.bind()
    try:
        assert time.monotonic() - started < 5
        mine = LockOwner.model_validate_json(io.read(engine.lock_obj_name))
        assert mine.pid == os.getpid()
        assert mine.token != held.token
        # Now the lock has a live owner: nobody else gets it.
        rival = engine_for(io, RetryPolicy.STAGE, 3)
        with pytest.raises(BindException):
            rival.bind()
        assert engine.execute(strict_recovery=True).value == "COMPLETE"
    finally:
        engine.unbind()
    assert lock_objects(io) == []
    assert read_log(log) == ["s0 1", "s1 1", "s1 2", "s2 1"]


# A child that blocks inside s1 until it is killed; its stage class is also
# called AddStage, so pipelines.py can resume the task it leaves behind.
BLOCKING_CHILD = """
import os, sys, threading
sys.path.insert(0, {tests_dir!r})
import pipelines
from checkmate import CheckMateEngine, RetryPolicy

class AddStage(pipelines.AddStage):
    block_stage: str = ""
    ready_path: str = ""

    def execute_stage(self, previous_state_copy):
        if self.stage_name == self.block_stage and self.state.attempts == 1:
            pipelines.append_line(self.log_path, f"{{self.stage_name}} {{self.state.attempts}}")
            pipelines.append_line(self.ready_path, str(os.getpid()))
            threading.Event().wait(120)  # blocked here until killed
            os._exit(99)
        super().execute_stage(previous_state_copy)

spec, task_id, log, ready = sys.argv[1:5]
stages = [
    AddStage(stage_name=f"s{{i}}", state=pipelines.PipeState(), add=i + 1, log_path=log,
             block_stage="s1", ready_path=ready)
    for i in range(3)
]
engine = CheckMateEngine(pipelines.open_store(spec), task_id=task_id, stage_templates=stages,
                         retry_policy=RetryPolicy.STAGE, max_attempts=3)
engine.execute()
"""


def test_sigkill_inside_a_stage_then_resume(store: Any, tmp_path: Path) -> None:
    spec, io, log = store
    ready = tmp_path / "ready"
    code = BLOCKING_CHILD.format(tests_dir=str(TESTS_DIR))
    child = subprocess.Popen(
        [sys.executable, "-c", code, spec, TASK, str(log), str(ready)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while not ready.exists():
            if child.poll() is not None:
                pytest.fail(f"child exited early: {child.communicate()}")
            if time.monotonic() > deadline:
                pytest.fail("child never reached the blocking stage")
            time.sleep(0.01)  # bounded poll of the readiness file

        # While s1 runs, its RUNNING status and attempt are already persisted (decision 2).
        s1 = stage_state(io, "s1")
        assert (s1["status"], s1["attempts"]) == ("RUNNING", 1)
        # The lock's owner is alive: a second process is refused, and changes nothing.
        before = stage_snapshot(io)
        rival = run_pipeline(spec, "--log", str(log), "--strict", *STAGE3)
        assert rival.returncode == 3
        assert rival.stdout.startswith("BindException:"), rival.stdout
        assert stage_snapshot(io) == before

        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=TIMEOUT)
        assert child.returncode == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate(timeout=TIMEOUT)

    plain = run_pipeline(spec, "--log", str(log), *STAGE3)
    assert plain.stdout.startswith("InterruptedStageError:"), plain.stdout
    assert stage_snapshot(io) == before

    resumed = run_pipeline(spec, "--log", str(log), "--strict", *STAGE3)
    assert resumed.returncode == 0, (resumed.stdout, resumed.stderr)
    assert resumed.stdout.strip() == "COMPLETE"
    assert read_log(log) == ["s0 1", "s1 1", "s1 2", "s2 1"]
    s1 = stage_state(io, "s1")
    check_history_chain(s1)
    assert s1["attempts"] == 2
    assert len(interrupted_entries(s1)) == 1
    assert engine_for(io, RetryPolicy.STAGE, 3).task_result.value == expected_value(3)
    assert lock_objects(io) == []
