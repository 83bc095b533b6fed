"""Eight processes racing to execute one task id (decision 8: the lock makes it safe).

Each racer gets its own log file, so the logs tell exactly which process ran
which stage.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import live_lock_objects, make_io, store_spec
from pipelines import CRASH_EXIT_CODE, expected_value, make_stages, read_log

from checkmate import CheckMateEngine, RetryPolicy, TaskIO

SCRIPT = str(Path(__file__).resolve().parent / "pipelines.py")
TASK = "race-task"
RACERS = 8
STAGE_COUNT = 20  # long enough that the racers really overlap
TIMEOUT = 120
ALL_RUNS = [f"s{i} 1" for i in range(STAGE_COUNT)]


def race(spec: str, logs: list[Path], *args: str) -> list[tuple[int, str, str]]:
    """Start every racer before waiting for any; return (exit code, stdout, stderr) each."""
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                SCRIPT,
                spec,
                TASK,
                "--stages",
                str(STAGE_COUNT),
                "--log",
                str(log),
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for log in logs
    ]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=TIMEOUT)
            results.append((proc.returncode, out.strip(), err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for _, _, err in results:
        assert "Traceback" not in err, err
    return results


def engine_for(io: TaskIO) -> Any:
    return CheckMateEngine(
        io,
        task_id=TASK,
        stage_templates=make_stages(STAGE_COUNT),
        retry_policy=RetryPolicy.STAGE,
        max_attempts=3,
    )


def assert_complete_and_unlocked(io: TaskIO) -> None:
    engine = engine_for(io)
    assert engine.status.value == "COMPLETE"
    assert engine.task_result.value == expected_value(STAGE_COUNT)
    assert not engine.has_lockfile
    assert not live_lock_objects(io), "lock left behind"


@pytest.fixture
def setup(shared_backend: str, tmp_path: Path) -> tuple[str, TaskIO, list[Path]]:
    logs = [tmp_path / f"racer{i}.log" for i in range(RACERS)]
    return store_spec(shared_backend, tmp_path), make_io(shared_backend, tmp_path), logs


def test_racers_with_a_lock_timeout_run_each_stage_once(setup: Any) -> None:
    spec, io, logs = setup
    results = race(spec, logs, "--lock-timeout", "30")
    assert [(code, out) for code, out, _ in results] == [(0, "COMPLETE")] * RACERS, results
    runs = [read_log(log) for log in logs]
    # One racer ran the whole task while holding the lock; the others waited
    # for it and then found the task COMPLETE.
    assert [r for r in runs if r] == [ALL_RUNS], runs
    assert engine_for(io).cumulative_attempts == STAGE_COUNT
    assert_complete_and_unlocked(io)


def test_racers_without_a_timeout_either_run_or_get_bind_exception(setup: Any) -> None:
    spec, io, logs = setup
    results = race(spec, logs)
    winners = [i for i, (code, _, _) in enumerate(results) if code == 0]
    losers = [i for i, (code, _, _) in enumerate(results) if code != 0]
    assert winners, results
    for i in winners:
        assert results[i][1] == "COMPLETE", results[i]
    for i in losers:
        code, out, _ = results[i]
        assert code == 3, results[i]
        assert out.startswith("BindException:"), out
        assert read_log(logs[i]) == [], "a racer that did not get the lock ran a stage"
    # Exactly the racers that got the lock ran; each stage ran once, in order.
    runs = [read_log(logs[i]) for i in winners]
    assert [line for r in runs for line in r] == ALL_RUNS
    assert [r for r in runs if r] == [ALL_RUNS]
    assert_complete_and_unlocked(io)


@pytest.mark.parametrize("timeout", [("--lock-timeout", "30"), ()], ids=["wait", "no-wait"])
def test_racers_resuming_a_crashed_task_recover_it_once(
    setup: Any, tmp_path: Path, timeout: tuple[str, ...]
) -> None:
    """The dead owner's lock is taken over by exactly one racer at a time."""
    spec, io, logs = setup
    crash_log = tmp_path / "crash.log"
    crashed = subprocess.run(
        [sys.executable, SCRIPT, spec, TASK, "--stages", str(STAGE_COUNT), "--log",
         str(crash_log), "--crash-stage", "s2", "--policy", "STAGE", "--max-attempts", "3"],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert crashed.returncode == CRASH_EXIT_CODE, (crashed.stdout, crashed.stderr)
    assert read_log(crash_log) == ["s0 1", "s1 1", "s2 1"]
    assert engine_for(io).has_lockfile

    results = race(spec, logs, "--strict", "--policy", "STAGE", "--max-attempts", "3", *timeout)
    for code, out, _ in results:
        if timeout:
            assert (code, out) == (0, "COMPLETE")
        else:
            assert (code, out) == (0, "COMPLETE") or (
                code == 3 and out.startswith("BindException:")
            ), (code, out)
    runs = [line for log in logs for line in read_log(log)]
    expected = ["s2 2"] + [f"s{i} 1" for i in range(3, STAGE_COUNT)]
    assert runs == expected, "the crashed stage reran once, the rest ran once"
    engine = engine_for(io)
    assert engine.cumulative_attempts == STAGE_COUNT + 1
    assert_complete_and_unlocked(io)
