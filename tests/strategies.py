"""Hypothesis strategies for qcow2 structures: valid headers, table entries, refcounts.

Each strategy draws only values the spec allows, so a round-trip law
(``parse(pack(x)) == x``, ``decode(encode(x)) == x``) can be stated once and
tried many ways; the bad-input tests mutate what these produce.
"""

from __future__ import annotations

import attrs
from hypothesis import strategies as st

from boxdisk._errors import CorruptImageError
from boxdisk.format import (
    COMPRESSION_ZLIB,
    COMPRESSION_ZSTD,
    EXT_BACKING_FORMAT,
    EXT_BITMAPS,
    EXT_CRYPTO_HEADER,
    EXT_DATA_FILE,
    EXT_END,
    EXT_FEATURE_TABLE,
    HEADER_V2_LENGTH,
    HEADER_V3_LENGTH,
    HEADER_V3_LENGTH_WITH_COMPRESSION,
    INCOMPAT_COMPRESSION,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    INCOMPAT_EXTL2,
    MAX_BACKING_FILE_NAME,
    MAX_CLUSTER_BITS,
    MAX_HOST_OFFSET,
    MAX_L1_BYTES,
    MAX_REFCOUNT_ORDER,
    MAX_REFTABLE_BYTES,
    MIN_CLUSTER_BITS,
    MIN_EXTL2_CLUSTER_BITS,
    ClusterType,
    HeaderExtension,
    L1Entry,
    L2Entry,
    Qcow2Header,
    compressed_geometry,
    l1_entries_for,
)

__all__ = [
    "backing_formats",
    "backing_names",
    "cluster_bits",
    "extended_l2_entries",
    "l1_entries",
    "qcow2_headers",
    "refcount_blocks",
    "standard_l2_entries",
]

_KNOWN_EXT = {
    EXT_END,
    EXT_BACKING_FORMAT,
    EXT_FEATURE_TABLE,
    EXT_BITMAPS,
    EXT_CRYPTO_HEADER,
    EXT_DATA_FILE,
}
_U64 = (1 << 64) - 1

cluster_bits = st.integers(MIN_CLUSTER_BITS, MAX_CLUSTER_BITS)

#: Backing format names QEMU would write: printable ASCII, 1..15 bytes.
backing_formats = st.one_of(
    st.sampled_from(["raw", "qcow2", "vmdk", "file"]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=15),
)

#: Backing names: UTF-8 without NUL, at most 1023 encoded bytes.
backing_names = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
    min_size=1,
    max_size=300,
).filter(lambda s: len(s.encode("utf-8")) <= MAX_BACKING_FILE_NAME)


def _aligned_offset(draw: st.DrawFn, cbits: int, nbytes: int) -> int:
    """A cluster-aligned table offset past the header cluster, ending below 2^56."""
    cs = 1 << cbits
    last = (MAX_HOST_OFFSET - nbytes) // cs
    return cs * draw(st.one_of(st.integers(1, 64), st.integers(1, max(1, last))))


def _unknown_extension(draw: st.DrawFn) -> HeaderExtension:
    ext_type = draw(st.integers(1, (1 << 32) - 1).filter(lambda t: t not in _KNOWN_EXT))
    return HeaderExtension(ext_type, draw(st.binary(max_size=48)))


