"""The batch runner, `checkmate.run_tasks`, and ``checkmate run``: real processes, real stores.

Every stage appends a start and a done line to a log shared by all workers
(tests/batch_factories.py), so each test counts exactly which stage ran how
often. Tests synchronise on events (a FIFO a stage writes its pid into, a
callback, a line on a pipe), never on sleeps.
"""

from __future__ import annotations

import io as stdio
import json
import os
import pickle
import pty
import re
import select
import signal
import subprocess
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from batch_factories import (
    LOG_ENV,
    Pipeline,
    expected_pairs,
    log_lines,
    runs,
)
from conftest import backend_params, make_io

from checkmate import (
    BatchSummary,
    CheckMateEngine,
    ConfigurationError,
    FsspecTaskIO,
    LocalTaskIO,
    StageStatus,
    TaskIO,
    TaskOutcome,
    TaskResult,
    run_tasks,
)
from checkmate._progress import ProgressCounts, ProgressDisplay, format_eta
from checkmate.batch import BatchInterrupted
from checkmate.cli import main

TESTS_DIR = Path(__file__).resolve().parent
FACTORIES = str(TESTS_DIR / "batch_factories.py")
TIMEOUT = 120
Out = TaskOutcome
S = StageStatus


def task_ids(n: int, prefix: str = "t") -> list[str]:
    return [f"{prefix}{i:04d}" for i in range(n)]


def assert_ran_once(log: Path, ids: list[str]) -> None:
    """Every stage of every task started once and finished once; nothing else ran."""
    pairs = expected_pairs(ids)
    done, started = runs(log, "done"), runs(log, "start")
    assert set(done) == pairs
    assert set(done.values()) == {1}, [p for p, n in done.items() if n != 1]
    assert started == done


def assert_all_complete(summary: BatchSummary, ids: list[str]) -> None:
    assert list(summary.results) == ids
    assert summary.all_complete, summary.describe()
    for result in summary:
        assert result.outcome is Out.COMPLETE
        assert result.status is S.COMPLETE
        assert result.error is None
        assert result.started_at is not None
        assert result.finished_at is not None
        assert result.finished_at >= result.started_at


def engine_state(factory: Pipeline, io: TaskIO, task_id: str) -> CheckMateEngine[Any, Any]:
    return factory(task_id, io)


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "stages.log"


@pytest.fixture(params=backend_params(["local", "s3"]))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> TaskIO:
    """A store shared by processes: a local directory, or a prefix on moto's S3 server."""
    if request.param == "s3":
        request.getfixturevalue("s3_emulator")
    return make_io(str(request.param), tmp_path)


# ---------------------------------------------------------------------- process pools


def test_200_tasks_on_a_process_pool_of_2_run_every_stage_once(store: TaskIO, log: Path) -> None:
    ids = task_ids(200)
    factory = Pipeline(log_path=str(log), lock_ttl=5, lock_skew=1)
    summary = run_tasks(factory, ids, store, max_workers=2, progress=False)
    assert_all_complete(summary, ids)
    assert_ran_once(log, ids)
    assert {r.attempts for r in summary} == {1}
    assert {r.stage_attempts for r in summary} == {3}
    assert len({r.worker for r in summary}) == 2  # both workers of the pool took part
    assert engine_state(factory, store, ids[-1]).task_result.value == 6


def test_a_finished_batch_runs_again_without_running_anything(tmp_path: Path, log: Path) -> None:
    store = LocalTaskIO(tmp_path / "store")
    ids = task_ids(30)
    factory = Pipeline(log_path=str(log))
    first = run_tasks(factory, ids, store, max_workers=2, progress=False)
    second = run_tasks(factory, [*ids, ids[0]], store, max_workers=2, progress=False)
    assert_all_complete(first, ids)
    assert_all_complete(second, ids)  # the duplicate id runs once
    assert_ran_once(log, ids)


