"""Write the hostile-image corpus, tests/data/hostile/, deterministically.

    python tests/data/make_hostile.py            # (re)write tests/data/hostile/
    python tests/data/make_hostile.py OUT_DIR    # write the corpus somewhere else

Every image is built here from ``struct`` and hand-made compressed streams
(``_encoders``), never from boxdisk (the corpus must not share the engine's
bugs) and never from a library whose output may change between versions, so
the same script writes the same bytes everywhere; tests/hostile/ asserts that.

Most cases start from one small valid image (:func:`build`, 512-byte clusters,
a 64 KiB disk with data, zero, compressed and unallocated clusters laid out the
way QEMU lays out a fresh image) and break exactly one thing, after QEMU's
iotests 060 (overlapping metadata) and 080 (header field validation). The
pristine images are in the corpus too (``valid-*``), and the tests check them
against qemu-img. What each case must make boxdisk do is stated in
tests/hostile/test_corpus.py, not here.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``tests`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.data._encoders import (
    deflate_bomb,
    deflate_fixed,
    deflate_stored,
    zstd_rle_frame,
)

__all__ = ["CASES", "HEADER_FIELDS", "Built", "build", "guest_bytes", "write_corpus"]

CORPUS = Path(__file__).resolve().parent / "hostile"

MAGIC = 0x514649FB
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_CRYPTO_HEADER = 0x0537BE77
EXT_DATA_FILE = 0x44415441
COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO = 1

#: (byte offset, struct format) of every qcow2 header field (docs/interop/qcow2.txt, "Header").
HEADER_FIELDS: dict[str, tuple[int, str]] = {
    "magic": (0, ">I"),
    "version": (4, ">I"),
    "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"),
    "size": (24, ">Q"),
    "crypt_method": (32, ">I"),
    "l1_size": (36, ">I"),
    "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"),
    "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"),
    "snapshots_offset": (64, ">Q"),
    "incompatible_features": (72, ">Q"),
    "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"),
    "refcount_order": (96, ">I"),
    "header_length": (100, ">I"),
    "compression_type": (104, ">B"),
}


def _pattern(seed: int, n: int) -> bytes:
    """``n`` bytes that are never all zero and differ per ``seed``."""
    return bytes(((seed * 37 + i * 11) ^ (i >> 8)) & 0xFF | 1 for i in range(n))


def _text(seed: int, n: int) -> bytes:
    """``n`` compressible bytes (a repeated line), for compressed clusters."""
    line = f"boxdisk hostile corpus, compressed cluster {seed}\n".encode()
    return (line * (n // len(line) + 1))[:n]


@dataclass
class Built:
    """One image built by :func:`build`: its bytes and where everything went."""

    buf: bytearray
    cluster_bits: int
    size: int
    l1_offset: int
    l1_size: int
    rt_offset: int
    rb_offset: int
    l2_offsets: list[int]
    #: guest cluster index -> host offset of its data cluster
    data: dict[int, int] = field(default_factory=dict)
    #: guest cluster index of the compressed cluster, its data offset and length
    compressed: tuple[int, int, int] | None = None
    header_end: int = 0

    @property
    def cs(self) -> int:
        return 1 << self.cluster_bits

    def l2_entry_offset(self, guest_cluster: int, extended: bool = False) -> int:
        per = self.cs // (16 if extended else 8)
        table, index = divmod(guest_cluster, per)
        return self.l2_offsets[table] + index * (16 if extended else 8)

    def poke(self, offset: int, fmt: str, value: int) -> Built:
        struct.pack_into(fmt, self.buf, offset, value)
        return self

    def set_field(self, name: str, value: int) -> Built:
        off, fmt = HEADER_FIELDS[name]
        return self.poke(off, fmt, value)

    def get_field(self, name: str) -> int:
        off, fmt = HEADER_FIELDS[name]
        return int(struct.unpack_from(fmt, self.buf, off)[0])

    def bytes(self) -> bytes:
        return bytes(self.buf)


def build(
    *,
    cluster_bits: int = 9,
    version: int = 3,
    size: int | None = None,
    backing: str | None = None,
    backing_fmt: str | None = None,
    extensions: tuple[tuple[int, bytes], ...] = (),
    incompatible: int = 0,
    compatible: int = 0,
    autoclear: int = 0,
    crypt_method: int = 0,
    compression_type: int = 0,
    extended_l2: bool = False,
    payload: bytes | None = None,
    data: bool = True,
) -> Built:
    """A valid qcow2 image, QEMU's fresh layout, with one cluster of each kind.

    Host clusters: header, refcount table, refcount block, L1 table, L2 tables,
    data clusters, then the compressed data (all refcounts 1). Guest clusters
    (``n`` entries per L2 table): 0 and 1 data (contiguous on the host), 2 zero
    (v3; unallocated in v2), 3 compressed (``payload``, default a fixed-Huffman
    deflate of a text cluster), ``n`` and the last one data; the rest
    unallocated. With ``extended_l2``, guest cluster 1 is half allocated, half
    zero, and cluster 2 is all-zero subclusters. ``data=False`` leaves out the
    data clusters (only the compressed one stays).
    """
    cs = 1 << cluster_bits
    entry = 16 if extended_l2 else 8
    per_l2 = cs // entry
    if size is None:
        size = 2 * per_l2 * cs
    nclusters = -(-size // cs)
    l1_size = -(-nclusters // per_l2)
    l1_clusters = max(1, -(-l1_size * 8 // cs))
    rt, rb, l1 = cs, 2 * cs, 3 * cs
    host = l1 + l1_clusters * cs
    l2_offsets = []
    used_tables = sorted({0, (nclusters - 1) // per_l2} | ({1} if l1_size > 1 else set()))
    l1_words = [0] * l1_size
    for t in used_tables:
        l2_offsets.append(host)
        l1_words[t] = host | COPIED
        host += cs
    table_of = {t: l2_offsets[i] for i, t in enumerate(used_tables)}
    guest_data = [0, 1] + ([per_l2] if l1_size > 1 else []) + [nclusters - 1]
    guest_data = sorted(set(guest_data)) if data else []
    data_map: dict[int, int] = {}
    for g in guest_data:
        data_map[g] = host
        host += cs
    if compression_type:
        incompatible |= 1 << 3
    if payload is None:
        text = _text(3, cs)
        payload = zstd_rle_frame(0x5A, cs) if compression_type else deflate_fixed(text)
    comp_off = host
    host += -(-len(payload) // cs) * cs
    file_size = host
    buf = bytearray(file_size)

    # L2 entries.
    entries: dict[int, tuple[int, int]] = {}
    for g, off in data_map.items():
        entries[g] = (off | COPIED, 0xFFFF_FFFF if extended_l2 else 0)
    if extended_l2 and 1 in data_map:
        entries[1] = (data_map[1] | COPIED, 0xFFFF_0000_0000_FFFF)
    if version >= 3:
        entries[2] = (0, 0xFFFF_FFFF << 32) if extended_l2 else (ZERO, 0)
    shift = 62 - (cluster_bits - 8)
    sectors = (comp_off % 512 + len(payload) + 511) // 512
    entries[3] = (COMPRESSED | (sectors - 1) << shift | comp_off, 0)
    for g, (word, bitmap) in entries.items():
        t, i = divmod(g, per_l2)
        pos = table_of[t] + i * entry
        struct.pack_into(">Q", buf, pos, word)
        if extended_l2:
            struct.pack_into(">Q", buf, pos + 8, bitmap)
    for g, off in data_map.items():
        buf[off : off + cs] = _pattern(g, cs)
    buf[comp_off : comp_off + len(payload)] = payload
    struct.pack_into(f">{l1_size}Q", buf, l1, *l1_words)

    # Refcounts: one 16-bit entry per host cluster, every cluster used once.
    struct.pack_into(">Q", buf, rt, rb)
    for c in range(file_size // cs):
        struct.pack_into(">H", buf, rb + 2 * c, 1)

    # Header, extensions, backing name.
    exts = list(extensions)
    if backing_fmt is not None:
        exts.insert(0, (EXT_BACKING_FORMAT, backing_fmt.encode()))
    if extended_l2:
        incompatible |= 1 << 4
    head = bytearray(struct.pack(
        ">IIQIIQIIQQIIQ", MAGIC, version, 0, 0, cluster_bits, size, crypt_method, l1_size,
        l1, rt, 1, 0, 0))
    if version >= 3:
        head += struct.pack(">QQQII", incompatible, compatible, autoclear, 4, 112)
        head += bytes([compression_type]) + bytes(7)
    for etype, edata in exts:
        head += struct.pack(">II", etype, len(edata)) + edata + bytes(-len(edata) % 8)
    head += bytes(8)
    if backing is not None:
        name = backing.encode()
        struct.pack_into(">QI", head, 8, len(head), len(name))
        head += name
    assert len(head) <= cs, "header does not fit in the first cluster"
    buf[: len(head)] = head
    comp = (3, comp_off, len(payload))
    return Built(buf, cluster_bits, size, l1, l1_size, rt, rb, l2_offsets, data_map, comp,
                 len(head))


def guest_bytes(b: Built) -> bytes:
    """The guest-visible bytes of a pristine :func:`build` image (no backing file)."""
    cs = b.cs
    out = bytearray(b.size)
    for g, off in b.data.items():
        out[g * cs : (g + 1) * cs] = b.buf[off : off + cs]
    return bytes(out)


# --- the cases ------------------------------------------------------------------

Case = Callable[[], dict[str, bytes]]
CASES: dict[str, Case] = {}


def case(name: str, suffix: str = ".qcow2") -> Callable[[Callable[[], bytes]], None]:
    """Register a one-file case: ``name`` + ``suffix`` holds what the function returns."""

    def register(fn: Callable[[], bytes]) -> None:
        CASES[name] = lambda: {name + suffix: fn()}

    return register


def fields(name: str, **values: int) -> None:
    """Register a case that sets header fields of the valid image."""

    def build_it() -> bytes:
        b = build()
        for k, v in values.items():
            b.set_field(k, v)
        return b.bytes()

    CASES[name] = lambda: {name + ".qcow2": build_it()}


# Pristine images, checked against QEMU by the tests.
case("valid-base512")(lambda: build().bytes())
case("valid-base512-v2")(lambda: build(version=2).bytes())
case("valid-extl2")(lambda: build(cluster_bits=14, extended_l2=True).bytes())
case("valid-zstd")(lambda: build(compression_type=1).bytes())
case("valid-4k-clusters")(lambda: build(cluster_bits=12).bytes())

# 080: sizes that overflow and fields out of range.
fields("hdr-header-length-ffffffff", header_length=0xFFFF_FFFF)
fields("hdr-header-length-7fffffff", header_length=0x7FFF_FFFF)
fields("hdr-header-length-short", header_length=100)
fields("hdr-header-length-unaligned", header_length=105)
fields("hdr-backing-offset-ffff", backing_file_offset=0xFFFF_FFFF_FFFF_FFFF)
fields("hdr-backing-size-ffffffff", backing_file_offset=0x100, backing_file_size=0xFFFF_FFFF)
fields("hdr-backing-offset-in-header", backing_file_offset=8, backing_file_size=4)
fields("hdr-refcount-table-clusters-ffffffff", refcount_table_clusters=0xFFFF_FFFF)
fields("hdr-refcount-table-clusters-20001", refcount_table_clusters=0x0002_0001)
fields("hdr-refcount-table-clusters-0", refcount_table_clusters=0)
fields("hdr-refcount-table-misaligned", refcount_table_offset=0x1234_5678_90AB_CDEF)
fields("hdr-refcount-table-offset-huge", refcount_table_offset=0xFFFF_FFFF_FFFF_0000,
       refcount_table_clusters=0x7F)
fields("hdr-refcount-table-on-header", refcount_table_offset=0)
fields("hdr-nb-snapshots-ffffffff", nb_snapshots=0xFFFF_FFFF)
fields("hdr-nb-snapshots-7fffffff", nb_snapshots=0x7FFF_FFFF)
fields("hdr-snapshots-offset-huge", snapshots_offset=0xFFFF_FFFF_FFFF_0000, nb_snapshots=0xFFFF)
fields("hdr-snapshots-offset-misaligned", snapshots_offset=0x1234_5678_90AB_CDEF)
fields("hdr-l1-size-ffffffff", l1_size=0xFFFF_FFFF)
fields("hdr-l1-size-7fffffff", l1_size=0x7FFF_FFFF)
fields("hdr-l1-offset-huge", l1_table_offset=0x7FFF_FFFF_FFFF_0000, l1_size=0xFFFF)
fields("hdr-l1-offset-misaligned", l1_table_offset=0x1234_5678_90AB_CDEF)
fields("hdr-l1-on-header", l1_table_offset=0)
fields("hdr-l1-too-small", l1_size=1)
fields("hdr-size-near-2e63", size=(1 << 63) - 512)
fields("hdr-size-2e64-1", size=(1 << 64) - 1)
fields("hdr-size-needs-more-l1", size=1 << 40)
fields("hdr-cluster-bits-8", cluster_bits=8)
fields("hdr-cluster-bits-22", cluster_bits=22)
fields("hdr-cluster-bits-ffffffff", cluster_bits=0xFFFF_FFFF)
fields("hdr-version-1", version=1)
fields("hdr-version-4", version=4)
fields("hdr-refcount-order-7", refcount_order=7)
fields("hdr-magic", magic=0x514649FA)


@case("hdr-ext-huge-unknown")
def _ext_huge() -> bytes:
    b = build()
    b.poke(112, ">I", 0x1234_5678).poke(116, ">I", 0x7FFF_FFFF)
    return b.bytes()


@case("hdr-ext-no-end-marker")
def _ext_no_end() -> bytes:
    # Unknown extensions of 8 data bytes from the header to the end of the cluster.
    b = build()
    for pos in range(112, b.cs, 16):
        b.poke(pos, ">I", 0x1234_5678).poke(pos + 4, ">I", 8)
    return b.bytes()


@case("hdr-truncated-20")
def _trunc20() -> bytes:
    return build().bytes()[:20]


@case("hdr-truncated-80")
def _trunc80() -> bytes:
    return build().bytes()[:80]


@case("hdr-empty")
def _empty() -> bytes:
    return b""


@case("hdr-l1-past-eof")
def _l1_eof() -> bytes:
    b = build()
    return b.bytes()[: b.l1_offset + 8]


# Feature bits and extensions boxdisk must refuse (or may ignore).
fields("feat-corrupt-bit", incompatible_features=1 << 1)
fields("feat-unknown-incompat-bit5", incompatible_features=1 << 5)
fields("feat-unknown-incompat-bit63", incompatible_features=1 << 63)
fields("feat-compression-type-2", compression_type=2, incompatible_features=1 << 3)
fields("feat-compression-type-without-bit", compression_type=1)
fields("feat-encrypted-aes", crypt_method=1)
fields("feat-dirty-bit", incompatible_features=1 << 0)
fields("feat-unknown-compat-autoclear", compatible_features=0xFFFF_FFFF_FFFF_FFFE,
       autoclear_features=0xFFFF_FFFF_FFFF_FFFC)
case("feat-data-file")(lambda: build(incompatible=1 << 2, extensions=(
    (EXT_DATA_FILE, b"/var/lib/boxes/data.raw"),)).bytes())
case("feat-data-file-ext-only")(lambda: build(extensions=(
    (EXT_DATA_FILE, b"data.raw"),)).bytes())
case("feat-data-file-bit-only")(lambda: build(incompatible=1 << 2).bytes())
case("feat-encrypted-luks")(lambda: build(crypt_method=2, extensions=(
    (EXT_CRYPTO_HEADER, struct.pack(">QQ", 0x10000, 0x10000)),)).bytes())
case("feat-extl2-small-clusters")(lambda: build(cluster_bits=13, extended_l2=True).bytes())
case("feat-backing-format-not-ascii")(lambda: build(
    backing="base.raw", extensions=((EXT_BACKING_FORMAT, b"r\xffw"),)).bytes())
case("feat-backing-format-twice")(lambda: build(
    backing="base.raw", backing_fmt="raw", extensions=((EXT_BACKING_FORMAT, b"raw"),)).bytes())
case("feat-backing-format-too-long")(lambda: build(backing="base.raw",
                                                   backing_fmt="r" * 16).bytes())


@case("feat-backing-name-not-utf8")
def _name_utf8() -> bytes:
    b = build(backing="base.raw", backing_fmt="raw")
    b.buf[b.header_end - 4] = 0xFF
    return b.bytes()


@case("feat-backing-name-nul")
def _name_nul() -> bytes:
    b = build(backing="base.raw", backing_fmt="raw")
    b.buf[b.header_end - 4] = 0
    return b.bytes()


# 060 and friends: L1 entries, L2 tables and data clusters where they must not be.
def _l1(word: Callable[[Built], int], cluster_bits: int = 9) -> Callable[[], bytes]:
    def fn() -> bytes:
        b = build(cluster_bits=cluster_bits)
        return b.poke(b.l1_offset, ">Q", word(b)).bytes()

    return fn


def _l2(guest: int, word: Callable[[Built], int], cluster_bits: int = 9) -> Callable[[], bytes]:
    def fn() -> bytes:
        b = build(cluster_bits=cluster_bits)
        return b.poke(b.l2_entry_offset(guest), ">Q", word(b)).bytes()

    return fn


# Misaligned offsets need clusters above 512 bytes: with 512-byte clusters the
# low bits are reserved bits, not offset bits. 0xa00 is iotests 060's 0x...2a00.


case("tab-l2-on-l1")(_l1(lambda b: b.l1_offset | COPIED))
case("tab-l2-on-refcount-table")(_l1(lambda b: b.rt_offset | COPIED))
case("tab-l2-on-refcount-block")(_l1(lambda b: b.rb_offset | COPIED))
case("tab-l2-misaligned")(_l1(lambda b: b.l2_offsets[0] + 0xA00 | COPIED, 12))
case("tab-l2-past-eof")(_l1(lambda b: (len(b.buf) + 8 * b.cs) | COPIED))
case("tab-l2-offset-2e56")(_l1(lambda b: 1 << 56 | COPIED))
case("tab-l1-reserved-bits")(_l1(lambda b: b.l2_offsets[0] | 1 | COPIED))
case("tab-l1-copied-zero-offset")(_l1(lambda b: COPIED))
case("tab-data-misaligned")(_l2(0, lambda b: b.data[0] + 0xA00 | COPIED, 12))
case("tab-data-past-eof")(_l2(0, lambda b: (len(b.buf) + 8 * b.cs) | COPIED))
case("tab-data-huge-reserved")(_l2(0, lambda b: 0xBFFF_FFFF_FFFF_0000))
case("tab-data-huge-offset")(_l2(0, lambda b: 0x8000_00FF_FFFF_0000))
case("tab-data-reserved-bits")(_l2(0, lambda b: b.data[0] | 0x2 | COPIED))
case("tab-data-on-l1")(_l2(0, lambda b: b.l1_offset | COPIED))
case("tab-data-on-refcount-table")(_l2(0, lambda b: b.rt_offset | COPIED))
case("tab-data-on-refcount-block")(_l2(0, lambda b: b.rb_offset | COPIED))
case("tab-data-on-own-l2")(_l2(0, lambda b: b.l2_offsets[0] | COPIED))
case("tab-data-copied-zero-offset")(_l2(0, lambda b: COPIED))
case("tab-zero-alloc-misaligned")(_l2(2, lambda b: b.data[0] + 0xA00 | ZERO | COPIED, 12))
case("tab-zero-alloc-past-eof")(_l2(2, lambda b: (len(b.buf) + 8 * b.cs) | ZERO))
# Guest cluster 64 (the second L2 table) maps guest cluster 0's data cluster too.
case("tab-two-l2-share-data")(_l2(64, lambda b: b.data[0] | COPIED))


@case("tab-two-l1-share-l2")
def _share_l2() -> bytes:
    b = build()
    return b.poke(b.l1_offset + 8, ">Q", b.l2_offsets[0] | COPIED).bytes()


@case("tab-zero-in-v2")
def _zero_v2() -> bytes:
    b = build(version=2)
    return b.poke(b.l2_entry_offset(2), ">Q", ZERO).bytes()


@case("tab-l2-truncated")
def _l2_trunc() -> bytes:
    b = build()
    return b.bytes()[: b.l2_offsets[0] + b.cs // 2]


@case("tab-data-truncated")
def _data_trunc() -> bytes:
    # The file ends in the middle of the last data cluster (the compressed cluster is
    # dropped first): QEMU reads the missing half as zeros.
    b = build()
    b.poke(b.l2_entry_offset(3), ">Q", 0)
    return b.bytes()[: max(b.data.values()) + b.cs // 2]


# Refcount structures (060): only ``check`` reads them.
@case("ref-table-entry-misaligned")
def _rt_misaligned() -> bytes:
    b = build(cluster_bits=12)
    return b.poke(b.rt_offset, ">Q", b.rb_offset + 0xA00).bytes()


@case("ref-table-entry-past-eof")
def _rt_eof() -> bytes:
    b = build()
    return b.poke(b.rt_offset, ">Q", 0xFF_FFFF_0000_0000).bytes()


@case("ref-table-entry-reserved-bits")
def _rt_reserved() -> bytes:
    b = build()
    return b.poke(b.rt_offset, ">Q", b.rb_offset | 1).bytes()


@case("ref-table-empty")
def _rt_empty() -> bytes:
    b = build()
    return b.poke(b.rt_offset, ">Q", 0).bytes()


@case("ref-block-empty")
def _rb_empty() -> bytes:
    b = build()
    b.buf[b.rb_offset : b.rb_offset + b.cs] = bytes(b.cs)
    return b.bytes()


@case("ref-header-unallocated")
def _rb_header() -> bytes:
    b = build()
    return b.poke(b.rb_offset, ">H", 0).bytes()


@case("ref-table-on-l1")
def _rt_on_l1() -> bytes:
    b = build()
    return b.set_field("refcount_table_offset", b.l1_offset).bytes()


@case("ref-table-on-refcount-block")
def _rt_on_rb() -> bytes:
    b = build()
    return b.set_field("refcount_table_offset", b.rb_offset).bytes()


@case("ref-block-on-l1")
def _rb_on_l1() -> bytes:
    b = build()
    return b.poke(b.rt_offset, ">Q", b.l1_offset).bytes()


@case("ref-refcount-too-low")
def _rc_low() -> bytes:
    # Data cluster of guest cluster 0 with refcount 0: an allocation would reuse it.
    b = build()
    return b.poke(b.rb_offset + 2 * (b.data[0] // b.cs), ">H", 0).bytes()


@case("ref-leak")
def _rc_leak() -> bytes:
    # One more cluster at the end, counted but used by nothing (a leak, not a corruption).
    b = build()
    nc = len(b.buf) // b.cs
    b.buf += bytes(b.cs)
    return b.poke(b.rb_offset + 2 * nc, ">H", 1).bytes()


@case("ref-refcount-past-eof")
def _rc_past_eof() -> bytes:
    # A refcount for cluster 200 of an 11-cluster file: QEMU's check ignores it.
    b = build()
    return b.poke(b.rb_offset + 2 * 200, ">H", 7).bytes()


@case("ref-copied-refcount-2")
def _rc_two() -> bytes:
    # COPIED set on an L2 entry whose refcount is 2 (QEMU: "OFLAG_COPIED data cluster").
    b = build()
    return b.poke(b.rb_offset + 2 * (b.data[0] // b.cs), ">H", 2).bytes()


# Compressed clusters.
def _comp(word: Callable[[Built, int], int]) -> Callable[[], bytes]:
    """Replace guest cluster 3's descriptor; ``word(b, shift)`` gets the size field shift."""

    def fn() -> bytes:
        b = build()
        return b.poke(b.l2_entry_offset(3), ">Q", word(b, 62 - (b.cluster_bits - 8))).bytes()

    return fn


