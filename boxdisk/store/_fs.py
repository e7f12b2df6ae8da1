"""The store's own file writes, and the one seam every durable system call goes through.

Everything the store makes durable (fsync, syncfs) is done here, by
:func:`durable`, which also tells the :data:`observers` (the test that holds
each operation to its documented count of durable calls). The store writes its
small files (metadata, journal records) and its new images' bytes through the
writers below, none of which syncs: an operation writes everything a step
needs, then makes it durable at once with one :meth:`Durability.barrier`.

Barriers: a barrier over one file or directory is one ``fsync``; over more,
one ``syncfs(2)`` of the store's file system when the store may use it
(``sync="auto"`` on Linux >= 5.8, whose syncfs reports write-back errors),
else an ``fsync`` of each.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from boxdisk._errors import InvalidArgumentError, StoreError
from boxdisk._io import fill, link_anonymous, pwrite_all
from boxdisk._locks import create_temp

__all__ = [
    "SYNC_MODES",
    "Durability",
    "copy_sparse",
    "dump_json",
    "durable",
    "fsync_dir",
    "fsync_path",
    "link_new_file",
    "make_read_only",
    "make_writable",
    "observers",
    "read_json",
    "remove_tree",
    "replace_file",
    "write_file",
]

#: Metadata files are small; a larger one is damage, not data.
_MAX_JSON = 1 << 20

#: Functions told of every durable call: ``fn(call, path)``, call one of
#: ``fsync``, ``syncfs``. The fsync-count test's seam.
observers: list[Callable[[str, str], None]] = []

#: ``BoxStore(sync=...)``: "auto" (syncfs where it reports errors), "syncfs", "fsync".
SYNC_MODES = ("auto", "syncfs", "fsync")


@contextlib.contextmanager
def _naming(path: str | os.PathLike[str]) -> Iterator[None]:
    """Let an OSError of a call on a file descriptor name its file (errors name files)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = os.fspath(path)
        raise


def durable(call: str, fd: int, path: str | os.PathLike[str]) -> None:
    """The one durable system call: ``fsync(fd)`` or ``syncfs(fd)``, told to the observers."""
    for fn in observers:
        fn(call, os.fspath(path))
    with _naming(path):
        if call == "syncfs":
            _syncfs(fd)
        else:
            os.fsync(fd)


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Make one file or directory durable (its data, or its entries)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        durable("fsync", fd, path)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a directory's entries (creations, renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        durable("fsync", fd, path)
    finally:
        os.close(fd)


# -- syncfs -----------------------------------------------------------------------------------

_libc_syncfs: Callable[[int], int] | None = None


