"""Sizes as people type them (``10G``, ``512M``, ``1.5T``) and as qemu-img prints them."""

from __future__ import annotations

import math
import re

from boxdisk._errors import InvalidArgumentError

__all__ = ["format_size", "parse_size"]

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40,
          "P": 1 << 50, "E": 1 << 60}
_SUFFIXES = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([bBkKmMgGtTpPeE]?)(?:i?[bB])?\s*")


def parse_size(text: str, *, what: str = "size") -> int:
    """Bytes from ``10G``, ``512M``, ``4k``, ``1.5G`` or a plain byte count (binary units).

    Fractions are allowed as in qemu-img (``1.5G``) but must come to whole bytes.
    """
    m = _SIZE.fullmatch(text)
    if m is None:
        msg = f"{what} {text!r} is not a size (examples: 10G, 512M, 4k, 1048576)"
        raise InvalidArgumentError(msg, field=what, value=text)
    number: str = m.group(1)
    unit: str = m.group(2).upper()
    scale = _UNITS[unit]
    if "." in number:
        whole, frac = number.split(".")
        num = int(whole + frac) * scale
        den: int = 10 ** len(frac)
        if num % den:
            msg = f"{what} {text!r} is not a whole number of bytes"
            raise InvalidArgumentError(msg, field=what, value=text)
        value = num // den
    else:
        value = int(number) * scale
    if value >= 1 << 63:
        msg = f"{what} {text!r} is too large"
        raise InvalidArgumentError(msg, field=what, value=text)
    return value


def format_size(n: float) -> str:
    """``1.25 MiB`` style, exactly as qemu-img's human output prints sizes.

    Three significant digits; the unit steps up once the number reaches 1000
    (QEMU's ``size_to_str``), so 1000 KiB prints as ``0.977 MiB``.
    """
    value = float(n)
    if value <= 0:
        return "0 B"
    exponent = math.frexp(value / (1000.0 / 1024.0))[1]
    i = max(0, min(len(_SUFFIXES) - 1, (exponent - 1) // 10))
    return f"{value / (1 << (i * 10)):0.3g} {_SUFFIXES[i]}"
