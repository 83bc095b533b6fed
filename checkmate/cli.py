"""The ``checkmate`` command: inspect, cancel, unlock and clean tasks in any store; run batches.

Run ``checkmate --help`` (or ``python -m checkmate --help``). The inspection
commands read tasks generically (see `checkmate.catalog`) and never import the
user's code; ``checkmate run MODULE:FACTORY`` imports the user's factory and
runs a list of tasks with `checkmate.run_tasks`.

Exit codes: 0 ok, 1 task or stage not found, 2 usage error, 3 refused (the
task is locked or in a state that forbids the operation), 4 failure (storage
error, unreadable object). ``run`` exits 0 when every task is COMPLETE, 1
otherwise, and 130 when interrupted. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, NoReturn, TextIO

import colorama
from colorama import Fore, Style

from . import __version__
from ._progress import ProgressDisplay, is_terminal
from .batch import BatchInterrupted, BatchSummary, EngineFactory, run_tasks
from .cancellation import request_cancel
from .catalog import (
    LockInfo,
    LockRefusedError,
    LockState,
    TaskNotFoundError,
    TaskRecord,
    cancel_task,
    delete_task,
    history_rows,
    load_task,
    open_store,
    remove_lock,
    render_task,
    scan_store,
)
from .errors import BindException, ConfigurationError, TaskEngineException, TaskStateError
from .models import StageStatus
from .storage import LocalTaskIO, TaskIO

__all__ = [
    "EXIT_FAILED",
    "EXIT_INCOMPLETE",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_USAGE",
    "build_parser",
    "main",
    "parse_age",
]

EXIT_OK = 0
"""Success."""
EXIT_NOT_FOUND = 1
"""The task or stage does not exist."""
EXIT_USAGE = 2
"""The command line is invalid."""
EXIT_REFUSED = 3
"""Refused: the task is locked, or its state forbids the operation."""
EXIT_FAILED = 4
"""The store failed, or an object cannot be read."""
EXIT_INCOMPLETE = 1
"""``run``: not every task is COMPLETE."""
EXIT_INTERRUPTED = 130
"""Interrupted with Ctrl-C."""

PROG = "checkmate"
INVALID = "INVALID"
"""Shown as the status of a task whose objects cannot be read reliably."""

_STATUS_COLORS = {
    StageStatus.COMPLETE.value: Fore.GREEN,
    StageStatus.ERROR.value: Fore.RED,
    StageStatus.RUNNING.value: Fore.CYAN,
    StageStatus.RETRY.value: Fore.YELLOW,
    StageStatus.CANCELED.value: Fore.MAGENTA,
    StageStatus.CREATED.value: Fore.WHITE,
    StageStatus.UNBOUND.value: Fore.WHITE,
    INVALID: Fore.RED + Style.BRIGHT,
}
_AGE_RE = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class _UsageError(Exception):
    """A command-line error: reported on one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see '{self.prog} --help')")


# ---------------------------------------------------------------------- output


class _Output:
    """Every byte the CLI prints goes through here."""

    def __init__(self, color: bool, as_json: bool) -> None:
        self.color = color
        self.as_json = as_json

    @staticmethod
    def _emit(stream: TextIO, text: str) -> None:
        try:
            stream.write(text)
        except UnicodeEncodeError:
            encoding = stream.encoding or "ascii"
            stream.write(text.encode(encoding, "backslashreplace").decode(encoding))
        stream.flush()

    def write(self, text: str) -> None:
        """Write ``text`` to stdout as it is."""
        self._emit(sys.stdout, text)

    def line(self, text: str = "") -> None:
        """Write one line to stdout."""
        self.write(text + "\n")

    def json(self, data: Any) -> None:
        """Write ``data`` to stdout as indented JSON."""
        self.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")

    def error(self, text: str) -> None:
        """Write one error line to stderr."""
        self._emit(sys.stderr, f"{PROG}: {' '.join(text.split())}\n")

    def status(self, status: str, width: int = 0) -> str:
        """Return a status name padded to ``width``, coloured when colour is on."""
        padded = status.ljust(width)
        if not self.color:
            return padded
        return f"{_STATUS_COLORS.get(status, '')}{padded}{Style.RESET_ALL}"


# ---------------------------------------------------------------------- formatting


