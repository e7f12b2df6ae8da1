"""flatten and convert: copy a chain's guest bytes into one standalone file.

Both walk the chain's runs (never every virtual cluster): stretches that no
image allocates, or that read as zeros, are skipped without a read; the rest
is read in windows of up to ``_WINDOW`` bytes, and within a window only the
clusters that are not all zeros are written.

Reading and writing overlap: the calling thread reads a window and plans its
writes while one writer thread writes the previous windows (``_BUFFERS``
windows in flight at most), and the kernel is asked to start writing each
window out at once (:class:`Writeback`), so the final ``fsync`` is short.
Memory is those buffers, the output's L1 table and one L2 table.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator

from boxdisk._args import as_format, as_optional_format, as_path, as_size
from boxdisk._errors import InvalidArgumentError
from boxdisk._formats import FormatArg
from boxdisk._io import pwrite_all
from boxdisk._locks import ensure_consistent_read, ensure_not_in_use
from boxdisk._log import get_logger
from boxdisk.chain import BackingChain
from boxdisk.format import MAX_L1_BYTES, l1_entries_for
from boxdisk.image import RunKind

from ._output import Writeback, atomic_output
from ._sinks import QcowSink, RawSink, Write

__all__ = ["Progress", "convert", "flatten"]

log = get_logger(__name__)

Progress = Callable[[int, int], None]
#: Directories every backing file must lie under (None: anywhere).
Roots = Iterable[str | os.PathLike[str]] | None

_WINDOW = 4 * 1024 * 1024
_BUFFERS = 3
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


class _Writer:
    """One thread that performs planned writes, handing each window's buffer back.

    The caller takes a buffer with :meth:`buffer`, fills it, and passes it
    with its writes to :meth:`submit`; the buffer comes back once they are
    written (and reported to the :class:`Writeback`). The first write error
    stops all further writes (buffers still come back, so the caller never
    waits forever) and is raised by the next :meth:`buffer`, :meth:`submit` or
    :meth:`finish`. :meth:`close` must run before the file descriptor is closed.
    """

    def __init__(self, fd: int, writeback: Writeback, buffers: int, size: int) -> None:
        self._fd, self._writeback = fd, writeback
        self._jobs: queue.SimpleQueue[tuple[list[Write], bytearray | None] | None] = (
            queue.SimpleQueue())
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._spare = buffers
        self._size = size
        self._error: BaseException | None = None
        self._abort = False
        self._thread = threading.Thread(target=self._run, name="boxdisk-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            writes, buf = job
            if self._error is None and not self._abort:
                try:
                    for offset, data in writes:
                        pwrite_all(self._fd, data, offset)
                        self._writeback.wrote(offset, len(data))
                except BaseException as exc:
                    self._error = exc
            if buf is not None:
                self._free.put(buf)

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def buffer(self) -> bytearray:
        """A window buffer (new while fewer than ``buffers`` exist, else a returned one)."""
        self._raise()
        if self._spare:
            self._spare -= 1
            return bytearray(self._size)
        buf = self._free.get()
        self._raise()
        return buf

    def submit(self, writes: list[Write], buf: bytearray | None) -> None:
        """Queue ``writes`` (views into ``buf``); ``buf`` comes back when they are done."""
        self._raise()
        self._jobs.put((writes, buf))

    def close(self) -> None:
        """Stop the thread: queued writes still run, unless the caller failed first."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()

    def abort(self) -> None:
        """Drop the writes still queued and stop the thread."""
        self._abort = True
        self.close()

    def finish(self) -> None:
        """Close, then raise the first write error, if any."""
        self.close()
        self._raise()


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
    with atomic_output(dst, overwrite=overwrite) as (fd, writeback):
        sink: QcowSink | RawSink
        if output_format == "qcow2":
            sink = QcowSink(fd, size, cluster_size.bit_length() - 1)
        else:
            sink = RawSink(fd, size)
        writer = _Writer(fd, writeback, _BUFFERS, _WINDOW)
        try:
            for start, end in _data_windows(chain, cluster_size):
                buf = writer.buffer()
                n = end - start
                chain.read_into(start, memoryview(buf)[:n])
                writer.submit(sink.plan(start, buf, n), buf)
                if progress is not None:
                    progress(end, size)
            writer.submit(sink.finish(), None)
            writer.finish()
        finally:
            writer.abort()
    if progress is not None:  # the last call comes once dst is in place
        progress(size, size)
    return sink.data_bytes


def _open_source(src: str | os.PathLike[str] | BackingChain, src_format: str | None,
                 backing_format: str | None, allowed_roots: Roots, force_share: bool,
                 ) -> tuple[BackingChain, bool]:
    """The source chain, and whether this call opened it (and so closes it).

    A chain opened here is refused, unless ``force_share``, when another
    process holds the write permission on any of its images (as ``qemu-img
    convert`` without ``-U``): a copy of a disk a VM is writing is not a copy.
    """
    if isinstance(src, BackingChain):
        return src, False
    chain = BackingChain.open(src, format=src_format, backing_format=backing_format,
                              allowed_roots=allowed_roots)
    if not force_share:
        try:
            ensure_consistent_read(chain.paths, "copy the disk")
        except BaseException:
            chain.close()
            raise
    return chain, True


