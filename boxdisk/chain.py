"""A backing chain: a top image and every image under it, read as QEMU's guest would.

``BackingChain.open(top)`` follows backing names the way QEMU does: the format
comes from the backing-format header extension (never from probing the file),
relative names resolve against the directory of the image that names them
(QEMU's ``path_combine``: no symlink resolution of the naming image), and a
cycle, a missing file, a name outside ``allowed_roots`` or a chain longer than
``max_depth`` images raises :class:`BackingChainError` naming the chain so far.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any, Self

import attrs

from boxdisk._args import as_optional_format, as_path, as_paths
from boxdisk._errors import (
    BackingChainError,
    ImageIOError,
    InvalidArgumentError,
    UnsupportedFeatureError,
)
from boxdisk._formats import FormatArg
from boxdisk._log import get_logger
from boxdisk.image import Image, Qcow2Image, RawImage, Run, RunKind
from boxdisk.image._qcow2_write import open_writable
from boxdisk.image._runs import RawRun
from boxdisk.image._write import WritableImage

__all__ = ["DEFAULT_MAX_DEPTH", "BackingChain", "Extent", "open_chain"]

log = get_logger(__name__)

#: L1 entries (8 bytes each, held in memory) a whole chain may hold: 64 MiB of them.
#: One image may have 32 MiB (QEMU's limit); a 10 GiB disk with 64 KiB clusters has
#: 20 entries. Bounds a hostile chain of many sparse images claiming huge L1 tables.
MAX_CHAIN_L1_ENTRIES = 8 << 20

#: Most images (the top included) a chain may hold unless the caller says otherwise.
DEFAULT_MAX_DEPTH = 64

#: L2 tables cached by all the images of one chain together, so memory stays
#: bounded however deep the chain is (each image keeps at least 2 tables).
_CHAIN_L2_CACHE_BYTES = 32 * 1024 * 1024

_ZEROS = memoryview(bytes(1024 * 1024))

_UNALLOC, _DATA, _COMPRESSED = RunKind.UNALLOCATED, RunKind.DATA, RunKind.COMPRESSED

_FORMATS = ("qcow2", "raw")


@attrs.define(frozen=True)
class Extent:
    """One entry of a chain's map, as ``qemu-img map --output=json`` reports it.

    ``depth`` is the index of the image that decides the bytes (0: the top);
    ``present`` is False where no image holds them (unallocated at the bottom,
    or past the end of a shorter backing file); ``file`` and ``offset`` say
    where the bytes live on the host, where they live in one place.
    """

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None = None
    file: str | None = None

    def as_qemu_json(self) -> dict[str, Any]:
        """The dictionary ``qemu-img map --output=json`` prints for this extent."""
        out: dict[str, Any] = {
            "start": self.start, "length": self.length, "depth": self.depth,
            "present": self.present, "zero": self.zero, "data": self.data,
        }
        if self.offset is not None:
            out["offset"] = self.offset
        return out


def _open_image(path: str, fmt: str) -> Image:
    if fmt == "qcow2":
        return Qcow2Image.open(path)
    if fmt == "raw":
        return RawImage.open(path)
    msg = f"image format {fmt!r} is not supported (boxdisk reads {', '.join(_FORMATS)})"
    raise UnsupportedFeatureError(msg, path=path, field="format", value=fmt)


def _has_protocol(name: str) -> bool:
    """QEMU's ``path_has_protocol``: a ':' before any '/' makes ``proto:rest`` a protocol."""
    head = name.split("/", 1)[0]
    return ":" in head


def _under(path: str, roots: list[str]) -> bool:
    return any(os.path.commonpath([path, root]) == root for root in roots)


def _check_new(img: Image, path: str, seen: set[tuple[int, int]], names: list[str]) -> None:
    """Refuse (closing ``img``) a file already in the chain: a loop."""
    st = os.fstat(img.fd)
    key = (st.st_dev, st.st_ino)
    if key in seen:
        img.close()
        msg = f"backing chain loops: {path!r} is already in the chain"
        raise BackingChainError(msg, path=path, field="backing_file", value=path,
                                chain=tuple(names))
    seen.add(key)


