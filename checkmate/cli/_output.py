"""Exit codes, and how the command line writes tables, JSON, times and colours."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, NoReturn, TextIO

from colorama import Fore, Style

from ..catalog import LockInfo, LockState, TaskRecord
from ..catalog._stored import parse_ts
from ..models import StageStatus

__all__ = [
    "EXIT_FAILED",
    "EXIT_INCOMPLETE",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_USAGE",
    "INVALID",
    "PROG",
    "Output",
    "Parser",
    "UsageError",
    "format_duration",
    "format_time",
    "lock_json",
    "lock_text",
    "md_cell",
    "parse_age",
    "status_name",
    "table",
    "task_json",
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


class UsageError(Exception):
    """A command-line error: reported on one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors raise `UsageError` instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


class Output:
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


def format_duration(seconds: float) -> str:
    """Seconds as ``1.234s`` under a minute, else in minutes or hours."""
    if seconds < 60:
        return f"{seconds:.3f}s"
    return _format_age(seconds)


def format_time(text: str | None) -> str:
    """An ISO timestamp as shown in tables; ``-`` for none."""
    if text is None:
        return "-"
    moment = parse_ts(text)
    if moment is None:
        return text
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_name(record: TaskRecord) -> str:
    """The task's status as shown, or INVALID when its objects cannot be read reliably."""
    status = record.status
    return INVALID if status is None else status.value


def lock_json(lock: LockInfo | None, now: datetime) -> dict[str, Any] | None:
    """The lock of a task as JSON output; None when it is not locked."""
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


def lock_text(lock: LockInfo | None, now: datetime) -> str:
    """The lock of a task in one table cell; ``-`` when it is not locked."""
    if lock is None or lock.state is LockState.RELEASED:
        return "-"
    if lock.owner is None:
        return "unreadable lock"
    details = [str(lock.state), _format_age(lock.age_seconds(now))]
    left = lock.expires_in(now.timestamp())
    if left is not None:
        details.append(f"lease {_format_age(left)} left" if left >= 0 else "lease expired")
    return f"{lock.holder()} ({', '.join(details)})"


def task_json(record: TaskRecord, now: datetime) -> dict[str, Any]:
    """One task as JSON output (``ls --json``)."""
    current = record.current_stage
    return {
        "task_id": record.task_id,
        "status": status_name(record),
        "stages_complete": record.stages_complete,
        "stages_total": record.stage_count,
        "current_stage": current.stage_name if current is not None else None,
        "attempts": record.attempts,
        "last_update": record.last_update,
        "lock": lock_json(record.lock, now),
        "cancel_requested": record.cancel_requested,
        "problems": list(record.problems),
    }


def table(
    out: Output, header: Sequence[str], rows: Sequence[Sequence[str]], status_col: int
) -> None:
    """Write an aligned text table, with the status column (``status_col``) in colour."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    out.line("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    for row in rows:
        cells = [
            out.status(cell, width) if i == status_col else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        out.line("  ".join(cells).rstrip())


def md_cell(text: str) -> str:
    """``text`` on one line, safe in a Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")
