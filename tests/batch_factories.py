"""Module-level engine factories for the batch runner's tests (importable by workers).

Every stage appends ``"<task> <stage> <attempt> start"`` when it begins and
``"<task> <stage> <attempt> done"`` just before it returns, to one log file
shared by all workers (one ``O_APPEND`` write per line: lines never mix), so
a test counts exactly which stage ran where and how often.

`Pipeline` is a picklable, configurable factory (a frozen dataclass with
``__call__``); `cli_pipeline` is a plain function configured through the
environment, for ``checkmate run batch_factories:cli_pipeline``.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from checkmate import BaseStage, BaseStageState, CheckMateEngine, RetryPolicy, StageStatus, TaskIO

LOG_ENV = "CHECKMATE_BATCH_LOG"
BLOCK_TASK_ENV = "CHECKMATE_BATCH_BLOCK_TASK"
BLOCK_FIFO_ENV = "CHECKMATE_BATCH_BLOCK_FIFO"
LOCK_TTL_ENV = "CHECKMATE_BATCH_LOCK_TTL"
CRASH_EXIT_CODE = 17
BLOCK_LIMIT = 120.0
"""Seconds a blocking stage waits at most for the test to kill its process."""


class Total(BaseModel):
    value: int = 0


class LogState(BaseStageState[Total]):
    value: int = 0


class LoggedStage(BaseStage[LogState]):
    """Adds its position to the previous value; logs its start and its end.

    Config fields (never persisted state): ``log_path``; ``fail`` (raise on
    every attempt); ``work`` (rounds of SHA-256 to burn CPU); ``block_fifo``
    (on attempt 1, write this process's pid into the FIFO at this path, then
    block until the process is killed); ``crash`` (``os._exit`` on attempt 1).
    """

    add: int = 1
    log_path: str = ""
    fail: bool = False
    work: int = 0
    block_fifo: str = ""
    crash: bool = False

    def execute_stage(self, previous_state_copy: LogState) -> None:
        attempt = self.state.attempts
        tag = f"{self.state.task_id} {self.stage_name} {attempt}"
        append(self.log_path, f"{tag} start")
        if self.block_fifo and attempt == 1:
            block_until_killed(self.block_fifo)
        if self.crash and attempt == 1:
            os._exit(CRASH_EXIT_CODE)
        burn(self.work)
        if self.fail:
            raise RuntimeError(f"planned failure of {self.stage_name}")
        self.state.value = previous_state_copy.value + self.add
        self.state.result = Total(value=self.state.value)
        append(self.log_path, f"{tag} done")


def append(path: str, line: str) -> None:
    """Append one line with a single O_APPEND write (atomic between processes)."""
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def burn(rounds: int) -> None:
    """Spend CPU: ``rounds`` chained SHA-256 digests."""
    digest = b"checkmate"
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()


def block_until_killed(fifo: str) -> None:
    """Tell the test our pid through the FIFO (blocks until it reads), then wait to be killed."""
    with open(fifo, "w") as pipe:
        pipe.write(f"{os.getpid()}\n")
    deadline = time.monotonic() + BLOCK_LIMIT
    while time.monotonic() < deadline:
        time.sleep(0.05)
    raise RuntimeError("nobody killed this worker")


@dataclass(frozen=True)
class Pipeline:
    """A factory: ``Pipeline(...)(task_id, io)`` builds the engine of one task.

    Tasks whose id starts with ``fail_prefix`` fail at stage s1 on every attempt;
    the task ``block_task`` blocks in s1 on its first attempt, and the task
    ``crash_task`` kills its process there (see `LoggedStage`).
    """

    log_path: str
    stages: int = 3
    lock_ttl: float = 60.0
    lock_skew: float = 5.0
    retry_policy: str = "NONE"
    max_attempts: int = 1
    fail_prefix: str = "fail-"
    block_task: str = ""
    block_fifo: str = ""
    crash_task: str = ""
    work: int = 0

    def __call__(self, task_id: str, io: TaskIO) -> CheckMateEngine[Any, Any]:
        stages = []
        for i in range(self.stages):
            name = f"s{i}"
            fields: dict[str, Any] = {"log_path": self.log_path, "work": self.work}
            if name == "s1" and self.fail_prefix and task_id.startswith(self.fail_prefix):
                fields["fail"] = True
            if name == "s1" and task_id == self.block_task:
                fields["block_fifo"] = self.block_fifo
            if name == "s1" and task_id == self.crash_task:
                fields["crash"] = True
            stages.append(LoggedStage(stage_name=name, state=LogState(), add=i + 1, **fields))
        engine = LoggedEngine(
            io,
            task_id=task_id,
            stage_templates=stages,
            retry_policy=RetryPolicy(self.retry_policy),
            max_attempts=self.max_attempts,
            lock_ttl=self.lock_ttl,
            lock_skew=self.lock_skew,
        )
        engine.log_path = self.log_path
        return engine


class LoggedEngine(CheckMateEngine[Any, Any]):
    """Logs ``"<task> <stage> <attempt> persisted"`` once a stage's COMPLETE is durable."""

    log_path = ""

    def state_update_hook(self, stage: Any) -> None:
        if stage.state.status is StageStatus.COMPLETE:
            append(
                self.log_path, f"{self.task_id} {stage.stage_name} {stage.state.attempts} persisted"
            )


