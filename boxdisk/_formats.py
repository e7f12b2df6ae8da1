"""The format enums every layer may name: ``DiskFormat`` and ``BackingFormat``.

They live at the bottom of the package, so that the chain, the operations and
the store can accept them (and their names as strings) without importing the
layers above. ``boxdisk.qcow2`` and ``boxdisk`` re-export both.
"""

from __future__ import annotations

import enum
from typing import TypeAlias

from ._args import IMAGE_FORMATS, as_format

__all__ = ["BackingFormat", "DiskFormat", "FormatArg"]


class DiskFormat(enum.Enum):
    """What kind of file a ``Disk`` handle points at."""

    QCOW2 = "qcow2"
    RAW = "raw"
    EXT4 = "ext4"

    def as_str(self) -> str:
        """The format's name as QEMU spells it (``ext4`` disks are raw to QEMU)."""
        return self.value

    @classmethod
    def parse(cls, value: DiskFormat | BackingFormat | str) -> DiskFormat:
        """Accept a member, or its name in any case (``"qcow2"``, ``"RAW"``, ``"ext4"``)."""
        if isinstance(value, DiskFormat):
            return value
        return cls(as_format(value, "format", allowed=("qcow2", "raw", "ext4")))


class BackingFormat(enum.Enum):
    """Format of a backing file, as written into the backing-format extension."""

    RAW = "raw"
    QCOW2 = "qcow2"

    def as_str(self) -> str:
        """The format's name in the header extension (``raw`` or ``qcow2``)."""
        return self.value

    @classmethod
    def parse(cls, value: BackingFormat | DiskFormat | str,
              param: str = "backing_format") -> BackingFormat:
        """Accept a member or its name in any case (``"raw"``, ``"QCOW2"``; ext4 is raw)."""
        if isinstance(value, BackingFormat):
            return value
        return cls(as_format(value, param, allowed=IMAGE_FORMATS))


#: What a public parameter naming an image format accepts.
FormatArg: TypeAlias = BackingFormat | DiskFormat | str
