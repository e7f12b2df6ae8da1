"""Where flatten and convert put clusters: a new standalone qcow2 v3, or a sparse raw file.

Both take cluster-aligned chunks of guest bytes in increasing guest order and
skip clusters that read as all zeros, so the output allocates only data.
"""

from __future__ import annotations

import os
from array import array

from boxdisk.format import (
    QCOW_OFLAG_COPIED,
    Qcow2Header,
    l1_entries_for,
    pack_u64_table,
    validate_header,
)

__all__ = ["QcowSink", "RawSink", "nonzero_clusters"]

_REFCOUNT_ORDER = 4  # 16-bit refcounts, QEMU's default


def nonzero_clusters(buf: bytearray, cluster_size: int, zero: bytes) -> list[tuple[int, int]]:
    """``(first, count)`` runs of clusters of ``buf`` that are not all zeros."""
    out: list[tuple[int, int]] = []
    n = len(buf)
    start = -1
    for i in range(0, n, cluster_size):
        end = min(i + cluster_size, n)
        # Data rarely starts and ends with zero bytes: check those before comparing.
        nonzero = buf[i] or buf[end - 1] or (
            buf[i:end] != zero if end - i == cluster_size else buf.count(0, i, end) != end - i
        )
        if nonzero:
            if start < 0:
                start = i
        elif start >= 0:
            out.append((start, i - start))
            start = -1
    if start >= 0:
        out.append((start, n - start))
    return out


class RawSink:
    """A sparse raw file of the guest size: all-zero clusters stay holes."""

    def __init__(self, fd: int, size: int, cluster_size: int = 65536) -> None:
        self.fd, self.size, self.cluster_size = fd, size, cluster_size
        self._zero = bytes(cluster_size)
        self.data_bytes = 0
        os.ftruncate(fd, size)

    def write(self, guest_offset: int, buf: bytearray) -> None:
        """Write the non-zero clusters of ``buf`` at ``guest_offset``."""
        view = memoryview(buf)
        for start, length in nonzero_clusters(buf, self.cluster_size, self._zero):
            _pwrite_all(self.fd, view[start : start + length], guest_offset + start)
            self.data_bytes += length

    def finish(self) -> None:
        """Nothing to add: the file already has its size."""


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
        self._l2_span = self._l2_entries * cs
        self._l1 = array("Q", bytes(8 * l1_entries_for(size, cluster_bits)))
        self._l2: array[int] | None = None
        self._l2_index = -1
        self._next = cs  # cluster 0 is the header
        self.data_bytes = 0

    def _switch_l2(self, l1_index: int) -> array[int]:
        if self._l2 is not None:
            self._flush_l2()
        self._l2 = array("Q", bytes(self.cluster_size))
        self._l2_index = l1_index
        return self._l2

    def _flush_l2(self) -> None:
        if self._l2 is None:
            return
        _pwrite_all(self.fd, memoryview(pack_u64_table(self._l2)), self._next)
        self._l1[self._l2_index] = self._next | QCOW_OFLAG_COPIED
        self._next += self.cluster_size
        self._l2 = None

    def write(self, guest_offset: int, buf: bytearray) -> None:
        """Append the non-zero clusters of ``buf`` (guest-cluster-aligned) and map them."""
        cs, cb = self.cluster_size, self.cluster_bits
        view = memoryview(buf)
        for start, length in nonzero_clusters(buf, cs, self._zero):
            # Pad a short last cluster (virtual size not a cluster multiple).
            chunk: memoryview | bytes = view[start : start + length]
            if length % cs:
                chunk = bytes(chunk) + bytes(cs - length % cs)
            host = self._next
            _pwrite_all(self.fd, memoryview(chunk), host)
            self.data_bytes += length
            self._next += len(chunk)
            g = guest_offset + start
            for k in range(len(chunk) >> cb):
                cluster = (g >> cb) + k
                l1_index, l2_index = divmod(cluster, self._l2_entries)
                l2 = self._l2
                if l1_index != self._l2_index or l2 is None:
                    l2 = self._switch_l2(l1_index)
                l2[l2_index] = (host + (k << cb)) | QCOW_OFLAG_COPIED

    def finish(self) -> None:
        """Write the last L2 table, the L1 table, the refcounts and the header."""
        self._flush_l2()
        cs = self.cluster_size
        l1_offset = self._next
        l1_bytes = len(self._l1) * 8
        l1_clusters = -(-l1_bytes // cs)
        if l1_bytes:
            _pwrite_all(self.fd, memoryview(pack_u64_table(self._l1)), l1_offset)
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
        _pwrite_all(self.fd, memoryview(table + bytes(rt_clusters * cs - len(table))),
                    rt_offset)
        one = b"\0\1"  # a 16-bit refcount of 1
        remaining = total
        for i in range(rb_count):
            count = min(remaining, per_block)
            block = one * count + bytes(cs - 2 * count)
            _pwrite_all(self.fd, memoryview(block), rb_offset + i * cs)
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
        _pwrite_all(self.fd, memoryview(head + bytes(cs - len(head))), 0)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n