case("comp-offset-zero")(_comp(lambda b, s: COMPRESSED))
case("comp-in-header")(_comp(lambda b, s: COMPRESSED | 100))
case("comp-past-eof")(_comp(lambda b, s: COMPRESSED | len(b.buf) + 1024))
case("comp-runs-past-eof")(_comp(lambda b, s: COMPRESSED | 1 << s | len(b.buf) - 16))
case("comp-offset-2e56")(_comp(lambda b, s: COMPRESSED | 1 << 56))
case("comp-copied-flag")(_comp(lambda b, s: COMPRESSED | COPIED | b.compressed[1]))
case("comp-on-l1")(_comp(lambda b, s: COMPRESSED | b.l1_offset))
case("comp-garbage")(lambda: build(payload=b"\xff" * 64).bytes())
case("comp-inflates-short")(lambda: build(payload=deflate_stored(_text(3, 300))).bytes())
case("comp-inflates-long")(lambda: build(payload=deflate_stored(_text(3, 513))).bytes())
case("comp-stream-cut")(lambda: build(payload=deflate_fixed(_text(3, 512), final=False)).bytes())
case("comp-zstd-garbage")(lambda: build(compression_type=1, payload=b"\x28\xb5\x2f\xfd" +
                                        b"\xff" * 60).bytes())