def parse_age(text: str) -> timedelta:
    """Parse an age such as ``7d``, ``12h``, ``30m``, ``45s``, ``2w`` or ``1d12h``.

    Raises:
        argparse.ArgumentTypeError: The text is not an age.
    """
    compact = text.strip().lower()
    if not compact or _AGE_RE.sub("", compact):
        raise argparse.ArgumentTypeError(
            f"invalid age {text!r}: use a number and a unit s, m, h, d or w, such as 7d or 12h"
        )
    seconds = sum(float(n) * _AGE_UNITS[unit] for n, unit in _AGE_RE.findall(compact))
    return timedelta(seconds=seconds)


def _format_age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def _format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.3f}s"
    return _format_age(seconds)


def _format_time(text: str | None) -> str:
    if text is None:
        return "-"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return text
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status_name(record: TaskRecord) -> str:
    status = record.status
    return INVALID if status is None else status.value


def _lock_json(lock: LockInfo | None, now: datetime) -> dict[str, Any] | None:
    if lock is None or lock.state is LockState.RELEASED:
        return None
    owner = lock.owner
    lease = None
    if lock.expires_at is not None:
        lease = {
            "epoch": lock.epoch,
            "expires_at": datetime.fromtimestamp(lock.expires_at, timezone.utc).isoformat(),
            "expires_in_seconds": lock.expires_in(now.timestamp()),
        }
    return {
        "holder": lock.holder() if owner is not None else None,
        "host": owner.host if owner is not None else None,
        "pid": owner.pid if owner is not None else None,
        "state": lock.state.value,
        "held": lock.held,
        "acquired_at": owner.acquired_at if owner is not None else None,
        "age_seconds": lock.age_seconds(now),
        "lease": lease,
    }


def _lock_text(lock: LockInfo | None, now: datetime) -> str:
    if lock is None or lock.state is LockState.RELEASED:
        return "-"
    if lock.owner is None:
        return "unreadable lock"
    details = [str(lock.state), _format_age(lock.age_seconds(now))]
    left = lock.expires_in(now.timestamp())
    if left is not None:
        details.append(f"lease {_format_age(left)} left" if left >= 0 else "lease expired")
    return f"{lock.holder()} ({', '.join(details)})"


def _task_json(record: TaskRecord, now: datetime) -> dict[str, Any]:
    current = record.current_stage
    return {
        "task_id": record.task_id,
        "status": _status_name(record),
        "stages_complete": record.stages_complete,
        "stages_total": record.stage_count,
        "current_stage": current.stage_name if current is not None else None,
        "attempts": record.attempts,
        "last_update": record.last_update,
        "lock": _lock_json(record.lock, now),
        "cancel_requested": record.cancel_requested,
        "problems": list(record.problems),
    }


