"""Fault sources for the full-disk and I/O-error tests: a small tmpfs, and failing syscalls.

Two ways to make an operation fail part-way, both real:

* :func:`tmpfs` mounts a size-limited tmpfs (root only, as CI runs); a ballast
  file (:func:`leave_free`) fills it so that an operation runs out of space
  (``ENOSPC``, or a short write first) at a chosen point;
* :class:`Faults` wraps ``os.pwrite``, ``os.write``, ``os.fsync`` and
  ``os.ftruncate`` in this process and fails the N-th call (``EIO`` by
  default, or a short write, or every call from the N-th on), counting the
  calls of every thread (the flatten writer thread included).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

#: The calls an operation changes files with.
FUNCS = ("pwrite", "write", "fsync", "ftruncate")


class Faults:
    """Count the write/fsync/truncate calls made inside the block; fail chosen ones.

    ``fail_at=N`` fails the N-th call (1-based) with ``err``; ``persistent``
    fails every call from the N-th on (a disk that stays broken). With
    ``short=True`` the N-th ``pwrite``/``write`` instead writes half of its
    bytes and returns that count (what a filling disk does first); a short
    write is never persistent. ``fail_at=None`` only counts.
    """

    def __init__(self, fail_at: int | None = None, *, err: int = errno.EIO,
                 persistent: bool = False, short: bool = False) -> None:
        self.fail_at, self.err, self.persistent, self.short = fail_at, err, persistent, short
        self.calls = 0
        #: The name of every call made, in order.
        self.log: list[str] = []
        self.failed: list[str] = []
        self._lock = threading.Lock()
        self._saved: dict[str, Callable[..., Any]] = {}

    def _hit(self, name: str) -> bool:
        with self._lock:
            self.calls += 1
            self.log.append(name)
            n = self.calls
        if self.fail_at is None:
            return False
        return n == self.fail_at or (self.persistent and n > self.fail_at)

    def _wrap(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            if not self._hit(name):
                return real(*args)
            self.failed.append(name)
            if self.short and name in ("pwrite", "write"):
                data = memoryview(args[1]).cast("B")
                half = len(data) // 2
                if half == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real(args[0], data[:half], *args[2:])
            raise OSError(self.err, os.strerror(self.err))

        return call

    def __enter__(self) -> Faults:
        for name in FUNCS:
            real = getattr(os, name)
            self._saved[name] = real
            setattr(os, name, self._wrap(name, real))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, real in self._saved.items():
            setattr(os, name, real)
        self._saved.clear()


def count_calls(fn: Callable[[], Any]) -> int:
    """How many write/fsync/truncate calls ``fn`` makes (it must succeed)."""
    with Faults() as f:
        fn()
    return f.calls


@contextlib.contextmanager
def tmpfs(path: Path, size: int) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` bytes at ``path`` for the block; always unmounted after."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                           os.fspath(path)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.fail(f"these tests mount a tmpfs and must run as root (as CI does): "
                    f"mount failed: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        # A lazy unmount still detaches the file system if a descriptor leaked.
        subprocess.run(["umount", "-l", os.fspath(path)], check=True)


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer could still allocate on ``path``'s file system."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def leave_free(ballast: Path, free: int) -> None:
    """Grow (or shrink) the ballast file so that about ``free`` bytes stay free."""
    have = ballast.stat().st_size if ballast.exists() else 0
    target = max(0, have + free_bytes(ballast.parent) - free)
    with ballast.open("ab") as f:
        f.truncate(target)
        if target:
            os.posix_fallocate(f.fileno(), 0, target)


def clear(directory: Path) -> None:
    """Remove everything in ``directory`` (read-only files included)."""
    for entry in os.scandir(directory):
        p = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(p)
        else:
            p.unlink()


def copy_tree(src: Path, dst: Path) -> None:
    """Copy a tree keeping holes, modes and hard links (``cp -a``)."""
    subprocess.run(["cp", "-a", "--sparse=always", os.fspath(src), os.fspath(dst)], check=True)


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> digest (or "dir") of everything under ``root``."""
    out: dict[str, str] = {}
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for name in files:
            p = Path(dirpath) / name
            out[os.path.relpath(p, root)] = file_digest(p)
    return out


def points(total: int, want: int) -> list[int]:
    """About ``want`` failure points spread over calls 1..``total`` (all when fewer)."""
    if total <= want:
        return list(range(1, total + 1))
    step = total / want
    return sorted({1, total, *(int(1 + i * step) for i in range(want))})


def first_success(run: Callable[[int], bool], hi: int) -> int:
    """The least ``free`` in [0, hi] at which ``run(free)`` succeeds (binary search).

    ``run(hi)`` must succeed.
    """
    lo = 0
    while lo < hi:
        mid = (lo + hi) // 2
        if run(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def is_enospc_or_eio(exc: BaseException) -> bool:
    """Whether an error chain ends in ENOSPC or EIO (what these tests inject)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EIO):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
