"""Small durable filesystem steps the store is built from."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

from boxdisk._errors import StoreError

__all__ = [
    "fsync_dir",
    "make_read_only",
    "make_writable",
    "read_json",
    "remove_tree",
    "write_json",
]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a directory's entries (creations, renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
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
            os.write(fd, data)
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


def read_json(path: Path) -> Any:
    """The JSON value in ``path``; a damaged file raises StoreError naming it."""
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        msg = f"cannot read store metadata: {exc}"
        raise StoreError(msg, path=path) from None


def make_read_only(path: Path) -> None:
    """Drop write permission from a file (snapshots and bases are immutable)."""
    mode = path.stat().st_mode
    path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def make_writable(path: Path) -> None:
    """Give the owner write permission back (for a merge that rewrites a snapshot)."""
    path.chmod(path.stat().st_mode | stat.S_IWUSR)


def remove_tree(path: Path) -> None:
    """Remove a directory tree (read-only files included); a missing one is fine."""
    if not path.exists():
        return

    # Unlinking needs write permission on the directory only: read-only files go too.
    shutil.rmtree(path)
    with contextlib.suppress(FileNotFoundError):
        fsync_dir(path.parent)
