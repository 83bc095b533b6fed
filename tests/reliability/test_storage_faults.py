"""Storage faults (issue 4, item 2).

A real `LocalTaskIO` is wrapped in `FaultyTaskIO`, which fails a seeded
fraction (10 % or 30 %) of storage calls with OSError or TimeoutError, before
or after the call took effect. Each seeded task is run by fresh processes:
first with faults on (up to `FAULTY_RUNS` runs), then with faults off, until it
is COMPLETE. Every run must either finish or raise a `StorageError` whose
``__cause__`` is the injected fault. After every run, through the inner store:

- every object parses and every history is consistent and only grows;
- no COMPLETE stage is lost or runs again, no attempt runs twice;
- a run that reported COMPLETE left every stage COMPLETE;
- each stage, from inside ``execute_stage``, found its RUNNING status persisted
  (`ProbeStage` reads its own object through the inner store).

Deterministic tests (`ScriptedFaults`) pin down the give-up paths one by one.
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
from _support import (
    MARKER_INFIX,
    Inspection,
    ProbeStage,
    RunTracker,
    ScriptedFaults,
    Store,
    inspect_task,
    record,
    run_in_child,
    scaled,
    start_child,
    unrecorded_runs,
    warm_up,
)
from pipelines import PipeState, expected_value, make_stages, read_log

from checkmate import (
    CheckMateEngine,
    LocalTaskIO,
    RetryPolicy,
    StageStatus,
    StorageError,
    StorageRetry,
    TaskEngineException,
)
from checkmate.naming import lock_obj_name, stage_obj_name
from checkmate.testing import FaultyTaskIO

STAGES = 4
NAMES = [f"s{i}" for i in range(STAGES)]
FAILING_STAGE = "s1"
MAX_ATTEMPTS = 5
FAULTY_RUNS = 10
WORKERS = 6
STORE_KINDS = ["local", "file", "local-createlock"]


@pytest.fixture(autouse=True, scope="module")
def _warm() -> None:
    warm_up()


def no_sleep(_seconds: float) -> None:
    """The engine's backoff, made instant (the fault pattern, not the clock, is under test)."""


def stages(log: str, probe_log: str) -> list[ProbeStage]:
    return [
        ProbeStage(
            stage_name=f"s{i}",
            state=PipeState(),
            add=i + 1,
            log_path=log,
            probe_log=probe_log,
            fail_times=1 if f"s{i}" == FAILING_STAGE else 0,
        )
        for i in range(STAGES)
    ]


def storage_retry(mode: str, seed: int) -> StorageRetry:
    if mode == "default":
        return StorageRetry()
    # 3 to 5 tries: with fewer tries the engine gives up more often.
    return StorageRetry(attempts=3 + seed % 3, sleep=no_sleep)


def faulty_run(
    store: Store,
    task_id: str,
    log: str,
    probe_log: str,
    seed: int,
    rate: float,
    mode: str,
    strict: bool,
    faults_on: bool,
) -> dict[str, Any]:
    """In a child: one run of the task through FaultyTaskIO; report how it ended."""
    io = FaultyTaskIO(store.open(), rate, seed=seed)
    io.enabled = faults_on
    engine = CheckMateEngine(
        io,
        task_id=task_id,
        stage_templates=stages(log, probe_log),
        retry_policy=RetryPolicy.STAGE,
        max_attempts=MAX_ATTEMPTS,
        storage_retry=storage_retry(mode, seed),
    )
    try:
        status = engine.execute(strict_recovery=strict)
    except TaskEngineException as exc:
        cause = exc.__cause__
        return {
            "outcome": "raised",
            "error": type(exc).__name__,
            "is_storage_error": isinstance(exc, StorageError),
            "cause": repr(cause),
            "cause_is_injected": isinstance(cause, OSError) and "injected fault" in str(cause),
            "faults": io.faults,
        }
    except OSError as exc:
        # Not wrapped in a StorageError: say where it came from.
        frames = traceback.extract_tb(exc.__traceback__)
        return {
            "outcome": "bare OSError",
            "error": repr(exc),
            "from_self_test": any(f.name == "self_test" for f in frames),
            "faults": io.faults,
        }
    return {"outcome": status.value, "faults": io.faults}


