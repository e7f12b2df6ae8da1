"""A progress line for long operations, fed by the library's ``progress=`` callback.

Shown only when asked for (``-p``) and when stderr is a terminal: scripts and
pipes never get carriage returns in their output.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from ._sizes import format_size

__all__ = ["ProgressBar", "progress_for"]

_WIDTH = 30
_EVERY = 0.1  # seconds between redraws


class ProgressBar:
    """``[#####.....]  42.0%  1.2 GiB / 3.0 GiB  512 MiB/s`` on one redrawn line."""

    def __init__(self, label: str, stream: TextIO) -> None:
        self._label = label
        self._stream = stream
        self._start = time.monotonic()
        self._last = 0.0
        self._shown = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._last < _EVERY and done < total:
            return
        self._last = now
        frac = done / total if total else 1.0
        filled = int(frac * _WIDTH)
        rate = done / max(now - self._start, 1e-6)
        line = (f"\r{self._label} [{'#' * filled}{'.' * (_WIDTH - filled)}] {frac * 100:5.1f}%"
                f"  {format_size(done)} / {format_size(total)}  {format_size(rate)}/s")
        self._stream.write(line)
        self._stream.flush()
        self._shown = True

    def close(self) -> None:
        """End the line (only if anything was drawn)."""
        if self._shown:
            self._stream.write("\n")
            self._stream.flush()
            self._shown = False


def progress_for(label: str, wanted: bool, stream: TextIO | None = None) -> ProgressBar | None:
    """A bar when ``wanted`` and the stream (stderr) is a terminal, else None."""
    out = sys.stderr if stream is None else stream
    if not wanted or not out.isatty():
        return None
    return ProgressBar(label, out)
