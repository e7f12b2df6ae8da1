"""Crash-safe output: a temporary file in the target's directory, fsynced, renamed, dir fsynced."""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import threading
from collections.abc import Callable, Iterator
from typing import cast

from boxdisk._errors import BoxdiskError, DiskExistsError, ImageIOError
from boxdisk._locks import create_temp, remove_stale_temps

__all__ = ["Writeback", "atomic_output"]


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux, or a C library without it
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return cast("Callable[[int, int, int, int], int]", fn)


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


class Writeback:
    """Start writeback of a file's freshly written ranges while the writer goes on.

    Every ``step`` contiguous bytes reported, the range is handed to the kernel
    with ``sync_file_range(SYNC_FILE_RANGE_WRITE)`` (``posix_fadvise(DONTNEED)``
    where that call is missing), so the final ``fsync`` has little left to wait
    for. The calls run on a thread of their own, since submitting the pages
    costs CPU that neither the reader nor the writer should wait on. It only
    schedules: durability and any write error still come from that ``fsync``.

    Lifecycle: :meth:`close` (idempotent) stops the thread, dropping what is
    still queued; it must run before the file descriptor is closed.
    """

    def __init__(self, fd: int, step: int = 4 * 1024 * 1024) -> None:
        self._fd, self._step = fd, step
        self._start = self._end = 0
        self._queue: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    def wrote(self, offset: int, length: int) -> None:
        """Account ``length`` bytes written at ``offset``; maybe start their writeback."""
        if offset != self._end:
            self._kick()
            self._start = offset
        self._end = offset + length
        if self._end - self._start >= self._step:
            self._kick()

    def _kick(self) -> None:
        start, n = self._start, self._end - self._start
        self._start = self._end
        if n <= 0 or self._closed:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="boxdisk-writeback",
                                            daemon=True)
            self._thread.start()
        self._queue.put((start, n))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None or self._closed:
                return
            start, n = item
            if _sync_file_range is not None:
                _sync_file_range(self._fd, start, n, _SYNC_FILE_RANGE_WRITE)
            else:
                with contextlib.suppress(OSError):
                    os.posix_fadvise(self._fd, start, n, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        """Stop the thread (queued ranges are dropped: the caller's fsync covers them)."""
        self._closed = True
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(tmp: str, dst: str, *, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, dst)
        return
    try:
        os.link(tmp, dst)
    except FileExistsError:
        msg = "destination appeared while writing; pass overwrite=True to replace it"
        raise DiskExistsError(msg, path=dst, field="dst", value=dst) from None
    os.unlink(tmp)


@contextlib.contextmanager
def atomic_output(dst: str, *, overwrite: bool) -> Iterator[tuple[int, Writeback]]:
    """Yield (fd, writeback) of a temporary file that becomes ``dst`` when the block succeeds.

    Writers report written ranges to ``writeback`` so the kernel writes them
    out while the writer goes on. When the block ends, the file is fsynced,
    then renamed over ``dst`` (``overwrite=True``) or hard-linked to it (so an
    existing ``dst`` is never clobbered, even by a racing creator), and the
    directory is fsynced. On any error the temporary
    file is removed and ``dst`` is untouched, but for one case: when that last
    directory fsync fails after an ``overwrite``, the complete new file stays
    in place (the old one is gone) and the error is still raised.

    The temporary file is locked (``flock``) for as long as it is written, so
    the next write to ``dst`` removes any a killed writer left (unlocked).
    """
    directory = os.path.dirname(os.path.abspath(dst))
    name = os.path.basename(dst)
    if not overwrite and os.path.lexists(dst):
        msg = "destination exists; pass overwrite=True to replace it"
        raise DiskExistsError(msg, path=dst, field="dst", value=dst)
    try:
        # What a killed writer to the same destination left goes first (nobody holds it).
        remove_stale_temps(directory, name)
        fd, tmp = create_temp(directory, name)
    except OSError as exc:
        msg = f"cannot create a temporary file in {directory!r}: {exc.strerror}"
        raise ImageIOError(msg, path=dst, field="dst") from exc
    done = False
    writeback = Writeback(fd)
    try:
        try:
            yield fd, writeback
            writeback.close()
            os.fsync(fd)
            _move_into_place(tmp, dst, overwrite=overwrite)
            done = True
            try:
                _fsync_dir(directory)
            except OSError:
                if not overwrite:
                    # dst is ours (the link is exclusive): take it back, so that the error
                    # leaves no file. A replaced dst cannot come back; the new one stays.
                    with contextlib.suppress(OSError):
                        os.unlink(dst)
                raise
        except BoxdiskError:
            raise
        except OSError as exc:
            msg = f"writing {tmp!r} into place failed: {exc.strerror}"
            raise ImageIOError(msg, path=dst, field="dst") from exc
    finally:
        writeback.close()
        if not done:  # removed while still locked by this writer
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        os.close(fd)
