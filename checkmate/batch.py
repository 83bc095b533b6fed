"""Run many tasks at once on any `concurrent.futures.Executor`: `run_tasks`.

Each task id is run by the engine that a user's factory builds,
``factory(task_id, io) -> CheckMateEngine``, inside a worker: a process of a
pool (the default), a thread, or a Dask worker through
``distributed.Client.get_executor()``. Only the factory, the task id and the
`TaskIO` travel to the worker, so all three must be picklable for process
pools and Dask (a module-level function, or a picklable callable such as a
``functools.partial`` of one, and checkmate's own stores are).

The task locks and leases are what make this safe with any number of batch
runs, workers and machines on one store:

- a task held by another live worker (`BindException`) is skipped and tried
  again later, with a delay that grows with every try, up to the lease's ttl:
  never a busy wait, never a second run;
- a task whose holder died is taken over once its lease lapses (at once when
  the holder was a process on this host), and resumed with
  ``strict_recovery`` as the caller chose;
- a task that ends in ERROR is reported and never retried here: the engine's
  attempt budget is the poison rule;
- a run lost with its worker (a process pool that broke, a lease lost to
  another worker) is tried again, at most ``max_lost_runs`` times.

Ctrl-C (`KeyboardInterrupt`) stops submitting, cancels what has not started,
and stops the running tasks of the runner's own process pool inside their
stage's code, never in the middle of the engine's writes (the engine records
the interrupted attempt as RETRY, not counting it, and releases the lock). The
runner waits up to ``interrupt_grace`` seconds for them, then **raises**
`BatchInterrupted` (a `KeyboardInterrupt`) carrying the partial `BatchSummary`.
Nothing is lost: running the same batch again resumes every task.
"""

from __future__ import annotations

import _thread
import contextlib
import heapq
import logging
import logging.handlers
import multiprocessing
import os
import pickle
import random
import signal
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import (
    FIRST_COMPLETED,
    BrokenExecutor,
    CancelledError,
    Executor,
    Future,
    ProcessPoolExecutor,
    wait,
)
from dataclasses import dataclass, field
from enum import Enum
from types import FrameType
from typing import Any, TextIO

from ._progress import ProgressCounts, ProgressDisplay, is_terminal
from .engine import CheckMateEngine
from .errors import (
    BindException,
    ConfigurationError,
    InterruptedStageError,
    LeaseLostError,
    LockUnsupportedError,
    StageFailedError,
)
from .models import StageStatus
from .naming import check_task_id
from .storage.base import TaskIO

__all__ = [
    "BatchInterrupted",
    "BatchSummary",
    "EngineFactory",
    "ProgressDisplay",
    "TaskOutcome",
    "TaskResult",
    "default_worker_count",
    "run_tasks",
]

logger = logging.getLogger(__name__)

EngineFactory = Callable[[str, TaskIO], CheckMateEngine[Any, Any]]
"""``factory(task_id, io) -> CheckMateEngine``: builds the engine of one task.

It runs in the worker. It must be picklable for process pools and Dask: a
module-level function (or a ``functools.partial`` of one, or an instance of a
module-level class with ``__call__``). It must not pass ``no_lock=True``: the
lock is what keeps two workers off one task.
"""

_DEFAULT_RETRY_DELAY = 0.5
_DEFAULT_MAX_RETRY_DELAY = 60.0
_PROGRESS_INTERVAL = 0.25
_DASK_CAPACITY_REFRESH = 2.0
_REINTERRUPT_INTERVAL = 0.5
_WORKER_REFUSE_WINDOW = 10.0
"""Seconds after a Ctrl-C during which a worker of the runner's own pool refuses new tasks."""


