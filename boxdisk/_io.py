"""The one write loop (``pwrite`` until every byte is written), and new files in one piece.

:func:`link_anonymous` is how boxdisk makes a new file appear complete or not
at all, where the system can: the bytes go into an unnamed ``O_TMPFILE``
inode that ``linkat`` then names. The image layer (``qcow2``) and the store
(``store/_fs``) both use it, each with its own fallback (a locked, named
temporary file) and its own durability.
"""

from __future__ import annotations

import errno
import os

__all__ = ["fill", "link_anonymous", "pwrite_all", "write_all"]

#: Whether to try ``O_TMPFILE`` + ``linkat`` for new files; cleared (for the process)
#: the first time the file system or kernel refuses either, and by tests forcing the
#: named-temporary fallback.
use_o_tmpfile = hasattr(os, "O_TMPFILE")

#: What a file system or kernel without O_TMPFILE (or linkat of one) answers.
_NO_TMPFILE = frozenset({errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.EXDEV,
                         errno.ENOSYS, errno.EPERM})


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


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until all of ``data`` is written (a filling disk writes less, then fails)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fill(fd: int, writes: tuple[tuple[int, bytes], ...], size: int | None) -> None:
    """Write ``writes`` ((offset, bytes) pairs) into a new file, then make it ``size`` long.

    A single piece at offset 0 is one ``write`` from the new descriptor (small
    metadata files); anything else, ``pwrite`` at each offset.
    """
    if len(writes) == 1 and writes[0][0] == 0:
        write_all(fd, writes[0][1])
    else:
        for offset, data in writes:
            pwrite_all(fd, data, offset)
    if size is not None:
        os.ftruncate(fd, size)


def link_anonymous(directory: str | os.PathLike[str], name: str,
                   writes: tuple[tuple[int, bytes], ...], size: int | None, *,
                   sync: bool) -> bool | None:
    """Write a new file into an unnamed ``O_TMPFILE`` inode, then link it in as ``name``.

    With ``sync`` the file is fsynced before the link and the directory after
    it. Returns True once linked, False if ``name`` was taken meanwhile
    (``linkat`` never replaces a name), None when the file system or kernel
    cannot do it (:data:`use_o_tmpfile` is then cleared and the caller falls
    back to a named temporary file; at once, once it is cleared). A crash
    before the link leaves no file at all: an unnamed inode is freed by the
    kernel.
    """
    global use_o_tmpfile  # noqa: PLW0603 - a process-wide capability switch
    if not use_o_tmpfile:
        return None
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno in _NO_TMPFILE:
                use_o_tmpfile = False
                return None
            raise
        try:
            fill(fd, writes, size)
            if sync:
                os.fsync(fd)
            try:
                # linkat(AT_FDCWD, "/proc/self/fd/N", dir_fd, name, AT_SYMLINK_FOLLOW); without
                # a dir_fd Python calls link(2), which does not follow the /proc link.
                os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dir_fd, follow_symlinks=True)
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno in _NO_TMPFILE or exc.errno == errno.ENOENT:
                    use_o_tmpfile = False  # e.g. no /proc: the named fallback works
                    return None
                raise
        finally:
            os.close(fd)
        if sync:
            os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return True
