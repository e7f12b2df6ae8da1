"""The one exception tree of boxdisk.

Every error names the file it is about (``path``) and, where one field or table
entry is at fault, that field (``field``) and the value found (``value``)::

    BoxdiskError(Exception)
    ├── ImageError
    │   ├── NotQcow2Error(ValueError)          wrong magic: not a qcow2 file
    │   ├── CorruptImageError(ValueError)      a field or table breaks the spec
    │   ├── UnsupportedFeatureError(NotImplementedError)
    │   │                                      valid qcow2 that boxdisk refuses
    │   └── ImageIOError(OSError)             the file could not be read/written
    ├── BackingChainError                      cycle, missing, too deep, outside roots
    ├── DiskExistsError(FileExistsError)       a path is taken by something else
    ├── DiskInUseError                         a running QEMU holds the image
    ├── InvalidArgumentError(ValueError)       a caller passed an impossible value
    └── StoreError                             about a box store (``path`` is the store root)
        ├── InvalidNameError(ValueError)       a box id or snapshot name that is not allowed
        ├── NotFoundError(LookupError)         no such box, snapshot or base
        ├── AlreadyExistsError(FileExistsError)  the id or name is taken
        ├── DependentsExistError               images back onto what would be removed
        │   └── SnapshotInUseError             ... onto a snapshot
        ├── LockTimeoutError(TimeoutError)     another process holds the store or a box
        └── StoreFormatError                   not a store, or written by a newer boxdisk
"""

from __future__ import annotations

import os
from typing import Any

__all__ = [
    "AlreadyExistsError",
    "BackingChainError",
    "BlockJobError",
    "BoxdiskError",
    "CorruptImageError",
    "DependentsExistError",
    "DiskExistsError",
    "DiskInUseError",
    "ImageError",
    "ImageIOError",
    "InvalidArgumentError",
    "InvalidNameError",
    "LiveError",
    "LockTimeoutError",
    "NotFoundError",
    "NotQcow2Error",
    "QmpCommandError",
    "QmpConnectError",
    "QmpProtocolError",
    "SnapshotInUseError",
    "StoreError",
    "StoreFormatError",
    "UnsupportedFeatureError",
]


class BoxdiskError(Exception):
    """Base of every error boxdisk raises on purpose.

    ``path`` is the file the error is about, ``field`` the header field or
    table entry at fault and ``value`` the value that was found there.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike[str] | None = None,
        field: str | None = None,
        value: Any = None,
    ) -> None:
        self.path = os.fspath(path) if path is not None else None
        self.field = field
        self.value = value
        self.message = message
        text = f"{self.path}: {message}" if self.path is not None else message
        super().__init__(text)

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path is not None else self.message

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep errors picklable across processes (the store runs workers).
        return (
            _rebuild,
            (type(self), self.message, self.path, self.field, self.value),
        )


def _rebuild(
    cls: type[BoxdiskError], message: str, path: str | None, field: str | None, value: Any
) -> BoxdiskError:
    return cls(message, path=path, field=field, value=value)


class ImageError(BoxdiskError):
    """Something is wrong with one image file."""


class NotQcow2Error(ImageError, ValueError):
    """The file does not start with the qcow2 magic."""


class CorruptImageError(ImageError, ValueError):
    """A header field, extension or table entry breaks the qcow2 specification."""


class UnsupportedFeatureError(ImageError, NotImplementedError):
    """A valid qcow2 feature that boxdisk does not implement (and so refuses)."""


class ImageIOError(ImageError, OSError):
    """The operating system failed a read, write or sync of an image."""


class BackingChainError(BoxdiskError):
    """A backing chain cannot be followed: a cycle, a missing file, too deep, or outside roots.

    ``chain`` lists the images opened so far, top first.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike[str] | None = None,
        field: str | None = None,
        value: Any = None,
        chain: tuple[str, ...] = (),
    ) -> None:
        self.chain = chain
        if chain:
            message = f"{message} (chain so far: {' -> '.join(chain)})"
        super().__init__(message, path=path, field=field, value=value)


class DiskExistsError(BoxdiskError, FileExistsError):
    """The target path holds something that boxdisk will not overwrite."""


class DiskInUseError(BoxdiskError):
    """Another process (a running QEMU) holds a lock on the image."""


class InvalidArgumentError(BoxdiskError, ValueError):
    """A caller passed a value that cannot describe a disk (size, cluster size, name)."""


class StoreError(BoxdiskError):
    """Something about a box store; ``path`` names the store root or the file at fault."""


class InvalidNameError(StoreError, ValueError):
    """A box id or snapshot name that could escape its directory or is not allowed."""


class NotFoundError(StoreError, LookupError):
    """No box, snapshot or base of that name."""


class AlreadyExistsError(StoreError, FileExistsError):
    """A box id, snapshot or base name that is already taken."""


class DependentsExistError(StoreError):
    """Images back onto what would be removed; ``dependents`` lists them (real paths)."""

    def __init__(self, message: str, *, dependents: tuple[str, ...] = (),
                 path: str | os.PathLike[str] | None = None, field: str | None = None,
                 value: Any = None) -> None:
        self.dependents = dependents
        self.reason = message
        if dependents:
            message = f"{message}: depended on by {', '.join(dependents)}"
        super().__init__(message, path=path, field=field, value=value)

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep the dependents (and a message without them doubled) across processes.
        return (_rebuild_dependents,
                (type(self), self.reason, self.dependents, self.path, self.field, self.value))


def _rebuild_dependents(cls: type[DependentsExistError], reason: str,
                        dependents: tuple[str, ...], path: str | None, field: str | None,
                        value: Any) -> DependentsExistError:
    return cls(reason, dependents=dependents, path=path, field=field, value=value)


class SnapshotInUseError(DependentsExistError):
    """A snapshot cannot be removed: other images back onto it."""


class LockTimeoutError(StoreError, TimeoutError):
    """A store or box lock was not acquired in time; the message names the holder."""


class StoreFormatError(StoreError):
    """The directory is not a boxdisk store, or a newer boxdisk wrote it."""


class LiveError(BoxdiskError):
    """A running QEMU (its QMP socket or guest agent) failed an operation on a live box.

    The message carries QEMU's own error text; ``path`` names the socket.
    """


class QmpConnectError(LiveError, ConnectionError):
    """The socket refuses connections or is gone: no QEMU answers there."""


class QmpProtocolError(LiveError):
    """Something answers on the socket, but not QMP (or not within the timeout)."""


class QmpCommandError(LiveError):
    """QEMU refused a command; ``field`` is the command, ``value`` QEMU's error class."""


class BlockJobError(LiveError):
    """A QEMU block job failed, was cancelled or did not finish in time."""
