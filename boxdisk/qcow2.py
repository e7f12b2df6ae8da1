"""Native qcow2 creation and backing-file tools, with the seed runtime's names.

``create_disk`` and ``create_cow_child_disk`` write a new image's metadata
directly (no qemu-img): the header cluster, the refcount table and blocks, and
a sparse, all-zero L1 table. A new image is written to a temporary file in the
target directory, fsynced, linked into place (never over an existing file) and
the directory fsynced, so the target path either does not exist or holds a
complete image, whatever instant a crash hits.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from pathlib import Path

import attrs

from ._args import as_path, as_size
from ._disk import Disk, ephemeral_owner
from ._errors import (
    BackingChainError,
    BoxdiskError,
    CorruptImageError,
    DiskExistsError,
    ImageIOError,
    InvalidArgumentError,
)
from ._formats import BackingFormat, DiskFormat
from ._io import fill, link_anonymous, pwrite_all
from ._locks import create_temp
from ._log import get_logger
from .format import (
    MAX_CLUSTER_BITS,
    MIN_CLUSTER_BITS,
    MIN_HEADER_PROBE,
    Qcow2Header,
    cluster_size_of,
    parse_header,
    plan_new_image,
)

__all__ = [
    "DEFAULT_CLUSTER_SIZE",
    "DEFAULT_DISK_SIZE",
    "GUEST_ROOTFS_DISK",
    "MAX_BACKING_CHAIN_DEPTH",
    "BackingFormat",
    "Disk",
    "DiskFormat",
    "ImagePlan",
    "clone_disk_pair",
    "create_cow_child_disk",
    "create_disk",
    "is_backing_dependency",
    "plan_child_disk",
    "plan_disk",
    "qcow2_virtual_size",
    "read_backing_chain",
    "read_backing_file_path",
    "read_header",
    "rewrite_backing_reference",
    "set_backing_file_path",
]

log = get_logger(__name__)

GiB = 1 << 30
DEFAULT_DISK_SIZE = 10 * GiB
DEFAULT_CLUSTER_SIZE = 64 * 1024
#: File name of a box's optional second disk (the seed runtime's name).
GUEST_ROOTFS_DISK = "guest-rootfs.qcow2"
#: How deep ``read_backing_chain`` follows names before it stops with a warning.
MAX_BACKING_CHAIN_DEPTH = 64
_SECTOR = 512
_PROBE = 4096


# -- reading headers ----------------------------------------------------------


def _io_error(path: str | os.PathLike[str], what: str, exc: OSError) -> ImageIOError:
    err = ImageIOError(f"{what}: {exc.strerror or exc}", path=path)
    err.errno = exc.errno
    return err


def read_header(path: str | os.PathLike[str]) -> Qcow2Header:
    """Parse and validate the header (with extensions and backing name) of a qcow2 file."""
    source = as_path(path, "path")
    try:
        # O_NONBLOCK: a FIFO named as an image must not hang (its pread fails instead).
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise _io_error(source, "cannot open image", exc) from None
    try:
        buf = os.pread(fd, _PROBE, 0)
        cluster_size = cluster_size_of(buf[:MIN_HEADER_PROBE], source=source)
        if cluster_size <= len(buf) or len(buf) < _PROBE:
            return parse_header(buf[:cluster_size], source=source)
        try:
            # Nearly every header, its extensions and backing name fit in the probe.
            return parse_header(buf, source=source)
        except CorruptImageError:
            buf += os.pread(fd, cluster_size - _PROBE, _PROBE)
        return parse_header(buf, source=source)
    except OSError as exc:
        raise _io_error(source, "cannot read header", exc) from None
    finally:
        os.close(fd)


def qcow2_virtual_size(path: str | os.PathLike[str]) -> int:
    """The virtual size in bytes recorded in a qcow2 header."""
    return read_header(path).size


def read_backing_file_path(path: str | os.PathLike[str]) -> str | None:
    """The backing name stored in a qcow2 header, verbatim, or None without a backing file."""
    return read_header(path).backing_file


# -- creating images ----------------------------------------------------------


def _cluster_bits(cluster_size: int) -> int:
    as_size(cluster_size, "cluster_size")
    bits = cluster_size.bit_length() - 1
    if cluster_size <= 0 or 1 << bits != cluster_size or not (
        MIN_CLUSTER_BITS <= bits <= MAX_CLUSTER_BITS
    ):
        msg = f"cluster size {cluster_size} is not a power of two between 512 B and 2 MiB"
        raise InvalidArgumentError(msg, field="cluster_size", value=cluster_size)
    return bits


def _round_size(size: int, param: str = "size") -> int:
    checked = as_size(size, param)
    assert checked is not None
    # QEMU rounds a qcow2's virtual size up to whole 512-byte sectors.
    return -(-checked // _SECTOR) * _SECTOR


def _check_persistent(persistent: object) -> None:
    if not isinstance(persistent, bool):
        msg = f"persistent must be True or False, not {persistent!r}"
        raise InvalidArgumentError(msg, field="persistent", value=repr(persistent)[:200])


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_new_image(path: Path, writes: tuple[tuple[int, bytes], ...], file_size: int, *,
                     replace: bool = False) -> bool:
    """Write a complete image at ``path`` atomically; False if the path was taken meanwhile.

    With ``replace=True`` an existing file is replaced (rename over it).
    """
    directory = os.path.dirname(path) or "."
    if not replace:
        linked = link_anonymous(directory, path.name, writes, file_size, sync=True)
        if linked is not None:
            return linked
    # Locked until it is in place or gone: a stale one (its writer killed) is removable.
    fd, tmp = create_temp(directory, path.name, 0o644)
    try:
        fill(fd, writes, file_size)
        os.fsync(fd)
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # unlike rename, never replaces an existing file
            except FileExistsError:
                return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.close(fd)
    _fsync_dir(directory)
    return True


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _io_error(path.parent, "cannot create parent directory", exc) from None


def _same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _existing(path: Path, *, size: int, backing: Path | None, backing_format: str | None) -> Disk:
    """Return an existing image at ``path`` if it is the image asked for, else raise.

    The handle returned never deletes the file (this call did not create it).
    A file that an armed ephemeral handle of this process will delete is
    refused: handing it out as a disk to keep would be a promise broken as
    soon as the other handle closes.
    """
    owner = ephemeral_owner(path)
    if owner is not None:
        msg = ("path holds an ephemeral disk another handle of this process will delete when "
               "it closes; leak() that handle to keep the file, or close it first")
        raise DiskExistsError(msg, path=path)
    try:
        header = read_header(path)
    except BoxdiskError as exc:
        msg = f"path exists and is not a usable qcow2 image ({exc.message}); not overwriting"
        raise DiskExistsError(msg, path=path) from exc
    problems = []
    if header.size != size:
        problems.append(f"virtual size {header.size}, wanted {size}")
    if backing is None and header.backing_file is not None:
        problems.append(f"backing file {header.backing_file!r}, wanted none")
    if backing is not None:
        found = header.backing_file
        resolved = None if found is None else os.path.join(os.path.dirname(path), found)
        if resolved is None or not _same_file(resolved, backing):
            problems.append(f"backing file {found!r}, wanted {os.fspath(backing)!r}")
        elif header.backing_format != backing_format:
            problems.append(f"backing format {header.backing_format!r}, wanted {backing_format!r}")
    if problems:
        msg = "path exists with a different image (" + "; ".join(problems) + "); not overwriting"
        raise DiskExistsError(msg, path=path)
    log.debug("disk_exists_reused", path=str(path))
    # The caller did not create this file, so its handle must never delete it.
    return Disk(path, DiskFormat.QCOW2, persistent=True)


def create_disk(
    path: str | os.PathLike[str],
    persistent: bool,
    *,
    size: int = DEFAULT_DISK_SIZE,
    cluster_size: int = DEFAULT_CLUSTER_SIZE,
) -> Disk:
    """Create a standalone, sparse qcow2 v3 image of ``size`` virtual bytes.

    ``persistent`` has no default, so every caller says what it wants: True
    keeps the file; False makes the handle ephemeral (the file is deleted when
    it closes; garbage collection without ``close()`` deletes it too, with a
    ``ResourceWarning``). Parent directories are created. An existing valid
    qcow2 of the same size and no backing file is returned as a persistent
    handle (never deleted by it); anything else at ``path`` raises
    :class:`DiskExistsError`.
    """
    start = time.perf_counter()
    target = Path(as_path(path, "path"))
    _check_persistent(persistent)
    plan = plan_disk(size, cluster_size=cluster_size)
    size = plan.size
    _make_parent(target)
    if os.path.lexists(target):
        return _existing(target, size=size, backing=None, backing_format=None)
    try:
        created = _write_new_image(target, plan.writes, plan.file_size)
    except OSError as exc:
        raise _io_error(target, "cannot create disk", exc) from None
    if not created:
        return _existing(target, size=size, backing=None, backing_format=None)
    log.info("disk_created", path=str(target), size=size, cluster_size=cluster_size,
             persistent=persistent, ms=round((time.perf_counter() - start) * 1000, 3))
    return Disk(target, DiskFormat.QCOW2, persistent)


def _base_size(base: Path, base_real: str, fmt: BackingFormat) -> int:
    """The base's virtual size; raises if it is not a regular file (or not a qcow2)."""
    try:
        st = os.stat(base_real)
    except OSError:
        st = None
    if st is None or not stat.S_ISREG(st.st_mode):
        msg = "base disk does not exist or is not a regular file"
        raise BackingChainError(msg, path=base, field="backing_file", value=os.fspath(base))
    if fmt is BackingFormat.QCOW2:
        return read_header(base_real).size
    return st.st_size


