"""flatten and convert: copy a chain's guest bytes into one standalone file.

Both walk the chain's runs (never every virtual cluster): stretches that no
image allocates, or that read as zeros, are skipped without a read; the rest
is read in windows of up to ``_WINDOW`` bytes, and within a window only the
clusters that are not all zeros are written.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

from boxdisk._errors import InvalidArgumentError
from boxdisk._log import get_logger
from boxdisk.chain import BackingChain
from boxdisk.format import MAX_L1_BYTES, l1_entries_for
from boxdisk.image import RunKind

from ._output import atomic_output
from ._sinks import QcowSink, RawSink

__all__ = ["Progress", "convert", "flatten"]

log = get_logger(__name__)

Progress = Callable[[int, int], None]

_WINDOW = 4 * 1024 * 1024
_FORMATS = ("qcow2", "raw")
_DEFAULT_CLUSTER_SIZE = 65536


def _data_windows(chain: BackingChain, granule: int) -> Iterator[tuple[int, int]]:
    """Granule-aligned ``[start, end)`` windows (at most ``_WINDOW`` long) covering every
    byte a DATA or COMPRESSED run holds, in guest order."""
    size = chain.size
    cur_s = cur_e = -1
    for _depth, run in chain.runs():
        if run.kind is not RunKind.DATA and run.kind is not RunKind.COMPRESSED:
            continue
        s = run.start // granule * granule
        e = min(-(-run.end // granule) * granule, size)
        if s <= cur_e:
            cur_e = max(cur_e, e)
            continue
        if cur_e > cur_s:
            yield from _split(cur_s, cur_e)
        cur_s, cur_e = s, e
    if cur_e > cur_s:
        yield from _split(cur_s, cur_e)


def _split(start: int, end: int) -> Iterator[tuple[int, int]]:
    while start < end:
        # Windows end on _WINDOW boundaries so reads stay aligned to large chunks.
        stop = min(end, (start // _WINDOW + 1) * _WINDOW)
        yield start, stop
        start = stop


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _copy(chain: BackingChain, dst: str, output_format: str, *, overwrite: bool,
          progress: Progress | None, cluster_size: int) -> int:
    for path in chain.paths:
        if _same_file(path, dst):
            msg = f"destination is part of the source chain ({path!r})"
            raise InvalidArgumentError(msg, path=dst, field="dst", value=path)
    size = chain.size
    if output_format == "qcow2":
        l1_bytes = 8 * l1_entries_for(size, cluster_size.bit_length() - 1)
        if l1_bytes > MAX_L1_BYTES:
            msg = (f"a {size}-byte disk needs a {l1_bytes}-byte L1 table with "
                   f"{cluster_size}-byte clusters, over QEMU's limit; use larger clusters")
            raise InvalidArgumentError(msg, path=dst, field="cluster_size", value=cluster_size)
    with atomic_output(dst, overwrite=overwrite) as (fd, syncer):
        sink: QcowSink | RawSink
        if output_format == "qcow2":
            sink = QcowSink(fd, size, cluster_size.bit_length() - 1)
        else:
            sink = RawSink(fd, size, cluster_size)
        for start, end in _data_windows(chain, cluster_size):
            buf = bytearray(end - start)
            chain.read_into(start, memoryview(buf))
            sink.write(start, buf)
            syncer.wrote(end - start)
            if progress is not None:
                progress(end, size)
        sink.finish()
        if progress is not None:
            progress(size, size)
    return sink.data_bytes


def _open_source(src: str | os.PathLike[str] | BackingChain, src_format: str | None,
                 backing_format: str | None) -> tuple[BackingChain, bool]:
    if isinstance(src, BackingChain):
        return src, False
    return BackingChain.open(src, format=src_format, backing_format=backing_format), True


def _check_cluster_size(cluster_size: int) -> None:
    if cluster_size & (cluster_size - 1) or not 512 <= cluster_size <= 2 * 1024 * 1024:
        msg = f"cluster size {cluster_size} is not a power of two from 512 B to 2 MiB"
        raise InvalidArgumentError(msg, field="cluster_size", value=cluster_size)


def convert(
    src: str | os.PathLike[str] | BackingChain,
    dst: str | os.PathLike[str],
    *,
    output_format: str,
    src_format: str | None = None,
    backing_format: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    cluster_size: int = _DEFAULT_CLUSTER_SIZE,
) -> int:
    """Copy the guest bytes of ``src`` into a standalone ``dst`` of ``output_format``.

    ``src`` is a path (a qcow2 chain top, or a raw file with
    ``src_format="raw"``) or an open :class:`BackingChain` (left open).
    ``output_format`` is ``"qcow2"`` (a qcow2 v3 without backing file) or
    ``"raw"`` (a sparse raw file). Clusters that read as all zeros are left
    unallocated (holes). ``dst`` is written crash-safely (temporary file, fsync,
    rename, directory fsync); an existing ``dst`` is an error unless
    ``overwrite``. ``progress(done_bytes, total_bytes)`` is called as guest
    bytes are covered. Returns the bytes of data written.
    """
    if output_format not in _FORMATS:
        msg = f"output format {output_format!r} is not one of {', '.join(_FORMATS)}"
        raise InvalidArgumentError(msg, field="output_format", value=output_format)
    _check_cluster_size(cluster_size)
    dst_path = os.fspath(dst)
    t0 = time.perf_counter()
    chain, owned = _open_source(src, src_format, backing_format)
    try:
        data_bytes = _copy(chain, dst_path, output_format, overwrite=overwrite,
                           progress=progress, cluster_size=cluster_size)
    finally:
        if owned:
            chain.close()
    ms = round((time.perf_counter() - t0) * 1000, 1)
    log.info("converted", src=chain.paths[0], dst=dst_path, output_format=output_format,
             depth=len(chain.paths), data_bytes=data_bytes, ms=ms)
    return data_bytes


def flatten(
    src: str | os.PathLike[str] | BackingChain,
    dst: str | os.PathLike[str],
    *,
    progress: Progress | None = None,
    overwrite: bool = False,
    src_format: str | None = None,
    backing_format: str | None = None,
    cluster_size: int = _DEFAULT_CLUSTER_SIZE,
) -> int:
    """Write ``src``'s chain as one standalone qcow2 v3 at ``dst``; return data bytes written.

    The output has no backing file and the same guest-visible bytes as the
    chain (zero clusters over backing data stay zero; compressed clusters are
    inflated). Time follows the allocated data, not the virtual size, and
    memory is bounded (one window, one L2 table, the L1 table). See
    :func:`convert` for ``dst`` handling and ``progress``.
    """
    _check_cluster_size(cluster_size)
    dst_path = os.fspath(dst)
    t0 = time.perf_counter()
    chain, owned = _open_source(src, src_format, backing_format)
    try:
        data_bytes = _copy(chain, dst_path, "qcow2", overwrite=overwrite,
                           progress=progress, cluster_size=cluster_size)
    finally:
        if owned:
            chain.close()
    ms = round((time.perf_counter() - t0) * 1000, 1)
    log.info("flattened", src=chain.paths[0], dst=dst_path, depth=len(chain.paths),
             data_bytes=data_bytes, ms=ms)
    return data_bytes