class TaskOutcome(str, Enum):
    """How a task of a batch ended (`TaskResult.outcome`)."""

    COMPLETE = "complete"
    """The task is COMPLETE (now, or it already was)."""
    CANCELED = "canceled"
    """The task is CANCELED (someone canceled it)."""
    FAILED = "failed"
    """A stage ended in ERROR: the task will not run again (not retried)."""
    NEEDS_RECOVERY = "needs_recovery"
    """A stage was found RUNNING after a crash and ``strict_recovery`` was off."""
    ERROR = "error"
    """The task could not be run: the factory or the store failed, its state is
    corrupt or does not match the stages, or its worker kept dying."""
    HELD = "held"
    """Another worker still held the task when the batch gave up on it
    (``hold_timeout``) or was interrupted."""
    INTERRUPTED = "interrupted"
    """The task was running when the batch was interrupted; it is resumable."""
    NOT_RUN = "not_run"
    """The batch stopped before the task ran."""

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class TaskResult:
    """What happened to one task of a batch.

    Attributes:
        task_id: The task.
        outcome: How it ended.
        status: The task's status as its last run saw it (COMPLETE, ERROR,
            ...); None when no run got that far (held, not run, factory error).
        attempts: How many times the task was handed to a worker (each skip
            while it was held counts).
        stage_attempts: The engine's attempts of all stages together, as the
            last run saw them (`CheckMateEngine.cumulative_attempts`), or None.
        held: How many times it was found held by another worker.
        error: The error message, for any outcome but COMPLETE.
        error_type: The error's class name.
        started_at: When its first run started (seconds since the epoch), or None.
        finished_at: When its last run ended (seconds since the epoch), or None.
        run_seconds: Seconds spent in workers, all runs together.
        worker: ``host:pid`` of the worker of its last run, or None.
    """

    task_id: str
    outcome: TaskOutcome
    status: StageStatus | None = None
    attempts: int = 0
    stage_attempts: int | None = None
    held: int = 0
    error: str | None = None
    error_type: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    run_seconds: float = 0.0
    worker: str | None = None

    @property
    def ok(self) -> bool:
        """True when the task is COMPLETE."""
        return self.outcome is TaskOutcome.COMPLETE

    def to_dict(self) -> dict[str, Any]:
        """Return the result as plain JSON-ready data."""
        return {
            "task_id": self.task_id,
            "status": self.status.value if self.status is not None else None,
            "outcome": self.outcome.value,
            "attempts": self.attempts,
            "stage_attempts": self.stage_attempts,
            "held": self.held,
            "error": self.error,
            "error_type": self.error_type,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "run_seconds": round(self.run_seconds, 6),
            "worker": self.worker,
        }


@dataclass(frozen=True)
class BatchSummary:
    """The result of `run_tasks`: one `TaskResult` per task id, in the order given.

    Attributes:
        results: The results by task id, in the order of the task ids.
        started_at: When the batch started (seconds since the epoch).
        finished_at: When it ended (seconds since the epoch).
        interrupted: True when Ctrl-C stopped it (see `BatchInterrupted`).
    """

    results: Mapping[str, TaskResult]
    started_at: float
    finished_at: float
    interrupted: bool = False

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self) -> Iterator[TaskResult]:
        return iter(self.results.values())

    def __getitem__(self, task_id: str) -> TaskResult:
        return self.results[task_id]

    @property
    def elapsed(self) -> float:
        """Seconds from start to end."""
        return self.finished_at - self.started_at

    @property
    def all_complete(self) -> bool:
        """True when every task is COMPLETE (also for an empty batch)."""
        return all(result.ok for result in self.results.values())

    @property
    def not_complete(self) -> list[TaskResult]:
        """The results of every task that is not COMPLETE, in task order."""
        return [result for result in self.results.values() if not result.ok]

    def counts(self) -> dict[TaskOutcome, int]:
        """Return how many tasks ended with each outcome (outcomes that occur only)."""
        counted: dict[TaskOutcome, int] = {}
        for result in self.results.values():
            counted[result.outcome] = counted.get(result.outcome, 0) + 1
        return counted

    def describe(self) -> str:
        """Return a one-line account, such as ``200 tasks in 12.3s: 199 complete, 1 failed``."""
        counted = self.counts()
        parts = [f"{counted[o]} {o.value.replace('_', ' ')}" for o in TaskOutcome if o in counted]
        note = " (interrupted)" if self.interrupted else ""
        return f"{len(self.results)} tasks in {self.elapsed:.1f}s{note}: " + (
            ", ".join(parts) or "nothing to do"
        )

    def to_dicts(self) -> list[dict[str, Any]]:
        """Return every result as JSON-ready data, in task order."""
        return [result.to_dict() for result in self.results.values()]


class BatchInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped `run_tasks`; ``summary`` holds what was done (a partial `BatchSummary`).

    It is a `KeyboardInterrupt`, so a program that does not catch it stops as
    on any Ctrl-C. Every task is resumable: run the batch again.
    """

    def __init__(self, summary: BatchSummary) -> None:
        super().__init__(f"batch interrupted: {summary.describe()}")
        self.summary = summary

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.summary,))


# ---------------------------------------------------------------------- worker side


@dataclass(frozen=True)
class _Report:
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
def _sigint_ignored() -> Iterator[None]:
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


def _init_worker(log_queue: Any, root_level: int, checkmate_level: int) -> None:
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


def _run_task(
    factory: EngineFactory, task_id: str, io: TaskIO, strict_recovery: bool, token: str
) -> _Report:
    """Build the task's engine with ``factory`` and execute it; report how it went.

    Runs in the worker. ``token`` makes each submission distinct (Dask caches
    the results of identical calls).
    """
    del token
    started = time.time()
    clock = time.perf_counter()
    state: dict[str, Any] = {"status": None, "attempts": None, "ttl": None}

    def report(kind: str, exc: BaseException | None = None) -> _Report:
        error = None
        if exc is not None:
            error = str(exc) if str(exc) else type(exc).__name__
        return _Report(
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
    report: Callable[..., _Report],
) -> _Report:
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


# ---------------------------------------------------------------------- runner side


def default_worker_count() -> int:
    """The number of CPUs this process may use (the default size of the process pool)."""
    counter = getattr(os, "process_cpu_count", None)
    if counter is not None:
        count = counter()
        return int(count) if count else 1
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is not None:
        with contextlib.suppress(OSError):
            return max(1, len(affinity(0)))
    return os.cpu_count() or 1


class _Relay(logging.Handler):
    """Hands records forwarded by pool workers to this process's loggers."""

    def emit(self, record: logging.LogRecord) -> None:
        target = logging.getLogger(record.name)
        if target.isEnabledFor(record.levelno):
            target.handle(record)


class _OwnPool:
    """The runner's own process pool (spawn start method), replaced when it breaks."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._context = multiprocessing.get_context("spawn")
        self._log_queue: Any = self._context.Queue()
        self._listener = logging.handlers.QueueListener(self._log_queue, _Relay())
        self._listener.start()
        self.generation = 0
        self.starting = workers
        self.executor = self._new_executor()

    def submit_guard(self) -> contextlib.AbstractContextManager[None]:
        """What to hold around a submit: SIGINT ignored while the pool may start a worker.

        A pool starts one worker per submit until it has all of them, so the
        first ``workers`` submits of each pool are the ones that start processes.
        """
        if self.starting <= 0:
            return contextlib.nullcontext()
        self.starting -= 1
        return _sigint_ignored()

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=self._context,
            initializer=_init_worker,
            initargs=(
                self._log_queue,
                logging.getLogger().getEffectiveLevel(),
                logging.getLogger("checkmate").getEffectiveLevel(),
            ),
        )

    def replace(self) -> None:
        """Drop the broken pool and start a new one."""
        with contextlib.suppress(Exception):
            self.executor.shutdown(wait=False, cancel_futures=True)
        self.generation += 1
        self.starting = self.workers
        self.executor = self._new_executor()

    def _processes(self) -> list[Any]:
        # CPython keeps the pool's worker processes here; nothing public gives them.
        processes = getattr(self.executor, "_processes", None) or {}
        return list(processes.values())

    def interrupt(self) -> None:
        """Send SIGINT to every worker (each interrupts its running task once)."""
        for process in self._processes():
            with contextlib.suppress(OSError, ValueError, AttributeError):
                if process.is_alive() and process.pid is not None:
                    os.kill(process.pid, signal.SIGINT)

    def terminate(self) -> None:
        """Stop every worker now (a second Ctrl-C)."""
        for process in self._processes():
            with contextlib.suppress(OSError, ValueError, AttributeError):
                process.terminate()

    def close(self, wait_for_workers: bool) -> None:
        """Shut the pool down; stop forwarding logs once the workers are gone."""
        self.executor.shutdown(wait=wait_for_workers, cancel_futures=True)
        if wait_for_workers:
            self._listener.stop()
            with contextlib.suppress(Exception):
                self._log_queue.close()
                self._log_queue.join_thread()


def _is_dask(executor: Executor) -> bool:
    return type(executor).__module__.split(".", 1)[0] == "distributed"


@dataclass
class _Track:
    """The runner's record of one task."""

    task_id: str
    attempts: int = 0
    held: int = 0
    lost: int = 0
    first_held: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    run_seconds: float = 0.0
    worker: str | None = None
    status: StageStatus | None = None
    stage_attempts: int | None = None
    error: str | None = None
    error_type: str | None = None
    lock_ttl: float | None = None
    waiting: bool = False
    result: TaskResult | None = None

    def absorb(self, report: _Report) -> None:
        self.started_at = report.started if self.started_at is None else self.started_at
        self.finished_at = report.started + report.seconds
        self.run_seconds += report.seconds
        self.worker = report.worker
        if report.status is not None:
            self.status = StageStatus(report.status)
        if report.stage_attempts is not None:
            self.stage_attempts = report.stage_attempts
        if report.lock_ttl is not None:
            self.lock_ttl = report.lock_ttl
        self.error = report.error
        self.error_type = report.error_type


