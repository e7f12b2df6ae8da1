"""What each hostile image must make boxdisk do, case by case.

``at`` is the first operation that must fail, in the order a caller meets
them: ``open`` (BackingChain.open), ``map`` (walking the L1/L2 tables),
``read`` (reading every guest byte: inflating compressed clusters). Every later
operation fails the same way (a ``map`` case also fails ``read`` and
``flatten``). ``None`` means the image reads: its bytes must then equal QEMU's.

``field`` is the ``BoxdiskError.field`` the error must carry; a value ending
in ``*`` is a prefix.

``qemu`` says what QEMU 7.2 does with the same file, and is checked by
tests/hostile/test_corpus.py: ``refuses`` (qemu-img cannot open it, or
qemu-io cannot read it), ``check`` (QEMU reads it, but qemu-img check reports
corruption), or ``reads`` (QEMU reads it and check finds no corruption: a case
where boxdisk is deliberately stricter than QEMU, always with a reason).
"""

from __future__ import annotations

import attrs

from boxdisk._errors import (
    BoxdiskError,
    CorruptImageError,
    NotQcow2Error,
    UnsupportedFeatureError,
)

__all__ = ["EXPECT", "Expect"]


@attrs.define(frozen=True)
class Expect:
    """One case: the error (or None), where it appears, its field, and QEMU's verdict."""

    error: type[BoxdiskError] | None
    at: str | None
    field: str | None
    qemu: str
    why: str = ""

    def field_matches(self, got: str | None) -> bool:
        if self.field is None:
            return True
        if got is None:
            return False
        if self.field.endswith("*"):
            return got.startswith(self.field[:-1])
        return got == self.field


def _open(err: type[BoxdiskError], field: str, qemu: str = "refuses", why: str = "") -> Expect:
    return Expect(err, "open", field, qemu, why)


def _map(field: str, qemu: str = "check", why: str = "") -> Expect:
    return Expect(CorruptImageError, "map", field, qemu, why)


def _read(field: str = "compressed cluster of guest cluster 3*", qemu: str = "refuses",
          why: str = "") -> Expect:
    return Expect(CorruptImageError, "read", field, qemu, why)


def _reads(qemu: str) -> Expect:
    return Expect(None, None, None, qemu)


C, U = CorruptImageError, UnsupportedFeatureError

_SPEC = "the spec forbids it; QEMU does not look"
_PAST_CLUSTER = ("boxdisk refuses a compressed stream that inflates past one cluster, where "
                 "QEMU cuts it (boxdisk/image/_compress.py)")

