"""QEMU's image locks: OFD byte-range locks on the image file itself.

QEMU (block/file-posix.c, ``raw_apply_lock_bytes``) takes a shared lock on
byte ``100 + n`` for each permission ``n`` it holds and on byte ``200 + n``
for each permission it does not share with others. Permission bits:
0 consistent read, 1 write, 2 write unchanged, 3 resize. A process that
wants permission ``n`` conflicts with anyone holding ``200 + n``; one that
does not share ``n`` conflicts with anyone holding ``100 + n``.

boxdisk uses the same bytes, so QEMU and boxdisk see each other's locks:
an image boxdisk writes is refused by ``qemu-img info`` without ``-U``, and
boxdisk refuses to write or destroy an image a running QEMU holds.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from ._errors import DiskInUseError, ImageIOError

__all__ = ["PERM_CONSISTENT_READ", "PERM_RESIZE", "PERM_WRITE", "PERM_WRITE_UNCHANGED",
           "image_in_use", "lock_for_write"]

PERM_CONSISTENT_READ = 0
PERM_WRITE = 1
PERM_WRITE_UNCHANGED = 2
PERM_RESIZE = 3
_PERM_BASE = 100
_SHARED_BASE = 200
_ALL_PERMS = (PERM_CONSISTENT_READ, PERM_WRITE, PERM_WRITE_UNCHANGED, PERM_RESIZE)
_PERM_NAMES = {0: "consistent read", 1: "write", 2: "write unchanged", 3: "resize"}

# struct flock: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid
_FLOCK = struct.Struct("hhqqi4x")


def _ofd(fd: int, cmd: int, lock_type: int, start: int, length: int = 1) -> int:
    """One F_OFD_* call; returns the lock type that F_OFD_GETLK found (F_UNLCK if none)."""
    arg = _FLOCK.pack(lock_type, os.SEEK_SET, start, length, 0)
    out = fcntl.fcntl(fd, cmd, arg)
    return int(_FLOCK.unpack(out)[0])


def _held_by_other(fd: int, byte: int) -> bool:
    # A write-lock probe conflicts with any read lock another open file holds.
    return _ofd(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, byte) != fcntl.F_UNLCK


def lock_for_write(fd: int, path: str) -> None:
    """Take QEMU's locks for a writer on ``fd`` (held until the fd is closed).

    Holds consistent read, write, write unchanged and resize; shares
    consistent read and write unchanged. Raises :class:`DiskInUseError` when
    another process (a QEMU) holds a conflicting lock.
    """
    wanted = _ALL_PERMS
    unshared = (PERM_WRITE, PERM_RESIZE)
    try:
        for perm in wanted:
            if _held_by_other(fd, _SHARED_BASE + perm):
                msg = f"another process does not share the {_PERM_NAMES[perm]} permission"
                raise DiskInUseError(msg, path=path, field="lock", value=_SHARED_BASE + perm)
        for perm in unshared:
            if _held_by_other(fd, _PERM_BASE + perm):
                msg = f"another process holds the {_PERM_NAMES[perm]} permission (a running QEMU?)"
                raise DiskInUseError(msg, path=path, field="lock", value=_PERM_BASE + perm)
        for perm in wanted:
            _ofd(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, _PERM_BASE + perm)
        for perm in unshared:
            _ofd(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, _SHARED_BASE + perm)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            msg = "image is locked by another process"
            raise DiskInUseError(msg, path=path, field="lock") from None
        msg = f"cannot lock image: {exc.strerror}"
        raise ImageIOError(msg, path=path) from None


def image_in_use(path: str | os.PathLike[str]) -> bool:
    """Whether any other open file (a running QEMU, a boxdisk writer) holds QEMU's lock bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError as exc:
        msg = f"cannot open image to probe its locks: {exc.strerror}"
        raise ImageIOError(msg, path=path) from None
    try:
        return any(
            _held_by_other(fd, base + perm)
            for base in (_PERM_BASE, _SHARED_BASE)
            for perm in _ALL_PERMS
        )
    finally:
        os.close(fd)


def ensure_not_in_use(path: str | os.PathLike[str], action: str) -> None:
    """Raise :class:`DiskInUseError` when a running QEMU (or a writer) holds ``path``."""
    if image_in_use(path):
        msg = f"refusing to {action}: the image is in use (QEMU's image locks are held)"
        raise DiskInUseError(msg, path=path, field="lock")
