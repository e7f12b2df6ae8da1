"""``compare``: do two disks (chains or raw files) show the guest the same bytes?

As ``qemu-img compare`` (non-strict): only stretches where either side holds
data are read — everything else reads as zeros on both sides — and a size
difference is not a mismatch by itself: the larger disk's extra part must read
as zeros. qemu-img reports the start of the first differing 512-byte sector:
it compares chunks that begin on block-status boundaries (whole sectors, as
every image length is a whole number of sectors to QEMU) sector by sector
(``compare_buffers``, ``check_empty_sectors``). That is the first differing
byte rounded down to 512, which is what :attr:`CompareResult.offset` holds.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Iterable, Iterator

import attrs

from boxdisk._args import as_optional_format, as_path, as_paths
from boxdisk._formats import FormatArg
from boxdisk._locks import ensure_consistent_read
from boxdisk._log import get_logger
from boxdisk.chain import BackingChain, open_chain
from boxdisk.image import RunKind

__all__ = ["CompareResult", "compare", "data_intervals"]

log = get_logger(__name__)

_CHUNK = 4 << 20
_SECTOR = 512


@attrs.define(frozen=True)
class CompareResult:
    """Whether two disks read the same, and where they first differ.

    ``offset`` is the start of the first differing 512-byte sector (what
    ``qemu-img compare`` prints), ``byte_offset`` the first differing byte;
    both are None when ``identical``. ``size_a`` and ``size_b`` are the two
    virtual sizes (they may differ while the disks are identical).
    """

    identical: bool
    offset: int | None = None
    byte_offset: int | None = None
    size_a: int = 0
    size_b: int = 0


def data_intervals(chain: BackingChain) -> Iterator[tuple[int, int]]:
    """Merged ``(start, end)`` stretches where the chain may read non-zero bytes."""
    cur_start = cur_end = -1
    for _, run in chain.runs(precise=True):
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
    cur_start = cur_end = -1
    for start, end in heapq.merge(a, b):  # both sorted: streamed, never held whole
        if start <= cur_end:
            cur_end = max(cur_end, end)
            continue
        if cur_end > cur_start:
            yield cur_start, cur_end
        cur_start, cur_end = start, end
    if cur_end > cur_start:
        yield cur_start, cur_end


def _read(chain: BackingChain, offset: int, view: memoryview) -> None:
    """Fill ``view`` with the chain's bytes at ``offset``; zeros past its end."""
    n = len(view)
    inside = max(0, min(n, chain.size - offset))
    if inside:
        chain.read_into(offset, view[:inside])
    if inside < n:
        view[inside:] = bytes(n - inside)


def _first_difference(x: memoryview, y: memoryview) -> int:
    lo, hi = 0, len(x)
    # Narrow by halves with C-speed slice compares, then finish byte by byte.
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
    format_a: FormatArg | None = None,
    format_b: FormatArg | None = None,
    allowed_roots: Iterable[str | os.PathLike[str]] | None = None,
    force_share: bool = False,
) -> CompareResult:
    """Compare what two disks show the guest, as ``qemu-img compare -f A -F B a b`` does.

    ``format_a`` / ``format_b`` name the top images' formats (default qcow2;
    pass ``"raw"`` for a raw file): nothing is probed. Backing chains are
    followed as :func:`~boxdisk.chain.open_chain` follows them. An image
    another process is writing (a running VM) is refused with
    :class:`DiskInUseError` unless ``force_share=True`` (``qemu-img -U``).
    """
    a, b = as_path(a, "a"), as_path(b, "b")
    format_a = as_optional_format(format_a, "format_a", path=a)
    format_b = as_optional_format(format_b, "format_b", path=b)
    roots = as_paths(allowed_roots, "allowed_roots")
    with open_chain(a, format=format_a, allowed_roots=roots) as ca, \
            open_chain(b, format=format_b, allowed_roots=roots) as cb:
        if not force_share:
            ensure_consistent_read((*ca.paths, *cb.paths), "compare")
        buf_a, buf_b = bytearray(_CHUNK), bytearray(_CHUNK)
        view_a, view_b = memoryview(buf_a), memoryview(buf_b)
        for start, end in _union(data_intervals(ca), data_intervals(cb)):
            pos = start
            while pos < end:
                n = min(_CHUNK, end - pos)
                x, y = view_a[:n], view_b[:n]
                _read(ca, pos, x)
                _read(cb, pos, y)
                if x != y:
                    first = pos + _first_difference(x, y)
                    log.info("compared", a=os.fspath(a), b=os.fspath(b), identical=False,
                             offset=first)
                    return CompareResult(False, first - first % _SECTOR, first, ca.size,
                                         cb.size)
                pos += n
        log.info("compared", a=os.fspath(a), b=os.fspath(b), identical=True)
        return CompareResult(True, None, None, ca.size, cb.size)
