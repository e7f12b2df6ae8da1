"""One qcow2 file (v2 or v3), opened read-only: header, L1/L2 lookup, refcounts, runs.

Reference: docs/interop/qcow2.txt ("Cluster mapping", "Extended L2 Entries",
"Compressed Clusters Descriptor", "Host cluster management") and QEMU's
block/qcow2-cluster.c (``qcow2_get_host_offset``). Every L1/L2 entry used is
checked as the format codecs check it (reserved bits, alignment) and, beyond
that, against the file: host offsets must lie inside it and outside the header,
L1 table and refcount table.
"""

from __future__ import annotations

import os
import re
import sys
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING

from boxdisk._args import as_path
from boxdisk._errors import CorruptImageError, ImageIOError, UnsupportedFeatureError
from boxdisk._log import get_logger
from boxdisk.format import (
    EXT_CRYPTO_HEADER,
    INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE,
    INCOMPAT_DIRTY,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    L2E_STD_RESERVED_MASK,
    MIN_HEADER_PROBE,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    REFT_OFFSET_MASK,
    L1Entry,
    L2Entry,
    Qcow2Header,
    cluster_size_of,
    decode_refcount_table_entry,
    parse_header,
    unpack_u64_table,
)

from ._base import Image, data_extents, open_image_fd, pread_exact
from ._compress import decompress_cluster, require_codec
from ._runs import RawRun, Run, RunKind, coalesce

if TYPE_CHECKING:
    from typing import Self

__all__ = ["Qcow2Image"]

log = get_logger(__name__)

_UNALLOC = RunKind.UNALLOCATED
_ZERO = RunKind.ZERO
_DATA = RunKind.DATA
_COMPRESSED = RunKind.COMPRESSED
_SUBCLUSTERS = 32
_ALL_ALLOC = 0xFFFF_FFFF
_ALL_ZERO = 0xFFFF_FFFF << 32
_DEFAULT_L2_CACHE = 16 * 1024 * 1024
_NONZERO_BYTE = re.compile(rb"[^\x00]")