def run_seed(root: Path, seed: int, rate: float, mode: str) -> dict[str, Any]:
    """Drive one seeded task to completion through fresh processes; return figures and problems."""
    task_id = f"r{int(rate * 100)}-{mode}-{seed}"
    # The seeds take turns on the three store kinds: leases on LocalTaskIO and on
    # FsspecTaskIO file://, plain lock objects on a store without compare-and-swap.
    kind = STORE_KINDS[seed % len(STORE_KINDS)]
    store = Store(kind, root / f"store-{kind}")
    log, probe_log = str(root / f"{task_id}.log"), str(root / f"{task_id}.probe")
    inner = store.open()
    tracker = RunTracker(log)
    problems: list[str] = []
    corrupted: set[str] = set()
    figures = {
        "executions": 0,
        "faults": 0,
        "storage_errors": 0,
        "resumed_after_error": 0,
        "bare_errors": 0,
    }
    seen: Inspection = inspect_task(inner, task_id, NAMES, PipeState)
    finished = False
    for number in range(FAULTY_RUNS + 1):
        faults_on = number < FAULTY_RUNS
        strict = any(s["status"] == "RUNNING" for s in seen.states.values())
        child = run_in_child(
            faulty_run,
            store,
            task_id,
            log,
            probe_log,
            seed * 1000 + number,
            rate,
            mode,
            strict,
            faults_on,
        )
        figures["executions"] += 1
        seen = inspect_task(inner, task_id, NAMES, PipeState, root=store.root / task_id)
        tracker.observe(seen)
        corrupted.update(seen.corrupt)
        problems.extend(f"run {number}: {p}" for p in seen.problems)
        if child.kind != "ok":
            problems.append(f"run {number} ended with {child.kind}: {child.value}")
            continue
        result = child.value
        figures["faults"] += result["faults"]
        if result["outcome"] == "bare OSError":
            figures["bare_errors"] += 1
            problems.append(f"run {number} let a bare storage error escape: {result}")
            continue
        if result["outcome"] == "raised":
            figures["storage_errors"] += 1
            if not (result["is_storage_error"] and result["cause_is_injected"]):
                problems.append(f"run {number} raised {result}, not a StorageError from a fault")
            if not faults_on:
                problems.append(f"run {number} without faults raised {result}")
            continue
        if result["outcome"] != "COMPLETE":
            problems.append(f"run {number} returned {result['outcome']}")
            continue
        statuses = {n: s["status"] for n, s in seen.states.items()}
        if sorted(statuses) != NAMES or set(statuses.values()) != {"COMPLETE"}:
            problems.append(f"run {number} reported COMPLETE but storage holds {statuses}")
        if figures["storage_errors"]:
            figures["resumed_after_error"] += 1
        finished = True
        break
    if not finished:
        problems.append("the task never finished")
    final = seen.states.get(NAMES[-1], {})
    value = (final.get("result") or {}).get("value")
    if finished and value != expected_value(STAGES):
        problems.append(f"final result {value}, expected {expected_value(STAGES)}")
    if seen.lock_leftovers:
        problems.append(f"the lock was left behind: {seen.lock_leftovers}")
    if seen.scratch:
        problems.append(f"self-test scratch objects left: {seen.scratch}")
    problems.extend(unrecorded_runs(read_log(log), seen.states))
    probes = read_log(probe_log)
    bad_probes = [line for line in probes if " BAD " in line]
    problems.extend(f"stage ran before its RUNNING was persisted: {line}" for line in bad_probes)
    if len(probes) != len(read_log(log)):
        problems.append("probe log and run log disagree")
    problems.extend(tracker.problems)
    figures.update(
        seeds=1,
        stage_runs=len(probes),
        running_checked=len(probes),
        ran_without_running=len(bad_probes),
        objects_lost=len(tracker.lost),
        complete_reruns=len(tracker.reruns) + len(tracker.rewritten),
        objects_corrupted=len(corrupted),
        leftover_selftest_objects=len(seen.scratch),
        orphan_takeover_markers=sum(MARKER_INFIX in o for o in seen.lock_leftovers),
        failed=int(bool(problems)),
    )
    return {"seed": seed, "figures": figures, "problems": problems}


def worker(root: str, seeds: list[int], rate: float, mode: str, out: str) -> None:
    """One of several parallel workers: run its seeds, write the results as JSON."""
    results = [run_seed(Path(root), seed, rate, mode) for seed in seeds]
    Path(out).write_text(json.dumps(results))


def run_seeds(tmp_path: Path, seeds: int, rate: float, mode: str) -> dict[str, int]:
    """Run ``seeds`` seeded tasks on ``WORKERS`` parallel workers; assert and return figures."""
    procs, outs = [], []
    for w in range(WORKERS):
        out = tmp_path / f"worker{w}.json"
        outs.append(out)
        mine = list(range(w, seeds, WORKERS))
        procs.append(start_child(worker, str(tmp_path), mine, rate, mode, str(out)))
    for proc in procs:
        proc.join(1200)
        assert proc.exitcode == 0, f"worker ended with {proc.exitcode}"
    results = [r for out in outs for r in json.loads(out.read_text())]
    assert sorted(r["seed"] for r in results) == list(range(seeds))
    totals: dict[str, int] = {}
    for result in results:
        for key, value in result["figures"].items():
            totals[key] = totals.get(key, 0) + value
    record(f"storage_faults_{mode}", rate_percent=int(rate * 100), **totals)
    failures = {r["seed"]: r["problems"] for r in results if r["problems"]}
    assert not failures, "\n".join(f"seed {s}: {' / '.join(p)}" for s, p in failures.items())
    assert totals["faults"] > 0, "no fault was injected"
    return totals


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_seeded_faults(tmp_path: Path, rate: float) -> None:
    seeds = scaled(100, 1000)
    totals = run_seeds(tmp_path, seeds, rate, "fast")
    assert totals["faults"] > seeds
    if rate >= 0.3:
        assert totals["storage_errors"] > 0, "no run gave up: the give-up path was not exercised"
        assert totals["resumed_after_error"] > 0


