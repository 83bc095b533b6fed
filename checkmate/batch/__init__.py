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

from .._progress import ProgressDisplay
from ._pool import default_worker_count
from ._results import BatchInterrupted, BatchSummary, TaskOutcome, TaskResult
from ._runner import run_tasks
from ._worker import EngineFactory

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
