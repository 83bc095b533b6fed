"""The command line's entry point: `main`."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence

import colorama

from ..catalog import LockRefusedError, TaskNotFoundError, open_store
from ..errors import BindException, ConfigurationError, TaskEngineException, TaskStateError
from ..storage import LocalTaskIO, TaskIO
from ._commands import COMMANDS
from ._output import (
    EXIT_FAILED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_USAGE,
    PROG,
    Output,
    UsageError,
)
from ._parser import build_parser
from ._run import cmd_run

__all__ = ["main"]


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


def _run(args: argparse.Namespace, out: Output) -> int:
    try:
        if args.command == "run":
            return cmd_run(args, out)
        return COMMANDS[args.command](_open(args), args, out)
    except UsageError:
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
    out = Output(color=False, as_json=False)
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        out.error(f"error: {exc}")
        return EXIT_USAGE
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    out = Output(color=_use_color(args), as_json=getattr(args, "json", False))
    if out.color:
        colorama.just_fix_windows_console()
    try:
        with _logging(getattr(args, "verbose", False)):
            return _run(args, out)
    except UsageError as exc:
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
