"""Every example runs as a script, in a real subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_quickstart_crashes_once_resumes_and_dumps() -> None:
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "the child process exited with code 1" in out
    assert "task status found on disk: RUNNING" in out
    assert "resumed run finished: COMPLETE" in out
    assert "WordCount(words=9)" in out
    assert "# Task quickstart" in out
    assert out.count("- status: COMPLETE") == 3
    assert "\x1b" not in out  # plain text when piped
