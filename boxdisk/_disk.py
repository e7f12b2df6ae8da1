"""``Disk``: an RAII handle on one disk file, ephemeral (deleted with the handle) or persistent.

Ownership rules, in the order they are checked before a file is deleted:

1. A persistent disk is never deleted by its handle.
2. ``leak()`` turns an ephemeral handle persistent and returns the path.
3. The handle deletes only the file that was at its path when it was made: it
   holds an fd on that file while armed (so the inode number cannot be reused)
   and leaves the path alone if it now holds another file, or if nothing was
   there when the handle was made.
4. A file inside a boxdisk store (an ancestor directory holds ``.boxdisk/``)
   is never deleted by a handle: the store owns it and removes it itself.

Leaving a ``with`` block, calling :meth:`Disk.close`, or the handle being
garbage-collected (``weakref.finalize``) runs the clean-up once. A handle
collected while still armed also warns (``ResourceWarning``), as Python's own
unclosed file objects do: an ephemeral disk should be closed on purpose.

One file has at most one armed (ephemeral) handle in a process:
:func:`ephemeral_owner` finds it, so the creating functions can refuse to hand
out a second handle for a file that the first will delete.
"""

from __future__ import annotations

import os
import warnings
import weakref
from pathlib import Path
from typing import Any

import attrs

from ._args import as_path
from ._errors import ImageIOError, InvalidArgumentError
from ._formats import DiskFormat
from ._log import get_logger

__all__ = ["STORE_MARKER", "Disk", "DiskFormat", "ephemeral_owner"]

log = get_logger(__name__)

#: The directory that marks the root of a boxdisk store.
STORE_MARKER = ".boxdisk"


_O_PATH = getattr(os, "O_PATH", os.O_RDONLY)