case("comp-zstd-inflates-long")(lambda: build(
    compression_type=1, payload=zstd_rle_frame(0x5A, 513)).bytes())
case("comp-zstd-inflates-short")(lambda: build(
    compression_type=1, payload=zstd_rle_frame(0x5A, 100)).bytes())
# Decompression bombs: 64 KiB clusters, descriptors of 128 KiB (the most the field allows).
case("comp-zlib-bomb")(lambda: build(cluster_bits=16, size=1 << 20, data=False,
                                     payload=deflate_bomb(128 * 1024)).bytes())
case("comp-zstd-bomb")(lambda: build(
    cluster_bits=16, size=1 << 20, data=False, compression_type=1,
    payload=zstd_rle_frame(0, 32000 * 131072, declare_size=32000 * 131072)).bytes())


# Extended L2 entries.
def _ext(guest: int, word: Callable[[Built], tuple[int, int]]) -> Callable[[], bytes]:
    def fn() -> bytes:
        b = build(cluster_bits=14, extended_l2=True)
        w, bm = word(b)
        pos = b.l2_entry_offset(guest, extended=True)
        return b.poke(pos, ">Q", w).poke(pos + 8, ">Q", bm).bytes()

    return fn


case("extl2-alloc-and-zero")(_ext(0, lambda b: (b.data[0] | COPIED, 0x0000_0001_0000_0001)))
case("extl2-alloc-without-offset")(_ext(2, lambda b: (0, 0xFFFF_FFFF)))
case("extl2-compressed-with-bitmap")(_ext(3, lambda b: (
    struct.unpack_from(">Q", b.buf, b.l2_entry_offset(3, True))[0], 1)))
