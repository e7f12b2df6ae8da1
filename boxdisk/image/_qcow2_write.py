"""Writing one qcow2 image: cluster allocation, refcounts, L2/L1 updates, in crash-safe order.

Reference: docs/interop/qcow2.txt ("Cluster mapping", "Host cluster
management", "Header"), QEMU's block/qcow2-cluster.c (``qcow2_alloc_host_offset``,
``zero_in_l2_slice``, ``discard_in_l2_slice``), block/qcow2-refcount.c
(``alloc_clusters_noref``, ``check_oflag_copied``) and block/qcow2.c
(``qcow2_co_truncate``, ``qcow2_grow_l1_table``).

Crash safety. Guest data goes straight to its host cluster; metadata changes
are batched in memory and reach the file in :meth:`Qcow2Writer.flush` (or
earlier, when the batch grows large) in this order, each step durable before
the next one relies on it — the dependencies QEMU's metadata caches enforce:

1. the file is extended over every new cluster, and its length made durable
   (fsync) before anything counts a cluster in it: ``qemu-img check`` never
   looks at refcounts past the end of the file, so a count there would be a
   leak nobody could see or repair until the file grew over it. Then new L2
   tables, every changed refcount block and (when it moved) the new refcount
   table are written; fsync. Guest data written into new clusters is made
   durable by these fsyncs: nothing references it yet.
2. refcount table entries pointing at new refcount blocks — or, when the table
   moved, the header's pointer to it (one 12-byte write inside sector 0); fsync.
3. L2 entries of existing tables (now pointing only at counted, durable clusters);
4. L1 entries (pointing at new, durable L2 tables, or fixing a COPIED flag);
5. fsync, then the refcount decrements of clusters that no L2/L1 entry
   references any more.

A crash between any two steps leaves, at worst, clusters counted but not
referenced (leaks, which ``check(repair="leaks")`` reclaims): never a reference
to an unwritten or uncounted cluster. A ``write`` is durable once ``flush``
returns, as with a disk's volatile write cache.

Freed clusters are reused (QEMU's ``free_cluster_index`` scan): a cluster
becomes free only in step 5, after the change that dropped its last reference
is durable, so new data written into it can never be seen through a stale
entry. Clusters holding metadata (header, L1, refcount table and blocks, L2
tables) are never handed out for data, whatever their refcount says. The
COPIED flag is set on every L1 and L2 entry boxdisk writes (all of them have
refcount 1), and fixed on old entries whose refcount is 1, so ``qemu-img check``
finds no COPIED errors.

Autoclear bits are cleared (durably) before the first change, as the spec
requires of a writer that does not maintain what they stand for. Images with
the corrupt or dirty bit, internal snapshots, persistent bitmaps, extended L2
entries, an external data file or encryption are refused.
"""

from __future__ import annotations

import os
import struct
import sys
from array import array
from collections import OrderedDict
from collections.abc import Iterator, MutableSequence
from types import TracebackType
from typing import Self

import attrs

from boxdisk._errors import (
    CorruptImageError,
    ImageIOError,
    InvalidArgumentError,
    UnsupportedFeatureError,
)
from boxdisk._locks import lock_for_write
from boxdisk._log import get_logger
from boxdisk.format import (
    EXT_BITMAPS,
    EXT_CRYPTO_HEADER,
    INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE,
    INCOMPAT_DIRTY,
    INCOMPAT_EXTL2,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    L2E_STD_RESERVED_MASK,
    MAX_L1_BYTES,
    MAX_REFTABLE_BYTES,
    MIN_HEADER_PROBE,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    L1Entry,
    Qcow2Header,
    cluster_size_of,
    compressed_geometry,
    decode_refcount_table_entry,
    l1_entries_for,
    pack_refcount_block,
    parse_header,
    unpack_refcount_block,
)

from ._base import Image, pread_exact
from ._compress import decompress_cluster, require_codec
from ._runs import RawRun, Run, RunKind, coalesce
from ._write import RawWriter, ReadBelow, WritableImage

__all__ = ["Qcow2Writer", "ReadBelow", "open_writable"]

log = get_logger(__name__)

# Cluster kinds of a standard L2 entry (QEMU's QCow2ClusterType).
_UNALLOC, _ZERO_PLAIN, _ZERO_ALLOC, _NORMAL, _COMPRESSED = range(5)

_COPIED = QCOW_OFLAG_COPIED
_ZERO = QCOW_OFLAG_ZERO
_L2_OFF = L2E_OFFSET_MASK
_LITTLE = sys.byteorder == "little"
_DEFAULT_CACHE = 32 * 1024 * 1024  # bytes of L2 tables / refcount blocks kept clean
_DIRTY_LIMIT = 32 * 1024 * 1024  # bytes of changed metadata held before an automatic flush
_MAX_FREES = 1 << 16  # pending refcount decrements before an automatic flush

# array typecodes for refcount widths of 8..64 bits (refcount_order 3..6).
_RC_CODES = {8 << i: next(c for c in "BHILQ" if array(c).itemsize == 1 << i) for i in range(4)}

Refblock = MutableSequence[int]


def _be64(words: array[int]) -> bytes:
    """Big-endian bytes of a slice of a native 64-bit table."""
    if _LITTLE:
        words = array("Q", words)
        words.byteswap()
    return words.tobytes()


def _ranges(indices: set[int]) -> Iterator[tuple[int, int]]:
    """Sorted ``[start, end)`` runs of consecutive integers."""
    start = end = -1
    for i in sorted(indices):
        if i == end:
            end += 1
            continue
        if end > start:
            yield start, end
        start, end = i, i + 1
    if end > start:
        yield start, end


