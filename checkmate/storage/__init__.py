"""Storage backends: the `TaskIO` contract and its implementations."""

import typing as _typing

from .base import TaskIO

if _typing.TYPE_CHECKING:
    from .fsspec_io import FsspecTaskIO
    from .local import LocalTaskIO

__all__ = ["FsspecTaskIO", "LocalTaskIO", "TaskIO"]

# Loaded on first use: `FsspecTaskIO` imports fsspec, which `TaskIO` users
# (and `LocalTaskIO` users) do not need.
_LAZY = {"FsspecTaskIO": "fsspec_io", "LocalTaskIO": "local"}


if not _typing.TYPE_CHECKING:  # mypy sees the imports above, not an Any-typed __getattr__

    def __getattr__(name: str) -> _typing.Any:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        from importlib import import_module  # noqa: PLC0415 - only for the lazy names

        value = getattr(import_module(f"{__name__}.{module}"), name)
        globals()[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *_LAZY})