def cli_pipeline(task_id: str, io: TaskIO) -> CheckMateEngine[Any, Any]:
    """A plain factory for the CLI, configured by the environment.

    Logs to ``$CHECKMATE_BATCH_LOG``; ``fail-*`` tasks fail; the task
    ``$CHECKMATE_BATCH_BLOCK_TASK`` blocks (see `LoggedStage`), announcing its
    pid through ``$CHECKMATE_BATCH_BLOCK_FIFO``; leases last
    ``$CHECKMATE_BATCH_LOCK_TTL`` seconds (default 60; skew: half of it).
    """
    ttl = float(os.environ.get(LOCK_TTL_ENV, "60"))
    return Pipeline(
        log_path=os.environ.get(LOG_ENV, ""),
        block_task=os.environ.get(BLOCK_TASK_ENV, ""),
        block_fifo=os.environ.get(BLOCK_FIFO_ENV, ""),
        lock_ttl=ttl,
        lock_skew=ttl / 2,
    )(task_id, io)


def set_env(name: str, value: str) -> None:
    """Set an environment variable in this process (for ``Client.run`` on Dask workers)."""
    os.environ[name] = value


not_a_factory = 42
"""For the CLI test of a FACTORY that is not callable."""


# ---------------------------------------------------------------------- log reading


def log_lines(path: str | Path) -> list[tuple[str, str, int, str]]:
    """The log as (task, stage, attempt, event) tuples."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        task, stage, attempt, event = line.split(" ")
        rows.append((task, stage, int(attempt), event))
    return rows


def runs(path: str | Path, event: str = "done") -> Counter[tuple[str, str]]:
    """How many times each (task, stage) logged ``event``."""
    return Counter((task, stage) for task, stage, _, ev in log_lines(path) if ev == event)


def expected_pairs(task_ids: list[str], stages: int = 3) -> set[tuple[str, str]]:
    """Every (task, stage) pair of the given tasks."""
    return {(task, f"s{i}") for task in task_ids for i in range(stages)}


# ---------------------------------------------------------------------- script mode


def main(argv: list[str] | None = None) -> int:
    """``python tests/batch_factories.py STORE LOG TASKS_FILE``: one batch run, on a signal.

    Imports everything, prints ``ready``, waits for a line on stdin, then
    runs the tasks on a process pool of 2 and prints the summary as JSON.
    """
    import json  # noqa: PLC0415
    import sys  # noqa: PLC0415

    import batch_factories  # noqa: PLC0415 - the factory must pickle by module name

    from checkmate import run_tasks  # noqa: PLC0415
    from checkmate.catalog import open_store  # noqa: PLC0415

    store, log, tasks_file = argv if argv is not None else sys.argv[1:]
    task_ids = Path(tasks_file).read_text().split()
    io = open_store(store)
    print("ready", flush=True)
    sys.stdin.readline()
    summary = run_tasks(batch_factories.Pipeline(log_path=log), task_ids, io, max_workers=2)
    print(json.dumps(summary.to_dicts()), flush=True)
    return 0 if summary.all_complete else 1


if __name__ == "__main__":
    raise SystemExit(main())
