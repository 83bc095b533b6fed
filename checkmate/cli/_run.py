"""``checkmate run``: import the user's engine factory and run a batch of tasks."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

from .._progress import ProgressDisplay, is_terminal
from ..batch import BatchInterrupted, BatchSummary, EngineFactory, run_tasks
from ..catalog import open_store
from ._output import (
    EXIT_INCOMPLETE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    Output,
    UsageError,
    format_duration,
    table,
)

__all__ = [
    "cmd_run",
]


def _load_factory(spec: str) -> EngineFactory:
    """Import ``MODULE:FACTORY`` (the current directory is searched first, as with -m)."""
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise UsageError(f"invalid factory {spec!r}: use MODULE:FACTORY, such as jobs:build")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise UsageError(
            f"cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    for attr in attr_path.split("."):
        try:
            target = getattr(target, attr)
        except AttributeError:
            raise UsageError(f"module {module_name!r} has no {attr_path!r}") from None
    if not callable(target):
        raise UsageError(
            f"{spec} is a {type(target).__name__}, not a factory(task_id, io) -> CheckMateEngine"
        )
    factory: EngineFactory = target
    return factory


def _read_task_ids(source: str) -> list[str]:
    """One task id per line; blank lines and ``#`` comments are skipped."""
    if source == "-":
        text = sys.stdin.read()
    else:
        try:
            text = Path(source).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read the tasks file {source!r}: {exc}") from exc
    ids = []
    for line in text.splitlines():
        task_id = line.split("#", 1)[0].strip()
        if task_id:
            ids.append(task_id)
    return ids


@contextlib.contextmanager
def _dask_executor(address: str) -> Iterator[Executor]:
    try:
        # Imported by name: an optional extra, untyped for mypy either way.
        distributed: Any = importlib.import_module("distributed")
    except ImportError as exc:
        raise UsageError(
            "--dask needs the distributed package: pip install 'checkmate-engine[dask]'"
        ) from exc
    client = distributed.Client(address, set_as_default=False)
    try:
        yield client.get_executor()
    finally:
        client.close()


def cmd_run(args: argparse.Namespace, out: Output) -> int:
    """``checkmate run``: run the listed tasks with the user's factory; the exit code."""
    if args.dask is not None and args.workers is not None:
        raise UsageError("--workers and --dask exclude each other (the cluster has its workers)")
    factory = _load_factory(args.factory)
    task_ids = _read_task_ids(args.tasks)
    io = open_store(args.store, dict(getattr(args, "storage_options", [])))
    progress: ProgressDisplay | bool = False
    if is_terminal(sys.stderr):
        color = not getattr(args, "no_color", False) and not os.environ.get("NO_COLOR")
        progress = ProgressDisplay(sys.stderr, color=color)
    options: dict[str, Any] = {
        "strict_recovery": args.strict_recovery,
        "hold_timeout": args.hold_timeout,
        "progress": progress,
    }
    interrupted = False
    with contextlib.ExitStack() as stack:
        if args.dask is not None:
            options["executor"] = stack.enter_context(_dask_executor(args.dask))
        else:
            options["max_workers"] = args.workers
        try:
            summary = run_tasks(factory, task_ids, io, **options)
        except BatchInterrupted as exc:
            summary, interrupted = exc.summary, True
    _print_summary(summary, out)
    if interrupted:
        left = len(summary.not_complete)
        out.error(f"interrupted: {left} task(s) not COMPLETE; run the same command to resume")
        return EXIT_INTERRUPTED
    return EXIT_OK if summary.all_complete else EXIT_INCOMPLETE


def _print_summary(summary: BatchSummary, out: Output) -> None:
    if out.as_json:
        out.json(summary.to_dicts())
        return
    header = ["TASK", "STATUS", "OUTCOME", "ATTEMPTS", "TIME", "ERROR"]
    rows = []
    for result in summary:
        error = " ".join((result.error or "-").split())
        rows.append(
            [
                result.task_id,
                result.status.value if result.status is not None else "-",
                result.outcome.value,
                str(result.attempts),
                format_duration(result.run_seconds),
                error if len(error) <= 100 else error[:99] + "…",
            ]
        )
    if rows:
        table(out, header, rows, status_col=1)
    out.line(summary.describe())