def _backing_name(base_real: str, child: Path, relative: bool) -> str:
    if not relative:
        return base_real
    child_dir = os.path.realpath(child.parent)
    return os.path.relpath(base_real, child_dir)


@attrs.define(frozen=True)
class ImagePlan:
    """The bytes of a new, empty image, not yet written: for a writer of its own (the store).

    ``writes`` are (offset, bytes) pairs; the file is ``file_size`` bytes long
    (the rest is holes); ``size`` is the virtual size; ``backing_name`` the
    backing file named in the header (None for a standalone image).
    """

    size: int
    writes: tuple[tuple[int, bytes], ...]
    file_size: int
    backing_name: str | None = None


def plan_disk(size: int = DEFAULT_DISK_SIZE, *, cluster_size: int = DEFAULT_CLUSTER_SIZE,
              backing_name: str | None = None,
              backing_format: BackingFormat | str | None = None) -> ImagePlan:
    """What :func:`create_disk` would write for ``size``, without writing it.

    With ``backing_name`` (and its ``backing_format``), an empty child naming
    that backing file, as written (nothing is resolved or checked: the caller
    knows the file).
    """
    size = _round_size(size)
    fmt = None if backing_format is None else BackingFormat.parse(backing_format).as_str()
    if (backing_name is None) != (fmt is None):
        msg = "backing_name and backing_format go together"
        raise InvalidArgumentError(msg, field="backing_format", value=backing_format)
    layout = plan_new_image(size, cluster_bits=_cluster_bits(cluster_size),
                            backing_file=backing_name, backing_format=fmt)
    return ImagePlan(size, layout.writes, layout.file_size, backing_name)


