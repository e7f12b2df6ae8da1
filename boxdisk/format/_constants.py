"""Numbers of the qcow2 format (docs/interop/qcow2.txt) and QEMU's implementation limits."""

from __future__ import annotations

import enum

__all__ = [
    "AUTOCLEAR_BITMAPS",
    "AUTOCLEAR_DATA_FILE_RAW",
    "COMPAT_LAZY_REFCOUNTS",
    "COMPRESSION_ZLIB",
    "COMPRESSION_ZSTD",
    "DEFAULT_CLUSTER_BITS",
    "EXT_BACKING_FORMAT",
    "EXT_BITMAPS",
    "EXT_CRYPTO_HEADER",
    "EXT_DATA_FILE",
    "EXT_END",
    "EXT_FEATURE_TABLE",
    "FEATURE_NAMES",
    "HEADER_V2_LENGTH",
    "HEADER_V3_LENGTH",
    "HEADER_V3_LENGTH_WITH_COMPRESSION",
    "INCOMPAT_COMPRESSION",
    "INCOMPAT_CORRUPT",
    "INCOMPAT_DATA_FILE",
    "INCOMPAT_DIRTY",
    "INCOMPAT_EXTL2",
    "KNOWN_AUTOCLEAR",
    "KNOWN_COMPATIBLE",
    "KNOWN_INCOMPATIBLE",
    "MAX_BACKING_FILE_NAME",
    "MAX_CLUSTER_BITS",
    "MAX_HOST_OFFSET",
    "MAX_L1_BYTES",
    "MAX_REFCOUNT_ORDER",
    "MAX_REFTABLE_BYTES",
    "MAX_SNAPSHOTS",
    "MIN_CLUSTER_BITS",
    "MIN_EXTL2_CLUSTER_BITS",
    "QCOW2_MAGIC",
    "FeatureType",
]

QCOW2_MAGIC = 0x514649FB  # "QFI\xfb"

HEADER_V2_LENGTH = 72
HEADER_V3_LENGTH = 104
HEADER_V3_LENGTH_WITH_COMPRESSION = 112  # what QEMU >= 5.1 writes

# Cluster sizes QEMU accepts: 512 B .. 2 MiB (block/qcow2.h MIN/MAX_CLUSTER_BITS).
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
DEFAULT_CLUSTER_BITS = 16
MIN_EXTL2_CLUSTER_BITS = 14  # extended L2 needs 16 KiB clusters or more

MAX_REFCOUNT_ORDER = 6  # refcount_bits = 64
MAX_L1_BYTES = 32 * 1024 * 1024  # QCOW_MAX_L1_SIZE
MAX_REFTABLE_BYTES = 8 * 1024 * 1024  # QCOW_MAX_REFTABLE_SIZE
MAX_BACKING_FILE_NAME = 1023
MAX_SNAPSHOTS = 65536  # QCOW_MAX_SNAPSHOTS
MAX_HOST_OFFSET = 1 << 56  # L1/L2 offsets live in bits 9-55

# Header extension types.
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO_HEADER = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# incompatible_features
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
KNOWN_INCOMPATIBLE = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)

# compatible_features
COMPAT_LAZY_REFCOUNTS = 1 << 0
KNOWN_COMPATIBLE = COMPAT_LAZY_REFCOUNTS

# autoclear_features
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
KNOWN_AUTOCLEAR = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1


class FeatureType(enum.IntEnum):
    """Which of the three feature bitmaps a feature-name-table entry describes."""

    INCOMPATIBLE = 0
    COMPATIBLE = 1
    AUTOCLEAR = 2


# Names QEMU writes into its feature-name table, used when an image carries none.
FEATURE_NAMES: dict[tuple[FeatureType, int], str] = {
    (FeatureType.INCOMPATIBLE, 0): "dirty bit",
    (FeatureType.INCOMPATIBLE, 1): "corrupt bit",
    (FeatureType.INCOMPATIBLE, 2): "external data file",
    (FeatureType.INCOMPATIBLE, 3): "compression type",
    (FeatureType.INCOMPATIBLE, 4): "extended L2 entries",
    (FeatureType.COMPATIBLE, 0): "lazy refcounts",
    (FeatureType.AUTOCLEAR, 0): "bitmaps",
    (FeatureType.AUTOCLEAR, 1): "raw external data",
}