EXPECT: dict[str, Expect] = {
    # Pristine images and valid oddities: read exactly as QEMU reads them.
    "valid-base512": _reads("reads"),
    "valid-base512-v2": _reads("reads"),
    "valid-extl2": _reads("reads"),
    "valid-zstd": _reads("reads"),
    "valid-4k-clusters": _reads("reads"),
    "feat-dirty-bit": _reads("reads"),
    "feat-unknown-compat-autoclear": _reads("reads"),
    "tab-data-truncated": _reads("reads"),
    "tab-data-copied-zero-offset": _reads("check"),
    "tab-l1-copied-zero-offset": _reads("check"),
    # Metadata used twice or counted wrong: reads, only check can tell.
    "tab-data-on-refcount-block": _reads("check"),
    "tab-data-on-own-l2": _reads("check"),
    "tab-two-l2-share-data": _reads("check"),
    "tab-two-l1-share-l2": _reads("check"),
    "ref-table-entry-misaligned": _reads("check"),
    "ref-table-entry-past-eof": _reads("check"),
    "ref-table-entry-reserved-bits": _reads("check"),
    "ref-table-empty": _reads("check"),
    "ref-block-empty": _reads("check"),
    "ref-header-unallocated": _reads("check"),
    "ref-table-on-l1": _reads("check"),
    "ref-table-on-refcount-block": _reads("check"),
    "ref-block-on-l1": _reads("check"),
    "ref-refcount-too-low": _reads("check"),
    "ref-leak": _reads("check"),
    "ref-refcount-past-eof": _reads("reads"),
    "ref-copied-refcount-2": _reads("check"),
    # iotests 080: header fields out of range, sizes that overflow.
    "hdr-header-length-ffffffff": _open(C, "header_length"),
    "hdr-header-length-7fffffff": _open(C, "header_length"),
    "hdr-header-length-short": _open(C, "header_length"),
    "hdr-header-length-unaligned": _open(C, "header_length", "reads",
                                         "the spec: a multiple of 8; QEMU does not check"),
    "hdr-ext-huge-unknown": _open(C, "extension 0x12345678"),
    "hdr-ext-no-end-marker": _open(C, "header_extensions", "reads",
                                   "the spec ends the area with a marker; QEMU stops at the "
                                   "cluster's end"),
    "hdr-backing-offset-ffff": _open(C, "backing_file_offset"),
    "hdr-backing-size-ffffffff": _open(C, "backing_file_size"),
    "hdr-backing-offset-in-header": _open(C, "backing_file_offset", "reads",
                                          "a backing name overlapping the header fields "
                                          "would be read from them"),
    "hdr-refcount-table-clusters-ffffffff": _open(C, "refcount_table_clusters"),
    "hdr-refcount-table-clusters-20001": _open(C, "refcount_table_clusters"),
    "hdr-refcount-table-clusters-0": _open(C, "refcount_table_clusters"),
    "hdr-refcount-table-misaligned": _open(C, "refcount_table_offset"),
    "hdr-refcount-table-offset-huge": _open(C, "refcount_table_offset"),
    "hdr-refcount-table-on-header": _open(C, "refcount_table_offset", "check"),
    "hdr-nb-snapshots-ffffffff": _open(C, "nb_snapshots"),
    "hdr-nb-snapshots-7fffffff": _open(C, "nb_snapshots"),
    "hdr-snapshots-offset-huge": _open(C, "snapshots_offset"),
    "hdr-snapshots-offset-misaligned": _open(C, "snapshots_offset"),
    "hdr-l1-size-ffffffff": _open(C, "l1_size"),
    "hdr-l1-size-7fffffff": _open(C, "l1_size"),
    "hdr-l1-too-small": _open(C, "l1_size"),
    "hdr-l1-offset-huge": _open(C, "l1_table_offset"),
    "hdr-l1-offset-misaligned": _open(C, "l1_table_offset"),
    "hdr-l1-on-header": _open(C, "l1_table_offset", "check"),
    "hdr-l1-past-eof": _open(C, "l1_table_offset", "check"),
    "hdr-size-near-2e63": _open(C, "size"),
    "hdr-size-2e64-1": _open(C, "size"),
    "hdr-size-needs-more-l1": _open(C, "size"),
    "hdr-cluster-bits-8": _open(C, "cluster_bits"),
    "hdr-cluster-bits-22": _open(C, "cluster_bits"),
    "hdr-cluster-bits-ffffffff": _open(C, "cluster_bits"),
    "hdr-version-1": _open(U, "version"),
    "hdr-version-4": _open(U, "version"),
    "hdr-refcount-order-7": _open(C, "refcount_order"),
    "hdr-magic": _open(NotQcow2Error, "magic"),
    "hdr-empty": _open(NotQcow2Error, "magic"),
    "hdr-truncated-20": _open(C, "header"),
    "hdr-truncated-80": _open(C, "header"),
    # Features boxdisk does not implement, and the corrupt bit.
    "feat-corrupt-bit": _open(C, "incompatible_features", "reads",
                              "QEMU opens a corrupt image read-only; boxdisk never does"),
    "feat-unknown-incompat-bit5": _open(U, "incompatible_features"),
    "feat-unknown-incompat-bit63": _open(U, "incompatible_features"),
    "feat-compression-type-2": _open(U, "compression_type"),
    "feat-compression-type-without-bit": _open(C, "compression_type"),
    "feat-encrypted-aes": _open(U, "crypt_method"),
    "feat-encrypted-luks": _open(U, "crypt_method"),
    "feat-data-file": _open(U, "incompatible_features"),
    "feat-data-file-bit-only": _open(U, "incompatible_features"),
    "feat-data-file-ext-only": _open(U, "incompatible_features", "reads",
                                     "a data-file name without the feature bit is "
                                     "ambiguous; boxdisk refuses rather than guess"),
    "feat-extl2-small-clusters": _open(C, "cluster_bits"),
    "feat-backing-format-not-ascii": _open(C, "backing format extension"),
    "feat-backing-format-too-long": _open(C, "backing format extension"),
    "feat-backing-format-twice": _open(C, "extension 0xe2792aca"),
    "feat-backing-name-not-utf8": _open(C, "backing_file"),
    "feat-backing-name-nul": _open(C, "backing_file"),
    # iotests 060: L2 tables where they must not be.
    "tab-l2-on-l1": _map("L1 entry 0"),
    "tab-l2-on-refcount-table": _map("L1 entry 0"),
    "tab-l2-on-refcount-block": _map("L2 entry 0/0"),
    "tab-l2-misaligned": _map("L1 entry 0", "refuses"),
    "tab-l2-past-eof": _map("L1 entry 0"),
    "tab-l2-offset-2e56": _map("L1 entry 0"),
    "tab-l2-truncated": _map("L1 entry 0", "refuses"),
    "tab-l1-reserved-bits": _map("L1 entry 0"),
    # ... and data clusters.
    "tab-data-misaligned": _map("L2 entry 0/0", "refuses"),
    "tab-data-past-eof": _map("L2 entry 0/0"),
    "tab-data-huge-reserved": _map("L2 entry 0/0"),
    "tab-data-huge-offset": _map("L2 entry 0/0"),
    "tab-data-reserved-bits": _map("L2 entry 0/0"),
    "tab-data-on-l1": _map("L2 entry 0/0"),
    "tab-data-on-refcount-table": _map("L2 entry 0/0"),
    "tab-zero-alloc-misaligned": _map("L2 entry 0/2", "refuses"),
    "tab-zero-alloc-past-eof": _map("L2 entry 0/2"),
    "tab-zero-in-v2": _map("L2 entry 0/2", "refuses"),
    # Compressed clusters: descriptors (map) and what they inflate to (read).
    "comp-offset-zero": _map("L2 entry 0/3", "refuses"),
    "comp-in-header": _map("L2 entry 0/3", "refuses"),
    "comp-past-eof": _map("L2 entry 0/3", "refuses"),
    "comp-runs-past-eof": _map("L2 entry 0/3", "refuses"),
    "comp-offset-2e56": _map("L2 entry 0/3", "refuses"),
    "comp-copied-flag": _map("L2 entry 0/3"),
    "comp-on-l1": _read(),
    "comp-garbage": _read(),
    "comp-inflates-short": _read(),
    "comp-inflates-long": _read(qemu="reads", why=_PAST_CLUSTER),
    "comp-stream-cut": _read(),
    "comp-zstd-garbage": _read(),
    "comp-zstd-inflates-short": _read(),
    "comp-zstd-inflates-long": _read(),
    "comp-zlib-bomb": _read(qemu="reads", why=_PAST_CLUSTER),
    "comp-zstd-bomb": _read(),
    # Extended L2 entries.
    "extl2-alloc-and-zero": _map("L2 entry 0/0", "refuses"),
    "extl2-alloc-without-offset": _map("L2 entry 0/2", "refuses"),
    "extl2-compressed-with-bitmap": _map("L2 entry 0/3"),
    "extl2-zero-flag": _map("L2 entry 0/0", "reads", _SPEC),
}
