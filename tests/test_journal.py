"""The local write-ahead journal: durable writes, crash recovery, checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from checkmate import LocalTaskIO
from checkmate.storage._journal import JOURNAL_NAME, parse_journal

pytestmark = pytest.mark.skipif(
    not LocalTaskIO(".").supports_conditional_write, reason="the journal needs flock (POSIX)"
)


def journal(root: Path, task: str = "t") -> Path:
    return root / task / JOURNAL_NAME


def test_writes_are_journaled_and_visible_as_plain_files(tmp_path: Path) -> None:
    io = LocalTaskIO(tmp_path)
    io.write("t/a.json", b"one")
    io.write("t/a.json", b"two")
    assert (tmp_path / "t" / "a.json").read_bytes() == b"two"
    assert parse_journal(journal(tmp_path).read_bytes()) == {"a.json": b"two"}
    assert io.list("") == ["t/a.json"]


def test_sync_checkpoints_and_removes_the_journal(tmp_path: Path) -> None:
    io = LocalTaskIO(tmp_path)
    io.write("t/a.json", b"one")
    io.sync("t/")
    io.flush()
    assert not journal(tmp_path).exists()
    assert io.read("t/a.json") == b"one"


def test_a_lost_rename_is_replayed_by_the_next_process(tmp_path: Path) -> None:
    LocalTaskIO(tmp_path).write("t/a.json", b"committed")
    # As after a power cut: the journaled bytes are durable, the rename is not.
    (tmp_path / "t" / "a.json").write_bytes(b"")
    fresh = LocalTaskIO(tmp_path)  # a new process knows nothing of the directory
    assert fresh.read("t/a.json") == b"committed"
    assert not journal(tmp_path).exists()  # recovery checkpointed it


def test_a_lost_delete_is_replayed(tmp_path: Path) -> None:
    io = LocalTaskIO(tmp_path)
    io.write("t/a.json", b"x")
    io.write("t/b.json", b"y")
    io.delete("t/a.json")
    (tmp_path / "t" / "a.json").write_bytes(b"x")  # the unlink was lost
    assert LocalTaskIO(tmp_path).list("t/") == ["t/b.json"]


@pytest.mark.parametrize("live", [True, False])
def test_a_torn_record_is_cut_before_new_records_are_appended(tmp_path: Path, live: bool) -> None:
    writer = LocalTaskIO(tmp_path)
    writer.write("t/a.json", b"first")
    with journal(tmp_path).open("ab") as handle:
        handle.write(b"CMJ1\x00\x00")  # another writer died in the middle of an append
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
