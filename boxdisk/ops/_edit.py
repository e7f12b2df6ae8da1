"""Operations that change images: commit, rebase (safe and header-only) and resize.

Each refuses an image a running QEMU holds (QEMU's lock bytes, probed first and
then held for the whole operation by the writer), writes guest data through a
writable image (crash-ordered metadata) and changes a header only after the
data it relies on is durable. A crash at any instant therefore leaves every
guest view that must not change as it was, and at worst leaked clusters; each
operation can simply be run again.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator

from boxdisk._args import as_format, as_optional_format, as_path, as_paths, as_size
from boxdisk._errors import BackingChainError, InvalidArgumentError, UnsupportedFeatureError
from boxdisk._formats import FormatArg
from boxdisk._locks import ensure_not_in_use
from boxdisk._log import get_logger
from boxdisk.chain import BackingChain, open_chain
from boxdisk.image import RunKind
from boxdisk.image._qcow2_write import Qcow2Writer
from boxdisk.image._write import WritableImage

__all__ = ["Progress", "commit", "rebase", "resize"]

log = get_logger(__name__)

#: Called with (done_bytes, total_bytes) as long operations advance.
Progress = Callable[[int, int], None]

_CHUNK = 4 << 20  # bytes read and written at a time
_WINDOW = 256 << 20  # guest bytes whose top-image runs rebase lists at once


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 1)


# -- commit ---------------------------------------------------------------------------


def _find_depth(chain: BackingChain, base: str | os.PathLike[str] | None) -> int:
    if len(chain.images) < 2:
        msg = "image has no backing file to commit into"
        raise BackingChainError(msg, path=chain.paths[0], field="backing_file",
                                chain=chain.paths)
    if base is None:
        return 1
    for depth, path in enumerate(chain.paths[1:], start=1):
        if os.path.samefile(path, base):
            return depth
    msg = f"{os.fspath(base)!r} is not in the backing chain"
    raise BackingChainError(msg, path=chain.paths[0], field="base", value=os.fspath(base),
                            chain=chain.paths)


def _above(above: BackingChain) -> Iterator[tuple[int, int, bool]]:
    """``(start, end, is_data)`` stretches some image above the base decides.

    ``above`` holds the images over the base only. A stretch it leaves
    unallocated at its bottom reads from the base: nothing to copy. One left
    unallocated higher up lies past the end of a shorter image: it reads as
    zeros, and so must the base (QEMU's ``bdrv_is_allocated_above`` counts it).
    """
    bottom = len(above.images) - 1
    for depth, run in above.runs(precise=False):
        kind = run.kind
        if kind is RunKind.UNALLOCATED and depth == bottom:
            continue
        yield run.start, run.end, kind is RunKind.DATA or kind is RunKind.COMPRESSED


def _copy_above(above: BackingChain, target: WritableImage,
                progress: Progress | None) -> int:
    total = sum(e - s for s, e, _ in _above(above)) if progress is not None else 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    done = 0
    for start, end, is_data in _above(above):
        if not is_data:
            target.write_zeroes(start, end - start)
        else:
            pos = start
            while pos < end:
                n = min(_CHUNK, end - pos)
                above.read_into(pos, view[:n])
                target.write(pos, view[:n])
                pos += n
        done += end - start
        if progress is not None:
            progress(done, total)
    return done


def commit(
    top: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | None = None,
    keep_top: bool = False,
    progress: Progress | None = None,
    allowed_roots: Iterable[str | os.PathLike[str]] | None = None,
) -> None:
    """Write what ``top`` (and the images between it and ``base``) hold into ``base``.

    As ``qemu-img commit``: ``base`` defaults to the top's backing file and
    must lie in its chain; the base grows when the top is larger; clusters
    the images above the base read as zeros become zeros in the base.
    Afterwards the top is emptied in place (it then reads everything from the
    base, which holds the same bytes), unless ``keep_top=True``
    (``qemu-img commit -d``). When ``base`` is deeper than the top's backing
    file the top is always kept, as ``qemu-img commit -b`` implies ``-d``:
    the images between top and base no longer read as they did (the base
    under them changed), so an emptied top would read wrong bytes through
    them; the kept top still reads exactly as before.

    Refused with :class:`DiskInUseError` while a QEMU holds the top or the
    base. ``allowed_roots`` confines every backing file (see
    :meth:`BackingChain.open`). A crash leaves the top's guest view intact (the base only gains
    bytes the top already shows) and at most leaked clusters; run it again.
    """
    start_t = time.perf_counter()
    top_path = as_path(top, "top")
    base = None if base is None else as_path(base, "base")
    allowed_roots = as_paths(allowed_roots, "allowed_roots")
    ensure_not_in_use(top_path, "commit")
    with open_chain(top_path, allowed_roots=allowed_roots) as chain:
        depth = _find_depth(chain, base)
        keep = keep_top or depth > 1
        base_img = chain.images[depth]
        base_path, base_format = base_img.path, base_img.format
        ensure_not_in_use(base_path, "commit into it")
        size = chain.size
        # A view of the images above the base (the chain still owns them): the base's
        # own tables are never read through the read-only chain while they change.
        above = BackingChain(list(chain.images[:depth]))
        # The top to be emptied is held (QEMU's write locks) from before the copy on,
        # so nobody writes to it between the copy and the emptying.
        with (contextlib.nullcontext() if keep else Qcow2Writer(top_path)) as top_writer, \
                open_chain(base_path, format=base_format, writable=True,
                           allowed_roots=allowed_roots) as target_chain:
            target = target_chain.images[0]
            assert isinstance(target, WritableImage)
            if size > target.size:
                target.resize(size)
            done = _copy_above(above, target, progress)
            target.flush()
            target_chain.close()  # the base is durable before the top loses anything
            if top_writer is not None:
                top_writer.make_empty()
    log.info("committed", top=top_path, base=base_path, depth=depth, bytes=done,
             top_emptied=not keep, ms=_ms(start_t))


# -- rebase ---------------------------------------------------------------------------


def _data_intervals(chain: BackingChain | None, start: int, end: int) -> Iterator[
        tuple[int, int]]:
    """Stretches of ``[start, end)`` where ``chain`` may read non-zero bytes."""
    if chain is None:
        return
    end = min(end, chain.size)
    if start >= end:
        return
    for _, run in chain.runs(start, end - start, precise=True):
        if run.kind is RunKind.DATA or run.kind is RunKind.COMPRESSED:
            yield run.start, run.end


def _merge(*streams: Iterator[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(iv for stream in streams for iv in stream):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _read_padded(chain: BackingChain | None, offset: int, view: memoryview) -> None:
    """Fill ``view`` with ``chain``'s bytes at ``offset``; zeros past its end (or no chain)."""
    n = len(view)
    inside = 0 if chain is None else max(0, min(n, chain.size - offset))
    if inside and chain is not None:
        chain.read_into(offset, view[:inside])
    if inside < n:
        view[inside:] = bytes(n - inside)


