"""Operations that change images: commit, rebase (safe and header-only) and resize.

Each refuses an image a running QEMU holds (QEMU's lock bytes), writes guest
data through :class:`~boxdisk.image._qcow2_write.Qcow2Writer` (crash-ordered
metadata) and changes a header only after the data it relies on is durable,
so a crash at any instant leaves every guest's view as it was before, or as
it is after.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from boxdisk._errors import BackingChainError, ImageIOError, InvalidArgumentError
from boxdisk._locks import ensure_not_in_use
from boxdisk._log import get_logger
from boxdisk.chain import BackingChain, open_chain
from boxdisk.format import plan_new_image
from boxdisk.image import RunKind
from boxdisk.image._qcow2_write import Qcow2Writer
from boxdisk.qcow2 import _write_new_image, read_header, rewrite_backing_reference

from ._compare import data_intervals

__all__ = ["Progress", "commit", "rebase", "resize"]

log = get_logger(__name__)

#: Called with (done_bytes, total_bytes) as long operations advance.
Progress = Callable[[int, int], None]

_CHUNK = 4 << 20


class _Target(Protocol):
    def write(self, offset: int, data: bytes) -> None: ...
    def write_zeroes(self, offset: int, length: int) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class _RawTarget:
    """A raw file as a write target (commit into a raw base)."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            msg = f"cannot open raw image for writing: {exc.strerror}"
            raise ImageIOError(msg, path=path) from None
        self.size = os.fstat(self._fd).st_size

    def write(self, offset: int, data: bytes) -> None:
        os.pwrite(self._fd, data, offset)

    def write_zeroes(self, offset: int, length: int) -> None:
        zero = bytes(min(length, _CHUNK))
        end = offset + length
        while offset < end:
            n = min(len(zero), end - offset)
            os.pwrite(self._fd, zero[:n], offset)
            offset += n

    def resize(self, new_size: int) -> None:
        os.ftruncate(self._fd, new_size)
        self.size = new_size

    def flush(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def _reader(chain: BackingChain | None) -> Callable[[int, int], bytes] | None:
    if chain is None:
        return None

    def read(offset: int, length: int) -> bytes:
        end = min(offset + length, chain.size)
        data = chain.read(offset, end - offset) if end > offset else b""
        return data + bytes(length - len(data))

    return read


def _open_below(chain: BackingChain, depth: int) -> BackingChain | None:
    """A separate chain of the images under ``chain.images[depth]`` (None at the bottom)."""
    if depth + 1 >= len(chain.images):
        return None
    img = chain.images[depth + 1]
    return open_chain(img.path, format=img.format)


def _copy_runs(chain: BackingChain, runs: Iterator[tuple[int, int, RunKind]], target: _Target,
               total: int, progress: Progress | None) -> int:
    done = 0
    for start, end, kind in runs:
        if kind is RunKind.ZERO:
            target.write_zeroes(start, end - start)
        else:
            pos = start
            while pos < end:
                n = min(_CHUNK, end - pos)
                target.write(pos, chain.read(pos, n))
                pos += n
        done += end - start
        if progress is not None:
            progress(done, total)
    return done


def _decided_above(chain: BackingChain, depth: int) -> Iterator[tuple[int, int, RunKind]]:
    """Stretches whose bytes an image above ``depth`` decides: DATA (incl. compressed) or ZERO."""
    for d, run in chain.runs(precise=False):
        if d >= depth or run.kind is RunKind.UNALLOCATED:
            continue
        kind = RunKind.ZERO if run.kind is RunKind.ZERO else RunKind.DATA
        yield run.start, run.end, kind


def _find_depth(chain: BackingChain, base: str | os.PathLike[str] | None) -> int:
    if len(chain.images) < 2:
        msg = "image has no backing file to commit into"
        raise BackingChainError(msg, path=chain.paths[0], field="backing_file")
    if base is None:
        return 1
    for depth, path in enumerate(chain.paths[1:], start=1):
        if os.path.samefile(path, base):
            return depth
    msg = f"{os.fspath(base)!r} is not in the backing chain"
    raise BackingChainError(msg, path=chain.paths[0], field="base", value=os.fspath(base),
                            chain=chain.paths)


def _empty_top(top: str, base_path: str, base_format: str, *, rebase_to_base: bool) -> None:
    """Replace ``top`` with an empty child of the same size (atomically, temp + rename)."""
    header = read_header(top)
    name, fmt = header.backing_file, header.backing_format
    if rebase_to_base:
        relative = name is not None and not os.path.isabs(name)
        real = os.path.realpath(base_path)
        name = os.path.relpath(real, os.path.realpath(os.path.dirname(top) or ".")) \
            if relative else real
        fmt = base_format
    layout = plan_new_image(header.size, cluster_bits=header.cluster_bits,
                            refcount_order=header.refcount_order, backing_file=name,
                            backing_format=fmt)
    _write_new_image(Path(top), layout.writes, layout.file_size, replace=True)


def commit(
    top: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | None = None,
    keep_top: bool = False,
    progress: Progress | None = None,
) -> None:
    """Write what ``top`` (and the images between it and ``base``) hold into ``base``.

    ``base`` defaults to the top's backing file. The base grows when the top
    is larger. Afterwards, as ``qemu-img commit`` does, the top is emptied (it
    reads everything from the base, which now holds the same bytes) and, when
    ``base`` was deeper than the top's backing file, backs onto ``base``
    directly. ``keep_top=True`` leaves the top as it was (``qemu-img commit -d``).
    """
    start_t = time.perf_counter()
    top_path = os.fspath(top)
    ensure_not_in_use(top_path, "commit")
    with open_chain(top_path) as chain:
        depth = _find_depth(chain, base)
        base_img = chain.images[depth]
        ensure_not_in_use(base_img.path, "commit into it")
        size = chain.size
        below = _open_below(chain, depth)
        try:
            target: Qcow2Writer | _RawTarget
            if base_img.format == "raw":
                target = _RawTarget(base_img.path)
                if size > target.size:
                    target.resize(size)
            else:
                target = Qcow2Writer(base_img.path, read_below=_reader(below))
                if size > target.size:
                    target.resize(size, backing_size=0 if below is None else below.size)
            try:
                # Two passes over metadata only: the total for progress, then the copy.
                total = sum(e - s for s, e, _ in _decided_above(chain, depth)) if progress else 0
                done = _copy_runs(chain, _decided_above(chain, depth), target, total, progress)
                target.flush()
            finally:
                target.close()
        finally:
            if below is not None:
                below.close()
        base_path, base_format = base_img.path, base_img.format
    if not keep_top:
        _empty_top(top_path, base_path, base_format, rebase_to_base=depth > 1)
    log.info("committed", top=top_path, base=base_path, bytes=done, keep_top=keep_top,
             ms=round((time.perf_counter() - start_t) * 1000, 1))


def _unallocated_in_top(chain: BackingChain) -> Iterator[tuple[int, int]]:
    for run in chain.top.runs(0, chain.size, precise=False):
        if run.kind is RunKind.UNALLOCATED:
            yield run.start, run.end


def _intersect(a: list[tuple[int, int]], b: Iterator[tuple[int, int]]) -> Iterator[
        tuple[int, int]]:
    i = 0
    for start, end in b:
        while i < len(a) and a[i][1] <= start:
            i += 1
        j = i
        while j < len(a) and a[j][0] < end:
            lo, hi = max(start, a[j][0]), min(end, a[j][1])
            if lo < hi:
                yield lo, hi
            j += 1


def _read_zero_padded(chain: BackingChain | None, offset: int, length: int) -> bytes:
    read = _reader(chain)
    return bytes(length) if read is None else read(offset, length)


def rebase(
    image: str | os.PathLike[str],
    new_backing: str | os.PathLike[str] | None,
    *,
    backing_format: str | None = None,
    safe: bool = True,
    relative: bool = False,
    progress: Progress | None = None,
) -> None:
    """Make ``image`` back onto ``new_backing`` (None: standalone), as ``qemu-img rebase``.

    ``safe=True`` first copies into ``image`` every cluster where the old and
    the new backing read differently, so the guest sees the same bytes before
    and after; the header changes last. ``safe=False`` only rewrites the
    header (``qemu-img rebase -u``). The new name is stored as its real path,
    or relative to the image's directory with ``relative=True``.
    """
    path = os.fspath(image)
    ensure_not_in_use(path, "rebase")
    if new_backing is not None and backing_format is None:
        msg = "backing_format is required with a new backing file (it is never probed)"
        raise InvalidArgumentError(msg, path=path, field="backing_format")
    name: str | None = None
    if new_backing is not None:
        real = os.path.realpath(new_backing)
        if not os.path.isfile(real):
            msg = f"new backing file {os.fspath(new_backing)!r} does not exist"
            raise BackingChainError(msg, path=path, field="backing_file",
                                    value=os.fspath(new_backing))
        name = os.path.relpath(real, os.path.realpath(os.path.dirname(path) or ".")) \
            if relative else real
    if safe:
        _copy_differences(path, new_backing, backing_format, progress)
    rewrite_backing_reference(path, name, backing_format)
    log.info("rebased", path=path, backing=name, backing_format=backing_format, safe=safe)


def _copy_differences(path: str, new_backing: str | os.PathLike[str] | None,
                      backing_format: str | None, progress: Progress | None) -> None:
    with open_chain(path) as chain:
        old = _open_below(chain, 0)
        new = None if new_backing is None else open_chain(new_backing, format=backing_format)
        try:
            holes = list(_unallocated_in_top(chain))
            candidates: list[tuple[int, int]] = []
            intervals: list[tuple[int, int]] = []
            for below in (old, new):
                if below is not None:
                    intervals.extend(data_intervals(below))
            intervals.sort()
            merged: list[tuple[int, int]] = []
            for s, e in intervals:
                if merged and s <= merged[-1][1]:
                    merged[-1] = (merged[-1][0], max(merged[-1][1], e))
                else:
                    merged.append((s, e))
            candidates = [(s, min(e, chain.size)) for s, e in _intersect(merged, iter(holes))
                          if s < chain.size]
            total = sum(e - s for s, e in candidates)
            cs = chain.top.cluster_size
            done = 0
            with Qcow2Writer(path, read_below=_reader(old)) as writer:
                for start, end in candidates:
                    pos = start - start % cs
                    while pos < end:
                        n = min(_CHUNK, -(-end // cs) * cs - pos, chain.size - pos)
                        was = _read_zero_padded(old, pos, n)
                        now = _read_zero_padded(new, pos, n)
                        if was != now:
                            for c in range(0, n, cs):
                                a, b = was[c:c + cs], now[c:c + cs]
                                if a != b:
                                    writer.write(pos + c, a)
                        pos += n
                        done = min(total, done + n)
                        if progress is not None:
                            progress(done, total)
                writer.flush()
        finally:
            for opened in (old, new):
                if opened is not None:
                    opened.close()


def resize(path: str | os.PathLike[str], new_size: int) -> None:
    """Grow a qcow2 image, or shrink it when nothing is stored past the new end."""
    p = os.fspath(path)
    ensure_not_in_use(p, "resize")
    with open_chain(p) as chain:
        below = _open_below(chain, 0)
        try:
            with Qcow2Writer(p, read_below=_reader(below)) as writer:
                writer.resize(new_size, backing_size=0 if below is None else below.size)
        finally:
            if below is not None:
                below.close()
