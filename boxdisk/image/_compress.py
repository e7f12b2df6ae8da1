"""Inflating one compressed qcow2 cluster (zlib raw deflate, or zstd via the extra).

Reference: docs/interop/qcow2.txt, "Compressed Clusters Descriptor", and QEMU's
block/qcow2-threads.c (``qcow2_zlib_decompress``, ``qcow2_zstd_decompress``),
whose acceptance rules these decoders follow, with one deliberate difference:
a zlib stream that would inflate past one cluster is refused here, where QEMU
silently cuts it at the cluster's end.
"""

from __future__ import annotations

import zlib
from typing import Any

from boxdisk._errors import CorruptImageError, UnsupportedFeatureError
from boxdisk.format import COMPRESSION_ZLIB, COMPRESSION_ZSTD

__all__ = ["decompress_cluster", "require_codec"]

#: QEMU writes raw deflate with windowBits -12 but inflates a whole cluster in one
#: call into the cluster buffer, so any distance back into the bytes inflated so far
#: works there; -15 (deflate's largest window) accepts exactly those streams here.
_ZLIB_WBITS = -15
#: zstd input is fed in steps this large so that no step can inflate to more
#: than a few MiB, however hostile the stream.
_ZSTD_STEP = 512


def _zstd() -> Any:
    try:
        import zstandard  # noqa: PLC0415 - optional extra, imported only when needed
    except ImportError:
        return None
    return zstandard


def require_codec(compression_type: int, path: str) -> None:
    """Refuse an image whose compression type cannot be decoded here."""
    if compression_type == COMPRESSION_ZSTD and _zstd() is None:
        msg = (
            "image uses zstd compression (compression_type 1); "
            "install the extra: pip install boxdisk[zstd]"
        )
        raise UnsupportedFeatureError(msg, path=path, field="compression_type",
                                      value=compression_type)


def decompress_cluster(
    data: bytes, compression_type: int, cluster_size: int, *, path: str, where: str
) -> bytes:
    """Inflate ``data`` to exactly one cluster, else CorruptImageError naming ``where``.

    Trailing bytes after the stream are allowed: descriptors are rounded up to
    512-byte sectors (docs/interop/qcow2.txt, "Compressed Clusters Descriptor").
    Memory and time are bounded by ``len(data)`` and ``cluster_size``.
    """
    if compression_type == COMPRESSION_ZLIB:
        out, more = _zlib_cluster(data, cluster_size, path=path, where=where)
    elif compression_type == COMPRESSION_ZSTD:
        zstandard = _zstd()
        if zstandard is None:
            require_codec(compression_type, path)
        out, more = _zstd_cluster(zstandard, data, cluster_size, path=path, where=where)
    else:  # the header codec refuses other types; this guards direct callers
        msg = f"{where}: unknown compression type {compression_type}"
        raise UnsupportedFeatureError(msg, path=path, field="compression_type",
                                      value=compression_type)
    if len(out) != cluster_size or more:
        got = f"more than {cluster_size}" if more else str(len(out))
        msg = f"{where}: compressed cluster inflates to {got} bytes, not {cluster_size}"
        raise CorruptImageError(msg, path=path, field=where, value=len(out))
    return out


def _zlib_cluster(data: bytes, cluster_size: int, *, path: str,
                  where: str) -> tuple[bytes, bool]:
    """Raw deflate, as QEMU inflates it: one cluster of output, then "is there more?"."""
    d = zlib.decompressobj(_ZLIB_WBITS)
    try:
        out = d.decompress(data, cluster_size)
        more = (len(out) == cluster_size and not d.eof
                and bool(d.decompress(d.unconsumed_tail, 1)))
    except zlib.error as exc:
        msg = f"{where}: compressed data does not inflate ({exc})"
        raise CorruptImageError(msg, path=path, field=where, value=str(exc)) from None
    return out, more


def _zstd_cluster(zstandard: Any, data: bytes, cluster_size: int, *, path: str,
                  where: str) -> tuple[bytes, bool]:
    """zstd frames back to back until one cluster is full, as QEMU decodes them.

    QEMU accepts a cluster made of several frames and refuses one whose last
    frame is unfinished when the cluster is full (qcow2_zstd_decompress).
    """
    out = bytearray()
    pos, end = 0, len(data)
    try:
        while len(out) < cluster_size:
            d = zstandard.ZstdDecompressor().decompressobj()
            while not d.eof and len(out) <= cluster_size and pos < end:
                step = data[pos : pos + _ZSTD_STEP]
                out += d.decompress(step)
                pos += len(step)
            if len(out) > cluster_size:
                return bytes(out[:cluster_size]), True
            if not d.eof:
                what = "unfinished when the cluster is full" if len(out) == cluster_size \
                    else f"cut short after {len(out)} bytes"
                msg = f"{where}: zstd frame is {what}"
                raise CorruptImageError(msg, path=path, field=where, value=len(out))
            pos -= len(d.unused_data)
    except zstandard.ZstdError as exc:
        msg = f"{where}: compressed data does not decompress ({exc})"
        raise CorruptImageError(msg, path=path, field=where, value=str(exc)) from None
    return bytes(out), False
