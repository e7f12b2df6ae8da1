"""Where flatten and convert put clusters: a new standalone qcow2 v3, or a sparse raw file.

Both take cluster-aligned windows of guest bytes in increasing guest order and
skip clusters that read as all zeros, so the output allocates only data. A
sink only *plans*: :meth:`plan` returns the ``(file offset, bytes)`` writes for
a window, so the caller may hand them to another thread while it reads the next
window; :meth:`finish` returns the closing metadata writes.
"""

from __future__ import annotations

import os
import sys
from array import array

from boxdisk.format import (
    QCOW_OFLAG_COPIED,
    Qcow2Header,
    l1_entries_for,
    pack_u64_table,
    validate_header,
)

__all__ = ["QcowSink", "RawSink", "Write", "nonzero_clusters"]

_REFCOUNT_ORDER = 4  # 16-bit refcounts, QEMU's default

#: One planned write: the file offset and the bytes (often a view into the window).
Write = tuple[int, memoryview]


def nonzero_clusters(buf: bytearray, length: int, cluster_size: int,
                     zero: bytes) -> list[tuple[int, int]]:
    """``(start, length)`` runs of the clusters of ``buf[:length]`` that are not all zeros.

    ``zero`` is ``cluster_size`` zero bytes. A cluster whose first or last byte
    is set is data at once; the others are compared in place (``startswith``
    compares without copying).
    """
    out: list[tuple[int, int]] = []
    start = -1
    for i in range(0, length, cluster_size):
        end = min(i + cluster_size, length)
        if end - i == cluster_size:
            nonzero = buf[i] or buf[end - 1] or not buf.startswith(zero, i, end)
        else:
            nonzero = buf.count(0, i, end) != end - i
        if nonzero:
            if start < 0:
                start = i
        elif start >= 0:
            out.append((start, i - start))
            start = -1
    if start >= 0:
        out.append((start, length - start))
    return out


#: Zero detection granularity of raw output: qemu-img convert's default (-S 4k).
RAW_GRANULE = 4096


class RawSink:
    """A sparse raw file of the guest size: all-zero blocks (``RAW_GRANULE``) stay holes."""

    def __init__(self, fd: int, size: int, cluster_size: int = RAW_GRANULE) -> None:
        self.fd, self.size, self.cluster_size = fd, size, cluster_size
        self._zero = bytes(cluster_size)
        self.data_bytes = 0
        os.ftruncate(fd, size)

    def plan(self, guest_offset: int, buf: bytearray, length: int) -> list[Write]:
        """The writes of the non-zero clusters of ``buf[:length]`` (at ``guest_offset``)."""
        view = memoryview(buf)
        writes = []
        for start, n in nonzero_clusters(buf, length, self.cluster_size, self._zero):
            writes.append((guest_offset + start, view[start : start + n]))
            self.data_bytes += n
        return writes

    def finish(self) -> list[Write]:
        """Nothing to add: the file already has its size."""
        return []


