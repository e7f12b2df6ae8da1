"""Flat refcount arrays for ``check``: one entry per host cluster, typed by refcount width.

QEMU's check keeps the refcounts it computes in one big in-memory refcount
block (``refcount_table`` in block/qcow2-refcount.c, the "IMRT"). boxdisk does
the same with an :class:`array.array` whose item width follows ``refcount_order``
(bytes for widths up to 8 bits, then 16, 32 and 64 bits), so a file of tens of
GiB costs a few bytes per cluster, never a Python int per cluster.

Refcount blocks on disk are big-endian; sub-byte widths (refcount_order 0-2)
pack entries LSB first (docs/interop/qcow2.txt, "Host cluster management").
"""

from __future__ import annotations

import struct
import sys
from array import array

__all__ = [
    "decode_block",
    "encode_block",
    "last_nonzero",
    "set_entry",
    "typecode",
    "zeros",
]

_TYPECODES = ("B", "B", "B", "B", "H", "I", "Q")
_STRUCT = {4: ">H", 5: ">I", 6: ">Q"}
_SWAP = sys.byteorder == "little"


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
    code = _TYPECODES[order]
    return array(code, bytes(count * array(code).itemsize))


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
    if stop <= start:
        return -1
    raw = values[start:stop].tobytes().rstrip(b"\0")
    if not raw:
        return -1
    return start + (len(raw) - 1) // values.itemsize