def _backing_link(img: Image, path: str, names: list[str], fallback_format: str | None,
                  max_depth: int, roots: list[str] | None) -> tuple[str, str] | None:
    """(path, format) of ``img``'s backing file, resolved as QEMU does; None at the bottom."""
    name = img.backing_file
    if name is None:
        return None
    chain = tuple(names)
    fmt = img.backing_format or fallback_format
    if fmt is None:
        msg = (f"names backing file {name!r} without a backing format; "
               f"pass backing_format= (boxdisk never probes a backing file)")
        raise BackingChainError(msg, path=path, field="backing_format", value=name, chain=chain)
    if len(names) >= max_depth:
        msg = f"backing chain is deeper than max_depth={max_depth} images"
        raise BackingChainError(msg, path=path, field="backing_file", value=name, chain=chain)
    if name.startswith("json:"):
        msg = f"backing name {name!r} is a QEMU json: specification, not a file"
        raise UnsupportedFeatureError(msg, path=path, field="backing_file", value=name)
    if _has_protocol(name):
        # QEMU would hand such a name to a protocol driver (nbd:, http:, file:, ...),
        # not resolve it against the image's directory; boxdisk opens local files only.
        msg = (f"backing name {name!r} has a protocol prefix, which QEMU would not read "
               f"as a file next to the image; boxdisk does not follow it")
        raise UnsupportedFeatureError(msg, path=path, field="backing_file", value=name)
    # QEMU's path_combine: relative to the naming image's directory, as opened.
    target = name if os.path.isabs(name) else os.path.join(os.path.dirname(path), name)
    if roots is not None:
        real = os.path.realpath(target)
        if not _under(real, roots):
            msg = (f"backing file {name!r} resolves to {real!r}, "
                   f"outside the allowed roots {roots}")
            raise BackingChainError(msg, path=path, field="backing_file", value=name,
                                    chain=chain)
    return target, fmt


def _count_l1(img: Image, path: str, so_far: int) -> int:
    """Add ``img``'s L1 entries to the chain's count; refuse past MAX_CHAIN_L1_ENTRIES."""
    header = getattr(img, "header", None)
    total = so_far + (0 if header is None else header.l1_size)
    if total > MAX_CHAIN_L1_ENTRIES:
        msg = (f"the chain's L1 tables hold {total} entries together, over boxdisk's "
               f"bound of {MAX_CHAIN_L1_ENTRIES} (each is at most 32 MiB; real disks "
               f"need a few KiB)")
        raise UnsupportedFeatureError(msg, path=path, field="l1_size", value=total)
    return total


def _open_backing(child: str, path: str, fmt: str, names: list[str],
                  roots: list[str] | None) -> Image:
    try:
        img = _open_image(path, fmt)
    except ImageIOError as exc:
        if not isinstance(exc.__cause__, FileNotFoundError):
            raise
        msg = f"backing file {path!r} does not exist"
        raise BackingChainError(msg, path=child, field="backing_file", value=path,
                                chain=tuple(names)) from None
    if roots is not None:
        # The name was checked before opening; check the file actually opened too,
        # so a symlink swapped in between cannot lead outside the roots.
        try:
            opened = os.readlink(f"/proc/self/fd/{img.fd}")
        except OSError:
            opened = os.path.realpath(path)
        if not _under(opened, roots):
            img.close()
            msg = f"backing file {path!r} opened as {opened!r}, outside the allowed roots {roots}"
            raise BackingChainError(msg, path=child, field="backing_file", value=path,
                                    chain=tuple(names))
    return img


