"""Cancel a long-running task from another process with the ``checkmate`` CLI.

Run it with ``python examples/cancel_from_cli.py``. It starts a worker process
(this script with ``--worker``) that runs a 3-stage task whose middle stage is
long and polls ``self.cancel_requested()``. Once that stage is running, the
script runs, as separate processes, the commands an operator would type::

    checkmate ls STORE
    checkmate cancel STORE nightly-report

``cancel`` finds the task locked by a live process, so it writes a
cancellation request. The worker's engine notices it (within
``cancel_check_interval`` seconds), the stage stops, its ``cancel()`` hook
runs, and the task ends CANCELED: the last stage never runs. Finally it
prints the task's history with ``checkmate history``.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel

from checkmate import BaseStage, BaseStageState, CheckMateEngine, LocalTaskIO

TASK_ID = "nightly-report"
WAIT_SECONDS = 60.0


class Report(BaseModel):
    """What the task produces."""

    lines: int = 0


class ReportState(BaseStageState[Report]):
    """The state every stage carries."""

    rows: int = 0
    crunched: int = 0


class Download(BaseStage[ReportState]):
    """Stage 1: quick."""

    def execute_stage(self, previous_state_copy: ReportState) -> None:
        self.state.rows = 1_000


class Crunch(BaseStage[ReportState]):
    """Stage 2: long work that checks for cancellation between chunks."""

    ready_file: str = ""

    def execute_stage(self, previous_state_copy: ReportState) -> None:
        self.state.rows = previous_state_copy.rows
        Path(self.ready_file).write_text("crunching")  # tell the demo we are running
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            if self.cancel_requested():
                # Return early: the engine sees the request, calls cancel() on
                # this stage and marks it and every later stage CANCELED.
                return
            self.state.crunched += 1
            time.sleep(0.02)  # one chunk of "work"

    def cancel(self) -> None:
        print("worker: crunch's cancel() hook ran: partial output discarded", flush=True)


class Publish(BaseStage[ReportState]):
    """Stage 3: must not run once the task is canceled."""

    def execute_stage(self, previous_state_copy: ReportState) -> None:
        print("worker: publishing (this line must not appear)", flush=True)
        self.state.result = Report(lines=previous_state_copy.rows)


def build_engine(store: str, ready_file: str) -> CheckMateEngine[BaseStage[ReportState], Report]:
    """The task: the same id and stages in every process."""
    stages: list[BaseStage[ReportState]] = [
        Download(stage_name="download", state=ReportState()),
        Crunch(stage_name="crunch", state=ReportState(), ready_file=ready_file),
        Publish(stage_name="publish", state=ReportState()),
    ]
    return CheckMateEngine(
        LocalTaskIO(store),
        task_id=TASK_ID,
        stage_templates=stages,
        cancel_check_interval=0.1,
    )


def worker(store: str, ready_file: str) -> int:
    """Run the task until it ends; print its final status."""
    status = build_engine(store, ready_file).execute()
    print(f"worker: the engine returned {status}", flush=True)
    return 0


def checkmate_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m checkmate ARGS`` as an operator would, in its own process."""
    return subprocess.run(
        [sys.executable, "-m", "checkmate", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def show(title: str, run: subprocess.CompletedProcess[str]) -> None:
    """Print a command's output, indented."""
    print(f"$ checkmate {title}   (exit code {run.returncode})")
    for line in (run.stdout + run.stderr).splitlines():
        print(f"    {line}")


def main() -> int:
    """Start the worker, cancel its task from the CLI, report."""
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        return worker(sys.argv[2], sys.argv[3])
    store = tempfile.mkdtemp(prefix="checkmate-cancel-")
    ready = Path(store) / "crunch-is-running"
    print(f"state is kept in {store}")
    print("1. start the worker process")
    child = subprocess.Popen(
        [sys.executable, __file__, "--worker", store, str(ready)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while not ready.exists():
            if child.poll() is not None or time.monotonic() > deadline:
                print("the worker did not reach the long stage")
                return 1
            time.sleep(0.02)
        print("2. the long stage 'crunch' is running; what an operator sees:")
        show(f"ls {store}", checkmate_cli("ls", store, "--no-color"))
        print("3. cancel it from another process:")
        cancel = checkmate_cli("cancel", store, TASK_ID)
        show(f"cancel {store} {TASK_ID}", cancel)
        output, _ = child.communicate(timeout=WAIT_SECONDS)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    print(f"4. the worker exited with code {child.returncode}; it printed:")
    for line in output.splitlines():
        print(f"    {line}")
    status = build_engine(store, str(ready)).status
    print(f"5. task status found in the store: {status}")
    show(f"history {store} {TASK_ID}", checkmate_cli("history", store, TASK_ID, "--no-color"))
    ok = cancel.returncode == 0 and status.value == "CANCELED" and "publishing" not in output
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
