"""Contention (issue 4, item 5).

16 processes execute the same task ids, each in its own random order, on one
local store. Half of them wait for a held task (``bind_lock_timeout``); the
other half skip it and come back to it after their first pass. Every stage of
every task must run exactly once (each task's stages append to that task's
log), and every task must end COMPLETE with its lock released.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from _support import inspect_task, new_barrier, record, scaled, start_child, warm_up
from pipelines import PipeState, expected_value, make_stages, read_log

from checkmate import BindException, CheckMateEngine, LocalTaskIO, RetryPolicy, StageStatus

PROCESSES = 16
STAGES = 3
NAMES = [f"s{i}" for i in range(STAGES)]


@pytest.fixture(autouse=True, scope="module")
def _warm() -> None:
    warm_up()


def engine(root: Path, task_id: str, timeout: float | None) -> Any:
    return CheckMateEngine(
        LocalTaskIO(root / "store"),
        task_id=task_id,
        stage_templates=make_stages(STAGES, log_path=str(root / f"{task_id}.log")),
        retry_policy=RetryPolicy.STAGE,
        max_attempts=2,
        bind_lock_timeout=timeout,
    )


def racer(root: Path, number: int, task_ids: list[str], barrier: Any) -> None:
    """One process: execute every task id in a random order; waiters wait for held
    tasks, skippers skip them and come back once the pass is over."""
    order = list(task_ids)
    random.Random(number).shuffle(order)
    waits = number % 2 == 0
    outcome = {"executes": 0, "conflicts": 0, "ran": 0, "statuses": {}}
    barrier.wait()  # start together
    pending = order
    for timeout in (60.0 if waits else None, 60.0):
        skipped = []
        for task_id in pending:
            try:
                status = engine(root, task_id, timeout).execute()
            except BindException:
                outcome["conflicts"] += 1
                skipped.append(task_id)
                continue
            outcome["executes"] += 1
            outcome["statuses"][task_id] = status.value
        pending = skipped
    assert not pending, f"still held after waiting: {pending}"
    (root / f"racer{number}.json").write_text(json.dumps(outcome))


@pytest.mark.timeout(300)
def test_processes_race_over_many_tasks(tmp_path: Path) -> None:
    task_ids = [f"task-{i:03d}" for i in range(scaled(20, 200))]
    barrier = new_barrier(PROCESSES)
    procs = [start_child(racer, tmp_path, n, task_ids, barrier) for n in range(PROCESSES)]
    for proc in procs:
        proc.join(240)
    exit_codes = [proc.exitcode for proc in procs]
    outcomes = [
        json.loads(p.read_text())
        for n in range(PROCESSES)
        if (p := tmp_path / f"racer{n}.json").exists()
    ]
    problems = []
    if exit_codes != [0] * PROCESSES:
        problems.append(f"racers ended with {exit_codes}")
    runs = 0
    for task_id in task_ids:
        log = read_log(tmp_path / f"{task_id}.log")
        runs += len(log)
        if log != [f"{name} 1" for name in NAMES]:
            problems.append(f"{task_id}: stage runs {log}, expected each stage once")
        final = engine(tmp_path, task_id, None)
        if final.status is not StageStatus.COMPLETE:
            problems.append(f"{task_id}: {final.status}")
        elif final.task_result.value != expected_value(STAGES):
            problems.append(f"{task_id}: result {final.task_result}")
        seen = inspect_task(LocalTaskIO(tmp_path / "store"), task_id, NAMES, PipeState)
        problems.extend(f"{task_id}: {p}" for p in seen.problems)
        if seen.lock_held or seen.lock_leftovers:
            problems.append(f"{task_id}: lock left {seen.lock_leftovers}")
        reported = {o["statuses"].get(task_id) for o in outcomes} - {None}
        if reported != {"COMPLETE"}:
            problems.append(f"{task_id}: execute() returned {reported}")
    record(
        "contention",
        processes_raced=PROCESSES,
        contention_tasks=len(task_ids),
        contention_executes=sum(o["executes"] for o in outcomes),
        contention_conflicts=sum(o["conflicts"] for o in outcomes),
        contention_stage_runs=runs,
        complete_reruns=max(0, runs - len(task_ids) * STAGES),
        failed=int(bool(problems)),
    )
    assert not problems, "\n".join(problems)
    assert sum(o["executes"] for o in outcomes) == PROCESSES * len(task_ids)