def plan_child_disk(base_disk: str | os.PathLike[str], backing_format: BackingFormat | str,
                    child_path: str | os.PathLike[str], virtual_size: int | None = None, *,
                    relative: bool = False, cluster_size: int = DEFAULT_CLUSTER_SIZE,
                    backing_name: str | None = None) -> ImagePlan:
    """What :func:`create_cow_child_disk` would write at ``child_path``, without writing it.

    The base is checked as there (a regular file; a qcow2 base must be one);
    nothing is created. ``backing_name`` is written instead of the name of
    ``base_disk`` (for a caller about to rename the base to that name).
    """
    fmt = BackingFormat.parse(backing_format)
    base = Path(as_path(base_disk, "base_disk"))
    child = Path(as_path(child_path, "child_path"))
    if virtual_size is not None:
        as_size(virtual_size, "virtual_size")
    base_real = os.path.realpath(base)
    base_size = _base_size(base, base_real, fmt)
    size = _round_size(base_size if virtual_size is None else virtual_size, "virtual_size")
    if backing_name is None:
        backing_name = _backing_name(base_real, child, relative)
    layout = plan_new_image(size, cluster_bits=_cluster_bits(cluster_size),
                            backing_file=backing_name, backing_format=fmt.as_str())
    return ImagePlan(size, layout.writes, layout.file_size, backing_name)