class Qcow2Writer(WritableImage):
    """One qcow2 file opened read-write and locked: the writable top of a chain.

    Lifecycle: open from construction to :meth:`close` (idempotent; it flushes
    first). It holds QEMU's write locks on the file for its whole life. It is
    an :class:`Image`, so a :class:`~boxdisk.chain.BackingChain` reads through
    it (its runs reflect every write, flushed or not).

    ``read_below`` supplies what the layers under this image show, for
    copying up the rest of a partially written cluster; None means zeros.
    ``below_size`` is how far those layers reach (past it they read as zeros);
    None leaves that to ``read_below``, which must then pad with zeros itself.
    :meth:`attach_below` sets both later. Both must describe the backing the
    image will be read over, which is not the one its header names while a
    rebase is under way: "nothing below" lets zeroing skip or deallocate a
    cluster. An image whose header names a backing file, opened with neither,
    is taken to have something everywhere below it (zeroing never skips),
    though partial clusters still copy up zeros.
    """

    format = "qcow2"

    def __init__(self, path: str | os.PathLike[str], *, read_below: ReadBelow | None = None,
                 below_size: int | None = None, lock: bool = True,
                 cache_bytes: int = _DEFAULT_CACHE) -> None:
        p = os.fspath(path)
        try:
            fd = os.open(p, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            msg = f"cannot open image for writing: {exc.strerror}"
            raise ImageIOError(msg, path=p, field="path", value=p) from exc
        Image.__init__(self, p, fd)
        self._failed: str | None = None
        try:
            if lock:
                lock_for_write(fd, p)
            self._load(max(4, cache_bytes))
        except BaseException:
            self._fd = -1
            os.close(fd)
            raise
        if read_below is None and below_size is None and self.backing_file is not None:
            self._read_below: ReadBelow | None = None  # unknown: may hold data
            self._below_size = 1 << 63
        else:
            self.attach_below(read_below, below_size)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, lock: bool = True) -> Self:
        """Open ``path`` for writing (see the class docstring)."""
        return cls(path, lock=lock)

    def attach_below(self, read_below: ReadBelow | None, below_size: int | None = None) -> None:
        """Say what the layers under this image read (None: nothing, zeros).

        They are the layers the image's writes will be read over: for a
        rebase, the new backing (see the class docstring).
        """
        self._read_below = read_below
        if read_below is None:
            self._below_size = 0
        else:
            self._below_size = (1 << 63) if below_size is None else below_size

    # -- opening ------------------------------------------------------------------

    def _load(self, cache_bytes: int) -> None:
        fd, path = self._fd, self.path
        try:
            self.file_size = os.fstat(fd).st_size
            prefix = os.pread(fd, MIN_HEADER_PROBE, 0)
            cs = cluster_size_of(prefix, source=path)
            h = parse_header(os.pread(fd, cs, 0), source=path)
        except OSError as exc:
            msg = f"cannot read the header: {exc.strerror}"
            raise ImageIOError(msg, path=path, field="header") from exc
        self._refuse(h)
        require_codec(h.compression_type, path)
        self.header = h
        self.size = h.size
        self.cluster_size = cs
        self.cluster_bits = bits = h.cluster_bits
        self.backing_file = h.backing_file
        self.backing_format = h.backing_format
        self._v3 = h.version >= 3
        self._l2n = cs // 8
        self._csh, self._cmask, self._coff_mask = compressed_geometry(bits)
        self._rc_order = h.refcount_order
        self._rc_max = (1 << h.refcount_bits) - 1
        self._rc_per = cs * 8 >> h.refcount_order
        self._rc_code = _RC_CODES.get(h.refcount_bits)
        self._cache_max = max(4, cache_bytes // cs)
        self._dirty_max = max(4, _DIRTY_LIMIT // cs)
        self._file_end = self.file_size
        self._synced_end = self.file_size  # the file length known to be durable
        self._zeros = bytes(cs)

        # Host clusters holding metadata: never handed out, never written as data.
        self._meta: set[int] = {0}
        l1_clusters = -(-h.l1_size * 8 // cs)
        rt_clusters = h.refcount_table_clusters
        self._fixed_meta(h.l1_table_offset, l1_clusters, "L1 table")
        self._fixed_meta(h.refcount_table_offset, rt_clusters, "refcount table")

        l1_raw = self._read_exact(h.l1_table_offset, h.l1_size * 8, "L1 table")
        self._l1 = array("Q")
        self._l1.frombytes(l1_raw)
        rt_raw = self._read_exact(h.refcount_table_offset, rt_clusters * cs, "refcount table")
        self._rt = array("Q")
        self._rt.frombytes(rt_raw)
        if _LITTLE:
            self._l1.byteswap()
            self._rt.byteswap()
        for i, raw in enumerate(self._rt):
            if raw:
                where = f"refcount table entry {i}"
                off = decode_refcount_table_entry(raw, cluster_size=cs, source=path, where=where)
                self._claim_meta(off, where, "refcount block")
                self._rt[i] = off
        for i, raw in enumerate(self._l1):
            if raw:
                where = f"L1 entry {i}"
                entry = L1Entry.decode(raw, cluster_size=cs, source=path, where=where)
                if entry.l2_offset:
                    self._claim_meta(entry.l2_offset, where, "L2 table")

        self._l2c: OrderedDict[int, array[int]] = OrderedDict()  # clean L2 tables
        self._l2d: dict[int, array[int]] = {}  # changed L2 tables
        self._l2d_idx: dict[int, set[int] | None] = {}  # changed entries (None: new table)
        self._l1_dirty: set[int] = set()
        self._rbc: OrderedDict[int, Refblock] = OrderedDict()  # clean refcount blocks
        self._rbd: dict[int, Refblock] = {}  # changed refcount blocks
        self._rt_dirty: set[int] = set()
        # A moved refcount table not yet in the header: (first cluster, clusters).
        self._rt_moved: tuple[int, int] | None = None
        self._frees: list[int] = []  # clusters to decref once nothing references them
        self._end = max(-(-self.file_size // cs), self._last_counted() + 1)
        # Clusters the file must hold: its own, and those handed out since. Refcounts
        # past the end of the file (which QEMU ignores) do not make the file grow.
        self._alloc_end = -(-self.file_size // cs)
        self._hint = 1  # no cluster below this one is free

        stray = h.autoclear_features
        if stray and self._v3:
            # Spec, "autoclear_features": a writer that does not maintain a feature must
            # clear its bit before writing, and every header this writer rewrites later
            # (size, L1 and refcount table pointers, backing name) starts from this one.
            # boxdisk maintains none of them: bit 0 (bitmaps extension) would say the
            # persistent bitmaps still match the data, which no write here keeps true
            # (images with the bitmaps extension are refused anyway, so the bit alone is
            # stale); bit 1 (raw external data file) belongs to data-file images, which
            # are refused; unknown bits must go whatever they mean.
            self._pwrite(bytes(8), 88)
            self._fsync()
            self.header = attrs.evolve(h, autoclear_features=0)
            log.info("autoclear_cleared", path=path, old=stray)

    def _refuse(self, h: Qcow2Header) -> None:
        path, inc = self.path, h.incompatible_features
        if inc & INCOMPAT_CORRUPT:
            msg = "image has the corrupt bit set; refusing to write (repair it first)"
            raise CorruptImageError(msg, path=path, field="incompatible_features", value=inc)
        if inc & INCOMPAT_DIRTY:
            msg = "image is marked dirty (its refcounts may be stale); repair it before writing"
            raise CorruptImageError(msg, path=path, field="incompatible_features", value=inc)
        if inc & INCOMPAT_DATA_FILE or h.data_file is not None:
            msg = "images with an external data file are not supported"
            raise UnsupportedFeatureError(msg, path=path, field="incompatible_features",
                                          value=inc)
        if inc & INCOMPAT_EXTL2:
            msg = "writing images with extended L2 entries (subclusters) is not supported"
            raise UnsupportedFeatureError(msg, path=path, field="incompatible_features",
                                          value=inc)
        if h.crypt_method or h.extension(EXT_CRYPTO_HEADER) is not None:
            msg = f"encrypted images (crypt_method {h.crypt_method}) are not supported"
            raise UnsupportedFeatureError(msg, path=path, field="crypt_method",
                                          value=h.crypt_method)
        if h.nb_snapshots:
            msg = f"writing images with internal snapshots ({h.nb_snapshots}) is not supported"
            raise UnsupportedFeatureError(msg, path=path, field="nb_snapshots",
                                          value=h.nb_snapshots)
        if h.extension(EXT_BITMAPS) is not None:
            msg = "writing images with persistent dirty bitmaps is not supported"
            raise UnsupportedFeatureError(msg, path=path, field="extensions", value=EXT_BITMAPS)

    def _read_exact(self, offset: int, length: int, what: str) -> bytes:
        if offset + length > self.file_size:  # before any buffer is sized by ``length``
            msg = f"{what} at 0x{offset:x} ({length} bytes) runs past the end of the file"
            raise CorruptImageError(msg, path=self.path, field=what, value=offset)
        return pread_exact(self._fd, self.path, offset, length, what)

    def _fixed_meta(self, offset: int, clusters: int, what: str) -> None:
        first = offset // self.cluster_size
        for c in range(first, first + clusters):
            if c in self._meta:
                msg = f"{what} at 0x{offset:x} overlaps other metadata"
                raise CorruptImageError(msg, path=self.path, field=what, value=offset)
            self._meta.add(c)

    def _claim_meta(self, offset: int, where: str, what: str) -> None:
        cs = self.cluster_size
        if offset + cs > self.file_size:
            msg = f"{where}: {what} at 0x{offset:x} lies past the end of the file"
            raise CorruptImageError(msg, path=self.path, field=where, value=offset)
        c = offset // cs
        if c in self._meta:
            msg = f"{where}: {what} at 0x{offset:x} overlaps other metadata"
            raise CorruptImageError(msg, path=self.path, field=where, value=offset)
        self._meta.add(c)

    def _last_counted(self) -> int:
        """The highest cluster index with a non-zero refcount (0 if none)."""
        per = self._rc_per
        for bi in range(len(self._rt) - 1, -1, -1):
            off = self._rt[bi]
            if not off:
                continue
            block = self._block(off)
            if isinstance(block, array):
                # The element holding the last non-zero byte (native order, any width).
                used = len(block.tobytes().rstrip(b"\0"))
                if used:
                    return bi * per + (used - 1) // block.itemsize
                continue
            for ri in range(per - 1, -1, -1):
                if block[ri]:
                    return bi * per + ri
        return 0

    # -- raw I/O (every change to the file goes through these three) -----------------
    # A failed write, fsync or truncate stops the writer (``_failed``): a data write maps
    # its cluster before writing it, so metadata written after a failed one (even by
    # close) could point at bytes that never reached the file.

    def _pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):  # a filling disk first writes less than asked, then fails
            try:
                n = os.pwrite(self._fd, view[done:], offset + done)
            except OSError as exc:
                msg = f"cannot write {len(view)} bytes at 0x{offset:x}: {exc.strerror}"
                self._failed = msg
                raise ImageIOError(msg, path=self.path, field="host_offset",
                                   value=offset) from exc
            if n <= 0:
                msg = f"short write at 0x{offset:x} ({done} of {len(view)} bytes)"
                self._failed = msg
                raise ImageIOError(msg, path=self.path, field="host_offset", value=offset)
            done += n
            self._file_end = max(self._file_end, offset + done)

    def _fsync(self) -> None:
        end = self._file_end
        try:
            os.fsync(self._fd)
        except OSError as exc:
            msg = f"fsync failed: {exc.strerror}"
            self._failed = msg
            raise ImageIOError(msg, path=self.path, field="fsync") from exc
        self._synced_end = end

    def _truncate(self, length: int) -> None:
        try:
            os.ftruncate(self._fd, length)
        except OSError as exc:
            msg = f"cannot set the file length to {length}: {exc.strerror}"
            self._failed = msg
            raise ImageIOError(msg, path=self.path, field="file_size", value=length) from exc
        self._file_end = length

    def _pread_host(self, length: int, offset: int) -> bytes:
        """Host bytes; past the end of the file they read as zeros."""
        try:
            data = os.pread(self._fd, length, offset)
        except OSError as exc:
            msg = f"cannot read {length} bytes at 0x{offset:x}: {exc.strerror}"
            raise ImageIOError(msg, path=self.path, field="host_offset", value=offset) from exc
        return data if len(data) == length else data + bytes(length - len(data))

    # -- refcounts ------------------------------------------------------------------

    def _load_block(self, off: int) -> Refblock:
        raw = self._read_exact(off, self.cluster_size, "refcount block")
        code = self._rc_code
        if code is None:
            return unpack_refcount_block(raw, self._rc_order)
        block = array(code)
        block.frombytes(raw)
        if _LITTLE and block.itemsize > 1:
            block.byteswap()
        return block

    def _pack_block(self, block: Refblock) -> bytes:
        if isinstance(block, array):
            if _LITTLE and block.itemsize > 1:
                block = array(block.typecode, block)
                block.byteswap()
            return block.tobytes()
        return pack_refcount_block(list(block), self._rc_order, self.cluster_size)

    def _block(self, off: int) -> Refblock:
        block = self._rbd.get(off)
        if block is not None:
            return block
        block = self._rbc.get(off)
        if block is None:
            block = self._load_block(off)
            self._rbc[off] = block
            if len(self._rbc) > self._cache_max:
                self._rbc.popitem(last=False)
        return block

    def refcount(self, cluster_index: int) -> int:
        """The refcount of a host cluster, as this writer currently sees it."""
        bi, ri = divmod(cluster_index, self._rc_per)
        if bi >= len(self._rt) or not self._rt[bi]:
            return 0
        return self._block(self._rt[bi])[ri]

    def _block_w(self, bi: int) -> Refblock:
        """Refcount block ``bi`` for changing (created, and counted, when missing)."""
        if bi >= len(self._rt):
            self._grow_reftable(bi)
        off = self._rt[bi]
        if off:
            block = self._rbd.get(off)
            if block is None:
                block = self._rbc.pop(off, None)
                if block is None:
                    block = self._load_block(off)
                self._rbd[off] = block
            return block
        c = self._take_free()
        off = c * self.cluster_size
        block = array(self._rc_code, bytes(self.cluster_size)) if self._rc_code else \
            [0] * self._rc_per
        self._rbd[off] = block
        self._rt[bi] = off
        self._rt_dirty.add(bi)
        self._meta.add(c)
        self._change(c, 1)  # the new block may have to count itself
        return block

    def _change(self, cluster: int, delta: int) -> int:
        bi, ri = divmod(cluster, self._rc_per)
        block = self._block_w(bi)
        value = block[ri] + delta
        if not 0 <= value <= self._rc_max:
            msg = (f"refcount of host cluster {cluster} would become {value} "
                   f"(refcount table entry {bi})")
            raise CorruptImageError(msg, path=self.path, field=f"refcount[{cluster}]",
                                    value=block[ri])
        block[ri] = value
        return value

    def _grow_reftable(self, needed: int) -> None:
        """Move the refcount table to new clusters past the end, with room to spare."""
        cs = self.cluster_size
        old_entries = len(self._rt)
        want = max(needed + 1, old_entries * 2, (self._end + 64) // self._rc_per + 2)
        clusters = -(-want * 8 // cs)
        if clusters * cs > MAX_REFTABLE_BYTES:
            msg = "the image would need a refcount table over QEMU's 8 MiB limit"
            raise UnsupportedFeatureError(msg, path=self.path, field="refcount_table_clusters",
                                          value=clusters)
        if self._rt_moved is not None:
            # Moved twice in one batch: the first new table never reached the header.
            first, count = self._rt_moved
            self._frees.extend(range(first, first + count))
        start = self._end
        self._end += clusters
        self._alloc_end = self._end
        self._rt.extend(array("Q", bytes(8 * (clusters * cs // 8 - old_entries))))
        self._meta.update(range(start, start + clusters))
        self._rt_moved = (start, clusters)
        for c in range(start, start + clusters):
            self._change(c, 1)

    def _find_free(self, start: int) -> int:
        """The first cluster at or after ``start`` with refcount 0 (``_end`` if none)."""
        end, per, rt, meta = self._end, self._rc_per, self._rt, self._meta
        c = max(start, 1)
        while c < end:
            bi, ri = divmod(c, per)
            off = rt[bi] if bi < len(rt) else 0
            if not off:
                if c not in meta:
                    return c
                c += 1
                continue
            block = self._block(off)
            try:
                j = block.index(0, ri, min(per, ri + end - c))
            except ValueError:
                c = (bi + 1) * per
                continue
            c = bi * per + j
            if c not in meta:
                return c
            c += 1
        return end

    def _take_free(self) -> int:
        """A free cluster, not yet counted: the lowest freed one, else one past the end."""
        c = self._find_free(self._hint)
        self._hint = c + 1
        if c >= self._end:
            self._end = c + 1
        self._alloc_end = max(self._alloc_end, c + 1)
        return c

    def _alloc(self) -> int:
        """A new data cluster (counted); returns its host offset."""
        c = self._take_free()
        self._change(c, 1)
        return c * self.cluster_size

    # -- L1 / L2 --------------------------------------------------------------------

    def _table(self, l1i: int) -> array[int] | None:
        """L2 table ``l1i`` for reading (None where the L1 entry is empty)."""
        off = self._l1[l1i] & L1E_OFFSET_MASK if l1i < len(self._l1) else 0
        if not off:
            return None
        table = self._l2d.get(off)
        if table is not None:
            return table
        table = self._l2c.get(off)
        if table is None:
            table = array("Q")
            table.frombytes(self._read_exact(off, self.cluster_size, f"L2 table of L1 entry {l1i}"))
            if _LITTLE:
                table.byteswap()
            self._l2c[off] = table
            if len(self._l2c) > self._cache_max:
                self._l2c.popitem(last=False)
        return table

    def _table_w(self, l1i: int) -> tuple[int, array[int]]:
        """L2 table ``l1i`` for changing: (host offset, table); created when missing."""
        if l1i >= len(self._l1):
            msg = f"guest offset needs L1 entry {l1i}, past the {len(self._l1)}-entry L1 table"
            raise CorruptImageError(msg, path=self.path, field="l1_size", value=len(self._l1))
        raw = self._l1[l1i]
        off = raw & L1E_OFFSET_MASK
        if not off:
            c = self._take_free()
            self._meta.add(c)
            self._change(c, 1)
            off = c * self.cluster_size
            table = array("Q", self._zeros)
            self._l2d[off] = table
            self._l2d_idx[off] = None
            self._l1[l1i] = off | _COPIED
            self._l1_dirty.add(l1i)
            return off, table
        if not raw & _COPIED:
            rc = self.refcount(off // self.cluster_size)
            if rc != 1:
                msg = (f"L1 entry {l1i}: L2 table at 0x{off:x} has refcount {rc}; "
                       f"shared L2 tables (internal snapshots) are not written")
                raise CorruptImageError(msg, path=self.path, field=f"L1 entry {l1i}", value=raw)
            self._l1[l1i] = raw | _COPIED
            self._l1_dirty.add(l1i)
        dirty = self._l2d.get(off)
        if dirty is not None:
            return off, dirty
        loaded = self._table(l1i)
        assert loaded is not None
        self._l2c.pop(off, None)
        self._l2d[off] = loaded
        self._l2d_idx[off] = set()
        return off, loaded

    def _set(self, off: int, table: array[int], i: int, raw: int) -> None:
        table[i] = raw
        idx = self._l2d_idx[off]
        if idx is not None:
            idx.add(i)

    def _decode(self, raw: int, gc: int) -> tuple[int, int]:
        """(kind, host offset) of a non-zero L2 entry of guest cluster ``gc``, validated."""
        if raw & QCOW_OFLAG_COMPRESSED:
            if raw & _COPIED:
                self._bad(raw, gc, "COPIED flag on a compressed cluster")
            coff = raw & self._coff_mask
            if coff < self.cluster_size or coff >= max(self._file_end, self.file_size):
                self._bad(raw, gc, f"compressed data at 0x{coff:x} outside the file")
            return _COMPRESSED, coff
        off = raw & _L2_OFF
        if raw & L2E_STD_RESERVED_MASK:
            self._bad(raw, gc, "reserved bits set")
        if off & (self.cluster_size - 1):
            self._bad(raw, gc, f"host offset 0x{off:x} not cluster-aligned")
        if raw & _ZERO:
            if not self._v3:
                self._bad(raw, gc, "zero flag in a version 2 image")
            kind = _ZERO_ALLOC if off else _ZERO_PLAIN
        elif off:
            kind = _NORMAL
        else:
            return _UNALLOC, 0
        if off:
            c = off >> self.cluster_bits
            if c in self._meta:
                self._bad(raw, gc, f"data cluster 0x{off:x} overlaps metadata")
            if c >= self._end:
                self._bad(raw, gc, f"data cluster 0x{off:x} lies past the end of the file")
        return kind, off

    def _bad(self, raw: int, gc: int, what: str) -> None:
        l1i, l2i = divmod(gc, self._l2n)
        where = f"L2 entry {l1i}/{l2i}"
        msg = f"{where}: {what} (raw 0x{raw:016x})"
        raise CorruptImageError(msg, path=self.path, field=where, value=raw)

    def _entry(self, gc: int) -> tuple[int, int, int]:
        """(raw, kind, host offset) of guest cluster ``gc``."""
        table = self._table(gc // self._l2n)
        raw = 0 if table is None else table[gc % self._l2n]
        if not raw:
            return 0, _UNALLOC, 0
        kind, host = self._decode(raw, gc)
        return raw, kind, host

    def _free_entry(self, kind: int, host: int, raw: int) -> None:
        """Queue the decrements for the host clusters an entry being replaced held."""
        if kind in (_NORMAL, _ZERO_ALLOC):
            self._frees.append(host >> self.cluster_bits)
        elif kind == _COMPRESSED:
            # A compressed cluster holds a reference on every host cluster it touches
            # (QEMU's qcow2_parse_compressed_l2_entry and check_refcounts_l2).
            sectors = ((raw >> self._csh) & self._cmask) + 1
            size = sectors * 512 - (host & 511)
            first = host >> self.cluster_bits
            last = (host + size - 1) >> self.cluster_bits
            self._frees.extend(range(first, last + 1))

    # -- the guest view ---------------------------------------------------------------

    def runs(self, offset: int = 0, length: int | None = None, *,
             precise: bool = True) -> Iterator[Run]:
        """Runs of this file's own clusters, as they are now (flushed or not)."""
        length = Image._check_range(self, offset, length)
        self._check_open()
        return coalesce(self._raw_runs(offset, offset + length))

    def _raw_runs(self, start: int, end: int) -> Iterator[RawRun]:
        bits, cs, l2n = self.cluster_bits, self.cluster_size, self._l2n
        pos = start
        while pos < end:
            l1i = (pos >> bits) // l2n
            seg_end = min(end, ((l1i + 1) * l2n) << bits)
            table = self._table(l1i)
            if table is None:
                yield (RunKind.UNALLOCATED, pos, seg_end - pos, None, 0)
                pos = seg_end
                continue
            base = l1i * l2n
            while pos < seg_end:
                gc = pos >> bits
                n = min(seg_end, (gc + 1) << bits) - pos
                raw = table[gc - base]
                if not raw:
                    yield (RunKind.UNALLOCATED, pos, n, None, 0)
                else:
                    kind, host = self._decode(raw, gc)
                    within = pos & (cs - 1)
                    if kind == _NORMAL:
                        yield (RunKind.DATA, pos, n, host + within, 0)
                    elif kind == _ZERO_PLAIN:
                        yield (RunKind.ZERO, pos, n, None, 0)
                    elif kind == _ZERO_ALLOC:
                        yield (RunKind.ZERO, pos, n, host + within, 0)
                    elif kind == _COMPRESSED:
                        sectors = ((raw >> self._csh) & self._cmask) + 1
                        yield (RunKind.COMPRESSED, pos, n, host, sectors * 512 - (host & 511))
                    else:
                        yield (RunKind.UNALLOCATED, pos, n, None, 0)
                pos += n

    def read_compressed(self, run: Run) -> bytes:
        """The whole guest cluster a COMPRESSED run lies in, inflated."""
        assert run.host_offset is not None
        coff = run.host_offset
        n = max(0, min(run.compressed_size, max(self._file_end, self.file_size) - coff))
        data = self._pread_host(n, coff)
        gc = run.start >> self.cluster_bits
        return decompress_cluster(data, self.header.compression_type, self.cluster_size,
                                  path=self.path,
                                  where=f"compressed cluster of guest cluster {gc}")

    def _below(self, offset: int, length: int) -> bytes:
        """What the layers below show at ``[offset, offset + length)`` (zeros past them)."""
        end = min(offset + length, self._below_size)
        if self._read_below is None or end <= offset:
            return bytes(length)
        data = self._read_below(offset, end - offset)
        return data if len(data) == length else data + bytes(length - len(data))

    def _content(self, gc: int, kind: int, host: int, raw: int) -> bytes:
        """The whole guest cluster ``gc`` as the guest sees it now."""
        cs = self.cluster_size
        if kind == _NORMAL:
            return self._pread_host(cs, host)
        if kind == _UNALLOC:
            return self._below(gc * cs, cs)
        if kind == _COMPRESSED:
            sectors = ((raw >> self._csh) & self._cmask) + 1
            run = Run(RunKind.COMPRESSED, gc * cs, cs, host, sectors * 512 - (host & 511))
            return self.read_compressed(run)
        return self._zeros

    def _reads_zero(self, kind: int, gc: int) -> bool:
        """Whether guest cluster ``gc`` reads as zeros without reading anything."""
        if kind in (_ZERO_PLAIN, _ZERO_ALLOC):
            return True
        return kind == _UNALLOC and gc * self.cluster_size >= self._below_size

    def read(self, offset: int, length: int) -> bytes:
        """Guest bytes at ``offset``: this image over what ``read_below`` supplies."""
        length = Image._check_range(self, offset, length)
        buf = bytearray(length)
        view = memoryview(buf)
        for run in self.runs(offset, length):
            pos = run.start - offset
            seg = view[pos : pos + run.length]
            if run.kind is RunKind.UNALLOCATED:
                if self._read_below is not None:
                    seg[:] = self._below(run.start, run.length)
            else:
                self.read_run_into(run, seg)
        return bytes(buf)

    # -- writing ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._fd < 0:
            msg = "image writer is closed"
            raise InvalidArgumentError(msg, path=self.path, field="fd")
        if self._failed is not None:
            msg = f"an earlier write to the image failed ({self._failed}); reopen the image"
            raise ImageIOError(msg, path=self.path, field="state")

    def _check_write(self, offset: int, length: int) -> None:
        self._check_open()
        if offset < 0 or length < 0 or offset + length > self.size:
            msg = f"range [{offset}, {offset}+{length}) outside the {self.size}-byte disk"
            raise InvalidArgumentError(msg, path=self.path, field="offset", value=offset)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write guest bytes; a partly written cluster copies the rest up from below."""
        view = memoryview(data).cast("B")
        self._check_write(offset, len(view))
        self._write(offset, view)
        self._maybe_commit()

    def _write(self, offset: int, view: memoryview) -> None:
        cs, bits, l2n = self.cluster_size, self.cluster_bits, self._l2n
        pos, end = offset, offset + len(view)
        # One pending pwrite, grown while guest and host bytes stay contiguous.
        p_host = p_src = p_len = 0
        while pos < end:
            gc = pos >> bits
            within = pos & (cs - 1)
            take = min(cs - within, end - pos)
            src = pos - offset
            l1i, l2i = divmod(gc, l2n)
            off, table = self._table_w(l1i)
            raw = table[l2i]
            kind, host = self._decode(raw, gc) if raw else (_UNALLOC, 0)
            if kind == _NORMAL and (raw & _COPIED or self._own(host, gc, raw, off, table, l2i)):
                target = host + within
            else:
                if kind == _ZERO_ALLOC and (raw & _COPIED or
                                            self.refcount(host >> bits) == 1):
                    new, keep = host, True  # the preallocated cluster takes the data
                else:
                    new, keep = self._alloc(), False
                if take < cs:
                    if p_len:
                        self._pwrite(view[p_src : p_src + p_len], p_host)
                        p_len = 0
                    self._write_part(view[src : src + take], gc, within, new, kind, host, raw)
                    self._set(off, table, l2i, new | _COPIED)
                    if not keep:
                        self._free_entry(kind, host, raw)
                    pos += take
                    continue
                self._set(off, table, l2i, new | _COPIED)
                if not keep:
                    self._free_entry(kind, host, raw)
                target = new
            if p_len and p_host + p_len == target and p_src + p_len == src:
                p_len += take
            else:
                if p_len:
                    self._pwrite(view[p_src : p_src + p_len], p_host)
                p_host, p_src, p_len = target, src, take
            pos += take
        if p_len:
            self._pwrite(view[p_src : p_src + p_len], p_host)

    def _write_part(self, chunk: memoryview, gc: int, within: int, new: int, kind: int,
                    host: int, raw: int) -> None:
        """Fill host cluster ``new`` with guest cluster ``gc``'s bytes, ``chunk`` at ``within``."""
        if self._reads_zero(kind, gc):
            if new >= self._file_end:
                # Never written, so it reads as zeros already (a hole): write the chunk only.
                self._pwrite(chunk, new + within)
                return
            buf = bytearray(self.cluster_size)
        else:
            buf = bytearray(self._content(gc, kind, host, raw))
        buf[within : within + len(chunk)] = chunk
        self._pwrite(buf, new)

    def _own(self, host: int, gc: int, raw: int, off: int, table: array[int], l2i: int) -> bool:
        """Whether a NORMAL cluster without COPIED may be written in place (refcount 1).

        QEMU's check calls a refcount-1 cluster without COPIED an error, so the
        flag is set on the way.
        """
        rc = self.refcount(host >> self.cluster_bits)
        if rc == 0:
            self._bad(raw, gc, f"data cluster 0x{host:x} has refcount 0")
        if rc != 1:
            return False  # shared: copy on write
        self._set(off, table, l2i, raw | _COPIED)
        return True

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make a range read as zeros: the v3 zero flag on whole clusters, bytes elsewhere."""
        self._check_write(offset, length)
        self._zero_range(offset, offset + length)
        self._maybe_commit()

    def _zero_range(self, start: int, end: int) -> None:
        cs, bits, l2n = self.cluster_size, self.cluster_bits, self._l2n
        pos = start
        while pos < end:
            gc = pos >> bits
            within = pos & (cs - 1)
            take = min(cs - within, end - pos)
            # The last cluster counts as whole when the range runs to the end of the disk.
            whole = within == 0 and (take == cs or pos + take >= self.size)
            if not whole:
                self._write(pos, memoryview(self._zeros)[:take])
                pos += take
                continue
            l1i, l2i = divmod(gc, l2n)
            raw, kind, host = self._entry(gc)
            if kind == _ZERO_PLAIN or (kind == _UNALLOC and self._reads_zero(kind, gc)):
                pos += take
                continue
            if self._v3:
                off, table = self._table_w(l1i)
                self._set(off, table, l2i, _ZERO)
                self._free_entry(kind, host, raw)
            elif gc * cs >= self._below_size:
                # v2 has no zero flag, but nothing shows through below: deallocate.
                off, table = self._table_w(l1i)
                self._set(off, table, l2i, 0)
                self._free_entry(kind, host, raw)
            else:
                self._write(pos, memoryview(self._zeros)[:take])
            pos += take

    def discard(self, offset: int, length: int) -> None:
        """Drop the whole clusters inside the range, as QEMU's discard does.

        Afterwards they read as zeros in a version 3 image; in a version 2
        image (no zero flag) they read what the layers below hold. Parts of
        clusters are left as they are: discard is advisory.
        """
        self._check_write(offset, length)
        cs = self.cluster_size
        first = -(-offset // cs)
        last = (offset + length) // cs
        if length and offset + length == self.size:
            last = -(-self.size // cs)
        for gc in range(first, last):
            raw, kind, host = self._entry(gc)
            l1i, l2i = divmod(gc, self._l2n)
            if self._v3:
                if kind == _ZERO_PLAIN or (kind == _UNALLOC and self._reads_zero(kind, gc)):
                    continue
                new = _ZERO
            else:
                if not raw:
                    continue
                new = 0
            off, table = self._table_w(l1i)
            self._set(off, table, l2i, new)
            self._free_entry(kind, host, raw)
        self._maybe_commit()

    # -- committing metadata ----------------------------------------------------------

    def _maybe_commit(self) -> None:
        if (len(self._l2d) + len(self._rbd) > self._dirty_max
                or len(self._frees) > _MAX_FREES):
            self._commit()

    def _commit(self) -> None:
        """Write batched metadata in crash-safe order (see the module docstring)."""
        if not (self._l2d or self._l1_dirty or self._rbd or self._rt_dirty or self._frees
                or self._rt_moved):
            return
        self._check_open()
        try:
            self._commit_steps()
        except BaseException as exc:
            self._failed = self._failed or type(exc).__name__
            raise

    def _commit_steps(self) -> None:
        cs = self.cluster_size
        # 1. New clusters exist, durably; then new L2 tables, changed refcount blocks,
        #    a moved table.
        if self._file_end < self._alloc_end * cs:
            self._truncate(self._alloc_end * cs)
        if self._synced_end < self._alloc_end * cs:
            self._fsync()
        for off, idx in self._l2d_idx.items():
            if idx is None:
                self._pwrite(_be64(self._l2d[off]), off)
        for off, block in self._rbd.items():
            self._pwrite(self._pack_block(block), off)
        moved = self._rt_moved
        if moved is not None:
            self._pwrite(_be64(self._rt), moved[0] * cs)
        self._fsync()
        # 2. The refcount table reaches the new blocks.
        if moved is not None:
            start, clusters = moved
            self._pwrite(struct.pack(">QI", start * cs, clusters), 48)
            self._fsync()
            old = self.header
            first = old.refcount_table_offset // cs
            self._frees.extend(range(first, first + old.refcount_table_clusters))
            self.header = attrs.evolve(old, refcount_table_offset=start * cs,
                                       refcount_table_clusters=clusters)
            self._rt_moved = None
        elif self._rt_dirty:
            rt_off = self.header.refcount_table_offset
            for a, b in _ranges(self._rt_dirty):
                self._pwrite(_be64(self._rt[a:b]), rt_off + a * 8)
            self._fsync()
        self._rt_dirty.clear()
        # 3. L2 entries of tables that were already referenced.
        wrote = False
        for off, idx in self._l2d_idx.items():
            if not idx:
                continue
            table = self._l2d[off]
            if len(idx) * 4 > self._l2n:
                self._pwrite(_be64(table), off)
            else:
                for a, b in _ranges(idx):
                    self._pwrite(_be64(table[a:b]), off + a * 8)
            wrote = True
        for off, table in self._l2d.items():
            self._l2c[off] = table
        self._l2d.clear()
        self._l2d_idx.clear()
        while len(self._l2c) > self._cache_max:
            self._l2c.popitem(last=False)
        # 4. L1 entries.
        if self._l1_dirty:
            l1_off = self.header.l1_table_offset
            for a, b in _ranges(self._l1_dirty):
                self._pwrite(_be64(self._l1[a:b]), l1_off + a * 8)
            self._l1_dirty.clear()
            wrote = True
        for off, block in self._rbd.items():
            self._rbc[off] = block
        self._rbd.clear()
        # 5. Drop the references nothing points at any more.
        if self._frees:
            if wrote:
                self._fsync()
            frees, self._frees = self._frees, []
            for c in frees:
                if self._change(c, -1) == 0:
                    self._meta.discard(c)
                    self._hint = min(self._hint, c)
            for off, block in self._rbd.items():
                self._pwrite(self._pack_block(block), off)
                self._rbc[off] = block
            self._rbd.clear()
        while len(self._rbc) > self._cache_max:
            self._rbc.popitem(last=False)

    def flush(self) -> None:
        """Make every write so far durable (metadata in crash-safe order, then fsync)."""
        if self._fd < 0:
            return
        self._commit()
        self._fsync()

    # -- whole-image changes ----------------------------------------------------------

    def resize(self, new_size: int) -> None:
        """Change the virtual size: grow (the L1 table too), or shrink an unused tail.

        Growing where the layers below reach past the old end first zeroes
        that range, as QEMU's truncate does, so old backing data never
        appears; a version 2 image (no zero flag) is then refused, as QEMU
        refuses it (UnsupportedFeatureError). Shrinking is refused
        (InvalidArgumentError) when a cluster past the new end holds data; the
        tail's now unreachable clusters are freed. Durable on return.
        """
        self._check_open()
        if not isinstance(new_size, int) or new_size < 0 or new_size % 512:
            msg = f"new size {new_size!r} is not a non-negative multiple of 512"
            raise InvalidArgumentError(msg, path=self.path, field="size", value=new_size)
        old = self.size
        if new_size == old:
            return
        self._commit()
        if new_size < old:
            self._shrink(new_size)
        else:
            self._grow(new_size)
        self.flush()
        log.info("image_resized", path=self.path, old_size=old, new_size=new_size)

    def _set_size(self, new_size: int) -> None:
        self._pwrite(new_size.to_bytes(8, "big"), 24)
        self._fsync()
        self.header = attrs.evolve(self.header, size=new_size)
        self.size = new_size

    def _grow(self, new_size: int) -> None:
        cs = self.cluster_size
        needed = l1_entries_for(new_size, self.cluster_bits)
        if needed * 8 > MAX_L1_BYTES:
            msg = f"new size {new_size} needs an L1 table over QEMU's 32 MiB limit"
            raise InvalidArgumentError(msg, path=self.path, field="size", value=new_size)
        if not self._v3 and self._below_size > self.size:
            # QEMU: "Failed to zero out new clusters: Operation not supported".
            msg = ("cannot grow a version 2 image over a longer backing file: without the "
                   "zero flag the backing file's bytes past the old end would show")
            raise UnsupportedFeatureError(msg, path=self.path, field="size", value=new_size)
        if needed > len(self._l1):
            # QEMU's qcow2_grow_l1_table: the new table and its refcounts are durable
            # before the header switches to it; the old table is freed afterwards.
            clusters = -(-needed * 8 // cs)
            start = self._end
            self._end += clusters
            self._alloc_end = self._end
            self._meta.update(range(start, start + clusters))
            for c in range(start, start + clusters):
                self._change(c, 1)
            self._commit()
            l1 = array("Q", self._l1)
            l1.extend(array("Q", bytes(8 * (needed - len(l1)))))
            self._pwrite(_be64(l1), start * cs)
            self._fsync()
            self._pwrite(struct.pack(">IQ", needed, start * cs), 36)
            self._fsync()
            h = self.header
            first = h.l1_table_offset // cs
            self._frees.extend(range(first, first + -(-h.l1_size * 8 // cs)))
            self.header = attrs.evolve(h, l1_size=needed, l1_table_offset=start * cs)
            self._l1 = l1
        old = self.size
        reach = min(new_size, self._below_size)
        if reach > old:
            # Zero what the layers below would show before the size makes it visible.
            self._zero_range_beyond(old, reach, new_size)
            self._commit()
        self._set_size(new_size)

    def _zero_range_beyond(self, start: int, end: int, new_size: int) -> None:
        saved = self.size
        self.size = new_size  # the range lies past the current end: widen bounds meanwhile
        try:
            self._zero_range(start, end)
        finally:
            self.size = saved

    def _shrink(self, new_size: int) -> None:
        cs, l2n = self.cluster_size, self._l2n
        first = -(-new_size // cs)  # first guest cluster wholly past the new end
        last = -(-self.size // cs)
        for l1i in range(new_size // cs // l2n, min(len(self._l1), -(-last // l2n))):
            table = self._table(l1i)
            if table is None:
                continue
            for gc in range(max(new_size // cs, l1i * l2n), min(last, (l1i + 1) * l2n)):
                raw = table[gc - l1i * l2n]
                if not raw:
                    continue
                kind, host = self._decode(raw, gc)
                if kind not in (_NORMAL, _COMPRESSED):
                    continue
                if gc < first:
                    # Straddles the new end: only the part cut off must hold zeros.
                    tail = self._content(gc, kind, host, raw)[new_size - gc * cs:]
                    if tail.count(0) == len(tail):
                        continue
                msg = (f"cannot shrink to {new_size}: guest cluster {gc} (offset {gc * cs}) "
                       f"holds data past the new end")
                raise InvalidArgumentError(msg, path=self.path, field="size", value=new_size)
        # The size goes first: once it is durable nothing past it is visible, and the
        # entries there can be dropped in any order.
        self._set_size(new_size)
        self._drop_from(first)
        self._commit()

    def _drop_from(self, first: int) -> None:
        """Unmap every guest cluster from ``first`` on; free L2 tables wholly past it."""
        l2n = self._l2n
        for l1i in range(first // l2n, len(self._l1)):
            raw_l1 = self._l1[l1i]
            table = self._table(l1i)
            if table is None:
                continue
            base = l1i * l2n
            if base >= first:
                for i in range(l2n):
                    raw = table[i]
                    if raw:
                        kind, host = self._decode(raw, base + i)
                        self._free_entry(kind, host, raw)
                off = raw_l1 & L1E_OFFSET_MASK
                self._l1[l1i] = 0
                self._l1_dirty.add(l1i)
                self._frees.append(off // self.cluster_size)
                self._l2c.pop(off, None)
                self._l2d.pop(off, None)
                self._l2d_idx.pop(off, None)
                continue
            off, table = self._table_w(l1i)
            for i in range(first - base, l2n):
                raw = table[i]
                if raw:
                    kind, host = self._decode(raw, base + i)
                    self._set(off, table, i, 0)
                    self._free_entry(kind, host, raw)

    def make_empty(self) -> None:
        """Unmap every cluster (the image then reads all from below) and trim the file.

        What ``qemu-img commit`` does to the top once its data is in the base.
        Crash-safe as every other change: at worst clusters leak.
        """
        self._check_open()
        self._commit()
        self._drop_from(0)
        self.flush()
        last = self._last_counted()
        length = (last + 1) * self.cluster_size
        if length < self._file_end:
            self._truncate(length)
            self._fsync()
            self.file_size = length
            self._end = last + 1
            self._alloc_end = min(self._alloc_end, self._end)
            self._hint = min(self._hint, self._end)
        log.info("image_emptied", path=self.path, file_size=self._file_end)

    def set_backing(self, name: str | None, backing_format: str | None) -> None:
        """Rewrite the header's backing name and backing-format extension, durably.

        ``name=None`` makes the image standalone. The header, its extensions
        and the name are written with one ``pwrite`` into cluster 0 (as QEMU's
        ``qcow2_update_header`` does); bytes of a longer old name are zeroed.
        """
        self._check_open()
        self.flush()
        old = self.header
        new = old.with_backing(name, backing_format if name is not None else None)
        try:
            data = new.pack()
            old_len = len(old.pack())
        except CorruptImageError as exc:
            raise InvalidArgumentError(exc.message, path=self.path, field=exc.field,
                                       value=exc.value) from None
        end = max(old_len, old.backing_file_offset + old.backing_file_size)
        self._pwrite(data + bytes(max(0, end - len(data))), 0)
        self._fsync()
        self.header = parse_header(self._pread_host(self.cluster_size, 0), source=self.path)
        self.backing_file = self.header.backing_file
        self.backing_format = self.header.backing_format
        log.info("backing_file_set", path=self.path, old=old.backing_file, backing=name,
                 backing_format=self.backing_format)

    # -- lifecycle --------------------------------------------------------------------

    def close(self) -> None:
        """Flush, release QEMU's locks and close the file. Idempotent.

        The file is closed even when the flush fails (its error is raised).
        """
        if self._fd < 0:
            return
        try:
            if self._failed is None:
                self.flush()
        finally:
            Image.close(self)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()  # metadata batched so far is still written in safe order
        except Exception as close_exc:  # the original error matters more
            log.warning("writer_close_failed", path=self.path, error=str(close_exc))


def open_writable(path: str | os.PathLike[str], fmt: str = "qcow2", *,
                  lock: bool = True) -> WritableImage:
    """Open one image read-write (and locked, as QEMU locks it): qcow2 or raw."""
    if fmt == "qcow2":
        return Qcow2Writer(path, lock=lock)
    if fmt == "raw":
        return RawWriter(path, lock=lock)
    msg = f"image format {fmt!r} cannot be opened for writing (qcow2 and raw can)"
    raise UnsupportedFeatureError(msg, path=path, field="format", value=fmt)
