"""examples/cancel_from_cli.py runs as a script, in a real subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_cancel_from_cli_cancels_a_running_task_from_another_process() -> None:
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / "cancel_from_cli.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "nightly-report  RUNNING  1/3     crunch" in out
    assert "(alive, " in out
    assert "cancellation requested" in out
    assert "worker: crunch's cancel() hook ran" in out
    assert "worker: the engine returned CANCELED" in out
    assert "task status found in the store: CANCELED" in out
    assert "| crunch | 1 | RUNNING → CANCELED |" in out
    assert "| publish | 0 | CREATED → CANCELED |" in out
    assert "publishing" not in out, "the last stage ran after the cancel"
    assert "\x1b" not in out
