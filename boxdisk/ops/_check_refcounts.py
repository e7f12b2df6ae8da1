"""Recomputing an image's refcounts from its tables, as QEMU's ``qemu-img check`` does.

This is the read-only half of :func:`boxdisk.check`: QEMU's
``calculate_refcounts`` (header, ``check_refcounts_l1``/``check_refcounts_l2``
over the active and every snapshot's L1 table, the snapshot table, the refcount
table, ``check_refblocks``), ``compare_refcounts`` and ``check_oflag_copied``
from block/qcow2-refcount.c (QEMU 7.2), with the same classification and the
same counts. Each problem is also a :class:`Finding` naming where it is.

The in-memory refcounts ("IMRT" in QEMU) are an :class:`array.array` whose item
width follows ``refcount_order`` (bytes for widths up to 8 bits, then 16, 32
and 64 bits): a few bytes per host cluster of the *file*, never a Python object
per cluster, and never sized by a table entry. Refcount blocks on disk are
big-endian; sub-byte widths pack entries LSB first (docs/interop/qcow2.txt,
"Host cluster management").

Bounds on hostile input: the arrays follow the file size (QEMU's limit of
2^31 - 1 clusters); tables are read with zeros past the end of the file, as
QEMU reads them, and a read past the end costs nothing; an L2 table referenced
from several L1 entries is walked once and counted with its multiplicity; and
all table reads together may not exceed a budget proportional to the file size
(``CorruptImageError`` past it), so no table layout can make check slow.
"""

from __future__ import annotations

import enum
import functools
import os
import struct
import sys
from array import array
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import attrs

from boxdisk._errors import CorruptImageError, ImageIOError, UnsupportedFeatureError
from boxdisk.format import (
    L1E_OFFSET_MASK,
    L1E_RESERVED_MASK,
    L2E_OFFSET_MASK,
    L2E_STD_RESERVED_MASK,
    MAX_L1_BYTES,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    REFT_OFFSET_MASK,
    REFT_RESERVED_MASK,
    Qcow2Header,
    compressed_geometry,
)

__all__ = [
    "MAX_FINDINGS",
    "Finding",
    "FindingKind",
    "Fixes",
    "Snapshot",
    "Walk",
    "decode_block",
    "encode_block",
    "last_nonzero",
    "read_snapshots",
    "set_entry",
    "typecode",
    "zeros",
]

_TYPECODES = ("B", "B", "B", "B", "H", "I", "Q")
_STRUCT = {4: ">H", 5: ">I", 6: ">Q"}
_SWAP = sys.byteorder == "little"

#: Findings kept per report; the counts stay exact past it (``findings_omitted``).
MAX_FINDINGS = 10_000
#: Mismatched clusters whose referencing tables a second pass names.
_MAX_TRACED = 256
#: QEMU's check refuses files of more clusters than this (``-EFBIG``).
_MAX_CLUSTERS = (1 << 31) - 1
#: The two refcount arrays (computed and on disk) together, sized by the file's
#: length as QEMU sizes them: 160 MiB is 40 Mi clusters at 16 bits (2.5 TiB of
#: 64 KiB clusters, 20 GiB of 512-byte ones). A larger file is refused, so a
#: hostile sparse file (a huge hole at its end) cannot push check past boxdisk's
#: 256 MiB bound on hostile input.
_MAX_ARRAY_BYTES = 160 << 20
#: QEMU's BDRV_MAX_LENGTH (2^63 - 2^30): a read that would end past it fails with EIO
#: before reaching the file (block/io.c), so a refcount block there is unreadable.
_BDRV_MAX_LENGTH = (1 << 63) - (1 << 30)
_ALL_ALLOC = 0xFFFF_FFFF
_ALL_ZERO = _ALL_ALLOC << 32
_SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")  # 40 bytes (QCowSnapshotHeader)
_MAX_SNAPSHOT_EXTRA = 1024  # QCOW_MAX_SNAPSHOT_EXTRA_DATA
_MAX_SNAPSHOTS_SIZE = 1024 * 65536  # QCOW_MAX_SNAPSHOTS_SIZE
_MIN_V3_SNAPSHOT_EXTRA = 16  # vm_state_size_large + disk_size


# -- refcount arrays -----------------------------------------------------------------


def _plane_tables(order: int) -> list[bytes]:
    bits = 1 << order
    per = 8 // bits
    mask = (1 << bits) - 1
    return [bytes((b >> (k * bits)) & mask for b in range(256)) for k in range(per)]


_PLANES = {order: _plane_tables(order) for order in (0, 1, 2)}


def typecode(order: int) -> str:
    """The array typecode holding one refcount of ``refcount_order``."""
    return _TYPECODES[order]


def zeros(order: int, count: int) -> array[int]:
    """``count`` zero refcounts."""
    return array(_TYPECODES[order], [0]) * count


def decode_block(raw: bytes, order: int) -> array[int]:
    """Every refcount of one refcount block, as an array of ``typecode(order)``."""
    if order == 3:
        return array("B", raw)
    if order > 3:
        out = array(_TYPECODES[order])
        out.frombytes(raw)
        if _SWAP:
            out.byteswap()
        return out
    per = 8 >> order
    flat = bytearray(len(raw) * per)
    for k, table in enumerate(_PLANES[order]):
        flat[k::per] = raw.translate(table)
    return array("B", flat)


def encode_block(values: array[int], order: int, cluster_size: int) -> bytes:
    """One refcount block (``cluster_size`` bytes) holding ``values``, zero-padded."""
    entries = cluster_size * 8 >> order
    padded = values[:entries]
    if len(padded) < entries:
        padded.extend(zeros(order, entries - len(padded)))
    if order == 3:
        return padded.tobytes()
    if order > 3:
        if _SWAP:
            padded.byteswap()
        return padded.tobytes()
    bits = 1 << order
    per = 8 // bits
    # Each plane's bytes stay below 2**bits, so shifting the whole little-endian
    # integer by k*bits moves every byte within itself: a bytewise OR in one go.
    acc = 0
    for k in range(per):
        acc |= int.from_bytes(padded[k::per].tobytes(), "little") << (k * bits)
    return acc.to_bytes(cluster_size, "little")


