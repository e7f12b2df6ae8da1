"""Argument normalisers shared by every public entry point: one API shape.

Every public function that takes an image format accepts the enum member
(:class:`~boxdisk.BackingFormat`, :class:`~boxdisk.DiskFormat`) or its name as
a string, in any case (``"qcow2"``, ``"QCOW2"``, ``"raw"``); every path
parameter accepts ``str`` and ``os.PathLike``; every size is a non-negative
``int`` of bytes. Anything else is an :class:`InvalidArgumentError` naming the
parameter and the accepted values, raised before any file is touched.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterable
from typing import Any

from ._errors import InvalidArgumentError

__all__ = ["IMAGE_FORMATS", "as_format", "as_optional_format", "as_path", "as_paths",
           "as_size"]

#: The image formats boxdisk opens, creates and names as backing formats.
IMAGE_FORMATS = ("qcow2", "raw")


def _accepted(allowed: tuple[str, ...]) -> str:
    return ", ".join(repr(a) for a in allowed)


def as_format(value: Any, param: str, *, allowed: tuple[str, ...] = IMAGE_FORMATS,
              path: str | os.PathLike[str] | None = None) -> str:
    """The lower-case format name for ``value`` (an enum member or a string).

    ``DiskFormat.EXT4`` (and ``"ext4"``) is a raw file to QEMU and becomes
    ``"raw"`` where raw is allowed.
    """
    raw: Any = value.value if isinstance(value, enum.Enum) else value
    if isinstance(raw, str):
        name = raw.strip().lower()
        if name == "ext4" and "raw" in allowed:
            name = "raw"
        if name in allowed:
            return name
        shown = raw if not isinstance(value, enum.Enum) else f"{type(value).__name__}.{value.name}"
        msg = f"{param}={shown!r} is not a format boxdisk accepts here ({_accepted(allowed)})"
    else:
        msg = (f"{param} must be a format name ({_accepted(allowed)}) or a BackingFormat/"
               f"DiskFormat member, not {type(value).__name__}")
    raise InvalidArgumentError(msg, path=path, field=param, value=_shown(value))


def as_optional_format(value: Any, param: str, *, allowed: tuple[str, ...] = IMAGE_FORMATS,
                       path: str | os.PathLike[str] | None = None) -> str | None:
    """:func:`as_format`, with None passed through (the caller's default applies)."""
    return None if value is None else as_format(value, param, allowed=allowed, path=path)


def as_path(value: Any, param: str) -> str:
    """``value`` as a ``str`` path; accepts ``str`` and ``os.PathLike[str]``."""
    if isinstance(value, str):
        path = value
    elif isinstance(value, os.PathLike):
        path = os.fspath(value)
        if not isinstance(path, str):
            msg = f"{param} must be a text path, not a bytes path ({path!r})"
            raise InvalidArgumentError(msg, field=param, value=_shown(path))
    else:
        msg = f"{param} must be a path (str or os.PathLike), not {type(value).__name__}"
        raise InvalidArgumentError(msg, field=param, value=_shown(value))
    if not path or "\0" in path:
        msg = f"{param} must be a non-empty path without NUL bytes, not {path!r}"
        raise InvalidArgumentError(msg, field=param, value=path)
    return path


def as_paths(values: Any, param: str) -> list[str] | None:
    """A list of paths (each as :func:`as_path`), or None; a lone path is refused."""
    if values is None:
        return None
    if isinstance(values, str | os.PathLike) or not isinstance(values, Iterable):
        msg = f"{param} must be an iterable of paths (a list of str or os.PathLike)"
        raise InvalidArgumentError(msg, field=param, value=_shown(values))
    return [as_path(v, param) for v in values]


def as_size(value: Any, param: str, *, optional: bool = False) -> int | None:
    """A non-negative ``int`` of bytes (``bool`` is not a size); None when ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        msg = f"{param} must be a number of bytes (int), not {type(value).__name__}"
        raise InvalidArgumentError(msg, field=param, value=_shown(value))
    if value < 0:
        msg = f"{param} must be a non-negative number of bytes, not {value}"
        raise InvalidArgumentError(msg, field=param, value=value)
    return int(value)


def _shown(value: Any) -> Any:
    """The value as an error attribute: plain data stays, anything else becomes its repr."""
    if value is None or isinstance(value, str | int | float | bytes):
        return value
    return repr(value)[:200]
