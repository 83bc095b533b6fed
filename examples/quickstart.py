"""Quickstart: a 3-stage pipeline that crashes once on purpose, then resumes.

Run it with ``python examples/quickstart.py``. The first run happens in a child
process that dies inside the second stage (as a power cut or an OOM kill
would). The parent then runs the same task id again: the finished first stage
is not run again, the interrupted stage is rolled back and retried, and the
task completes. Finally it prints every stage with ``dump_stages``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from colorama import Fore
from pydantic import BaseModel, Field

from checkmate import BaseStage, BaseStageState, CheckMateEngine, LocalTaskIO, RetryPolicy

TASK_ID = "quickstart"


class WordCount(BaseModel):
    """What the pipeline produces."""

    words: int = 0


class DocState(BaseStageState[WordCount]):
    """The state every stage carries; the engine persists it at each step."""

    text: str = ""
    words: list[str] = Field(default_factory=list)


class Fetch(BaseStage[DocState]):
    """Stage 1: get a document."""

    def execute_stage(self, previous_state_copy: DocState) -> None:
        self.state.text = "the quick brown fox jumps over the lazy dog"


class Split(BaseStage[DocState]):
    """Stage 2: split it into words; crashes the process when ``crash`` is set."""

    crash: bool = False

    def execute_stage(self, previous_state_copy: DocState) -> None:
        if self.crash:
            os._exit(1)  # the process dies here, with no chance to clean up
        self.state.text = previous_state_copy.text
        self.state.words = previous_state_copy.text.split()

    def rollback_stage(self) -> None:
        self.state.words = []


class Count(BaseStage[DocState]):
    """Stage 3: count the words."""

    def execute_stage(self, previous_state_copy: DocState) -> None:
        self.state.words = previous_state_copy.words
        self.state.result = WordCount(words=len(previous_state_copy.words))


def build_engine(store: str, crash: bool) -> CheckMateEngine[BaseStage[DocState], WordCount]:
    """The pipeline: the same task id and stages in every run."""
    stages: list[BaseStage[DocState]] = [
        Fetch(stage_name="fetch", state=DocState()),
        Split(stage_name="split", state=DocState(), crash=crash),
        Count(stage_name="count", state=DocState()),
    ]
    return CheckMateEngine(
        LocalTaskIO(store),
        task_id=TASK_ID,
        stage_templates=stages,
        retry_policy=RetryPolicy.STAGE,
        max_attempts=2,
    )


def main() -> int:
    """Crash once in a child process, resume here, print the stages."""
    if len(sys.argv) == 3 and sys.argv[1] == "--crashing-run":
        build_engine(sys.argv[2], crash=True).execute()
        return 0  # never reached: the stage kills the process
    store = tempfile.mkdtemp(prefix="checkmate-quickstart-")
    print(f"state is kept in {store}")
    print("1. first run, in a child process that dies inside stage 'split'")
    child = subprocess.run([sys.executable, __file__, "--crashing-run", store], check=False)
    print(f"   the child process exited with code {child.returncode}")
    engine = build_engine(store, crash=False)
    print(f"2. task status found on disk: {engine.status}")
    status = engine.execute(strict_recovery=True)
    print(f"3. resumed run finished: {status}, result: {engine.task_result!r}")
    print()
    color = Fore.LIGHTWHITE_EX if sys.stdout.isatty() else ""  # plain text when piped
    with engine:
        print(engine.dump_stages(basenames_only=True, color=color))
    return 0 if status.value == "COMPLETE" else 1


if __name__ == "__main__":
    sys.exit(main())
