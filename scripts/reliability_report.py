"""Run the reliability suite and write docs/reliability.md from what it measured.

Usage::

    python scripts/reliability_report.py            # CI size (about a minute)
    python scripts/reliability_report.py --full     # full size (nox -s reliability)

The suite (tests/reliability) appends one JSON line of figures per scenario
to the file named by ``CHECKMATE_RELIABILITY_FIGURES``; this script runs it
with that variable set, sums the figures, reads the test outcomes from a
JUnit XML report, and renders the page. Nothing in the table is typed by hand.
Exits with pytest's exit code.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "docs" / "reliability.md"


def run_suite(full: bool, workdir: Path, extra: list[str]) -> tuple[int, float, Path, Path]:
    """Run pytest on tests/reliability; return (exit code, seconds, figures, junit)."""
    figures = workdir / "figures.jsonl"
    junit = workdir / "junit.xml"
    env = {**os.environ, "CHECKMATE_RELIABILITY_FIGURES": str(figures)}
    if full:
        env["CHECKMATE_RELIABILITY_FULL"] = "1"
    else:
        env.pop("CHECKMATE_RELIABILITY_FULL", None)
    command = [
        sys.executable,
        "-m",
        "pytest",
        "tests/reliability",
        "-q",
        "-rfEX",
        "-p",
        "no:cacheprovider",
        f"--junitxml={junit}",
        "-o",
        "junit_family=xunit2",
        *extra,
    ]
    started = time.monotonic()
    code = subprocess.call(command, cwd=ROOT, env=env)  # noqa: S603
    return code, time.monotonic() - started, figures, junit


def read_figures(path: Path) -> tuple[Counter[str], dict[str, Counter[str]]]:
    """Sum the figures: overall, and per scenario."""
    total: Counter[str] = Counter()
    by_scenario: dict[str, Counter[str]] = defaultdict(Counter)
    if not path.exists():
        return total, by_scenario
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        scenario = entry.pop("scenario")
        entry.pop("mode", None)
        numbers = {k: int(v) for k, v in entry.items() if isinstance(v, (int, float))}
        total.update(numbers)
        by_scenario[scenario].update(numbers)
    return total, by_scenario


def read_outcomes(path: Path) -> dict[str, Any]:
    """Count the test outcomes in a JUnit XML report; list the expected failures."""
    outcomes: Counter[str] = Counter()
    xfails: dict[str, list[str]] = defaultdict(list)
    failures: list[str] = []
    if not path.exists():
        return {"counts": outcomes, "xfails": xfails, "failures": ["no JUnit report"]}
    for case in ET.parse(path).getroot().iter("testcase"):  # noqa: S314
        name = f"{case.get('classname', '')}.{case.get('name', '')}".removeprefix("tests.")
        skipped = case.find("skipped")
        if case.find("failure") is not None or case.find("error") is not None:
            outcomes["failed"] += 1
            failures.append(name)
        elif skipped is not None and skipped.get("type") == "pytest.xfail":
            outcomes["xfailed"] += 1
            reason = (skipped.get("message") or "").removeprefix("reason: ")
            xfails[reason].append(name.rpartition(".")[2])
        elif skipped is not None:
            outcomes["skipped"] += 1
        else:
            outcomes["passed"] += 1
    return {"counts": outcomes, "xfails": xfails, "failures": failures}


def machine() -> str:
    """A one-line description of the machine the suite ran on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return (
        f"{platform.system()} {platform.release()} ({platform.machine()}), {cpu}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}"
    )


def revision() -> str:
    """The git commit of the work tree, marked when it has local changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],  # noqa: S607
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "checkmate"],  # noqa: S607
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} (with uncommitted changes to checkmate/)" if dirty else head


def escape(text: str) -> str:
    """Text safe in Markdown: no raw HTML (``<task>`` would vanish), no table breaks."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "/")


def tests_list(tests: list[str]) -> str:
    """``N tests: `a`, `b`, ...`` (at most four names)."""
    names = ", ".join(f"`{t}`" for t in sorted(tests)[:4])
    more = ", ..." if len(tests) > 4 else ""
    return f"{len(tests)} test{'s' if len(tests) > 1 else ''}: {names}{more}"


