"""What every image has: one owned file descriptor, a virtual size, runs, and reads."""

from __future__ import annotations

import errno
import os
import stat
import warnings
from collections.abc import Iterator
from types import TracebackType
from typing import Self

from boxdisk._errors import CorruptImageError, ImageIOError, InvalidArgumentError

from ._runs import RawRun, Run, RunKind

__all__ = ["Image", "data_extents", "open_image_fd", "pread_exact"]


def open_image_fd(path: str) -> tuple[int, int]:
    """Open ``path`` read-only and return ``(fd, size in bytes)``.

    Only regular files and block devices are images. The open does not block
    (a FIFO named as a backing file must not hang the caller) and a block
    device's size comes from seeking to its end, as QEMU's file driver does.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        msg = f"cannot open: {exc.strerror}"
        raise ImageIOError(msg, path=path, field="path", value=path) from exc
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            size = st.st_size
        elif stat.S_ISBLK(st.st_mode):
            size = os.lseek(fd, 0, os.SEEK_END)
        else:
            kind = "directory" if stat.S_ISDIR(st.st_mode) else "special file"
            msg = f"is a {kind}, not a regular file or block device"
            raise ImageIOError(msg, path=path, field="path", value=path)
        os.set_blocking(fd, True)
    except OSError as exc:
        os.close(fd)
        if isinstance(exc, ImageIOError):
            raise
        msg = f"cannot inspect: {exc.strerror}"
        raise ImageIOError(msg, path=path, field="path", value=path) from exc
    return fd, size


def pread_exact(fd: int, path: str, offset: int, length: int, what: str) -> bytes:
    """Exactly ``length`` bytes of metadata ``what`` at ``offset``.

    A failed read is an :class:`ImageIOError`, a short one (the table runs past
    the end of the file) a :class:`CorruptImageError`; both name ``what``.
    """
    try:
        data = os.pread(fd, length, offset)
    except OSError as exc:
        msg = f"cannot read {what} at 0x{offset:x}: {exc.strerror}"
        raise ImageIOError(msg, path=path, field=what, value=offset) from exc
    if len(data) != length:
        msg = f"{what} at 0x{offset:x} ({length} bytes) runs past the end of the file"
        raise CorruptImageError(msg, path=path, field=what, value=offset)
    return data


def data_extents(fd: int, path: str, pos: int, end: int,
                 file_size: int) -> Iterator[tuple[bool, int, int]]:
    """``(is_data, start, stop)`` over host bytes ``[pos, end)`` from SEEK_DATA/SEEK_HOLE.

    Bytes past ``file_size`` are a hole, as QEMU's file driver reports them. A
    file or device that cannot answer (EINVAL, EOPNOTSUPP) is all data, again
    as QEMU assumes.
    """
    stop = min(end, file_size)
    while pos < stop:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole up to the end
                data = stop
            elif exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield True, pos, stop
                pos = stop
                break
            else:
                msg = f"SEEK_DATA failed: {exc.strerror}"
                raise ImageIOError(msg, path=path, field="offset", value=pos) from exc
        data = min(data, stop)
        if data > pos:
            yield False, pos, data
        if data >= stop:
            pos = stop
            break
        try:
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), stop)
        except OSError as exc:
            msg = f"SEEK_HOLE failed: {exc.strerror}"
            raise ImageIOError(msg, path=path, field="offset", value=data) from exc
        yield True, data, hole
        pos = hole
    if pos < end:
        yield False, pos, end


class Image:
    """One image file opened read-only; subclasses say where guest bytes live.

    Lifecycle: an image is open from ``open()`` until ``close()`` (idempotent);
    it owns its file descriptor and nothing else. Use it as a context manager.
    """

    format: str = ""
    path: str
    size: int
    cluster_size: int
    backing_file: str | None = None
    backing_format: str | None = None
    _fd: int

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd = fd

    # -- lifecycle -------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether ``close()`` has run."""
        return self._fd < 0

    @property
    def fd(self) -> int:
        """The file descriptor (owned by this image; do not close it)."""
        if self._fd < 0:
            msg = "image is closed"
            raise InvalidArgumentError(msg, path=self.path, field="fd")
        return self._fd

    def close(self) -> None:
        """Close the file; a second call does nothing."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            warnings.warn(f"unclosed image {self.path!r}", ResourceWarning, stacklevel=2)
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<{type(self).__name__} {self.path!r} size={self.size} {state}>"

    # -- where bytes live ------------------------------------------------------

    def runs(self, offset: int = 0, length: int | None = None, *,
             precise: bool = True) -> Iterator[Run]:
        """Runs covering ``[offset, offset + length)`` (default: to the end), in order.

        ``precise=False`` lets a raw image skip hole detection (every byte is
        then DATA), which is all a reader needs.
        """
        raise NotImplementedError

    def read_runs(self, start: int, end: int) -> Iterator[RawRun]:
        """``[start, end)`` as uncoalesced ``(kind, start, length, host, csize)`` tuples.

        What a reader needs and no more: the same stretches and checks as
        ``runs(precise=False)``, without building and merging :class:`Run`
        objects. Adjacent tuples may share a kind.
        """
        for r in self.runs(start, end - start, precise=False):
            yield r.kind, r.start, r.length, r.host_offset, r.compressed_size

    def _check_range(self, offset: int, length: int | None) -> int:
        if self._fd < 0:  # also when every answer would come from a cached table
            msg = "image is closed"
            raise InvalidArgumentError(msg, path=self.path, field="fd")
        if length is None:
            length = self.size - offset
        if offset < 0 or length < 0 or offset + length > self.size:
            msg = f"range [{offset}, {offset}+{length}) outside the {self.size}-byte disk"
            raise InvalidArgumentError(msg, path=self.path, field="offset", value=offset)
        return length

    # -- reading ---------------------------------------------------------------

    def read_compressed(self, run: Run) -> bytes:
        """The whole guest cluster a COMPRESSED run lies in, decompressed."""
        raise NotImplementedError

    def read_run_into(self, run: Run, buf: memoryview) -> None:
        """Fill ``buf`` (``run.length`` bytes) with a DATA or COMPRESSED run's guest bytes.

        UNALLOCATED and ZERO runs leave ``buf`` untouched; the caller decides
        what an unallocated stretch reads as.
        """
        if run.kind is RunKind.DATA:
            assert run.host_offset is not None
            self.pread_into(buf, run.host_offset)
        elif run.kind is RunKind.COMPRESSED:
            cluster = self.read_compressed(run)
            intra = run.start & (self.cluster_size - 1)
            buf[:] = cluster[intra : intra + run.length]

    def pread_into(self, buf: memoryview, host_offset: int) -> None:
        """Read host bytes into ``buf``; bytes past the end of the file read as zeros."""
        fd = self.fd
        done, want = 0, len(buf)
        while done < want:
            try:
                n = os.preadv(fd, [buf[done:]], host_offset + done)
            except OSError as exc:
                msg = f"read of {want - done} bytes at host offset {host_offset + done} failed"
                raise ImageIOError(msg, path=self.path, field="host_offset",
                                   value=host_offset + done) from exc
            if n == 0:  # past the end of the file: reads as zeros, as in QEMU
                buf[done:] = bytes(want - done)
                return
            done += n

    def locate(self, offset: int) -> tuple[RunKind, int, int] | None:
        """``(kind, host offset, bytes)``: the short-path answer for the byte at ``offset``.

        ``bytes`` counts the bytes from ``offset`` on (at least 1, often to the
        end of the cluster) that share ``kind`` and, for DATA, contiguous host
        bytes from ``host offset``. Only DATA, ZERO and UNALLOCATED are
        answered; None (compressed clusters, an image type without a short
        path) sends the caller to :meth:`runs`, which is always exact.
        """
        return None

    def read(self, offset: int, length: int) -> bytes:
        """The guest bytes ``[offset, offset + length)`` of this file alone.

        Stretches this file does not allocate read as zeros; reading through
        backing files is :class:`boxdisk.chain.BackingChain`'s job. A read that
        :meth:`locate` places in one stretch is one ``pread`` (or zeros).
        """
        length = self._check_range(offset, length)
        where = self.locate(offset) if length else None
        if where is not None and where[2] >= length:
            if where[0] is not RunKind.DATA:
                return bytes(length)
            try:
                data = os.pread(self._fd, length, where[1])
            except OSError:
                data = b""  # the general path below raises the typed error
            if len(data) == length:
                return data
        buf = bytearray(length)
        view = memoryview(buf)
        for run in self.runs(offset, length, precise=False):
            pos = run.start - offset
            self.read_run_into(run, view[pos : pos + run.length])
        return bytes(buf)
