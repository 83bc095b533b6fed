"""The command line's argument parser."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .. import __version__
from ..models import StageStatus
from ._output import INVALID, PROG, Parser, parse_age

__all__ = ["build_parser"]


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
    parser = Parser(
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