def set_entry(block: bytearray, index: int, value: int, order: int) -> None:
    """Store ``value`` as entry ``index`` of a raw refcount block."""
    if order == 3:
        block[index] = value
    elif order > 3:
        fmt = _STRUCT[order]
        struct.pack_into(fmt, block, index * struct.calcsize(fmt), value)
    else:
        bits = 1 << order
        per = 8 // bits
        pos, shift = divmod(index, per)
        shift *= bits
        mask = ((1 << bits) - 1) << shift
        block[pos] = (block[pos] & ~mask & 0xFF) | (value << shift)


def last_nonzero(values: array[int], start: int, stop: int) -> int:
    """Index of the last non-zero entry in ``values[start:stop]``, or -1."""
    stop = min(stop, len(values))
    if stop <= start:
        return -1
    raw = values[start:stop].tobytes().rstrip(b"\0")
    if not raw:
        return -1
    return start + (len(raw) - 1) // values.itemsize


def _u64_table(buf: bytes) -> array[int]:
    out = array("Q")
    out.frombytes(buf[: len(buf) // 8 * 8])
    if _SWAP:
        out.byteswap()
    return out


# -- findings ------------------------------------------------------------------------


class FindingKind(enum.Enum):
    """What is wrong; :attr:`counts_as` says which of qemu-img's counters it adds to."""

    #: The refcount on disk is lower than the references (0 included).
    REFCOUNT_TOO_LOW = "refcount_too_low"
    #: Like REFCOUNT_TOO_LOW, where two structures (one of them metadata) share a cluster.
    OVERLAPPING_METADATA = "overlapping_metadata"
    #: The refcount on disk is higher than the references.
    LEAK = "leak"
    #: More references than the refcount width can count.
    REFCOUNT_OVERFLOW = "refcount_overflow"
    #: A reference to a range that starts a cluster or more past the end of the file.
    PAST_END = "past_end"
    #: An L1, L2 or refcount table entry with reserved bits set.
    RESERVED_BITS = "reserved_bits"
    #: An L2 table, data cluster or refcount block offset that is not cluster-aligned.
    MISALIGNED = "misaligned"
    #: OFLAG_COPIED set where the refcount is not 1, or clear where it is.
    COPIED_FLAG = "copied_flag"
    #: A compressed cluster with OFLAG_COPIED or a subcluster bitmap.
    BAD_COMPRESSED_ENTRY = "bad_compressed_entry"
    #: An extended L2 bitmap marking subclusters both allocated and zero, or allocated
    #: subclusters without a host cluster.
    BAD_SUBCLUSTER_BITMAP = "bad_subcluster_bitmap"
    #: A refcount block whose own cluster is referenced other than exactly once.
    REFCOUNT_BLOCK_SHARED = "refcount_block_shared"
    #: A refcount table entry pointing past the end of the file.
    REFCOUNT_BLOCK_PAST_END = "refcount_block_past_end"
    #: A snapshot table entry QEMU calls corrupt (misaligned or oversized L1, incomplete).
    BAD_SNAPSHOT = "bad_snapshot"
    #: A refcount that cannot be read (its refcount block offset is misaligned).
    REFCOUNT_UNREADABLE = "refcount_unreadable"
    #: repair="leaks" cannot proceed: the refcount structure must be rebuilt (repair="all").
    REBUILD_NEEDED = "rebuild_needed"

    @property
    def counts_as(self) -> str:
        """``"corruptions"``, ``"leaks"`` or ``"check_errors"``."""
        if self is FindingKind.LEAK:
            return "leaks"
        if self in (FindingKind.REFCOUNT_UNREADABLE, FindingKind.REBUILD_NEEDED):
            return "check_errors"
        return "corruptions"


@attrs.define(frozen=True, kw_only=True)
class Finding:
    """One problem and where it is.

    ``table`` and ``index`` name the table entry at fault (``l1_index`` is the L1
    entry whose L2 table holds an L2 entry; ``snapshot`` the snapshot whose
    tables it is in, None for the active ones); ``offset``/``cluster`` name the
    host bytes; ``raw`` is the entry word; ``refcount`` is the refcount on disk
    and ``reference`` the number of references found; ``referenced_by`` names
    what references the cluster. ``count`` is how many of qemu-img's problems
    this finding stands for (more than 1 when one L2 table is reached from
    several L1 entries).
    """

    kind: FindingKind
    detail: str
    table: str | None = None
    index: int | None = None
    l1_index: int | None = None
    snapshot: int | None = None
    offset: int | None = None
    cluster: int | None = None
    raw: int | None = None
    refcount: int | None = None
    reference: int | None = None
    referenced_by: tuple[str, ...] = ()
    count: int = 1

    def __str__(self) -> str:
        where = []
        if self.snapshot is not None:
            where.append(f"snapshot {self.snapshot}")
        if self.table is not None:
            loc = self.table
            if self.l1_index is not None and self.index is not None:
                loc += f" [{self.l1_index}][{self.index}]"
            elif self.index is not None:
                loc += f" [{self.index}]"
            where.append(loc)
        if self.cluster is not None:
            where.append(f"cluster {self.cluster}")
        if self.offset is not None:
            where.append(f"offset 0x{self.offset:x}")
        text = f"{self.kind.value}: {self.detail}"
        if where:
            text += f" ({', '.join(where)})"
        if self.referenced_by:
            text += f"; referenced by {', '.join(self.referenced_by)}"
        return text


# -- snapshots -----------------------------------------------------------------------


@attrs.define(frozen=True)
class Snapshot:
    """What check needs of one snapshot table entry."""

    index: int
    l1_table_offset: int
    l1_size: int
    id: str
    name: str
    extra_data_size: int


def read_snapshots(
    read: Callable[[int, int], bytes], h: Qcow2Header, path: str
) -> tuple[tuple[Snapshot, ...], int]:
    """The snapshot table (entries and its size in bytes), read as QEMU's check reads it.

    Raises CorruptImageError where QEMU's ``qcow2_do_read_snapshots`` fails
    (too much extra data, a table over 64 MiB): ``qemu-img check`` reports no
    counts for such images either.
    """
    out: list[Snapshot] = []
    offset = h.snapshots_offset
    length = 0
    for i in range(h.nb_snapshots):
        offset = (offset + 7) & ~7
        length = (length + 7) & ~7
        fields = _SNAPSHOT_HEADER.unpack(read(offset, _SNAPSHOT_HEADER.size))
        l1_off, l1_size, id_size, name_size, _s, _ns, _clock, _vm, extra = fields
        if extra > _MAX_SNAPSHOT_EXTRA:
            msg = (f"snapshot table entry {i} has {extra} bytes of extra data "
                   f"(QEMU's limit is {_MAX_SNAPSHOT_EXTRA})")
            raise CorruptImageError(msg, path=path, field=f"snapshot {i} extra_data_size",
                                    value=extra)
        offset += _SNAPSHOT_HEADER.size + extra
        sid = read(offset, id_size).decode("utf-8", "replace")
        offset += id_size
        name = read(offset, name_size).decode("utf-8", "replace")
        offset += name_size
        length += _SNAPSHOT_HEADER.size + extra + id_size + name_size
        if length > _MAX_SNAPSHOTS_SIZE:
            msg = f"snapshot table is larger than QEMU's {_MAX_SNAPSHOTS_SIZE}-byte limit"
            raise CorruptImageError(msg, path=path, field="nb_snapshots",
                                    value=h.nb_snapshots)
        out.append(Snapshot(i, l1_off, l1_size, sid, name, extra))
    return tuple(out), offset - h.snapshots_offset


# -- the walk ------------------------------------------------------------------------


def _read_budget(file_size: int) -> int:
    # Every table of a sound image lies inside the file and no two overlap, so the
    # file's size (plus room for a few thousand misplaced tables) is all it needs.
    return file_size + 16 * 1024 * 1024


@functools.lru_cache(maxsize=8)
def _progression(n: int) -> tuple[int, int]:
    """(sum of 2^(64 i), sum of i * 2^(64 i)) for i < n, as native-order lanes of u64s."""
    ones = int.from_bytes(array("Q", [1]).tobytes() * n, sys.byteorder)
    steps = int.from_bytes(array("Q", range(n)).tobytes(), sys.byteorder)
    return ones, steps


def _data_owner(l1_index: int | None, i: int) -> tuple[str, bool]:
    return (f"data cluster of L2 entry {l1_index}/{i}", False)


def _compressed_owner(l1_index: int | None, i: int) -> tuple[str, bool]:
    return (f"compressed cluster of L2 entry {l1_index}/{i}", False)


#: What references a cluster: (name, is metadata), or a function making it (data
#: clusters, whose names are only needed for findings and traces).
Owner = tuple[str, bool] | Callable[[], tuple[str, bool]]


def _owner(owner: Owner) -> tuple[str, bool]:
    return owner if isinstance(owner, tuple) else owner()


@attrs.define(frozen=True)
class Fixes:
    """Which active tables a repairing walk may rewrite, and whether zeroing is allowed.

    ``l1`` allows L1 entry fixes; ``l2`` lists the L2 table offsets whose entries
    may be fixed; ``zero_past_end`` allows turning entries that point past the
    end of the file into zero clusters (not when a v2 image would then read its
    backing file instead of zeros).
    """

    l1: bool
    l2: frozenset[int]
    zero_past_end: bool


#: One L2 entry rewrite: (new entry word, new bitmap word, phase 1 or 3).
L2Fix = tuple[int, int, int]


class Walk:
    """One run of QEMU's refcount check over an open image; no writes.

    Build it, call :meth:`run`; then read the counters, ``findings``, ``imrt``
    (the computed refcounts), ``ondisk`` (the refcounts the image stores) and
    ``rebuild`` (QEMU would rebuild the refcount structure to repair it).

    With ``fixes`` the walk plans a repair instead: entries it may fix are
    recorded in ``l1_fixes``/``l2_fixes`` and counted as they will be after the
    fix. With ``trace`` (cluster indices) it records what references each.
    """

    def __init__(self, fd: int, path: str, header: Qcow2Header, file_size: int, *,
                 snapshots: tuple[Snapshot, ...], snapshots_size: int,
                 fixes: Fixes | None = None, trace: Iterable[int] | None = None) -> None:
        h = header
        self.fd, self.path, self.h = fd, path, h
        self.file_size = file_size
        self.cs = cs = h.cluster_size
        self.cb = h.cluster_bits
        self.order = h.refcount_order
        self.rc_max = (1 << h.refcount_bits) - 1
        self.rb_bits = self.cb + 3 - self.order  # log2(refcount entries per block)
        self.per_block = 1 << self.rb_bits
        self.nb = -(-file_size // cs)
        if self.nb > _MAX_CLUSTERS:
            msg = (f"file of {self.nb} clusters is too large to check "
                   f"(QEMU's check stops at {_MAX_CLUSTERS})")
            raise UnsupportedFeatureError(msg, path=path, field="file size", value=file_size)
        need = 2 * (self.nb + 1) * array(typecode(self.order)).itemsize
        if need > _MAX_ARRAY_BYTES:
            msg = (f"checking a file of {self.nb} clusters with {h.refcount_bits}-bit "
                   f"refcounts needs {need} bytes of refcount arrays, over boxdisk's "
                   f"{_MAX_ARRAY_BYTES}")
            raise UnsupportedFeatureError(msg, path=path, field="file size", value=file_size)
        self.snapshots, self.snapshots_size = snapshots, snapshots_size
        self.fixes = fixes
        self.trace: dict[int, list[tuple[str, bool]]] | None = (
            None if trace is None else {k: [] for k in trace})
        self.imrt = zeros(self.order, self.nb)
        self.ondisk = zeros(self.order, 0)
        self.bad_blocks: set[int] = set()  # refcount table indices with misaligned blocks
        self.reftable = array("Q")
        self.corruptions = self.leaks = self.check_errors = 0
        self.copied_corruptions = 0
        self.allocated = self.fragmented = self.compressed = 0
        self.image_end_offset = 0
        self.rebuild = False
        self.outside_blocks = False
        self.findings: list[Finding] = []
        self.findings_omitted = 0
        self.mismatched: list[int] = []
        self.refstruct: list[int] = []  # clusters counted as refcount table/blocks
        self.meta: dict[int, int] = {}  # cluster -> references from metadata structures
        self.active_l2: dict[int, list[int]] = {}  # L2 offset -> active L1 indices
        self.inactive_l2: dict[int, int] = {}  # L2 offset -> references from snapshots
        self.l1_fixes: dict[int, int] = {}
        self.l2_fixes: dict[int, dict[int, L2Fix]] = {}
        self._budget = _read_budget(file_size)
        self._block_cache: dict[int, array[int]] = {}
        self._version3 = h.version >= 3
        self._extended = h.extended_l2
        shift, csize_mask, off_mask = compressed_geometry(self.cb)
        self._c_shift, self._c_mask, self._c_off = shift, csize_mask, off_mask

    # -- reading ---------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``, zeros past the end of the file (as QEMU reads)."""
        avail = max(0, min(length, self.file_size - offset))
        data = b""
        if avail:
            self._budget -= avail
            if self._budget < 0:
                msg = ("tables reference the same bytes too many times: check stopped "
                       f"after reading {_read_budget(self.file_size)} bytes")
                raise CorruptImageError(msg, path=self.path, field="tables", value=offset)
            try:
                data = os.pread(self.fd, avail, offset)
            except OSError as exc:
                msg = f"cannot read {length} bytes at 0x{offset:x}: {exc.strerror}"
                raise ImageIOError(msg, path=self.path, field="tables", value=offset) from exc
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def _u64s(self, offset: int, count: int) -> array[int]:
        # Only the part inside the file is read; the rest is known to be zeros.
        inside = max(0, min(count, -(-(self.file_size - offset) // 8)))
        return _u64_table(self.read(offset, inside * 8)) if inside else array("Q")

    # -- findings --------------------------------------------------------------------

    def _add(self, kind: FindingKind, detail: str | Callable[[], str], count: int = 1,
             **where: Any) -> None:
        if kind.counts_as == "corruptions":
            self.corruptions += count
        elif kind.counts_as == "leaks":
            self.leaks += count
        else:
            self.check_errors += count
        if len(self.findings) < MAX_FINDINGS:
            text = detail if isinstance(detail, str) else detail()
            self.findings.append(Finding(kind=kind, detail=text, count=count, **where))
        else:
            self.findings_omitted += 1

    # -- counting --------------------------------------------------------------------

    def _grow(self, size: int) -> None:
        self.imrt.extend(zeros(self.order, size - len(self.imrt)))

    def inc(self, start: int, size: int, owner: Owner, m: int = 1, **where: Any) -> bool:
        """QEMU's ``qcow2_inc_refcounts_imrt``, ``m`` times; False if the range is past the end."""
        if size <= 0:
            return True
        if start + size - self.file_size >= self.cs:
            self._add(FindingKind.PAST_END,
                      lambda: f"{_owner(owner)[0]} at 0x{start:x} ({size} bytes) lies a "
                              f"cluster or more past the end of the {self.file_size}-byte file",
                      m, **{"offset": start, **where})
            return False
        first, last = start >> self.cb, (start + size - 1) >> self.cb
        if last >= len(self.imrt):
            self._grow(last + 1)
        imrt, rc_max, trace = self.imrt, self.rc_max, self.trace
        if isinstance(owner, tuple) and owner[1]:
            meta = self.meta
            for k in range(first, last + 1):
                meta[k] = meta.get(k, 0) + m
        for k in range(first, last + 1):
            v = imrt[k] + m
            if v > rc_max:
                self._add(FindingKind.REFCOUNT_OVERFLOW,
                          f"more references than {self.h.refcount_bits}-bit refcounts "
                          f"can count", v - rc_max, **{**where, "cluster": k,
                                                       "offset": k << self.cb})
                v = rc_max
            imrt[k] = v
            if trace is not None and k in trace:
                trace[k].append(_owner(owner))
        return True

    def _inc_cluster(self, k: int, m: int, owner: Owner) -> None:
        """One aligned cluster inside the file, ``m`` times (the data-cluster fast path)."""
        v = self.imrt[k] + m
        if v > self.rc_max:
            self._add(FindingKind.REFCOUNT_OVERFLOW,
                      f"more references than {self.h.refcount_bits}-bit refcounts can count",
                      v - self.rc_max, cluster=k, offset=k << self.cb)
            v = self.rc_max
        self.imrt[k] = v
        if self.trace is not None and k in self.trace:
            self.trace[k].append(_owner(owner))

    # -- on-disk refcounts -------------------------------------------------------------

    def _load_refcounts(self) -> None:
        h, cs = self.h, self.cs
        entries = h.refcount_table_clusters * cs // 8
        self.reftable = self._u64s(h.refcount_table_offset, entries)
        self.rt_entries = entries
        need = self.nb + 1  # the check may count one cluster past a partial last one
        blocks = -(-need // self.per_block)
        ondisk = array(typecode(self.order))
        zero_block = zeros(self.order, self.per_block).tobytes()
        for bi in range(blocks):
            raw = self.reftable[bi] if bi < len(self.reftable) else 0
            off = raw & REFT_OFFSET_MASK
            if not off:
                ondisk.frombytes(zero_block)
            elif off & (cs - 1) or off > _BDRV_MAX_LENGTH - cs:  # QEMU cannot read it: EIO
                self.bad_blocks.add(bi)
                ondisk.frombytes(zero_block)
            else:
                ondisk.extend(decode_block(self.read(off, cs), self.order))
        del ondisk[need:]
        self.ondisk = ondisk

    def refcount_on_disk(self, k: int) -> int | None:
        """QEMU's ``qcow2_get_refcount`` for cluster ``k``; None where it fails."""
        bi = k >> self.rb_bits
        if bi in self.bad_blocks:
            return None
        if k < len(self.ondisk):
            return self.ondisk[k]
        if bi >= self.rt_entries:
            return 0
        raw = self.reftable[bi] if bi < len(self.reftable) else 0
        off = raw & REFT_OFFSET_MASK
        if not off:
            return 0
        if off & (self.cs - 1) or off > _BDRV_MAX_LENGTH - self.cs:
            return None
        block = self._block_cache.get(off)
        if block is None:
            if len(self._block_cache) > 16:
                self._block_cache.clear()
            block = decode_block(self.read(off, self.cs), self.order)
            self._block_cache[off] = block
        return block[k & (self.per_block - 1)]

    # -- L1 and L2 tables ------------------------------------------------------------

    def _l1(self, offset: int, size: int, m: int, snapshot: Snapshot | None) -> None:
        """``check_refcounts_l1`` for one L1 table (``m`` snapshots share it)."""
        active = snapshot is None
        sn = None if snapshot is None else snapshot.index
        name = "L1 table" if active else f"L1 table of snapshot {sn}"
        if size == 0:
            return
        self.inc(offset, size * 8, (name, True), m, table=name, snapshot=sn)
        cs, fixes = self.cs, self.fixes
        fix_l1 = active and fixes is not None and fixes.l1
        for i, e in enumerate(self._u64s(offset, size)):
            if not e:
                continue
            l2 = e & L1E_OFFSET_MASK
            if e & L1E_RESERVED_MASK:
                if fix_l1 and l2 and not l2 & (cs - 1) and l2 < self.file_size:
                    self.l1_fixes[i] = e & ~L1E_RESERVED_MASK
                self._add(FindingKind.RESERVED_BITS, "L1 entry with reserved bits set", m,
                          table="L1 table", index=i, snapshot=sn, raw=e, offset=l2)
            if fix_l1 and (not l2 or l2 & (cs - 1) or l2 >= self.file_size):
                # QEMU's reads see no L2 table here (offset 0), zeros (past the end) or
                # an I/O error (misaligned): an empty entry reads the same or better.
                self.l1_fixes[i] = 0
                if l2 & (cs - 1) or l2 >= self.file_size:
                    self._misplaced_l2(e, l2, i, m, sn)
                continue
            where: dict[str, Any] = {"table": "L1 table", "index": i, "snapshot": sn, "raw": e}
            self.inc(l2, cs, (f"L2 table of {name} entry {i}", True), m, **where)
            if l2 & (cs - 1):
                self._add(FindingKind.MISALIGNED, "L2 table offset is not cluster-aligned",
                          m, offset=l2, **where)
            if active:
                self.active_l2.setdefault(l2, []).append(i)
                if l2:
                    rc = self.refcount_on_disk(l2 >> self.cb)
                    if rc is not None and (rc == 1) != bool(e & QCOW_OFLAG_COPIED):
                        self.copied_corruptions += 1
                        self._add(FindingKind.COPIED_FLAG,
                                  f"OFLAG_COPIED {'set' if e >> 63 else 'clear'} on an L2 "
                                  f"table with refcount {rc}", offset=l2, refcount=rc,
                                  **where)
            else:
                self.inactive_l2[l2] = self.inactive_l2.get(l2, 0) + m

    def _misplaced_l2(self, e: int, l2: int, i: int, m: int, sn: int | None) -> None:
        # The counts the unfixed entry gets (the plan still reports what it fixes).
        where: dict[str, Any] = {"table": "L1 table", "index": i, "snapshot": sn, "raw": e}
        if l2 >= self.file_size:
            self.inc(l2, self.cs, ("L2 table", True), m, **where)
        if l2 & (self.cs - 1):
            self._add(FindingKind.MISALIGNED, "L2 table offset is not cluster-aligned", m,
                      offset=l2, **where)

    def _l2(self, l2: int, m: int, m_active: int, l1_index: int | None) -> None:
        """``check_refcounts_l2`` for one L2 table reached from ``m`` L1 entries, and for
        the ``m_active`` of them in the active L1 table, its fragmentation counters and
        ``check_oflag_copied``. Each table is read once, however often it is reached."""
        if l2 >= self.file_size:
            return  # read as zeros: no entries
        t = self._u64s(l2, self.cs // 8)
        if len(t) < self.cs // 8:
            t.frombytes(bytes(8 * (self.cs // 8 - len(t))))
        fixing = self.fixes is not None and l2 in self.fixes.l2 and m == m_active
        fixes: dict[int, L2Fix] | None = {} if fixing else None
        # check_oflag_copied skips L1 entries of offset 0, which the refcount walk
        # still follows (to the header cluster), and the whole table when it cannot
        # read the refcount of the table's own cluster.
        copied = m_active if l2 and self.refcount_on_disk(l2 >> self.cb) is not None else 0
        walk = self._l2_extended if self._extended else self._l2_standard
        alloc, frag, comp = walk(t, m, bool(m_active), copied, l1_index, fixes)
        self.allocated += alloc * m_active
        self.fragmented += frag * m_active
        self.compressed += comp * m_active
        if fixes:
            self.l2_fixes[l2] = fixes

    def _zeroed(self, e: int, bm: int) -> tuple[int, int]:
        """The entry (and bitmap) reading zeros with no host cluster (fix_l2_entry_by_zero)."""
        if self._extended:
            return 0, (bm | (bm << 32)) & _ALL_ZERO
        return (QCOW_OFLAG_ZERO if self._version3 else 0), 0

    def _l2_standard(self, t: array[int], m: int, active: bool, copied: int,
                     l1_index: int | None, fixes: dict[int, L2Fix] | None
                     ) -> tuple[int, int, int]:
        run = self._single_run(t, m, copied, l1_index)
        if run is not None:
            return run, 0, 0
        cs, cb, cmask = self.cs, self.cb, self.cs - 1
        flen, imrt, rc_max = self.file_size, self.imrt, self.rc_max
        ondisk, n_od = self.ondisk, len(self.ondisk)
        bad, rbb = self.bad_blocks, self.rb_bits
        trace = self.trace
        nxt = alloc = frag = comp = 0
        for i, e in enumerate(t):
            if not e:
                continue
            if e & QCOW_OFLAG_COMPRESSED:
                if self._compressed_entry(e, 0, i, m, l1_index, fixes):
                    alloc += 1
                    comp += 1
                    frag += 1
                continue
            if e & L2E_STD_RESERVED_MASK:
                self._reserved_l2(e, 0, i, m, l1_index, fixes)
            off = e & L2E_OFFSET_MASK
            if not off:
                continue  # ZERO_PLAIN or UNALLOCATED
            misplaced = off & cmask or off >= flen
            if misplaced and self._misplaced_data(e, 0, off, i, m, l1_index, fixes):
                continue
            if active:
                alloc += 1
                if nxt and off != nxt:
                    frag += 1
                nxt = off + cs
            k = off >> cb
            if misplaced:
                if copied:
                    self._copied_entry(e, off, i, copied, l1_index)
                continue
            v = imrt[k] + m
            if v > rc_max or trace is not None:
                self._inc_cluster(k, m, partial(_data_owner, l1_index, i))
            else:
                imrt[k] = v
            if copied:
                if k < n_od and not (bad and (k >> rbb) in bad):
                    if (ondisk[k] == 1) != (e >> 63):
                        self._copied_entry(e, off, i, copied, l1_index)
                else:
                    self._copied_entry(e, off, i, copied, l1_index)
        return alloc, frag, comp

    def _single_run(self, t: array[int], m: int, copied: int, l1_index: int | None
                    ) -> int | None:
        """The common table at C speed: its allocated entries are one run of data clusters
        (contiguous, in the file, same flags, nothing else in the table), counted once
        each. Returns how many, or None (nothing done) for any other table."""
        raw = t.tobytes()
        body = raw.strip(b"\0")
        if not body:
            return None
        first = (len(raw) - len(raw.lstrip(b"\0"))) // 8
        n = -(-(len(raw.rstrip(b"\0"))) // 8) - first
        e0 = t[first]
        cs, off0 = self.cs, e0 & L2E_OFFSET_MASK
        k0 = off0 >> self.cb
        if (e0 & ~(QCOW_OFLAG_COPIED | L2E_OFFSET_MASK) or not off0 or off0 & (cs - 1)
                or off0 + (n - 1) * cs >= self.file_size or self.trace is not None
                or m > self.rc_max):
            return None
        code = self.imrt.typecode
        ones, steps = _progression(n)
        # Lane i of e0 * ones + cs * steps is e0 + i * cs: the run, built as one integer.
        expected = (e0 * ones + cs * steps).to_bytes(8 * n, sys.byteorder)
        if raw[8 * first:8 * (first + n)] != expected:
            return None
        if self.imrt[k0:k0 + n].count(0) != n:
            return None  # shared clusters: the per-entry walk counts and reports them
        if copied and not self._run_copied_ok(e0, k0, n):
            return None
        self.imrt[k0:k0 + n] = array(code, [m]) * n
        del l1_index
        return n

    def _run_copied_ok(self, e0: int, k0: int, n: int) -> bool:
        """Whether a run's OFLAG_COPIED flags all agree with the refcounts on disk."""
        if k0 + n > len(self.ondisk) or any(
                bi in self.bad_blocks for bi in range(k0 >> self.rb_bits,
                                                      ((k0 + n - 1) >> self.rb_bits) + 1)):
            return False
        ones = self.ondisk[k0:k0 + n].count(1)
        return ones == n if e0 & QCOW_OFLAG_COPIED else ones == 0

    def _l2_extended(self, t: array[int], m: int, active: bool, copied: int,
                     l1_index: int | None, fixes: dict[int, L2Fix] | None
                     ) -> tuple[int, int, int]:
        cs, cmask, flen = self.cs, self.cs - 1, self.file_size
        nxt = alloc = frag = comp = 0
        for i in range(len(t) // 2):
            e, bm = t[2 * i], t[2 * i + 1]
            if not e and not bm:
                continue
            if e & QCOW_OFLAG_COMPRESSED:
                if self._compressed_entry(e, bm, i, m, l1_index, fixes):
                    alloc += 1
                    comp += 1
                    frag += 1
                continue
            where = self._where(l1_index, i, e)
            if e & L2E_STD_RESERVED_MASK:
                self._reserved_l2(e, bm, i, m, l1_index, fixes)
                if fixes is not None:
                    e &= ~L2E_STD_RESERVED_MASK
            off = e & L2E_OFFSET_MASK
            if not off:
                if bm & _ALL_ALLOC:
                    if fixes is not None:
                        fixes[i] = (e, (bm | (bm << 32)) & _ALL_ZERO, 1)
                    self._add(FindingKind.BAD_SUBCLUSTER_BITMAP,
                              f"unallocated cluster with allocated subclusters "
                              f"(bitmap 0x{bm:016x})", m, **where)
                continue
            if (bm >> 32) & bm:
                self._add(FindingKind.BAD_SUBCLUSTER_BITMAP,
                          f"subclusters both allocated and zero (bitmap 0x{bm:016x})", m,
                          offset=off, **where)
                if fixes is not None:
                    bm &= ~(bm >> 32)  # the zero bit wins, as QEMU reads it
                    fixes[i] = (e, bm, 1)
            misplaced = off & cmask or off >= flen
            if misplaced and self._misplaced_data(e, bm, off, i, m, l1_index, fixes):
                continue
            if active:
                alloc += 1
                if nxt and off != nxt:
                    frag += 1
                nxt = off + cs
            if not misplaced:
                self._inc_cluster(off >> self.cb, m, partial(_data_owner, l1_index, i))
            if copied:
                self._copied_entry(e, off, i, copied, l1_index)
        return alloc, frag, comp

    @staticmethod
    def _where(l1_index: int | None, i: int, e: int) -> dict[str, Any]:
        return {"table": "L2 table", "l1_index": l1_index, "index": i, "raw": e}

    def _reserved_l2(self, e: int, bm: int, i: int, m: int, l1_index: int | None,
                     fixes: dict[int, L2Fix] | None) -> None:
        if fixes is not None:
            # QEMU's reads ignore these bits, so clearing them changes nothing a guest sees.
            fixes[i] = (e & ~L2E_STD_RESERVED_MASK, bm, 1)
        self._add(FindingKind.RESERVED_BITS, "L2 entry with reserved bits set", m,
                  offset=e & L2E_OFFSET_MASK, **self._where(l1_index, i, e))

    def _misplaced_data(self, e: int, bm: int, off: int, i: int, m: int,
                        l1_index: int | None, fixes: dict[int, L2Fix] | None) -> bool:
        """A host cluster misaligned or past the end; True when the repair empties the entry."""
        cs = self.cs
        where = self._where(l1_index, i, e)
        if off & (cs - 1):
            data = bm & _ALL_ALLOC if self._extended else not e & QCOW_OFLAG_ZERO
            self._add(FindingKind.MISALIGNED,
                      "data cluster offset is not cluster-aligned" if data else
                      "preallocated cluster offset is not cluster-aligned",
                      m, offset=off, **where)
        owner = partial(_data_owner, l1_index, i)
        assert self.fixes is not None or fixes is None
        if fixes is not None and (off & (cs - 1) or self.fixes.zero_past_end):  # type: ignore[union-attr]
            # QEMU reads such a cluster as an I/O error (misaligned) or as zeros (past
            # the end); an entry reading zeros is what QEMU's own repair writes for
            # misaligned preallocated clusters.
            fixes[i] = (*self._zeroed(e, bm), 1)
            if off >= self.file_size:
                self.inc(off, cs, owner, m, **where)
            return True
        self.inc(off, cs, owner, m, **where)
        return False

    def _compressed_entry(self, e: int, bm: int, i: int, m: int, l1_index: int | None,
                          fixes: dict[int, L2Fix] | None) -> bool:
        """A compressed L2 entry; True when QEMU counts it as allocated."""
        where = self._where(l1_index, i, e)
        coff = e & self._c_off
        fixed_e, fixed_bm, phase = e, bm, 1
        if e & QCOW_OFLAG_COPIED:
            fixed_e &= ~QCOW_OFLAG_COPIED
            self._add(FindingKind.BAD_COMPRESSED_ENTRY,
                      "OFLAG_COPIED set on a compressed cluster", m, offset=coff, **where)
        if bm:
            self._add(FindingKind.BAD_COMPRESSED_ENTRY,
                      f"compressed cluster with a subcluster bitmap (0x{bm:016x})", m,
                      offset=coff, **where)
            if fixes is None:
                return False
            # QEMU's reads ignore the bitmap of a compressed cluster; once it is cleared
            # the cluster is counted, so that fix waits until its refcount is in place.
            fixed_bm, phase = 0, 3
        nb_sectors = ((e >> self._c_shift) & self._c_mask) + 1
        csize = nb_sectors * 512 - (coff & 511)
        owner = partial(_compressed_owner, l1_index, i)
        if fixes is not None and coff + csize - self.file_size >= self.cs:
            # QEMU fails to inflate the zeros it reads there: the guest cannot read it.
            fixes[i] = (*self._zeroed(e, 0), 1)
            self.inc(coff, csize, owner, m, **where)
            return False
        if fixes is not None and (fixed_e, fixed_bm) != (e, bm):
            fixes[i] = (fixed_e, fixed_bm, phase)
        self.inc(coff, csize, owner, m, **where)
        return True

    def _copied_entry(self, e: int, off: int, i: int, m: int, l1_index: int | None) -> None:
        """check_oflag_copied for one NORMAL or ZERO_ALLOC entry of an active L2 table."""
        rc = self.refcount_on_disk(off >> self.cb)
        if rc is None or (rc == 1) == bool(e & QCOW_OFLAG_COPIED):
            return
        self.copied_corruptions += m
        self._add(FindingKind.COPIED_FLAG,
                  lambda: f"OFLAG_COPIED {'set' if e >> 63 else 'clear'} on a data cluster "
                          f"with refcount {rc}", m, offset=off, cluster=off >> self.cb, refcount=rc,
                  **self._where(l1_index, i, e))

    # -- the rest of calculate_refcounts ---------------------------------------------------

    def _snapshot_tables(self) -> None:
        groups: dict[tuple[int, int], list[Snapshot]] = {}
        for sn in self.snapshots:
            where: dict[str, Any] = {"table": "snapshot table", "index": sn.index,
                                     "snapshot": sn.index, "offset": sn.l1_table_offset}
            if self._version3 and sn.extra_data_size < _MIN_V3_SNAPSHOT_EXTRA:
                self._add(FindingKind.BAD_SNAPSHOT,
                          f"snapshot {sn.id!r} ({sn.name!r}) has an incomplete table entry "
                          f"({sn.extra_data_size} bytes of extra data)", **where)
            if sn.l1_table_offset & (self.cs - 1):
                self._add(FindingKind.BAD_SNAPSHOT,
                          f"L1 table of snapshot {sn.id!r} ({sn.name!r}) is not "
                          f"cluster-aligned", **where)
                continue
            if sn.l1_size > MAX_L1_BYTES // 8:
                self._add(FindingKind.BAD_SNAPSHOT,
                          f"L1 table of snapshot {sn.id!r} ({sn.name!r}) has {sn.l1_size} "
                          f"entries, over QEMU's limit", **where)
                continue
            groups.setdefault((sn.l1_table_offset, sn.l1_size), []).append(sn)
        for (offset, size), sns in groups.items():
            self._l1(offset, size, len(sns), sns[0])

    def _refblocks(self) -> None:
        """``check_refblocks``: every refcount block is counted once and only once."""
        cs = self.cs
        for i, raw in enumerate(self.reftable):
            if not raw:
                continue
            off = raw & REFT_OFFSET_MASK
            where: dict[str, Any] = {"table": "refcount table", "index": i, "raw": raw,
                                     "offset": off}
            if raw & REFT_RESERVED_MASK:
                self._add(FindingKind.RESERVED_BITS,
                          "refcount table entry with reserved bits set", **where)
                self.rebuild = True
                continue
            if off & (cs - 1):
                self._add(FindingKind.MISALIGNED,
                          "refcount block offset is not cluster-aligned", **where)
                self.rebuild = True
                continue
            k = off >> self.cb
            if k >= len(self.imrt):
                self._add(FindingKind.REFCOUNT_BLOCK_PAST_END,
                          f"refcount block lies past the end of the {self.file_size}-byte file",
                          **where)
                self.outside_blocks = True
                continue
            if self.inc(off, cs, (f"refcount block {i}", True), 1, **where):
                self.refstruct.append(k)
            if self.imrt[k] != 1:
                self._add(FindingKind.REFCOUNT_BLOCK_SHARED,
                          f"refcount block's cluster is referenced {self.imrt[k]} times",
                          cluster=k, reference=self.imrt[k], **where)
                self.rebuild = True

    def _compare(self) -> None:
        """``compare_refcounts``: the refcounts on disk against the references found."""
        imrt, od, per = self.imrt, self.ondisk, self.per_block
        n = len(imrt)
        cb = self.cb
        for bi in range(-(-n // per)):
            a, b = bi * per, min(bi * per + per, n)
            if bi in self.bad_blocks:
                for k in range(a, b):
                    self._add(FindingKind.REFCOUNT_UNREADABLE,
                              "refcount block offset is not cluster-aligned, or past "
                              "QEMU's largest readable offset (2^63 - 2^30)",
                              table="refcount table", index=bi, cluster=k, offset=k << cb)
                continue
            if imrt[a:b] == od[a:b]:
                continue
            for k in range(a, b):
                r1, r2 = od[k], imrt[k]
                if r1 == r2:
                    continue
                if r1 == 0:
                    self.rebuild = True
                if len(self.mismatched) < _MAX_TRACED:
                    self.mismatched.append(k)
                if r1 < r2:
                    self._add(FindingKind.REFCOUNT_TOO_LOW,
                              f"refcount {r1} but {r2} references", cluster=k,
                              offset=k << cb, refcount=r1, reference=r2)
                else:
                    self._add(FindingKind.LEAK, f"refcount {r1} but {r2} references",
                              cluster=k, offset=k << cb, refcount=r1, reference=r2)
        highest = 0
        for bi in range(-(-n // per) - 1, -1, -1):
            if bi in self.bad_blocks:
                continue
            a, b = bi * per, min(bi * per + per, n)
            last = max(last_nonzero(imrt, a, b), last_nonzero(od, a, b))
            if last >= 0:
                highest = last
                break
        self.image_end_offset = (highest + 1) * self.cs

    def run(self) -> Walk:
        """Walk everything QEMU's check walks, in its order; returns self."""
        h, cs = self.h, self.cs
        self._load_refcounts()
        self.inc(0, cs, ("header", True), table="header")
        self._l1(h.l1_table_offset, h.l1_size, 1, None)
        self._snapshot_tables()
        for l2, indices in self.active_l2.items():
            self._l2(l2, len(indices) + self.inactive_l2.get(l2, 0), len(indices), indices[0])
        for l2, m in self.inactive_l2.items():
            if l2 not in self.active_l2:
                self._l2(l2, m, 0, None)
        self.inc(h.snapshots_offset, self.snapshots_size, ("snapshot table", True),
                 table="snapshot table")
        rt_bytes = h.refcount_table_clusters * cs
        if self.inc(h.refcount_table_offset, rt_bytes, ("refcount table", True),
                    table="refcount table"):
            self.refstruct.extend(range(h.refcount_table_offset >> self.cb,
                                        (h.refcount_table_offset + rt_bytes - 1 >> self.cb) + 1))
        self._refblocks()
        self._compare()
        return self

    def owners(self) -> dict[int, list[tuple[str, bool]]]:
        """What references each traced cluster (after :meth:`run` with ``trace``)."""
        return self.trace or {}