def _copy_differences(writer: Qcow2Writer, old: BackingChain | None,
                      new: BackingChain | None, progress: Progress | None) -> int:
    """Write into the top every cluster it leaves to its backing where old and new differ.

    ``qemu-img rebase``'s safe mode; returns the bytes written.
    """
    size, cs = writer.size, writer.cluster_size
    buf_old, buf_new = bytearray(_CHUNK), bytearray(_CHUNK)
    v_old, v_new = memoryview(buf_old), memoryview(buf_new)
    written = 0
    for wstart in range(0, size, _WINDOW):
        wend = min(size, wstart + _WINDOW)
        holes = [(r.start, r.end) for r in writer.runs(wstart, wend - wstart)
                 if r.kind is RunKind.UNALLOCATED]
        if not holes:
            continue
        data = _merge(_data_intervals(old, wstart, wend), _data_intervals(new, wstart, wend))
        done_to = 0  # clusters below this guest offset were compared already
        for s, e in _intersect(holes, data):
            pos = max(s - s % cs, done_to)
            end = min(size, -(-e // cs) * cs)
            while pos < end:
                n = min(_CHUNK, end - pos)
                _read_padded(old, pos, v_old[:n])
                _read_padded(new, pos, v_new[:n])
                if v_old[:n] != v_new[:n]:
                    for c in range(0, n, cs):
                        m = min(cs, n - c)
                        a = v_old[c : c + m]
                        if a == v_new[c : c + m]:
                            continue
                        if a.tobytes().count(0) == m:
                            writer.write_zeroes(pos + c, m)
                        else:
                            writer.write(pos + c, a)
                        written += m
                pos += n
            done_to = max(done_to, end)
        if progress is not None:
            progress(wend, size)
    return written


def _intersect(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """Pairwise intersections of two sorted lists of disjoint intervals, in order."""
    i = j = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo < hi:
            yield lo, hi
        if a[i][1] <= b[j][1]:
            i += 1
        else:
            j += 1


def rebase(
    image: str | os.PathLike[str],
    new_backing: str | os.PathLike[str] | None,
    *,
    backing_format: FormatArg | None = None,
    safe: bool = True,
    relative: bool = False,
    progress: Progress | None = None,
    allowed_roots: Iterable[str | os.PathLike[str]] | None = None,
) -> None:
    """Make ``image`` back onto ``new_backing`` (None: standalone), as ``qemu-img rebase``.

    ``safe=True`` first copies into ``image`` every cluster it does not hold
    where the old and the new backing read differently, so the guest sees the
    same bytes before and after; the header changes last. ``safe=False`` only
    rewrites the header (``qemu-img rebase -u``), and needs no old backing
    file. ``backing_format`` is required with a new backing file (it is never
    probed). The name stored is the new file's real path, or with
    ``relative=True`` its path relative to the image's directory.

    ``allowed_roots`` confines every backing file, old and new (after
    resolving symlinks; :class:`BackingChainError` otherwise). Refused with
    :class:`DiskInUseError` while a QEMU holds the image. A crash before the
    header changes leaves the old view intact; running the rebase again
    finishes it.
    """
    start_t = time.perf_counter()
    path = as_path(image, "image")
    new_backing = None if new_backing is None else as_path(new_backing, "new_backing")
    backing_format = as_optional_format(backing_format, "backing_format", path=path)
    allowed_roots = as_paths(allowed_roots, "allowed_roots")
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
        if allowed_roots is not None:
            roots = [os.path.realpath(r) for r in allowed_roots]
            if not any(os.path.commonpath([real, r]) == r for r in roots):
                msg = f"new backing file {real!r} lies outside the allowed roots {roots}"
                raise BackingChainError(msg, path=path, field="backing_file",
                                        value=os.fspath(new_backing))
        name = (os.path.relpath(real, os.path.realpath(os.path.dirname(path) or "."))
                if relative else real)
    written = 0
    if not safe:
        with Qcow2Writer(path) as writer:
            writer.set_backing(name, backing_format)
    else:
        with open_chain(path, writable=True, allowed_roots=allowed_roots) as chain:
            top = chain.images[0]
            if not isinstance(top, Qcow2Writer):
                msg = "only a qcow2 image has a backing file to change"
                raise UnsupportedFeatureError(msg, path=path, field="format")
            old = BackingChain(list(chain.images[1:])) if len(chain.images) > 1 else None
            new = None if new_backing is None else open_chain(
                new_backing, format=backing_format, allowed_roots=allowed_roots)
            try:
                # Every cluster written must read right over the *new* backing, which the
                # header names once the copy is done: a cluster zeroed past the end of a
                # shorter old backing is not zero over a longer new one (v3 needs the zero
                # flag, v2 explicit zero data). Over the old backing the written clusters
                # read the same, as each holds the old view explicitly, so a crash before
                # the header changes still shows the old view.
                top.attach_below(None if new is None else new.read,
                                 0 if new is None else new.size)
                written = _copy_differences(top, old, new, progress)
                top.flush()
                top.set_backing(name, backing_format)
            finally:
                top.attach_below(None, 0)  # ``new`` closes here; nothing reads below now
                if new is not None:
                    new.close()
    log.info("rebased", path=path, backing=name, backing_format=backing_format, safe=safe,
             bytes=written, ms=_ms(start_t))


# -- resize ---------------------------------------------------------------------------


def resize(path: str | os.PathLike[str], new_size: int, *, format: FormatArg = "qcow2",
           allowed_roots: Iterable[str | os.PathLike[str]] | None = None) -> None:
    """Grow a qcow2 (or raw) image, or shrink it when nothing is stored past the new end.

    As ``qemu-img resize``: growing where the backing file reaches past the
    old end makes the new range read as zeros; a qcow2's size must be a
    multiple of 512. Shrinking a qcow2 is refused (InvalidArgumentError) when
    a cluster past the new end holds data; a raw file (``format="raw"``) is
    cut. Refused with :class:`DiskInUseError` while a QEMU holds the image.
    ``allowed_roots`` confines every backing file.
    """
    p = as_path(path, "path")
    format = as_format(format, "format", path=p)
    as_size(new_size, "new_size")
    allowed_roots = as_paths(allowed_roots, "allowed_roots")
    ensure_not_in_use(p, "resize")
    with open_chain(p, format=format, writable=True, allowed_roots=allowed_roots) as chain:
        top = chain.images[0]
        assert isinstance(top, WritableImage)
        top.resize(new_size)