def _pin(path: Path) -> int | None:
    """An fd on the file at ``path``, held while the handle is armed, or None if none is there.

    Holding the fd keeps the inode alive, so its number cannot be handed to a
    file created later at the same path (ext4 and tmpfs recycle freed inode
    numbers); comparing ``fstat`` of the pin with ``stat`` of the path then
    proves the path still holds the file the handle was made for.
    """
    try:
        return os.open(path, _O_PATH | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None


def _same_inode(fd: int, path: Path) -> bool | None:
    """Whether ``path`` is the pinned file; None when the path holds nothing."""
    try:
        now = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    pinned = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (pinned.st_dev, pinned.st_ino)


def _inside_store(path: Path) -> Path | None:
    for parent in Path(os.path.abspath(path)).parents:
        if (parent / STORE_MARKER).is_dir():
            return parent
    return None


def _remove(path: str, pin: int | None, *, collected: bool, in_store_ok: bool = False) -> None:
    """Delete an ephemeral disk's file if it is still the one the handle was made for.

    Always closes ``pin``.
    """
    p = Path(path)
    try:
        if pin is None:
            log.debug("ephemeral_disk_never_seen", path=path,
                      reason="no file was at the path when the handle was made")
            return
        same = _same_inode(pin, p)
        if same is None:
            log.debug("ephemeral_disk_already_gone", path=path)
            return
        if not same:
            log.info("ephemeral_disk_replaced_kept", path=path,
                     reason="the path holds a different file than the one created")
            return
        store = None if in_store_ok else _inside_store(p)
        if store is not None:
            log.warning("ephemeral_disk_in_store_kept", path=path, store=str(store),
                        reason="files inside a store are removed only by the store")
            return
        if collected:
            log.info("ephemeral_disk_collected", path=path,
                     hint="call leak() to keep a disk, or close() to drop it explicitly")
        os.unlink(p)
        log.info("ephemeral_disk_removed", path=path)
    finally:
        if pin is not None:
            os.close(pin)


def _remove_from_finalizer(path: str, pin: int | None) -> None:
    try:
        _remove(path, pin, collected=True)
    except OSError as exc:
        log.warning("ephemeral_disk_remove_failed", path=path, error=str(exc))
    # After the clean-up, so a warning turned into an error cannot keep the file.
    warnings.warn(f"ephemeral disk {path!r} was garbage-collected without close(): its file "
                  f"was cleaned up then (use `with`, close(), or leak() to keep it)",
                  ResourceWarning, stacklevel=2)


#: (st_dev, st_ino) of each file an armed ephemeral handle of this process owns.
_armed: weakref.WeakValueDictionary[tuple[int, int], Disk] = weakref.WeakValueDictionary()


def _key(fd: int | None) -> tuple[int, int] | None:
    if fd is None:
        return None
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def ephemeral_owner(path: str | os.PathLike[str]) -> Disk | None:
    """The armed ephemeral handle of this process that will delete the file at ``path``."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    owner = _armed.get((st.st_dev, st.st_ino))
    return None if owner is None or owner.closed else owner


def _to_path(value: Any) -> Path:
    return Path(as_path(value, "path"))


def _to_format(value: Any) -> DiskFormat:
    return DiskFormat.parse(value)


def _bool(_instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, bool):
        msg = f"{attribute.name} must be True or False, not {value!r}"
        raise InvalidArgumentError(msg, field=attribute.name, value=repr(value)[:200])


@attrs.define(eq=False)
class Disk:
    """A handle on a disk file; an ephemeral disk's file is deleted when the handle closes.

    Use it as a context manager. ``persistent`` disks are never deleted;
    ``leak()`` makes an ephemeral disk persistent and returns its path.
    """

    path: Path = attrs.field(converter=_to_path)
    format: DiskFormat = attrs.field(default=DiskFormat.QCOW2, converter=_to_format)
    persistent: bool = attrs.field(default=False, validator=_bool)
    _finalizer: weakref.finalize[Any, Any] | None = attrs.field(init=False, default=None,
                                                                repr=False)
    _key: tuple[int, int] | None = attrs.field(init=False, default=None, repr=False)

    def __attrs_post_init__(self) -> None:
        if not self.persistent:
            pin = _pin(self.path)
            self._key = key = _key(pin)
            if key is not None:
                _armed[key] = self
            self._finalizer = weakref.finalize(
                self, _remove_from_finalizer, str(self.path), pin
            )

    def _disarm(self) -> Any:
        """Detach the finalizer; returns its arguments (None if it had run or was detached)."""
        fin, self._finalizer = self._finalizer, None
        if self._key is not None and _armed.get(self._key) is self:
            del _armed[self._key]
        return fin.detach() if fin is not None else None

    @property
    def closed(self) -> bool:
        """Whether the handle has released its file (closed or leaked)."""
        return self._finalizer is None or not self._finalizer.alive

    def leak(self) -> Path:
        """Disarm the clean-up: the file outlives this handle. Returns the path."""
        args = self._disarm()
        if args is not None and args[2][1] is not None:
            os.close(args[2][1])
        self.persistent = True
        return self.path

    def close(self) -> None:
        """Release the handle; delete the file if the disk is ephemeral. Idempotent.

        A file already gone is fine; a delete the OS refuses raises
        :class:`ImageIOError`.
        """
        self._release(in_store_ok=False)

    def _discard(self) -> None:
        """Undo a creation: like :meth:`close`, but also inside a store.

        For the code that just created the file (and so owns it) to roll back
        a half-done multi-file operation; callers outside boxdisk use close().
        """
        self._release(in_store_ok=True)

    def _release(self, *, in_store_ok: bool) -> None:
        args = self._disarm()
        if args is None:
            return
        try:
            _remove(str(self.path), args[2][1], collected=False, in_store_ok=in_store_ok)
        except OSError as exc:
            msg = f"could not delete ephemeral disk: {exc.strerror or exc}"
            raise ImageIOError(msg, path=self.path) from exc

    def __enter__(self) -> Disk:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __fspath__(self) -> str:
        return os.fspath(self.path)
