"""L1, L2 (standard and extended) and refcount entries: raw words and readable values.

Reference: docs/interop/qcow2.txt, "Cluster mapping", "Extended L2 Entries" and
"Host cluster management"; type names follow QEMU's ``qcow2_get_cluster_type``
and ``qcow2_get_subcluster_type`` (block/qcow2.h).

``decode(raw).encode() == raw`` for every word ``decode`` accepts; words with
reserved bits or misaligned offsets are refused with the entry named.
"""

from __future__ import annotations

import enum
import struct
import sys
from array import array

import attrs

from boxdisk._errors import CorruptImageError, InvalidArgumentError

__all__ = [
    "L1E_OFFSET_MASK",
    "L1E_RESERVED_MASK",
    "L2E_OFFSET_MASK",
    "L2E_STD_RESERVED_MASK",
    "QCOW_OFLAG_COMPRESSED",
    "QCOW_OFLAG_COPIED",
    "QCOW_OFLAG_ZERO",
    "REFT_OFFSET_MASK",
    "REFT_RESERVED_MASK",
    "SUBCLUSTERS_PER_CLUSTER",
    "ClusterType",
    "L1Entry",
    "L2Entry",
    "SubclusterType",
    "compressed_geometry",
    "decode_refcount_table_entry",
    "pack_refcount_block",
    "pack_u64_table",
    "unpack_refcount_block",
    "unpack_u64_table",
]

QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1 << 0

L1E_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
L1E_RESERVED_MASK = 0x7F00_0000_0000_01FF
L2E_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
L2E_STD_RESERVED_MASK = 0x3F00_0000_0000_01FE
REFT_OFFSET_MASK = 0xFFFF_FFFF_FFFF_FE00
REFT_RESERVED_MASK = 0x1FF

SUBCLUSTERS_PER_CLUSTER = 32
_ALL_ALLOC = 0xFFFF_FFFF  # low half of the extended L2 bitmap
_COMPRESSED_SECTOR = 512


class ClusterType(enum.Enum):
    """What a (standard, 64-bit) L2 entry says about its guest cluster."""

    UNALLOCATED = "unallocated"  # read from the backing file (or zeros)
    ZERO_PLAIN = "zero_plain"  # reads as zeros, no host cluster
    ZERO_ALLOC = "zero_alloc"  # reads as zeros, host cluster preallocated
    NORMAL = "normal"  # data at host_offset
    COMPRESSED = "compressed"  # compressed data at a byte offset


class SubclusterType(enum.Enum):
    """What an extended L2 entry says about one subcluster (QCOW2_SUBCLUSTER_*)."""

    UNALLOCATED_PLAIN = "unallocated_plain"
    UNALLOCATED_ALLOC = "unallocated_alloc"
    ZERO_PLAIN = "zero_plain"
    ZERO_ALLOC = "zero_alloc"
    NORMAL = "normal"
    COMPRESSED = "compressed"


def _corrupt(msg: str, source: str | None, where: str, raw: int) -> CorruptImageError:
    return CorruptImageError(f"{where}: {msg} (raw 0x{raw:016x})", path=source, field=where,
                             value=raw)


@attrs.define(frozen=True)
class L1Entry:
    """An active L1 table entry: the offset of an L2 table and its COPIED flag."""

    l2_offset: int
    copied: bool = False

    @classmethod
    def decode(
        cls, raw: int, *, cluster_size: int, source: str | None = None, where: str = "L1 entry"
    ) -> L1Entry:
        """Decode a raw L1 word, refusing reserved bits and misaligned offsets."""
        if raw & L1E_RESERVED_MASK:
            raise _corrupt("reserved bits set", source, where, raw)
        offset = raw & L1E_OFFSET_MASK
        if offset % cluster_size:
            raise _corrupt(f"L2 offset 0x{offset:x} not cluster-aligned", source, where, raw)
        return cls(offset, bool(raw & QCOW_OFLAG_COPIED))

    def encode(self) -> int:
        """The raw 64-bit word."""
        return self.l2_offset | (QCOW_OFLAG_COPIED if self.copied else 0)


