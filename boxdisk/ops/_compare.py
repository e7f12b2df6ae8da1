"""``compare``: do two disks (chains or raw files) show the guest the same bytes?

Only stretches where either side holds data are read; everything else reads
as zeros on both sides. As ``qemu-img compare`` does, a size difference is not
a mismatch by itself: the larger disk's extra part must read as zeros. The
reported offset is QEMU's: the first differing 512-byte sector.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Iterator

import attrs

from boxdisk._log import get_logger
from boxdisk.chain import BackingChain, open_chain
from boxdisk.image import RunKind

__all__ = ["CompareResult", "compare", "data_intervals", "guess_format"]

log = get_logger(__name__)

_CHUNK = 4 << 20
_SECTOR = 512
_RAW_SUFFIXES = (".raw", ".img", ".ext4", ".bin", ".iso")


@attrs.define(frozen=True)
class CompareResult:
    """Whether two disks read the same; where they first differ.

    ``offset`` is the start of the first differing 512-byte sector (what
    ``qemu-img compare`` prints); ``byte_offset`` the first differing byte.
    """

    identical: bool
    offset: int | None = None
    byte_offset: int | None = None
    size_a: int = 0
    size_b: int = 0


def guess_format(path: str | os.PathLike[str]) -> str:
    """The format a top image is opened as when the caller names none: by file name only.

    ``*.raw``, ``*.img``, ``*.ext4``, ``*.bin`` and ``*.iso`` are raw, all else qcow2;
    file contents are never probed.
    """
    return "raw" if os.fspath(path).lower().endswith(_RAW_SUFFIXES) else "qcow2"


def data_intervals(chain: BackingChain) -> Iterator[tuple[int, int]]:
    """Merged ``(start, end)`` stretches where the chain may read non-zero bytes."""
    cur_start = cur_end = -1
    for _, run in chain.runs(precise=False):
        if run.kind is not RunKind.DATA and run.kind is not RunKind.COMPRESSED:
            continue
        if run.start == cur_end:
            cur_end = run.end
            continue
        if cur_end > cur_start:
            yield cur_start, cur_end
        cur_start, cur_end = run.start, run.end
    if cur_end > cur_start:
        yield cur_start, cur_end


def _union(a: Iterator[tuple[int, int]], b: Iterator[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    merged = heapq.merge(a, b)  # both are sorted: stream, never hold them all
    cur_start = cur_end = -1
    for start, end in merged:
        if start <= cur_end:
            cur_end = max(cur_end, end)
            continue
        if cur_end > cur_start:
            yield cur_start, cur_end
        cur_start, cur_end = start, end
    if cur_end > cur_start:
        yield cur_start, cur_end


def _read(chain: BackingChain, offset: int, length: int) -> bytes:
    """Bytes of ``chain`` at ``offset``; zeros past its end."""
    end = min(offset + length, chain.size)
    data = chain.read(offset, end - offset) if end > offset else b""
    return data + bytes(length - len(data))


def _first_difference(x: bytes, y: bytes) -> int:
    lo, hi = 0, len(x)
    # Narrow by halves (C-speed slice compares), then finish byte by byte.
    while hi - lo > 64:
        mid = (lo + hi) // 2
        if x[lo:mid] != y[lo:mid]:
            hi = mid
        else:
            lo = mid
    return next(i for i in range(lo, hi) if x[i] != y[i])


def compare(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    format_a: str | None = None,
    format_b: str | None = None,
    allowed_roots: list[str] | None = None,
) -> CompareResult:
    """Compare what two disks show the guest, as ``qemu-img compare A B`` does."""
    with open_chain(a, format=format_a or guess_format(a), allowed_roots=allowed_roots) as ca, \
            open_chain(b, format=format_b or guess_format(b),
                       allowed_roots=allowed_roots) as cb:
        size = max(ca.size, cb.size)
        for start, end in _union(data_intervals(ca), data_intervals(cb)):
            pos = start
            while pos < end:
                n = min(_CHUNK, end - pos)
                x, y = _read(ca, pos, n), _read(cb, pos, n)
                if x != y:
                    first = pos + _first_difference(x, y)
                    log.info("compared", a=os.fspath(a), b=os.fspath(b), identical=False,
                             offset=first)
                    return CompareResult(False, first - first % _SECTOR, first, ca.size,
                                         cb.size)
                pos += n
        log.info("compared", a=os.fspath(a), b=os.fspath(b), identical=True, size=size)
        return CompareResult(True, None, None, ca.size, cb.size)
