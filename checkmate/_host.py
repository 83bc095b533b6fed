"""Who and where this process is, and whether another local process still lives."""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass

__all__ = [
    "HostIdentity",
    "own_start_time",
    "process_alive",
    "process_start_time",
    "this_host",
]


@dataclass(frozen=True)
class HostIdentity:
    """What makes two processes comparable by pid: same host name, boot and pid namespace."""

    hostname: str
    boot_id: str | None
    pid_namespace: str | None


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as handle:
            return handle.read().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


@functools.cache
def this_host() -> HostIdentity:
    """Return this process's host identity (cached; boot id and namespace on Linux only)."""
    try:
        namespace: str | None = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = None
    return HostIdentity(
        hostname=socket.gethostname(),
        boot_id=_read_text("/proc/sys/kernel/random/boot_id"),
        pid_namespace=namespace,
    )


def _proc_stat(pid: int) -> list[str] | None:
    text = _read_text(f"/proc/{pid}/stat")
    if text is None:
        return None
    # The command name (field 2) is in parentheses and may contain spaces.
    return text[text.rfind(")") + 2 :].split()


def process_start_time(pid: int) -> int | None:
    """Return the process's start time in clock ticks since boot (Linux), else None."""
    fields = _proc_stat(pid)
    if fields is None or len(fields) < 20:
        return None
    try:
        return int(fields[19])
    except ValueError:
        return None


_own_start: tuple[int, int | None] = (-1, None)  # (pid, its start time); a fork gets its own


def own_start_time() -> int | None:
    """This process's `process_start_time`, read once per process (it never changes)."""
    global _own_start  # noqa: PLW0603 - read once per process
    pid = os.getpid()
    if _own_start[0] != pid:
        _own_start = (pid, process_start_time(pid))
    return _own_start[1]


def process_alive(pid: int, start_time: int | None) -> bool:
    """Tell whether process ``pid`` of this host still runs.

    A recorded ``start_time`` that differs from the live process's means the pid
    was reused: the original process is gone. A zombie counts as dead. Where
    liveness cannot be determined (Windows), the process counts as alive.
    """
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):
        return False  # gone, or a pid no process can have
    except PermissionError:
        pass
    fields = _proc_stat(pid)
    if fields is None:
        return True
    if fields[0] in {"Z", "X"}:
        return False
    if start_time is not None:
        current = process_start_time(pid)
        if current is not None and current != start_time:
            return False
    return True
