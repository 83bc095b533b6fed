"""The runner side of `run_tasks`: schedule, retry, collect and report tasks."""

from __future__ import annotations

import contextlib
import heapq
import logging
import logging.handlers
import pickle
import random
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
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
from typing import TextIO

from .._progress import ProgressCounts, ProgressDisplay, is_terminal
from ..errors import ConfigurationError
from ..models import StageStatus
from ..naming import check_task_id
from ..storage.base import TaskIO
from ._pool import OwnPool, default_worker_count, is_dask
from ._results import BatchInterrupted, BatchSummary, TaskOutcome, TaskResult
from ._worker import EngineFactory, Report, run_task

__all__ = ["run_tasks"]


logger = logging.getLogger(__name__)


_DEFAULT_RETRY_DELAY = 0.5
_DEFAULT_MAX_RETRY_DELAY = 60.0
_PROGRESS_INTERVAL = 0.25
_DASK_CAPACITY_REFRESH = 2.0
_REINTERRUPT_INTERVAL = 0.5


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

    def absorb(self, report: Report) -> None:
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
    pool: OwnPool | None
    display: ProgressDisplay | None
    tracks: dict[str, _Track] = field(default_factory=dict)
    ready: deque[str] = field(default_factory=deque)
    waiting: list[tuple[float, int, str]] = field(default_factory=list)
    inflight: dict[Future[Report], tuple[str, int]] = field(default_factory=dict)
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
        if is_dask(executor):
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
                        run_task,
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

    def _collect(self, future: Future[Report]) -> None:
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

    def _handle(self, track: _Track, report: Report) -> None:
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
        dask = self.pool is None and self.executor is not None and is_dask(self.executor)
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
        pool = OwnPool(max_workers or min(default_worker_count(), len(order)))
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
