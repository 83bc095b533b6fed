"""Bounded retries with exponential backoff for storage calls.

Storage on networks fails now and then (timeouts, throttling, dropped
connections). Every storage call the engine and the lock make goes through
`StorageRetry.call`, which retries transient `OSError`s a bounded number of
times. Errors that retrying cannot fix (not found, already exists, permission
denied, a bad name) are raised at once.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import ConfigurationError, StorageError, TaskEngineException

__all__ = ["StorageRetry", "storage_call"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

_PERMANENT: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


@dataclass(frozen=True)
class StorageRetry:
    """How often, and how patiently, a failed storage call is retried.

    The defaults make 5 tries within about 1.5 seconds.

    Attributes:
        attempts: Total tries per call (1 disables retries).
        initial_delay: Seconds to wait after the first failure.
        max_delay: Upper bound of a single wait.
        multiplier: Growth factor of the wait after each failure.
        sleep: The function used to wait (replace it in tests).
    """

    attempts: int = 5
    initial_delay: float = 0.1
    max_delay: float = 1.0
    multiplier: float = 2.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.initial_delay < 0 or self.max_delay < 0:
            raise ConfigurationError(
                f"invalid StorageRetry {self!r}: attempts must be >= 1 and delays >= 0"
            )

    @staticmethod
    def is_transient(exc: BaseException) -> bool:
        """Tell whether retrying the call that raised ``exc`` may help."""
        return isinstance(exc, OSError) and not isinstance(exc, (*_PERMANENT, TaskEngineException))

    def call(self, func: Callable[..., _T], *args: Any) -> _T:
        """Call ``func(*args)``, retrying transient errors; re-raise the last one."""
        delay = self.initial_delay
        for attempt in range(1, self.attempts + 1):
            try:
                return func(*args)
            except OSError as exc:
                if attempt == self.attempts or not self.is_transient(exc):
                    raise
                logger.warning(
                    "storage call %s failed (%r), try %d of %d; retrying in %.2fs",
                    getattr(func, "__name__", func),
                    exc,
                    attempt,
                    self.attempts,
                    delay,
                )
                self.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311
                delay = min(delay * self.multiplier, self.max_delay)
        raise AssertionError("unreachable")  # pragma: no cover


def storage_call(
    retry: StorageRetry,
    action: str,
    obj_name: str,
    func: Callable[..., _T],
    *args: Any,
    task_id: str | None = None,
) -> _T:
    """Run one storage call with ``retry``; a final transient failure becomes `StorageError`.

    Permanent errors (not found, exists, permission, TaskEngineExceptions)
    propagate unchanged.
    """
    try:
        return retry.call(func, *args)
    except OSError as exc:
        if not StorageRetry.is_transient(exc):
            raise
        where = f" of task {task_id!r}" if task_id else ""
        raise StorageError(
            f"could not {action} {obj_name!r}{where}: {exc!r}. Nothing after this point "
            "ran; check the store and run the task again to resume",
            task_id=task_id,
            obj_name=obj_name,
        ) from exc
