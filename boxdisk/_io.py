"""The one write loop: ``pwrite`` until every byte is written."""

from __future__ import annotations

import errno
import os

__all__ = ["pwrite_all"]


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset``.

    ``pwrite`` may write less than asked (a filling disk does, then fails): the
    rest is written by the next call, whose failure (``ENOSPC``, ``EIO``) is the
    :class:`OSError` raised. A call that writes nothing raises ``EIO`` rather
    than spinning.
    """
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, f"pwrite wrote nothing of {len(view)} bytes")
        view, offset = view[n:], offset + n
