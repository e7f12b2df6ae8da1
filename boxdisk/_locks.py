"""QEMU's image locks: OFD byte-range locks on the image file itself.

QEMU (block/file-posix.c, ``raw_apply_lock_bytes`` / ``raw_check_lock_bytes``)
takes a shared lock on byte ``100 + n`` for each permission ``n`` it holds and
on byte ``200 + n`` for each permission it does not share with others.
Permission bits (QEMU's ``BLK_PERM_*``): 0 consistent read, 1 write, 2 write
unchanged, 3 resize. A process that wants permission ``n`` conflicts with
anyone holding byte ``200 + n``; one that does not share ``n`` conflicts with
anyone holding ``100 + n``. A conflict is tested by asking (``F_OFD_GETLK``)
whether an exclusive lock on the byte could be had.

As QEMU does, a writer first applies its own lock bytes and only then checks
for conflicts, so two writers racing for one image both see each other and at
least one of them gives up; neither can slip past the other.

boxdisk uses the same bytes, so QEMU and boxdisk see each other's locks: an
image boxdisk writes is refused by ``qemu-img info`` without ``-U``, and
boxdisk refuses to write or destroy an image a running QEMU holds. OFD locks
belong to the open file description: they are released when the writer closes
its descriptor, and closing another descriptor of the same file in the same
process does not drop them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import stat
import struct
from collections.abc import Iterable

from ._args import as_path
from ._errors import DiskInUseError, ImageIOError

__all__ = [
    "PERM_CONSISTENT_READ",
    "PERM_RESIZE",
    "PERM_WRITE",
    "PERM_WRITE_UNCHANGED",
    "being_written",
    "create_temp",
    "ensure_consistent_read",
    "ensure_not_in_use",
    "image_in_use",
    "lock_for_write",
    "remove_stale_temp",
    "remove_stale_temps",
    "temp_held",
]

PERM_CONSISTENT_READ = 0
PERM_WRITE = 1
PERM_WRITE_UNCHANGED = 2
PERM_RESIZE = 3
_PERM_BASE = 100
_SHARED_BASE = 200
_ALL_PERMS = (PERM_CONSISTENT_READ, PERM_WRITE, PERM_WRITE_UNCHANGED, PERM_RESIZE)
_PERM_NAMES = {0: "consistent read", 1: "write", 2: "write unchanged", 3: "resize"}

#: What a boxdisk writer holds: every permission (a qcow2 writer grows its file).
_WRITER_PERMS = _ALL_PERMS
#: What it does not share: nobody else may write or resize the image meanwhile.
_WRITER_UNSHARED = (PERM_WRITE, PERM_RESIZE)

# struct flock: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid
# (native alignment puts the padding where the C compiler does).
_FLOCK = struct.Struct("hhqqi4x")


def _ofd(fd: int, cmd: int, lock_type: int, start: int, length: int = 1) -> int:
    """One F_OFD_* call; returns the lock type F_OFD_GETLK found (F_UNLCK if none)."""
    arg = _FLOCK.pack(lock_type, os.SEEK_SET, start, length, 0)
    out = fcntl.fcntl(fd, cmd, arg)
    return int(_FLOCK.unpack(out)[0])


def _held_by_other(fd: int, byte: int, length: int = 1) -> bool:
    # An exclusive-lock probe conflicts with a shared lock any other open file holds on
    # any byte of the range.
    return _ofd(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, byte, length) != fcntl.F_UNLCK


def lock_for_write(fd: int, path: str) -> None:
    """Take QEMU's locks for a writer on ``fd`` (held until the descriptor is closed).

    Holds consistent read, write, write unchanged and resize; shares
    consistent read and write unchanged (QEMU's permissions for a qcow2 image
    opened read-write). Raises :class:`DiskInUseError` naming the permission
    when another process (a QEMU, another writer) holds a conflicting lock;
    the locks taken so far are then released.
    """
    try:
        for perm in _WRITER_PERMS:
            _ofd(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, _PERM_BASE + perm)
        for perm in _WRITER_UNSHARED:
            _ofd(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, _SHARED_BASE + perm)
        conflict = _conflict(fd)
    except OSError as exc:
        _unlock_all(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            msg = "image is locked by another process"
            raise DiskInUseError(msg, path=path, field="lock") from None
        msg = f"cannot lock image: {exc.strerror}"
        raise ImageIOError(msg, path=path, field="lock") from None
    if conflict is not None:
        _unlock_all(fd)
        msg, byte = conflict
        raise DiskInUseError(msg, path=path, field="lock", value=byte)


def _conflict(fd: int) -> tuple[str, int] | None:
    """QEMU's raw_check_lock_bytes for a writer: the first conflicting lock, if any."""
    for perm in _WRITER_PERMS:
        if _held_by_other(fd, _SHARED_BASE + perm):
            return (f"another process does not share the {_PERM_NAMES[perm]} permission "
                    f"(a running QEMU?)", _SHARED_BASE + perm)
    for perm in _WRITER_UNSHARED:
        if _held_by_other(fd, _PERM_BASE + perm):
            return (f"another process holds the {_PERM_NAMES[perm]} permission "
                    f"(a running QEMU?)", _PERM_BASE + perm)
    return None


def _unlock_all(fd: int) -> None:
    # The descriptor is about to be closed, which releases the locks anyway.
    with contextlib.suppress(OSError):
        _ofd(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, _PERM_BASE, _SHARED_BASE + 100 - _PERM_BASE)