def test_a_task_that_ends_in_error_is_reported_and_not_retried(tmp_path: Path, log: Path) -> None:
    store = LocalTaskIO(tmp_path / "store")
    ids = ["ok-1", "fail-1", "ok-2"]
    factory = Pipeline(log_path=str(log), retry_policy="STAGE", max_attempts=2)
    for _ in range(2):  # the second batch finds it ERROR and runs nothing
        summary = run_tasks(factory, ids, store, max_workers=2, progress=False)
        failed = summary["fail-1"]
        assert failed.outcome is Out.FAILED
        assert failed.status is S.ERROR
        assert failed.attempts == 1
        assert failed.stage_attempts == 3  # s0 once, s1 twice (the engine's budget)
        assert failed.error_type == "StageFailedError"
        assert "planned failure of s1" in (failed.error or "")
        assert summary.not_complete == [failed]
        assert not summary.all_complete
        assert summary.counts() == {Out.COMPLETE: 2, Out.FAILED: 1}
    lines = [row for row in log_lines(log) if row[0] == "fail-1"]
    assert lines == [
        ("fail-1", "s0", 1, "start"),
        ("fail-1", "s0", 1, "done"),
        ("fail-1", "s0", 1, "persisted"),
        ("fail-1", "s1", 1, "start"),
        ("fail-1", "s1", 2, "start"),
    ]


def test_a_held_task_is_skipped_and_tried_again_later(tmp_path: Path, log: Path) -> None:
    store = LocalTaskIO(tmp_path / "store")
    held_id = "held-task"
    others = task_ids(12)
    factory = Pipeline(log_path=str(log), lock_ttl=2, lock_skew=1)
    holder = factory(held_id, store)
    holder.bind()  # another live worker holds the task
    finished: list[str] = []

    def on_result(result: TaskResult) -> None:
        finished.append(result.task_id)
        if set(finished) == set(others):  # everything else is done: let the task go
            holder.unbind()

    try:
        summary = run_tasks(
            factory,
            [held_id, *others],
            store,
            max_workers=2,
            retry_delay=0.1,
            on_result=on_result,
            progress=False,
        )
    finally:
        if holder.is_bound:
            holder.unbind()
    assert_all_complete(summary, [held_id, *others])
    assert_ran_once(log, [held_id, *others])
    held = summary[held_id]
    assert held.held >= 1
    assert held.attempts == held.held + 1
    assert finished[-1] == held_id
    # It ran only after every other task was done, though it was submitted first.
    order = [task for task, _, _, _ in log_lines(log)]
    assert order.index(held_id) > max(order.index(t) for t in others)
    # No busy waiting: each new try waited twice as long as the last, up to the ttl (2 s).
    assert held.held <= 6 + summary.elapsed / 1.6


def test_hold_timeout_gives_up_on_a_task_held_elsewhere(tmp_path: Path, log: Path) -> None:
    store = LocalTaskIO(tmp_path / "store")
    factory = Pipeline(log_path=str(log), lock_ttl=2, lock_skew=1)
    with factory("held", store):
        with ThreadPoolExecutor(2) as pool:
            summary = run_tasks(
                factory,
                ["held", "free"],
                store,
                executor=pool,
                retry_delay=0.05,
                hold_timeout=0.3,
                progress=False,
            )
    assert summary["free"].ok
    result = summary["held"]
    assert result.outcome is Out.HELD
    assert result.status is None
    assert result.held >= 2
    assert "held by" in (result.error or "")
    assert ("held", "s0") not in runs(log, "start")


def test_a_dead_worker_is_replaced_and_its_task_resumed(tmp_path: Path, log: Path) -> None:
    store = LocalTaskIO(tmp_path / "store")
    ids = task_ids(6)
    crash = ids[2]
    factory = Pipeline(
        log_path=str(log), crash_task=crash, retry_policy="STAGE", max_attempts=2, lock_ttl=3
    )
    summary = run_tasks(factory, ids, store, max_workers=2, strict_recovery=True, progress=False)
    assert_all_complete(summary, ids)
    assert summary[crash].attempts >= 2  # the runner handed it out again
    assert summary[crash].stage_attempts == 4  # s1's first attempt died with its process
    done = runs(log, "done")
    assert set(done) == expected_pairs(ids)
    # A dead worker breaks the process pool, which kills the other workers too: a
    # stage of theirs may have returned without its COMPLETE being durable yet, and
    # runs again, as if killed just before it returned. No stage ever starts again
    # once its COMPLETE was persisted, and only the tasks handed out again ran twice.
    rows = log_lines(log)
    persisted = {
        (t, s): i for i, (t, s, _, event) in reversed(list(enumerate(rows))) if event == "persisted"
    }
    late = [
        row for i, row in enumerate(rows) if row[3] == "start" and i > persisted.get(row[:2], i)
    ]
    assert not late, late
    again = {task for task in ids if summary[task].attempts >= 2}
    assert {task for (task, _), n in done.items() if n > 1} <= again
    assert runs(log, "start")[(crash, "s1")] == 2