@pytest.mark.timeout(600)
@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_seeded_faults_with_default_backoff(tmp_path: Path, rate: float) -> None:
    """The same, with the engine's default StorageRetry (real sleeps), on a few seeds."""
    run_seeds(tmp_path, scaled(12, 60), rate, "default")


# ---------------------------------------------------------------- deterministic give-up paths


KINDS = [pytest.param("local", id="lease"), pytest.param("local-createlock", id="lock-object")]
WRITES = ("write", "write_if")
READS = ("read", "read_versioned", "read_many", "read_many_versioned")


def engine_for(io: Any, log: str, **kwargs: Any) -> Any:
    return CheckMateEngine(
        io,
        task_id="faults",
        stage_templates=make_stages(3, log_path=log),
        retry_policy=RetryPolicy.STAGE,
        max_attempts=3,
        **{"storage_retry": StorageRetry(attempts=2, sleep=no_sleep), **kwargs},
    )


def run_catching(engine: Any) -> StorageError | None:
    """Execute; return the StorageError it raised, None if it completed (else raise)."""
    try:
        assert engine.execute() is StageStatus.COMPLETE
    except StorageError as exc:
        return exc
    return None


def status_of(io: Any, stage: str) -> str:
    return str(json.loads(io.read(stage_obj_name("faults", stage)))["state"]["status"])


def lock_released(io: Any) -> bool:
    seen = inspect_task(io, "faults", ["s0", "s1", "s2"], PipeState)
    return not seen.lock_held and not seen.lock_leftovers


def writes_of(stage: str, status: str, when: str, *, reads_fail: bool = False) -> Any:
    """Fail every write of ``stage``'s object with ``status`` (and, optionally, every read
    of that object, so that the engine cannot read back whether its write landed)."""
    name = stage_obj_name("faults", stage)
    needle = f'"status":"{status}"'.encode()
    landed = False

    def rule(op: str, args: tuple[Any, ...]) -> str | None:
        nonlocal landed
        if op in WRITES and args[0] == name and needle in args[1]:
            landed = landed or when == "after"
            return when
        if reads_fail and landed and op in READS and name in (args[0] if args else ()):
            return "before"
        return None

    return rule


@pytest.mark.parametrize("kind", KINDS)
def test_failed_running_write_runs_nothing_and_resumes(tmp_path: Path, kind: str) -> None:
    store = Store(kind, tmp_path / "store")
    inner = store.open()
    log = str(tmp_path / "log")
    io = ScriptedFaults(inner, writes_of("s1", "RUNNING", "before"))
    with pytest.raises(StorageError) as info:
        engine_for(io, log).execute()
    assert isinstance(info.value.__cause__, OSError)
    assert "scripted fault" in str(info.value.__cause__)
    assert read_log(log) == ["s0 1"], "s1 ran although its RUNNING was never persisted"
    assert status_of(inner, "s1") == "CREATED"
    assert lock_released(inner)
    assert engine_for(inner, log).execute() is StageStatus.COMPLETE
    assert read_log(log) == ["s0 1", "s1 1", "s2 1"]
    assert lock_released(inner)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reads_fail", [False, True], ids=["read-back", "no-read-back"])
