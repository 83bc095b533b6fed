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

from ._main import main
from ._output import (
    EXIT_FAILED,
    EXIT_INCOMPLETE,
    EXIT_INTERRUPTED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_USAGE,
    parse_age,
)
from ._parser import build_parser

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
