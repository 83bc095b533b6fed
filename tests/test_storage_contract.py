"""Conformance suite of the public `TaskIO` contract, run on every backend of the `io` fixture."""

from __future__ import annotations

import multiprocessing
import threading
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pytest
from conftest import make_io, store_spec
from pipelines import open_store

from checkmate import FsspecTaskIO, LocalTaskIO, TaskEngineException, TaskIO
from checkmate.naming import check_obj_name

BAD_NAMES = ["", "/abs", "/", "..", "../x", "a/../b", "a/..", ".", "./a", "a//b", "a/", "a\\b"]
WORKERS = 8


def snapshot(io: TaskIO) -> dict[str, bytes]:
    return {name: io.read(name) for name in io.list("")}


# ---------------------------------------------------------------- read / write


def test_read_missing_raises_file_not_found(io: TaskIO) -> None:
    with pytest.raises(FileNotFoundError):
        io.read("nope")
    with pytest.raises(FileNotFoundError):
        io.read("task/nope.json")


@pytest.mark.parametrize("data", [b"hello", b"", bytes(range(256)) * 10, b"\x00\xff" * 70_000])
def test_write_then_read(io: TaskIO, data: bytes) -> None:
    io.write("task/obj.json", data)
    assert io.read("task/obj.json") == data
    assert io.exists("task/obj.json")


def test_overwrite_replaces_the_bytes(io: TaskIO) -> None:
    io.write("t/o", b"first version, rather long " * 100)
    io.write("t/o", b"second")
    assert io.read("t/o") == b"second"
    io.write("t/o", b"third, " * 1000)
    assert io.read("t/o") == b"third, " * 1000
    assert io.list("") == ["t/o"]


def test_unicode_names_round_trip(io: TaskIO) -> None:
    name = "t\u00e2che/\u00e9tape-\u00fc~1.json"
    io.write(name, b"x")
    assert io.read(name) == b"x"
    assert io.list("") == [name]
    assert io.exists(name)


# ---------------------------------------------------------------- create


def test_create_returns_true_then_false_and_never_overwrites(io: TaskIO) -> None:
    assert io.create("t/lock", b"one") is True
    assert io.create("t/lock", b"two") is False
    assert io.read("t/lock") == b"one"
    io.write("t/other", b"written")
    assert io.create("t/other", b"created") is False
    assert io.read("t/other") == b"written"


def test_create_after_delete_succeeds_again(io: TaskIO) -> None:
    assert io.create("t/lock", b"one")
    io.delete("t/lock")
    assert io.create("t/lock", b"two")
    assert io.read("t/lock") == b"two"


# ---------------------------------------------------------------- delete / exists


def test_delete_missing_is_a_no_op(io: TaskIO) -> None:
    io.delete("nope")
    io.delete("deep/er/nope")
    io.write("t/keep", b"k")
    io.delete("t/nope")
    assert snapshot(io) == {"t/keep": b"k"}


def test_delete_removes_only_that_object(io: TaskIO) -> None:
    io.write("t/a", b"a")
    io.write("t/b", b"b")
    io.delete("t/a")
    assert not io.exists("t/a")
    with pytest.raises(FileNotFoundError):
        io.read("t/a")
    assert snapshot(io) == {"t/b": b"b"}
    io.delete("t/b")
    assert io.list("") == []


def test_exists(io: TaskIO) -> None:
    assert not io.exists("t/a")
    io.write("t/a", b"")
    assert io.exists("t/a")
    io.delete("t/a")
    assert not io.exists("t/a")


def test_a_prefix_directory_is_not_an_object(io: TaskIO) -> None:
    io.write("dir/sub/obj", b"x")
    for name in ("dir", "dir/sub"):
        assert not io.exists(name)
        with pytest.raises(FileNotFoundError):
            io.read(name)
        io.delete(name)
    assert snapshot(io) == {"dir/sub/obj": b"x"}
    assert io.read_many(["dir", "dir/sub", "dir/sub/obj"]) == {"dir/sub/obj": b"x"}


# ---------------------------------------------------------------- list


def test_list_is_recursive_sorted_and_filtered_by_prefix(io: TaskIO) -> None:
    names = ["b/z", "a/2", "a/10", "a/1/deep/x", "ab", "abc/d", "a.json", "t/s0.json", "t/s1.json"]
    for name in names:
        io.write(name, name.encode())
    assert io.list("") == sorted(names)
    assert io.list() == sorted(names)
    assert io.list("a/") == ["a/1/deep/x", "a/10", "a/2"]
    assert io.list("a/1") == ["a/1/deep/x", "a/10"]  # a partial last component
    assert io.list("a") == sorted(n for n in names if n.startswith("a"))
    assert io.list("ab") == ["ab", "abc/d"]
    assert io.list("t/s") == ["t/s0.json", "t/s1.json"]
    assert io.list("t/s1") == ["t/s1.json"]
    assert io.list("a/1/deep/x") == ["a/1/deep/x"]
    assert io.list("zzz") == []
    assert io.list("zzz/") == []
    assert io.list("b/z/") == []


def test_list_of_an_empty_store_is_empty(io: TaskIO) -> None:
    assert io.list("") == []
    assert io.list("t/") == []


def test_list_names_only_objects_never_temp_files(io: TaskIO) -> None:
    """While objects are being written, list() shows only complete, real objects."""
    names = [f"t/obj{i}.json" for i in range(4)]
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            payload = b"p" * 65536
            while not stop.is_set():
                for name in names:
                    io.write(name, payload)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    io.write(names[0], b"p")
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(200):
            listed = io.list("")
            assert set(listed) <= set(names), listed
            assert listed == sorted(listed)
            listed = io.list("t/obj")
            assert set(listed) <= set(names), listed
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert not errors, errors
    assert io.list("") == names


