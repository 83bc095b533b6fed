"""Cancellation requests: ask a task running elsewhere to stop.

A request is one small object, ``<task_id>/cancel~request``. A running engine
looks for it before each stage attempt (at most once per ``check_interval``
seconds) and, when it finds it, cancels the task: the current stage's
``cancel()`` hook runs and the remaining stages become CANCELED. Long stages
can poll `BaseStage.cancel_requested` themselves.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime, timezone

from .naming import cancel_obj_name, check_task_id
from .storage.base import TaskIO

__all__ = ["cancel_requested", "request_cancel", "withdraw_cancel"]


def request_cancel(io: TaskIO, task_id: str, reason: str = "") -> str:
    """Ask the engine running ``task_id`` to cancel it; return the request's object name.

    Only a request: nothing changes until an engine bound to the task sees it.
    """
    name = cancel_obj_name(check_task_id(task_id))
    record = {
        "requested_at": datetime.now(timezone.utc).isoformat(),
        "by": f"{socket.gethostname()}:{os.getpid()}",
        "reason": reason,
    }
    io.write(name, json.dumps(record).encode())
    return name


def cancel_requested(io: TaskIO, task_id: str) -> bool:
    """Tell whether a cancellation request is pending for ``task_id``."""
    return io.exists(cancel_obj_name(check_task_id(task_id)))


def withdraw_cancel(io: TaskIO, task_id: str) -> None:
    """Delete a pending cancellation request, if any."""
    io.delete(cancel_obj_name(check_task_id(task_id)))
