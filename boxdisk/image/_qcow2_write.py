"""Writing guest data into one qcow2 image: cluster allocation, refcounts, L2/L1 updates.

Crash safety (docs/interop/qcow2.txt, "Host cluster management"; the order
QEMU's cache dependencies give): new clusters are always taken past the end of
everything allocated, so a new cluster is never referenced by anything old.
Metadata reaches the file in this order, each step durable (fsync) before the
next one starts:

1. guest data and new L2 tables' contents, and the refcount blocks that count
   every new cluster (and the new refcount table when it grew);
2. refcount table entries pointing at new refcount blocks (or the header's
   pointer to a relocated refcount table);
3. L2 entries pointing at the new clusters;
4. L1 entries pointing at new L2 tables;
5. refcount decrements of clusters that L2 entries no longer reference.

A crash between any two steps leaves clusters counted but unreferenced
(leaks, which ``check(repair="leaks")`` reclaims), never a reference to an
unwritten or uncounted cluster. Steps 1-5 run in :meth:`Qcow2Writer.flush`
(or earlier when the in-memory batch grows large); a ``write`` is durable once
``flush`` returns, as with a disk's volatile write cache.
"""

from __future__ import annotations

import os
import struct
from array import array
from collections.abc import Callable
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
    AUTOCLEAR_DATA_FILE_RAW,
    INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE,
    INCOMPAT_DIRTY,
    INCOMPAT_EXTL2,
    L2E_OFFSET_MASK,
    MAX_L1_BYTES,
    MAX_REFTABLE_BYTES,
    MIN_HEADER_PROBE,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    ClusterType,
    L1Entry,
    L2Entry,
    Qcow2Header,
    cluster_size_of,
    decode_refcount_table_entry,
    l1_entries_for,
    pack_refcount_block,
    pack_u64_table,
    parse_header,
    unpack_refcount_block,
    unpack_u64_table,
)

from ._compress import decompress_cluster

__all__ = ["Qcow2Writer", "ReadBelow"]

log = get_logger(__name__)

#: Reads guest bytes from the layers under the image: ``(offset, length) -> bytes``.
ReadBelow = Callable[[int, int], bytes]

_MAX_DIRTY_L2 = 512  # tables held modified in memory before an automatic flush
_MAX_CLEAN_L2 = 1024  # clean tables cached


