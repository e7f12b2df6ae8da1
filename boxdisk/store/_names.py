"""Box ids and snapshot names: checked before any file is touched."""

from __future__ import annotations

from boxdisk._errors import InvalidNameError

__all__ = ["check_name"]

_MAX = 255


def check_name(name: object, what: str) -> str:
    """Return ``name`` if it is a safe single path component, else raise InvalidNameError.

    Non-empty, at most 255 characters, no ``/``, ``\\`` or NUL, no leading
    ``.`` (which also rules out ``.`` and ``..`` and the store's own hidden
    staging names), and no control characters.
    """
    if not isinstance(name, str):
        msg = f"{what} must be a string, not {type(name).__name__}"
        raise InvalidNameError(msg, field=what, value=name)
    problem = None
    if not name:
        problem = "is empty"
    elif len(name) > _MAX:
        problem = f"is {len(name)} characters long (at most {_MAX})"
    elif any(c in name for c in "/\\\0"):
        problem = "contains '/', '\\' or NUL"
    elif name.startswith("."):
        problem = "starts with '.'"
    elif not name.isprintable():
        problem = "contains control characters"
    elif len(name.encode("utf-8", "surrogatepass")) > _MAX:
        problem = f"takes more than {_MAX} bytes"
    if problem is not None:
        msg = f"{what} {name!r} {problem}"
        raise InvalidNameError(msg, field=what, value=name)
    return name