def _table(
    out: _Output, header: Sequence[str], rows: Sequence[Sequence[str]], status_col: int
) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    out.line("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    for row in rows:
        cells = [
            out.status(cell, width) if i == status_col else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        out.line("  ".join(cells).rstrip())


def _md_cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


# ---------------------------------------------------------------------- commands


def _cmd_ls(io: TaskIO, args: argparse.Namespace, out: _Output) -> int:
    now = datetime.now(timezone.utc)
    records = scan_store(io)
    wanted = set(args.status or ())
    if wanted:
        records = [r for r in records if _status_name(r) in wanted]
    if out.as_json:
        out.json([_task_json(r, now) for r in records])
        return EXIT_OK
    if not records:
        return EXIT_OK
    header = ["TASK", "STATUS", "STAGES", "CURRENT", "ATTEMPTS", "UPDATED", "LOCK", "NOTE"]
    rows = []
    for record in records:
        current = record.current_stage
        notes = list(record.problems[:1])
        if _interrupted(record):
            notes.insert(0, "interrupted: no live process runs it (resume with strict_recovery)")
        if record.cancel_requested:
            notes.insert(0, "cancel requested")
        rows.append(
            [
                record.task_id,
                _status_name(record),
                f"{record.stages_complete}/{record.stage_count}",
                current.stage_name if current is not None else "-",
                str(record.attempts),
                _format_time(record.last_update),
                _lock_text(record.lock, now),
                "; ".join(notes) or "-",
            ]
        )
    _table(out, header, rows, status_col=1)
    return EXIT_OK


def _interrupted(record: TaskRecord) -> bool:
    """A stage is RUNNING but no process can be running it (no lock, or a dead owner's)."""
    running = any(stage.status is StageStatus.RUNNING for stage in record.stages)
    return running and (record.lock is None or not record.lock.held)


def _require(io: TaskIO, task_id: str) -> TaskRecord:
    record = load_task(io, task_id)
    if record is None:
        raise TaskNotFoundError(f"no task {task_id!r} in {_store_name(io)}", task_id=task_id)
    return record


def _store_name(io: TaskIO) -> str:
    if isinstance(io, LocalTaskIO):
        return str(io.root)
    return repr(io)


def _cmd_show(io: TaskIO, args: argparse.Namespace, out: _Output) -> int:
    record = _require(io, args.task_id)
    if out.as_json:
        stages = [s for s in record.stages if args.stage is None or s.stage_name == args.stage]
        if args.stage is not None and not stages:
            render_task(io, record, stage_name=args.stage)  # raises TaskNotFoundError
        out.json(
            {
                "task_id": record.task_id,
                "status": _status_name(record),
                "problems": list(record.problems),
                "stages": [{"object": io.url(s.obj_name), "document": s.doc} for s in stages],
            }
        )
        return _report_problems(record, out)
    color = Fore.LIGHTWHITE_EX if out.color else ""
    out.write(render_task(io, record, color=color, stage_name=args.stage))
    return _report_problems(record, out)


def _report_problems(record: TaskRecord, out: _Output) -> int:
    """After showing what can be shown, report each problem; exit 4 if there is any."""
    for problem in record.problems:
        out.error(f"failed: task {record.task_id!r}: {problem}")
    return EXIT_FAILED if record.problems else EXIT_OK


def _cmd_history(io: TaskIO, args: argparse.Namespace, out: _Output) -> int:
    record = _require(io, args.task_id)
    rows = history_rows(record)
    if out.as_json:
        out.json(
            [
                {
                    "stage": row.stage_name,
                    "position": row.position,
                    **row.entry.model_dump(mode="json"),
                }
                for row in rows
            ]
        )
        return _report_problems(record, out)
    out.line("| time | stage | attempt | change | duration | message |")
    out.line("|---|---|---|---|---|---|")
    for row in rows:
        entry = row.entry
        change = f"{entry.begin_status.value} → {out.status(entry.end_status.value)}"
        cells = [
            entry.end_ts,
            _md_cell(row.stage_name),
            str(entry.attempt),
            change,
            _format_duration(entry.run_time_seconds),
            _md_cell(entry.message),
        ]
        out.line("| " + " | ".join(cells) + " |")
    return _report_problems(record, out)


def _cmd_unlock(io: TaskIO, args: argparse.Namespace, out: _Output) -> int:
    outcome = remove_lock(io, args.task_id, force=args.force)
    lock = outcome.lock
    if out.as_json:
        now = datetime.now(timezone.utc)
        out.json(
            {
                "task_id": outcome.task_id,
                "was_locked": lock is not None,
                "lock": _lock_json(lock, now),
                "removed": list(outcome.removed),
                "released": outcome.released,
                "forced": outcome.forced,
            }
        )
        return EXIT_OK
    if lock is None:
        out.line(f"task {outcome.task_id} is not locked; nothing to do")
        return EXIT_OK
    how = "forcibly removed" if outcome.forced else "removed"
    note = "; its lease is now released (a higher epoch fences the holder out)"
    out.line(
        f"{how} the lock of task {outcome.task_id}, held by {lock.describe()}"
        + (note if outcome.released else "")
    )
    return EXIT_OK


def _cmd_cancel(io: TaskIO, args: argparse.Namespace, out: _Output) -> int:
    task_id = args.task_id
    record = _require(io, task_id)
    status = record.status
    if status in (StageStatus.COMPLETE, StageStatus.ERROR):
        raise TaskStateError(f"task {task_id!r} is {status} and cannot be canceled")
    result: dict[str, Any] = {"task_id": task_id, "holder": None, "canceled_stages": []}
    lock = record.lock
    if status is StageStatus.CANCELED:
        result["action"] = "already_canceled"
        message = f"task {task_id} is already CANCELED; nothing to do"
    elif lock is not None and lock.held:
        message = _request(io, task_id, lock, result)
    else:
        try:
            outcome = cancel_task(io, task_id)
        except BindException:
            # Locked since we looked: an engine has just bound the task.
            fresh = load_task(io, task_id)
            message = _request(io, task_id, fresh.lock if fresh else None, result)
        else:
            result["action"] = "already_canceled" if outcome.already_canceled else "canceled"
            result["canceled_stages"] = list(outcome.canceled)
            stages = ", ".join(outcome.canceled) or "none"
            message = f"canceled task {task_id} at once (no process runs it): {stages} now CANCELED"
    if out.as_json:
        out.json(result)
    else:
        out.line(message)
    return EXIT_OK


def _request(io: TaskIO, task_id: str, lock: LockInfo | None, result: dict[str, Any]) -> str:
    request_cancel(io, task_id, reason="requested from the checkmate CLI")
    result["action"] = "requested"
    holder = lock.describe() if lock is not None else "another process"
    result["holder"] = lock.holder() if lock is not None else None
    return (
        f"task {task_id} is locked by {holder}: cancellation requested; the engine running "
        "it cancels the task at its next check"
    )


def _cmd_clean(io: TaskIO, args: argparse.Namespace, out: _Output) -> int:
    has_filter = bool(args.status) or args.older_than is not None
    if args.task_ids and has_filter:
        raise _UsageError("clean takes task ids or --status/--older-than, not both")
    if not args.task_ids and not has_filter:
        raise _UsageError("clean needs task ids, or --status and/or --older-than to select tasks")
    if args.task_ids:
        found = {r.task_id for r in scan_store(io, set(args.task_ids))}
        missing = [t for t in dict.fromkeys(args.task_ids) if t not in found]
        if missing:
            names = ", ".join(repr(t) for t in missing)
            raise TaskNotFoundError(f"no task {names} in {_store_name(io)}; nothing was deleted")
        selected = list(dict.fromkeys(args.task_ids))
    else:
        selected = _select(scan_store(io), args)
    cleaned: list[dict[str, Any]] = []
    refused: list[dict[str, str]] = []
    for task_id in selected:
        try:
            outcome = delete_task(io, task_id, dry_run=args.dry_run)
        except LockRefusedError as exc:
            refused.append({"task_id": task_id, "reason": str(exc)})
            continue
        cleaned.append(
            {"task_id": task_id, "deleted": list(outcome.deleted), "kept": list(outcome.kept)}
        )
    if out.as_json:
        out.json({"dry_run": args.dry_run, "tasks": cleaned, "refused": refused})
    else:
        verb = "would delete" if args.dry_run else "deleted"
        if not selected:
            out.line("no task matches; nothing to do")
        for item in cleaned:
            out.line(f"{verb} task {item['task_id']} ({len(item['deleted'])} objects)")
            for name in item["deleted"]:
                out.line(f"  {name}")
            for name in item["kept"]:
                out.line(f"  kept {name} (not a checkmate object of this task)")
    for item in refused:
        out.error(f"refused: {item['reason']}")
    return EXIT_REFUSED if refused else EXIT_OK


def _select(records: Sequence[TaskRecord], args: argparse.Namespace) -> list[str]:
    statuses = set(args.status or ())
    cutoff = None
    if args.older_than is not None:
        cutoff = datetime.now(timezone.utc) - args.older_than
    selected = []
    for record in records:
        if record.status is None or (statuses and record.status.value not in statuses):
            continue
        if cutoff is not None:
            moment = record.last_update_time
            if moment is None or moment >= cutoff:
                continue
        selected.append(record.task_id)
    return selected


def _load_factory(spec: str) -> EngineFactory:
    """Import ``MODULE:FACTORY`` (the current directory is searched first, as with -m)."""
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise _UsageError(f"invalid factory {spec!r}: use MODULE:FACTORY, such as jobs:build")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise _UsageError(
            f"cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    for attr in attr_path.split("."):
        try:
            target = getattr(target, attr)
        except AttributeError:
            raise _UsageError(f"module {module_name!r} has no {attr_path!r}") from None
    if not callable(target):
        raise _UsageError(
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
            raise _UsageError(f"cannot read the tasks file {source!r}: {exc}") from exc
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
        raise _UsageError(
            "--dask needs the distributed package: pip install 'checkmate-engine[dask]'"
        ) from exc
    client = distributed.Client(address, set_as_default=False)
    try:
        yield client.get_executor()
    finally:
        client.close()


def _cmd_run(args: argparse.Namespace, out: _Output) -> int:
    if args.dask is not None and args.workers is not None:
        raise _UsageError("--workers and --dask exclude each other (the cluster has its workers)")
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


def _print_summary(summary: BatchSummary, out: _Output) -> None:
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
                _format_duration(result.run_seconds),
                error if len(error) <= 100 else error[:99] + "…",
            ]
        )
    if rows:
        _table(out, header, rows, status_col=1)
    out.line(summary.describe())


_COMMANDS: dict[str, Callable[[TaskIO, argparse.Namespace, _Output], int]] = {
    "ls": _cmd_ls,
    "show": _cmd_show,
    "history": _cmd_history,
    "unlock": _cmd_unlock,
    "cancel": _cmd_cancel,
    "clean": _cmd_clean,
}


# ---------------------------------------------------------------------- parser


def _status_arg(text: str) -> str:
    name = text.strip().upper()
    if name not in {s.value for s in StageStatus}:
        choices = ", ".join(s.value for s in StageStatus)
        raise argparse.ArgumentTypeError(f"invalid status {text!r} (choose from {choices})")
    return name


def _ls_status_arg(text: str) -> str:
    if text.strip().upper() == INVALID:
        return INVALID
    return _status_arg(text)


def _storage_option(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"invalid storage option {text!r}: use key=value")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


def _common_options(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS keeps a value given before the command from being reset after it.
    group = parser.add_argument_group("common options")
    group.add_argument(
        "--storage-option",
        "-o",
        dest="storage_options",
        action="append",
        type=_storage_option,
        metavar="KEY=VALUE",
        default=argparse.SUPPRESS,
        help="an fsspec storage option (repeatable; the value is parsed as JSON if it can be)",
    )
    group.add_argument(
        "--no-color",
        dest="no_color",
        action="store_true",
        default=argparse.SUPPRESS,
        help="plain output, even on a terminal",
    )
    group.add_argument(
        "--json",
        dest="json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="machine-readable JSON output",
    )
    group.add_argument(
        "--verbose",
        "-v",
        dest="verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="log what the engine does to stderr",
    )


def build_parser() -> argparse.ArgumentParser:
    """Return the ``checkmate`` argument parser."""
    parser = _Parser(
        prog=PROG,
        description="Inspect and operate checkmate tasks in any store, without their code; "
        "run batches of tasks (checkmate run).",
        epilog="STORE is a local directory or an fsspec URL (file://, memory://, s3://, ...). "
        "Exit codes: 0 ok, 1 not found, 2 usage error, 3 refused, 4 storage failure "
        "('run': 0 when every task is COMPLETE, 1 otherwise).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _common_options(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("store", metavar="STORE", help="a local directory or an fsspec URL")
        _common_options(sub)
        return sub

    ls = command("ls", "list the tasks of a store, one line per task")
    ls.add_argument(
        "--status",
        nargs="+",
        action="extend",
        type=_ls_status_arg,
        metavar="S",
        help="only tasks with one of these statuses (INVALID: tasks that cannot be read)",
    )
    show = command("show", "show a task's stages and state as Markdown (like dump_stages)")
    show.add_argument("task_id", metavar="TASK_ID")
    show.add_argument("--stage", metavar="NAME", help="show only this stage")
    history = command("history", "every status change of a task, in time order")
    history.add_argument("task_id", metavar="TASK_ID")
    unlock = command("unlock", "remove a stale lock (dead owner, expired lease); --force: any lock")
    unlock.add_argument("task_id", metavar="TASK_ID")
    unlock.add_argument(
        "--force", action="store_true", help="remove it even if its owner may be alive"
    )
    cancel = command("cancel", "cancel a task (ask its running engine, or at once when idle)")
    cancel.add_argument("task_id", metavar="TASK_ID")
    clean = command("clean", "delete tasks' objects (never a locked task, never foreign objects)")
    clean.add_argument("task_ids", nargs="*", metavar="TASK_ID")
    clean.add_argument(
        "--status",
        nargs="+",
        action="extend",
        type=_status_arg,
        metavar="S",
        help="select the tasks with one of these statuses",
    )
    clean.add_argument(
        "--older-than",
        type=parse_age,
        metavar="AGE",
        help="select the tasks last updated longer ago than AGE (7d, 12h, 30m, 2w)",
    )
    clean.add_argument("--dry-run", action="store_true", help="only say what would be deleted")
    _run_parser(commands)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: use a whole number >= 1")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: use seconds >= 0")
    return value


def _run_parser(commands: Any) -> None:
    text = (
        "run a list of tasks through the engines a factory builds, on a process pool or a "
        "Dask cluster (exit 0 when every task is COMPLETE, 1 otherwise)"
    )
    run = commands.add_parser("run", help=text, description=text)
    run.add_argument(
        "factory",
        metavar="MODULE:FACTORY",
        help="factory(task_id, io) -> CheckMateEngine, importable from the current directory",
    )
    run.add_argument(
        "--store", required=True, metavar="URL", help="a local directory or an fsspec URL"
    )
    run.add_argument(
        "--tasks",
        required=True,
        metavar="FILE",
        help="a file with one task id per line ('-': standard input; '#' starts a comment)",
    )
    where = run.add_mutually_exclusive_group()
    where.add_argument(
        "--workers",
        type=_positive_int,
        metavar="N",
        help="size of the local process pool (default: the number of CPUs)",
    )
    where.add_argument(
        "--dask",
        metavar="SCHEDULER_ADDRESS",
        help="run on a Dask cluster (tcp://host:8786); needs checkmate-engine[dask]",
    )
    run.add_argument(
        "--strict-recovery",
        action="store_true",
        help="roll back and retry a stage left RUNNING by a crash (needs attempts to spare)",
    )
    run.add_argument(
        "--hold-timeout",
        type=_seconds,
        metavar="SECONDS",
        help="give up on a task that other workers hold this long (default: wait)",
    )
    _common_options(run)


# ---------------------------------------------------------------------- main


@contextlib.contextmanager
def _logging(verbose: bool) -> Iterator[None]:
    """Show the library's log on stderr with ``-v``; otherwise only errors."""
    logger = logging.getLogger("checkmate")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.ERROR)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


def _use_color(args: argparse.Namespace) -> bool:
    if getattr(args, "no_color", False) or os.environ.get("NO_COLOR"):
        return False
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def _open(args: argparse.Namespace) -> TaskIO:
    options = dict(getattr(args, "storage_options", []))
    io = open_store(args.store, options)
    if isinstance(io, LocalTaskIO) and not io.root.is_dir():
        raise TaskNotFoundError(f"store {str(io.root)!r} does not exist (no such directory)")
    return io


def _run(args: argparse.Namespace, out: _Output) -> int:
    try:
        if args.command == "run":
            return _cmd_run(args, out)
        return _COMMANDS[args.command](_open(args), args, out)
    except _UsageError:
        raise
    except TaskNotFoundError as exc:
        out.error(str(exc))
        return EXIT_NOT_FOUND
    except ConfigurationError as exc:
        out.error(f"error: {exc}")
        return EXIT_USAGE
    except (LockRefusedError, BindException, TaskStateError) as exc:
        out.error(f"refused: {exc}")
        return EXIT_REFUSED
    except (TaskEngineException, OSError) as exc:
        out.error(f"failed: {exc}")
        return EXIT_FAILED
    except Exception as exc:
        # A storage backend's own error (no credentials, a network failure in
        # botocore, ...): still one line; the traceback with --verbose.
        logging.getLogger(__name__).info("unexpected error", exc_info=True)
        out.error(f"failed: {type(exc).__name__}: {exc}")
        return EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``checkmate`` command line; return its exit code.

    Args:
        argv: The arguments (default: ``sys.argv[1:]``).
    """
    parser = build_parser()
    out = _Output(color=False, as_json=False)
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        out.error(f"error: {exc}")
        return EXIT_USAGE
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    out = _Output(color=_use_color(args), as_json=getattr(args, "json", False))
    if out.color:
        colorama.just_fix_windows_console()
    try:
        with _logging(getattr(args, "verbose", False)):
            return _run(args, out)
    except _UsageError as exc:
        out.error(f"error: {exc}")
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (``checkmate ls | head``): stop quietly.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        out.error("interrupted")
        return 130