def compressed_geometry(cluster_bits: int) -> tuple[int, int, int]:
    """(csize_shift, csize_mask, offset_mask) for compressed descriptors."""
    shift = 62 - (cluster_bits - 8)
    return shift, (1 << (cluster_bits - 8)) - 1, (1 << shift) - 1


@attrs.define(frozen=True)
class L2Entry:
    """An L2 entry decoded: cluster type, host offset, COPIED, and for extended L2 the bitmap.

    For compressed clusters ``host_offset`` is the byte offset of the compressed
    data and ``compressed_sectors`` the number of 512-byte sectors it spans
    (the descriptor stores that number minus one).
    """

    type: ClusterType
    host_offset: int = 0
    copied: bool = False
    compressed_sectors: int = 0
    l2_bitmap: int = 0

    @classmethod
    def decode(
        cls,
        raw: int,
        *,
        cluster_bits: int,
        l2_bitmap: int = 0,
        extended: bool = False,
        version: int = 3,
        source: str | None = None,
        where: str = "L2 entry",
    ) -> L2Entry:
        """Decode a raw L2 word (and bitmap), refusing what the spec forbids."""
        cluster_size = 1 << cluster_bits
        copied = bool(raw & QCOW_OFLAG_COPIED)
        if raw & QCOW_OFLAG_COMPRESSED:
            if copied:
                raise _corrupt("COPIED flag on a compressed cluster", source, where, raw)
            if l2_bitmap:
                raise _corrupt("subcluster bitmap set on a compressed cluster", source, where,
                               raw)
            shift, csize_mask, offset_mask = compressed_geometry(cluster_bits)
            offset = raw & offset_mask
            if offset >= 1 << 56:
                raise _corrupt("compressed offset past 2^56", source, where, raw)
            sectors = ((raw >> shift) & csize_mask) + 1
            return cls(ClusterType.COMPRESSED, offset, False, sectors)
        if raw & L2E_STD_RESERVED_MASK:
            raise _corrupt("reserved bits set", source, where, raw)
        offset = raw & L2E_OFFSET_MASK
        if offset % cluster_size:
            raise _corrupt(f"host offset 0x{offset:x} not cluster-aligned", source, where, raw)
        if extended:
            if raw & QCOW_OFLAG_ZERO:
                raise _corrupt("zero flag set with extended L2 entries", source, where, raw)
            if (l2_bitmap >> 32) & l2_bitmap & _ALL_ALLOC:
                raise _corrupt(
                    f"subcluster both allocated and zero (bitmap 0x{l2_bitmap:016x})",
                    source, where, raw,
                )
            if offset == 0 and l2_bitmap & _ALL_ALLOC:
                raise _corrupt(
                    f"allocated subclusters without a host cluster (bitmap 0x{l2_bitmap:016x})",
                    source, where, raw,
                )
            kind = ClusterType.NORMAL if offset else ClusterType.UNALLOCATED
        elif raw & QCOW_OFLAG_ZERO:
            if version < 3:
                raise _corrupt("zero cluster in a version 2 image", source, where, raw)
            kind = ClusterType.ZERO_ALLOC if offset else ClusterType.ZERO_PLAIN
        else:
            kind = ClusterType.NORMAL if offset else ClusterType.UNALLOCATED
        return cls(kind, offset, copied, 0, l2_bitmap)

    def encode(self, *, cluster_bits: int) -> int:
        """The raw 64-bit word (the bitmap, for extended L2, is ``l2_bitmap``)."""
        if self.type is ClusterType.COMPRESSED:
            shift, _, _ = compressed_geometry(cluster_bits)
            return QCOW_OFLAG_COMPRESSED | ((self.compressed_sectors - 1) << shift) | (
                self.host_offset
            )
        raw = self.host_offset | (QCOW_OFLAG_COPIED if self.copied else 0)
        if self.type in (ClusterType.ZERO_PLAIN, ClusterType.ZERO_ALLOC):
            raw |= QCOW_OFLAG_ZERO
        return raw

    def compressed_size(self) -> int:
        """Bytes of compressed data (QEMU's qcow2_parse_compressed_l2_entry)."""
        return self.compressed_sectors * _COMPRESSED_SECTOR - (
            self.host_offset % _COMPRESSED_SECTOR
        )

    def subcluster_type(self, index: int) -> SubclusterType:
        """The state of subcluster ``index`` of an extended L2 entry."""
        if self.type is ClusterType.COMPRESSED:
            return SubclusterType.COMPRESSED
        zero = self.l2_bitmap >> (32 + index) & 1
        if self.type is ClusterType.NORMAL:
            if zero:
                return SubclusterType.ZERO_ALLOC
            if self.l2_bitmap >> index & 1:
                return SubclusterType.NORMAL
            return SubclusterType.UNALLOCATED_ALLOC
        return SubclusterType.ZERO_PLAIN if zero else SubclusterType.UNALLOCATED_PLAIN


