"""The metadata of a new, empty qcow2 image, planned as a list of writes.

Layout (QEMU's own order): cluster 0 the header, then the refcount table, the
refcount blocks covering all metadata, then the L1 table. Only non-zero bytes
are listed, so the caller can write them into a sparse file of ``file_size``
bytes: an all-zero L1 table costs no disk space.
"""

from __future__ import annotations

import functools

import attrs

from boxdisk._errors import CorruptImageError, InvalidArgumentError

from ._constants import (
    EXT_BACKING_FORMAT,
    INCOMPAT_EXTL2,
    MAX_CLUSTER_BITS,
    MAX_L1_BYTES,
    MAX_REFCOUNT_ORDER,
    MAX_REFTABLE_BYTES,
    MIN_CLUSTER_BITS,
    MIN_EXTL2_CLUSTER_BITS,
)
from ._header import HeaderExtension, Qcow2Header, l1_entries_for, validate_header

__all__ = ["NewImageLayout", "plan_new_image"]


@attrs.define(frozen=True)
class NewImageLayout:
    """A planned empty image: its header, the non-zero writes, and its length."""

    header: Qcow2Header
    writes: tuple[tuple[int, bytes], ...]
    file_size: int


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def refcount_ones(count: int, refcount_order: int) -> bytes:
    """The leading bytes of a refcount block whose first ``count`` entries are 1."""
    bits = 1 << refcount_order
    if bits >= 8:
        return (b"\0" * (bits // 8 - 1) + b"\1") * count
    per_byte = 8 // bits
    full, rest = divmod(count, per_byte)
    byte = sum(1 << (i * bits) for i in range(per_byte))
    out = bytes([byte]) * full
    if rest:
        out += bytes([sum(1 << (i * bits) for i in range(rest))])
    return out


@functools.lru_cache(maxsize=64)
def plan_new_image(
    size: int,
    *,
    cluster_bits: int = 16,
    refcount_order: int = 4,
    backing_file: str | None = None,
    backing_format: str | None = None,
    extended_l2: bool = False,
) -> NewImageLayout:
    """Plan a new, empty qcow2 v3 image of ``size`` virtual bytes.

    Pure and cached: a launcher making many children of one base plans once.
    """
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        msg = f"cluster size 2^{cluster_bits} is outside 512 B .. 2 MiB"
        raise InvalidArgumentError(msg, field="cluster_size", value=1 << cluster_bits)
    if not 0 <= refcount_order <= MAX_REFCOUNT_ORDER:
        msg = f"refcount_order {refcount_order} is outside 0..{MAX_REFCOUNT_ORDER}"
        raise InvalidArgumentError(msg, field="refcount_order", value=refcount_order)
    if extended_l2 and cluster_bits < MIN_EXTL2_CLUSTER_BITS:
        msg = "extended L2 entries need clusters of at least 16 KiB"
        raise InvalidArgumentError(msg, field="cluster_size", value=1 << cluster_bits)
    if size < 0 or size >= 1 << 63:
        msg = f"virtual size {size} is not a non-negative 63-bit number"
        raise InvalidArgumentError(msg, field="size", value=size)
    cs = 1 << cluster_bits
    l1_size = l1_entries_for(size, cluster_bits, extended_l2=extended_l2)
    if l1_size * 8 > MAX_L1_BYTES:
        msg = (
            f"virtual size {size} needs an L1 table of {l1_size * 8} bytes, over QEMU's "
            f"32 MiB limit; use a larger cluster size"
        )
        raise InvalidArgumentError(msg, field="size", value=size)
    l1_clusters = _ceil_div(l1_size * 8, cs)
    entries_per_block = cs * 8 >> refcount_order
    # Refcount blocks and the table count themselves: iterate to the fixed point.
    rb_count, rt_clusters = 1, 1
    while True:
        total = 1 + rt_clusters + rb_count + l1_clusters
        need_rb = _ceil_div(total, entries_per_block)
        need_rt = _ceil_div(need_rb * 8, cs)
        if (need_rb, need_rt) == (rb_count, rt_clusters):
            break
        rb_count, rt_clusters = max(rb_count, need_rb), max(rt_clusters, need_rt)
    if rt_clusters * cs > MAX_REFTABLE_BYTES:
        msg = "refcount table would exceed QEMU's 8 MiB limit; use a larger cluster size"
        raise InvalidArgumentError(msg, field="size", value=size)

    rt_offset = cs
    rb_offset = rt_offset + rt_clusters * cs
    l1_offset = rb_offset + rb_count * cs
    total = 1 + rt_clusters + rb_count + l1_clusters

    extensions: tuple[HeaderExtension, ...] = ()
    if backing_format is not None:
        extensions = (HeaderExtension(EXT_BACKING_FORMAT, backing_format.encode("ascii")),)
    header = Qcow2Header(
        cluster_bits=cluster_bits,
        size=size,
        l1_size=l1_size,
        l1_table_offset=l1_offset,
        refcount_table_offset=rt_offset,
        refcount_table_clusters=rt_clusters,
        incompatible_features=INCOMPAT_EXTL2 if extended_l2 else 0,
        refcount_order=refcount_order,
        extensions=extensions,
        backing_file=backing_file,
    )
    try:
        validate_header(header, source="<new image>")
        head = header.pack()
    except CorruptImageError as exc:  # a backing name that does not fit, for one
        raise InvalidArgumentError(exc.message, field=exc.field, value=exc.value) from None

    reftable = b"".join((rb_offset + i * cs).to_bytes(8, "big") for i in range(rb_count))
    writes: list[tuple[int, bytes]] = [(0, head), (rt_offset, reftable)]
    remaining = total
    for i in range(rb_count):
        ones = min(remaining, entries_per_block)
        writes.append((rb_offset + i * cs, refcount_ones(ones, refcount_order)))
        remaining -= ones
    return NewImageLayout(header, tuple(writes), total * cs)