class BackingChain:
    """An open backing chain, top image first; owns (and closes) every image in it.

    Lifecycle: open from :meth:`open` until :meth:`close` (idempotent). Use it
    as a context manager.
    """

    def __init__(self, images: list[Image]) -> None:
        """Take ownership of ``images`` (top first); prefer :meth:`open`."""
        if not images:
            msg = "a backing chain needs at least one image"
            raise InvalidArgumentError(msg, field="images")
        self._images = list(images)
        self._closed = False
        share = _CHAIN_L2_CACHE_BYTES // len(self._images)
        for img in self._images:
            if isinstance(img, Qcow2Image):
                img.set_l2_cache_bytes(min(share, 16 * 1024 * 1024))

    @classmethod
    def open(
        cls,
        top: str | os.PathLike[str],
        *,
        format: FormatArg | None = None,
        backing_format: FormatArg | None = None,
        max_depth: int = DEFAULT_MAX_DEPTH,
        allowed_roots: Iterable[str | os.PathLike[str]] | None = None,
        writable: bool = False,
    ) -> Self:
        """Open ``top`` (``format``, default qcow2) and every backing file under it.

        ``backing_format`` is used for the top's backing file only, and only
        when the top carries no backing-format extension; below that, a missing
        extension is an error (boxdisk never probes). ``max_depth`` bounds the
        number of images, the top included. ``allowed_roots``, when given,
        confines every backing file (after resolving symlinks) to those
        directories; the top itself is the caller's choice and is not checked.
        ``writable=True`` opens the top read-write, taking QEMU's write locks
        (:meth:`write`, :meth:`write_zeroes`, :meth:`discard`, :meth:`flush`).
        """
        path = as_path(top, "top")
        top_format = as_optional_format(format, "format", path=path) or "qcow2"
        backing_format = as_optional_format(backing_format, "backing_format", path=path)
        if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 1:
            msg = f"max_depth must be an int of at least 1, not {max_depth!r}"
            raise InvalidArgumentError(msg, field="max_depth", value=repr(max_depth))
        listed = as_paths(allowed_roots, "allowed_roots")
        roots = None if listed is None else [os.path.realpath(r) for r in listed]
        images: list[Image] = []
        names: list[str] = []
        seen: set[tuple[int, int]] = set()
        l1_entries = 0
        try:
            img = (open_writable(path, top_format) if writable
                   else _open_image(path, top_format))
            while True:
                _check_new(img, path, seen, names)
                images.append(img)
                names.append(path)
                l1_entries = _count_l1(img, path, l1_entries)
                link = _backing_link(img, path, names, backing_format if len(images) == 1
                                     else None, max_depth, roots)
                if link is None:
                    break
                child, path, fmt = path, *link
                img = _open_backing(child, path, fmt, names, roots)
        except BaseException:
            for opened in images:
                opened.close()
            raise
        log.debug("chain_opened", top=names[0], depth=len(names))
        chain = cls(images)
        if writable and len(images) > 1:
            below = BackingChain(images[1:])  # a view: ``chain`` owns the images
            chain._writer().attach_below(below.read, below.size)
        return chain

    # -- lifecycle -----------------------------------------------------------

    def close(self) -> None:
        """Close every image; a second call does nothing.

        Every image is closed even when one fails to (a writable top whose last
        flush fails); the first failure is raised after all are closed.
        """
        self._closed = True
        first: BaseException | None = None
        for img in self._images:
            try:
                img.close()
            except BaseException as exc:
                if first is None:
                    first = exc
        if first is not None:
            raise first

    @property
    def closed(self) -> bool:
        """Whether ``close()`` has run."""
        return self._closed

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<BackingChain {' -> '.join(self.paths)}>"

    # -- facts ---------------------------------------------------------------

    @property
    def images(self) -> tuple[Image, ...]:
        """The images, top first."""
        return tuple(self._images)

    @property
    def paths(self) -> tuple[str, ...]:
        """Each image's path as opened (relative backing names joined), top first."""
        return tuple(img.path for img in self._images)

    @property
    def size(self) -> int:
        """The guest-visible size: the top's virtual size."""
        return self._images[0].size

    @property
    def top(self) -> Image:
        """The top image."""
        return self._images[0]

    # -- writing (a chain opened with writable=True) -------------------------

    def _writer(self) -> WritableImage:
        top = self._images[0]
        if self._closed or not isinstance(top, WritableImage):
            msg = "backing chain is closed" if self._closed else "chain is not open for writing"
            raise InvalidArgumentError(msg, path=top.path, field="writable")
        return top

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write guest bytes into the top image (partial clusters copy up from below)."""
        self._writer().write(offset, data)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make a range read as zeros (qcow2 v3: the zero flag on whole clusters)."""
        self._writer().write_zeroes(offset, length)

    def discard(self, offset: int, length: int) -> None:
        """Drop the whole clusters in a range from the top image, as a guest's discard."""
        self._writer().discard(offset, length)

    def flush(self) -> None:
        """Make every write so far durable."""
        self._writer().flush()

    # -- where bytes live ----------------------------------------------------

    def _check_range(self, offset: int, length: int | None) -> int:
        if self._closed:
            msg = "backing chain is closed"
            raise InvalidArgumentError(msg, path=self.paths[0], field="chain")
        if length is None:
            length = self.size - offset
        if offset < 0 or length < 0 or offset + length > self.size:
            msg = f"range [{offset}, {offset}+{length}) outside the {self.size}-byte disk"
            raise InvalidArgumentError(msg, path=self.paths[0], field="offset", value=offset)
        return length

    def runs(self, offset: int = 0, length: int | None = None, *,
             precise: bool = True) -> Iterator[tuple[int, Run]]:
        """``(depth, run)`` pairs covering the range in order, through the whole chain.

        An UNALLOCATED run only appears where no image holds the bytes: at the
        bottom image's depth, or at the depth of the image whose backing file
        ends before them. Both read as zeros. ``precise=False`` skips raw hole
        detection (enough for reading).
        """
        length = self._check_range(offset, length)
        return self._resolve(offset, offset + length, 0, precise)

    def _resolve(self, start: int, end: int, depth: int,
                 precise: bool) -> Iterator[tuple[int, Run]]:
        images = self._images
        below = depth + 1
        for run in images[depth].runs(start, end - start, precise=precise):
            if run.kind is not RunKind.UNALLOCATED or below == len(images):
                yield depth, run
                continue
            inner_end = min(run.end, images[below].size)
            if run.start < inner_end:
                yield from self._resolve(run.start, inner_end, below, precise)
            if inner_end < run.end:
                tail = max(run.start, inner_end)
                host = run.host_offset
                yield depth, Run(RunKind.UNALLOCATED, tail, run.end - tail,
                                 None if host is None else host + tail - run.start)

    # -- reading -------------------------------------------------------------

    def _short(self, offset: int, length: int) -> tuple[Image | None, int] | None:
        """``(image, host offset)`` when one DATA stretch of one image holds the whole
        request, ``(None, 0)`` when it all reads as zeros, None otherwise.

        Each image answers from one cached L2 entry (:meth:`Image.locate`),
        descending while the request is unallocated, as :meth:`_resolve` would;
        a backing file that ends inside the request, a compressed cluster or a
        request crossing a stretch boundary is left to the general path.
        """
        if self._closed or offset < 0 or length <= 0 or offset + length > self._images[0].size:
            return None
        images = self._images
        depth, last = 0, len(images) - 1
        while True:
            img = images[depth]
            where = img.locate(offset)
            if where is None or where[2] < length:
                return None
            kind = where[0]
            if kind is RunKind.DATA:
                return img, where[1]
            if kind is RunKind.ZERO or depth == last:
                return None, 0
            depth += 1
            below = images[depth].size
            if offset + length > below:
                return (None, 0) if offset >= below else None

    def read_into(self, offset: int, buf: memoryview | bytearray) -> None:
        """Fill ``buf`` with the guest bytes at ``offset`` (every byte of it is written).

        ``buf`` is any writable, contiguous buffer (``bytearray``, ``mmap``, a
        ``memoryview`` of one); its length in bytes is the length of the read.
        """
        view = _byte_view(buf, self.paths[0])
        hit = self._short(offset, len(view))
        if hit is not None:
            img, host = hit
            if img is None:
                _fill_zeros(view, 0, len(view))
                return
            try:
                if os.preadv(img.fd, [view], host) == len(view):
                    return
            except OSError:
                pass  # the general path raises the typed error (or succeeds on retry)
        self._read_into(offset, view, zeroed=False)

    def _read_into(self, offset: int, buf: memoryview, *, zeroed: bool) -> None:
        length = self._check_range(offset, len(buf))
        images = self._images
        for depth, (kind, start, n, host, csize) in self._read_runs(offset, offset + length, 0):
            pos = start - offset
            if kind is _DATA:
                images[depth].pread_into(buf[pos : pos + n], host)  # type: ignore[arg-type]
            elif kind is _COMPRESSED:
                images[depth].read_run_into(Run(kind, start, n, host, csize), buf[pos : pos + n])
            elif not zeroed:
                _fill_zeros(buf, pos, pos + n)

    def _read_runs(self, start: int, end: int, depth: int) -> Iterator[tuple[int, RawRun]]:
        """:meth:`_resolve` for a reader: raw tuples, unallocated ones without a host."""
        images = self._images
        below = depth + 1
        bottom = below == len(images)
        for raw in images[depth].read_runs(start, end):
            if raw[0] is not _UNALLOC or bottom:
                yield depth, raw
                continue
            s, e = raw[1], raw[1] + raw[2]
            inner_end = min(e, images[below].size)
            if s < inner_end:
                yield from self._read_runs(s, inner_end, below)
            if inner_end < e:
                tail = max(s, inner_end)
                yield depth, (_UNALLOC, tail, e - tail, None, 0)

    def read(self, offset: int, length: int) -> bytes:
        """The guest bytes ``[offset, offset + length)``, exactly as QEMU's guest reads them.

        A request inside one stretch (typically one cluster) of one image is a
        single ``pread`` straight into the returned bytes; others fill one
        buffer, run by run, and copy it once into the result.
        """
        hit = self._short(offset, length)
        if hit is not None:
            img, host = hit
            if img is None:
                return bytes(length)
            try:
                data = os.pread(img.fd, length, host)
            except OSError:
                data = b""  # the general path raises the typed error
            if len(data) == length:
                return data
        buf = bytearray(self._check_range(offset, length))
        self._read_into(offset, memoryview(buf), zeroed=True)
        return bytes(buf)

    def map(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """Extents like ``qemu-img map --output=json``, adjacent mergeable ones merged.

        Merging follows qemu-img's ``entry_mergeable``: same depth, present,
        zero and data flags, same host file, and contiguous host offsets.
        """
        cur: Extent | None = None
        for ext in self._extents(offset, length):
            if (
                cur is not None
                and cur.depth == ext.depth
                and cur.present == ext.present
                and cur.zero == ext.zero
                and cur.data == ext.data
                and cur.file == ext.file
                and (ext.offset is None if cur.offset is None
                     else ext.offset == cur.offset + cur.length)
            ):
                cur = attrs.evolve(cur, length=cur.length + ext.length)
                continue
            if cur is not None:
                yield cur
            cur = ext
        if cur is not None:
            yield cur

    def _extents(self, offset: int, length: int | None) -> Iterator[Extent]:
        """One unmerged extent per run (a data run may split where its host file has holes)."""
        images = self._images
        for depth, run in self.runs(offset, length):
            kind = run.kind
            img = images[depth]
            present = kind is not RunKind.UNALLOCATED
            data = kind is RunKind.DATA or kind is RunKind.COMPRESSED
            host = None if kind is RunKind.COMPRESSED else run.host_offset
            file = img.path if host is not None else None
            if (kind is RunKind.DATA and host is not None and isinstance(img, Qcow2Image)
                    and img.metadata_preallocation):
                # QEMU then asks the file (BDRV_BLOCK_RECURSE): holes read as zeros.
                for is_data, h_start, h_stop in img.host_data_extents(host, run.length):
                    yield Extent(run.start + h_start - host, h_stop - h_start, depth, True,
                                 not is_data, True, h_start, file)
                continue
            yield Extent(run.start, run.length, depth, present, not data, data, host, file)


def _byte_view(buf: Any, path: str) -> memoryview:
    """``buf`` as a writable one-dimensional byte view, or InvalidArgumentError."""
    try:
        view = memoryview(buf)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
    except (TypeError, ValueError) as exc:  # not a buffer, or a closed mmap
        msg = f"buf must be a writable contiguous buffer, not {type(buf).__name__}"
        raise InvalidArgumentError(msg, path=path, field="buf") from exc
    if not view.c_contiguous:
        msg = f"buf must be contiguous; this {type(buf).__name__} is strided"
        raise InvalidArgumentError(msg, path=path, field="buf")
    if view.readonly:
        msg = f"buf must be writable; this {type(buf).__name__} is read-only"
        raise InvalidArgumentError(msg, path=path, field="buf")
    return view


def _fill_zeros(buf: memoryview, start: int, end: int) -> None:
    """Zero ``buf[start:end]``: ``memset`` for long stretches, a copy of zeros otherwise.

    ``memset`` only writes, so it runs at about twice the speed of copying from
    a buffer of zeros; ctypes is imported the first time a stretch is that long,
    which keeps ``import boxdisk`` as fast as before.
    """
    if end - start >= _MEMSET_MIN:
        import ctypes  # noqa: PLC0415 - only readers of long zero stretches pay for it

        ctypes.memset(ctypes.addressof(ctypes.c_char.from_buffer(buf, start)), 0, end - start)
        return
    while start < end:
        n = min(end - start, len(_ZEROS))
        buf[start : start + n] = _ZEROS[:n]
        start += n


#: Stretches at least this long are zeroed with ``memset`` (see :func:`_fill_zeros`).
_MEMSET_MIN = 64 * 1024


def open_chain(
    top: str | os.PathLike[str],
    *,
    format: FormatArg | None = None,
    backing_format: FormatArg | None = None,
    max_depth: int = DEFAULT_MAX_DEPTH,
    allowed_roots: Iterable[str | os.PathLike[str]] | None = None,
    writable: bool = False,
) -> BackingChain:
    """Open a backing chain (see :meth:`BackingChain.open`)."""
    return BackingChain.open(top, format=format, backing_format=backing_format,
                             max_depth=max_depth, allowed_roots=allowed_roots,
                             writable=writable)