def _syncfs(fd: int) -> None:
    import ctypes  # noqa: PLC0415 - only a store that syncs a file system needs it

    global _libc_syncfs  # noqa: PLW0603 - bound once, on first use
    if _libc_syncfs is None:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
        fn.argtypes = [ctypes.c_int]
        fn.restype = ctypes.c_int
        _libc_syncfs = fn
    if _libc_syncfs(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def syncfs_reports_errors() -> bool:
    """Whether this kernel's ``syncfs`` reports write-back errors (Linux 5.8 and later).

    Only the kernel is asked here (opening a store stays cheap); the C
    library's ``syncfs`` is looked up at the first barrier, and a library
    without one turns the store to ``fsync`` then.
    """
    if os.uname().sysname != "Linux":
        return False
    release = os.uname().release.split(".")
    try:
        major, minor = int(release[0]), int(release[1].split("-")[0])
    except (ValueError, IndexError):
        return False
    return (major, minor) >= (5, 8)


class Durability:
    """How one store makes a set of new or changed files and directories durable at once."""

    def __init__(self, root: Path, mode: str, *, one_file_system: bool) -> None:
        if mode not in SYNC_MODES:
            msg = f"sync {mode!r} is not one of {', '.join(SYNC_MODES)}"
            raise InvalidArgumentError(msg, field="sync", value=mode)
        if mode == "auto":
            mode = "syncfs" if one_file_system and syncfs_reports_errors() else "fsync"
        elif mode == "syncfs" and not one_file_system:
            msg = "sync='syncfs' needs the whole store on one file system"
            raise InvalidArgumentError(msg, path=root, field="sync", value=mode)
        self.root = root
        #: "syncfs" or "fsync": what a barrier over more than one path does.
        self.mode = mode

    def barrier(self, paths: Iterable[str | os.PathLike[str]]) -> None:
        """Make every listed file (its data) and directory (its entries) durable.

        One path: one ``fsync``. More: one ``syncfs`` of the store's file
        system, or (``fsync`` mode) an ``fsync`` of each, in order.
        """
        todo = list(dict.fromkeys(os.fspath(p) for p in paths))
        if not todo:
            return
        if len(todo) == 1 or self.mode == "fsync":
            for p in todo:
                fsync_path(p)
            return
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            durable("syncfs", fd, self.root)
        except AttributeError:  # a C library without syncfs: fsync each path from now on
            self.mode = "fsync"
            self.barrier(todo)
        finally:
            os.close(fd)


# -- writing new files ------------------------------------------------------------------------


def write_file(path: Path, data: bytes | tuple[tuple[int, bytes], ...],
               size: int | None = None, *, sync: bool = False) -> None:
    """Create ``path`` (never over an existing file) holding ``data``; synced only if asked.

    For files inside a staging directory, which no reader looks into: a crash
    leaves at most a partial file there, removed with the stage. ``data`` is
    bytes, or (offset, bytes) writes of a file ``size`` bytes long. On an
    error the file is removed again.
    """
    writes = ((0, data),) if isinstance(data, bytes) else data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        with _naming(path):
            fill(fd, writes, size)
        if sync:
            durable("fsync", fd, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise
    finally:
        os.close(fd)


def link_new_file(path: Path, data: bytes | tuple[tuple[int, bytes], ...],
                  size: int | None = None) -> None:
    """Create ``path`` complete or not at all, in a directory others read; not synced.

    The bytes go into an unnamed ``O_TMPFILE`` inode that ``linkat`` then
    names (a crash before the link leaves nothing); where the file system
    cannot, into a locked temporary file beside it, hard-linked to ``path``.
    Never replaces an existing file (FileExistsError).
    """
    writes = ((0, data),) if isinstance(data, bytes) else data
    with _naming(path):
        linked = link_anonymous(path.parent, path.name, writes, size, sync=False)
    if linked:
        return
    if linked is False:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(path))
    fd, tmp = create_temp(os.fspath(path.parent), path.name, 0o644)
    try:
        with _naming(path):
            fill(fd, writes, size)
            os.link(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.close(fd)


def replace_file(path: Path, tmp: Path, data: bytes) -> None:
    """Replace ``path`` with a file holding ``data``, whole or not at all; not synced.

    The bytes are linked complete under the hidden name ``tmp`` (a leftover of
    an earlier try is dropped first) and renamed over ``path``, so a reader
    sees the old file or the new one, never a part.
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    link_new_file(tmp, data)
    os.replace(tmp, path)


def dump_json(value: Any) -> bytes:
    """The bytes the store writes for a JSON value: one line, keys sorted.

    Not indented: an indent makes ``json`` fall back from its C encoder to the
    pure-Python one, a tenth of a millisecond an operation (``jq`` reads
    either).
    """
    return (json.dumps(value, sort_keys=True, separators=(",", ":")) + "\n").encode()


def read_json(path: Path) -> Any:
    """The JSON value in ``path``; a damaged file raises StoreError naming it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            # Its size says how much to read (no megabyte buffer for a 200-byte file);
            # one byte more tells a file that grew past the limit.
            want = min(os.fstat(fd).st_size, _MAX_JSON) + 1
            chunks = []
            while want > 0:
                chunk = os.read(fd, want)
                if not chunk:
                    break
                chunks.append(chunk)
                want -= len(chunk)
        finally:
            os.close(fd)
        data = b"".join(chunks)
        if len(data) > _MAX_JSON:
            msg = f"store metadata is larger than {_MAX_JSON} bytes"
            raise StoreError(msg, path=path, field="size", value=len(data))
        return json.loads(data)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        msg = f"cannot read store metadata: {exc}"
        raise StoreError(msg, path=path) from None


_CHUNK = 4 << 20


def copy_sparse(src: Path, dst: Path) -> int:
    """Copy ``src`` to a new file ``dst``, keeping holes; not synced. Returns the size.

    Only the data extents (``SEEK_DATA``/``SEEK_HOLE``) are copied, in chunks of
    at most 4 MiB, so a sparse 10 GiB raw base stays sparse and memory stays
    bounded.
    """
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            size = os.fstat(sfd).st_size
            pos = 0
            while pos < size:
                try:
                    start = os.lseek(sfd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:  # only a hole is left
                        break
                    raise
                end = os.lseek(sfd, start, os.SEEK_HOLE)
                while start < end:
                    data = os.pread(sfd, min(_CHUNK, end - start), start)
                    if not data:
                        break
                    with _naming(dst):
                        pwrite_all(dfd, data, start)
                    start += len(data)
                pos = end
            with _naming(dst):
                os.ftruncate(dfd, size)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
    return size


def make_read_only(path: Path) -> None:
    """Drop write permission from a file (snapshots and bases are immutable)."""
    mode = path.stat().st_mode
    path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def make_writable(path: Path) -> None:
    """Give the owner write permission back (for a merge that rewrites a snapshot)."""
    path.chmod(path.stat().st_mode | stat.S_IWUSR)


def remove_tree(path: Path) -> None:
    """Remove a directory tree (read-only files included); a missing one is fine.

    Not synced: what the store removes is out of view already (staging, trash),
    and a removal that a power cut undoes is done again by recovery or gc.
    """
    if not os.path.lexists(path):
        return

    def onerror(func: Any, name: str, exc_info: Any) -> None:
        # Another process (gc, recovery) may be removing the same leftover.
        if not isinstance(exc_info[1], FileNotFoundError):
            raise exc_info[1]

    # Unlinking needs write permission on the directory only: read-only files go too.
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, onerror=onerror)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
