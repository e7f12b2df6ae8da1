"""Images opened read-write: the contract a writable chain's top fulfils, and a raw writer.

A writable image is an :class:`Image` (a chain reads through it, seeing every
write at once) that also takes guest writes. It holds QEMU's write locks on its
file from opening to :meth:`WritableImage.close`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Self

from boxdisk._errors import ImageIOError, InvalidArgumentError
from boxdisk._io import pwrite_all
from boxdisk._locks import lock_for_write
from boxdisk._log import get_logger

from ._base import Image
from ._raw import RawImage

__all__ = ["RawWriter", "ReadBelow", "WritableImage"]

log = get_logger(__name__)

#: Reads guest bytes from the layers under an image: ``(offset, length) -> bytes``.
ReadBelow = Callable[[int, int], bytes]

_ZERO_CHUNK = 1 << 20


class WritableImage(Image):
    """An image file opened read-write and locked; the top of a writable chain."""

    def attach_below(self, read_below: ReadBelow | None, below_size: int | None = None) -> None:
        """Say what the layers under this image read (for copying up partial clusters)."""
        raise NotImplementedError

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write guest bytes at ``offset``."""
        raise NotImplementedError

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make ``[offset, offset + length)`` read as zeros."""
        raise NotImplementedError

    def discard(self, offset: int, length: int) -> None:
        """Tell the image the guest no longer needs a range (advisory)."""
        raise NotImplementedError

    def flush(self) -> None:
        """Make every write so far durable."""
        raise NotImplementedError

    def resize(self, new_size: int) -> None:
        """Change the virtual size."""
        raise NotImplementedError


class RawWriter(RawImage, WritableImage):
    """A raw file opened read-write and locked: guest offset equals file offset.

    ``discard`` does nothing (it is advisory, and boxdisk does not punch
    holes); ``write_zeroes`` writes zero bytes.
    """

    def __init__(self, path: str | os.PathLike[str], *, lock: bool = True) -> None:
        p = os.fspath(path)
        try:
            fd = os.open(p, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            msg = f"cannot open raw image for writing: {exc.strerror}"
            raise ImageIOError(msg, path=p, field="path", value=p) from exc
        Image.__init__(self, p, fd)
        try:
            if lock:
                lock_for_write(fd, p)
            # As QEMU (and RawImage) see it: the file rounded up to whole sectors;
            # the bytes past its end read as zeros and a write there extends it.
            self.size = -(-os.fstat(fd).st_size // 512) * 512
        except BaseException:
            self._fd = -1
            os.close(fd)
            raise
        self.cluster_size = 64 * 1024

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, lock: bool = True) -> Self:
        """Open ``path`` for writing."""
        return cls(path, lock=lock)

    def attach_below(self, read_below: ReadBelow | None, below_size: int | None = None) -> None:
        """A raw image has nothing below it; only None is accepted."""
        if read_below is not None:
            msg = "a raw image has no backing file"
            raise InvalidArgumentError(msg, path=self.path, field="backing_file")

    def _check_write(self, offset: int, length: int) -> None:
        self.fd  # noqa: B018 - raises when closed
        if offset < 0 or length < 0 or offset + length > self.size:
            msg = f"range [{offset}, {offset}+{length}) outside the {self.size}-byte disk"
            raise InvalidArgumentError(msg, path=self.path, field="offset", value=offset)

    def _pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        try:
            pwrite_all(self.fd, data, offset)
        except OSError as exc:
            msg = f"cannot write {memoryview(data).nbytes} bytes at {offset}: {exc.strerror}"
            raise ImageIOError(msg, path=self.path, field="offset", value=offset) from exc

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write guest bytes at ``offset``."""
        view = memoryview(data).cast("B")
        self._check_write(offset, len(view))
        self._pwrite(view, offset)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Write zero bytes over the range."""
        self._check_write(offset, length)
        zero = memoryview(bytes(min(length, _ZERO_CHUNK)))
        end = offset + length
        while offset < end:
            n = min(len(zero), end - offset)
            self._pwrite(zero[:n], offset)
            offset += n

    def discard(self, offset: int, length: int) -> None:
        """Advisory: checks the range and keeps the bytes."""
        self._check_write(offset, length)

    def flush(self) -> None:
        """fsync the file."""
        if self._fd < 0:
            return
        try:
            os.fsync(self._fd)
        except OSError as exc:
            msg = f"fsync failed: {exc.strerror}"
            raise ImageIOError(msg, path=self.path, field="fsync") from exc

    def resize(self, new_size: int) -> None:
        """Set the file's length (new bytes read as zeros), durably."""
        if not isinstance(new_size, int) or new_size < 0:
            msg = f"new size {new_size!r} is not a non-negative number of bytes"
            raise InvalidArgumentError(msg, path=self.path, field="size", value=new_size)
        try:
            os.ftruncate(self.fd, new_size)
        except OSError as exc:
            msg = f"cannot resize to {new_size}: {exc.strerror}"
            raise ImageIOError(msg, path=self.path, field="size", value=new_size) from exc
        self.flush()
        log.info("image_resized", path=self.path, old_size=self.size, new_size=new_size)
        self.size = new_size

    def close(self) -> None:
        """fsync and close the file (releasing QEMU's locks). Idempotent."""
        if self._fd < 0:
            return
        try:
            self.flush()
        finally:
            Image.close(self)
