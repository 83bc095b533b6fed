"""Read, render, cancel and delete tasks generically, without the user's stage classes.

Every stage object carries enough to be understood on its own: a ``checkmate``
member (format, stage class, position, stage count), the stage's name and its
state with ``task_id``, ``stage_name``, ``status``, ``attempts`` and
``history``. This module validates exactly that much with permissive Pydantic
models (user fields are kept as they are) and never imports user code. It is
what the ``checkmate`` command line tool is built on.

Both kinds of task lock are understood (see `LockInfo`): a lock object,
and a lease, whose object stays (released, keeping its epoch) after use.

Storage calls are few and batched:

- `scan_store` (``checkmate ls``) makes **two** `TaskIO` calls whatever the
  number of tasks: one ``io.list("")`` and one ``io.read_many(...)`` for every
  stage object and lock object found (none when the store is empty). On
  fsspec backends ``read_many`` is one batched fetch; `LocalTaskIO` reads the
  files one after another inside that call.
- `load_task` makes two calls for one task: ``io.list("<task_id>/")`` and one
  ``io.read_many``.

Example:
    ```python
    from checkmate import LocalTaskIO
    from checkmate.catalog import load_task, render_task, scan_store

    io = LocalTaskIO("state")
    for record in scan_store(io):
        print(record.task_id, record.status)
    record = load_task(io, "nightly-2026-11-22")
    if record is not None:
        print(render_task(io, record))
    ```
"""

from ._admin import (
    CLI_CANCEL_MESSAGE,
    CancelOutcome,
    CleanOutcome,
    UnlockOutcome,
    cancel_task,
    delete_task,
    remove_lock,
)
from ._locks import LEASE_SKEW, LockInfo, LockState
from ._records import TaskRecord, load_task, open_store, scan_store
from ._render import HistoryRow, history_rows, render_task
from ._stored import (
    LockRefusedError,
    StageDocument,
    StageObjectMeta,
    StoredStage,
    StoredState,
    TaskNotFoundError,
    parse_stage_object,
)

__all__ = [
    "CLI_CANCEL_MESSAGE",
    "LEASE_SKEW",
    "CancelOutcome",
    "CleanOutcome",
    "HistoryRow",
    "LockInfo",
    "LockRefusedError",
    "LockState",
    "StageDocument",
    "StageObjectMeta",
    "StoredStage",
    "StoredState",
    "TaskNotFoundError",
    "TaskRecord",
    "UnlockOutcome",
    "cancel_task",
    "delete_task",
    "history_rows",
    "load_task",
    "open_store",
    "parse_stage_object",
    "remove_lock",
    "render_task",
    "scan_store",
]
