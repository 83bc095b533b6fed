"""What the object-store strategies (S3, GCS, Azure) share: async calls run on fsspec's loop."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from fsspec.asyn import sync

from ..errors import VersionConflict
from ._backend import Backend

__all__ = ["CloudBackend"]

_CONCURRENCY = 32


class CloudBackend(Backend):
    """A store with native conditional requests, reached through an async fsspec filesystem.

    Subclasses implement `_get` (body and version in one response) and
    `write_if` (a conditional upload).
    """

    atomic_create = True
    conditional_write = True

    def _run(self, coro_fn: Any, *args: Any) -> Any:
        return sync(self.fs.loop, coro_fn, *args)

    async def _get(self, path: str) -> tuple[bytes, str]:
        raise NotImplementedError

    def create(self, path: str, data: bytes) -> bool:
        """Create-if-absent: a conditional upload on "no version"."""
        try:
            self.write_if(path, data, None)
        except VersionConflict:
            return False
        return True

    def read_versioned(self, path: str) -> tuple[bytes, str]:
        """The body and its version, from one response."""
        result: tuple[bytes, str] = self._run(self._get, path)
        return result

    def read_many_versioned(self, paths: Sequence[str]) -> dict[str, tuple[bytes, str]]:
        """Concurrent reads (at most 32 at a time); missing objects are left out."""

        async def fetch_all() -> list[Any]:
            gate = asyncio.Semaphore(_CONCURRENCY)

            async def one(path: str) -> Any:
                async with gate:
                    try:
                        return await self._get(path)
                    except FileNotFoundError:
                        return None

            return await asyncio.gather(*(one(p) for p in paths))

        results = self._run(fetch_all) if paths else []
        return {p: r for p, r in zip(paths, results, strict=True) if r is not None}