@st.composite
def qcow2_headers(draw: st.DrawFn, *, version: int | None = None) -> Qcow2Header:
    """Valid qcow2 headers (v2 or v3) whose packed form fits in the first cluster."""
    ver = draw(st.sampled_from([2, 3])) if version is None else version
    cbits = draw(cluster_bits)
    cs = 1 << cbits
    incompat = compat = autoclear = 0
    refcount_order = 4
    header_length = HEADER_V2_LENGTH
    compression_type = COMPRESSION_ZLIB
    header_extra = b""
    if ver == 3:
        extl2 = cbits >= MIN_EXTL2_CLUSTER_BITS and draw(st.booleans())
        header_length = draw(
            st.sampled_from([HEADER_V3_LENGTH, HEADER_V3_LENGTH_WITH_COMPRESSION, 120, 128])
        )
        if header_length > cs:  # 512-byte clusters leave room, but stay honest
            header_length = HEADER_V3_LENGTH
        if header_length > HEADER_V3_LENGTH:
            compression_type = draw(st.sampled_from([COMPRESSION_ZLIB, COMPRESSION_ZSTD]))
            header_extra = draw(
                st.binary(
                    min_size=header_length - HEADER_V3_LENGTH_WITH_COMPRESSION,
                    max_size=header_length - HEADER_V3_LENGTH_WITH_COMPRESSION,
                )
            )
        incompat = draw(st.sampled_from([0, INCOMPAT_DIRTY, INCOMPAT_CORRUPT]))
        if extl2:
            incompat |= INCOMPAT_EXTL2
        if compression_type != COMPRESSION_ZLIB:
            incompat |= INCOMPAT_COMPRESSION
        compat = draw(st.integers(0, _U64))
        autoclear = draw(st.integers(0, _U64))
        refcount_order = draw(st.integers(0, MAX_REFCOUNT_ORDER))
    extended = bool(incompat & INCOMPAT_EXTL2)
    l1_max = MAX_L1_BYTES // 8
    mapped_per_l1 = (cs // (16 if extended else 8)) * cs
    size = draw(
        st.one_of(
            st.integers(0, 1 << 34),
            st.integers(0, min((1 << 63) - 1, l1_max * mapped_per_l1)),
        )
    )
    needed = l1_entries_for(size, cbits, extended_l2=extended)
    l1_size = draw(st.integers(needed, min(l1_max, needed + 16)))
    rt_clusters = draw(st.integers(1, MAX_REFTABLE_BYTES // cs))
    nb_snapshots = draw(st.integers(0, 4))
    extensions: list[HeaderExtension] = []
    if draw(st.booleans()):
        extensions.append(HeaderExtension(EXT_BACKING_FORMAT, draw(backing_formats).encode()))
    extensions += [_unknown_extension(draw) for _ in range(draw(st.integers(0, 2)))]
    extensions = draw(st.permutations(extensions))
    header = Qcow2Header(
        version=ver,
        cluster_bits=cbits,
        size=size,
        crypt_method=0,
        l1_size=l1_size,
        l1_table_offset=_aligned_offset(draw, cbits, l1_size * 8) if l1_size else 0,
        refcount_table_offset=_aligned_offset(draw, cbits, rt_clusters * cs),
        refcount_table_clusters=rt_clusters,
        nb_snapshots=nb_snapshots,
        snapshots_offset=_aligned_offset(draw, cbits, nb_snapshots * 40) if nb_snapshots else 0,
        incompatible_features=incompat,
        compatible_features=compat,
        autoclear_features=autoclear,
        refcount_order=refcount_order,
        header_length=header_length,
        compression_type=compression_type,
        header_extra=header_extra,
        extensions=tuple(extensions),
        backing_file=draw(st.none() | backing_names),
    )
    try:
        header.pack()
    except CorruptImageError:
        # The backing name does not fit in a small cluster: drop it, keep the rest.
        header = attrs.evolve(header, backing_file=None)
    return header


@st.composite
def l1_entries(draw: st.DrawFn, cbits: int) -> L1Entry:
    """Valid L1 entries for clusters of 2^cbits bytes."""
    cs = 1 << cbits
    offset = cs * draw(st.integers(0, (MAX_HOST_OFFSET - 1) // cs))
    return L1Entry(offset, draw(st.booleans()))


@st.composite
def standard_l2_entries(draw: st.DrawFn, cbits: int) -> L2Entry:
    """Valid 64-bit L2 entries of every cluster type (v3 image)."""
    cs = 1 << cbits
    kind = draw(st.sampled_from(list(ClusterType)))
    if kind is ClusterType.COMPRESSED:
        _, csize_mask, offset_mask = compressed_geometry(cbits)
        offset = draw(st.integers(0, min(offset_mask, MAX_HOST_OFFSET - 1)))
        sectors = draw(st.integers(1, csize_mask + 1))
        return L2Entry(kind, offset, False, sectors)
    top = (MAX_HOST_OFFSET - 1) // cs
    if kind in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
        offset = cs * draw(st.integers(1, top))
    else:
        offset = 0
    return L2Entry(kind, offset, draw(st.booleans()))


@st.composite
def extended_l2_entries(draw: st.DrawFn, cbits: int) -> L2Entry:
    """Valid extended (128-bit) L2 entries: word plus subcluster bitmap."""
    cs = 1 << cbits
    if draw(st.integers(0, 4)) == 0:
        _, csize_mask, offset_mask = compressed_geometry(cbits)
        offset = draw(st.integers(0, min(offset_mask, MAX_HOST_OFFSET - 1)))
        return L2Entry(ClusterType.COMPRESSED, offset, False, draw(st.integers(1, csize_mask + 1)))
    allocated = draw(st.booleans())
    offset = cs * draw(st.integers(1, (MAX_HOST_OFFSET - 1) // cs)) if allocated else 0
    alloc_bits = draw(st.integers(0, 0xFFFF_FFFF)) if allocated else 0
    zero_bits = draw(st.integers(0, 0xFFFF_FFFF)) & ~alloc_bits
    kind = ClusterType.NORMAL if allocated else ClusterType.UNALLOCATED
    return L2Entry(kind, offset, draw(st.booleans()), 0, zero_bits << 32 | alloc_bits)


@st.composite
def refcount_blocks(draw: st.DrawFn, refcount_order: int) -> tuple[int, list[int]]:
    """(cluster_size, refcounts) that fit one refcount block of ``refcount_order``."""
    cs = 1 << draw(st.integers(MIN_CLUSTER_BITS, 12))
    entries = cs * 8 >> refcount_order
    bits = 1 << refcount_order
    values = draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=min(entries, 600)))
    return cs, values
