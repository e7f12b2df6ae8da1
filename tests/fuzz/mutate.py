"""Structure-aware mutations of valid qcow2 images, as hypothesis strategies.

:func:`parse` finds where everything is in a valid image (its own small
parser, independent of boxdisk's, so a bug in one is not hidden by the other);
:func:`mutations` draws a few edits aimed at that structure: header fields,
header extensions, L1/L2/refcount entries, compressed descriptors and the
compressed bytes themselves, truncations, extensions of the file, and bit
flips in metadata. Values are drawn from what breaks parsers: zero, all ones,
powers of two and their neighbours, the file size and beyond, 2^56, other
structures' offsets (overlaps), and those offsets misaligned.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from hypothesis import strategies as st

from tests.data._encoders import deflate_bomb, deflate_stored, zstd_rle_frame
from tests.data.make_hostile import HEADER_FIELDS

__all__ = ["Edit", "Layout", "apply", "mutations", "parse"]

COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO = 1
_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
_MAX_SLOTS = 64  # table entries of each kind offered to the mutator


@dataclass(frozen=True)
class Layout:
    """Where the structures of one valid qcow2 image are (file offsets)."""

    file_size: int
    cluster_bits: int
    version: int
    header_length: int
    extended_l2: bool
    extensions: tuple[tuple[int, int, int], ...]  # (offset of the 8-byte header, type, length)
    backing: tuple[int, int] | None  # (offset, length) of the backing name
    l1_offset: int
    l1_size: int
    rt_offset: int
    rt_clusters: int
    l1_slots: tuple[int, ...]
    l2_tables: tuple[int, ...]
    l2_slots: tuple[int, ...]
    compressed: tuple[tuple[int, int, int], ...]  # (L2 slot, data offset, data length)
    rt_slots: tuple[int, ...]
    refblocks: tuple[int, ...]
    data: tuple[int, ...]
    snapshots: tuple[int, ...] = ()  # offsets of the snapshot table entries

    @property
    def cs(self) -> int:
        return 1 << self.cluster_bits

    @property
    def metadata(self) -> tuple[tuple[int, int], ...]:
        """``(offset, length)`` of every metadata area."""
        areas = [(0, self.cs), (self.l1_offset, self.l1_size * 8),
                 (self.rt_offset, self.rt_clusters * self.cs)]
        areas += [(t, self.cs) for t in self.l2_tables + self.refblocks]
        return tuple((o, n) for o, n in areas if n and o + n <= self.file_size)


def _u64s(buf: bytes, offset: int, count: int) -> list[int]:
    count = max(0, min(count, (len(buf) - offset) // 8))
    return list(struct.unpack_from(f">{count}Q", buf, offset)) if count else []


def parse(buf: bytes) -> Layout:
    """The layout of a valid qcow2 image (v2 or v3, standard or extended L2)."""
    (_, version, bfo, bfs, cb, _, _, l1_size, l1_off, rt_off, rt_cl, nb_sn,
     sn_off) = struct.unpack_from(">IIQIIQIIQQIIQ", buf)
    cs = 1 << cb
    incompat, hlen, order = 0, 72, 4
    if version >= 3:
        incompat, _, _, order, hlen = struct.unpack_from(">QQQII", buf, 72)
    extended = bool(incompat & 1 << 4)
    exts = []
    pos = hlen
    while pos + 8 <= cs:
        etype, elen = struct.unpack_from(">II", buf, pos)
        if etype == 0:
            break
        exts.append((pos, etype, elen))
        pos += 8 + (elen + 7) // 8 * 8
    step = 2 if extended else 1
    l1_slots, l2_tables, l2_slots, compressed, data = [], [], [], [], []
    shift = 62 - (cb - 8)
    for i, e in enumerate(_u64s(buf, l1_off, l1_size)):
        if not e & _OFFSET_MASK:
            continue
        l1_slots.append(l1_off + 8 * i)
        t = e & _OFFSET_MASK
        l2_tables.append(t)
        for j, w in enumerate(_u64s(buf, t, cs // 8)[::step]):
            slot = t + 8 * step * j
            if not w and not (extended and _u64s(buf, slot + 8, 1)[0]):
                continue
            l2_slots.append(slot)
            if w & COMPRESSED:
                off = w & ((1 << shift) - 1)
                n = ((w >> shift) & ((1 << (cb - 8)) - 1)) + 1
                compressed.append((slot, off, n * 512 - off % 512))
            elif w & _OFFSET_MASK:
                data.append(w & _OFFSET_MASK)
    rt_slots, refblocks = [], []
    for i, e in enumerate(_u64s(buf, rt_off, rt_cl * cs // 8)):
        if e:
            rt_slots.append(rt_off + 8 * i)
            refblocks.append(e & ~0x1FF)
    del order
    snapshots = []
    pos = sn_off
    for _ in range(min(nb_sn, _MAX_SLOTS)):
        if pos + 40 > len(buf):
            break
        snapshots.append(pos)
        id_size, name_size = struct.unpack_from(">HH", buf, pos + 12)
        (extra,) = struct.unpack_from(">I", buf, pos + 36)
        pos = (pos + 40 + extra + id_size + name_size + 7) // 8 * 8
    return Layout(
        file_size=len(buf), cluster_bits=cb, version=version, header_length=hlen,
        extended_l2=extended, extensions=tuple(exts),
        backing=(bfo, bfs) if bfo else None, l1_offset=l1_off, l1_size=l1_size,
        rt_offset=rt_off, rt_clusters=rt_cl,
        l1_slots=tuple(l1_slots[:_MAX_SLOTS]), l2_tables=tuple(l2_tables),
        l2_slots=tuple(l2_slots[:_MAX_SLOTS]), compressed=tuple(compressed[:_MAX_SLOTS]),
        rt_slots=tuple(rt_slots[:_MAX_SLOTS]), refblocks=tuple(refblocks),
        data=tuple(data[:_MAX_SLOTS]), snapshots=tuple(snapshots),
    )


# --- edits ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Edit:
    """One change to the file: write ``data`` at ``offset``, or cut/extend it."""

    what: str
    offset: int = 0
    data: bytes = b""
    length: int | None = None  # truncate (or extend) the file to this many bytes

    def __repr__(self) -> str:
        body = self.data.hex() if len(self.data) <= 16 else f"{len(self.data)} bytes"
        size = "" if self.length is None else f" size={self.length}"
        return f"Edit({self.what} @0x{self.offset:x} {body}{size})"


def apply(buf: bytes, edits: list[Edit]) -> bytes:
    """The file after ``edits``, in order (``xor`` edits flip bits of one byte)."""
    out = bytearray(buf)
    for e in edits:
        if e.what == "xor":
            if e.offset < len(out):
                out[e.offset] ^= e.data[0]
            continue
        if e.length is not None:
            del out[e.length :]
            out += bytes(e.length - len(out))
        if e.data:
            end = e.offset + len(e.data)
            if end > len(out):
                out += bytes(end - len(out))
            out[e.offset : end] = e.data
    return bytes(out)


def _word(what: str, offset: int, fmt: str) -> Callable[[int], Edit]:
    mask = (1 << (8 * struct.calcsize(fmt))) - 1
    return lambda v: Edit(what, offset, struct.pack(fmt, v & mask))


def _offsets(lay: Layout) -> list[int]:
    """Host offsets worth pointing at: every structure, the file's end, and beyond."""
    cs, size = lay.cs, lay.file_size
    near = [0, cs, lay.l1_offset, lay.rt_offset, size, size - cs, size + cs,
            -(-size // cs) * cs, 1 << 56, (1 << 56) - cs, 1 << 40, 1 << 62, (1 << 63) - cs]
    return sorted({o for o in near + list(lay.l2_tables + lay.refblocks + lay.data) if o >= 0})


def _interesting(bits: int, lay: Layout, original: int = 0) -> st.SearchStrategy[int]:
    top = (1 << bits) - 1
    specials = {0, 1, 2, 7, 8, 9, top, top - 1, top >> 1, (top >> 1) + 1,
                original - 1, original + 1, original * 2, original >> 1,
                lay.file_size, lay.file_size + 1, lay.cs, lay.cluster_bits}
    specials |= {1 << k for k in range(bits)} | {(1 << k) - 1 for k in range(1, bits)}
    return st.one_of(
        st.sampled_from(sorted(v & top for v in specials)),
        st.sampled_from(_offsets(lay)).map(lambda o: o & top),
        st.integers(0, top),
    )


def _entry_values(lay: Layout) -> st.SearchStrategy[int]:
    """Values for an L1, L2 or refcount table entry."""
    cs = lay.cs
    flags = st.sampled_from([0, COPIED, ZERO, COPIED | ZERO, COMPRESSED, COPIED | COMPRESSED])
    offset = st.one_of(
        st.sampled_from(_offsets(lay)),
        st.sampled_from(_offsets(lay)).map(lambda o: o + 512),  # misaligned (clusters > 512)
        st.integers(0, lay.file_size + 4 * cs).map(lambda o: o & ~0x1FF),
    )
    return st.one_of(
        st.tuples(offset, flags).map(lambda t: t[0] | t[1]),
        st.integers(0, (1 << 64) - 1),
        st.tuples(offset, st.integers(0, 0xFF)).map(lambda t: t[0] | COPIED | t[1] << 1),
        st.tuples(offset, st.integers(1, 0x7F)).map(lambda t: t[0] | COPIED | t[1] << 56),
    )


def _compressed_descriptor(lay: Layout) -> st.SearchStrategy[int]:
    shift = 62 - (lay.cluster_bits - 8)
    max_sectors = (1 << (lay.cluster_bits - 8)) - 1
    offset = st.one_of(st.sampled_from(_offsets(lay)),
                       st.integers(0, lay.file_size + lay.cs),
                       st.integers(0, (1 << shift) - 1))
    return st.tuples(offset, st.integers(0, max_sectors)).map(
        lambda t: COMPRESSED | t[1] << shift | t[0])


def _payload(n: int) -> st.SearchStrategy[bytes]:
    """Hostile bytes for a compressed cluster's ``n``-byte area."""
    return st.one_of(
        st.binary(min_size=1, max_size=max(1, min(n, 256))),
        st.integers(1, max(1, n)).map(lambda k: deflate_bomb(max(16, k))[:n]),
        st.integers(0, 4 * n).map(lambda k: deflate_stored(bytes(k))[:n]),
        st.integers(0, 1 << 32).map(lambda k: zstd_rle_frame(0x5A, k % (1 << 24) or 1,
                                                              declare_size=k)[:n]),
        st.just(b"\x28\xb5\x2f\xfd" + bytes(max(0, n - 4))),
    )


#: (offset in the entry, format, name) of the snapshot table entry fields
#: (docs/interop/qcow2.txt, "Snapshots").
_SNAPSHOT_FIELDS = (
    (0, ">Q", "l1_table_offset"), (8, ">I", "l1_size"), (12, ">H", "id_size"),
    (14, ">H", "name_size"), (32, ">I", "vm_state_size"), (36, ">I", "extra_data_size"),
    (40, ">Q", "vm_state_size_large"), (48, ">Q", "disk_size"),
)


@st.composite
def _edit(draw: st.DrawFn, lay: Layout) -> Edit:
    kinds = ["header", "header", "header", "truncate", "flip", "metadata", "extend"]
    if lay.extensions:
        kinds += ["extension", "extension"]
    if lay.l1_slots:
        kinds += ["l1", "l1"]
    if lay.l2_slots:
        kinds += ["l2", "l2", "l2"]
    if lay.compressed:
        kinds += ["descriptor", "payload", "payload"]
    if lay.rt_slots:
        kinds += ["reftable", "refblock"]
    if lay.backing:
        kinds += ["backing"]
    if lay.snapshots:
        kinds += ["snapshot", "snapshot"]
    kind = draw(st.sampled_from(kinds))
    if kind == "header":
        names = [n for n, (off, _) in HEADER_FIELDS.items()
                 if lay.version >= 3 or off < 72]
        name = draw(st.sampled_from(names))
        off, fmt = HEADER_FIELDS[name]
        bits = 8 * struct.calcsize(fmt)
        value = draw(_interesting(bits, lay))
        return _word(f"header {name}", off, fmt)(value)
    if kind == "truncate":
        cut = draw(st.one_of(
            st.sampled_from(sorted({o for a, n in lay.metadata for o in (a, a + n // 2)
                                    if o < lay.file_size})),
            st.integers(0, lay.file_size),
        ))
        return Edit("truncate", length=cut)
    if kind == "extend":
        return Edit("extend", length=lay.file_size + draw(st.integers(1, 4 * lay.cs)))
    if kind == "flip":
        area_off, area_len = draw(st.sampled_from(lay.metadata))
        pos = area_off + draw(st.integers(0, area_len - 1))
        mask = draw(st.integers(1, 255))
        return Edit("xor", pos, bytes([mask]))
    if kind == "metadata":
        area_off, area_len = draw(st.sampled_from(lay.metadata))
        pos = area_off + draw(st.integers(0, max(0, area_len // 8 - 1))) * 8
        return _word("metadata word", pos, ">Q")(draw(_entry_values(lay)))
    if kind == "extension":
        ext_off, _etype, elen = draw(st.sampled_from(lay.extensions))
        which = draw(st.sampled_from(["type", "length", "data"]))
        if which == "type":
            return _word("extension type", ext_off, ">I")(draw(st.sampled_from(
                [0, 0xE2792ACA, 0x6803F857, 0x23852875, 0x0537BE77, 0x44415441, 0x12345678])))
        if which == "length":
            return _word("extension length", ext_off + 4, ">I")(draw(_interesting(32, lay,
                                                                                  elen)))
        data = draw(st.binary(min_size=1, max_size=max(1, min(elen, 64))))
        return Edit("extension data", ext_off + 8, data)
    if kind == "backing":
        assert lay.backing is not None
        off, n = lay.backing
        name = draw(st.sampled_from([b"/etc/shadow", b"../../../../etc/passwd", b"",
                                     b"\xff\xfe", b"json:{}", b".", b"/dev/zero"]))
        return Edit("backing name", off, name[:n].ljust(n, b"\0") if name else bytes(n))
    if kind == "snapshot":
        entry = draw(st.sampled_from(lay.snapshots))
        rel, fmt, what = draw(st.sampled_from(_SNAPSHOT_FIELDS))
        bits = 8 * struct.calcsize(fmt)
        values = _entry_values(lay) if what == "l1_table_offset" else _interesting(bits, lay)
        return _word(f"snapshot {what}", entry + rel, fmt)(draw(values))
    if kind == "l1":
        slot = draw(st.sampled_from(lay.l1_slots))
        return _word("L1 entry", slot, ">Q")(draw(_entry_values(lay)))
    if kind == "l2":
        slot = draw(st.sampled_from(lay.l2_slots))
        if lay.extended_l2 and draw(st.booleans()):
            return _word("L2 bitmap", slot + 8, ">Q")(draw(st.one_of(
                st.integers(0, (1 << 64) - 1),
                st.sampled_from([0, 0xFFFF_FFFF, 0xFFFF_FFFF << 32, 1 << 32 | 1]))))
        return _word("L2 entry", slot, ">Q")(draw(st.one_of(
            _entry_values(lay), _compressed_descriptor(lay))))
    if kind == "descriptor":
        slot, _, _ = draw(st.sampled_from(lay.compressed))
        return _word("compressed descriptor", slot, ">Q")(draw(_compressed_descriptor(lay)))
    if kind == "payload":
        _, off, n = draw(st.sampled_from(lay.compressed))
        start = draw(st.integers(0, max(0, n - 1)))
        return Edit("compressed bytes", off + start, draw(_payload(n - start)))
    if kind == "reftable":
        slot = draw(st.sampled_from(lay.rt_slots))
        return _word("refcount table entry", slot, ">Q")(draw(_entry_values(lay)))
    block = draw(st.sampled_from(lay.refblocks))
    if block + lay.cs > lay.file_size:  # a seed whose block lies past its end: flip a byte
        return Edit("xor", lay.rt_offset, b"\x01")
    pos = block + 8 * draw(st.integers(0, lay.cs // 8 - 1))
    return _word("refcount block word", pos, ">Q")(draw(st.one_of(
        st.integers(0, (1 << 64) - 1), st.sampled_from([0, 1, 0x0001_0001_0001_0001]))))


def mutations(lay: Layout, *, max_edits: int = 4) -> st.SearchStrategy[list[Edit]]:
    """One to ``max_edits`` edits of an image laid out as ``lay``."""
    return st.lists(_edit(lay), min_size=1, max_size=max_edits)
