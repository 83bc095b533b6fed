"""The worker side of `run_tasks`: run one task, report it, and stop it cleanly on Ctrl-C."""

from __future__ import annotations

import _thread
import contextlib
import logging
import logging.handlers
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

from ..engine import CheckMateEngine
from ..errors import (
    BindException,
    ConfigurationError,
    InterruptedStageError,
    LeaseLostError,
    LockUnsupportedError,
    StageFailedError,
)
from ..models import StageStatus
from ..storage.base import TaskIO

__all__ = ["EngineFactory", "Report", "init_worker", "run_task", "sigint_ignored"]


logger = logging.getLogger(__name__)


EngineFactory = Callable[[str, TaskIO], CheckMateEngine[Any, Any]]
"""``factory(task_id, io) -> CheckMateEngine``: builds the engine of one task.

It runs in the worker. It must be picklable for process pools and Dask: a
module-level function (or a ``functools.partial`` of one, or an instance of a
module-level class with ``__call__``). It must not pass ``no_lock=True``: the
lock is what keeps two workers off one task.
"""

_WORKER_REFUSE_WINDOW = 10.0
"""Seconds after a Ctrl-C during which a worker of the runner's own pool refuses new tasks."""


@dataclass(frozen=True)
class Report:
    """What one run of a task in a worker tells the runner (picklable)."""

    task_id: str
    kind: str
    status: str | None
    stage_attempts: int | None
    error: str | None
    error_type: str | None
    started: float
    seconds: float
    worker: str
    lock_ttl: float | None


@dataclass
class _WorkerState:
    """Per-process state of a worker of the runner's own pool (SIGINT handling)."""

    own_pool: bool = False
    running: bool = False
    fired: bool = False
    nudging: bool = False
    interrupted_at: float | None = None


_WORKER = _WorkerState()
_ENGINE_MODULE = CheckMateEngine.__module__
_NUDGE_INTERVAL = 0.02


def _in_stage(frame: FrameType | None) -> bool:
    """Tell whether the main thread is inside a stage's ``execute_stage`` (not the engine's code).

    Looks for the engine's ``_run_stage`` frame and checks what it called.
    """
    child = None
    while frame is not None:
        if frame.f_code.co_name == "_run_stage" and frame.f_globals.get("__name__") == (
            _ENGINE_MODULE
        ):
            return child is not None and child.f_code.co_name == "execute_stage"
        child, frame = frame, frame.f_back
    return False


def _nudge() -> None:
    """While an interrupt waits for a stage to start, re-deliver it every few milliseconds."""
    while _WORKER.running and not _WORKER.fired:
        time.sleep(_NUDGE_INTERVAL)
        if _WORKER.running and not _WORKER.fired:
            _thread.interrupt_main()
    _WORKER.nudging = False


def _worker_sigint(signum: int, frame: FrameType | None) -> None:
    """SIGINT in a worker of the runner's own pool: stop the running task at a safe point.

    The interrupt is raised only inside a stage's ``execute_stage``, where the
    engine records it (RETRY, the attempt not counted) and releases the lock;
    while the engine itself is reading or writing, it is held back and
    re-delivered until a stage runs (or the task ends on its own). It fires
    once: later signals cannot interrupt the engine while it records the
    first. An idle worker stays quiet (no traceback, no broken pool).
    """
    del signum
    if _WORKER.interrupted_at is None:
        _WORKER.interrupted_at = time.monotonic()
    if _WORKER.fired or not _WORKER.running:
        return
    if _in_stage(frame):
        _WORKER.fired = True
        raise KeyboardInterrupt
    if not _WORKER.nudging:
        _WORKER.nudging = True
        threading.Thread(target=_nudge, name="checkmate-batch-interrupt", daemon=True).start()


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT in this process while the pool starts a worker process.

    A started process inherits an ignored SIGINT (a Python handler it would
    not), so a Ctrl-C that reaches a worker while it starts up is dropped
    instead of killing it with a traceback; its initializer then installs
    `_worker_sigint`. The window is the few milliseconds a process start
    takes. Only the main thread may change signal handlers: elsewhere this
    does nothing.
    """
    try:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def init_worker(log_queue: Any, root_level: int, checkmate_level: int) -> None:
    """Initializer of the runner's own pool: SIGINT handling and log forwarding."""
    _WORKER.own_pool = True
    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        signal.signal(signal.SIGINT, _worker_sigint)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(logging.handlers.QueueHandler(log_queue))
    root.setLevel(root_level)
    logging.getLogger("checkmate").setLevel(checkmate_level)


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _refusing() -> bool:
    """After a Ctrl-C, a worker refuses new tasks for a while (the batch is stopping)."""
    at = _WORKER.interrupted_at
    if at is None:
        return False
    if time.monotonic() - at < _WORKER_REFUSE_WINDOW:
        return True
    _WORKER.interrupted_at = None
    _WORKER.fired = False
    return False