def _probe(path: str | os.PathLike[str], ranges: Iterable[tuple[int, int]]) -> bool:
    """Whether another open file holds a lock on any byte of the ``(start, length)`` ranges.

    A missing file holds none.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        return False
    except OSError as exc:
        msg = f"cannot open image to probe its locks: {exc.strerror}"
        raise ImageIOError(msg, path=path, field="lock") from None
    try:
        return any(_held_by_other(fd, start, length) for start, length in ranges)
    except OSError as exc:
        msg = f"cannot probe the image's locks: {exc.strerror}"
        raise ImageIOError(msg, path=path, field="lock") from None
    finally:
        os.close(fd)


def image_in_use(path: str | os.PathLike[str]) -> bool:
    """Whether another open file (a running QEMU, a boxdisk writer) holds QEMU's lock bytes.

    Any of bytes 100-103 or 200-203 held counts: a VM reading a base image
    read-only holds 100 and 201, and that base must not be rewritten either.
    A missing file is not in use.
    """
    # One probe per range of four bytes: a lock on any of them is found.
    return _probe(as_path(path, "path"), ((base, len(_ALL_PERMS))
                                          for base in (_PERM_BASE, _SHARED_BASE)))


def ensure_not_in_use(path: str | os.PathLike[str], action: str) -> None:
    """Raise :class:`DiskInUseError` when a running QEMU (or a writer) holds ``path``."""
    if image_in_use(path):
        msg = f"refusing to {action}: the image is in use (QEMU's image locks are held)"
        raise DiskInUseError(msg, path=path, field="lock")


def being_written(path: str | os.PathLike[str]) -> bool:
    """Whether another open file holds the write permission (byte 101): a running VM.

    Readers of a base (bytes 100 and 201) do not count: reading alongside them
    is safe. A missing file is not being written.
    """
    return _probe(path, ((_PERM_BASE + PERM_WRITE, 1),))


def ensure_consistent_read(paths: Iterable[str | os.PathLike[str]], action: str) -> None:
    """Raise :class:`DiskInUseError` if another process is writing any of ``paths``.

    What ``qemu-img convert`` and ``compare`` check before reading (unless
    ``-U``): a copy of a disk a running VM writes would mix old and new bytes.
    """
    for path in paths:
        if being_written(path):
            msg = (f"refusing to {action}: the image is being written by another process "
                   f"(a running VM?); the result would not be consistent "
                   f"(force_share=True reads it anyway)")
            raise DiskInUseError(msg, path=path, field="lock", value=_PERM_BASE + PERM_WRITE)


# -- temporary files of crash-safe writers --------------------------------------------
#
# A file replaced crash-safely is first written as ``.NAME.<12 hex>.tmp`` beside it. Its
# writer holds an exclusive flock(2) on it from creation until it is renamed into place
# or removed; the kernel drops the lock when the writer dies. A temporary file nobody
# holds is therefore a leftover of a killed writer, and whoever next writes NAME (or the
# store's gc) removes it. flock is independent of QEMU's OFD lock bytes above.


def _temp_name(name: str) -> str:
    return f".{name[:200]}.{secrets.token_hex(6)}.tmp"


def create_temp(directory: str, name: str, mode: int = 0o666) -> tuple[int, str]:
    """Create and lock a new empty temporary file for ``name`` in ``directory``.

    Returns (fd, path); the lock lasts as long as the descriptor. ``mode`` less
    the umask (0666: as qemu-img creates images). Raises OSError.
    """
    while True:
        tmp = os.path.join(directory, _temp_name(name))
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        except FileExistsError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # Between open and flock a sweeper may have found the file unlocked and
            # removed it: then this descriptor is no longer the path's; take another name.
            mine = os.fstat(fd)
            now = os.lstat(tmp)
            if (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
                return fd, tmp
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        os.close(fd)


def _open_temp(path: str) -> tuple[int, os.stat_result] | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                     | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
    except OSError:
        st = None
    if st is None or not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None
    return fd, st


def temp_held(path: str | os.PathLike[str]) -> bool:
    """Whether a live writer holds the temporary file ``path`` (False when it is gone)."""
    opened = _open_temp(os.fspath(path))
    if opened is None:
        return False
    fd, _st = opened
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def remove_stale_temp(path: str | os.PathLike[str]) -> bool:
    """Remove the temporary file ``path`` if no writer holds it; whether it was removed.

    The file is removed while this process holds its lock, so a writer that
    created it a moment ago (and has not locked it yet) notices and moves on.
    """
    p = os.fspath(path)
    opened = _open_temp(p)
    if opened is None:
        return False
    fd, st = opened
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        now = os.lstat(p)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return False
        os.unlink(p)
    except OSError:  # held by a live writer (BlockingIOError), or gone meanwhile
        return False
    finally:
        os.close(fd)
    return True


def remove_stale_temps(directory: str, name: str) -> int:
    """Remove the temporary files killed writers left for ``name`` in ``directory``.

    Only names of the form :func:`create_temp` makes for ``name`` are looked
    at, and only unlocked ones go. Returns how many were removed.
    """
    pattern = re.compile(rf"\.{re.escape(name[:200])}\.[0-9a-f]{{12}}\.tmp")
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    return sum(remove_stale_temp(os.path.join(directory, n))
               for n in names if pattern.fullmatch(n))
