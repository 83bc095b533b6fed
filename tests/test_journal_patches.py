"""Large objects in the local journal: a new version that ends like the last is a patch.

A status change of a stage with a large state changes only the object's first
bytes; the journal then writes the new head and points at the unchanged tail
of an earlier record, instead of writing (and hashing) the whole object again.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from checkmate import (
    BaseStage,
    BaseStageState,
    CheckMateEngine,
    CorruptStateError,
    FsspecTaskIO,
    LocalTaskIO,
    StageStatus,
)
from checkmate.storage._journal import _DATA_START, JOURNAL_NAME, parse_journal
from checkmate.storage._versions import CHUNK, chunk_digests, combine, content_version

pytestmark = pytest.mark.skipif(
    not LocalTaskIO(".").supports_conditional_write, reason="the journal needs flock (POSIX)"
)

BIG = 3 * CHUNK + 12_345


def body(size: int, seed: bytes = b"tail") -> bytes:
    block = hashlib.sha256(seed).digest() * 64
    return (block * (size // len(block) + 1))[:size]


def journal_size(root: Path) -> int:
    return len((root / "t" / JOURNAL_NAME).read_bytes().rstrip(b"\0"))


def assert_reads(root: Path, io: LocalTaskIO, name: str, data: bytes) -> None:
    """Every way to read the object gives ``data`` and its content version."""
    version = content_version(data)
    assert io.read_versioned(name) == (data, version)
    assert LocalTaskIO(root).read_versioned(name) == (data, version), "another process"
    assert parse_journal((root / "t" / JOURNAL_NAME).read_bytes())[name.split("/")[1]] == data


def test_versions_of_large_objects_hash_chunks_counted_from_the_end() -> None:
    small = body(CHUNK)
    assert content_version(small) == hashlib.sha256(small).hexdigest()[:32]
    large = body(BIG)
    tail_first = [large[: BIG % CHUNK]] + [
        large[at : at + CHUNK] for at in range(BIG % CHUNK, BIG, CHUNK)
    ]
    assert chunk_digests(large) == [hashlib.sha256(c).digest() for c in tail_first]
    assert content_version(large) == combine(chunk_digests(large)).hex()
    assert content_version(large) != content_version(large[:-1] + b"!")


@pytest.mark.parametrize(
    ("head", "new_head"),
    [
        (b'{"status":"RUNNING"', b'{"status":"RETRY","history":[1]'),  # grows
        (b'{"status":"RETRY","history":[1]', b'{"status":"RUNNING"'),  # shrinks
        (b"x" * (CHUNK + 7), b"y" * 3),  # a head longer than a chunk
        (b"same", b"same"),  # the same bytes again
    ],
)
def test_a_new_head_on_the_same_tail_is_a_patch(
    tmp_path: Path, head: bytes, new_head: bytes
) -> None:
    io = LocalTaskIO(tmp_path)
    io.defer_publication("t/")
    tail = body(BIG)
    first = head + tail
    v1 = io.write_if("t/big.json", first, None)
    before = journal_size(tmp_path)
    second = new_head + tail
    v2 = io.write_if("t/big.json", second, v1)
    assert v2 == content_version(second)
    written = journal_size(tmp_path) - before
    assert written < len(new_head) + 2 * CHUNK, "only the head and at most a chunk more"
    assert_reads(tmp_path, io, "t/big.json", second)
    third = b"third" + tail
    io.write_if("t/big.json", third, v2)  # patches point at the whole record, not at patches
    assert_reads(tmp_path, io, "t/big.json", third)
    io.sync("t/")
    io.flush()
    assert not (tmp_path / "t" / JOURNAL_NAME).exists()
    assert (tmp_path / "t" / "big.json").read_bytes() == third
    assert io.read_versioned("t/big.json") == (third, content_version(third))
    # After the checkpoint there is no record to patch against: the next write is whole.
    io.write("t/big.json", b"fourth" + tail)
    assert journal_size(tmp_path) > len(tail)
    assert io.read("t/big.json") == b"fourth" + tail


@pytest.mark.parametrize(
    "change",
    [
        lambda data: data[:-1] + b"!",  # the last byte
        lambda data: data[: len(data) // 2] + b"!" + data[len(data) // 2 + 1 :],  # the middle
        lambda data: data + b"more",  # appended: every chunk boundary moves
    ],
)
def test_a_change_near_the_end_writes_the_object_whole(tmp_path: Path, change: object) -> None:
    io = LocalTaskIO(tmp_path)
    io.defer_publication("t/")
    first = body(BIG)
    io.write("t/big.json", first)
    before = journal_size(tmp_path)
    second = change(first)  # type: ignore[operator]
    io.write("t/big.json", second)
    assert journal_size(tmp_path) - before > len(second) // 2
    assert_reads(tmp_path, io, "t/big.json", second)


def test_versions_agree_across_stores_and_compare_and_swap(tmp_path: Path) -> None:
    data = b"head" + body(BIG)
    # The fsspec store on local files versions by content too: the same versions.
    local, files = LocalTaskIO(tmp_path / "local"), FsspecTaskIO(f"file://{tmp_path}/fsspec")
    assert local.write_if("t/big.json", data, None) == files.write_if("t/big.json", data, None)
    patched = b"new head" + data[4:]
    v2 = local.write_if("t/big.json", patched, content_version(data))
    assert v2 == files.write_if("t/big.json", patched, content_version(data))
    other = LocalTaskIO(tmp_path / "local")  # another process: no base of its own, writes whole
    v3 = other.write_if("t/big.json", b"other" + data[4:], v2)
    assert local.read_versioned("t/big.json") == (b"other" + data[4:], v3)


def whole_then_patch(root: Path) -> tuple[LocalTaskIO, bytes, int]:
    """Journal ``first`` + a large tail, then ``second`` + the same tail (a patch).

    Returns the store, the tail and where the patch's batch starts.
    """
    io = LocalTaskIO(root)
    io.defer_publication("t/")
    tail = body(BIG)
    io.write("t/big.json", b"first" + tail)
    end = journal_size(root)
    io.write("t/big.json", b"second" + tail)
    return io, tail, end


def test_a_patch_cut_short_by_a_crash_never_counts(tmp_path: Path) -> None:
    _, tail, end = whole_then_patch(tmp_path)
    path = tmp_path / "t" / JOURNAL_NAME
    blob = path.read_bytes()
    patch_end = len(blob.rstrip(b"\0"))
    for cut in (end + 10, end + (patch_end - end) // 2, patch_end - 1):
        path.write_bytes(blob[:cut] + bytes(len(blob) - cut))  # a power cut mid-append
        assert LocalTaskIO(tmp_path).read("t/big.json") == b"first" + tail
    path.write_bytes(blob)
    assert LocalTaskIO(tmp_path).read("t/big.json") == b"second" + tail


def test_a_damaged_patch_followed_by_whole_records_is_refused(tmp_path: Path) -> None:
    io, _, end = whole_then_patch(tmp_path)
    io.write("t/small.json", b"later")
    path = tmp_path / "t" / JOURNAL_NAME
    blob = bytearray(path.read_bytes())
    blob[blob.index(b"second", end)] ^= 0xFF  # the patch's new head
    path.write_bytes(bytes(blob))
    with pytest.raises(CorruptStateError, match="damaged"):
        LocalTaskIO(tmp_path).read("t/small.json")
    assert path.read_bytes() == bytes(blob), "left as it was"
    assert _DATA_START < end


class BlobState(BaseStageState[None]):
    blob: str = ""


class Holder(BaseStage[BlobState]):
    def execute_stage(self, previous_state_copy: BlobState) -> None:
        del previous_state_copy


def test_status_changes_of_a_stage_with_a_large_state_write_little(tmp_path: Path) -> None:
    blob = "z" * (3 * CHUNK)
    io = LocalTaskIO(tmp_path)
    engine = CheckMateEngine(io, "t", [Holder(stage_name="big", state=BlobState(blob=blob))])
    engine.bind()
    try:
        stage = engine.stages[0]
        before = journal_size(tmp_path)
        stage.update_status("go", StageStatus.RUNNING, 0.0)
        stage.update_status("again", StageStatus.RETRY, 0.0)
        assert journal_size(tmp_path) - before < 2 * CHUNK
        data, version = LocalTaskIO(tmp_path).read_versioned(stage.obj_name)
        assert version == content_version(data)
        assert b'"status":"RETRY"' in data
        assert blob.encode() in data
    finally:
        engine.unbind()
        io.flush()
    assert os.path.getsize(tmp_path / "t" / "big.json") > len(blob)
    resumed = CheckMateEngine(
        LocalTaskIO(tmp_path), "t", [Holder(stage_name="big", state=BlobState())]
    )
    resumed.bind()
    try:
        assert resumed.stages[0].state.status is StageStatus.RETRY
        assert resumed.stages[0].state.blob == blob
    finally:
        resumed.unbind()


TAILS = [body(2 * CHUNK + 99, b"a"), body(3 * CHUNK, b"b"), body(2 * CHUNK + 5, b"a")]


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    steps=st.lists(
        st.one_of(
            st.tuples(
                st.just("write"),
                st.sampled_from(["x.json", "y.json"]),
                st.binary(max_size=300),
                st.integers(0, len(TAILS) - 1),
            ),
            st.tuples(st.just("delete"), st.sampled_from(["x.json", "y.json"])),
            st.tuples(st.just("checkpoint")),
        ),
        max_size=12,
    )
)
def test_any_sequence_of_large_writes_reads_back_as_written(
    tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[object, ...]]
) -> None:
    """Whole records, patches, deletes and checkpoints in any order: every process reads
    the newest bytes with their content version, and the published files match."""
    root = tmp_path_factory.mktemp("patches")
    io = LocalTaskIO(root)
    io.defer_publication("t/")
    model: dict[str, bytes] = {}
    for step in steps:
        if step[0] == "write":
            _, name, head, tail = step
            data = bytes(head) + TAILS[tail]  # type: ignore[arg-type, call-overload]
            io.write(f"t/{name}", data)
            model[str(name)] = data
        elif step[0] == "delete":
            io.delete(f"t/{step[1]}")
            model.pop(str(step[1]), None)
        else:
            io.sync("t/")
            io.flush()
            io.defer_publication("t/")
        other = LocalTaskIO(root)  # another process, reading the journal afresh
        for name in ("x.json", "y.json"):
            expected = model.get(name)
            for store in (io, other):
                if expected is None:
                    assert not store.exists(f"t/{name}")
                else:
                    assert store.read_versioned(f"t/{name}") == (
                        expected,
                        content_version(expected),
                    )
    io.sync("t/")
    io.flush()
    for name, data in model.items():
        assert (root / "t" / name).read_bytes() == data


def test_only_the_newest_few_large_objects_are_kept_to_patch_against(tmp_path: Path) -> None:
    """The whole records kept in memory are bounded: an object written long ago is
    written whole again rather than patched."""
    io = LocalTaskIO(tmp_path)
    io.defer_publication("t/")
    tail = body(BIG)
    for i in range(6):
        io.write(f"t/o{i}.json", b"%d" % i + tail)
    before = journal_size(tmp_path)
    io.write("t/o5.json", b"newest" + tail)  # still kept: a patch
    assert journal_size(tmp_path) - before < 2 * CHUNK
    before = journal_size(tmp_path)
    io.write("t/o0.json", b"oldest" + tail)  # no longer kept: whole
    assert journal_size(tmp_path) - before > len(tail)
    assert io.read("t/o0.json") == b"oldest" + tail
