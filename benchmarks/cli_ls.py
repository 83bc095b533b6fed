"""Benchmark: ``checkmate ls`` on a store of 10,000 tasks (not a test).

Run it with ``python benchmarks/cli_ls.py [--tasks N] [--repeat R]``.

It runs one real 3-stage task with the engine, then copies its objects (3
stage objects, plus the released lease object on stores with leases) as the
template of N tasks (only the task id changes), written with
``TaskIO.write`` into a local directory and into ``memory://``. It checks that
a copy is a valid task for the real engine, then times ``checkmate ls``:

- in-process (``checkmate.cli.main``, output to a buffer), on both stores;
- as a subprocess (``python -m checkmate ls STORE``, output piped), on the
  local store (a memory store does not cross processes).

The storage calls are counted by wrapping the store's TaskIO while the
catalog scan ``ls`` performs runs: one ``list`` and one ``read_many``. It
prints a Markdown table; each time is the best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import contextlib
import io as std_io
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydantic import BaseModel

from checkmate import (
    BaseStage,
    BaseStageState,
    CheckMateEngine,
    FsspecTaskIO,
    LocalTaskIO,
    StageStatus,
    TaskIO,
)
from checkmate.catalog import scan_store
from checkmate.cli import main as cli_main

TEMPLATE_ID = "template-task"


class Rows(BaseModel):
    rows: int = 0


class BenchState(BaseStageState[Rows]):
    rows: int = 0
    source: str = ""


class Step(BaseStage[BenchState]):
    def execute_stage(self, previous_state_copy: BenchState) -> None:
        self.state.rows = previous_state_copy.rows + 10
        self.state.source = "s3://bucket/input.csv"
        self.state.result = Rows(rows=self.state.rows)


def stages() -> list[Step]:
    return [Step(stage_name=name, state=BenchState()) for name in ("extract", "transform", "load")]


class CountingIO(TaskIO):
    """Counts the TaskIO calls made on a real store."""

    def __init__(self, inner: TaskIO) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()
        self.supports_atomic_create = inner.supports_atomic_create

    def read(self, obj_name: str) -> bytes:
        self.calls["read"] += 1
        return self.inner.read(obj_name)

    def write(self, obj_name: str, data: bytes) -> None:
        self.calls["write"] += 1
        self.inner.write(obj_name, data)

    def create(self, obj_name: str, data: bytes) -> bool:
        self.calls["create"] += 1
        return self.inner.create(obj_name, data)

    def delete(self, obj_name: str) -> None:
        self.calls["delete"] += 1
        self.inner.delete(obj_name)

    def list(self, prefix: str = "") -> list[str]:
        self.calls["list"] += 1
        return self.inner.list(prefix)

    def url(self, obj_name: str) -> str:
        return self.inner.url(obj_name)

    def exists(self, obj_name: str) -> bool:
        self.calls["exists"] += 1
        return self.inner.exists(obj_name)

    def read_many(self, obj_names: Iterable[str]) -> dict[str, bytes]:
        self.calls["read_many"] += 1
        return self.inner.read_many(obj_names)


def template_objects() -> dict[str, bytes]:
    """Run one real task; return its objects (stages, and its released lease if any)."""
    with tempfile.TemporaryDirectory() as tmp:
        io = LocalTaskIO(tmp)
        engine = CheckMateEngine(io, task_id=TEMPLATE_ID, stage_templates=stages())
        assert engine.execute() is StageStatus.COMPLETE
        return {n.partition("/")[2]: io.read(n) for n in io.list(f"{TEMPLATE_ID}/")}


def populate(io: TaskIO, count: int, template: dict[str, bytes]) -> None:
    """Write ``count`` COMPLETE tasks (the template with another task id) with io.write."""
    needle = f'"task_id":"{TEMPLATE_ID}"'.encode()
    # Stage objects name their task once; a released lease object (on stores
    # with leases) names none and is copied as it is.
    assert all(data.count(needle) == 1 for b, data in template.items() if b.endswith(".json"))

    def write_task(index: int) -> None:
        task_id = f"task-{index:06d}"
        replacement = f'"task_id":"{task_id}"'.encode()
        for base, data in template.items():
            io.write(f"{task_id}/{base}", data.replace(needle, replacement))

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(write_task, range(count)))
    if isinstance(io, LocalTaskIO):  # as the engine leaves finished tasks: checkpointed
        io.sync("")
        io.flush()
    check = CheckMateEngine(io, task_id=f"task-{count - 1:06d}", stage_templates=stages())
    assert check.status is StageStatus.COMPLETE, "the copied objects are not a valid task"


def best_of(repeat: int, func: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return min(times)


def ls_in_process(store: str, expected: int) -> None:
    buffer = std_io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = cli_main(["ls", store])
    assert code == 0
    assert buffer.getvalue().count("\n") == expected + 1  # header + one line per task


def ls_subprocess(store: str, expected: int) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "checkmate", "ls", store],
        capture_output=True,
        text=True,
        check=True,
    )
    assert run.stdout.count("\n") == expected + 1


def storage_calls(io: TaskIO, expected: int) -> int:
    counting = CountingIO(io)
    assert len(scan_store(counting)) == expected
    return sum(counting.calls.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    count = args.tasks
    template = template_objects()
    rows = []
    with tempfile.TemporaryDirectory(prefix="checkmate-bench-") as tmp:
        local_dir = str(Path(tmp) / "store")
        local = LocalTaskIO(local_dir)
        memory_url = f"memory://checkmate-bench/{uuid.uuid4().hex}"
        memory = FsspecTaskIO(memory_url)
        for label, io in (("local", local), ("memory://", memory)):
            start = time.perf_counter()
            populate(io, count, template)
            print(f"built {count} tasks in {label} in {time.perf_counter() - start:.1f}s")
        local_calls = storage_calls(local, count)
        memory_calls = storage_calls(memory, count)
        seconds = best_of(args.repeat, lambda: ls_in_process(local_dir, count))
        rows.append(("local directory", "in-process `main()`", local_calls, seconds))
        seconds = best_of(args.repeat, lambda: ls_subprocess(local_dir, count))
        rows.append(("local directory", "subprocess `python -m checkmate`", local_calls, seconds))
        seconds = best_of(args.repeat, lambda: ls_in_process(memory_url, count))
        rows.append(("memory://", "in-process `main()`", memory_calls, seconds))
        # The memory store dies with this process (fsspec's recursive rm of
        # 30,000 memory objects alone would take minutes).
    print()
    print(f"`checkmate ls` on {count:,} tasks of 3 stages (best of {args.repeat})")
    print()
    print("| store | run | tasks | storage calls | seconds |")
    print("|---|---|---:|---:|---:|")
    for store, run, calls, seconds in rows:
        print(f"| {store} | {run} | {count:,} | {calls} | {seconds:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