def create_cow_child_disk(
    base_disk: str | os.PathLike[str],
    backing_format: BackingFormat | str,
    child_path: str | os.PathLike[str],
    virtual_size: int | None = None,
    *,
    persistent: bool,
    relative: bool = False,
    cluster_size: int = DEFAULT_CLUSTER_SIZE,
) -> Disk:
    """Create a qcow2 v3 child whose unwritten clusters read from ``base_disk``.

    The header names the base (its real path, or a path relative to the
    child's directory with ``relative=True``) and its format in the
    backing-format extension; nothing is probed. ``virtual_size=None`` takes
    the base's size. The file and its directory are fsynced before return.

    ``persistent`` has no default: True keeps the child; False makes the
    handle ephemeral (``leak()`` keeps it after all). An existing child with
    the same backing and size is returned as a persistent handle (it never
    deletes a file it did not create); anything else at ``child_path`` raises
    :class:`DiskExistsError`.
    """
    start = time.perf_counter()
    fmt = BackingFormat.parse(backing_format)
    base = Path(as_path(base_disk, "base_disk"))
    child = Path(as_path(child_path, "child_path"))
    _check_persistent(persistent)
    # Checks the size and the base (for qcow2, that it is one) before anything is made.
    plan = plan_child_disk(base, fmt, child, virtual_size, relative=relative,
                           cluster_size=cluster_size)
    size, name = plan.size, plan.backing_name
    _make_parent(child)
    if os.path.lexists(child):
        return _existing(child, size=size, backing=base, backing_format=fmt.as_str())
    try:
        created = _write_new_image(child, plan.writes, plan.file_size)
    except OSError as exc:
        raise _io_error(child, "cannot create child disk", exc) from None
    if not created:
        return _existing(child, size=size, backing=base, backing_format=fmt.as_str())
    log.info("child_created", path=str(child), backing=name, backing_format=fmt.as_str(),
             size=size, persistent=persistent,
             ms=round((time.perf_counter() - start) * 1000, 3))
    return Disk(child, DiskFormat.QCOW2, persistent)


# -- backing-file tools -------------------------------------------------------


def set_backing_file_path(
    qcow2_path: str | os.PathLike[str],
    new_backing: str | os.PathLike[str],
    *,
    backing_format: BackingFormat | str | None = None,
    relative: bool = False,
) -> None:
    """Point an image's header at another backing file (a header-only, unsafe rebase).

    No data is copied: use it when the new backing file holds the same bytes
    as the old one (a moved base). ``backing_format`` rewrites the
    backing-format extension; without it the old one is kept. Bytes of a
    longer old name are zeroed; unknown autoclear feature bits are cleared (as
    ``qemu-img rebase -u`` clears them). The header is rewritten in place and
    fsynced.
    """
    path = Path(as_path(qcow2_path, "qcow2_path"))
    new_backing = as_path(new_backing, "new_backing")
    if backing_format is not None:
        backing_format = BackingFormat.parse(backing_format)
    header = read_header(path)
    if header.backing_file is None:
        msg = "cannot rebase: no existing backing file reference"
        raise InvalidArgumentError(msg, path=path, field="backing_file", value=None)
    new_real = os.path.realpath(new_backing)
    if not os.path.isfile(new_real):
        msg = f"cannot resolve new backing {os.fspath(new_backing)!r}: no such file"
        raise BackingChainError(msg, path=path, field="backing_file",
                                value=os.fspath(new_backing))
    fmt = header.backing_format if backing_format is None else BackingFormat.parse(
        backing_format
    ).as_str()
    name = _backing_name(new_real, path, relative)
    rewrite_backing_reference(path, name, fmt, header=header)


def rewrite_backing_reference(
    path: str | os.PathLike[str],
    name: str | None,
    backing_format: str | None,
    *,
    header: Qcow2Header | None = None,
    sync: bool = True,
) -> None:
    """Rewrite the header's backing name and backing-format extension in place, then fsync.

    ``name=None`` makes the image standalone (the extension goes too). Other
    extensions are kept verbatim; bytes of a longer old name are zeroed;
    unknown autoclear feature bits are cleared, as the spec asks of a writer
    that does not know them (:meth:`Qcow2Header.without_unknown_autoclear`).
    The header stays inside the first cluster, written with one ``pwrite``.
    ``sync=False`` leaves the fsync to a caller that makes many files durable
    at once (the store's barrier).
    """
    if header is None:
        header = read_header(path)
    new_header = header.with_backing(
        name, backing_format if name is not None else None).without_unknown_autoclear()
    try:
        data = new_header.pack()
    except CorruptImageError as exc:
        raise InvalidArgumentError(exc.message, path=path, field=exc.field,
                                   value=exc.value) from None
    old_end = header.backing_file_offset + header.backing_file_size
    data += bytes(max(0, old_end - len(data)))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            pwrite_all(fd, data, 0)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise _io_error(path, "cannot rewrite header", exc) from None
    log.info("backing_file_set", path=os.fspath(path), old=header.backing_file, backing=name,
             backing_format=backing_format)


