"""The storage side of one task: its objects' names and versions, reads and fenced writes.

`CheckMateEngine` decides *what* to persist and when; this module knows *how*:
which object holds which stage, how to read and validate them all in one
batch, how to write one (plain, create-if-absent, or fenced compare-and-swap
under a lease), how to seal a taken-over task, and how to delete it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from .codec import HistoryJSON, decode_state, encode_stage, meta_head, meta_prefix_from
from .errors import (
    LeaseLostError,
    StateMismatchError,
    TaskEngineException,
    TaskStateError,
    VersionConflict,
)
from .locking import BindLock
from .models import BaseStageState
from .naming import STAGE_SUFFIX, cancel_obj_name, lock_obj_name, stage_obj_name, task_prefix
from .retry import StorageRetry, storage_call
from .stage import BaseStage
from .storage.base import TaskIO

__all__ = ["TaskObjects"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_MAX_SEAL_TRIES = 10

State = BaseStageState[Any]


def _ignore(stage: BaseStage[Any]) -> None:
    del stage


class TaskObjects:
    """The objects of one task in one store, as seen by the engine that binds it."""

    def __init__(
        self,
        io: TaskIO,
        task_id: str,
        templates: Sequence[BaseStage[Any]],
        retry: StorageRetry,
    ) -> None:
        self.io = io
        self.task_id = task_id
        self.templates = templates
        self.retry = retry
        self.names = [stage_obj_name(task_id, t.stage_name) for t in templates]
        self.prefix = task_prefix(task_id)
        self.lock_name = lock_obj_name(task_id)
        self.lock: BindLock | None = None
        self.versions: dict[str, str] = {}
        self._batch: list[tuple[int, BaseStage[Any], bytes]] | None = None
        self._held: tuple[int, BaseStage[Any], bytes] | None = None
        self.persisted: Callable[[BaseStage[Any]], None] = _ignore
        """Called for each held or batched write once it has landed."""
        heads: dict[type, bytes] = {}
        for template in templates:
            if type(template) not in heads:
                heads[type(template)] = meta_head(type(template))
        self._heads = [heads[type(t)] for t in templates]
        self.prefixes = self._prefixes(None)
        self._histories = [HistoryJSON() for _ in templates]

    def _prefixes(self, epoch: int | None) -> list[bytes]:
        count = len(self._heads)
        return [meta_prefix_from(head, i, count, epoch) for i, head in enumerate(self._heads)]

    def call(self, action: str, obj_name: str, func: Callable[..., _T], *args: Any) -> _T:
        """Run one storage call with retries; a final failure becomes a StorageError."""
        return storage_call(self.retry, action, obj_name, func, *args, task_id=self.task_id)

    def attach(self, lock: BindLock | None) -> None:
        """Start a bind under ``lock`` (None: no lock): stage objects carry its epoch."""
        self.lock = lock
        self.versions = {}
        self.prefixes = self._prefixes(lock.epoch if lock is not None else None)

    def detach(self) -> None:
        """End the bind."""
        self.lock = None
        self.versions = {}
        self._held = None

    @property
    def fenced(self) -> bool:
        """True when writes are fenced by a lease."""
        return self.lock is not None and self.lock.is_lease

    # ------------------------------------------------------------------ reading

    def decode(self, position: int, data: bytes) -> State:
        """Parse and validate the object of the stage at ``position``."""
        return decode_state(
            self.templates[position],
            data,
            obj_name=self.names[position],
            task_id=self.task_id,
            position=position,
            stage_count=len(self.templates),
        )

    def read_one(self, position: int) -> State | None:
        """The persisted state of one stage, or None if it has no object."""
        name = self.names[position]
        try:
            data = self.call("read", name, self.io.read, name)
        except FileNotFoundError:
            return None
        return self.decode(position, data)

    def read_all(self, versioned: bool = False) -> list[State | None]:
        """Read and validate every stage object in one batch; None where there is none.

        With ``versioned``, also remember each object's version (for fenced writes).

        Raises:
            StateMismatchError: The task has stage objects no template accounts for.
            CorruptStateError: An object is invalid.
        """
        listed = self.call("list", self.prefix, self.io.list, self.prefix)
        expected = set(self.names)
        strangers = [n for n in listed if n.endswith(STAGE_SUFFIX) and n not in expected]
        if strangers:
            raise StateMismatchError(
                f"task {self.task_id!r} has stage objects that match none of the templates: "
                f"{', '.join(repr(n) for n in strangers[:5])}; run it with the stages it was "
                "created with, or use a new task id",
                task_id=self.task_id,
                obj_name=strangers[0],
            )
        present = set(listed)
        wanted = [n for n in self.names if n in present]
        found: dict[str, bytes]
        if versioned:
            with_versions: dict[str, tuple[bytes, str]] = (
                self.call("read", self.prefix, self.io.read_many_versioned, wanted)
                if wanted
                else {}
            )
            self.versions = {n: v for n, (_, v) in with_versions.items()}
            found = {n: d for n, (d, _) in with_versions.items()}
        else:
            found = self.call("read", self.prefix, self.io.read_many, wanted) if wanted else {}
        return [
            self.decode(i, found[name]) if name in found else None
            for i, name in enumerate(self.names)
        ]

    def existing_for_force_create(self) -> str | None:
        """The first object of the task that is not lock state, if any."""
        listed = self.call("list", self.prefix, self.io.list, self.prefix)
        return next((n for n in listed if not n.startswith(self.lock_name)), None)

    # ------------------------------------------------------------------ writing

    @contextlib.contextmanager
    def creating(self) -> Iterator[None]:
        """Collect the creating writes made inside; write them together at the end.

        On a store that can (the local journal), a new task's objects are then
        made durable with one write + fdatasync. Nothing is written if the block
        raises.
        """
        self._batch = []
        try:
            yield
            batch = self._batch
        finally:
            self._batch = None
        if batch:
            self._write_group(batch, create=True)

    def write(
        self, position: int, stage: BaseStage[Any], create: bool = False, hold: bool = False
    ) -> bool:
        """Persist a stage; with ``create``, only if its object does not exist yet.

        Under a lease every write is fenced: it is refused once the lease is
        lost, and it is a compare-and-swap on the version this engine last
        wrote, so it fails if a new owner touched the object meanwhile.

        With ``hold``, on a store that makes several writes durable at once
        (`TaskIO.write_many_if` overridden, e.g. the local journal), the write
        is kept until the next one and both go out together: one fsync instead
        of two. The caller runs no user code in between, and calls
        `flush_held` before it returns.

        Returns:
            True if the write landed and the caller reports it; False if it is
            held, batched or written with a held one (``persisted`` is called
            for it when it lands).
        """
        data = encode_stage(stage, self.prefixes[position], self.task_id, self._histories[position])
        if create and self._batch is not None:
            self._batch.append((position, stage, data))
            return False
        held, self._held = self._held, None
        mine = (position, stage, data)
        if held is not None and not create and held[0] != position:
            self._write_group([held, mine], create=False)
            return False
        if held is not None:
            self._write_group([held], create=False)
        if hold and self._can_hold():
            self._held = mine
            return False
        self._write_data(position, stage, data, create)
        return True

    def flush_held(self) -> None:
        """Write the held write, if any."""
        held, self._held = self._held, None
        if held is not None:
            self._write_group([held], create=False)

    def _can_hold(self) -> bool:
        return self.fenced and type(self.io).write_many_if is not TaskIO.write_many_if

    def _write_group(self, group: list[tuple[int, BaseStage[Any], bytes]], create: bool) -> None:
        """Write several stage objects, with one `TaskIO.write_many_if` where fenced.

        ``persisted`` is called for each, in order, once it has landed.
        """
        if self.fenced and len(group) > 1:
            lock = self.lock
            assert lock is not None
            names = [self.names[position] for position, _, _ in group]
            items = [
                (name, data, None if create else self.versions.get(name))
                for name, (_, _, data) in zip(names, group, strict=True)
            ]

            def attempt() -> list[str]:
                lock.check()
                return self.io.write_many_if(items)

            try:
                versions = self.call("write", names[0], attempt)
            except VersionConflict:
                pass  # an earlier try landed in part, or a new owner wrote: settle one by one
            else:
                self.versions.update(zip(names, versions, strict=True))
                for _, stage, _ in group:
                    self.persisted(stage)
                return
        for position, stage, data in group:
            self._write_data(position, stage, data, create)
            self.persisted(stage)

    def _write_data(self, position: int, stage: BaseStage[Any], data: bytes, create: bool) -> None:
        name = self.names[position]
        if self.fenced:
            self._fenced_write(name, data, None if create else self.versions.get(name))
            return
        if not create:
            self.call("write", name, self.io.write, name, data)
            return
        if not self.call("create", name, self.io.create, name, data) and not self._is_ours(
            name, data
        ):
            raise StateMismatchError(
                f"stage object {name!r} of task {self.task_id!r} appeared while the task was "
                "being created: another process is running it without a lock",
                task_id=self.task_id,
                stage_name=stage.stage_name,
                obj_name=name,
            )

    def _fenced_write(self, name: str, data: bytes, version: str | None) -> None:
        lock = self.lock
        assert lock is not None

        def attempt() -> str:
            lock.check()  # before every try: no retry goes out past the local deadline
            return self.io.write_if(name, data, version)

        try:
            self.versions[name] = self.call("write", name, attempt)
        except VersionConflict as exc:
            if self._is_ours(name, data):  # an earlier, retried try of ours landed
                self.versions[name] = self.call("read", name, self.io.read_versioned, name)[1]
                return
            lock.mark_lost()
            raise LeaseLostError(
                f"task {self.task_id!r}: {name!r} was changed by another worker, which took "
                "over the lease; this worker stops and writes nothing more",
                task_id=self.task_id,
                obj_name=name,
            ) from exc

    def _is_ours(self, name: str, data: bytes) -> bool:
        """After a write that was refused: did an earlier, retried try of ours land?"""
        try:
            return bool(self.call("read", name, self.io.read, name) == data)
        except FileNotFoundError:
            return False

    def seal(self, stages: Sequence[BaseStage[Any]]) -> None:
        """Rewrite every stage object under the new epoch, in stage order.

        The lease was taken over from a holder that may still be alive, paused
        in the middle of a write. Its writes are compare-and-swaps on versions
        it saw; rewriting each object changes that version, so any write it
        still sends is refused. A write of its that lands before the seal is
        read back, validated and sealed in turn (the stage's state is updated).
        """
        for position, stage in enumerate(stages):
            name = self.names[position]
            for _ in range(_MAX_SEAL_TRIES):
                if name not in self.versions:
                    break
                data = encode_stage(
                    stage, self.prefixes[position], self.task_id, self._histories[position]
                )
                try:
                    self.versions[name] = self.call(
                        "seal", name, self.io.write_if, name, data, self.versions[name]
                    )
                    break
                except VersionConflict:
                    fresh, version = self.call("read", name, self.io.read_versioned, name)
                    stage.state = self.decode(position, fresh)
                    self.versions[name] = version
            else:
                raise TaskStateError(
                    f"task {self.task_id!r}: stage object {name!r} keeps changing while this "
                    "worker takes the task over; another worker is still writing it",
                    task_id=self.task_id,
                    obj_name=name,
                )
        logger.warning("task %s: sealed the stage objects of the previous holder", self.task_id)

    # ------------------------------------------------------------------ whole task

    def defer(self) -> None:
        """Let the store keep the task's writes in its journal until `compact`."""
        self.io.defer_publication(self.prefix)

    def compact(self) -> None:
        """Let the store fold its journal into the task's objects (`TaskIO.sync`).

        Called after the lock is released (it writes no object). Every write is
        already durable, so a failure here only costs time on the next bind:
        it is logged, not raised.
        """
        try:
            self.call("sync", self.prefix, self.io.sync, self.prefix)
        except (TaskEngineException, OSError) as exc:
            logger.warning("could not compact the objects of task %s: %r", self.task_id, exc)

    def delete_all(self, locked: bool) -> None:
        """Delete the stage objects, the cancellation request and takeover markers.

        The lock object itself goes last, when the lock is released. Nothing
        the engine did not write is touched.
        """
        for name in [*self.names, cancel_obj_name(self.task_id)]:
            self.call("delete", name, self.io.delete, name)
        if not locked:
            return
        for name in self.call("list", self.prefix, self.io.list, self.prefix):
            if name.startswith(self.lock_name) and name != self.lock_name:
                self.call("delete", name, self.io.delete, name)
