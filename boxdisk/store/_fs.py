"""Small durable filesystem steps the store is built from."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from boxdisk._errors import StoreError
from boxdisk._io import pwrite_all
from boxdisk._locks import create_temp

__all__ = [
    "copy_sparse",
    "dump_json",
    "fsync_dir",
    "make_read_only",
    "make_writable",
    "publish_new_file",
    "read_json",
    "remove_tree",
    "write_json",
    "write_new_file",
]


#: Metadata files are small; a larger one is damage, not data.
_MAX_JSON = 1 << 20


@contextlib.contextmanager
def _naming(path: str | os.PathLike[str]) -> Iterator[None]:
    """Let an OSError of a call on a file descriptor name its file (errors name files)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = os.fspath(path)
        raise


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until all of ``data`` is written (a filling disk writes less, then fails)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a directory's entries (creations, renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with _naming(path):
            os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, value: Any, *, durable: bool = True) -> None:
    """Replace ``path`` with ``value`` as JSON: temp file, fsync, rename, fsync the directory."""
    tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")
    data = (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        try:
            with _naming(tmp):
                _write_all(fd, data)
                if durable:
                    os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    if durable:
        fsync_dir(path.parent)


def write_new_file(path: Path, data: bytes) -> None:
    """Create ``path`` (never over an existing file) holding ``data``, fsynced.

    The directory is not fsynced: callers fsync it once after all its new entries.
    On an error the file is removed again.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        with _naming(path):
            _write_all(fd, data)
            os.fsync(fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise
    finally:
        os.close(fd)


def publish_new_file(path: Path, data: bytes) -> None:
    """Create ``path`` holding ``data``, fsynced, so that no reader ever sees it half-written.

    The bytes go to a locked temporary file beside it (``create_temp``), which is
    then hard-linked to ``path`` (never over an existing file). The directory is
    not fsynced.
    """
    fd, tmp = create_temp(os.fspath(path.parent), path.name, 0o644)
    try:
        with _naming(path):
            _write_all(fd, data)
            os.fsync(fd)
            os.link(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.close(fd)


def dump_json(value: Any) -> bytes:
    """The bytes the store writes for a JSON value."""
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def read_json(path: Path) -> Any:
    """The JSON value in ``path``; a damaged file raises StoreError naming it."""
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_JSON + 1)
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
    """Copy ``src`` to a new file ``dst``, keeping holes; fsync it. Returns the size.

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
                os.fsync(dfd)
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
    """Remove a directory tree (read-only files included); a missing one is fine."""
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
    with contextlib.suppress(FileNotFoundError):
        fsync_dir(path.parent)