def test_lost_reply_of_a_complete_write_keeps_the_stage_complete(
    tmp_path: Path, kind: str, reads_fail: bool
) -> None:
    """s1's COMPLETE lands but every reply is lost (and, in one variant, the object cannot
    be read back either): the run may fail, but s1 stays COMPLETE and never runs again."""
    store = Store(kind, tmp_path / "store")
    inner = store.open()
    log = str(tmp_path / "log")
    io = ScriptedFaults(inner, writes_of("s1", "COMPLETE", "after", reads_fail=reads_fail))
    error = run_catching(engine_for(io, log))
    assert error is None or isinstance(error.__cause__, OSError), repr(error)
    assert status_of(inner, "s1") == "COMPLETE"
    assert engine_for(inner, log).execute() is StageStatus.COMPLETE
    assert read_log(log) == ["s0 1", "s1 1", "s2 1"], "a COMPLETE stage ran again"
    assert lock_released(inner)


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("local", id="lease"),
        pytest.param(
            "local-createlock",
            id="lock-object",
        ),
    ],
)
def test_bound_engine_never_overwrites_a_persisted_complete(tmp_path: Path, kind: str) -> None:
    """The write of s1's COMPLETE lands, but neither its reply nor a read-back gets through;
    the caller retries on the same bound engine. Whatever the engine does (refuse, or
    re-read storage), s1 must not run again and its persisted COMPLETE must stay."""
    store = Store(kind, tmp_path / "store")
    inner = store.open()
    log = str(tmp_path / "log")
    io = ScriptedFaults(inner, writes_of("s1", "COMPLETE", "after", reads_fail=True))
    engine = engine_for(io, log)
    with engine:
        with pytest.raises(StorageError):
            engine.execute()
        assert status_of(inner, "s1") == "COMPLETE"
        io.enabled = False
        try:
            engine.execute(strict_recovery=True)
        except TaskEngineException:
            pass
    assert status_of(inner, "s1") == "COMPLETE"
    assert [line for line in read_log(log) if line.startswith("s1 ")] == ["s1 1"]


def release_fails(op: str, args: tuple[Any, ...]) -> str | None:
    """The lock's release cannot reach the store (a lease's release write; a lock object's
    read before its delete)."""
    lock = lock_obj_name("faults")
    if op == "write_if" and args[0] == lock and b'"state":"released"' in args[1]:
        return "before"
    return "before" if op == "read" and args[0] == lock else None


def acquire_reply_lost(op: str, args: tuple[Any, ...]) -> str | None:
    """The lock is taken, but no reply of the taking call gets through."""
    lock = lock_obj_name("faults")
    return "after" if op in ("create", "write_if") and args[0] == lock else None


@pytest.mark.parametrize(
    ("kind", "rule"),
    [
        pytest.param("local", release_fails, id="lease-release-fails"),
        pytest.param("local", acquire_reply_lost, id="lease-acquire-reply-lost"),
        pytest.param(
            "local-createlock",
            release_fails,
            id="lock-object-release-fails",
        ),
        pytest.param(
            "local-createlock",
            acquire_reply_lost,
            id="lock-object-acquire-reply-lost",
        ),
    ],
)
def test_storage_error_at_the_lock_leaves_the_task_resumable(
    tmp_path: Path, kind: str, rule: Any
) -> None:
    """After the storage recovers, a later run in the same process resumes the task (with a
    lease, once the leftover lease has expired: the run waits for it, lock_ttl=1 s)."""
    store = Store(kind, tmp_path / "store")
    inner = store.open()
    log = str(tmp_path / "log")
    short = {"lock_ttl": 1.0, "lock_skew": 0.0}
    error = run_catching(engine_for(ScriptedFaults(inner, rule), log, **short))
    assert error is None or isinstance(error.__cause__, OSError), repr(error)
    outcome = "completed" if error is None else "raised"
    later = engine_for(inner, log, bind_lock_timeout=3.0, **short)
    assert later.execute() is StageStatus.COMPLETE, outcome
    assert read_log(log) == ["s0 1", "s1 1", "s2 1"]
    assert lock_released(inner)


@pytest.mark.parametrize(
    ("kind", "op"),
    [
        pytest.param("local", "read_versioned", id="lease"),
        pytest.param("local-createlock", "create", id="lock-object"),
    ],
)
def test_storage_retry_governs_the_lock_too(tmp_path: Path, kind: str, op: str) -> None:
    """The engine's storage_retry also decides how the lock's storage calls are retried."""
    sleeps: list[float] = []
    io = FaultyTaskIO(Store(kind, tmp_path / "store").open(), 1.0, seed=0, ops={op})
    engine = engine_for(io, "", storage_retry=StorageRetry(attempts=2, sleep=sleeps.append))
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        engine.execute()
    assert isinstance(info.value.__cause__, OSError)
    assert (io.faults, len(sleeps)) == (2, 1), "the lock did not use the engine's StorageRetry"
    assert time.monotonic() - started < 0.5


@pytest.mark.parametrize("op", ["write_if", "read", "delete"])
def test_self_test_faults_are_storage_errors(tmp_path: Path, op: str) -> None:
    """One transient fault in the lease self-test: retried like every other storage call
    (the run completes), or at worst a StorageError; never a bare OSError."""
    failed = False

    def once(name_op: str, args: tuple[Any, ...]) -> str | None:
        nonlocal failed
        if name_op == op and ".selftest-" in str(args[0]) and not failed:
            failed = True
            return "before"
        return None

    inner = LocalTaskIO(tmp_path / "store")
    io = ScriptedFaults(inner, once)
    error = run_catching(engine_for(io, ""))
    assert error is None or isinstance(error, StorageError), repr(error)
    assert failed
    assert not [n for n in inner.list("") if ".selftest-" in n], "scratch object left behind"
