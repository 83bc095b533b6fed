"""The commands that inspect or change stored tasks: ls, show, history, unlock, cancel, clean."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

from colorama import Fore

from ..cancellation import request_cancel
from ..catalog import (
    LockInfo,
    LockRefusedError,
    TaskNotFoundError,
    TaskRecord,
    cancel_task,
    delete_task,
    history_rows,
    load_task,
    remove_lock,
    render_task,
    scan_store,
)
from ..errors import BindException, TaskStateError
from ..models import StageStatus
from ..storage import LocalTaskIO, TaskIO
from ._output import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_REFUSED,
    Output,
    UsageError,
    format_duration,
    format_time,
    lock_json,
    lock_text,
    md_cell,
    status_name,
    table,
    task_json,
)

__all__ = [
    "COMMANDS",
]


def _cmd_ls(io: TaskIO, args: argparse.Namespace, out: Output) -> int:
    now = datetime.now(timezone.utc)
    records = scan_store(io)
    wanted = set(args.status or ())
    if wanted:
        records = [r for r in records if status_name(r) in wanted]
    if out.as_json:
        out.json([task_json(r, now) for r in records])
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
                status_name(record),
                f"{record.stages_complete}/{record.stage_count}",
                current.stage_name if current is not None else "-",
                str(record.attempts),
                format_time(record.last_update),
                lock_text(record.lock, now),
                "; ".join(notes) or "-",
            ]
        )
    table(out, header, rows, status_col=1)
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


def _cmd_show(io: TaskIO, args: argparse.Namespace, out: Output) -> int:
    record = _require(io, args.task_id)
    if out.as_json:
        stages = [s for s in record.stages if args.stage is None or s.stage_name == args.stage]
        if args.stage is not None and not stages:
            render_task(io, record, stage_name=args.stage)  # raises TaskNotFoundError
        out.json(
            {
                "task_id": record.task_id,
                "status": status_name(record),
                "problems": list(record.problems),
                "stages": [{"object": io.url(s.obj_name), "document": s.doc} for s in stages],
            }
        )
        return _report_problems(record, out)
    color = Fore.LIGHTWHITE_EX if out.color else ""
    out.write(render_task(io, record, color=color, stage_name=args.stage))
    return _report_problems(record, out)


def _report_problems(record: TaskRecord, out: Output) -> int:
    """After showing what can be shown, report each problem; exit 4 if there is any."""
    for problem in record.problems:
        out.error(f"failed: task {record.task_id!r}: {problem}")
    return EXIT_FAILED if record.problems else EXIT_OK


def _cmd_history(io: TaskIO, args: argparse.Namespace, out: Output) -> int:
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
            md_cell(row.stage_name),
            str(entry.attempt),
            change,
            format_duration(entry.run_time_seconds),
            md_cell(entry.message),
        ]
        out.line("| " + " | ".join(cells) + " |")
    return _report_problems(record, out)


def _cmd_unlock(io: TaskIO, args: argparse.Namespace, out: Output) -> int:
    outcome = remove_lock(io, args.task_id, force=args.force)
    lock = outcome.lock
    if out.as_json:
        now = datetime.now(timezone.utc)
        out.json(
            {
                "task_id": outcome.task_id,
                "was_locked": lock is not None,
                "lock": lock_json(lock, now),
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


def _cmd_cancel(io: TaskIO, args: argparse.Namespace, out: Output) -> int:
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


def _cmd_clean(io: TaskIO, args: argparse.Namespace, out: Output) -> int:
    has_filter = bool(args.status) or args.older_than is not None
    if args.task_ids and has_filter:
        raise UsageError("clean takes task ids or --status/--older-than, not both")
    if not args.task_ids and not has_filter:
        raise UsageError("clean needs task ids, or --status and/or --older-than to select tasks")
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


COMMANDS: dict[str, Callable[[TaskIO, argparse.Namespace, Output], int]] = {
    "ls": _cmd_ls,
    "show": _cmd_show,
    "history": _cmd_history,
    "unlock": _cmd_unlock,
    "cancel": _cmd_cancel,
    "clean": _cmd_clean,
}
"""The store commands by name: ``command(io, args, out) -> exit code``."""