def test_without_strict_recovery_a_crashed_task_is_reported(tmp_path: Path, log: Path) -> None:
    store = LocalTaskIO(tmp_path / "store")
    factory = Pipeline(log_path=str(log), crash_task="crash", retry_policy="STAGE", max_attempts=2)
    summary = run_tasks(factory, ["crash"], store, max_workers=1, progress=False)
    result = summary["crash"]
    assert result.outcome is Out.NEEDS_RECOVERY
    assert result.status is S.RUNNING
    assert result.error_type == "InterruptedStageError"
    assert "strict_recovery" in (result.error or "")


def test_a_task_whose_holder_froze_is_taken_over_when_its_lease_lapses(
    tmp_path: Path, log: Path
) -> None:
    """The holder's process is alive but stopped (SIGSTOP): only the lease's expiry frees it."""
    task = "frozen"
    fifo = tmp_path / "pid.fifo"
    os.mkfifo(fifo)
    tasks_file = tmp_path / "tasks.txt"
    tasks_file.write_text(task + "\n")
    store = tmp_path / "store"
    env = {
        **os.environ,
        LOG_ENV: str(log),
        "CHECKMATE_BATCH_BLOCK_TASK": task,
        "CHECKMATE_BATCH_BLOCK_FIFO": str(fifo),
        "CHECKMATE_BATCH_LOCK_TTL": "1",
    }
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    holder = subprocess.Popen(
        [
            *(sys.executable, "-m", "checkmate", "run", "batch_factories:cli_pipeline"),
            *("--store", str(store), "--tasks", str(tasks_file), "--workers", "1"),
        ],
        cwd=TESTS_DIR,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        ready, _, _ = select.select([reader], [], [], TIMEOUT)
        assert ready, "the holder's stage never started"
        os.kill(int(os.read(reader, 64).decode().split()[0]), signal.SIGSTOP)
        factory = Pipeline(
            log_path=str(log), lock_ttl=1, lock_skew=0.5, retry_policy="STAGE", max_attempts=3
        )
        summary = run_tasks(
            factory,
            [task],
            LocalTaskIO(store),
            max_workers=1,
            strict_recovery=True,
            retry_delay=0.1,
            progress=False,
        )
    finally:
        os.close(reader)
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    result = summary[task]
    assert result.outcome is Out.COMPLETE
    assert result.held >= 1  # it waited for the lease to lapse, trying again meanwhile
    assert result.stage_attempts == 4  # the frozen holder's attempt of s1 counts
    assert runs(log, "start") == Counter({(task, "s0"): 1, (task, "s1"): 2, (task, "s2"): 1})
    assert set(runs(log).values()) == {1}


def test_two_batch_runs_at_once_run_each_stage_once(tmp_path: Path) -> None:
    ids = task_ids(120)
    tasks_file = tmp_path / "tasks.txt"
    tasks_file.write_text("\n".join(ids) + "\n")
    store = tmp_path / "store"
    logs = [tmp_path / "run-a.log", tmp_path / "run-b.log"]
    procs = [
        subprocess.Popen(
            [sys.executable, FACTORIES, str(store), str(log), str(tasks_file)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for log in logs
    ]
    try:
        for proc in procs:  # both have imported everything and wait for the signal
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outputs = [proc.communicate(timeout=TIMEOUT) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        results = json.loads(out)
        assert [r["task_id"] for r in results] == ids
        assert {r["status"] for r in results} == {"COMPLETE"}
    done = runs(logs[0]) + runs(logs[1])
    started = runs(logs[0], "start") + runs(logs[1], "start")
    assert set(done) == expected_pairs(ids)
    assert set(done.values()) == {1}
    assert started == done
    assert runs(logs[0]), "run A did nothing: the runs did not overlap"
    assert runs(logs[1]), "run B did nothing: the runs did not overlap"


def test_ctrl_c_stops_the_batch_and_leaves_every_task_resumable(tmp_path: Path, log: Path) -> None:
    """SIGINT to the whole process group, as a terminal sends it, while a stage runs."""
    ids = task_ids(40)
    blocked = ids[0]
    fifo = tmp_path / "pid.fifo"
    os.mkfifo(fifo)
    tasks_file = tmp_path / "tasks.txt"
    tasks_file.write_text("\n".join(ids) + "\n")
    store = tmp_path / "store"
    env = {
        **os.environ,
        LOG_ENV: str(log),
        "CHECKMATE_BATCH_BLOCK_TASK": blocked,
        "CHECKMATE_BATCH_BLOCK_FIFO": str(fifo),
    }
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "checkmate",
            "run",
            "batch_factories:cli_pipeline",
            "--store",
            str(store),
            "--tasks",
            str(tasks_file),
            "--workers",
            "2",
            "--json",
        ],
        cwd=TESTS_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        ready, _, _ = select.select([reader], [], [], TIMEOUT)
        assert ready, "the blocking stage never started"
        worker_pid = int(os.read(reader, 64).decode().split()[0])
        assert worker_pid != proc.pid
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        os.close(reader)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert "Traceback" not in err
    results = {r["task_id"]: r for r in json.loads(out)}
    assert list(results) == ids
    assert results[blocked]["outcome"] == "interrupted"
    assert results[blocked]["status"] == "RETRY"  # the engine recorded the interrupted run
    outcomes = Counter(r["outcome"] for r in results.values())
    assert set(outcomes) <= {"complete", "interrupted", "not_run"}
    assert outcomes["not_run"] > 0
    # Everything resumes: the interrupted attempt was not counted, nothing ran twice.
    summary = run_tasks(Pipeline(log_path=str(log)), ids, LocalTaskIO(store), progress=False)
    assert_all_complete(summary, ids)
    assert summary[blocked].stage_attempts == 3
    done = runs(log)
    assert set(done) == expected_pairs(ids)
    assert set(done.values()) == {1}
    assert runs(log, "start")[(blocked, "s1")] == 2


# ---------------------------------------------------------------------- arguments and results


def test_invalid_and_duplicate_task_ids(tmp_path: Path, log: Path) -> None:
    store = LocalTaskIO(tmp_path / "store")
    with ThreadPoolExecutor(2) as pool:
        summary = run_tasks(
            Pipeline(log_path=str(log)), ["a", "../x", "a", "b"], store, executor=pool
        )
    assert list(summary.results) == ["a", "../x", "b"]
    bad = summary["../x"]
    assert bad.outcome is Out.ERROR
    assert bad.attempts == 0
    assert bad.error_type == "ConfigurationError"
    assert summary["a"].ok
    assert summary["b"].ok
    assert_ran_once(log, ["a", "b"])


def wrong_factory(task_id: str, io: TaskIO) -> Any:
    return "not an engine"


def other_task_factory(task_id: str, io: TaskIO) -> CheckMateEngine[Any, Any]:
    return Pipeline(log_path="")(task_id + "-other", io)


def broken_factory(task_id: str, io: TaskIO) -> CheckMateEngine[Any, Any]:
    raise RuntimeError("no engine today")


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (wrong_factory, "not a CheckMateEngine"),
        (other_task_factory, "when asked for"),
        (broken_factory, "no engine today"),
    ],
)
def test_a_factory_that_fails_is_reported(tmp_path: Path, factory: Any, message: str) -> None:
    with ThreadPoolExecutor(1) as pool:
        summary = run_tasks(factory, ["t"], LocalTaskIO(tmp_path), executor=pool)
    result = summary["t"]
    assert result.outcome is Out.ERROR
    assert message in (result.error or "")
    assert result.attempts == 1


def test_arguments_are_checked_before_anything_runs(tmp_path: Path) -> None:
    store = LocalTaskIO(tmp_path)
    factory = Pipeline(log_path="")
    with pytest.raises(ConfigurationError, match="pickled"):
        run_tasks(lambda t, i: factory(t, i), ["t"], store)
    with pytest.raises(ConfigurationError, match="not both"):
        run_tasks(factory, ["t"], store, executor=ThreadPoolExecutor(1), max_workers=2)
    with pytest.raises(ConfigurationError, match="one string"):
        run_tasks(factory, "t", store)
    with pytest.raises(ConfigurationError, match="TaskIO"):
        run_tasks(factory, ["t"], "store")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="max_workers"):
        run_tasks(factory, ["t"], store, max_workers=0)
    assert not list(tmp_path.iterdir())