case("extl2-zero-flag")(_ext(0, lambda b: (b.data[0] | COPIED | ZERO, 0xFFFF_FFFF)))


# Backing chains: names the tests resolve in a directory they lay out.
def _child(name: str, backing: str | None, fmt: str | None) -> None:
    case(name)(lambda: build(backing=backing, backing_fmt=fmt).bytes())


_child("chain-etc-shadow", "/etc/shadow", "raw")
_child("chain-self", "chain-self.qcow2", "qcow2")
_child("chain-loop-a", "chain-loop-b.qcow2", "qcow2")
_child("chain-loop-b", "chain-loop-c.qcow2", "qcow2")
_child("chain-loop-c", "chain-loop-a.qcow2", "qcow2")
_child("chain-symlink-out", "escape.raw", "raw")
_child("chain-dotdot", "../outside/secret.raw", "raw")
_child("chain-json", 'json:{"file.driver": "file", "file.filename": "/etc/shadow"}', "raw")
_child("chain-no-format", "chain-probe-base.raw", None)
_child("chain-vmdk", "base.vmdk", "vmdk")
_child("chain-fifo", "fifo", "raw")
_child("chain-directory", ".", "raw")
_child("chain-dev-zero", "/dev/zero", "raw")
_child("chain-probe-child", "chain-probe-base.raw", "raw")
_child("chain-corrupt-backing", "hdr-l1-size-ffffffff.qcow2", "qcow2")
# The probing attack: a raw base whose bytes are a qcow2 image naming /etc/shadow.
case("chain-probe-base", ".raw")(lambda: build(backing="/etc/shadow", backing_fmt="raw").bytes())


def write_corpus(out: Path) -> list[Path]:
    """Write every case into ``out`` (created if missing); return the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in sorted(CASES):
        for fname, data in CASES[name]().items():
            path = out / fname
            path.write_bytes(data)
            written.append(path)
    return written


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else CORPUS
    written = write_corpus(out)
    stale = sorted(set(out.iterdir()) - set(written))
    for path in stale:
        path.unlink()
    total = sum(p.stat().st_size for p in written)
    print(f"wrote {len(written)} files ({total} bytes) to {out}; removed {len(stale)} stale")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
