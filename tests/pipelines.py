"""Stages shared by the test suite, also runnable as a script for subprocess tests.

As a script (``python tests/pipelines.py STORE TASK_ID [options]``) it runs a
pipeline of `AddStage`s and prints the final status; options make a stage crash
the process (``os._exit``) or fail on purpose. Its classes are then
``__main__.AddStage``, which the engine accepts as the same class as
``pipelines.AddStage``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from checkmate import (
    BaseStage,
    BaseStageState,
    CheckMateEngine,
    FsspecTaskIO,
    LocalTaskIO,
    RetryPolicy,
    TaskEngineException,
    TaskIO,
)

CRASH_EXIT_CODE = 17


class Payload(BaseModel):
    value: int = 0


class PipeState(BaseStageState[Payload]):
    value: int = 0
    rollbacks: int = 0
    note: str = ""


class AddStage(BaseStage[PipeState]):
    """Adds ``add`` to the previous stage's value.

    Config fields (from the template, never persisted state):
    ``fail_times``: raise on attempts 1..fail_times;
    ``crash_on_attempt``: ``os._exit`` on that attempt (0: never);
    ``log_path``: append ``"<stage> <attempt>\\n"`` at every execution.
    """

    add: int = 1
    fail_times: int = 0
    crash_on_attempt: int = 0
    log_path: str = ""

    def execute_stage(self, previous_state_copy: PipeState) -> None:
        attempt = self.state.attempts
        if self.log_path:
            append_line(self.log_path, f"{self.stage_name} {attempt}")
        if self.crash_on_attempt and attempt == self.crash_on_attempt:
            os._exit(CRASH_EXIT_CODE)
        self.state.note = f"attempt {attempt} was here"
        if attempt <= self.fail_times:
            raise RuntimeError(f"planned failure of {self.stage_name} on attempt {attempt}")
        self.state.value = previous_state_copy.value + self.add
        self.state.result = Payload(value=self.state.value)

    def rollback_stage(self) -> None:
        self.state.rollbacks += 1
        self.state.note = ""


def append_line(path: str, line: str) -> None:
    """Append one line durably (O_APPEND writes of one line do not interleave)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_log(path: str | Path) -> list[str]:
    """Return the lines a log file holds ([] if absent)."""
    try:
        return Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []


def make_stages(n: int = 3, **config: Any) -> list[AddStage]:
    """Return ``n`` AddStages named s0..s{n-1}; ``config`` applies to every stage.

    Per-stage config: pass ``per_stage={"s1": {"fail_times": 1}}``.
    """
    per_stage: dict[str, dict[str, Any]] = config.pop("per_stage", {})
    stages = []
    for i in range(n):
        name = f"s{i}"
        fields = {**config, **per_stage.get(name, {})}
        stages.append(AddStage(stage_name=name, state=PipeState(), add=i + 1, **fields))
    return stages


def expected_value(n: int) -> int:
    """The final value of an n-stage pipeline: 1 + 2 + ... + n."""
    return n * (n + 1) // 2


def open_store(spec: str) -> TaskIO:
    """Return a TaskIO for ``local:PATH`` or an fsspec URL."""
    if spec.startswith("local:"):
        return LocalTaskIO(spec[len("local:") :])
    return FsspecTaskIO(spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("task_id")
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--crash-stage", default="")
    parser.add_argument("--crash-attempt", type=int, default=1)
    parser.add_argument("--fail-stage", default="")
    parser.add_argument("--fail-times", type=int, default=1)
    parser.add_argument("--log", default="")
    parser.add_argument("--policy", default="NONE")
    parser.add_argument("--max-attempts", type=int, default=1)
    parser.add_argument("--strict", action="store_true")
    parser.add_argument("--lock-timeout", type=float, default=None)
    args = parser.parse_args(argv)
    per_stage: dict[str, dict[str, Any]] = {}
    if args.crash_stage:
        per_stage.setdefault(args.crash_stage, {})["crash_on_attempt"] = args.crash_attempt
    if args.fail_stage:
        per_stage.setdefault(args.fail_stage, {})["fail_times"] = args.fail_times
    engine = CheckMateEngine(
        open_store(args.store),
        task_id=args.task_id,
        stage_templates=make_stages(args.stages, log_path=args.log, per_stage=per_stage),
        retry_policy=RetryPolicy(args.policy),
        max_attempts=args.max_attempts,
        bind_lock_timeout=args.lock_timeout,
    )
    try:
        status = engine.execute(strict_recovery=args.strict)
    except TaskEngineException as exc:
        print(f"{type(exc).__name__}: {exc}")
        return 3
    print(status.value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
