"""A one-line progress display for long batches (`checkmate.run_tasks`).

It writes only to the stream it is given. On a terminal it redraws one line
in place (carriage return and erase-to-end-of-line); on any other stream it
writes a plain line now and then. Colours come from colorama, and only on a
terminal.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from colorama import Fore, Style

__all__ = ["ProgressCounts", "ProgressDisplay", "format_eta", "is_terminal"]

_ERASE_LINE = "\x1b[K"


def is_terminal(stream: TextIO) -> bool:
    """Tell whether ``stream`` is an interactive terminal (False when it cannot say)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def format_eta(seconds: float | None) -> str:
    """Format a duration as ``H:MM:SS`` or ``M:SS``; ``?`` when unknown."""
    if seconds is None or math.isnan(seconds) or seconds < 0 or seconds > 360_000_000:
        return "?"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass(frozen=True)
class ProgressCounts:
    """Where a batch stands.

    Attributes:
        total: Tasks in the batch.
        done: Tasks finished COMPLETE.
        failed: Tasks finished in any other way (ERROR, refused, canceled, ...).
        running: Tasks handed to a worker and not yet reported.
        skipped: Tasks waiting because another worker holds them.
    """

    total: int
    done: int
    failed: int
    running: int
    skipped: int

    @property
    def finished(self) -> int:
        """Tasks with a final result."""
        return self.done + self.failed


class ProgressDisplay:
    """Shows `ProgressCounts` on one line: done / running / failed / skipped, rate and ETA.

    Args:
        stream: Where to write.
        color: Colour the counts; None: only when ``stream`` is a terminal and
            the ``NO_COLOR`` environment variable is not set.
        interval: Seconds between two redraws; None: 0.1 s on a terminal,
            10 s elsewhere (where each redraw is a new line).
        clock: The monotonic clock (for tests).
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        color: bool | None = None,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.tty = is_terminal(stream)
        self.color = (self.tty and not os.environ.get("NO_COLOR")) if color is None else color
        self.interval = interval if interval is not None else (0.1 if self.tty else 10.0)
        self._clock = clock
        self._started = clock()
        self._last_draw: float | None = None
        self._width = 0
        self._closed = False

    def render(self, counts: ProgressCounts) -> str:
        """Return the progress line for ``counts`` (no newline, no cursor movement)."""
        elapsed = max(self._clock() - self._started, 1e-9)
        finished = counts.finished
        rate = finished / elapsed
        remaining = counts.total - finished
        eta = remaining / rate if rate > 0 else None
        if remaining == 0:
            eta = 0.0
        parts = [
            self._paint(f"{counts.done}/{counts.total} done", Fore.GREEN),
            self._paint(f"{counts.running} running", Fore.CYAN),
            self._paint(f"{counts.failed} failed", Fore.RED if counts.failed else ""),
            self._paint(f"{counts.skipped} skipped", Fore.YELLOW if counts.skipped else ""),
            f"{rate:.1f} tasks/s",
            f"ETA {format_eta(eta)}",
        ]
        return "checkmate: " + " | ".join(parts)

    def _paint(self, text: str, color: str) -> str:
        if not self.color or not color:
            return text
        return f"{color}{text}{Style.RESET_ALL}"

    def update(self, counts: ProgressCounts, *, force: bool = False) -> None:
        """Redraw if the last redraw is older than the interval (or with ``force``)."""
        if self._closed:
            return
        now = self._clock()
        if not force and self._last_draw is not None and now - self._last_draw < self.interval:
            return
        self._last_draw = now
        self._write(self.render(counts), final=False)

    def close(self, counts: ProgressCounts) -> None:
        """Draw the last state and end the line; later calls do nothing."""
        if self._closed:
            return
        self._write(self.render(counts), final=True)
        self._closed = True

    def _write(self, line: str, *, final: bool) -> None:
        end = "\n" if final or not self.tty else ""
        text = (f"\r{line}{_ERASE_LINE}" if self.tty else line) + end
        # A display must never break the batch it shows (a closed or broken stream).
        with contextlib.suppress(OSError, ValueError):
            self.stream.write(text)
            self.stream.flush()
