"""What the benchmark scripts share: sizes, running a peer, timing, printing a table."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

MIB = 1024 * 1024
GIB = 1024 * MIB


def run(*argv: str | Path, stdin: str | None = None) -> str:
    """Run a peer (qemu-img, qemu-io, cp, ...) to success; its standard output."""
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True,
                          input=stdin).stdout


def best_of(n: int, fn: Callable[[], object], *, before: Callable[[], object] | None = None,
            sync: bool = False) -> float:
    """Best wall time of ``n`` runs of ``fn``.

    ``before`` runs (untimed) ahead of each; with ``sync`` the page cache's dirty
    data is written out (untimed) too, so one run's writeback does not land in the
    next one's time.
    """
    times = []
    for _ in range(n):
        if before is not None:
            before()
        if sync:
            subprocess.run(["sync"], check=True)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def table(title: str, rows: list[tuple[str, str, str]], *, value_width: int = 16) -> None:
    """Print ``rows`` of (name, value, note) under ``title``."""
    print(title)
    width = max(len(r[0]) for r in rows) + 2
    for name, value, note in rows:
        print(f"    {name:<{width}}{value:>{value_width}}   {note}")
    print()
