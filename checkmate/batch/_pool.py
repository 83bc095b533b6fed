"""The runner's own process pool, and how many workers it gets by default."""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import multiprocessing
import os
import signal
from concurrent.futures import Executor, ProcessPoolExecutor
from typing import Any

from ._worker import init_worker, sigint_ignored

__all__ = ["OwnPool", "default_worker_count", "is_dask"]


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


class OwnPool:
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
        return sigint_ignored()

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=self._context,
            initializer=init_worker,
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


def is_dask(executor: Executor) -> bool:
    """Tell whether ``executor`` is a Dask ``distributed`` executor."""
    return type(executor).__module__.split(".", 1)[0] == "distributed"