def test_an_empty_batch_is_complete(tmp_path: Path) -> None:
    summary = run_tasks(Pipeline(log_path=""), [], LocalTaskIO(tmp_path))
    assert len(summary) == 0
    assert summary.all_complete
    assert summary.describe().startswith("0 tasks")


def test_thread_pools_and_memory_stores_work(log: Path) -> None:
    store = FsspecTaskIO("memory://checkmate-tests/batch-threads")
    ids = task_ids(40)
    with ThreadPoolExecutor(4) as pool:
        summary = run_tasks(Pipeline(log_path=str(log)), ids, store, executor=pool)
    assert_all_complete(summary, ids)
    assert_ran_once(log, ids)


def test_results_are_plain_data(tmp_path: Path) -> None:
    with ThreadPoolExecutor(1) as pool:
        summary = run_tasks(
            Pipeline(log_path=""), ["a", "fail-b"], LocalTaskIO(tmp_path), executor=pool
        )
    data = json.loads(json.dumps(summary.to_dicts()))
    assert [(d["task_id"], d["status"], d["outcome"]) for d in data] == [
        ("a", "COMPLETE", "complete"),
        ("fail-b", "ERROR", "failed"),
    ]
    assert summary.describe().endswith("1 complete, 1 failed")
    copy = pickle.loads(pickle.dumps(BatchInterrupted(summary)))
    assert copy.summary == summary


