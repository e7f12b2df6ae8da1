"""Crash-safe output: a temporary file in the target's directory, fsynced, renamed, dir fsynced."""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Iterator

from boxdisk._errors import BoxdiskError, DiskExistsError, ImageIOError

__all__ = ["BackgroundSync", "atomic_output"]


class BackgroundSync:
    """Start writeback of a file being written while the writer keeps going.

    Every ``step`` bytes the writer reports, one ``fdatasync`` runs in a
    background thread (unless one is still running), so the final ``fsync`` has
    little left to flush. ``finish()`` waits for it and re-raises its error.
    """

    def __init__(self, fd: int, step: int = 64 * 1024 * 1024) -> None:
        self._fd, self._step = fd, step
        self._pending = 0
        self._thread: threading.Thread | None = None
        self._error: OSError | None = None

    def _run(self) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            self._error = exc

    def wrote(self, nbytes: int) -> None:
        """Account ``nbytes`` more written bytes; maybe start a background flush."""
        self._pending += nbytes
        if self._pending < self._step or (self._thread is not None and self._thread.is_alive()):
            return
        self._pending = 0
        self._thread = threading.Thread(target=self._run, name="boxdisk-fdatasync", daemon=True)
        self._thread.start()

    def join(self) -> None:
        """Wait for a running flush (the fd must outlive it)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def finish(self) -> None:
        """Wait for a running flush; raise what it raised."""
        self.join()
        if self._error is not None:
            raise self._error


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
def atomic_output(dst: str, *, overwrite: bool) -> Iterator[tuple[int, BackgroundSync]]:
    """Yield (fd, syncer) of a temporary file that becomes ``dst`` when the block succeeds.

    Writers report written bytes to the syncer so writeback overlaps their
    work. The file is fsynced, then renamed over ``dst`` (``overwrite=True``)
    or hard-linked to it (so an existing ``dst`` is never clobbered, even by a
    racing creator), and the directory is fsynced. On any error the temporary
    file is removed and ``dst`` is untouched.
    """
    directory = os.path.dirname(os.path.abspath(dst))
    name = os.path.basename(dst)
    if not overwrite and os.path.lexists(dst):
        msg = "destination exists; pass overwrite=True to replace it"
        raise DiskExistsError(msg, path=dst, field="dst", value=dst)
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    except OSError as exc:
        msg = f"cannot create a temporary file in {directory!r}: {exc.strerror}"
        raise ImageIOError(msg, path=dst, field="dst") from exc
    done = False
    syncer = BackgroundSync(fd)
    try:
        try:
            yield fd, syncer
            syncer.finish()
            os.fsync(fd)
            _move_into_place(tmp, dst, overwrite=overwrite)
            done = True
            _fsync_dir(directory)
        except BoxdiskError:
            raise
        except OSError as exc:
            msg = f"writing {tmp!r} into place failed: {exc.strerror}"
            raise ImageIOError(msg, path=dst, field="dst") from exc
    finally:
        syncer.join()
        os.close(fd)
        if not done:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