_FINAL_KINDS = {
    "complete": TaskOutcome.COMPLETE,
    "canceled": TaskOutcome.CANCELED,
    "failed": TaskOutcome.FAILED,
    "needs_recovery": TaskOutcome.NEEDS_RECOVERY,
    "error": TaskOutcome.ERROR,
}


@dataclass
class _Options:
    strict_recovery: bool
    max_in_flight: int | None
    retry_delay: float
    max_retry_delay: float | None
    hold_timeout: float | None
    max_lost_runs: int
    interrupt_grace: float
    on_result: Callable[[TaskResult], None] | None


@dataclass
class _Batch:
    """One call of `run_tasks`: the queue, the futures in flight and the results."""

    factory: EngineFactory
    io: TaskIO
    order: list[str]
    options: _Options
    executor: Executor | None
    pool: _OwnPool | None
    display: ProgressDisplay | None
    tracks: dict[str, _Track] = field(default_factory=dict)
    ready: deque[str] = field(default_factory=deque)
    waiting: list[tuple[float, int, str]] = field(default_factory=list)
    inflight: dict[Future[_Report], tuple[str, int]] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    broken: BaseException | None = None
    stopping: bool = False
    _seq: int = 0
    _capacity: int = 0
    _capacity_at: float = -1e9
    _done: int = 0
    _failed: int = 0
    _rng: random.Random = field(default_factory=random.Random)

    # -------------------------------------------------------------- setup

    @property
    def _executor(self) -> Executor:
        if self.pool is not None:
            return self.pool.executor
        assert self.executor is not None
        return self.executor

    def _limit(self) -> int:
        explicit = self.options.max_in_flight
        if explicit is not None:
            return explicit
        if self.pool is not None:
            return 2 * self.pool.workers
        executor = self._executor
        now = time.monotonic()
        if _is_dask(executor):
            if now - self._capacity_at >= _DASK_CAPACITY_REFRESH:
                self._capacity_at = now
                with contextlib.suppress(Exception):
                    threads = sum(executor._client.nthreads().values())  # type: ignore[attr-defined]
                    self._capacity = max(2 * int(threads), int(threads) + 4)
            return self._capacity or 2 * default_worker_count()
        workers = getattr(executor, "_max_workers", None)
        if isinstance(workers, int) and workers > 0:
            return 2 * workers
        return 2 * default_worker_count()

    # -------------------------------------------------------------- the loop

    def run(self) -> BatchSummary:
        for task_id in self.order:
            if task_id in self.tracks:
                continue
            track = _Track(task_id)
            self.tracks[task_id] = track
            try:
                check_task_id(task_id)
            except ConfigurationError as exc:
                track.error, track.error_type = str(exc), type(exc).__name__
                self._finish(track, TaskOutcome.ERROR)
                continue
            self.ready.append(task_id)
        self.order = list(self.tracks)
        try:
            self._loop()
        except KeyboardInterrupt:
            self._interrupt()
            raise BatchInterrupted(self._summary(interrupted=True)) from None
        return self._summary(interrupted=False)

    def _loop(self) -> None:
        while self.ready or self.waiting or self.inflight:
            self._promote(time.monotonic())
            self._submit_ready()
            if self.broken is not None and not self.inflight:
                self._abandon_queued(f"not run: the executor failed: {self.broken!r}")
                break
            timeout = self._wake_in(time.monotonic())
            if self.inflight:
                done, _ = wait(list(self.inflight), timeout=timeout, return_when=FIRST_COMPLETED)
                for future in done:
                    self._collect(future)
            elif timeout is not None:
                time.sleep(timeout)
            self._show()

    def _wake_in(self, now: float) -> float | None:
        timeout = None
        if self.waiting:
            timeout = max(0.0, self.waiting[0][0] - now)
        if self.display is not None:
            timeout = _PROGRESS_INTERVAL if timeout is None else min(timeout, _PROGRESS_INTERVAL)
        return timeout

    def _promote(self, now: float) -> None:
        """Move waiting tasks whose time has come to the end of the ready queue."""
        while self.waiting and self.waiting[0][0] <= now:
            _, _, task_id = heapq.heappop(self.waiting)
            self.tracks[task_id].waiting = False
            self.ready.append(task_id)

    def _submit_ready(self) -> None:
        limit = self._limit()
        while self.ready and len(self.inflight) < limit and self.broken is None:
            task_id = self.ready.popleft()
            guard = self.pool.submit_guard() if self.pool is not None else contextlib.nullcontext()
            try:
                with guard:
                    future = self._executor.submit(
                        _run_task,
                        self.factory,
                        task_id,
                        self.io,
                        self.options.strict_recovery,
                        uuid.uuid4().hex,
                    )
                    self.tracks[task_id].attempts += 1
                    generation = self.pool.generation if self.pool is not None else 0
                    self.inflight[future] = (task_id, generation)
            except (BrokenExecutor, RuntimeError) as exc:
                self.ready.appendleft(task_id)
                if self.pool is not None and isinstance(exc, BrokenExecutor):
                    self.pool.replace()
                    continue
                self.broken = exc
                return

    # -------------------------------------------------------------- results

    def _collect(self, future: Future[_Report]) -> None:
        task_id, generation = self.inflight[future]
        track = self.tracks[task_id]
        try:
            report = future.result(timeout=0)
        except CancelledError:
            self._cancelled(track)
        except BrokenExecutor as exc:
            if self.pool is not None:
                self._lost(track, f"its worker process died ({exc!r})", type(exc).__name__)
                if generation == self.pool.generation:
                    self.pool.replace()
            else:
                self.broken = self.broken or exc
                track.error = f"the executor broke while running it: {exc!r}"
                track.error_type = type(exc).__name__
                self._finish(track, TaskOutcome.ERROR)
        except Exception as exc:
            track.error = f"the executor could not run it: {type(exc).__name__}: {exc}"
            track.error_type = type(exc).__name__
            self._finish(track, TaskOutcome.ERROR)
        else:
            if report.kind != "not_started":
                track.absorb(report)
            self._handle(track, report)
        del self.inflight[future]

    def _handle(self, track: _Track, report: _Report) -> None:
        outcome = _FINAL_KINDS.get(report.kind)
        if outcome is not None:
            self._finish(track, outcome)
        elif report.kind == "held":
            track.held += 1
            self._held(track)
        elif report.kind == "lost":
            self._lost(track, report.error or "lease lost", report.error_type, delay=True)
        elif report.kind == "interrupted":
            if self.stopping:
                self._finish(track, TaskOutcome.INTERRUPTED)
            else:
                self._lost(track, report.error or "interrupted in its worker", report.error_type)
        elif self.stopping:  # not_started
            self._finish(track, TaskOutcome.NOT_RUN)
        else:
            self._lost(track, "its worker refused it after an interrupt", None)

    def _cancelled(self, track: _Track) -> None:
        dask = self.pool is None and self.executor is not None and _is_dask(self.executor)
        if self.stopping and dask:
            # Dask cancels running tasks too; such a task may still finish.
            track.error = "canceled by the interrupt; it may have been running"
            self._finish(track, TaskOutcome.INTERRUPTED)
            return
        if self.stopping:
            self._finish(track, TaskOutcome.NOT_RUN)
        else:
            self._lost(track, "its future was canceled outside the runner", "CancelledError")

    def _held(self, track: _Track) -> None:
        now = time.monotonic()
        if track.first_held is None:
            track.first_held = now
        limit = self.options.hold_timeout
        if self.stopping or (limit is not None and now - track.first_held >= limit):
            detail = track.error or "held by another worker"
            waited = now - track.first_held
            track.error = f"still held by another worker after {waited:.1f}s: {detail}"
            self._finish(track, TaskOutcome.HELD)
            return
        self._schedule(track, track.held)

    def _lost(self, track: _Track, why: str, error_type: str | None, delay: bool = False) -> None:
        track.lost += 1
        track.error, track.error_type = why, error_type
        if track.lost > self.options.max_lost_runs:
            track.error = f"gave up after {track.lost} lost runs; the last: {why}"
            self._finish(track, TaskOutcome.ERROR)
            return
        logger.info("task %s: run lost (%s); trying it again", track.task_id, why)
        if self.stopping:
            self._finish(track, TaskOutcome.INTERRUPTED)
        elif delay:
            self._schedule(track, track.lost)
        else:
            self.ready.appendleft(track.task_id)

    def _schedule(self, track: _Track, tries: int) -> None:
        """Put the task aside for a delay that doubles with each try, up to the lease ttl."""
        bound = self.options.max_retry_delay
        if bound is None:
            bound = track.lock_ttl if track.lock_ttl is not None else _DEFAULT_MAX_RETRY_DELAY
        delay = self.options.retry_delay * 2 ** min(tries - 1, 30)
        delay = min(bound, delay) * self._rng.uniform(0.8, 1.2)
        delay = min(delay, bound)
        self._seq += 1
        track.waiting = True
        heapq.heappush(self.waiting, (time.monotonic() + delay, self._seq, track.task_id))
        logger.debug("task %s: held; trying again in %.2fs", track.task_id, delay)

    def _finish(self, track: _Track, outcome: TaskOutcome) -> None:
        if track.result is not None:
            return
        error = None if outcome is TaskOutcome.COMPLETE else track.error
        if outcome is TaskOutcome.NOT_RUN and error is None:
            error = "not run: the batch was interrupted first"
        if outcome is TaskOutcome.INTERRUPTED and error is None:
            error = "interrupted while running; resumable"
        track.result = TaskResult(
            task_id=track.task_id,
            outcome=outcome,
            status=track.status,
            attempts=track.attempts,
            stage_attempts=track.stage_attempts,
            held=track.held,
            error=error,
            error_type=None if outcome is TaskOutcome.COMPLETE else track.error_type,
            started_at=track.started_at,
            finished_at=track.finished_at,
            run_seconds=track.run_seconds,
            worker=track.worker,
        )
        if outcome is TaskOutcome.COMPLETE:
            self._done += 1
        else:
            self._failed += 1
            logger.info("task %s: %s: %s", track.task_id, outcome.value, error)
        if self.options.on_result is not None:
            self.options.on_result(track.result)

    def _abandon_queued(self, why: str) -> None:
        """Give every task that is queued or waiting its final result (not run, or held)."""
        for task_id in list(self.ready):
            track = self.tracks[task_id]
            track.error = why if track.error is None or not track.held else track.error
            self._finish(track, TaskOutcome.HELD if track.held else TaskOutcome.NOT_RUN)
        self.ready.clear()
        for _, _, task_id in self.waiting:
            track = self.tracks[task_id]
            track.waiting = False
            if track.held:
                self._held(track)
            else:
                self._finish(track, TaskOutcome.NOT_RUN)
        self.waiting.clear()

    # -------------------------------------------------------------- Ctrl-C

    def _interrupt(self) -> None:
        """Stop: cancel what has not started, let running tasks stop resumably, collect."""
        self.stopping = True
        for future in list(self.inflight):
            future.cancel()
        deadline = time.monotonic() + self.options.interrupt_grace
        try:
            while self.inflight:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if self.pool is not None:
                    # Again and again: a worker that was starting up missed the last one.
                    self.pool.interrupt()
                    left = min(left, _REINTERRUPT_INTERVAL)
                done, _ = wait(list(self.inflight), timeout=left, return_when=FIRST_COMPLETED)
                for future in done:
                    self._collect(future)
        except KeyboardInterrupt:  # a second Ctrl-C: stop waiting
            if self.pool is not None:
                self.pool.terminate()
        for future in list(self.inflight):
            track = self.tracks[self.inflight.pop(future)[0]]
            track.error = "was running when the batch was interrupted; it may still be running"
            self._finish(track, TaskOutcome.INTERRUPTED)
        self._abandon_queued("not run: the batch was interrupted first")
        for track in self.tracks.values():  # interrupted between submit and bookkeeping
            if track.result is None:
                track.error = "interrupted while it was being submitted; its state is unknown"
                self._finish(track, TaskOutcome.INTERRUPTED)

    # -------------------------------------------------------------- reporting

    def counts(self) -> ProgressCounts:
        skipped = sum(1 for _, _, task_id in self.waiting if self.tracks[task_id].held)
        return ProgressCounts(
            total=len(self.tracks),
            done=self._done,
            failed=self._failed,
            running=len(self.inflight),
            skipped=skipped,
        )

    def _show(self) -> None:
        if self.display is not None:
            self.display.update(self.counts())

    def close_display(self) -> None:
        """End the progress line (once)."""
        if self.display is not None:
            self.display.close(self.counts())

    def _summary(self, interrupted: bool) -> BatchSummary:
        self.close_display()
        results = {}
        for task_id in self.order:
            result = self.tracks[task_id].result
            assert result is not None, task_id
            results[task_id] = result
        return BatchSummary(
            results=results,
            started_at=self.started_at,
            finished_at=time.time(),
            interrupted=interrupted,
        )