class Qcow2Image(Image):
    """A qcow2 image file opened read-only.

    ``runs()`` is the allocation map of the file's own clusters; ``read()``
    reads them (unallocated stretches as zeros). ``l2_table(l1_index)`` and
    ``refcount(cluster_index)`` are the lookups a writer builds on. L2 tables
    are read whole, once, into an LRU cache bounded by ``l2_cache_bytes``:
    at most ``max(2, l2_cache_bytes // cluster_size)`` tables, each with a
    one-byte-per-entry "validated" map, plus the one table the short path
    (:meth:`locate`) holds on to, so ``(tables + 1) * cluster_size * 9 / 8``
    bytes at worst.
    """

    format = "qcow2"
    header: Qcow2Header
    file_size: int
    trust_refcounts: bool

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        trust_refcounts: bool = False,
        l2_cache_bytes: int = _DEFAULT_L2_CACHE,
    ) -> Self:
        """Open ``path`` read-only and validate its header and L1 table.

        Refuses (UnsupportedFeatureError) an external data file, encryption and
        unknown incompatible bits, and (CorruptImageError) the corrupt bit; the
        dirty bit is refused only with ``trust_refcounts=True``, since a dirty
        image's refcounts may be stale while its L1/L2 tables are sound.
        """
        p = as_path(path, "path")
        fd, file_size = open_image_fd(p)
        self = cls.__new__(cls)
        Image.__init__(self, p, fd)
        self.file_size = file_size
        try:
            self._load(trust_refcounts, l2_cache_bytes)
        except BaseException:
            self.close()
            raise
        return self

    def _load(self, trust_refcounts: bool, l2_cache_bytes: int) -> None:
        path, fd = self.path, self._fd
        try:
            probe = os.pread(fd, MIN_HEADER_PROBE, 0)
            cs = cluster_size_of(probe, source=path)
            h = parse_header(os.pread(fd, cs, 0), source=path)
        except OSError as exc:
            msg = f"cannot read the header: {exc.strerror}"
            raise ImageIOError(msg, path=path, field="header") from exc
        self._check_features(h, trust_refcounts)
        require_codec(h.compression_type, path)
        self.header = h
        self.trust_refcounts = trust_refcounts
        # QEMU counts whole sectors: a header size that is not a multiple of 512
        # loses its tail (qcow2_do_open: total_sectors = size / 512).
        self.size = h.size // 512 * 512
        self.cluster_size = cs
        self.cluster_bits = h.cluster_bits
        self.backing_file = h.backing_file
        self.backing_format = h.backing_format
        self.extended_l2 = h.extended_l2
        l1_bytes = h.l1_size * 8
        if h.l1_size and h.l1_table_offset + l1_bytes > self.file_size:
            msg = (f"L1 table at 0x{h.l1_table_offset:x} ({l1_bytes} bytes) runs past the "
                   f"end of the {self.file_size}-byte file")
            raise CorruptImageError(msg, path=path, field="l1_table_offset",
                                    value=h.l1_table_offset)
        self._l1 = unpack_u64_table(self._pread_exact(h.l1_table_offset, l1_bytes, "L1 table"))
        # The table's own bytes for the zero-entry scan (zero in either byte order): one
        # copy of an L1 table of up to 32 MiB per image, not two.
        self._l1_raw = memoryview(self._l1).cast("B")
        self._l1_checked = bytearray(len(self._l1))  # entries validated once, 1 byte each
        rt_bytes = h.refcount_table_clusters * cs
        # Host ranges no L2 table or data cluster may overlap: header, L1, refcount table.
        self._metadata = (
            (0, cs, "header"),
            (h.l1_table_offset, h.l1_table_offset + l1_bytes, "L1 table"),
            (h.refcount_table_offset, h.refcount_table_offset + rt_bytes, "refcount table"),
        )
        entry_bits = 4 if h.extended_l2 else 3
        self._l2_entries = cs >> entry_bits
        self._l2_span = self._l2_entries << h.cluster_bits  # guest bytes per L2 table
        self._l2_cache: OrderedDict[int, array[int]] = OrderedDict()
        # Per cached table: which entries the general path has validated, so the
        # short path trusts them without checking again (dropped with the table).
        self._l2_checked: dict[int, bytearray] = {}
        self._l2_bits = self._l2_span.bit_length() - 1
        self._l2_index_mask = self._l2_entries - 1
        self._memo_l1 = -1  # the L1 index whose table the short path used last
        self._memo_table: array[int] | None = None
        self._memo_checked = bytearray()
        self._l2_cache_max = 4
        self.set_l2_cache_bytes(l2_cache_bytes)
        self._reftable: array[int] | None = None
        self._metadata_preallocation: bool | None = None
        self._rb_cache: OrderedDict[int, _RefcountBlock] = OrderedDict()
        self._zcache: tuple[int, bytes] | None = None

    def _check_features(self, h: Qcow2Header, trust_refcounts: bool) -> None:
        path = self.path
        inc = h.incompatible_features
        if inc & INCOMPAT_CORRUPT:
            msg = "image is marked corrupt (incompatible bit 1); run qemu-img check -r all"
            raise CorruptImageError(msg, path=path, field="incompatible_features", value=inc)
        if inc & INCOMPAT_DATA_FILE or h.data_file is not None:
            msg = "image uses an external data file, which boxdisk does not support"
            raise UnsupportedFeatureError(msg, path=path, field="incompatible_features",
                                          value=inc)
        if h.crypt_method != 0 or h.extension(EXT_CRYPTO_HEADER) is not None:
            msg = f"image is encrypted (crypt_method {h.crypt_method}); boxdisk does not decrypt"
            raise UnsupportedFeatureError(msg, path=path, field="crypt_method",
                                          value=h.crypt_method)
        if inc & INCOMPAT_DIRTY and trust_refcounts:
            msg = "image is marked dirty: its refcounts cannot be trusted until repaired"
            raise CorruptImageError(msg, path=path, field="incompatible_features", value=inc)

    # -- raw access ----------------------------------------------------------

    def _pread_exact(self, offset: int, length: int, what: str) -> bytes:
        return pread_exact(self.fd, self.path, offset, length, what)

    def _check_host_range(self, start: int, end: int, where: str, what: str) -> None:
        if start >= self.file_size:
            msg = (f"{where}: {what} at 0x{start:x} lies past the end of the "
                   f"{self.file_size}-byte file")
            raise CorruptImageError(msg, path=self.path, field=where, value=start)
        for m_start, m_end, name in self._metadata:
            if start < m_end and m_start < end:
                msg = f"{where}: {what} at 0x{start:x} overlaps the {name}"
                raise CorruptImageError(msg, path=self.path, field=where, value=start)

    # -- L1 / L2 -------------------------------------------------------------

    @property
    def l1_table(self) -> array[int]:
        """The active L1 table, raw words (read once at open)."""
        return self._l1

    @property
    def l2_span(self) -> int:
        """Guest bytes one L2 table maps."""
        return self._l2_span

    def l2_offset(self, l1_index: int) -> int:
        """The validated host offset of L2 table ``l1_index`` (0: not allocated)."""
        if l1_index >= len(self._l1):
            return 0
        raw = self._l1[l1_index]
        if raw == 0:
            return 0
        if self._l1_checked[l1_index]:
            return raw & L1E_OFFSET_MASK
        where = f"L1 entry {l1_index}"
        offset = L1Entry.decode(raw, cluster_size=self.cluster_size, source=self.path,
                                where=where).l2_offset
        if offset:
            self._check_host_range(offset, offset + self.cluster_size, where, "L2 table")
            if offset + self.cluster_size > self.file_size:
                msg = f"{where}: L2 table at 0x{offset:x} runs past the end of the file"
                raise CorruptImageError(msg, path=self.path, field=where, value=offset)
        self._l1_checked[l1_index] = 1
        return offset

    def l2_table(self, l1_index: int) -> array[int] | None:
        """L2 table ``l1_index`` as raw words (pairs with extended L2), or None if unallocated."""
        offset = self.l2_offset(l1_index)
        if offset == 0:
            return None
        cache = self._l2_cache
        table = cache.get(offset)
        if table is not None:
            cache.move_to_end(offset)
            return table
        table = unpack_u64_table(
            self._pread_exact(offset, self.cluster_size, f"L2 table of L1 entry {l1_index}")
        )
        cache[offset] = table
        self._l2_checked[offset] = bytearray(self._l2_entries)
        if len(cache) > self._l2_cache_max:
            self._l2_checked.pop(cache.popitem(last=False)[0], None)
        return table

    def set_l2_cache_bytes(self, nbytes: int) -> None:
        """Bound the L2 table cache to about ``nbytes`` (never fewer than 2 tables).

        Two suffice for correctness and speed of one walk, which reads at most
        one table of each image at a time.
        """
        self._l2_cache_max = max(2, nbytes // self.cluster_size)
        while len(self._l2_cache) > self._l2_cache_max:
            self._l2_checked.pop(self._l2_cache.popitem(last=False)[0], None)

    # -- refcounts -----------------------------------------------------------

    def refcount(self, cluster_index: int) -> int:
        """The refcount of host cluster ``cluster_index`` (0 where no block covers it)."""
        per_block = self.cluster_size * 8 >> self.header.refcount_order
        rt_index, rb_index = divmod(cluster_index, per_block)
        block = self._refcount_block(rt_index)
        return 0 if block is None else block.get(rb_index)

    def _reftable_words(self) -> array[int]:
        if self._reftable is None:
            h = self.header
            self._reftable = unpack_u64_table(self._pread_exact(
                h.refcount_table_offset, h.refcount_table_clusters * self.cluster_size,
                "refcount table"))
        return self._reftable

    def _refcount_block(self, rt_index: int) -> _RefcountBlock | None:
        """Refcount block ``rt_index`` (a small LRU of raw blocks), or None where there is none."""
        cs = self.cluster_size
        reftable = self._reftable_words()
        if rt_index >= len(reftable):
            return None
        where = f"refcount table entry {rt_index}"
        block_offset = decode_refcount_table_entry(
            reftable[rt_index], cluster_size=cs, source=self.path, where=where)
        if block_offset == 0:
            return None
        block = self._rb_cache.get(block_offset)
        if block is None:
            self._check_host_range(block_offset, block_offset + cs, where, "refcount block")
            block = _RefcountBlock(self._pread_exact(block_offset, cs, where),
                                   self.header.refcount_order)
            self._rb_cache[block_offset] = block
            if len(self._rb_cache) > 8:
                self._rb_cache.popitem(last=False)
        return block

    @property
    def metadata_preallocation(self) -> bool:
        """Whether QEMU would take this image for metadata-preallocated.

        QEMU's heuristic (block/qcow2-refcount.c,
        ``qcow2_detect_metadata_preallocation``): more clusters have a nonzero
        refcount than the file system really allocates, by at least a ninth
        (and two clusters). Then ``qemu-img map`` asks the file where its data
        clusters are holes and reports those stretches as zero. A refcount
        structure that cannot be read makes the answer False, as in QEMU.
        Computed once, in time proportional to the file's clusters.
        """
        if self._metadata_preallocation is None:
            self._metadata_preallocation = self._detect_metadata_preallocation()
        return self._metadata_preallocation

    def _detect_metadata_preallocation(self) -> bool:
        # As qcow2_get_refcount reads them: reserved bits masked off, a misaligned
        # block an error (the answer is then False), bytes past the file's end zero.
        cs = self.cluster_size
        try:
            real_allocation = os.fstat(self.fd).st_blocks * 512
            reftable = self._reftable_words()
        except (OSError, CorruptImageError):
            return False
        real_clusters = real_allocation // cs
        threshold = max(real_clusters * 10 // 9, real_clusters + 2)
        end_cluster = -(-self.file_size // cs)
        per_block = cs * 8 >> self.header.refcount_order
        referenced = 0
        for rt_index in range(min(len(reftable), -(-end_cluster // per_block))):
            if referenced >= threshold:
                break
            block_offset = reftable[rt_index] & REFT_OFFSET_MASK
            if block_offset == 0:
                continue
            if block_offset & (cs - 1):
                return False
            try:
                raw = os.pread(self.fd, cs, block_offset)
            except (OSError, OverflowError):  # OverflowError: at 2^63 or more, unreadable
                return False
            block = _RefcountBlock(raw + bytes(cs - len(raw)), self.header.refcount_order)
            referenced += block.count_nonzero(min(per_block, end_cluster - rt_index * per_block))
        return referenced >= threshold

    def host_data_extents(self, host_offset: int,
                          length: int) -> Iterator[tuple[bool, int, int]]:
        """``(is_data, start, stop)`` of the host file over ``[host_offset, +length)``.

        SEEK_DATA/SEEK_HOLE on the file; bytes past its end are a hole.
        """
        return data_extents(self.fd, self.path, host_offset, host_offset + length,
                            self.file_size)

    # -- runs ----------------------------------------------------------------

    def runs(self, offset: int = 0, length: int | None = None, *,
             precise: bool = True) -> Iterator[Run]:
        """Runs of this file's own clusters over ``[offset, offset + length)``, coalesced."""
        length = self._check_range(offset, length)
        if length and (offset ^ (offset + length - 1)) >> self.cluster_bits == 0:
            # Within one cluster (a typical guest read) there is nothing to coalesce.
            return (Run(*raw) for raw in self._raw_runs(offset, offset + length))
        return coalesce(self._raw_runs(offset, offset + length))

    def read_runs(self, start: int, end: int) -> Iterator[RawRun]:
        """Uncoalesced runs for a reader (see :meth:`Image.read_runs`)."""
        self._check_range(start, end - start)
        return self._raw_runs(start, end)

    def _raw_runs(self, start: int, end: int) -> Iterator[RawRun]:
        span = self._l2_span
        pos = start
        while pos < end:
            l1_index = pos // span
            seg_end = min(end, (l1_index + 1) * span)
            table = self.l2_table(l1_index)
            if table is None:
                # Skip the whole stretch of empty L1 entries at C speed, so a huge
                # sparse disk costs time per allocated L2 table, not per L1 entry.
                following = self._next_l1_in_use(l1_index + 1)
                seg_end = end if following >= len(self._l1) else min(end, following * span)
                yield (_UNALLOC, pos, seg_end - pos, None, 0)
            elif self.extended_l2:
                yield from self._ext_l2_runs(l1_index, table, pos, seg_end)
            else:
                yield from self._std_l2_runs(l1_index, table, pos, seg_end)
            pos = seg_end

    def _next_l1_in_use(self, index: int) -> int:
        """The first L1 index from ``index`` on whose entry is not all zero bits."""
        found = _NONZERO_BYTE.search(self._l1_raw, index * 8)
        return len(self._l1) if found is None else found.start() // 8

    def _bad_entry(self, raw: int, where: str, bitmap: int = 0) -> None:
        """Raise the codec's error for an entry the fast path did not accept."""
        L2Entry.decode(raw, cluster_bits=self.cluster_bits, l2_bitmap=bitmap,
                       extended=self.extended_l2, version=self.header.version,
                       source=self.path, where=where)

    def _compressed(self, raw: int, where: str) -> tuple[int, int]:
        entry = L2Entry.decode(raw, cluster_bits=self.cluster_bits, source=self.path,
                               where=where)
        coffset, csize = entry.host_offset, entry.compressed_size()
        if coffset < self.cluster_size:
            msg = f"{where}: compressed data at 0x{coffset:x} lies inside the header cluster"
            raise CorruptImageError(msg, path=self.path, field=where, value=raw)
        # The descriptor is rounded up to 512-byte sectors, so its end may pass the
        # end of the file by less than one sector.
        if coffset >= self.file_size or coffset + csize > -(-self.file_size // 512) * 512:
            msg = (f"{where}: compressed data at 0x{coffset:x} ({csize} bytes) runs past "
                   f"the end of the {self.file_size}-byte file")
            raise CorruptImageError(msg, path=self.path, field=where, value=raw)
        return coffset, csize

    def _std_l2_runs(self, l1_index: int, t: array[int], pos: int,
                     seg_end: int) -> Iterator[RawRun]:
        cb, cs = self.cluster_bits, self.cluster_size
        base = l1_index * self._l2_span
        i = (pos - base) >> cb
        last = ((seg_end - 1 - base) >> cb) + 1
        v3 = self.header.version >= 3
        while i < last:
            e = t[i]
            j = i + 1
            host: int | None = None
            csize = 0
            if e == 0:
                # The next entry in use, found at C speed in the table's own bytes.
                found = _NONZERO_BYTE.search(t, j * 8, last * 8)
                j = last if found is None else found.start() >> 3
                kind = _UNALLOC
            elif e & QCOW_OFLAG_COMPRESSED:
                kind = _COMPRESSED
                host, csize = self._compressed(e, f"L2 entry {l1_index}/{i}")
            else:
                off = e & L2E_OFFSET_MASK
                if e & L2E_STD_RESERVED_MASK or off & (cs - 1) or (e & QCOW_OFLAG_ZERO
                                                                   and not v3):
                    self._bad_entry(e, f"L2 entry {l1_index}/{i}")
                if e & QCOW_OFLAG_ZERO:
                    kind = _ZERO
                    if off:
                        self._check_host_range(off, off + cs, f"L2 entry {l1_index}/{i}",
                                               "preallocated zero cluster")
                        host = off
                    else:
                        while j < last and t[j] & ~QCOW_OFLAG_COPIED == QCOW_OFLAG_ZERO:
                            j += 1
                elif off == 0:
                    kind = _UNALLOC
                else:
                    kind = _DATA
                    host = off
                    step = e
                    while j < last:
                        step += cs
                        if t[j] != step:
                            break
                        j += 1
                    if off + (j - i - 1) * cs >= self.file_size:
                        # Name the first cluster of the run that starts past the end.
                        k = i + max(0, -(-(self.file_size - off) // cs))
                        self._check_host_range(off + (k - i) * cs, off + (k - i + 1) * cs,
                                               f"L2 entry {l1_index}/{k}", "data cluster")
                    self._check_host_range(off, off + (j - i) * cs, f"L2 entry {l1_index}/{i}",
                                           "data cluster")
            cstart = base + (i << cb)
            s = max(cstart, pos)
            n = min(base + (j << cb), seg_end) - s
            if host is not None and kind is not _COMPRESSED:
                host += s - cstart
            yield (kind, s, n, host, csize)
            i = j

    def _ext_l2_runs(self, l1_index: int, t: array[int], pos: int,
                     seg_end: int) -> Iterator[RawRun]:
        cb, cs = self.cluster_bits, self.cluster_size
        sc = cs // _SUBCLUSTERS
        base = l1_index * self._l2_span
        i = (pos - base) >> cb
        last = ((seg_end - 1 - base) >> cb) + 1
        host: int | None
        while i < last:
            e, bm = t[2 * i], t[2 * i + 1]
            cstart = base + (i << cb)
            where = f"L2 entry {l1_index}/{i}"
            if e == 0 and bm == 0:
                j = i + 1
                while j < last and t[2 * j] == 0 and t[2 * j + 1] == 0:
                    j += 1
                s = max(cstart, pos)
                yield (_UNALLOC, s, min(base + (j << cb), seg_end) - s, None, 0)
                i = j
                continue
            if e & QCOW_OFLAG_COMPRESSED:
                if bm:
                    self._bad_entry(e, where, bm)
                host, csize = self._compressed(e, where)
                s = max(cstart, pos)
                yield (_COMPRESSED, s, min(cstart + cs, seg_end) - s, host, csize)
                i += 1
                continue
            off = L2Entry.decode(e, cluster_bits=cb, l2_bitmap=bm, extended=True,
                                 version=self.header.version, source=self.path,
                                 where=where).host_offset
            if off:
                self._check_host_range(off, off + cs, where, "data cluster")
            # Per subcluster: the zero bit wins, then the allocation bit (qcow2.txt,
            # "Extended L2 Entries"); neither means "read from the backing file".
            for k in range(_SUBCLUSTERS):
                s = cstart + k * sc
                e_ = s + sc
                if e_ <= pos:
                    continue
                if s >= seg_end:
                    break
                s2, n = max(s, pos), min(e_, seg_end) - max(s, pos)
                host = None
                if bm >> (32 + k) & 1:
                    kind = _ZERO
                    if off:
                        host = off + (s2 - cstart)
                elif bm >> k & 1:
                    kind = _DATA
                    host = off + (s2 - cstart)
                else:
                    kind = _UNALLOC  # QEMU's UNALLOCATED_ALLOC keeps its host offset
                    if off:
                        host = off + (s2 - cstart)
                yield (kind, s2, n, host, 0)
            i += 1

    # -- the short path ------------------------------------------------------

    def locate(self, offset: int) -> tuple[RunKind, int, int] | None:
        """Where the guest byte at ``offset`` lives, from one cached L2 entry.

        The answer covers the rest of the cluster (standard L2), the following
        subclusters of the same kind (extended L2), or the rest of an L1
        entry's span when it has no L2 table. An entry is validated by the
        general path (:meth:`runs`, same checks, same errors) the first time it
        is used, then trusted while its table stays cached. Compressed
        clusters answer None (the caller takes :meth:`runs`).
        """
        l1_index = offset >> self._l2_bits
        if l1_index == self._memo_l1:
            table, checked = self._memo_table, self._memo_checked
        else:
            l2_off = self.l2_offset(l1_index)
            table = None if l2_off == 0 else self.l2_table(l1_index)
            checked = self._l2_checked[l2_off] if table is not None else bytearray()
            self._memo_l1, self._memo_table, self._memo_checked = l1_index, table, checked
        if table is None:
            return (_UNALLOC, 0, ((l1_index + 1) << self._l2_bits) - offset)
        cs = self.cluster_size
        i = (offset >> self.cluster_bits) & self._l2_index_mask
        intra = offset & (cs - 1)
        if self.extended_l2:
            return self._locate_ext(l1_index, table, checked, i, offset, intra)
        e = table[i]
        if e == 0:
            return (_UNALLOC, 0, cs - intra)
        if not checked[i]:
            self._validate(l1_index, table, i, offset - intra)
            checked[i] = 1
        if e & QCOW_OFLAG_COMPRESSED:
            return None
        if e & QCOW_OFLAG_ZERO:
            return (_ZERO, 0, cs - intra)
        off = e & L2E_OFFSET_MASK
        if off == 0:
            return (_UNALLOC, 0, cs - intra)
        return (_DATA, off + intra, cs - intra)

    def _locate_ext(self, l1_index: int, table: array[int], checked: bytearray, i: int,
                    offset: int, intra: int) -> tuple[RunKind, int, int] | None:
        e, bm = table[2 * i], table[2 * i + 1]
        cs = self.cluster_size
        if e == 0 and bm == 0:
            return (_UNALLOC, 0, cs - intra)
        if not checked[i]:
            self._validate(l1_index, table, i, offset - intra)
            checked[i] = 1
        if e & QCOW_OFLAG_COMPRESSED:
            return None
        sc = cs // _SUBCLUSTERS
        k = intra // sc
        zero, alloc = bm >> 32, bm & _ALL_ALLOC
        # As _ext_l2_runs: the zero bit wins, then the allocation bit.
        if zero >> k & 1:
            kind, mask = _ZERO, zero
        elif alloc >> k & 1:
            kind, mask = _DATA, alloc & ~zero
        else:
            kind, mask = _UNALLOC, ~(alloc | zero) & _ALL_ALLOC
        x = mask >> k
        same = ((x ^ (x + 1)).bit_length() - 1) * sc - (intra - k * sc)  # trailing ones
        host = (e & L2E_OFFSET_MASK) + intra if kind is _DATA else 0
        return (kind, host, same)

    def _validate(self, l1_index: int, table: array[int], i: int, cluster_start: int) -> None:
        """Run the general path's checks over one cluster (raising its typed errors)."""
        end = cluster_start + self.cluster_size
        walk = self._ext_l2_runs if self.extended_l2 else self._std_l2_runs
        for _ in walk(l1_index, table, cluster_start, end):
            pass

    # -- reading -------------------------------------------------------------

    def read_compressed(self, run: Run) -> bytes:
        """The whole guest cluster a COMPRESSED run lies in, inflated (one-cluster cache)."""
        assert run.host_offset is not None
        coffset = run.host_offset
        cached = self._zcache
        if cached is not None and cached[0] == coffset:
            return cached[1]
        n = min(run.compressed_size, self.file_size - coffset)
        try:
            data = os.pread(self.fd, n, coffset)
        except OSError as exc:
            msg = f"cannot read compressed cluster at 0x{coffset:x}: {exc.strerror}"
            raise ImageIOError(msg, path=self.path, field="compressed cluster",
                               value=coffset) from exc
        guest_cluster = run.start >> self.cluster_bits
        out = decompress_cluster(
            data, self.header.compression_type, self.cluster_size, path=self.path,
            where=f"compressed cluster of guest cluster {guest_cluster} at 0x{coffset:x}",
        )
        self._zcache = (coffset, out)
        return out


class _RefcountBlock:
    """One refcount block kept as its raw bytes (``cluster_size`` of them, never a list).

    Widths of a byte or more are read through an array of that width; 1-, 2-
    and 4-bit refcounts are packed LSB first (QEMU's get_refcount_ro0..ro2).
    """

    __slots__ = ("_bits", "_order", "_values")

    def __init__(self, raw: bytes, refcount_order: int) -> None:
        self._order = refcount_order
        self._bits = 1 << refcount_order
        code = _RC_ARRAY_CODES.get(refcount_order)
        if code is None:
            self._values: bytes | array[int] = raw
        else:
            values = array(code)
            values.frombytes(raw)
            if sys.byteorder == "little":
                values.byteswap()
            self._values = values

    def get(self, index: int) -> int:
        """Refcount ``index`` of the block."""
        if self._order >= 3:
            return self._values[index]
        per_byte = 8 >> self._order
        byte = self._values[index // per_byte]
        return (byte >> (index % per_byte * self._bits)) & ((1 << self._bits) - 1)

    def count_nonzero(self, n: int) -> int:
        """How many of the first ``n`` refcounts are not zero (at C speed)."""
        if self._order >= 3:
            return n - self._values[:n].count(0)
        per_byte = 8 >> self._order
        full, rest = divmod(n, per_byte)
        raw = self._values
        assert isinstance(raw, bytes)
        fields = raw[:full].translate(_NONZERO_FIELDS[self._order])
        total = sum(k * fields.count(k) for k in range(1, per_byte + 1))
        return total + sum(1 for i in range(full * per_byte, full * per_byte + rest) if self.get(i))


_RC_ARRAY_CODES = {3: "B", 4: "H", 5: "I", 6: "Q"}
for _code, _width in (("H", 2), ("I", 4), ("Q", 8)):
    assert array(_code).itemsize == _width

#: For 1-, 2- and 4-bit refcounts: how many fields of each byte value are not zero.
_NONZERO_FIELDS = {
    order: bytes(
        sum(1 for i in range(8 >> order) if (b >> (i << order)) & ((1 << (1 << order)) - 1))
        for b in range(256)
    )
    for order in (0, 1, 2)
}
