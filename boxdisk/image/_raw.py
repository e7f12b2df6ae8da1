"""One raw image file, opened read-only; holes found with SEEK_DATA/SEEK_HOLE."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from boxdisk._errors import ImageIOError

from ._base import Image
from ._qcow2 import _open_fd
from ._runs import Run, RunKind

if TYPE_CHECKING:
    from typing import Self

__all__ = ["RawImage"]

_DEFAULT_GRANULE = 64 * 1024


class RawImage(Image):
    """A raw image: guest offset equals file offset, the size is the file's size.

    Holes read as zeros and are reported as ZERO runs (with their host
    offset, as ``qemu-img map`` does); a raw file has no backing file.
    """

    format = "raw"

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Self:
        """Open ``path`` read-only."""
        p = os.fspath(path)
        self = cls.__new__(cls)
        Image.__init__(self, p, _open_fd(p))
        try:
            self.size = os.fstat(self._fd).st_size
        except OSError as exc:
            self.close()
            msg = f"cannot stat: {exc.strerror}"
            raise ImageIOError(msg, path=p, field="path") from exc
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
        return self._hole_runs(offset, offset + length)

    def _hole_runs(self, pos: int, end: int) -> Iterator[Run]:
        fd = self.fd
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: only a hole up to the end
                    msg = f"SEEK_DATA failed: {exc.strerror}"
                    raise ImageIOError(msg, path=self.path,
                                       field="offset", value=pos) from exc
                data = end
            data = min(data, end)
            if data > pos:
                yield Run(RunKind.ZERO, pos, data - pos, pos)
            if data >= end:
                return
            try:
                hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            except OSError as exc:
                msg = f"SEEK_HOLE failed: {exc.strerror}"
                raise ImageIOError(msg, path=self.path,
                                   field="offset", value=data) from exc
            yield Run(RunKind.DATA, data, hole - data, data)
            pos = hole

    def read_compressed(self, run: Run) -> bytes:  # pragma: no cover - raw has none
        """Raw files hold no compressed clusters."""
        raise NotImplementedError