class QcowSink:
    """A standalone qcow2 v3 image written front to back.

    Layout: the header cluster, then data clusters with each L2 table appended
    after the data it maps, then the L1 table, the refcount table and the
    refcount blocks. Every cluster of the file is used exactly once, so every
    refcount is 1 and every L1/L2 entry carries COPIED. Memory: the L1 table and
    one L2 table.
    """

    def __init__(self, fd: int, size: int, cluster_bits: int = 16) -> None:
        self.fd, self.size = fd, size
        self.cluster_bits = cluster_bits
        self.cluster_size = cs = 1 << cluster_bits
        self._zero = bytes(cs)
        self._l2_entries = cs // 8
        self._l1 = array("Q", bytes(8 * l1_entries_for(size, cluster_bits)))
        self._l2: array[int] | None = None
        self._l2_index = -1
        self._next = cs  # cluster 0 is the header
        self.data_bytes = 0

    def _take_l2(self) -> list[Write]:
        """Append the current L2 table (if any) and point the L1 table at it."""
        table = self._l2
        if table is None:
            return []
        offset = self._next
        self._l1[self._l2_index] = offset | QCOW_OFLAG_COPIED
        self._next += self.cluster_size
        self._l2 = None
        return [(offset, memoryview(pack_u64_table(table)))]

    def plan(self, guest_offset: int, buf: bytearray, length: int) -> list[Write]:
        """Place the non-zero clusters of ``buf[:length]`` (guest-cluster-aligned)."""
        cs, cb = self.cluster_size, self.cluster_bits
        view = memoryview(buf)
        writes: list[Write] = []
        per_l2 = self._l2_entries
        for start, n in nonzero_clusters(buf, length, cs, self._zero):
            chunk = view[start : start + n]
            if n % cs:  # a short last cluster (virtual size not a cluster multiple)
                chunk = memoryview(bytes(chunk) + bytes(cs - n % cs))
            host = self._next
            writes.append((host, chunk))
            self.data_bytes += n
            self._next += len(chunk)
            cluster, count = (guest_offset + start) >> cb, len(chunk) >> cb
            entry = host | QCOW_OFLAG_COPIED
            while count:  # one slice assignment per L2 table touched
                l1_index, l2_index = divmod(cluster, per_l2)
                l2 = self._l2
                if l1_index != self._l2_index or l2 is None:
                    writes += self._take_l2()
                    l2 = self._l2 = array("Q", bytes(cs))
                    self._l2_index = l1_index
                k = min(count, per_l2 - l2_index)
                l2[l2_index : l2_index + k] = array("Q", range(entry, entry + (k << cb), cs))
                cluster, count, entry = cluster + k, count - k, entry + (k << cb)
        return writes

    def finish(self) -> list[Write]:
        """The last L2 table, the L1 table, the refcounts and the header, as writes."""
        writes = self._take_l2()
        cs = self.cluster_size
        l1_offset = self._next
        l1_bytes = len(self._l1) * 8
        l1_clusters = -(-l1_bytes // cs)
        if l1_bytes:
            # Big-endian in place (the table is final): an L1 table of up to 32 MiB is
            # not copied twice more on its way out.
            if sys.byteorder == "little":
                self._l1.byteswap()
            writes.append((l1_offset, memoryview(self._l1).cast("B")))
        used = l1_offset // cs + l1_clusters
        per_block = cs * 8 >> _REFCOUNT_ORDER
        rt_clusters, rb_count = 1, 1
        while True:  # the refcount table and blocks count themselves
            total = used + rt_clusters + rb_count
            need_rb = -(-total // per_block)
            need_rt = -(-need_rb * 8 // cs)
            if (need_rb, need_rt) == (rb_count, rt_clusters):
                break
            rb_count, rt_clusters = max(rb_count, need_rb), max(rt_clusters, need_rt)
        rt_offset = used * cs
        rb_offset = rt_offset + rt_clusters * cs
        reftable = array("Q", (rb_offset + i * cs for i in range(rb_count)))
        table = pack_u64_table(reftable)
        writes.append((rt_offset, memoryview(table + bytes(rt_clusters * cs - len(table)))))
        one = b"\0\1"  # a 16-bit refcount of 1
        remaining = total
        for i in range(rb_count):
            count = min(remaining, per_block)
            block = one * count + bytes(cs - 2 * count)
            writes.append((rb_offset + i * cs, memoryview(block)))
            remaining -= count
        header = Qcow2Header(
            cluster_bits=self.cluster_bits,
            size=self.size,
            l1_size=len(self._l1),
            l1_table_offset=l1_offset if l1_bytes else 0,
            refcount_table_offset=rt_offset,
            refcount_table_clusters=rt_clusters,
            refcount_order=_REFCOUNT_ORDER,
        )
        validate_header(header, source="<flatten output>")
        head = header.pack()
        writes.append((0, memoryview(head + bytes(cs - len(head)))))
        return writes