def table(rows: list[tuple[str, Any, str]]) -> str:
    """A Markdown table of (figure, value, note) rows."""
    lines = ["| Figure | Value | What it counts |", "|---|---:|---|"]
    lines += [f"| {name} | {value:,} | {note} |" for name, value, note in rows]
    return "\n".join(lines)


def render(
    mode: str,
    code: int,
    seconds: float,
    total: Counter[str],
    scenarios: dict[str, Counter[str]],
    outcomes: dict[str, Any],
) -> str:
    """The Markdown page."""
    crash = scenarios.get("crash_points", Counter())
    chains = scenarios.get("crash_chains", Counter())
    fast = scenarios.get("storage_faults_fast", Counter())
    slow = scenarios.get("storage_faults_default", Counter())
    faults = fast + slow
    contention = scenarios.get("contention", Counter())
    security = scenarios.get("security", Counter())
    durability = scenarios.get("durability", Counter())
    bad = scenarios.get("bad_input", Counter())
    counts = outcomes["counts"]
    lost = total["objects_lost"]
    corrupted = total["objects_corrupted"]
    reruns = total["complete_reruns"]
    unsafe = total["ran_without_running"]
    leftovers = total["leftover_selftest_objects"] + total["orphan_takeover_markers"]
    verdict = (
        "**0 objects lost, 0 corrupted, 0 COMPLETE stages run again.**"
        if lost == corrupted == reruns == unsafe == total["bare_errors"] == leftovers == 0
        and code == 0
        else "**The suite found losses or failures: see the table and the failed tests.**"
    )
    rows = [
        (
            "Crash points exercised",
            crash["crash_points"],
            "kill before / after every mutating storage call of a clean run, 3 store kinds",
        ),
        (
            "Chained crash points",
            chains["crash_points"],
            f"{chains['chains']:,} seeded chains of 2-3 crashes, recovery runs killed too",
        ),
        (
            "Processes killed or resumed",
            crash["processes"] + chains["processes"],
            "real child processes in the crash scenarios",
        ),
        (
            "Power-cut states checked",
            durability["power_cut_states"],
            "states a power cut could leave (replayed from strace), each read and resumed",
        ),
        (
            "Seeded fault runs",
            faults["seeds"],
            f"tasks driven to COMPLETE through FaultyTaskIO at 10 % and 30 % "
            f"({faults['executions']:,} process runs)",
        ),
        ("Storage faults injected", faults["faults"], "OSError/TimeoutError, before or after"),
        (
            "Runs that gave up with StorageError",
            faults["storage_errors"],
            "each later resumed to COMPLETE",
        ),
        (
            "RUNNING checked from inside a stage",
            faults["running_checked"],
            "stage read its own object through the inner store before working",
        ),
        ("Fuzz cases tried", total["fuzz_cases"], "garbage stage and lock objects (hypothesis)"),
        (
            "Names and ids checked",
            security["names_checked"] + security["task_ids_refused"],
            "task ids / stage names: objects stay under `<task_id>/`, unsafe ids refused",
        ),
        (
            "Bad templates and values",
            bad["wrong_templates"] + bad["unserialisable_values"] + bad["interrupts"],
            "wrong templates, unserialisable state values, KeyboardInterrupt/SystemExit",
        ),
        ("Processes raced", contention["processes_raced"], "on one local store"),
        (
            "Task executions under contention",
            contention["contention_executes"],
            f"{contention['contention_tasks']:,} task ids, "
            f"{contention['contention_conflicts']:,} found held, "
            f"{contention['contention_stage_runs']:,} stage runs",
        ),
        ("**Objects lost**", lost, "a COMPLETE that disappeared or was reported but not kept"),
        ("**Objects corrupted**", corrupted, "an object that does not parse or is inconsistent"),
        ("**COMPLETE stages run again**", reruns, "from the stages' own logs"),
        ("**Stages run before their RUNNING was persisted**", unsafe, "from inside the stage"),
        (
            "**Storage errors that escaped unwrapped**",
            total["bare_errors"],
            "an OSError out of execute() instead of a StorageError",
        ),
        (
            "**Lock debris left after recovery**",
            leftovers,
            "takeover markers of crashed takers, scratch objects of crashed lease self-tests",
        ),
    ]
    bugs = "\n".join(
        f"- {escape(reason.removeprefix('engine bug: '))} ({tests_list(tests)})"
        for reason, tests in sorted(outcomes["xfails"].items())
    )
    failed = "\n".join(f"- `{name}`" for name in outcomes["failures"]) or "None."
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""# Reliability