class Qcow2Writer:
    """The writable top of a chain: one qcow2 file opened read-write and locked.

    Lifecycle: open from construction to :meth:`close` (idempotent, flushes
    first). Holds QEMU's write locks on the file for its whole life.
    ``read_below`` supplies what the layers under this image read (for copying
    up the rest of a partially written cluster); None means zeros.
    """

    def __init__(self, path: str | os.PathLike[str], *, read_below: ReadBelow | None = None,
                 lock: bool = True) -> None:
        self.path = os.fspath(path)
        self._read_below = read_below
        self._fd = -1
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            msg = f"cannot open image for writing: {exc.strerror}"
            raise ImageIOError(msg, path=self.path) from None
        self._fd = fd
        try:
            if lock:
                lock_for_write(fd, self.path)
            self._load()
        except BaseException:
            self._fd = -1
            os.close(fd)
            raise

    # -- opening ------------------------------------------------------------------

    def _pread(self, length: int, offset: int, what: str) -> bytes:
        try:
            data = os.pread(self._fd, length, offset)
        except OSError as exc:
            msg = f"cannot read {what} at 0x{offset:x}: {exc.strerror}"
            raise ImageIOError(msg, path=self.path) from None
        if len(data) != length:
            msg = f"{what} at 0x{offset:x} ({length} bytes) runs past the end of the file"
            raise CorruptImageError(msg, path=self.path, field=what, value=offset)
        return data

    def _load(self) -> None:
        prefix = os.pread(self._fd, MIN_HEADER_PROBE, 0)
        cs = cluster_size_of(prefix, source=self.path)
        h = parse_header(os.pread(self._fd, cs, 0), source=self.path)
        self._refuse(h)
        self.header = h
        self.cluster_size = cs
        self.cluster_bits = h.cluster_bits
        self.size = h.size
        self._l2_entries = h.l2_entries
        self._rc_order = h.refcount_order
        self._rc_max = (1 << h.refcount_bits) - 1
        self._rc_per_block = cs * 8 >> h.refcount_order
        self.file_size = os.fstat(self._fd).st_size
        self._file_end = self.file_size
        l1_raw = self._pread(h.l1_size * 8, h.l1_table_offset, "L1 table") if h.l1_size else b""
        self._l1 = unpack_u64_table(l1_raw)
        for i, raw in enumerate(self._l1):
            if raw:
                self._check_l1(i, raw)
        rt_raw = self._pread(h.refcount_table_clusters * cs, h.refcount_table_offset,
                             "refcount table")
        self._reftable = unpack_u64_table(rt_raw)
        for i, raw in enumerate(self._reftable):
            if raw:
                off = decode_refcount_table_entry(raw, cluster_size=cs, source=self.path,
                                                  where=f"refcount table[{i}]")
                if off + cs > self.file_size:
                    msg = f"refcount table[{i}]: block at 0x{off:x} lies past the end of the file"
                    raise CorruptImageError(msg, path=self.path, field=f"refcount table[{i}]",
                                            value=off)
        self._refblocks: dict[int, list[int]] = {}
        self._l2_cache: dict[int, array[int]] = {}
        self._dirty_l2: dict[int, set[int]] = {}  # table offset -> changed indices
        self._new_l2: set[int] = set()
        self._dirty_l1: set[int] = set()
        self._dirty_blocks: set[int] = set()
        self._dirty_reftable: set[int] = set()
        self._relocated: tuple[int, int, int, int] | None = None  # new off, clusters, old off, old
        self._frees: list[int] = []  # host offsets to decref once L2 no longer points at them
        self._end_cluster = self._find_end_cluster()
        if h.autoclear_features & ~AUTOCLEAR_DATA_FILE_RAW:
            # The spec lets a writer proceed only after clearing autoclear bits it does not
            # maintain (bitmaps are not kept current by boxdisk, so their bit goes too).
            self._rewrite_autoclear(h.autoclear_features & AUTOCLEAR_DATA_FILE_RAW)

    def _refuse(self, h: Qcow2Header) -> None:
        inc = h.incompatible_features
        if inc & INCOMPAT_CORRUPT:
            msg = "image has the corrupt bit set; refusing to write (run check with repair)"
            raise CorruptImageError(msg, path=self.path, field="incompatible_features", value=inc)
        if inc & INCOMPAT_DIRTY:
            msg = "image is marked dirty (refcounts may be stale); repair it before writing"
            raise CorruptImageError(msg, path=self.path, field="incompatible_features", value=inc)
        if inc & INCOMPAT_DATA_FILE:
            msg = "images with an external data file are not supported"
            raise UnsupportedFeatureError(msg, path=self.path, field="incompatible_features",
                                          value=inc)
        if inc & INCOMPAT_EXTL2:
            msg = "writing images with extended L2 entries (subclusters) is not supported"
            raise UnsupportedFeatureError(msg, path=self.path, field="incompatible_features",
                                          value=inc)
        if h.crypt_method:
            msg = f"encrypted images (crypt_method {h.crypt_method}) are not supported"
            raise UnsupportedFeatureError(msg, path=self.path, field="crypt_method",
                                          value=h.crypt_method)
        if h.nb_snapshots:
            msg = f"writing images with internal snapshots ({h.nb_snapshots}) is not supported"
            raise UnsupportedFeatureError(msg, path=self.path, field="nb_snapshots",
                                          value=h.nb_snapshots)

    def _rewrite_autoclear(self, value: int) -> None:
        if self.header.version < 3:
            return
        self._pwrite(value.to_bytes(8, "big"), 88)
        self._fsync()
        log.info("autoclear_cleared", path=self.path, old=self.header.autoclear_features,
                 new=value)

    def _find_end_cluster(self) -> int:
        """First cluster past the file and past every cluster with a refcount."""
        cs = self.cluster_size
        end = -(-self.file_size // cs)
        for bi in range(len(self._reftable) - 1, -1, -1):
            if not self._reftable[bi]:
                continue
            block = self._refblock(self._reftable[bi] & ~0x1FF)
            for ri in range(len(block) - 1, -1, -1):
                if block[ri]:
                    return max(end, bi * self._rc_per_block + ri + 1)
        return end

    def _check_l1(self, index: int, raw: int) -> int:
        entry = L1Entry.decode(raw, cluster_size=self.cluster_size, source=self.path,
                               where=f"L1[{index}]")
        off = entry.l2_offset
        if off and (off < self.cluster_size or off + self.cluster_size > max(
                self.file_size, self._end_cluster_or_file())):
            msg = f"L1[{index}]: L2 table at 0x{off:x} lies in the header or past the file"
            raise CorruptImageError(msg, path=self.path, field=f"L1[{index}]", value=raw)
        return off

    def _end_cluster_or_file(self) -> int:
        end = getattr(self, "_end_cluster", 0)
        return max(end * self.cluster_size, self.file_size)

    # -- raw I/O --------------------------------------------------------------------

    def _pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        try:
            done = os.pwrite(self._fd, data, offset)
        except OSError as exc:
            msg = f"cannot write {len(data)} bytes at 0x{offset:x}: {exc.strerror}"
            raise ImageIOError(msg, path=self.path) from exc
        if done != len(data):
            msg = f"short write at 0x{offset:x} ({done} of {len(data)} bytes)"
            raise ImageIOError(msg, path=self.path)
        self._file_end = max(self._file_end, offset + done)

    def _fsync(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as exc:
            msg = f"fsync failed: {exc.strerror}"
            raise ImageIOError(msg, path=self.path) from exc

    # -- refcounts ------------------------------------------------------------------

    def _refblock(self, offset: int) -> list[int]:
        block = self._refblocks.get(offset)
        if block is None:
            raw = self._pread(self.cluster_size, offset, "refcount block")
            block = unpack_refcount_block(raw, self._rc_order)
            self._refblocks[offset] = block
        return block

    def refcount(self, cluster_index: int) -> int:
        """The refcount of a host cluster, as this writer currently sees it."""
        bi, ri = divmod(cluster_index, self._rc_per_block)
        if bi >= len(self._reftable) or not self._reftable[bi]:
            return 0
        return self._refblock(self._reftable[bi] & ~0x1FF)[ri]

    def _change_refcount(self, cluster_index: int, delta: int) -> None:
        bi, ri = divmod(cluster_index, self._rc_per_block)
        if bi >= len(self._reftable):
            self._grow_reftable(bi)
        boff = self._reftable[bi] & ~0x1FF
        if not boff:
            new = self._end_cluster
            self._end_cluster += 1
            boff = new * self.cluster_size
            self._refblocks[boff] = [0] * self._rc_per_block
            self._reftable[bi] = boff
            self._dirty_reftable.add(bi)
            self._dirty_blocks.add(boff)
            self._change_refcount(new, 1)  # the block counts itself (or asks for another)
        block = self._refblock(boff)
        value = block[ri] + delta
        if not 0 <= value <= self._rc_max:
            msg = f"refcount of cluster {cluster_index} would become {value}"
            raise CorruptImageError(msg, path=self.path, field=f"refcount[{cluster_index}]",
                                    value=block[ri])
        block[ri] = value
        self._dirty_blocks.add(boff)

    def _grow_reftable(self, needed_index: int) -> None:
        cs = self.cluster_size
        old_entries = len(self._reftable)
        entries = max(needed_index + 1, old_entries * 2) + cs // 8
        clusters = -(-entries * 8 // cs)
        if clusters * cs > MAX_REFTABLE_BYTES:
            msg = "image would need a refcount table over QEMU's 8 MiB limit"
            raise UnsupportedFeatureError(msg, path=self.path, field="refcount_table_clusters",
                                          value=clusters)
        if self._relocated is not None:
            # Grown twice in one batch: the first new table is simply superseded.
            first_off, first_clusters, old_off, old_clusters = self._relocated
            for i in range(first_clusters):
                self._frees.append(first_off + i * cs)
        else:
            old_off = self.header.refcount_table_offset
            old_clusters = self.header.refcount_table_clusters
        start = self._end_cluster
        self._end_cluster += clusters
        self._reftable.extend([0] * (clusters * cs // 8 - old_entries))
        self._relocated = (start * cs, clusters, old_off, old_clusters)
        for i in range(clusters):
            self._change_refcount(start + i, 1)

    def _alloc(self) -> int:
        """A new host cluster past everything allocated; returns its offset."""
        index = self._end_cluster
        self._end_cluster += 1
        self._change_refcount(index, 1)
        return index * self.cluster_size

    # -- L2 ---------------------------------------------------------------------------

    def _l2_table(self, l1_index: int, *, create: bool) -> tuple[int, array[int]] | None:
        raw = self._l1[l1_index]
        off = raw & L2E_OFFSET_MASK
        if not off:
            if not create:
                return None
            off = self._alloc()
            table = array("Q", bytes(self.cluster_size))
            self._l2_cache[off] = table
            self._new_l2.add(off)
            self._dirty_l2[off] = set()
            self._l1[l1_index] = off | QCOW_OFLAG_COPIED
            self._dirty_l1.add(l1_index)
            return off, table
        cached = self._l2_cache.get(off)
        if cached is not None:
            table = cached
        else:
            if len(self._l2_cache) >= _MAX_CLEAN_L2 + len(self._dirty_l2):
                for key in [k for k in self._l2_cache if k not in self._dirty_l2]:
                    del self._l2_cache[key]
            table = unpack_u64_table(self._pread(self.cluster_size, off, f"L2 table[{l1_index}]"))
            self._l2_cache[off] = table
        if not raw & QCOW_OFLAG_COPIED and create:
            # Without internal snapshots every table has refcount 1: just fix the flag.
            self._l1[l1_index] = raw | QCOW_OFLAG_COPIED
            self._dirty_l1.add(l1_index)
        return off, table

    def _entry(self, guest_cluster: int) -> tuple[L2Entry, int]:
        """The L2 entry of a guest cluster and its raw word (0 when no L2 table)."""
        l1_index, l2_index = divmod(guest_cluster, self._l2_entries)
        found = self._l2_table(l1_index, create=False)
        if found is None:
            return L2Entry(ClusterType.UNALLOCATED), 0
        raw = found[1][l2_index]
        entry = L2Entry.decode(raw, cluster_bits=self.cluster_bits, version=self.header.version,
                               source=self.path, where=f"L2[{l1_index}][{l2_index}]")
        if entry.type in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC) and (
            entry.host_offset + self.cluster_size > self._end_cluster_or_file()
        ):
            msg = (f"L2[{l1_index}][{l2_index}]: data cluster 0x{entry.host_offset:x} "
                   f"lies past the end of the file")
            raise CorruptImageError(msg, path=self.path,
                                    field=f"L2[{l1_index}][{l2_index}]", value=raw)
        return entry, raw

    def _set_entry(self, guest_cluster: int, raw: int) -> None:
        l1_index, l2_index = divmod(guest_cluster, self._l2_entries)
        found = self._l2_table(l1_index, create=True)
        assert found is not None
        off, table = found
        table[l2_index] = raw
        self._dirty_l2.setdefault(off, set()).add(l2_index)

    def _free_later(self, entry: L2Entry) -> None:
        if entry.type in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
            self._frees.append(entry.host_offset)
        elif entry.type is ClusterType.COMPRESSED:
            # A compressed cluster holds a reference on every host cluster it touches.
            first = entry.host_offset // self.cluster_size
            last = (entry.host_offset + entry.compressed_size() - 1) // self.cluster_size
            self._frees.extend(c * self.cluster_size for c in range(first, last + 1))

    # -- guest view -------------------------------------------------------------------

    def _below(self, offset: int, length: int) -> bytes:
        if self._read_below is None:
            return bytes(length)
        end = min(offset + length, self.size)
        data = self._read_below(offset, end - offset) if end > offset else b""
        return data + bytes(length - len(data))

    def _cluster_content(self, guest_cluster: int, entry: L2Entry) -> bytes:
        cs = self.cluster_size
        if entry.type is ClusterType.UNALLOCATED:
            return self._below(guest_cluster * cs, cs)
        if entry.type in (ClusterType.ZERO_PLAIN, ClusterType.ZERO_ALLOC):
            return bytes(cs)
        if entry.type is ClusterType.NORMAL:
            return self._pread(cs, entry.host_offset, f"data cluster {guest_cluster}")
        size = entry.compressed_size()
        data = os.pread(self._fd, size, entry.host_offset)
        return decompress_cluster(data, self.header.compression_type, cs, path=self.path,
                                  where=f"compressed cluster {guest_cluster}")

    def read(self, offset: int, length: int) -> bytes:
        """Guest bytes at ``offset`` as this image and the layers below show them."""
        self._check_range(offset, length)
        cs = self.cluster_size
        out = bytearray()
        pos, end = offset, offset + length
        while pos < end:
            gc, within = divmod(pos, cs)
            n = min(cs - within, end - pos)
            entry, _ = self._entry(gc)
            if entry.type is ClusterType.NORMAL:
                out += self._pread(n, entry.host_offset + within, f"data cluster {gc}")
            elif entry.type is ClusterType.UNALLOCATED:
                out += self._below(pos, n)
            elif entry.type is ClusterType.COMPRESSED:
                out += self._cluster_content(gc, entry)[within:within + n]
            else:
                out += bytes(n)
            pos += n
        return bytes(out)

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            msg = f"range {offset}+{length} lies outside the {self.size}-byte disk"
            raise InvalidArgumentError(msg, path=self.path, field="offset", value=offset)
        if self._fd < 0:
            msg = "writer is closed"
            raise InvalidArgumentError(msg, path=self.path, field="fd")

    # -- writes -----------------------------------------------------------------------

    def write(self, offset: int, data: bytes) -> None:
        """Write guest bytes; partial clusters copy the rest up from the current view."""
        self._check_range(offset, len(data))
        cs = self.cluster_size
        mv = memoryview(data)
        pos, end = offset, offset + len(data)
        while pos < end:
            gc, within = divmod(pos, cs)
            n = min(cs - within, end - pos)
            chunk = mv[pos - offset : pos - offset + n]
            entry, raw = self._entry(gc)
            if entry.type is ClusterType.NORMAL and (
                raw & QCOW_OFLAG_COPIED or self.refcount(entry.host_offset // cs) == 1
            ):
                self._pwrite(chunk, entry.host_offset + within)
                if not raw & QCOW_OFLAG_COPIED:
                    self._set_entry(gc, raw | QCOW_OFLAG_COPIED)
            else:
                host = self._alloc()
                if n == cs:
                    self._pwrite(chunk, host)
                else:
                    base = self._cluster_content(gc, entry)
                    if base.count(0) == cs:
                        # A new cluster past the end reads as zeros: write only the data.
                        self._pwrite(chunk, host + within)
                        if self._file_end < host + cs:
                            os.ftruncate(self._fd, host + cs)
                            self._file_end = host + cs
                    else:
                        buf = bytearray(base)
                        buf[within:within + n] = chunk
                        self._pwrite(buf, host)
                self._set_entry(gc, host | QCOW_OFLAG_COPIED)
                self._free_later(entry)
            pos += n
        self._maybe_commit()

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make a range read as zeros: the v3 zero flag for whole clusters, bytes otherwise."""
        self._check_range(offset, length)
        cs = self.cluster_size
        pos, end = offset, offset + length
        while pos < end:
            gc, within = divmod(pos, cs)
            n = min(cs - within, end - pos)
            whole = n == cs or (within == 0 and pos + n == self.size)
            if whole and self.header.version >= 3:
                self._zero_cluster(gc)
            else:
                self.write(pos, bytes(n))
            pos += n
        self._maybe_commit()

    def _zero_cluster(self, gc: int) -> None:
        entry, _ = self._entry(gc)
        if entry.type is ClusterType.ZERO_PLAIN:
            return
        if entry.type is ClusterType.UNALLOCATED and self._read_below is None:
            return  # already reads as zeros and nothing below can show through
        self._set_entry(gc, QCOW_OFLAG_ZERO)
        self._free_later(entry)

    def discard(self, offset: int, length: int) -> None:
        """Drop whole clusters in the range (they read as zeros, as QEMU's discard makes them).

        Parts of clusters are left as they are: discard is advisory.
        """
        self._check_range(offset, length)
        cs = self.cluster_size
        first = -(-offset // cs)
        last = (offset + length) // cs
        if offset + length == self.size:
            last = -(-self.size // cs)
        for gc in range(first, last):
            if self.header.version >= 3:
                self._zero_cluster(gc)
            else:
                entry, raw = self._entry(gc)
                if raw:
                    self._set_entry(gc, 0)
                    self._free_later(entry)
        self._maybe_commit()

    # -- resizing ---------------------------------------------------------------------

    def resize(self, new_size: int, *, backing_size: int = 0) -> None:
        """Change the virtual size: grow (the L1 table too), or shrink an unused tail.

        Growing past the old size where the backing file (``backing_size``
        bytes) is larger makes the new range read as zeros, as QEMU's truncate
        does, so old backing data never reappears. Shrinking is refused when a
        cluster past the new end holds data. Durable on return.
        """
        if new_size < 0 or new_size % 512:
            msg = f"new size {new_size} is not a non-negative multiple of 512"
            raise InvalidArgumentError(msg, path=self.path, field="size", value=new_size)
        old = self.size
        if new_size < old:
            self._check_tail_unused(new_size)
        self._commit()
        needed = l1_entries_for(new_size, self.cluster_bits)
        if needed * 8 > MAX_L1_BYTES:
            msg = f"new size {new_size} needs an L1 table over QEMU's 32 MiB limit"
            raise InvalidArgumentError(msg, path=self.path, field="size", value=new_size)
        cs = self.cluster_size
        header = self.header
        if needed > len(self._l1):
            # A new, larger L1 table in fresh clusters; the header switches to it only
            # once it and its refcounts are durable (QEMU's qcow2_grow_l1_table order).
            clusters = -(-needed * 8 // cs)
            start = self._end_cluster
            self._end_cluster += clusters
            for i in range(clusters):
                self._change_refcount(start + i, 1)
            self._l1.extend([0] * (needed - len(self._l1)))
            self._commit()
            self._pwrite(pack_u64_table(self._l1), start * cs)
            self._fsync()
            old_l1 = (header.l1_table_offset, -(-header.l1_size * 8 // cs))
            header = attrs.evolve(header, size=new_size, l1_size=needed,
                                  l1_table_offset=start * cs)
            self._pwrite(struct.pack(">QIIQ", new_size, header.crypt_method, needed,
                                     start * cs), 24)
            self._fsync()
            self._frees.extend(old_l1[0] + i * cs for i in range(old_l1[1]))
        else:
            header = attrs.evolve(header, size=new_size)
            self._pwrite(new_size.to_bytes(8, "big"), 24)
            self._fsync()
        self.header = header
        self.size = new_size
        if new_size > old and backing_size > old:
            self.write_zeroes(old, min(new_size, backing_size) - old)
        self.flush()
        log.info("image_resized", path=self.path, old_size=old, new_size=new_size)

    def _check_tail_unused(self, new_size: int) -> None:
        cs = self.cluster_size
        first = new_size // cs
        last = -(-self.size // cs)
        for l1_index in range(first // self._l2_entries, -(-last // self._l2_entries)):
            if l1_index >= len(self._l1) or not self._l1[l1_index]:
                continue
            lo = max(first, l1_index * self._l2_entries)
            hi = min(last, (l1_index + 1) * self._l2_entries)
            for gc in range(lo, hi):
                entry, _ = self._entry(gc)
                if entry.type in (ClusterType.UNALLOCATED, ClusterType.ZERO_PLAIN):
                    continue
                if gc * cs < new_size:
                    # The cluster straddles the new end: only its cut-off tail matters.
                    tail = self._cluster_content(gc, entry)[new_size - gc * cs:]
                    if tail.count(0) == len(tail):
                        continue
                msg = (
                    f"cannot shrink to {new_size}: guest cluster {gc} "
                    f"(offset {gc * cs}) holds data past the new end"
                )
                raise InvalidArgumentError(msg, path=self.path, field="size", value=new_size)

    # -- committing metadata ----------------------------------------------------------

    def _maybe_commit(self) -> None:
        if len(self._dirty_l2) > _MAX_DIRTY_L2 or len(self._frees) > 65536:
            self._commit()

    def _write_refcounts(self) -> None:
        for boff in sorted(self._dirty_blocks):
            block = self._refblocks[boff]
            self._pwrite(pack_refcount_block(block, self._rc_order, self.cluster_size), boff)
        self._dirty_blocks.clear()

    def _commit(self) -> None:
        """Write batched metadata in crash-safe order (see the module docstring)."""
        if not (self._dirty_l2 or self._dirty_l1 or self._dirty_blocks or self._frees):
            return
        cs = self.cluster_size
        # 1. data (already written) + new L2 tables' contents + refcounts, durable.
        end = self._end_cluster * cs
        if self._file_end < end:
            os.ftruncate(self._fd, end)  # clusters written only in part read as zeros
            self._file_end = end
        for off in self._new_l2:
            self._pwrite(pack_u64_table(self._l2_cache[off]), off)
        self._write_refcounts()
        if self._relocated is not None:
            self._pwrite(pack_u64_table(self._reftable), self._relocated[0])
        self._fsync()
        # 2. refcount table entries, or the header's pointer to a new table.
        if self._relocated is not None:
            new_off, clusters, old_off, old_clusters = self._relocated
            self._pwrite(new_off.to_bytes(8, "big") + clusters.to_bytes(4, "big"), 48)
            self._fsync()
            self._frees.extend(old_off + i * cs for i in range(old_clusters))
            self.header = attrs.evolve(self.header, refcount_table_offset=new_off,
                                       refcount_table_clusters=clusters)
            self._relocated = None
            self._dirty_reftable.clear()
        elif self._dirty_reftable:
            for bi in sorted(self._dirty_reftable):
                self._pwrite(self._reftable[bi].to_bytes(8, "big"),
                             self.header.refcount_table_offset + bi * 8)
            self._dirty_reftable.clear()
            self._fsync()
        # 3. L2 entries of existing tables.
        wrote_l2 = False
        for off, indices in self._dirty_l2.items():
            if off in self._new_l2:
                continue
            table = self._l2_cache[off]
            for i in sorted(indices):
                self._pwrite(table[i].to_bytes(8, "big"), off + i * 8)
            wrote_l2 = wrote_l2 or bool(indices)
        self._dirty_l2.clear()
        self._new_l2.clear()
        # 4. L1 entries pointing at new tables.
        if self._dirty_l1:
            self._fsync()
            for i in sorted(self._dirty_l1):
                self._pwrite(self._l1[i].to_bytes(8, "big"), self.header.l1_table_offset + i * 8)
            self._dirty_l1.clear()
            wrote_l2 = True
        # 5. Drop references that nothing points at any more.
        if self._frees:
            if wrote_l2:
                self._fsync()
            for off in self._frees:
                self._change_refcount(off // cs, -1)
            self._frees.clear()
            self._write_refcounts()

    def flush(self) -> None:
        """Make every write so far durable (metadata in crash-safe order, then fsync)."""
        if self._fd < 0:
            return
        self._commit()
        self._fsync()

    def close(self) -> None:
        """Flush, release QEMU's locks and close the file. Idempotent."""
        if self._fd < 0:
            return
        try:
            self.flush()
        finally:
            fd, self._fd = self._fd, -1
            os.close(fd)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._fd < 0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            # Still release the file; metadata batched so far is written in safe order.
            try:
                self.close()
            except Exception:
                log.warning("writer_close_failed", path=self.path)

