"""One raw image file, opened read-only; holes found with SEEK_DATA/SEEK_HOLE."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from boxdisk._args import as_path

from ._base import Image, data_extents, open_image_fd
from ._runs import Run, RunKind

if TYPE_CHECKING:
    from typing import Self

__all__ = ["RawImage"]

_DEFAULT_GRANULE = 64 * 1024
_SECTOR = 512


class RawImage(Image):
    """A raw image: guest offset equals file offset, the size is the file's size.

    Holes read as zeros and are reported as ZERO runs (with their host
    offset, as ``qemu-img map`` does); a raw file has no backing file. A block
    device is a raw image too (its size found by seeking to its end). As in
    QEMU, the disk's size is the file's rounded up to whole 512-byte sectors;
    the bytes past the file's end read as zeros.
    """

    format = "raw"
    file_size: int

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Self:
        """Open ``path`` read-only."""
        p = as_path(path, "path")
        fd, size = open_image_fd(p)
        self = cls.__new__(cls)
        Image.__init__(self, p, fd)
        self.file_size = size
        self.size = -(-size // _SECTOR) * _SECTOR
        self.cluster_size = _DEFAULT_GRANULE
        return self

    def runs(self, offset: int = 0, length: int | None = None, *,
             precise: bool = True) -> Iterator[Run]:
        """DATA and ZERO (hole) runs over the range; all DATA when not ``precise``."""
        length = self._check_range(offset, length)
        if length == 0:
            return iter(())
        if not precise:
            return iter((Run(RunKind.DATA, offset, length, offset),))
        return (Run(RunKind.DATA if is_data else RunKind.ZERO, start, stop - start, start)
                for is_data, start, stop in data_extents(self.fd, self.path, offset,
                                                         offset + length, self.file_size))

    def locate(self, offset: int) -> tuple[RunKind, int, int] | None:
        """DATA from ``offset`` to the end of the disk.

        Holes read as zeros through ``pread``; a read that comes back short (the
        sector tail past the file's end) is left to the general path.
        """
        return (RunKind.DATA, offset, self.size - offset)

    def read_compressed(self, run: Run) -> bytes:  # pragma: no cover - raw has none
        """Raw files hold no compressed clusters."""
        raise NotImplementedError
