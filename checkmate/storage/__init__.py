"""Storage backends: the `TaskIO` contract and its implementations."""

import typing as _typing

from .._lazy import lazy_attributes as _lazy_attributes
from .base import TaskIO

if _typing.TYPE_CHECKING:
    from .fsspec_io import FsspecTaskIO
    from .local import LocalTaskIO

__all__ = ["FsspecTaskIO", "LocalTaskIO", "TaskIO"]

# Loaded on first use: `FsspecTaskIO` imports fsspec, which `TaskIO` users
# (and `LocalTaskIO` users) do not need.
_LAZY = {"FsspecTaskIO": "fsspec_io", "LocalTaskIO": "local"}


if not _typing.TYPE_CHECKING:  # mypy sees the imports above, not an Any-typed __getattr__
    __getattr__, __dir__ = _lazy_attributes(__name__, _LAZY, globals())
