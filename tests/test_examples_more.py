"""The examples etl_retry_rollback.py, object_storage.py and inspect_in_tests.py, run as scripts.

Each runs in a real subprocess, as a user would run it, and its output is
checked. Temporary directories of the examples go below the test's tmp_path
(through TMPDIR). The object-store example also runs against each emulator.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import emulators
import pytest
from conftest import EMULATED, backend_params, emulator_root

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def run(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python ARGS`` from the repository root, with TMPDIR below ``tmp_path``."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmp)}
    env.pop("NO_COLOR", None)
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
        env=env,
    )


def checkmate_ls(store: str, *options: str, tmp_path: Path) -> list[dict[str, object]]:
    """``checkmate ls STORE --json`` in its own process."""
    done = run("-m", "checkmate", "ls", store, "--json", *options, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    tasks: list[dict[str, object]] = json.loads(done.stdout)
    return tasks


# ---------------------------------------------------------------- etl_retry_rollback.py


def test_etl_retry_rollback_undoes_partial_output_and_retries(tmp_path: Path) -> None:
    done = run(str(EXAMPLES / "etl_retry_rollback.py"), tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    lines = out.splitlines()
    # the failed attempt is rolled back (its two part files removed) before RETRY is persisted
    rollback = lines.index("   transform.rollback_stage(): removed part-000.csv, part-001.csv")
    assert lines[rollback - 1] == "   transform CREATED -> RUNNING: attempt 1 started"
    assert lines[rollback + 1].startswith(
        "   transform RUNNING -> RETRY: attempt 1 failed: "
        "ConnectionError('upstream closed the connection after part 2'); will retry"
    )
    assert "   transform RUNNING -> COMPLETE: attempt 2 completed" in lines
    assert "   load      RUNNING -> COMPLETE: attempt 1 completed" in lines
    assert (
        "the engine returned COMPLETE; result: Summary(parts=4, rows=12, total_cents=97500)" in out
    )
    assert "output files: part-000.csv, part-001.csv, part-002.csv, part-003.csv" in out
    assert "transform ran 2 times" in out
    assert "# Task orders-2026-11-22" in out
    assert out.count("- status: COMPLETE") == 3
    assert "- object: transform.json" in out
    assert "\x1b" not in out  # plain text when piped

    # What the example left on disk is a COMPLETE task, as the CLI sees it.
    match = re.search(r"state is kept in (\S+), output goes to (\S+)", out)
    assert match is not None
    store, output = Path(match[1]), Path(match[2])
    assert store.is_relative_to(tmp_path)
    assert sorted(p.name for p in (output / "parts").iterdir()) == [
        f"part-{n:03d}.csv" for n in range(4)
    ]
    (task,) = checkmate_ls(str(store), tmp_path=tmp_path)
    assert (task["task_id"], task["status"], task["attempts"]) == (
        "orders-2026-11-22",
        "COMPLETE",
        4,
    )


# ---------------------------------------------------------------- object_storage.py


def check_object_storage_output(out: str) -> str:
    """Check the example's story; return the task id it used."""
    match = re.search(r"1\. run task (orders-[0-9a-f]{8});", out)
    assert match is not None, out
    task_id = match[1]
    assert "atomic create: True, compare-and-swap: True" in out
    assert "transform.rollback_stage(): deleted 2 partial part(s)" in out
    assert "load      RUNNING -> RETRY: attempt 1 interrupted by KeyboardInterrupt" in out
    assert "KeyboardInterrupt: the worker stopped" in out
    assert "status found in the store: RETRY" in out
    resumed = out.split("2. a new engine resumes", 1)[1].split("3. $ checkmate ls", 1)[0]
    changes = [line for line in resumed.splitlines() if " -> " in line]
    assert changes == [  # only load runs again
        "   load      RETRY -> RUNNING: attempt 1 started",
        "   load      RUNNING -> COMPLETE: attempt 1 completed",
    ]
    assert "the engine returned COMPLETE" in resumed
    assert "attempts per stage: {'extract': 1, 'transform': 2, 'load': 1}" in out
    assert f"exports/{task_id}/part-003.csv" in out
    assert re.search(rf"^{task_id}\s+COMPLETE\s+3/3\s+-\s+4\s", out, re.MULTILINE), out
    assert "| load | 1 | RUNNING → RETRY | " in out
    assert "\x1b" not in out
    return task_id


def test_object_storage_runs_on_memory_by_default(tmp_path: Path) -> None:
    done = run(str(EXAMPLES / "object_storage.py"), tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "store: FsspecTaskIO('memory://checkmate-example-" in done.stdout
    task_id = check_object_storage_output(done.stdout)
    assert f"5. deleted task {task_id} and its output" in done.stdout


def test_object_storage_keeps_the_task_for_the_cli_with_keep(tmp_path: Path) -> None:
    url = (tmp_path / "bucket").as_uri()
    done = run(str(EXAMPLES / "object_storage.py"), url, "--keep", tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    task_id = check_object_storage_output(done.stdout)
    assert "5. deleted" not in done.stdout
    (task,) = checkmate_ls(url, tmp_path=tmp_path)
    assert (task["task_id"], task["status"]) == (task_id, "COMPLETE")
    parts = sorted(p.name for p in (tmp_path / "bucket" / "exports" / task_id).iterdir())
    assert parts == ["part-000.csv", "part-001.csv", "part-002.csv", "part-003.csv"]


@pytest.mark.parametrize("kind", backend_params(EMULATED))
def test_object_storage_on_an_emulated_object_store(kind: str, tmp_path: Path) -> None:
    url = emulator_root(kind, tmp_path)
    options = [
        f"--storage-option={key}={json.dumps(value)}"
        for key, value in emulators.get(kind).storage_options().items()
    ]
    done = run(str(EXAMPLES / "object_storage.py"), url, *options, tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"store: FsspecTaskIO('{url}')" in done.stdout
    task_id = check_object_storage_output(done.stdout)
    assert f"5. deleted task {task_id} and its output" in done.stdout
    assert checkmate_ls(url, *options, tmp_path=tmp_path) == []  # nothing left behind


def test_object_storage_rejects_a_malformed_storage_option(tmp_path: Path) -> None:
    done = run(str(EXAMPLES / "object_storage.py"), "-o", "no-equals-sign", tmp_path=tmp_path)
    assert done.returncode == 2
    assert "invalid storage option 'no-equals-sign': use KEY=VALUE" in done.stderr


# ---------------------------------------------------------------- inspect_in_tests.py

INSPECT_TESTS = [
    "test_a_failed_attempt_is_rolled_back_and_recorded",
    "test_a_stage_out_of_attempts_fails_the_task",
    "test_check_sync_notices_state_that_was_not_persisted",
    "test_memory_and_persistence_dumps_are_identical",
    "test_pipeline_completes_and_persists_every_stage",
    "test_the_pipeline_survives_a_flaky_store",
]


def test_inspect_in_tests_runs_as_a_script(tmp_path: Path) -> None:
    done = run(str(EXAMPLES / "inspect_in_tests.py"), tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == [
        *(f"{name}: ok" for name in INSPECT_TESTS),
        f"ok: {len(INSPECT_TESTS)} tests passed",
    ]


def test_inspect_in_tests_runs_under_pytest(tmp_path: Path) -> None:
    done = run(
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-v",
        str(EXAMPLES / "inspect_in_tests.py"),
        tmp_path=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for name in INSPECT_TESTS:
        assert f"inspect_in_tests.py::{name} PASSED" in done.stdout
    assert f"{len(INSPECT_TESTS)} passed" in done.stdout
