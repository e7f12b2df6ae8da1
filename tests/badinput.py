"""Broken qcow2 headers, one per way a header can be wrong, each naming its field.

Every case starts from a valid header (planned by ``plan_new_image``, the same
bytes ``create_cow_child_disk`` writes) and breaks one thing. The format tests
feed them to ``parse_header``; the file-API tests write them to disk and call
``qcow2_virtual_size`` / ``read_backing_file_path``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import attrs

from boxdisk._errors import (
    BoxdiskError,
    CorruptImageError,
    NotQcow2Error,
    UnsupportedFeatureError,
)
from boxdisk.format import EXT_BACKING_FORMAT, plan_new_image

__all__ = ["BAD_HEADERS", "CLUSTER", "BadHeader", "valid_image"]

CLUSTER = 64 * 1024
_BACKING = "/var/lib/boxes/bases/base.raw"


def valid_image() -> bytes:
    """A complete, valid 1 GiB qcow2 v3 child of a raw base, as bytes."""
    layout = plan_new_image(
        1 << 30, cluster_bits=16, backing_file=_BACKING, backing_format="raw"
    )
    out = bytearray(layout.file_size)
    for offset, data in layout.writes:
        out[offset : offset + len(data)] = data
    return bytes(out)


@attrs.define(frozen=True)
class BadHeader:
    """One broken image: its bytes, the error type and the fields it may name."""

    id: str
    build: Callable[[], bytes]
    error: type[BoxdiskError]
    fields: tuple[str, ...]


def _patch(fmt: str, offset: int, value: int) -> Callable[[], bytes]:
    def build() -> bytes:
        buf = bytearray(valid_image())
        struct.pack_into(fmt, buf, offset, value)
        return bytes(buf)

    return build


def _patches(*edits: tuple[str, int, int]) -> Callable[[], bytes]:
    def build() -> bytes:
        buf = bytearray(valid_image())
        for fmt, offset, value in edits:
            struct.pack_into(fmt, buf, offset, value)
        return bytes(buf)

    return build


def _truncated(n: int) -> Callable[[], bytes]:
    return lambda: valid_image()[:n]


def _backing_offset() -> tuple[int, int]:
    buf = valid_image()
    offset, size = struct.unpack_from(">QI", buf, 8)
    return offset, size


def _backing_bytes(raw: bytes) -> Callable[[], bytes]:
    """The same header with ``raw`` as the backing name (size field updated)."""

    def build() -> bytes:
        buf = bytearray(valid_image())
        offset, _ = _backing_offset()
        buf[offset : offset + len(raw)] = raw
        struct.pack_into(">I", buf, 16, len(raw))
        return bytes(buf)

    return build


def _backing_name_of(size: int, at: int) -> Callable[[], bytes]:
    def build() -> bytes:
        buf = bytearray(valid_image())
        buf[at : at + size] = b"a" * size
        struct.pack_into(">QI", buf, 8, at, size)
        return bytes(buf)

    return build


def _extension_length(length: int) -> Callable[[], bytes]:
    """The backing-format extension (first, at byte 112) claims ``length`` bytes."""

    def build() -> bytes:
        buf = bytearray(valid_image())
        ext_type, _ = struct.unpack_from(">II", buf, 112)
        assert ext_type == EXT_BACKING_FORMAT
        struct.pack_into(">I", buf, 116, length)
        return bytes(buf)

    return build


def _no_end_marker() -> bytes:
    """Extensions of an unknown type fill the whole first cluster: no end marker."""
    buf = bytearray(valid_image())
    struct.pack_into(">QI", buf, 8, 0, 0)  # no backing name in the way
    for pos in range(112, CLUSTER, 8):
        struct.pack_into(">II", buf, pos, 0x12345678, 0)
    return bytes(buf)


def _backing_format(raw: bytes) -> Callable[[], bytes]:
    def build() -> bytes:
        buf = bytearray(valid_image())
        struct.pack_into(">II", buf, 112, EXT_BACKING_FORMAT, len(raw))
        buf[120 : 120 + len(raw)] = raw
        return bytes(buf)

    return build


_C, _U, _N = CorruptImageError, UnsupportedFeatureError, NotQcow2Error
_BACKING_FIELDS = ("backing_file_offset", "backing_file_size")

#: header byte offsets (docs/interop/qcow2.txt, "Header")
_VERSION, _CLUSTER_BITS, _SIZE, _L1_SIZE, _L1_OFFSET = 4, 20, 24, 36, 40
_RT_OFFSET, _RT_CLUSTERS, _NB_SNAP, _SNAP_OFFSET = 48, 56, 60, 64
_INCOMPAT, _REFCOUNT_ORDER, _HEADER_LENGTH, _COMPRESSION = 72, 96, 100, 104

BAD_HEADERS: list[BadHeader] = [
    BadHeader("empty-file", _truncated(0), _N, ("magic",)),
    BadHeader("truncated-3", _truncated(3), _N, ("magic",)),
    BadHeader("truncated-20", _truncated(20), _C, ("header",)),
    BadHeader("truncated-50", _truncated(50), _C, ("header",)),
    BadHeader("truncated-100", _truncated(100), _C, ("header",)),
    BadHeader("truncated-108", _truncated(108), _C, ("header", "header_length")),
    BadHeader("truncated-in-extensions", _truncated(124), _C, ("header_extensions",)),
    BadHeader("truncated-in-backing-name", _truncated(_backing_offset()[0] + 4), _C,
              _BACKING_FIELDS),
    BadHeader("wrong-magic", _patch(">I", 0, 0x514649FC), _N, ("magic",)),
    BadHeader("zero-magic", _patch(">I", 0, 0), _N, ("magic",)),
    BadHeader("version-0", _patch(">I", _VERSION, 0), _U, ("version",)),
    BadHeader("version-1", _patch(">I", _VERSION, 1), _U, ("version",)),
    BadHeader("version-4", _patch(">I", _VERSION, 4), _U, ("version",)),
    BadHeader("version-max", _patch(">I", _VERSION, 0xFFFF_FFFF), _U, ("version",)),
    BadHeader("cluster-bits-0", _patch(">I", _CLUSTER_BITS, 0), _C, ("cluster_bits",)),
    BadHeader("cluster-bits-8", _patch(">I", _CLUSTER_BITS, 8), _C, ("cluster_bits",)),
    BadHeader("cluster-bits-22", _patch(">I", _CLUSTER_BITS, 22), _C, ("cluster_bits",)),
    BadHeader("cluster-bits-63", _patch(">I", _CLUSTER_BITS, 63), _C, ("cluster_bits",)),
    BadHeader("cluster-bits-max", _patch(">I", _CLUSTER_BITS, 0xFFFF_FFFF), _C,
              ("cluster_bits",)),
    BadHeader("refcount-order-7", _patch(">I", _REFCOUNT_ORDER, 7), _C, ("refcount_order",)),
    BadHeader("refcount-order-max", _patch(">I", _REFCOUNT_ORDER, 0xFFFF_FFFF), _C,
              ("refcount_order",)),
    BadHeader("header-length-108", _patch(">I", _HEADER_LENGTH, 108), _C, ("header_length",)),
    BadHeader("header-length-113", _patch(">I", _HEADER_LENGTH, 113), _C, ("header_length",)),
    BadHeader("header-length-96", _patch(">I", _HEADER_LENGTH, 96), _C, ("header_length",)),
    BadHeader("header-length-0", _patch(">I", _HEADER_LENGTH, 0), _C, ("header_length",)),
    BadHeader("header-length-past-cluster", _patch(">I", _HEADER_LENGTH, CLUSTER + 8), _C,
              ("header_length",)),
    BadHeader("incompatible-bit-5", _patch(">Q", _INCOMPAT, 1 << 5), _U,
              ("incompatible_features",)),
    BadHeader("incompatible-bit-63", _patch(">Q", _INCOMPAT, 1 << 63), _U,
              ("incompatible_features",)),
    BadHeader("compression-type-2", _patch(">B", _COMPRESSION, 2), _U, ("compression_type",)),
    BadHeader("zstd-without-incompatible-bit", _patch(">B", _COMPRESSION, 1), _C,
              ("compression_type",)),
    BadHeader("extended-l2-with-4k-clusters",
              _patches((">I", _CLUSTER_BITS, 12), (">Q", _INCOMPAT, 1 << 4)), _C,
              ("cluster_bits",)),
    BadHeader("backing-name-past-first-cluster", _backing_name_of(8, CLUSTER), _C,
              _BACKING_FIELDS),
    BadHeader("backing-name-straddles-cluster-end", _backing_name_of(16, CLUSTER - 8), _C,
              _BACKING_FIELDS),
    BadHeader("backing-name-offset-huge", _patch(">Q", 8, 1 << 63), _C, _BACKING_FIELDS),
    BadHeader("backing-name-1024-bytes", _backing_name_of(1024, 4096), _C, _BACKING_FIELDS),
    BadHeader("backing-name-size-max", _patch(">I", 16, 0xFFFF_FFFF), _C, _BACKING_FIELDS),
    BadHeader("backing-name-inside-header", _patch(">Q", 8, 16), _C, _BACKING_FIELDS),
    BadHeader("backing-name-not-utf8", _backing_bytes(b"/bases/\xff\xfe.raw"), _C,
              ("backing_file",)),
    BadHeader("backing-name-lone-surrogate", _backing_bytes(b"/bases/\xed\xa0\x80.raw"), _C,
              ("backing_file",)),
    BadHeader("l1-size-2^31", _patch(">I", _L1_SIZE, 1 << 31), _C, ("l1_size",)),
    BadHeader("l1-size-max", _patch(">I", _L1_SIZE, 0xFFFF_FFFF), _C, ("l1_size",)),
    BadHeader("l1-size-too-small", _patch(">I", _L1_SIZE, 0), _C, ("l1_size",)),
    BadHeader("l1-offset-misaligned", _patch(">Q", _L1_OFFSET, 3 * CLUSTER + 8), _C,
              ("l1_table_offset",)),
    BadHeader("l1-offset-in-header", _patch(">Q", _L1_OFFSET, 0), _C, ("l1_table_offset",)),
    BadHeader("l1-offset-past-2^56", _patch(">Q", _L1_OFFSET, 1 << 60), _C,
              ("l1_table_offset",)),
    BadHeader("refcount-table-misaligned", _patch(">Q", _RT_OFFSET, CLUSTER + 512), _C,
              ("refcount_table_offset",)),
    BadHeader("refcount-table-0-clusters", _patch(">I", _RT_CLUSTERS, 0), _C,
              ("refcount_table_clusters",)),
    BadHeader("refcount-table-huge", _patch(">I", _RT_CLUSTERS, 0xFFFF_FFFF), _C,
              ("refcount_table_clusters",)),
    BadHeader("snapshot-table-misaligned",
              _patches((">I", _NB_SNAP, 1), (">Q", _SNAP_OFFSET, 5 * CLUSTER + 40)), _C,
              ("snapshots_offset",)),
    BadHeader("snapshots-too-many", _patch(">I", _NB_SNAP, 0xFFFF_FFFF), _C,
              ("nb_snapshots",)),
    BadHeader("virtual-size-2^63", _patch(">Q", _SIZE, 1 << 63), _C, ("size",)),
    BadHeader("virtual-size-past-l1-limit", _patch(">Q", _SIZE, (1 << 63) - 1), _C,
              ("size", "l1_size")),
    BadHeader("extension-past-cluster", _extension_length(0xFFFF_FFFF), _C,
              (f"extension 0x{EXT_BACKING_FORMAT:08x}",)),
    BadHeader("extensions-without-end", _no_end_marker, _C, ("header_extensions",)),
    BadHeader("backing-format-not-ascii", _backing_format(b"r\xffw"), _C,
              ("backing format extension",)),
    BadHeader("backing-format-too-long", _backing_format(b"q" * 16), _C,
              ("backing format extension",)),
]