A crash must never cost finished work or leave a task in a state nobody can
explain. The reliability suite (`tests/reliability`) breaks things on purpose,
with real processes and real stores, and this page shows what its last run
measured. It is generated by `scripts/reliability_report.py`: do not edit it
by hand.

## What is tested

- **Crash at every persistence point.** A 5-stage pipeline (one stage fails
  once, `RetryPolicy.STAGE`) runs in a child process through a crashing
  `TaskIO` over `LocalTaskIO`, `FsspecTaskIO` on `file://`, and a local store
  without compare-and-swap (plain lock objects). The child is killed just
  before, and just after, every mutating storage call of a clean run; fresh
  processes then resume the task. Seeded chains also kill the recovery runs.
  After every process: every object parses, histories are consistent and only
  grow, no COMPLETE stage runs again; at the end the result is right and no
  lock, temp file or takeover marker is left.
- **Power cuts.** A run is traced with `strace`; for every fsync and every
  time the process claims progress, the files a power cut would leave (only
  what was fsynced) are rebuilt, read by a new engine, checked against the
  claims (a started stage's RUNNING, earlier stages' COMPLETE, everything
  after `execute()` returned) and resumed.
- **Storage faults.** `FaultyTaskIO` fails 10 % or 30 % of storage calls
  (before or after they take effect). Each seeded task is run by fresh
  processes until it is COMPLETE: every run completes or raises a
  `StorageError` caused by the fault; no COMPLETE stage is lost or rerun, no
  object is unreadable, and every stage checks from inside that its RUNNING
  was persisted. Deterministic tests pin down each give-up path.
- **Temp files.** A writer SIGKILLed mid-write leaves a temp file that `list()`
  ignores and the next bind removes; temp files of live writers (and of other
  hosts) are never removed.
- **Bad input, fuzzed.** Hypothesis feeds garbage stage objects (random bytes,
  truncated JSON, wrong shapes, wrong types, unknown statuses, out-of-order
  histories, huge values) and lock objects: every case must end in a
  `TaskEngineException` and leave every object byte for byte as it was. Also
  wrong templates, unserialisable state values, KeyboardInterrupt and
  SystemExit inside a stage.
- **Contention.** 16 processes execute the same task ids in their own random
  orders, waiting for or skipping held tasks: each stage runs exactly once.
- **Security.** Hypothesis-drawn task ids and stage names never address an
  object outside `<task_id>/`; a stage object naming another class or module
  is refused without importing anything; no pickle or dynamic import.

## How to run it

```bash
nox -s reliability                      # full size; rewrites this page
python scripts/reliability_report.py    # CI size; rewrites this page
python -m pytest tests/reliability      # CI size, tests only (part of the normal suite)
CHECKMATE_RELIABILITY_FULL=1 python -m pytest tests/reliability   # full size, tests only
```

## Figures from the last run

- Date: {now}
- Machine: {machine()}
- Mode: **{mode}** (`CHECKMATE_RELIABILITY_FULL={"1" if mode == "full" else "unset"}`)
- Engine revision: {revision()}
- Tests: {counts["passed"]} passed, {counts["failed"]} failed, {counts["xfailed"]}
  expected failures (known engine bugs), {counts["skipped"]} skipped, in {seconds:.0f} s

{verdict}

{table(rows)}

### Known engine bugs

A bug the suite finds and the engine does not fix yet is pinned by a test
marked `xfail(strict=True)`, which turns the suite red the day the engine is
fixed. Open ones in this run:

{bugs or "None."}

### Failed tests

{failed}
"""


def main(argv: list[str] | None = None) -> int:
    """Run the suite, write the page, return pytest's exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="run the full-size variants")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="page to write")
    args, pytest_args = parser.parse_known_args(argv)  # the rest goes to pytest
    with tempfile.TemporaryDirectory(prefix="checkmate-reliability-") as tmp:
        code, seconds, figures, junit = run_suite(args.full, Path(tmp), pytest_args)
        total, scenarios = read_figures(figures)
        outcomes = read_outcomes(junit)
    mode = "full" if args.full else "ci"
    args.output.write_text(render(mode, code, seconds, total, scenarios, outcomes))
    print(f"wrote {args.output} ({mode} mode, pytest exit code {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
