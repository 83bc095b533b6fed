"""Content versions: a hash of an object's bytes, in chunks counted from its end.

An object of at most `CHUNK` bytes is versioned by the SHA-256 of its bytes. A
larger one is cut into chunks of `CHUNK` bytes counted from its end (the first
chunk takes the remainder) and versioned by the SHA-256 of its chunks'
SHA-256s. Both are pure functions of the bytes, so every store and every
process computes the same version for the same content.

Counting from the end is what lets a store skip unchanged bytes: a stage's
small, changing members (status, attempts, history) come before its state's
own fields, so a status change of a stage with a large state changes only its
first chunks. Whoever keeps the digests of the last chunks of the previous
version hashes only the new first chunks (see the journal's patch records).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

__all__ = ["CHUNK", "chunk_digests", "combine", "content_version", "digest_of"]

CHUNK = 1 << 20
_DIGEST_SIZE = 16
_CHUNKED = b"checkmate-chunks\0"  # keeps the two kinds of version apart


def chunk_digests(data: bytes | memoryview) -> list[bytes]:
    """The SHA-256 of each chunk of ``data``, chunks counted from its end."""
    view = memoryview(data)
    first = len(view) % CHUNK
    digests = [hashlib.sha256(view[:first]).digest()] if first else []
    digests.extend(
        hashlib.sha256(view[at : at + CHUNK]).digest() for at in range(first, len(view), CHUNK)
    )
    return digests


def combine(digests: Sequence[bytes]) -> bytes:
    """The version digest of a large object from its chunk digests."""
    return hashlib.sha256(b"".join((_CHUNKED, *digests))).digest()[:_DIGEST_SIZE]


def digest_of(data: bytes | memoryview) -> bytes:
    """The 16-byte version digest of ``data``."""
    if len(data) <= CHUNK:
        return hashlib.sha256(data).digest()[:_DIGEST_SIZE]
    return combine(chunk_digests(data))


def content_version(data: bytes | memoryview) -> str:
    """The version token of ``data`` on stores that version by content."""
    return digest_of(data).hex()
