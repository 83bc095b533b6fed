"""The local write-ahead journal: durable writes, crash recovery, checkpoints."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from pipelines import make_stages

from checkmate import CheckMateEngine, CorruptStateError, LocalTaskIO, StageStatus, VersionConflict
from checkmate.storage import _files, _journal
from checkmate.storage._journal import _DATA_START, JOURNAL_NAME, flush_all, parse_journal

pytestmark = pytest.mark.skipif(
    not LocalTaskIO(".").supports_conditional_write, reason="the journal needs flock (POSIX)"
)


def journal(root: Path, task: str = "t") -> Path:
    return root / task / JOURNAL_NAME


def test_writes_are_journaled_and_published_as_plain_files(tmp_path: Path) -> None:
    io = LocalTaskIO(tmp_path)
    io.write("t/a.json", b"one")
    io.write("t/a.json", b"two")
    assert (tmp_path / "t" / "a.json").read_bytes() == b"two"
    assert parse_journal(journal(tmp_path).read_bytes()) == {"a.json": b"two"}
    io.delete("t/a.json")
    assert not (tmp_path / "t").exists()


def test_deferred_writes_are_read_back_before_any_file_exists(tmp_path: Path) -> None:
    io = LocalTaskIO(tmp_path)
    io.defer_publication("t/")
    io.write("t/a.json", b"one")
    io.write("t/a.json", b"two")
    assert not (tmp_path / "t" / "a.json").exists()  # published at the checkpoint
    assert parse_journal(journal(tmp_path).read_bytes()) == {"a.json": b"two"}
    assert io.read("t/a.json") == b"two"
    assert io.list("") == ["t/a.json"]
    other = LocalTaskIO(tmp_path)  # another process reads through the journal too
    assert other.read("t/a.json") == b"two"
    assert other.read_many_versioned(["t/a.json", "t/b.json"]) == io.read_many_versioned(
        ["t/a.json"]
    )


def test_sync_publishes_plain_files_and_removes_the_journal(tmp_path: Path) -> None:
    io = LocalTaskIO(tmp_path)
    io.defer_publication("t/")
    io.write("t/a.json", b"one")
    io.write("t/b.json", b"two")
    version = io.read_versioned("t/a.json")[1]
    io.delete("t/b.json")
    io.sync("t/")
    io.flush()
    assert not journal(tmp_path).exists()
    assert (tmp_path / "t" / "a.json").read_bytes() == b"one"
    assert not (tmp_path / "t" / "b.json").exists()
    assert io.read_versioned("t/a.json") == (b"one", version), "versions survive a checkpoint"
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["a.json"]


def test_writes_of_other_processes_are_seen_and_cas_is_shared(tmp_path: Path) -> None:
    first, second = LocalTaskIO(tmp_path), LocalTaskIO(tmp_path)
    v1 = first.write_if("t/a.json", b"one", None)
    data, version = second.read_versioned("t/a.json")
    assert (data, version) == (b"one", v1)
    v2 = second.write_if("t/a.json", b"two", v1)
    with pytest.raises(VersionConflict):
        first.write_if("t/a.json", b"stale", v1)
    assert first.read_versioned("t/a.json") == (b"two", v2)
    second.delete_if("t/a.json", v2)
    assert not first.exists("t/a.json")
    assert first.list("t/") == []


def checkpointed_then_deferred(io: LocalTaskIO) -> None:
    """Checkpoint task ``t`` into plain files, then defer it again (as a new bind does)."""
    io.sync("t/")
    io.flush()
    io.defer_publication("t/")


def test_a_journal_left_by_a_crash_is_the_truth_for_the_next_process(tmp_path: Path) -> None:
    io = LocalTaskIO(tmp_path)
    io.write("t/a.json", b"old")
    checkpointed_then_deferred(io)
    io.write("t/a.json", b"committed")
    io.write("t/b.json", b"new")
    io.delete("t/c.json")
    # As after a crash: the journal is durable, nothing was published.
    fresh = LocalTaskIO(tmp_path)
    assert (tmp_path / "t" / "a.json").read_bytes() == b"old"
    assert fresh.read("t/a.json") == b"committed"
    assert fresh.list("t/") == ["t/a.json", "t/b.json"]
    fresh.sync("t/")
    fresh.flush()
    assert (tmp_path / "t" / "a.json").read_bytes() == b"committed"
    assert not journal(tmp_path).exists()


def test_a_delete_is_kept_until_the_checkpoint(tmp_path: Path) -> None:
    io = LocalTaskIO(tmp_path)
    io.write("t/a.json", b"x")
    io.write("t/b.json", b"y")
    checkpointed_then_deferred(io)
    io.delete("t/a.json")
    assert (tmp_path / "t" / "a.json").exists()  # unlinked by the checkpoint
    assert LocalTaskIO(tmp_path).list("t/") == ["t/b.json"]
    assert not LocalTaskIO(tmp_path).exists("t/a.json")


@pytest.mark.parametrize("live", [True, False])
def test_a_torn_record_is_cut_before_new_records_are_appended(tmp_path: Path, live: bool) -> None:
    writer = LocalTaskIO(tmp_path)
    writer.write("t/a.json", b"first")
    end = len(journal(tmp_path).read_bytes().rstrip(b"\0"))  # after the last record
    with journal(tmp_path).open("r+b") as handle:
        handle.seek(end)
        handle.write(b"CMJ3\x00\x00")  # another writer died in the middle of an append
    # A writer that already has the journal open (live), or one that opens it anew.
    (writer if live else LocalTaskIO(tmp_path)).write("t/b.json", b"second")
    records = parse_journal(journal(tmp_path).read_bytes())
    assert records.get("b.json") == b"second"


def test_a_hand_edit_after_a_checkpoint_is_kept(tmp_path: Path) -> None:
    io = LocalTaskIO(tmp_path)
    io.write("t/a.json", b"engine")
    io.sync("t/")
    io.flush()
    (tmp_path / "t" / "a.json").write_bytes(b"operator")
    assert LocalTaskIO(tmp_path).read("t/a.json") == b"operator"


def test_deleting_the_last_object_leaves_no_directory(tmp_path: Path) -> None:
    io = LocalTaskIO(tmp_path)
    io.write("t/a.json", b"x")
    io.delete("t/a.json")
    assert not (tmp_path / "t").exists()


def test_a_store_directory_removed_right_after_a_run_does_not_race_the_checkpoint() -> None:
    """The background checkpoint only fsyncs and deletes: it never creates a file that
    would make the removal of a temporary store fail."""
    for _ in range(20):
        with tempfile.TemporaryDirectory() as tmp:
            io = LocalTaskIO(tmp)
            assert CheckMateEngine(io, "t", make_stages(5)).execute() is StageStatus.COMPLETE
            files = sorted(p.name for p in (Path(tmp) / "t").iterdir() if p.suffix == ".json")
            assert files == [f"s{i}.json" for i in range(5)], (
                "the files are published before execute() returns"
            )
        flush_all()


def test_a_checkpoint_cut_short_leaves_the_journal_as_the_truth(tmp_path: Path) -> None:
    io = LocalTaskIO(tmp_path)
    io.defer_publication("t/")
    io.write("t/a.json", b"one")
    io.write("t/b.json", b"two")
    checkpointed_then_deferred(io)  # publishes now; the durable part runs in the background
    io.write("t/a.json", b"three")
    (tmp_path / "t" / "a.json").write_bytes(b"torn")  # as if a checkpoint died mid-file
    assert LocalTaskIO(tmp_path).read("t/a.json") == b"three"
    io.sync("t/")
    io.flush()
    assert (tmp_path / "t" / "a.json").read_bytes() == b"three"
    assert not journal(tmp_path).exists()


def test_a_journal_damaged_in_the_middle_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    """A bad record followed by whole ones is not a torn tail: cutting it off would lose
    writes that returned, so every access refuses with a typed error instead."""
    io = LocalTaskIO(tmp_path)
    io.defer_publication("t/")
    io.write("t/a.json", b"first")
    io.write("t/b.json", b"second")
    blob = bytearray(journal(tmp_path).read_bytes())
    blob[_DATA_START + 6] ^= 0xFF  # the first record's header
    journal(tmp_path).write_bytes(bytes(blob))
    for access in (
        lambda store: store.read("t/b.json"),
        lambda store: store.write("t/c.json", b"third"),
    ):
        with pytest.raises(CorruptStateError, match="damaged"):
            access(LocalTaskIO(tmp_path))
    assert journal(tmp_path).read_bytes() == bytes(blob)


@pytest.mark.parametrize("proc", [True, False], ids=["proc-fd", "stat"])
def test_a_journal_checkpointed_and_made_anew_by_another_process_is_noticed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, proc: bool
) -> None:
    """A process that keeps the old journal open must never append to the deleted file:
    its write would return and be lost. Checked through /proc (Linux) or with a stat."""
    if not proc:
        monkeypatch.setattr(_journal, "_PROC_FD", False)
    first, second = LocalTaskIO(tmp_path), LocalTaskIO(tmp_path)
    first.defer_publication("t/")
    first.write("t/a.json", b"one")  # the first store now holds the journal open
    second.write("t/b.json", b"two")
    second.sync("t/")
    second.flush()
    assert not journal(tmp_path).exists(), "checkpointed by the other process"
    second.write("t/b.json", b"three")  # a new journal file at the same path
    assert first.read("t/b.json") == b"three"
    first.write("t/a.json", b"four")
    fresh = LocalTaskIO(tmp_path)
    assert fresh.read("t/a.json") == b"four"
    assert parse_journal(journal(tmp_path).read_bytes()) == {"b.json": b"three", "a.json": b"four"}


@pytest.mark.parametrize("unnamed", [True, False])
def test_published_files_are_whole_and_leave_no_temp_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unnamed: bool
) -> None:
    """New files are written unnamed and linked into place where the system can (Linux),
    else through a temp file; existing ones are replaced. Either way, no stray files."""
    if not unnamed:
        monkeypatch.setattr(_files, "_TMPFILE", 0)
    io = LocalTaskIO(tmp_path)
    io.write("t/old.json", b"before")
    checkpointed_then_deferred(io)
    io.write("t/old.json", b"after")
    for i in range(3):
        io.write(f"t/new{i}.json", b"new %d" % i)
    io.sync("t/")
    io.flush()
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [
        "new0.json",
        "new1.json",
        "new2.json",
        "old.json",
    ]
    assert (tmp_path / "t" / "old.json").read_bytes() == b"after"
    assert (tmp_path / "t" / "new2.json").read_bytes() == b"new 2"
    assert oct((tmp_path / "t" / "new0.json").stat().st_mode & 0o777) == oct(
        (tmp_path / "t" / "old.json").stat().st_mode & 0o777
    )


@pytest.mark.parametrize("proc", [True, False], ids=["proc-fd", "stat"])
def test_a_journal_created_by_a_writer_that_died_before_its_first_write_is_taken_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, proc: bool
) -> None:
    """A journal file with no header yet (its creator died before the first batch) is
    no error: every access, the first and the later ones, reads through it."""
    if not proc:
        monkeypatch.setattr(_journal, "_PROC_FD", False)
    io = LocalTaskIO(tmp_path)
    io.write("t/a.json", b"one")
    checkpointed_then_deferred(io)
    journal(tmp_path).write_bytes(bytes(4096))  # created; its first batch never landed
    assert io.read("t/a.json") == b"one"
    assert io.read("t/a.json") == b"one"  # again, with the journal already open
    io.write("t/a.json", b"two")
    assert LocalTaskIO(tmp_path).read("t/a.json") == b"two"