def _outside_root_url(io: TaskIO) -> str:
    """A URL beside the store's root, i.e. outside it."""
    root = io.url("x").rsplit("/", 1)[0]
    return f"{root.rsplit('/', 1)[0]}/outside-{uuid.uuid4().hex}.txt"


@pytest.mark.parametrize("prefix", ["../", "../o", "..", "a/../", "./", "/"])
def test_list_never_escapes_the_root(io: TaskIO, prefix: str) -> None:
    io.write("a/b", b"inside")
    outside = _outside_root_url(io)
    with fsspec.open(outside, "wb") as handle:
        handle.write(b"outside")
    try:
        try:
            listed = io.list(prefix)
        except TaskEngineException:
            return  # refusing the prefix is fine
        everything = io.list("")
        for name in listed:
            assert check_obj_name(name) == name
            assert name in everything
        assert not any("outside-" in name for name in listed)
    finally:
        fsspec.open(outside).fs.rm(outside)


# ---------------------------------------------------------------- url, read_many


def test_url_is_a_full_url_of_the_object(io: TaskIO, backend: str) -> None:
    io.write("t/s0.json", b"zero")
    io.write("t/s1.json", b"one")
    url0, url1 = io.url("t/s0.json"), io.url("t/s1.json")
    assert url0 != url1
    schemes = {"memory": ("memory://",), "s3": ("s3://",), "gcs": ("gs://", "gcs://")}
    schemes["azure"] = ("az://", "abfs://")
    assert url0.startswith(schemes.get(backend, ("file://",)))
    assert url0.endswith("/t/s0.json")
    io.sync("t/")  # a journaling store publishes its objects as plain files here
    if isinstance(io, LocalTaskIO | FsspecTaskIO):
        io.flush()
    with fsspec.open(url0, "rb") as handle:
        assert handle.read() == b"zero"
    with fsspec.open(url1, "rb") as handle:
        assert handle.read() == b"one"


def test_read_many_skips_missing(io: TaskIO) -> None:
    io.write("t/a", b"A")
    io.write("t/c", b"C")
    assert io.read_many(["t/a", "t/b", "t/c", "u/x"]) == {"t/a": b"A", "t/c": b"C"}
    assert io.read_many([]) == {}
    assert io.read_many(["t/b"]) == {}
    assert io.read_many(iter(["t/c"])) == {"t/c": b"C"}


# ---------------------------------------------------------------- invalid names


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_object_names_raise(io: TaskIO, name: str) -> None:
    io.write("t/keep", b"k")
    before = snapshot(io)
    calls = {
        "read": lambda: io.read(name),
        "write": lambda: io.write(name, b"evil"),
        "create": lambda: io.create(name, b"evil"),
        "delete": lambda: io.delete(name),
        "exists": lambda: io.exists(name),
        "url": lambda: io.url(name),
        "read_many": lambda: io.read_many(["t/keep", name]),
    }
    problems = []
    for label, call in calls.items():
        try:
            call()
        except TaskEngineException:
            continue
        except Exception as exc:
            problems.append(f"{label}({name!r}) raised {exc!r}")
        else:
            problems.append(f"{label}({name!r}) did not raise")
    assert not problems
    assert snapshot(io) == before


# ---------------------------------------------------------------- concurrency


def test_create_under_thread_contention_has_one_winner(io: TaskIO) -> None:
    barrier = threading.Barrier(WORKERS)
    results: dict[int, bool] = {}
    seen: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def contender(index: int) -> None:
        try:
            payload = bytes([65 + index]) * 200_000
            barrier.wait(timeout=30)
            results[index] = io.create("t/lock", payload)
            # Whatever create() returned, the object is complete from now on.
            seen[index] = io.read("t/lock")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    winners = [i for i, won in results.items() if won]
    assert len(results) == WORKERS
    assert len(winners) == 1, results
    expected = bytes([65 + winners[0]]) * 200_000
    assert io.read("t/lock") == expected
    assert all(data == expected for data in seen.values())
    assert io.list("") == ["t/lock"]


def _create_in_process(spec: str, byte: int, barrier: Any, results: Any) -> None:
    io = open_store(spec)
    payload = bytes([byte]) * (1 << 20)
    barrier.wait(timeout=60)
    won = io.create("t/lock", payload)
    results.put((byte, won, io.read("t/lock") == payload))


@pytest.mark.parametrize("kind", ["local", "file"])
def test_create_under_process_contention_has_one_winner(kind: str, tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(WORKERS)
    results = ctx.Queue()
    spec = store_spec(kind, tmp_path)
    procs = [
        ctx.Process(target=_create_in_process, args=(spec, 65 + i, barrier, results))
        for i in range(WORKERS)
    ]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    winners = [byte for byte, won, _ in outcomes if won]
    assert len(winners) == 1, outcomes
    assert [mine for _, won, mine in outcomes if won] == [True]
    io = make_io(kind, tmp_path)
    data = io.read("t/lock")
    assert data == bytes([winners[0]]) * (1 << 20), "the winner's content, complete"
    assert io.list("") == ["t/lock"]


def test_reader_never_sees_a_torn_write(io: TaskIO) -> None:
    size = 64 * 1024
    payloads = (b"A" * size, b"B" * size)
    io.write("t/obj", payloads[0])
    stop = threading.Event()
    errors: list[BaseException] = []
    writes = [0]

    def writer() -> None:
        try:
            while not stop.is_set():
                io.write("t/obj", payloads[writes[0] % 2])
                writes[0] += 1
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(200):
            data = io.read("t/obj")
            assert data in payloads, f"torn read: {len(data)} bytes, {set(data)!r}"
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert not errors, errors
    assert writes[0] > 0
    assert io.list("") == ["t/obj"]
