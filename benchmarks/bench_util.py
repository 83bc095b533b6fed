"""Small helpers shared by the benchmark modules: paths, statistics, temp dirs."""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "benchmarks"
PEERS_DIR = BENCH_DIR / "peers"
# T2: "import pydantic, then define one model", timed beside the imports: the least any
# library whose public classes are pydantic models pays (a model imports pydantic's schema code).
ONE_MODEL = "pydantic + one model"
ONE_MODEL_CODE = "from pydantic import BaseModel\nclass One(BaseModel):\n    x: int"

now = time.perf_counter


def shared_dir() -> Path:
    """The shared peer harness: ``$PEER_BENCH_DIR``, else ``<repo>/../shared/peer-bench``."""
    env = os.environ.get("PEER_BENCH_DIR")
    return Path(env) if env else REPO.parent / "shared" / "peer-bench"


def add_harness_paths() -> None:
    """Make the shared harness modules (common, c_floor, ...) and c_checkmate importable."""
    for path in (str(PEERS_DIR), str(shared_dir())):
        if path not in sys.path:
            sys.path.insert(0, path)


def tmp_root() -> str:
    """Where temp dirs go (``$PEERS_TMP`` like the shared harness, else /tmp)."""
    return os.environ.get("PEERS_TMP", tempfile.gettempdir())


_LEFTOVERS: list[str] = []


def delete_later(path: str) -> None:
    """Delete ``path`` when the whole benchmark ends (`delete_leftovers`), not now.

    On this disk (ext4 without a journal) creating a file skips every inode
    deleted in the last 60-360 s (``recently_deleted`` in the kernel's inode
    allocator, seen with perf): right after a cleanup of thousands of files, a
    file creation cost up to 600 µs instead of 30-50 µs. Cleaning up between
    parts or runs would charge it to whatever is measured next.
    """
    _LEFTOVERS.append(path)


def delete_leftovers() -> None:
    """Delete what `delete_later` kept."""
    while _LEFTOVERS:
        shutil.rmtree(_LEFTOVERS.pop(), ignore_errors=True)


@contextmanager
def temp_dir(prefix: str) -> Iterator[str]:
    """A fresh temp dir, deleted when the benchmark ends (`delete_later`)."""
    path = tempfile.mkdtemp(prefix=prefix, dir=tmp_root())
    try:
        yield path
    finally:
        delete_later(path)


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def fmt_us(seconds: float) -> str:
    """Seconds as microseconds with thousands separators."""
    if seconds != seconds:  # nan
        return "-"
    us = seconds * 1e6
    return f"{us:,.0f}" if us >= 100 else f"{us:.1f}"


def fmt_ms(seconds: float) -> str:
    if seconds != seconds:
        return "-"
    return f"{seconds * 1e3:,.1f}"


def fmt_x(ratio: float) -> str:
    if ratio != ratio:
        return "-"
    return f"{ratio:.2f}x" if ratio < 100 else f"{ratio:,.0f}x"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
