"""A task whose first stage runs until it is canceled; a script for CLI cancel tests.

``python tests/long_task.py STORE TASK_ID READY_FILE LOG_FILE`` runs a 2-stage
task: stage ``s0`` writes READY_FILE, then polls ``self.cancel_requested()``
(the engine looks in storage at most every 0.05 s) and stops by raising
`StopRequested` once cancellation is requested. Every stage execution and
every ``cancel()`` hook is logged to LOG_FILE. Prints the task's final status.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from pipelines import AddStage, PipeState, append_line, open_store

from checkmate import CheckMateEngine, RetryPolicy, TaskEngineException

GIVE_UP_SECONDS = 60.0
"""The long stage completes on its own after this long (a test waiting for it fails)."""


class StopRequested(Exception):
    """Raised by a stage that noticed a cancellation request."""


class PollingStage(AddStage):
    """Signals READY, then works until a cancellation is requested."""

    ready_path: str = ""

    def execute_stage(self, previous_state_copy: PipeState) -> None:
        append_line(self.log_path, f"{self.stage_name} {self.state.attempts}")
        Path(self.ready_path).write_text("ready")
        deadline = time.monotonic() + GIVE_UP_SECONDS
        while time.monotonic() < deadline:
            if self.cancel_requested():
                raise StopRequested(f"{self.stage_name} stopped on request")
            time.sleep(0.01)  # a slice of "long work"
        self.state.value = previous_state_copy.value + self.add

    def cancel(self) -> None:
        append_line(self.log_path, f"cancel {self.stage_name}")


def build_engine(
    store: str, task_id: str, ready: str, log: str
) -> CheckMateEngine[AddStage, object]:
    """The long task: s0 polls for cancellation, s1 is an ordinary stage.

    Raising from a stage counts as a failed attempt, so the policy keeps an
    attempt to spare: the engine then sees the request and cancels the task.
    """
    stages = [
        PollingStage(stage_name="s0", state=PipeState(), log_path=log, ready_path=ready),
        AddStage(stage_name="s1", state=PipeState(), add=2, log_path=log),
    ]
    return CheckMateEngine(
        open_store(store),
        task_id=task_id,
        stage_templates=stages,
        retry_policy=RetryPolicy.STAGE,
        max_attempts=2,
        cancel_check_interval=0.05,
    )


def main(argv: list[str]) -> int:
    store, task_id, ready, log = argv
    try:
        status = build_engine(store, task_id, ready, log).execute()
    except TaskEngineException as exc:
        print(f"{type(exc).__name__}: {exc}")
        return 3
    print(status.value)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