def test_progress_is_written_to_the_stream_given(tmp_path: Path) -> None:
    stream = stdio.StringIO()
    with ThreadPoolExecutor(2) as pool:
        run_tasks(
            Pipeline(log_path=""),
            task_ids(5),
            LocalTaskIO(tmp_path),
            executor=pool,
            progress=stream,
        )
    last = stream.getvalue().splitlines()[-1]
    assert last.startswith("checkmate: 5/5 done | 0 running | 0 failed | 0 skipped")
    assert "ETA 0:00" in last
    assert "\x1b" not in stream.getvalue()  # not a terminal: no colours, no cursor moves


class FakeTerminal(stdio.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_redraws_one_line() -> None:
    now = [0.0]
    term = FakeTerminal()
    display = ProgressDisplay(term, clock=lambda: now[0])
    now[0] = 10.0
    display.update(ProgressCounts(total=100, done=20, failed=5, running=2, skipped=1))
    now[0] = 10.01
    display.update(ProgressCounts(total=100, done=21, failed=5, running=2, skipped=1))  # too soon
    display.close(ProgressCounts(total=100, done=100, failed=0, running=0, skipped=0))
    text = term.getvalue()
    assert text.count("\r") == 2
    assert text.endswith("\n")
    assert "2.5 tasks/s" in text  # 25 finished in 10 s
    assert "ETA 0:30" in text  # 75 left at 2.5/s
    assert "\x1b[32m" in text  # green, on a terminal
    plain = ProgressDisplay(FakeTerminal(), color=False)
    assert "\x1b[3" not in plain.render(ProgressCounts(1, 1, 0, 0, 0))


def test_format_eta() -> None:
    assert format_eta(None) == "?"
    assert format_eta(float("nan")) == "?"
    assert format_eta(59.4) == "0:59"
    assert format_eta(3725) == "1:02:05"


def test_progress_is_off_when_stderr_is_not_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with ThreadPoolExecutor(1) as pool:
        run_tasks(Pipeline(log_path=""), ["a"], LocalTaskIO(tmp_path), executor=pool)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ""


# ---------------------------------------------------------------------- the command line


def cli(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "checkmate", *args],
        cwd=TESTS_DIR,
        env={**os.environ, **(env or {})},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def test_cli_run_end_to_end(tmp_path: Path, log: Path) -> None:
    store = tmp_path / "store"
    ids = task_ids(20)
    tasks_file = tmp_path / "tasks.txt"
    tasks_file.write_text("# the nightly batch\n" + "\n".join(ids) + "\n\n")
    env = {LOG_ENV: str(log)}
    factory = "batch_factories:cli_pipeline"
    done = cli("run", factory, "--store", str(store), "--tasks", str(tasks_file), "-o", "x=1")
    assert done.returncode == 2  # storage options apply to URLs only
    done = cli("run", factory, "--store", str(store), "--tasks", str(tasks_file), "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    results = json.loads(done.stdout)
    assert [(r["task_id"], r["status"]) for r in results] == [(t, "COMPLETE") for t in ids]
    assert_ran_once(log, ids)
    # Again, from stdin, with a failing task and the table: exit 1.
    again = cli(
        "run",
        factory,
        "--store",
        store.as_uri(),
        "--tasks",
        "-",
        "--workers",
        "2",
        env=env,
        stdin=f"{ids[0]}\nfail-x\n",
    )
    assert again.returncode == 1, again.stderr
    lines = again.stdout.splitlines()
    assert lines[0].split() == ["TASK", "STATUS", "OUTCOME", "ATTEMPTS", "TIME", "ERROR"]
    assert lines[1].split()[:4] == [ids[0], "COMPLETE", "complete", "1"]
    assert lines[2].split()[:4] == ["fail-x", "ERROR", "failed", "1"]
    assert "planned fail" in lines[2]
    assert re.fullmatch(r"2 tasks in [0-9.]+s: 1 complete, 1 failed", lines[-1]), lines[-1]
    done_runs, started = runs(log), runs(log, "start")
    assert {p: n for p, n in done_runs.items() if p[0] != "fail-x"} == dict.fromkeys(
        expected_pairs(ids), 1
    )  # the COMPLETE task did not run again
    assert started[("fail-x", "s1")] == 1
    assert ("fail-x", "s1") not in done_runs


def run_on_a_terminal(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """Run the CLI with its stderr on a pseudo-terminal; return (code, stdout, terminal text)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "checkmate", *args],
        cwd=TESTS_DIR,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=slave,
    )
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the terminal's other side is closed
                break
            if not data:
                break
            chunks.append(data)
        assert proc.stdout is not None
        out = proc.stdout.read().decode()
        code = proc.wait(timeout=TIMEOUT)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    return code, out, b"".join(chunks).decode()


@pytest.mark.parametrize("color", [True, False])
def test_cli_run_shows_progress_on_a_terminal(tmp_path: Path, color: bool) -> None:
    tasks_file = tmp_path / "tasks.txt"
    tasks_file.write_text("\n".join(task_ids(5)))
    args = ["run", "batch_factories:cli_pipeline", "--store", str(tmp_path / "store")]
    args += ["--tasks", str(tasks_file), "--workers", "1"]
    env = {"NO_COLOR": ""}
    code, out, terminal = run_on_a_terminal(*args, *([] if color else ["--no-color"]), env=env)
    assert code == 0, terminal
    assert "5 tasks in" in out
    assert "\r" in terminal
    assert "5/5 done" in terminal
    assert "tasks/s" in terminal
    assert ("\x1b[32m" in terminal) is color


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nomodule:factory"], "cannot import module 'nomodule'"),
        (["batch_factories"], "use MODULE:FACTORY"),
        (["batch_factories:missing"], "has no 'missing'"),
        (["batch_factories:not_a_factory"], "not a factory"),
        (["batch_factories:cli_pipeline", "--workers", "0"], "invalid count"),
        (["batch_factories:cli_pipeline", "--workers", "2", "--dask", "tcp://x:1"], "not allowed"),
        (["batch_factories:cli_pipeline", "--tasks-file", "x"], "unrecognized"),
    ],
)
def test_cli_run_usage_errors(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(TESTS_DIR)
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("a\n")
    code = main(["run", *args, "--store", str(tmp_path / "store"), "--tasks", str(tasks)])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert message in captured.err
    assert captured.err.startswith("checkmate: error: ")
    assert captured.err.count("\n") == 1
    assert not (tmp_path / "store").exists()


def test_cli_run_missing_tasks_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(TESTS_DIR)
    code = main(
        [
            "run",
            "batch_factories:cli_pipeline",
            "--store",
            str(tmp_path),
            "--tasks",
            str(tmp_path / "nope.txt"),
        ]
    )
    assert code == 2
    assert "cannot read the tasks file" in capsys.readouterr().err


def test_cli_run_help_lists_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--store", "--tasks", "--workers", "--dask", "--strict-recovery", "--json"):
        assert option in text


def test_worker_thread_is_not_left_behind(tmp_path: Path) -> None:
    before = threading.active_count()
    run_tasks(Pipeline(log_path=""), ["a", "b"], LocalTaskIO(tmp_path), max_workers=1)
    assert threading.active_count() <= before
