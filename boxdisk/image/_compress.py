"""Inflating one compressed qcow2 cluster (zlib raw deflate, or zstd via the extra)."""

from __future__ import annotations

import zlib
from typing import Any

from boxdisk._errors import CorruptImageError, UnsupportedFeatureError
from boxdisk.format import COMPRESSION_ZLIB, COMPRESSION_ZSTD

__all__ = ["decompress_cluster", "require_codec"]


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
    """
    if compression_type == COMPRESSION_ZLIB:
        # QEMU writes raw deflate (windowBits -12); -15 accepts every raw window.
        d = zlib.decompressobj(-15)
        try:
            out = d.decompress(data, cluster_size)
            more = d.decompress(d.unconsumed_tail, 1) if len(out) == cluster_size else b""
        except zlib.error as exc:
            msg = f"{where}: compressed data does not inflate ({exc})"
            raise CorruptImageError(msg, path=path, field=where, value=str(exc)) from None
    else:
        zstandard = _zstd()
        if zstandard is None:
            require_codec(compression_type, path)
        out, more = _zstd_frame(zstandard, data, cluster_size, path=path, where=where)
    if len(out) != cluster_size or more:
        got = f"more than {cluster_size}" if more else str(len(out))
        msg = f"{where}: compressed cluster inflates to {got} bytes, not {cluster_size}"
        raise CorruptImageError(msg, path=path, field=where, value=len(out))
    return bytes(out)


def _zstd_frame(zstandard: Any, data: bytes, cluster_size: int, *, path: str,
                where: str) -> tuple[bytes, bytes]:
    """The first zstd frame of ``data`` (QEMU packs frames back to back), bounded.

    Input goes in 512-byte steps so no step inflates past a few MiB, and
    decoding stops as soon as the output passes one cluster.
    """
    d = zstandard.ZstdDecompressor().decompressobj()
    out = bytearray()
    try:
        for pos in range(0, len(data), 512):
            out += d.decompress(data[pos : pos + 512])
            if d.eof or len(out) > cluster_size:
                break
    except zstandard.ZstdError as exc:
        msg = f"{where}: compressed data does not decompress ({exc})"
        raise CorruptImageError(msg, path=path, field=where, value=str(exc)) from None
    if not d.eof and len(out) <= cluster_size:
        msg = f"{where}: zstd frame is cut short after {len(out)} bytes"
        raise CorruptImageError(msg, path=path, field=where, value=len(out))
    return bytes(out[:cluster_size]), bytes(out[cluster_size : cluster_size + 1])