def _source_args(src: str | os.PathLike[str] | BackingChain, src_format: FormatArg | None,
                 backing_format: FormatArg | None,
                 ) -> tuple[str | BackingChain, str | None, str | None]:
    """The source (a path as ``str``, or an open chain) and its formats, normalised."""
    source: str | BackingChain = src if isinstance(src, BackingChain) else as_path(src, "src")
    return (source, as_optional_format(src_format, "src_format"),
            as_optional_format(backing_format, "backing_format"))


def _check_destination(dst: str, overwrite: bool) -> None:
    """An existing ``dst`` that a running QEMU holds is never replaced."""
    if overwrite:
        ensure_not_in_use(dst, "replace the destination")


def _check_cluster_size(cluster_size: int) -> None:
    as_size(cluster_size, "cluster_size")
    if cluster_size & (cluster_size - 1) or not 512 <= cluster_size <= 2 * 1024 * 1024:
        msg = f"cluster size {cluster_size} is not a power of two from 512 B to 2 MiB"
        raise InvalidArgumentError(msg, field="cluster_size", value=cluster_size)


def convert(
    src: str | os.PathLike[str] | BackingChain,
    dst: str | os.PathLike[str],
    *,
    output_format: FormatArg,
    src_format: FormatArg | None = None,
    backing_format: FormatArg | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    cluster_size: int = _DEFAULT_CLUSTER_SIZE,
    allowed_roots: Roots = None,
    force_share: bool = False,
) -> int:
    """Copy the guest bytes of ``src`` into a standalone ``dst`` of ``output_format``.

    ``src`` is a path (a qcow2 chain top, or a raw file with
    ``src_format="raw"``) or an open :class:`BackingChain` (left open).
    ``output_format`` is ``"qcow2"`` (a qcow2 v3 without backing file, with
    ``cluster_size`` clusters) or ``"raw"`` (a sparse raw file). Output
    clusters (for raw, 4 KiB blocks, as ``qemu-img convert -S 4k``) that read
    as all zeros are left unallocated (holes). ``dst`` is written crash-safely
    (temporary file, fsync, rename, directory fsync); an existing ``dst`` is an
    error unless ``overwrite``. ``progress(done_bytes, total_bytes)`` is called
    as guest bytes are covered, the last time with ``total_bytes`` once ``dst``
    is in place. Returns the bytes of data written.

    ``allowed_roots`` confines every backing file (see :meth:`BackingChain.open`).
    A source image another process is writing (QEMU's write lock held: a running
    VM) is refused with :class:`DiskInUseError` unless ``force_share=True``; so is
    replacing a ``dst`` a QEMU holds.
    """
    out_format = as_format(output_format, "output_format", allowed=_FORMATS)
    src, src_format, backing_format = _source_args(src, src_format, backing_format)
    _check_cluster_size(cluster_size)
    dst_path = as_path(dst, "dst")
    t0 = time.perf_counter()
    _check_destination(dst_path, overwrite)
    chain, owned = _open_source(src, src_format, backing_format, allowed_roots, force_share)
    try:
        data_bytes = _copy(chain, dst_path, out_format, overwrite=overwrite,
                           progress=progress, cluster_size=cluster_size)
    finally:
        if owned:
            chain.close()
    ms = round((time.perf_counter() - t0) * 1000, 1)
    log.info("converted", src=chain.paths[0], dst=dst_path, output_format=out_format,
             depth=len(chain.paths), data_bytes=data_bytes, ms=ms)
    return data_bytes


def flatten(
    src: str | os.PathLike[str] | BackingChain,
    dst: str | os.PathLike[str],
    *,
    progress: Progress | None = None,
    overwrite: bool = False,
    src_format: FormatArg | None = None,
    backing_format: FormatArg | None = None,
    cluster_size: int = _DEFAULT_CLUSTER_SIZE,
    allowed_roots: Roots = None,
    force_share: bool = False,
) -> int:
    """Write ``src``'s chain as one standalone qcow2 v3 at ``dst``; return data bytes written.

    The output has no backing file and the same guest-visible bytes as the
    chain (zero clusters over backing data stay zero; compressed clusters are
    inflated). Time follows the allocated data, not the virtual size, and
    memory is bounded (one window, one L2 table, the L1 table). See
    :func:`convert` for ``dst`` handling, ``progress``, ``allowed_roots`` and
    ``force_share``.
    """
    src, src_format, backing_format = _source_args(src, src_format, backing_format)
    _check_cluster_size(cluster_size)
    dst_path = as_path(dst, "dst")
    t0 = time.perf_counter()
    _check_destination(dst_path, overwrite)
    chain, owned = _open_source(src, src_format, backing_format, allowed_roots, force_share)
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