def _make_display(progress: bool | TextIO | ProgressDisplay | None) -> ProgressDisplay | None:
    if isinstance(progress, ProgressDisplay):
        return progress
    if progress is None:
        stream = sys.stderr
        return ProgressDisplay(stream) if stream is not None and is_terminal(stream) else None
    if progress is False:
        return None
    if progress is True:
        return ProgressDisplay(sys.stderr) if sys.stderr is not None else None
    return ProgressDisplay(progress)


def _check_picklable(factory: EngineFactory, io: TaskIO) -> None:
    for what, value in (("factory", factory), ("io", io)):
        try:
            pickle.dumps(value)
        except Exception as exc:
            raise ConfigurationError(
                f"the {what} {value!r} cannot be pickled, so it cannot travel to worker "
                f"processes ({type(exc).__name__}: {exc}); use a module-level function as the "
                "factory and a picklable TaskIO, or a thread pool"
            ) from exc


def run_tasks(
    factory: EngineFactory,
    task_ids: Iterable[str],
    io: TaskIO,
    *,
    executor: Executor | None = None,
    strict_recovery: bool = False,
    max_workers: int | None = None,
    max_in_flight: int | None = None,
    retry_delay: float = _DEFAULT_RETRY_DELAY,
    max_retry_delay: float | None = None,
    hold_timeout: float | None = None,
    max_lost_runs: int = 3,
    interrupt_grace: float = 30.0,
    progress: bool | TextIO | ProgressDisplay | None = None,
    on_result: Callable[[TaskResult], None] | None = None,
) -> BatchSummary:
    """Run every task id through its engine, on an executor, until each is finished.

    Each task runs in a worker as ``factory(task_id, io).execute(strict_recovery=...)``
    (bound with ``with engine:``). A task held by another worker is tried
    again later, after ``retry_delay`` seconds, then twice as long each time,
    up to ``max_retry_delay`` (default: the engine's ``lock_ttl``), so a batch
    whose last tasks are held elsewhere waits without spinning. A task whose
    holder died is resumed once its lease lapses. A task that ends in ERROR is
    reported and not retried. Task ids given twice run once.

    Args:
        factory: ``factory(task_id, io) -> CheckMateEngine``; see `EngineFactory`.
        task_ids: The tasks to run, in the order to start them.
        io: The store of every task; passed to the factory in the worker.
        executor: Where to run: any `concurrent.futures.Executor` (a thread
            pool, a process pool, ``distributed.Client.get_executor()``). It
            is not shut down. None: a process pool of ``max_workers`` workers
            (spawn start method; replaced if a worker dies), shut down at the end.
        strict_recovery: Passed to `CheckMateEngine.execute`: roll back and
            retry a stage found RUNNING after a crash instead of reporting it
            as NEEDS_RECOVERY.
        max_workers: Size of the default process pool (default: the number
            of CPUs this process may use). Only without ``executor``.
        max_in_flight: Most tasks submitted and not yet reported at once
            (default: twice the executor's workers).
        retry_delay: Seconds before the first new try of a held task.
        max_retry_delay: Longest delay between two tries of a held task
            (default: the task engine's ``lock_ttl``).
        hold_timeout: Give up on a task held by others for this many seconds
            (outcome HELD); None waits as long as it takes.
        max_lost_runs: How many runs of one task may be lost (its worker
            died, its lease was taken over) before it is reported as ERROR.
        interrupt_grace: After Ctrl-C, seconds to wait for running tasks to
            stop and report (a second Ctrl-C stops waiting).
        progress: A progress line: None shows it on stderr when stderr is a
            terminal; False never; True on stderr; a stream to write it to;
            or a `ProgressDisplay` (to choose colours and redraw interval).
        on_result: Called in this thread with each task's final `TaskResult`
            as soon as it is known (an exception it raises stops the batch).

    Returns:
        A `BatchSummary` with a `TaskResult` for every task id, in order.

    Raises:
        ConfigurationError: An invalid argument, or a factory or io that
            cannot be pickled for a process pool.
        BatchInterrupted: Ctrl-C; its ``summary`` holds the partial results.

    Example:
        ```python
        # jobs.py
        def build(task_id: str, io: TaskIO) -> CheckMateEngine:
            return CheckMateEngine(io, task_id=task_id, stage_templates=[...],
                                   retry_policy=RetryPolicy.STAGE, max_attempts=3)

        summary = run_tasks(build, ids, FsspecTaskIO("s3://bucket/jobs"), strict_recovery=True)
        for result in summary.not_complete:
            print(result.task_id, result.outcome, result.error)
        ```
    """
    if not callable(factory):
        raise ConfigurationError(f"factory must be callable, not {type(factory).__name__}")
    if not isinstance(io, TaskIO):
        raise ConfigurationError(f"io must be a TaskIO, not {type(io).__name__}")
    if executor is not None and max_workers is not None:
        raise ConfigurationError("pass either an executor or max_workers, not both")
    if max_workers is not None and max_workers < 1:
        raise ConfigurationError(f"max_workers must be >= 1, not {max_workers!r}")
    if max_in_flight is not None and max_in_flight < 1:
        raise ConfigurationError(f"max_in_flight must be >= 1, not {max_in_flight!r}")
    if retry_delay <= 0 or (max_retry_delay is not None and max_retry_delay <= 0):
        raise ConfigurationError("retry_delay and max_retry_delay must be > 0")
    if max_lost_runs < 0 or interrupt_grace < 0:
        raise ConfigurationError("max_lost_runs and interrupt_grace must be >= 0")
    if isinstance(task_ids, str):
        raise ConfigurationError("task_ids must be an iterable of task ids, not one string")
    order = list(dict.fromkeys(task_ids))
    if executor is None or isinstance(executor, ProcessPoolExecutor):
        _check_picklable(factory, io)
    options = _Options(
        strict_recovery=strict_recovery,
        max_in_flight=max_in_flight,
        retry_delay=retry_delay,
        max_retry_delay=max_retry_delay,
        hold_timeout=hold_timeout,
        max_lost_runs=max_lost_runs,
        interrupt_grace=interrupt_grace,
        on_result=on_result,
    )
    display = _make_display(progress)
    pool = None
    if executor is None and order:
        pool = _OwnPool(max_workers or min(default_worker_count(), len(order)))
    batch = _Batch(
        factory=factory,
        io=io,
        order=order,
        options=options,
        executor=executor,
        pool=pool,
        display=display,
    )
    finished = False
    try:
        summary = batch.run()
        finished = True
        return summary
    finally:
        batch.close_display()
        if pool is not None:
            pool.close(wait_for_workers=finished)
