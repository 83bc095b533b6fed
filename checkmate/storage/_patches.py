"""Large objects in the journal: write a new version as a patch of the last whole one.

A status change of a stage with a large state changes only the object's first
bytes (the stage's status, attempts and history come before its state's own
fields). When a new version ends with the same whole chunks (`_versions`,
counted from the end) as the object's last whole record in the same journal
file, the journal writes only the new head, with the place of that unchanged
tail in the earlier record; only the head is hashed, since the tail's chunk
digests are kept with the whole record. A patch never points at another patch.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from ._versions import CHUNK, chunk_digests, combine

__all__ = ["PATCH_MIN", "Base", "Planned", "keep_base", "parse_patch", "plan_large"]

# A patch record's data starts with: where the unchanged tail it reuses lies in
# the journal file, its length, and the digest of the new head that follows.
_HEAD = struct.Struct(">QQ16s")
PATCH_MIN = 2 * CHUNK  # smaller objects are always written whole
_BASES_PER_DIR = 4  # whole large records kept in memory per directory, to patch against


class Base(NamedTuple):
    """A whole record of a large object, kept to write the next version as a patch."""

    data: bytes
    offset: int  # of the data, in the journal file
    digests: list[bytes]  # of its chunks


class Planned:
    """One record to append: its data's parts, its version digest, what the index needs."""

    __slots__ = ("chunks", "digest", "parts", "prefix", "size", "tail")

    def __init__(
        self,
        data: bytes | memoryview,
        digest: bytes,
        chunks: list[bytes] | None = None,
        patch: bytes = b"",
        tail: tuple[int, int] = (0, 0),
    ) -> None:
        self.parts: tuple[bytes | memoryview, ...] = (patch, data) if patch else (data,)
        self.prefix = len(patch)  # bytes before the object's own (a patch's head)
        self.size = len(patch) + len(data)
        self.digest = digest  # the object's version digest
        self.chunks = chunks  # a whole large record's chunk digests (kept as a base)
        self.tail = tail  # a patch's reused tail: offset and size in the journal (0: whole)


def plan_large(base: Base | None, data: bytes) -> Planned:
    """Write a large object as a patch of ``base`` when they end alike, else whole.

    Only whole chunks (counted from the end, as versions count them) are
    compared, so the reused tail's chunk digests are the base's: only the new
    head is hashed and written.
    """
    if base is not None:
        same = 0
        most = min(len(base.data) // CHUNK, (len(data) - 1) // CHUNK)
        while same < most:
            at = len(data) - (same + 1) * CHUNK
            base_at = len(base.data) - (same + 1) * CHUNK
            if not data.startswith(memoryview(base.data)[base_at : base_at + CHUNK], at):
                break
            same += 1
        if same:
            tail_size = same * CHUNK
            head = memoryview(data)[: len(data) - tail_size]
            head_digests = chunk_digests(head)
            tail_offset = base.offset + len(base.data) - tail_size
            patch = _HEAD.pack(tail_offset, tail_size, combine(head_digests))
            digest = combine(head_digests + base.digests[len(base.digests) - same :])
            return Planned(head, digest, patch=patch, tail=(tail_offset, tail_size))
    chunks = chunk_digests(data)
    return Planned(data, combine(chunks), chunks)


def keep_base(bases: dict[str, Base], name: str, base: Base) -> None:
    """Keep ``base`` as the newest of a directory's few bases (the oldest goes)."""
    bases.pop(name, None)
    if len(bases) >= _BASES_PER_DIR:
        del bases[next(iter(bases))]
    bases[name] = base


def parse_patch(data: bytes, lowest: int, below: int) -> tuple[int, int, int] | None:
    """A patch record's (prefix, tail offset, tail size); None if the data is not a patch.

    ``prefix`` is the size of the patch's own fields, before the new head.

    The tail must lie in ``[lowest, below)`` of the journal file, and the head
    that follows the patch's own fields must match the digest they carry.
    """
    if len(data) < _HEAD.size:
        return None
    tail_offset, tail_size, check = _HEAD.unpack_from(data)
    head = memoryview(data)[_HEAD.size :]
    if (
        not tail_size
        or tail_offset < lowest
        or tail_offset + tail_size > below
        or combine(chunk_digests(head)) != check
    ):
        return None
    return _HEAD.size, tail_offset, tail_size