def run_task(
    factory: EngineFactory, task_id: str, io: TaskIO, strict_recovery: bool, token: str
) -> Report:
    """Build the task's engine with ``factory`` and execute it; report how it went.

    Runs in the worker. ``token`` makes each submission distinct (Dask caches
    the results of identical calls).
    """
    del token
    started = time.time()
    clock = time.perf_counter()
    state: dict[str, Any] = {"status": None, "attempts": None, "ttl": None}

    def report(kind: str, exc: BaseException | None = None) -> Report:
        error = None
        if exc is not None:
            error = str(exc) if str(exc) else type(exc).__name__
        return Report(
            task_id=task_id,
            kind=kind,
            status=state["status"],
            stage_attempts=state["attempts"],
            error=error,
            error_type=type(exc).__name__ if exc is not None else None,
            started=started,
            seconds=time.perf_counter() - clock,
            worker=_worker_name(),
            lock_ttl=state["ttl"],
        )

    if _WORKER.own_pool and _refusing():
        return report("not_started")
    _WORKER.running = True
    try:
        return _execute(factory, task_id, io, strict_recovery, state, report)
    except KeyboardInterrupt as exc:
        return report("interrupted", exc)
    finally:
        _WORKER.running = False


def _execute(
    factory: EngineFactory,
    task_id: str,
    io: TaskIO,
    strict_recovery: bool,
    state: dict[str, Any],
    report: Callable[..., Report],
) -> Report:
    try:
        engine = factory(task_id, io)
        if not isinstance(engine, CheckMateEngine):
            raise ConfigurationError(
                f"the factory returned a {type(engine).__name__}, not a CheckMateEngine",
                task_id=task_id,
            )
        if engine.task_id != task_id:
            raise ConfigurationError(
                f"the factory built an engine for task {engine.task_id!r} when asked for "
                f"{task_id!r}",
                task_id=task_id,
            )
        state["ttl"] = engine.lock_ttl
        with engine:
            try:
                status = engine.execute(strict_recovery=strict_recovery)
            finally:
                _observe(engine, state)
    except LockUnsupportedError as exc:
        return report("error", exc)
    except BindException as exc:
        return report("held", exc)
    except LeaseLostError as exc:
        return report("lost", exc)
    except StageFailedError as exc:
        state["status"] = StageStatus.ERROR.value
        return report("failed", exc)
    except InterruptedStageError as exc:
        state["status"] = StageStatus.RUNNING.value
        return report("needs_recovery", exc)
    except SystemExit as exc:
        return report("error", exc)
    except Exception as exc:
        return report("error", exc)
    state["status"] = status.value
    if status is StageStatus.COMPLETE:
        return report("complete")
    if status is StageStatus.CANCELED:
        return report("canceled")
    return report("error", RuntimeError(f"execute() returned {status.value}"))


def _observe(engine: CheckMateEngine[Any, Any], state: dict[str, Any]) -> None:
    """Record the bound engine's status and attempts (from memory: no storage call)."""
    try:
        state["attempts"] = engine.cumulative_attempts
        state["status"] = engine.status.value
    except Exception:  # an impossible state is reported by execute() itself
        logger.debug("could not read the state of task %s", engine.task_id, exc_info=True)