def decode_refcount_table_entry(
    raw: int, *, cluster_size: int, source: str | None = None, where: str = "refcount table entry"
) -> int:
    """The refcount block offset in a refcount table entry (0: no block)."""
    if raw & REFT_RESERVED_MASK:
        raise _corrupt("reserved bits set", source, where, raw)
    offset = raw & REFT_OFFSET_MASK
    if offset % cluster_size:
        raise _corrupt(f"refcount block offset 0x{offset:x} not cluster-aligned", source, where,
                       raw)
    return offset


def unpack_u64_table(buf: bytes) -> array[int]:
    """Big-endian 64-bit words (an L1, L2 or refcount table) as an array of ints."""
    out = array("Q")
    out.frombytes(buf[: len(buf) // 8 * 8])
    if sys.byteorder == "little":
        out.byteswap()
    return out


def pack_u64_table(words: array[int] | list[int]) -> bytes:
    """An array of ints as big-endian 64-bit words."""
    out = array("Q", words)
    if sys.byteorder == "little":
        out.byteswap()
    return out.tobytes()


_RC_STRUCT = {4: "H", 5: "I", 6: "Q"}


def unpack_refcount_block(block: bytes, refcount_order: int) -> list[int]:
    """Every refcount in one refcount block (sub-byte widths are LSB first)."""
    if refcount_order in _RC_STRUCT:
        code = _RC_STRUCT[refcount_order]
        n = len(block) // struct.calcsize(code)
        return list(struct.unpack(f">{n}{code}", block[: n * struct.calcsize(code)]))
    if refcount_order == 3:
        return list(block)
    bits = 1 << refcount_order
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    return [(byte >> (i * bits)) & mask for byte in block for i in range(per_byte)]


def pack_refcount_block(refcounts: list[int], refcount_order: int, cluster_size: int) -> bytes:
    """One refcount block holding ``refcounts`` (zero-padded to ``cluster_size``)."""
    bits = 1 << refcount_order
    entries = cluster_size * 8 // bits
    if len(refcounts) > entries:
        msg = f"{len(refcounts)} refcounts do not fit in one {cluster_size}-byte block"
        raise ValueError(msg)
    values = list(refcounts) + [0] * (entries - len(refcounts))
    limit = 1 << bits
    for v in values:
        if not 0 <= v < limit:
            msg = f"refcount {v} does not fit in {bits} bits"
            raise InvalidArgumentError(msg)
    if refcount_order in _RC_STRUCT:
        return struct.pack(f">{entries}{_RC_STRUCT[refcount_order]}", *values)
    if refcount_order == 3:
        return bytes(values)
    per_byte = 8 // bits
    out = bytearray(cluster_size)
    for i, v in enumerate(values):
        out[i // per_byte] |= v << ((i % per_byte) * bits)
    return bytes(out)
