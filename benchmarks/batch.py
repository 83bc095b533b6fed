"""Benchmark of the batch runner (`checkmate.run_tasks`); prints Markdown tables.

1. Throughput: 1,000 tasks of 3 CPU-bound stages (5 ms of CPU each by default;
   ``--stage-ms 5 10`` for more) on the runner's own pool of 1 and of 2 workers: tasks per
   second and the speedup, next to the machine's own ceiling (how two plain
   CPU-burning processes scale at that moment).
2. The runner's own overhead per task: tasks of 3 empty stages run by
   ``engine.execute()`` in a plain loop, then by `run_tasks` on a thread pool
   of 1 and on a process pool of 1 worker.

The store is a `LocalTaskIO` on ``/dev/shm`` (tmpfs) when there is one, so
that the disk's fsync latency does not hide the CPU-bound work (``--disk``
puts it in the temp directory instead).

Run: ``python benchmarks/batch.py [--tasks 1000] [--stage-ms 5 10] [--disk]``.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from checkmate import BaseStage, BaseStageState, CheckMateEngine, LocalTaskIO, TaskIO, run_tasks
from checkmate.batch import default_worker_count

STAGES = 3
ROUNDS_ENV = "CHECKMATE_BENCH_ROUNDS"


class Out(BaseModel):
    digest: str = ""


class BenchState(BaseStageState[Out]):
    digest: str = ""


class BenchStage(BaseStage[BenchState]):
    """Chains ``rounds`` SHA-256 digests (pure CPU, holds the GIL)."""

    rounds: int = 0

    def execute_stage(self, previous_state_copy: BenchState) -> None:
        digest = (previous_state_copy.digest or self.state.task_id).encode()
        for _ in range(self.rounds):
            digest = hashlib.sha256(digest).digest()
        self.state.digest = digest.hex()
        self.state.result = Out(digest=self.state.digest)


def build(task_id: str, io: TaskIO, rounds: int) -> CheckMateEngine[Any, Any]:
    stages = [
        BenchStage(stage_name=f"s{i}", state=BenchState(), rounds=rounds) for i in range(STAGES)
    ]
    return CheckMateEngine(io, task_id=task_id, stage_templates=stages)


def cpu_factory(task_id: str, io: TaskIO) -> CheckMateEngine[Any, Any]:
    """Stages of ``$CHECKMATE_BENCH_ROUNDS`` digests each (set before the pool starts)."""
    return build(task_id, io, int(os.environ.get(ROUNDS_ENV, "0")))


def empty_factory(task_id: str, io: TaskIO) -> CheckMateEngine[Any, Any]:
    """Stages that do nothing: what is left is the engine's and the runner's cost."""
    return build(task_id, io, 0)


def burn(rounds: int, go: Any = None, out: Any = None) -> None:
    if go is not None:
        go.wait()
    began = time.time()
    digest = b"x"
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    if out is not None:
        out.put((began, time.time()))


def machine_scaling(rounds: int) -> float:
    """How two plain processes burning CPU scale here (the ceiling for 2 workers)."""
    context = multiprocessing.get_context("spawn")
    began = time.perf_counter()
    burn(rounds)
    one = time.perf_counter() - began
    go, out = context.Event(), context.Queue()
    procs = [context.Process(target=burn, args=(rounds, go, out)) for _ in range(2)]
    for proc in procs:
        proc.start()
    go.set()
    spans = [out.get() for _ in procs]
    for proc in procs:
        proc.join()
    both = max(end for _, end in spans) - min(start for start, _ in spans)
    return 2 * one / both


def calibrate(stage_ms: float) -> int:
    """The number of digests that takes ``stage_ms`` milliseconds here."""
    probe = 200_000
    best = float("inf")
    for _ in range(3):
        began = time.perf_counter()
        digest = b"x"
        for _ in range(probe):
            digest = hashlib.sha256(digest).digest()
        best = min(best, time.perf_counter() - began)
    return max(1, round(probe * stage_ms / 1000 / best))


@contextmanager
def store_dir(disk: bool) -> Iterator[str]:
    base = None if disk or not Path("/dev/shm").is_dir() else "/dev/shm"
    path = tempfile.mkdtemp(prefix="checkmate-bench-", dir=base)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def timed(func: Callable[[], Any]) -> tuple[float, Any]:
    began = time.perf_counter()
    value = func()
    return time.perf_counter() - began, value


def ids(n: int) -> list[str]:
    return [f"task-{i:05d}" for i in range(n)]


def throughput(bench: Any, tasks: int, workers: int, disk: bool) -> float:
    with store_dir(disk) as root:
        seconds, summary = timed(
            lambda: run_tasks(bench.cpu_factory, ids(tasks), LocalTaskIO(root), max_workers=workers)
        )
    assert summary.all_complete, summary.describe()
    return seconds


def overhead(bench: Any, tasks: int, disk: bool, repeat: int) -> dict[str, float]:
    """Median seconds: ``tasks`` empty tasks in a plain loop, on a thread pool of 1, on a
    process pool of 1; and a 1-task batch on a process pool of 1 (its start-up)."""

    def loop(root: str, n: int) -> None:
        io = LocalTaskIO(root)
        for task_id in ids(n):
            bench.empty_factory(task_id, io).execute()

    def threads(root: str, n: int) -> None:
        with ThreadPoolExecutor(1) as pool:
            summary = run_tasks(bench.empty_factory, ids(n), LocalTaskIO(root), executor=pool)
        assert summary.all_complete

    def processes(root: str, n: int) -> None:
        summary = run_tasks(bench.empty_factory, ids(n), LocalTaskIO(root), max_workers=1)
        assert summary.all_complete

    plan: list[tuple[str, Callable[[str, int], None], int]] = [
        ("loop", loop, tasks),
        ("threads", threads, tasks),
        ("processes", processes, tasks),
        ("start", processes, 1),
    ]
    results: dict[str, list[float]] = {name: [] for name, _, _ in plan}
    for _ in range(repeat):
        for name, func, n in plan:
            with store_dir(disk) as root:
                results[name].append(timed(lambda f=func, r=root, k=n: f(r, k))[0])
    return {name: statistics.median(values) for name, values in results.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument(
        "--stage-ms",
        type=float,
        nargs="+",
        default=[5.0],
        help="CPU time of one stage; each value is one throughput run",
    )
    parser.add_argument("--overhead-tasks", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--disk", action="store_true", help="store on disk, not on /dev/shm")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import batch as bench  # noqa: PLC0415 - by module name, so workers can import it

    store = "disk (temp dir)" if args.disk or not Path("/dev/shm").is_dir() else "tmpfs"
    print(
        f"Python {platform.python_version()}, {default_worker_count()} CPUs, "
        f"LocalTaskIO on {store}; {args.tasks} tasks of {STAGES} CPU-bound stages "
        "(chained SHA-256) on the runner's own process pool\n"
    )
    print("| stage CPU | workers | seconds | tasks/s | speedup | machine ceiling |")
    print("|---:|---:|---:|---:|---:|---:|")
    for stage_ms in args.stage_ms:
        rounds = calibrate(stage_ms)
        os.environ[ROUNDS_ENV] = str(rounds)  # the spawned workers inherit it
        ceiling = machine_scaling(rounds * 100)
        one = throughput(bench, args.tasks, 1, args.disk)
        two = throughput(bench, args.tasks, 2, args.disk)
        rate_one, rate_two = args.tasks / one, args.tasks / two
        print(f"| {stage_ms:g} ms | 1 | {one:.2f} | {rate_one:.1f} | 1.00x | |")
        print(
            f"| {stage_ms:g} ms | 2 | {two:.2f} | {rate_two:.1f} | {one / two:.2f}x "
            f"| {ceiling:.2f}x |"
        )
    print(
        "\nMachine ceiling: how two plain processes burning the same CPU scale on this "
        "machine at that moment (below 2 when other load shares the CPUs).\n"
    )

    n = args.overhead_tasks
    times = overhead(bench, n, args.disk, args.repeat)
    per_task = times["loop"] / n
    thread_extra = times["threads"] / n - per_task
    # The process pool's start-up is paid once per batch; per task is what is left.
    process_extra = (times["processes"] - times["start"]) / (n - 1) - per_task
    startup = times["start"] - per_task
    print(f"Overhead: {n} tasks of {STAGES} empty stages, median of {args.repeat} runs\n")
    print("| how | seconds | ms per task | runner overhead per task |")
    print("|---|---:|---:|---:|")
    print(f"| `engine.execute()` in a loop | {times['loop']:.2f} | {per_task * 1e3:.3f} | - |")
    print(
        f"| `run_tasks`, thread pool of 1 | {times['threads']:.2f} | "
        f"{times['threads'] / n * 1e3:.3f} | {thread_extra * 1e3:.3f} ms |"
    )
    print(
        f"| `run_tasks`, process pool of 1 | {times['processes']:.2f} | "
        f"{times['processes'] / n * 1e3:.3f} | {process_extra * 1e3:.3f} ms "
        f"(+ {startup:.2f} s pool start-up per batch) |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