def _resolve_backing(image: str, name: str) -> str:
    """Resolve a backing name as QEMU does: relative to the naming image's directory."""
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(image), name)


def read_backing_chain(
    path: str | os.PathLike[str], *, max_depth: int = MAX_BACKING_CHAIN_DEPTH
) -> list[Path]:
    """Paths of every image under ``path`` in its backing chain, nearest first.

    Relative names resolve against the directory of the image naming them.
    The walk stops, with a logged warning, at an unreadable header, a missing
    file, a backing file of unknown format (never probed), a cycle, or after
    ``max_depth`` files; what was found so far is returned.
    """
    chain: list[Path] = []
    current = path = as_path(path, "path")
    try:
        st = os.stat(current)
    except OSError as exc:
        log.warning("backing_chain_unreadable", path=current, error=str(exc))
        return chain
    seen = {(st.st_dev, st.st_ino)}
    fmt: str | None = "qcow2"
    for _ in range(max_depth):
        if fmt != "qcow2":
            if fmt is None:
                log.warning("backing_chain_format_unknown", path=current,
                            reason="no backing-format extension; not probing")
            return chain
        try:
            header = read_header(current)
        except BoxdiskError as exc:
            log.warning("backing_chain_unreadable", path=current, error=str(exc))
            return chain
        if header.backing_file is None:
            return chain
        nxt = _resolve_backing(current, header.backing_file)
        try:
            st = os.stat(nxt)
        except OSError:
            log.warning("backing_chain_missing", path=current, backing=nxt)
            return chain
        if (st.st_dev, st.st_ino) in seen:
            log.warning("backing_chain_cycle", path=current, backing=nxt)
            return chain
        seen.add((st.st_dev, st.st_ino))
        chain.append(Path(nxt))
        current, fmt = nxt, header.backing_format
    log.warning("backing_chain_too_deep", path=os.fspath(path), max_depth=max_depth)
    return chain


def is_backing_dependency(
    target: str | os.PathLike[str], chain_root: str | os.PathLike[str]
) -> bool:
    """Whether ``target`` is a file in the backing chain under ``chain_root``."""
    target, chain_root = as_path(target, "target"), as_path(chain_root, "chain_root")
    try:
        st = os.stat(target)
    except OSError:
        return False
    key = (st.st_dev, st.st_ino)
    for backing in read_backing_chain(chain_root):
        try:
            b = os.stat(backing)
        except OSError:
            continue
        if (b.st_dev, b.st_ino) == key:
            return True
    return False


def clone_disk_pair(
    src_container: str | os.PathLike[str],
    dst_container: str | os.PathLike[str],
    src_guest: str | os.PathLike[str],
    dst_dir: str | os.PathLike[str],
    *,
    relative: bool = False,
) -> tuple[Path, Path | None]:
    """COW children of a box's container disk and, when it exists, its guest disk.

    The container child goes to ``dst_container``, the guest child to
    ``dst_dir/guest-rootfs.qcow2``; both back onto their sources as qcow2
    (by real path, or relative to the child's directory with ``relative=True``).
    All or nothing: if the second child fails, the first is removed. Returns
    the two paths (the second None without a guest disk); both are kept.
    """
    src_container, dst_container = (as_path(src_container, "src_container"),
                                    as_path(dst_container, "dst_container"))
    src_guest, dst_dir = as_path(src_guest, "src_guest"), as_path(dst_dir, "dst_dir")
    container = create_cow_child_disk(
        src_container, BackingFormat.QCOW2, dst_container, qcow2_virtual_size(src_container),
        relative=relative, persistent=False,
    )
    guest: Disk | None = None
    try:
        if os.path.exists(src_guest):
            guest = create_cow_child_disk(
                src_guest,
                BackingFormat.QCOW2,
                Path(dst_dir) / GUEST_ROOTFS_DISK,
                qcow2_virtual_size(src_guest),
                relative=relative, persistent=False,
            )
    except BaseException:
        # Deletes it only if this call created it (an existing child comes back
        # persistent), and also inside a store, where close() never deletes.
        container._discard()
        raise
    log.info("disk_pair_cloned", container=str(container.path),
             guest=None if guest is None else str(guest.path))
    return container.leak(), None if guest is None else guest.leak()
