"""``Disk``: an RAII handle on one disk file, ephemeral (deleted with the handle) or persistent.

Ownership rules, in the order they are checked before a file is deleted:

1. A persistent disk is never deleted by its handle.
2. ``leak()`` turns an ephemeral handle persistent and returns the path.
3. The handle deletes only the file it was created for: if the path now holds
   another file (another inode), it is left alone.
4. A file inside a boxdisk store (an ancestor directory holds ``.boxdisk/``)
   is never deleted by a handle: the store owns it and removes it itself.

Leaving a ``with`` block, calling :meth:`Disk.close`, or the handle being
garbage-collected (``weakref.finalize``) runs the clean-up once.
"""

from __future__ import annotations

import enum
import os
import weakref
from pathlib import Path
from typing import Any

import attrs

from ._errors import ImageIOError
from ._log import get_logger

__all__ = ["STORE_MARKER", "Disk", "DiskFormat"]

log = get_logger(__name__)

#: The directory that marks the root of a boxdisk store.
STORE_MARKER = ".boxdisk"


class DiskFormat(enum.Enum):
    """What kind of file a ``Disk`` handle points at."""

    QCOW2 = "qcow2"
    RAW = "raw"
    EXT4 = "ext4"

    def as_str(self) -> str:
        """The format's name as QEMU spells it (``ext4`` disks are raw to QEMU)."""
        return self.value


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _inside_store(path: Path) -> Path | None:
    for parent in Path(os.path.abspath(path)).parents:
        if (parent / STORE_MARKER).is_dir():
            return parent
    return None


def _remove(path: str, identity: tuple[int, int] | None, *, collected: bool) -> None:
    """Delete an ephemeral disk's file if it is still the one the handle made."""
    p = Path(path)
    now = _identity(p)
    if now is None:
        log.debug("ephemeral_disk_already_gone", path=path)
        return
    if identity is not None and now != identity:
        log.warning("ephemeral_disk_replaced_kept", path=path,
                    reason="the path holds a different file than the one created")
        return
    store = _inside_store(p)
    if store is not None:
        log.warning("ephemeral_disk_in_store_kept", path=path, store=str(store),
                    reason="files inside a store are removed only by the store")
        return
    if collected:
        log.warning("ephemeral_disk_collected", path=path,
                    hint="call leak() to keep a disk, or close() to drop it explicitly")
    os.unlink(p)
    log.info("ephemeral_disk_removed", path=path)


def _remove_from_finalizer(path: str, identity: tuple[int, int] | None) -> None:
    try:
        _remove(path, identity, collected=True)
    except OSError as exc:
        log.warning("ephemeral_disk_remove_failed", path=path, error=str(exc))


@attrs.define(eq=False)
class Disk:
    """A handle on a disk file; an ephemeral disk's file is deleted when the handle closes.

    Use it as a context manager. ``persistent`` disks are never deleted;
    ``leak()`` makes an ephemeral disk persistent and returns its path.
    """

    path: Path = attrs.field(converter=Path)
    format: DiskFormat = DiskFormat.QCOW2
    persistent: bool = False
    _finalizer: weakref.finalize[Any, Any] | None = attrs.field(init=False, default=None,
                                                                repr=False)
    _identity: tuple[int, int] | None = attrs.field(init=False, default=None, repr=False)

    def __attrs_post_init__(self) -> None:
        if not self.persistent:
            self._identity = _identity(self.path)
            self._finalizer = weakref.finalize(
                self, _remove_from_finalizer, str(self.path), self._identity
            )

    @property
    def closed(self) -> bool:
        """Whether the handle has released its file (closed or leaked)."""
        return self._finalizer is None or not self._finalizer.alive

    def leak(self) -> Path:
        """Disarm the clean-up: the file outlives this handle. Returns the path."""
        if self._finalizer is not None:
            self._finalizer.detach()
        self._finalizer = None
        self.persistent = True
        return self.path

    def close(self) -> None:
        """Release the handle; delete the file if the disk is ephemeral. Idempotent.

        A file already gone is fine; a delete the OS refuses raises
        :class:`ImageIOError`.
        """
        fin, self._finalizer = self._finalizer, None
        if fin is None or fin.detach() is None:
            return
        try:
            _remove(str(self.path), self._identity, collected=False)
        except OSError as exc:
            msg = f"could not delete ephemeral disk: {exc.strerror or exc}"
            raise ImageIOError(msg, path=self.path) from exc

    def __enter__(self) -> Disk:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __fspath__(self) -> str:
        return os.fspath(self.path)
