"""Crash at every persistence point (issue 4, item 1).

A 5-stage pipeline (stage s2 fails once, RetryPolicy.STAGE, max_attempts 3)
runs in a child process through `CrashingTaskIO` over a real store. The child
is killed (``os._exit``) just before, or just after, its k-th mutating storage
call, for every k from the first to the last mutation of a clean run. Then the
task is run again in fresh processes until it finishes (``strict_recovery=True``
where a stage was left RUNNING). After every process, and at the end:

- every persisted object parses (JSON, the state model, the lock model);
- every stage's history is consistent and only ever grows;
- no COMPLETE stage runs again, no attempt runs twice (from the stages' log);
- the final result is right, no lock and no temp file is left.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from _support import (
    ChildResult,
    CrashAroundTaskIO,
    Inspection,
    RunTracker,
    ScriptedCrash,
    Store,
    inspect_task,
    record,
    run_in_child,
    scaled,
    unrecorded_runs,
    warm_up,
)
from pipelines import PipeState, expected_value, make_stages, read_log

from checkmate import CheckMateEngine, InterruptedStageError, RetryPolicy
from checkmate.naming import lock_obj_name

TASK = "crash-points"
STAGES = 5
NAMES = [f"s{i}" for i in range(STAGES)]
FAILING_STAGE = "s2"
CRASH_EXIT = 86
KINDS = ["local", "file", "local-createlock"]


@pytest.fixture(autouse=True, scope="module")
def _warm() -> None:
    warm_up()


def engine(io: Any, log: str, max_attempts: int = 3) -> Any:
    return CheckMateEngine(
        io,
        task_id=TASK,
        stage_templates=make_stages(
            STAGES, log_path=log, per_stage={FAILING_STAGE: {"fail_times": 1}}
        ),
        retry_policy=RetryPolicy.STAGE,
        max_attempts=max_attempts,
    )


def child_run(
    store: Store, log: str, crash_at: int, when: str, strict: bool, max_attempts: int = 3
) -> dict[str, Any]:
    """In a child: run the task, crashing around mutation ``crash_at`` (0: never)."""
    io = CrashAroundTaskIO(store.open(), crash_at=crash_at, when=when, exit_code=CRASH_EXIT)
    status = engine(io, log, max_attempts).execute(strict_recovery=strict)
    return {"status": status.value, "mutations": io.mutations}


def inspect(store: Store) -> Inspection:
    return inspect_task(store.open(), TASK, NAMES, PipeState, root=store.root)


def count_mutations(tmp_path: Path, kind: str) -> int:
    """Run the pipeline once without crashing and count its mutating storage calls."""
    store = Store(kind, tmp_path / "clean")
    log = str(tmp_path / "clean.log")
    result = run_in_child(child_run, store, log, 0, "before", False)
    assert (result.kind, result.exitcode) == ("ok", 0), result.value
    assert result.value["status"] == "COMPLETE"
    assert read_log(log) == ["s0 1", "s1 1", "s2 1", "s2 2", "s3 1", "s4 1"]
    # lock + 5 creates + 2 writes per stage + the failed attempt's 2 + unlock
    assert result.value["mutations"] >= 1 + STAGES + 2 * STAGES + 2 + 1
    return int(result.value["mutations"])


def run_scenario(
    store: Store,
    log: str,
    crashes: list[tuple[int, str]],
    max_attempts: int = 3,
) -> tuple[dict[str, int], list[str]]:
    """Crash the task at each (k, when) in turn, then resume it until it is COMPLETE.

    Returns the figures of the scenario and every violation found.
    """
    tracker = RunTracker(log)
    problems: list[str] = []
    processes = resumes = interrupted_checks = 0
    corrupted: set[str] = set()

    def after_process(what: str) -> Inspection:
        seen = inspect(store)
        tracker.observe(seen)
        corrupted.update(seen.corrupt)
        problems.extend(f"after {what}: {p}" for p in seen.problems)
        return seen

    seen = inspect(store)
    for number, (k, when) in enumerate(crashes):
        strict = any(s["status"] == "RUNNING" for s in seen.states.values())
        result = run_in_child(child_run, store, log, k, when, strict, max_attempts)
        processes += 1
        finished = result.kind == "ok" and result.value["status"] == "COMPLETE"
        # The first run replays the clean run, so it must reach mutation k; a
        # later (recovery) run may finish in fewer mutations than k.
        if result.exitcode != CRASH_EXIT and (number == 0 or not finished):
            problems.append(f"crash {number} ({when} mutation {k}) did not crash: {result}")
        seen = after_process(f"crash {number} ({when} mutation {k})")
    for attempt in range(3):
        running = [n for n, s in seen.states.items() if s["status"] == "RUNNING"]
        if running:
            # Without strict_recovery the engine must refuse and change nothing.
            before = {n: b for n, b in seen.objects.items() if n not in seen.lock_objects}
            with pytest.raises(InterruptedStageError):
                engine(store.open(), log, max_attempts).execute()
            after = inspect(store)
            if {n: b for n, b in after.objects.items() if n not in after.lock_objects} != before:
                problems.append("execute() without strict_recovery changed a stage object")
            if after.lock_held:
                problems.append(f"refused execute() left the lock held: {after.lock_objects}")
            interrupted_checks += 1
        result: ChildResult = run_in_child(
            child_run, store, log, 0, "before", bool(running), max_attempts
        )
        processes += 1
        resumes += 1
        seen = after_process(f"resume {attempt}")
        if result.kind == "ok" and result.value["status"] == "COMPLETE":
            break
        problems.append(f"resume {attempt} did not finish: {result}")
    final = engine(store.open(), log, max_attempts)
    if final.status.value != "COMPLETE":
        problems.append(f"final status {final.status}")
    result_value = final.task_result
    if result_value is None or result_value.value != expected_value(STAGES):
        problems.append(f"final result {result_value!r}, expected {expected_value(STAGES)}")
    markers = [o for o in seen.lock_leftovers if o != lock_obj_name(TASK)]
    if seen.lock_leftovers:
        problems.append(f"lock left: {seen.lock_leftovers}")
    if seen.scratch:
        problems.append(f"self-test scratch objects left: {seen.scratch}")
    problems.extend(unrecorded_runs(read_log(log), seen.states))
    for name in NAMES:
        if not any(line.split()[0] == name for line in read_log(log)):
            problems.append(f"{name} never ran")
    problems.extend(tracker.problems)
    figures = {
        "processes": processes,
        "resumes": resumes,
        "interrupted_refusals": interrupted_checks,
        "objects_lost": len(tracker.lost),
        "complete_reruns": len(tracker.reruns) + len(tracker.rewritten),
        "orphan_takeover_markers": len(markers),
        "leftover_selftest_objects": len(seen.scratch),
        "objects_corrupted": len(corrupted),
        "failed": int(bool(problems)),
    }
    return figures, problems


@pytest.mark.timeout(300)
@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("kind", KINDS)
def test_crash_at_every_mutation(tmp_path: Path, kind: str, when: str) -> None:
    total = count_mutations(tmp_path, kind)
    failures: dict[int, list[str]] = {}
    totals = {"crash_points": 0, "processes": 1}
    for k in range(1, total + 1):
        store = Store(kind, tmp_path / f"k{k}")
        figures, problems = run_scenario(store, str(tmp_path / f"k{k}.log"), [(k, when)])
        if problems:
            failures[k] = problems
        totals["crash_points"] += 1
        for key, value in figures.items():
            totals[key] = totals.get(key, 0) + value
    record("crash_points", **totals, mutations_per_run=total)
    assert not failures, "\n".join(f"k={k}: {' / '.join(p)}" for k, p in failures.items())


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", KINDS)
def test_repeated_crashes_during_recovery(tmp_path: Path, kind: str) -> None:
    """Crash the recovery runs too: up to three seeded crashes in a row, then resume."""
    total = count_mutations(tmp_path, kind)
    seeds = scaled(30, 400) if kind == "local" else scaled(12, 150)
    failures: dict[int, list[str]] = {}
    totals = {"crash_points": 0, "processes": 1}
    for seed in range(seeds):
        rng = random.Random(seed)
        crashes = [
            (rng.randint(1, total), rng.choice(["before", "after"]))
            for _ in range(rng.randint(2, 3))
        ]
        store = Store(kind, tmp_path / f"seed{seed}")
        figures, problems = run_scenario(
            store,
            str(tmp_path / f"seed{seed}.log"),
            crashes,
            # each crash inside a stage costs an attempt: leave room for all of them
            max_attempts=3 + len(crashes),
        )
        if problems:
            failures[seed] = [str(crashes), *problems]
        totals["crash_points"] += len(crashes)
        for key, value in figures.items():
            totals[key] = totals.get(key, 0) + value
    record("crash_chains", **totals, chains=seeds)
    assert not failures, "\n".join(f"seed {s}: {' / '.join(p)}" for s, p in failures.items())


def crash_on(op_wanted: str, infix: str) -> Any:
    """A rule for ScriptedCrash: die right after the first ``op_wanted`` on a lock object
    whose name continues with ``infix`` ("" for the lock object itself)."""

    def rule(op: str, args: tuple[Any, ...]) -> str | None:
        name = str(args[0]) if args else ""
        lock = lock_obj_name(TASK)
        hit = name == lock if not infix else name.startswith(lock + infix)
        return "after" if op == op_wanted and hit else None

    return rule


def scripted_run(store: Store, log: str, rule: Any) -> dict[str, Any]:
    """In a child: run the task through ScriptedCrash."""
    io = ScriptedCrash(store.open(), rule, CRASH_EXIT)
    return {"status": engine(io, log).execute().value}


@pytest.mark.parametrize(
    "rule",
    [
        pytest.param(crash_on("create", ".takeover-"), id="taker-died-after-its-marker"),
        pytest.param(crash_on("write", ""), id="taker-died-holding-the-lock"),
        pytest.param(
            crash_on("delete", ""),
            id="died-between-deleting-the-lock-and-its-markers",
        ),
    ],
)
def test_crashed_takeover_leaves_no_marker(tmp_path: Path, rule: Any) -> None:
    """Plain lock objects (no compare-and-swap): a run dies holding the lock; the next
    takes it over and dies at the given point; a third run finishes the task.

    The lock's state lives in the objects whose names start with the lock's
    name (core decision 8): once the task is finished and unlocked, none may be
    left, however the earlier takeovers ended.
    """
    store = Store("local-createlock", tmp_path / "store")
    log = str(tmp_path / "log")
    first = run_in_child(child_run, store, log, 1, "after", False)
    second = run_in_child(scripted_run, store, log, rule)
    assert (first.exitcode, second.exitcode) == (CRASH_EXIT, CRASH_EXIT)
    assert any(".takeover-" in o for o in inspect(store).lock_objects)
    last = run_in_child(child_run, store, log, 0, "before", True)
    assert (last.kind, last.value["status"]) == ("ok", "COMPLETE"), last
    seen = inspect(store)
    assert not seen.problems
    assert seen.lock_objects == []


@pytest.mark.parametrize("kind", ["local", "file"])
def test_crash_during_the_lease_self_test_leaves_nothing(tmp_path: Path, kind: str) -> None:
    """Mutation 1 of a fresh process on a lease store is the self-test's create."""
    store = Store(kind, tmp_path / "store")
    log = str(tmp_path / "log")
    crashed = run_in_child(child_run, store, log, 1, "after", False)
    assert crashed.exitcode == CRASH_EXIT
    assert inspect(store).scratch, "the self-test wrote no scratch object"
    last = run_in_child(child_run, store, log, 0, "before", False)
    assert (last.kind, last.value["status"]) == ("ok", "COMPLETE"), last
    seen = inspect(store)
    assert not seen.problems
    assert seen.scratch == []
