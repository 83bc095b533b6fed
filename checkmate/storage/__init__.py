"""Storage backends: the `TaskIO` contract and its implementations."""

from .base import TaskIO
from .fsspec_io import FsspecTaskIO
from .local import LocalTaskIO

__all__ = ["FsspecTaskIO", "LocalTaskIO", "TaskIO"]
