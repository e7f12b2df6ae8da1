"""``BoxStore``: per-box directories of qcow2 disks, with snapshots, clones and safe removal.

Every operation is all-or-nothing across processes and crashes:

- it takes the locks of the boxes (or base) it touches, in sorted order, and
  the store-wide lock only around the steps that link, rename, create or
  delete images (so ``gc``, ``verify`` and the removal guard, which scan under
  that lock, never see half a step);
- it records its intent in the journal before its first step, and each step is
  an atomic create, link, rename or one-write header change followed by the
  fsyncs that make it durable;
- whoever next takes one of its locks (or opens the store) undoes an
  interrupted operation that had not reached its point of no return, and
  finishes one that had (telling which from the files themselves).

Dependencies are read from the images' headers (:class:`DependencyGraph`),
never from metadata: a disk anything backs onto is never removed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from boxdisk._args import as_format, as_path
from boxdisk._errors import (
    AlreadyExistsError,
    BoxdiskError,
    CorruptImageError,
    DependentsExistError,
    ImageIOError,
    InvalidArgumentError,
    LockTimeoutError,
    NotFoundError,
    SnapshotInUseError,
    StoreError,
    StoreFormatError,
)
from boxdisk._formats import FormatArg
from boxdisk._locks import ensure_not_in_use, image_in_use, remove_stale_temp, temp_held
from boxdisk._log import get_logger
from boxdisk.chain import open_chain
from boxdisk.graph import DependencyGraph
from boxdisk.ops import Progress, check, flatten, rebase
from boxdisk.qcow2 import (
    DEFAULT_DISK_SIZE,
    BackingFormat,
    clone_disk_pair,
    create_cow_child_disk,
    create_disk,
    read_header,
    rewrite_backing_reference,
)

from ._fs import (
    copy_sparse,
    dump_json,
    fsync_dir,
    make_read_only,
    make_writable,
    read_json,
    remove_tree,
    write_new_file,
)
from ._journal import Journal, Record, crashpoint, new_opid
from ._layout import (
    BASE_META,
    BOX_META,
    CLONE_META,
    CONTAINER_DISK,
    DISK_NAMES,
    FORMAT_NAME,
    FORMAT_VERSION,
    META_DIR,
    SNAPSHOT_META,
    Layout,
)
from ._locks import StoreLocks
from ._names import check_name
from ._values import Box, GcReport, Snapshot, VerifyReport
from ._verify import Verifier

__all__ = ["BoxStore"]

log = get_logger(__name__)

def _box_key(box_id: str) -> str:
    return f"box:{box_id}"


def _base_key(name: str) -> str:
    return f"base:{name}"


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


def _moved_name(old: str | None, from_dir: Path, to_dir: Path) -> str | None:
    """The backing name that resolves, from ``to_dir``, to what ``old`` did from ``from_dir``."""
    if old is None or os.path.isabs(old):
        return old
    target = os.path.normpath(os.path.join(from_dir, old))
    return os.path.relpath(target, to_dir)


def _fix_backing_name(image: Path, old: str | None, new: str | None) -> None:
    """Rewrite a moved image's backing name from ``old`` to ``new`` (idempotent).

    A relative name resolves against the image's directory, so an image
    renamed into another directory needs the name that reaches the same file
    from there. The header is rewritten in place (one write, fsynced).
    """
    if new == old:
        return
    header = read_header(image)
    if header.backing_file == old:
        rewrite_backing_reference(image, new, header.backing_format, header=header)


def _freeze_committed(live_dir: Path, frozen_dir: Path,
                      entries: list[dict[str, Any]]) -> bool:
    """Whether freezing passed its point of no return: a name fixed or a disk swapped."""
    for e in entries:
        frozen = frozen_dir / e["disk"]
        if not frozen.exists():
            continue
        if e["new"] != e["old"] and read_header(frozen).backing_file == e["new"]:
            return True
        if not _same_file(frozen, live_dir / e["disk"]):
            return True
    return False


def _freeze_undo(live_dir: Path, frozen_dir: Path, entries: list[dict[str, Any]]) -> None:
    """Roll back a freeze short of its point of no return: remove the frozen directory.

    Its files are then extra links of the live disks (:func:`_freeze_committed`
    said so), so dropping them loses nothing.
    """
    for e in entries:
        frozen = frozen_dir / e["disk"]
        if os.path.lexists(frozen) and _same_file(frozen, live_dir / e["disk"]):
            os.unlink(frozen)
    remove_tree(frozen_dir)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _host_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def _hidden_with(directory: Path, opid: str) -> list[Path]:
    """Hidden entries of ``directory`` that belong to operation ``opid`` (its staging files)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return [directory / n for n in names if n.startswith(".") and opid in n]


def _remove_paths(paths: Iterable[Path]) -> None:
    for p in paths:
        remove_tree(p)


@contextlib.contextmanager
def _reported(what: str, root: Path) -> Iterator[None]:
    """Raise an OSError of the block (a full disk, an I/O error) as ImageIOError naming the file.

    ``errno`` is kept, so a caller can tell a full disk (``ENOSPC``) from other failures.
    """
    try:
        yield
    except BoxdiskError:
        raise
    except OSError as exc:
        path = exc.filename if exc.filename is not None else root
        msg = f"{what} failed: {exc.strerror or exc}"
        err = ImageIOError(msg, path=path, field="errno",
                           value=errno.errorcode.get(exc.errno or 0, exc.errno))
        err.errno = exc.errno
        raise err from exc


def _check_size(size: object) -> int | None:
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        msg = f"size {size!r} is not a non-negative number of bytes"
        raise InvalidArgumentError(msg, field="size", value=size)
    return size


class BoxStore:
    """A directory of boxes, bases, snapshots and clone bases, shared by any number of processes.

    ``BoxStore(root)`` creates the layout on first use (in a missing or empty
    directory) and opens an existing store otherwise, finishing or rolling back
    whatever a crashed process left in flight. ``lock_timeout`` bounds every
    wait for another process's lock (:class:`LockTimeoutError`).

    Lifecycle: open from construction until :meth:`close` (idempotent); use it
    as a context manager. The store holds no file open between operations.
    """

    def __init__(self, root: str | os.PathLike[str], *, lock_timeout: float = 30.0) -> None:
        if not isinstance(lock_timeout, (int, float)) or lock_timeout < 0:
            msg = f"lock_timeout {lock_timeout!r} is not a non-negative number of seconds"
            raise InvalidArgumentError(msg, field="lock_timeout", value=lock_timeout)
        self._closed = True
        self._layout = Layout(Path(os.path.realpath(as_path(root, "root"))))
        with _reported("opening the store", self._layout.root):
            self._open_or_create()
            self._locks = StoreLocks(self._layout, float(lock_timeout))
            self._journal = Journal(self._layout)
            self._roots = (str(self._layout.root),)
            self._closed = False
            self._recover_dead()

    # -- lifecycle ---------------------------------------------------------------

    @property
    def root(self) -> Path:
        """The store's directory (its real path)."""
        return self._layout.root

    @property
    def lock_timeout(self) -> float:
        """Seconds any operation waits for another process's lock."""
        return self._locks.timeout

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._closed

    def close(self) -> None:
        """Forget the store's lock objects; later calls raise. Idempotent."""
        if not self._closed:
            self._closed = True
            self._locks.close()

    def __enter__(self) -> BoxStore:
        self._check_open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<BoxStore {self.root}{' closed' if self._closed else ''}>"

    def _check_open(self) -> None:
        if self._closed:
            msg = "the store is closed"
            raise StoreError(msg, path=self._layout.root, field="store")

    # -- opening -------------------------------------------------------------------

    def _open_or_create(self) -> None:
        lay = self._layout
        root = lay.root
        if os.path.lexists(root) and not root.is_dir():
            msg = "not a boxdisk store: the path is not a directory"
            raise StoreFormatError(msg, path=root, field="root")
        if not lay.meta.is_dir():
            self._create_layout()
        self._check_marker()
        for sub in (lay.journal, lay.locks, lay.trash, lay.bases, lay.boxes, lay.clones):
            if not sub.is_dir():
                sub.mkdir(exist_ok=True)

    def _create_layout(self) -> None:
        lay = self._layout
        root = lay.root
        try:
            root.mkdir(parents=True, exist_ok=True)
            others = [n for n in os.listdir(root) if not n.startswith(f"{META_DIR}.init-")]
        except OSError as exc:
            msg = f"cannot create the store directory: {exc.strerror}"
            raise StoreError(msg, path=root, field="root") from None
        if others and META_DIR not in others:
            msg = (f"not a boxdisk store (no {META_DIR}/) and not empty "
                   f"({len(others)} entries); refusing to turn it into one")
            raise StoreFormatError(msg, path=root, field=META_DIR)
        if META_DIR in others:
            return
        staging = root / f"{META_DIR}.init-{new_opid()}"
        try:
            staging.mkdir()
            for name in ("journal", "locks", "trash"):
                (staging / name).mkdir()
            write_new_file(staging / "store.json", dump_json(
                {"format": FORMAT_NAME, "version": FORMAT_VERSION, "created": time.time()}))
            fsync_dir(staging)
            try:
                os.rename(staging, lay.meta)  # atomic: another creator may win the race
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
            for sub in (lay.bases, lay.boxes, lay.clones):
                sub.mkdir(exist_ok=True)
            fsync_dir(root)
        except OSError as exc:
            msg = f"cannot create the store layout: {exc.strerror}"
            raise StoreError(msg, path=root, field="root") from None
        finally:
            remove_tree(staging)
        log.info("store_created", root=str(root))

    def _check_marker(self) -> None:
        marker = self._layout.marker
        try:
            info = read_json(marker)
        except FileNotFoundError:
            msg = f"not a boxdisk store: {META_DIR}/store.json is missing"
            raise StoreFormatError(msg, path=self._layout.root, field="store.json") from None
        except StoreError as exc:
            raise StoreFormatError(exc.message, path=marker, field="store.json") from None
        if not isinstance(info, dict) or info.get("format") != FORMAT_NAME:
            msg = f"not a boxdisk store: store.json says {info!r}"
            raise StoreFormatError(msg, path=marker, field="format", value=info)
        version = info.get("version")
        if not isinstance(version, int) or version < 1:
            msg = f"store.json has no valid version ({version!r})"
            raise StoreFormatError(msg, path=marker, field="version", value=version)
        if version > FORMAT_VERSION:
            msg = (f"the store was written by a newer boxdisk (store version {version}; "
                   f"this boxdisk reads version {FORMAT_VERSION}); nothing was changed")
            raise StoreFormatError(msg, path=marker, field="version", value=version)

    # -- locks, intents and recovery -------------------------------------------------

    @contextlib.contextmanager
    def _operation(self, op: str, keys: Iterable[str]) -> Iterator[None]:
        """Hold the locks of ``keys`` for an operation, first recovering what crashed there."""
        self._check_open()
        wanted = set(keys)
        what = f"{op} ({', '.join(sorted(wanted))})"
        for _ in range(16):
            with self._locks.hold(wanted, what):
                names = self._journal.touching(tuple(wanted))
                records = [r for r in map(self._journal.load, names) if r is not None]
                need = wanted.union(*(r.keys for r in records))
                if need == wanted:
                    with _reported(op, self._layout.root):
                        for record in records:
                            self._recover(record)
                        yield
                    return
            # A crashed operation held more locks than we do: take them all, then recover.
            wanted = need
        msg = f"could not settle the locks for {op}: interrupted operations keep appearing"
        raise StoreError(msg, path=self._layout.root, field="journal")

    @contextlib.contextmanager
    def _intent(self, op: str, keys: tuple[str, ...], data: dict[str, Any],
                opid: str) -> Iterator[Record]:
        """Journal ``op`` for the block; on an exception, undo (or finish) it before raising."""
        record = self._journal.begin(op, keys, data, opid=opid)
        try:
            yield record
        except LockTimeoutError:
            # The store lock (which undoing needs too) is busy: the record stays, and the
            # next operation on these boxes, gc() or a reopen undoes it.
            log.warning("operation_left_for_recovery", op=op, opid=opid)
            raise
        except BaseException:
            try:
                self._recover(record)
            except (BoxdiskError, OSError) as exc:
                log.exception("operation_recovery_failed", op=op, opid=opid, error=str(exc),
                          hint="the record stays in the journal; the next open retries")
            raise
        self._journal.finish(record)

    def _recover(self, record: Record) -> None:
        """Undo an interrupted operation, or finish it if it passed its point of no return.

        Each operation's recovery tells from the files which side of that
        point it stopped on; all of them are idempotent.
        """
        recover: dict[str, Callable[[Record], None]] = {
            "create_box": self._recover_staged_box,
            "import_box": self._recover_staged_box,
            "add_base": self._recover_add_base,
            "snapshot": self._recover_snapshot,
            "restore": self._recover_restore,
            "clone_box": self._recover_clone,
            "remove_snapshot": self._recover_remove_snapshot,
            "remove_box": self._recover_remove_box,
        }
        fn = recover.get(record.op)
        if fn is None:
            msg = f"journal record of an unknown operation {record.op!r}"
            raise StoreFormatError(msg, path=record.path, field="op", value=record.op)
        with self._locks.structural(f"recover {record.op} {record.opid}"):
            fn(record)
        self._journal.finish(record)
        log.info("operation_recovered", op=record.op, opid=record.opid)

    def _recover_dead(self, *, dry_run: bool = False) -> tuple[list[str], list[Record]]:
        """Recover every record whose owner is gone; return (recovered, live records)."""
        recovered: list[str] = []
        live: list[Record] = []
        for name in sorted(self._journal.names()):
            record = self._journal.load(name)
            if record is None:
                continue
            if any(self._locks.held(k) for k in record.keys):
                # This thread's own operation (a crashed one was recovered when its
                # locks were taken).
                live.append(record)
                continue
            with self._locks.try_hold(record.keys, f"recover {record.op}") as free:
                if not free:
                    live.append(record)
                    continue
                # Re-read under the locks: its owner may have finished meanwhile.
                again = self._journal.load(record.path.name)
                if again is None:
                    continue
                if dry_run:
                    live.append(again)
                else:
                    self._recover(again)
                recovered.append(f"{again.op} {again.opid}")
        return recovered, live

    # -- names and paths -------------------------------------------------------------

    def _box_dir(self, box_id: str) -> Path:
        bdir = self._layout.box_dir(box_id)
        if not bdir.is_dir():
            msg = f"no box {box_id!r}"
            raise NotFoundError(msg, path=bdir, field="box_id", value=box_id)
        return bdir

    def _snapshot_dir(self, box_id: str, name: str) -> Path:
        sdir = self._layout.snapshot_dir(box_id, name)
        if not sdir.is_dir():
            msg = f"box {box_id!r} has no snapshot {name!r}"
            raise NotFoundError(msg, path=sdir, field="snapshot", value=name)
        return sdir

    def _base_image(self, name: str) -> tuple[Path, BackingFormat]:
        bdir = self._layout.base_dir(name)
        for fmt in (BackingFormat.QCOW2, BackingFormat.RAW):
            path = bdir / f"disk.{fmt.value}"
            if path.is_file():
                return path, fmt
        msg = f"no base {name!r}"
        raise NotFoundError(msg, path=bdir, field="base", value=name)

    @staticmethod
    def _disks_in(directory: Path) -> list[str]:
        """The disks a box, snapshot or clone directory holds (the container first)."""
        disks = [d for d in DISK_NAMES if (directory / d).is_file()]
        if CONTAINER_DISK not in disks:
            msg = f"{CONTAINER_DISK} is missing"
            raise StoreError(msg, path=directory / CONTAINER_DISK, field="disk")
        return disks

    def _read_meta(self, path: Path, what: str) -> dict[str, Any]:
        try:
            meta = read_json(path)
        except FileNotFoundError:
            msg = f"{what} metadata is missing"
            raise StoreError(msg, path=path, field=path.name) from None
        if not isinstance(meta, dict):
            msg = f"{what} metadata is not a JSON object"
            raise StoreError(msg, path=path, field=path.name, value=meta)
        return meta

    # -- reading -----------------------------------------------------------------------

    def list_boxes(self) -> list[str]:
        """The ids of every box, sorted."""
        self._check_open()
        try:
            with os.scandir(self._layout.boxes) as it:
                return sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())
        except FileNotFoundError:
            return []

    def list_bases(self) -> list[str]:
        """The names of every base, sorted."""
        self._check_open()
        try:
            with os.scandir(self._layout.bases) as it:
                return sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())
        except FileNotFoundError:
            return []

    def base_path(self, name: str) -> Path:
        """The image file of a base."""
        self._check_open()
        check_name(name, "base name")
        return self._base_image(name)[0]

    def box(self, box_id: str) -> Box:
        """The box ``box_id`` as it is now (:class:`NotFoundError` if there is none)."""
        self._check_open()
        check_name(box_id, "box id")
        return self._box_value(box_id, self._box_dir(box_id))

    def _box_value(self, box_id: str, bdir: Path, meta: dict[str, Any] | None = None) -> Box:
        if meta is None:
            meta = self._read_meta(bdir / BOX_META, "box")
        disks = self._disks_in(bdir)
        disk = bdir / CONTAINER_DISK
        guest = bdir / DISK_NAMES[1] if len(disks) > 1 else None
        snaps = self._snapshots(box_id, bdir)
        return Box(
            id=box_id, dir=bdir, disk=disk, guest_disk=guest,
            base=meta.get("base"), guest_base=meta.get("guest_base"),
            snapshots=tuple(s.name for s in snaps),
            size=read_header(disk).size,
            guest_size=None if guest is None else read_header(guest).size,
            host_bytes=_host_bytes(bdir), created=float(meta.get("created", 0.0)),
            clone_of=meta.get("clone_of"),
        )

    def list_snapshots(self, box_id: str) -> list[Snapshot]:
        """The snapshots of a box, oldest first."""
        self._check_open()
        check_name(box_id, "box id")
        return self._snapshots(box_id, self._box_dir(box_id))

    def snapshot_info(self, box_id: str, name: str) -> Snapshot:
        """One snapshot of a box."""
        self._check_open()
        check_name(box_id, "box id")
        check_name(name, "snapshot name")
        self._box_dir(box_id)
        return self._snapshot_value(box_id, self._snapshot_dir(box_id, name))

    def _snapshots(self, box_id: str, bdir: Path) -> list[Snapshot]:
        try:
            with os.scandir(bdir / "snapshots") as it:
                dirs = [Path(e.path) for e in it if not e.name.startswith(".") and e.is_dir()]
        except FileNotFoundError:
            return []
        snaps = [self._snapshot_value(box_id, d) for d in dirs]
        return sorted(snaps, key=lambda s: (s.created, s.name))

    def _snapshot_value(self, box_id: str, sdir: Path) -> Snapshot:
        meta = self._read_meta(sdir / SNAPSHOT_META, "snapshot")
        disks = self._disks_in(sdir)
        disk = sdir / CONTAINER_DISK
        return Snapshot(
            box_id=box_id, name=sdir.name, dir=sdir, disk=disk,
            guest_disk=sdir / DISK_NAMES[1] if len(disks) > 1 else None,
            created=float(meta.get("created", 0.0)), size=read_header(disk).size,
            host_bytes=_host_bytes(sdir),
        )

    # -- bases ---------------------------------------------------------------------------

    def add_base(self, source: str | os.PathLike[str], name: str, *,
                 backing_format: BackingFormat | str, link: bool = False) -> Path:
        """Copy a raw or qcow2 image into the store as the read-only base ``name``.

        The format is the caller's statement (never probed). A qcow2 base must
        be standalone (no backing file) and check without corruption. With
        ``link=True`` the file is hard-linked instead of copied (same file
        system only; the store then shares the caller's file, whose mode it
        leaves alone). Returns the base's image path.
        """
        self._check_open()
        check_name(name, "base name")
        fmt = BackingFormat.parse(backing_format)
        src = Path(as_path(source, "source"))
        if not src.is_file():
            msg = "base source is not a regular file"
            raise NotFoundError(msg, path=src, field="source", value=os.fspath(src))
        start = time.perf_counter()
        key = _base_key(name)
        with self._operation("add_base", (key,)):
            final = self._layout.base_dir(name)
            if os.path.lexists(final):
                msg = f"base {name!r} already exists"
                raise AlreadyExistsError(msg, path=final, field="base", value=name)
            opid = new_opid()
            stage = self._layout.bases / f".stage-{opid}"
            data = {"name": name, "stage": self._layout.rel(stage)}
            with self._intent("add_base", (key,), data, opid):
                crashpoint("add_base", "recorded")
                stage.mkdir()
                target = stage / f"disk.{fmt.value}"
                if link:
                    os.link(src, target)
                else:
                    copy_sparse(src, target)
                size = target.stat().st_size
                if fmt is BackingFormat.QCOW2:
                    size = self._check_standalone(target, source=src)
                write_new_file(stage / BASE_META, dump_json({
                    "name": name, "format": fmt.value, "created": time.time(),
                    "source": os.fspath(src), "size": size, "linked": link}))
                if not link:
                    make_read_only(target)
                fsync_dir(stage)
                crashpoint("add_base", "staged")
                os.rename(stage, final)
                fsync_dir(self._layout.bases)
                crashpoint("add_base", "committed")
        log.info("base_added", name=name, format=fmt.value, size=size, linked=link,
                 ms=_ms(start))
        return final / f"disk.{fmt.value}"

    @staticmethod
    def _check_standalone(path: Path, *, source: Path) -> int:
        """Refuse a qcow2 with a backing file or one that does not check clean; its size."""
        header = read_header(path)
        if header.backing_file is not None:
            msg = (f"image has a backing file ({header.backing_file!r}); the store takes "
                   f"standalone images only (flatten it first)")
            raise InvalidArgumentError(msg, path=source, field="backing_file",
                                       value=header.backing_file)
        report = check(path)
        if report.corruptions or report.check_errors:
            msg = (f"image does not check clean: {report.corruptions} corruptions, "
                   f"{report.check_errors} check errors")
            raise CorruptImageError(msg, path=source, field="check",
                                    value=(report.corruptions, report.check_errors))
        return header.size

    def _recover_add_base(self, record: Record) -> None:
        remove_tree(self._layout.abs(record.data["stage"]))

    # -- creating boxes ----------------------------------------------------------------

    def create_box(self, box_id: str, *, base: str | None = None, size: int | None = None,
                   guest_base: str | None = None) -> Box:
        """Create a box: its directory and live container disk, and a guest disk if asked.

        The container disk is a COW child of the base ``base`` (``size``
        defaults to the base's), or a standalone sparse disk of ``size``
        (default 10 GiB) when ``base`` is None. With ``guest_base`` the box
        gets a second disk, ``guest-rootfs.qcow2``, a child of that base.
        """
        self._check_open()
        check_name(box_id, "box id")
        if base is not None:
            check_name(base, "base name")
        if guest_base is not None:
            check_name(guest_base, "base name")
        size = _check_size(size)
        start = time.perf_counter()
        key = _box_key(box_id)
        with self._operation("create_box", (key,)):
            final = self._layout.box_dir(box_id)
            if os.path.lexists(final):
                msg = f"box {box_id!r} already exists"
                raise AlreadyExistsError(msg, path=final, field="box_id", value=box_id)
            base_img = None if base is None else self._base_image(base)
            guest_img = None if guest_base is None else self._base_image(guest_base)
            opid = new_opid()
            stage = self._layout.boxes / f".stage-{opid}"
            meta: dict[str, Any] = {"id": box_id, "created": time.time(), "base": base,
                    "guest_base": guest_base, "clone_of": None}
            with self._intent("create_box", (key,),
                              {"box": box_id, "stage": self._layout.rel(stage)}, opid):
                crashpoint("create_box", "recorded")
                stage.mkdir()
                write_new_file(stage / BOX_META, dump_json(meta))
                if base_img is None:
                    create_disk(stage / CONTAINER_DISK, persistent=True,
                                size=DEFAULT_DISK_SIZE if size is None else size)
                else:
                    create_cow_child_disk(base_img[0], base_img[1], stage / CONTAINER_DISK, size,
                                          relative=True, persistent=True)
                if guest_img is not None:
                    create_cow_child_disk(guest_img[0], guest_img[1], stage / DISK_NAMES[1],
                                          relative=True, persistent=True)
                crashpoint("create_box", "staged")
                os.rename(stage, final)
                fsync_dir(self._layout.boxes)
                crashpoint("create_box", "committed")
        guest = final / DISK_NAMES[1] if guest_img is not None else None
        box = Box(id=box_id, dir=final, disk=final / CONTAINER_DISK, guest_disk=guest,
                  base=base, guest_base=guest_base, snapshots=(),
                  size=read_header(final / CONTAINER_DISK).size,
                  guest_size=None if guest is None else read_header(guest).size,
                  host_bytes=_host_bytes(final), created=meta["created"])
        log.info("box_created", box=box_id, base=base, guest_base=guest_base, ms=_ms(start))
        return box

    def _recover_staged_box(self, record: Record) -> None:
        # The rename of the staging directory is the commit: a leftover stage was never one.
        remove_tree(self._layout.abs(record.data["stage"]))

    def import_box(self, box_id: str, image: str | os.PathLike[str], *,
                   format: FormatArg = "qcow2") -> Box:
        """Make a standalone image (``format`` qcow2 or raw, never probed) a new box.

        A qcow2 must have no backing file and check without corruption. Its
        guest bytes are copied (flattened) into the box's new container disk.
        """
        self._check_open()
        check_name(box_id, "box id")
        format = as_format(format, "format")
        src = Path(as_path(image, "image"))
        if not src.is_file():
            msg = "image to import is not a regular file"
            raise NotFoundError(msg, path=src, field="image", value=os.fspath(src))
        if format == "qcow2":
            self._check_standalone(src, source=src)
        start = time.perf_counter()
        key = _box_key(box_id)
        with self._operation("import_box", (key,)):
            final = self._layout.box_dir(box_id)
            if os.path.lexists(final):
                msg = f"box {box_id!r} already exists"
                raise AlreadyExistsError(msg, path=final, field="box_id", value=box_id)
            opid = new_opid()
            stage = self._layout.boxes / f".stage-{opid}"
            meta = {"id": box_id, "created": time.time(), "base": None, "guest_base": None,
                    "clone_of": None, "imported_from": os.fspath(src)}
            with self._intent("import_box", (key,),
                              {"box": box_id, "stage": self._layout.rel(stage)}, opid):
                crashpoint("import_box", "recorded")
                stage.mkdir()
                write_new_file(stage / BOX_META, dump_json(meta))
                flatten(src, stage / CONTAINER_DISK, src_format=format)
                fsync_dir(stage)
                crashpoint("import_box", "staged")
                os.rename(stage, final)
                fsync_dir(self._layout.boxes)
                crashpoint("import_box", "committed")
        log.info("box_imported", box=box_id, image=os.fspath(src), ms=_ms(start))
        return self._box_value(box_id, final, meta)

    @contextlib.contextmanager
    def ephemeral_box(self, *, base: str | None = None, size: int | None = None,
                      guest_base: str | None = None, prefix: str = "ephemeral-") -> Iterator[Box]:
        """A throw-away box for the block: created on entry, removed with everything on exit.

        Removal runs even when the block raises (its error is then logged and
        the block's exception propagates). A box something else came to depend
        on (a clone of it) cannot be removed: :class:`DependentsExistError`.
        """
        box_id = check_name(f"{prefix}{new_opid()}", "box id")
        box = self.create_box(box_id, base=base, size=size, guest_base=guest_base)
        try:
            yield box
        except BaseException:
            try:
                self.remove_box(box_id)
            except BoxdiskError as exc:
                log.exception("ephemeral_box_not_removed", box=box_id, error=str(exc))
            raise
        self.remove_box(box_id)

    # -- snapshot and restore ----------------------------------------------------------

    # Snapshot and clone both *freeze* a box's live disks: each live file gets a second
    # name in the frozen directory (a hard link), an empty child is made over it, then
    # the frozen file's backing name is fixed for its new directory and the child is
    # renamed over the live name. The first name fix or swap is the point of no return.

    def _freeze_plan(self, live_dir: Path, frozen_dir: Path, disks: list[str],
                     opid: str) -> list[dict[str, Any]]:
        """Journal entries for freezing ``disks`` of ``live_dir`` into ``frozen_dir``."""
        lay = self._layout
        entries: list[dict[str, Any]] = []
        for d in disks:
            header = read_header(live_dir / d)
            entries.append({
                "disk": d, "old": header.backing_file,
                "new": _moved_name(header.backing_file, live_dir, frozen_dir),
                "child": lay.rel(live_dir / f".{d}.{opid}.new"), "size": header.size,
            })
        return entries

    def _freeze_forward(self, op: str, live_dir: Path, frozen_dir: Path,
                        entries: list[dict[str, Any]]) -> None:
        """Fix the frozen files' backing names, then swap the children in (idempotent)."""
        lay = self._layout
        for e in entries:
            _fix_backing_name(frozen_dir / e["disk"], e["old"], e["new"])
            crashpoint(op, f"renamed:{e['disk']}")
        for e in entries:
            child = lay.abs(e["child"])
            live = live_dir / e["disk"]
            if child.exists():
                os.rename(child, live)
            elif _same_file(live, frozen := frozen_dir / e["disk"]):
                # Defensive: the child is created before the commit, so it exists.
                create_cow_child_disk(frozen, BackingFormat.QCOW2, child, relative=True,
                                      persistent=True)
                os.rename(child, live)
            crashpoint(op, f"swapped:{e['disk']}")
        fsync_dir(live_dir)

    def snapshot(self, box_id: str, name: str) -> Snapshot:
        """Make the box's live disks an immutable snapshot ``name`` and give it new live children.

        The live files are renamed (not copied) into the snapshot; the box's
        new live disks are empty COW children over them, so the guest sees the
        same bytes. Refused with :class:`DiskInUseError` while a QEMU holds a
        live disk.
        """
        self._check_open()
        check_name(box_id, "box id")
        check_name(name, "snapshot name")
        start = time.perf_counter()
        key = _box_key(box_id)
        lay = self._layout
        with self._operation("snapshot", (key,)):
            bdir = self._box_dir(box_id)
            final = lay.snapshot_dir(box_id, name)
            if os.path.lexists(final):
                msg = f"box {box_id!r} already has a snapshot {name!r}"
                raise AlreadyExistsError(msg, path=final, field="snapshot", value=name)
            disks = self._disks_in(bdir)
            for d in disks:
                ensure_not_in_use(bdir / d, "snapshot the box")
            opid = new_opid()
            stage = lay.snapshots_dir(box_id) / f".stage-{opid}"
            entries = self._freeze_plan(bdir, final, disks, opid)
            created = time.time()
            data = {"box": box_id, "name": name, "stage": lay.rel(stage),
                    "final": lay.rel(final), "disks": entries}
            with self._intent("snapshot", (key,), data, opid):
                crashpoint("snapshot", "recorded")
                if not stage.parent.is_dir():
                    stage.parent.mkdir(exist_ok=True)
                    fsync_dir(bdir)  # the first snapshot's directory must outlive a power loss
                stage.mkdir()
                write_new_file(stage / SNAPSHOT_META, dump_json(
                    {"box": box_id, "name": name, "created": created,
                     "disks": {e["disk"]: e["size"] for e in entries}}))
                crashpoint("snapshot", "staged")
                with self._locks.structural(f"snapshot {box_id!r}"):
                    for d in disks:
                        os.link(bdir / d, stage / d)
                    fsync_dir(stage)
                    os.rename(stage, final)
                    fsync_dir(final.parent)
                    crashpoint("snapshot", "linked")
                    for e in entries:
                        create_cow_child_disk(final / e["disk"], BackingFormat.QCOW2,
                                              lay.abs(e["child"]), relative=True,
                                              persistent=True)
                    crashpoint("snapshot", "children")
                    # The first name fix (or swap) is the point of no return.
                    self._snapshot_forward(data)
        log.info("snapshot_taken", box=box_id, name=name, disks=len(disks), ms=_ms(start))
        return Snapshot(box_id=box_id, name=name, dir=final, disk=final / CONTAINER_DISK,
                        guest_disk=final / DISK_NAMES[1] if len(disks) > 1 else None,
                        created=created, size=entries[0]["size"], host_bytes=_host_bytes(final))

    def _snapshot_forward(self, data: dict[str, Any]) -> None:
        """Finish a committed snapshot (idempotent): fix the names, swap in the children, seal."""
        lay = self._layout
        final = lay.abs(data["final"])
        self._freeze_forward("snapshot", lay.box_dir(data["box"]), final, data["disks"])
        for e in data["disks"]:
            make_read_only(final / e["disk"])
        crashpoint("snapshot", "sealed")

    def _snapshot_committed(self, data: dict[str, Any]) -> bool:
        """Whether a snapshot passed its point of no return: a name fixed or a disk swapped."""
        lay = self._layout
        return _freeze_committed(lay.box_dir(data["box"]), lay.abs(data["final"]),
                                 data["disks"])

    def _recover_snapshot(self, record: Record) -> None:
        data = record.data
        lay = self._layout
        if self._snapshot_committed(data):
            self._snapshot_forward(data)
            return
        bdir = lay.box_dir(data["box"])
        _freeze_undo(bdir, lay.abs(data["final"]), data["disks"])
        remove_tree(lay.abs(data["stage"]))
        _remove_paths(_hidden_with(bdir, record.opid))

    def restore(self, box_id: str, name: str) -> None:
        """Give the box fresh live disks over snapshot ``name`` (its current live state goes).

        Each live disk is replaced by a rename over it, so at no instant is the
        box without a disk. Refused while a QEMU holds a live disk.
        """
        self._check_open()
        check_name(box_id, "box id")
        check_name(name, "snapshot name")
        start = time.perf_counter()
        key = _box_key(box_id)
        lay = self._layout
        with self._operation("restore", (key,)):
            bdir = self._box_dir(box_id)
            sdir = self._snapshot_dir(box_id, name)
            disks = self._disks_in(bdir)
            if self._disks_in(sdir) != disks:
                msg = f"snapshot {name!r} does not hold the same disks as the box ({disks})"
                raise StoreError(msg, path=sdir, field="disks", value=self._disks_in(sdir))
            for d in disks:
                ensure_not_in_use(bdir / d, "restore the box (replacing its live disk)")
            opid = new_opid()
            entries = [{"disk": d, "child": lay.rel(bdir / f".{d}.{opid}.new")} for d in disks]
            data = {"box": box_id, "name": name, "disks": entries}
            with self._intent("restore", (key,), data, opid):
                crashpoint("restore", "recorded")
                for e in entries:
                    create_cow_child_disk(sdir / e["disk"], BackingFormat.QCOW2,
                                          lay.abs(e["child"]), relative=True, persistent=True)
                crashpoint("restore", "children")
                self._restore_forward(data)
        log.info("box_restored", box=box_id, snapshot=name, ms=_ms(start))

    def _restore_forward(self, data: dict[str, Any]) -> None:
        lay = self._layout
        bdir = lay.box_dir(data["box"])
        for e in data["disks"]:
            child = lay.abs(e["child"])
            if child.exists():
                os.rename(child, bdir / e["disk"])
            crashpoint("restore", f"swapped:{e['disk']}")
        fsync_dir(bdir)

    def _recover_restore(self, record: Record) -> None:
        # Children are created in disk order and swapped in the same order, so the last
        # disk's child exists exactly when all children were made and that one is not yet
        # swapped: then finish; otherwise either nothing was swapped (undo) or all was.
        lay = self._layout
        last = lay.abs(record.data["disks"][-1]["child"])
        if last.exists():
            self._restore_forward(record.data)
        _remove_paths(_hidden_with(lay.box_dir(record.data["box"]), record.opid))

    # -- clones ------------------------------------------------------------------------

    def clone_box(self, src_id: str, dst_id: str) -> Box:
        """A new box ``dst_id`` with the current state of ``src_id``; the two then diverge.

        The source's live disks are frozen (renamed, not copied) into an
        immutable clone base under ``clones/``; source and destination each get
        new COW children over it, so writes to either never show in the other.
        """
        self._check_open()
        check_name(src_id, "box id")
        check_name(dst_id, "box id")
        start = time.perf_counter()
        lay = self._layout
        keys = (_box_key(src_id), _box_key(dst_id))
        with self._operation("clone_box", keys):
            sdir = self._box_dir(src_id)
            ddir = lay.box_dir(dst_id)
            if os.path.lexists(ddir):
                msg = f"box {dst_id!r} already exists"
                raise AlreadyExistsError(msg, path=ddir, field="box_id", value=dst_id)
            disks = self._disks_in(sdir)
            for d in disks:
                ensure_not_in_use(sdir / d, "clone the box (freezing its live disk)")
            src_meta = self._read_meta(sdir / BOX_META, "box")
            opid = new_opid()
            cdir = lay.clone_dir(opid)
            dstage = lay.boxes / f".stage-{opid}"
            entries = self._freeze_plan(sdir, cdir, disks, opid)
            data = {"src": src_id, "dst": dst_id, "clone": lay.rel(cdir),
                    "dst_stage": lay.rel(dstage), "disks": entries}
            meta: dict[str, Any] = {"id": dst_id, "created": time.time(),
                                    "base": src_meta.get("base"),
                    "guest_base": src_meta.get("guest_base"), "clone_of": src_id}
            with self._intent("clone_box", keys, data, opid):
                crashpoint("clone_box", "recorded")
                dstage.mkdir()
                write_new_file(dstage / BOX_META, dump_json(meta))
                crashpoint("clone_box", "staged")
                with self._locks.structural(f"clone_box {src_id!r} -> {dst_id!r}"):
                    cdir.mkdir()
                    write_new_file(cdir / CLONE_META, dump_json(
                        {"source": src_id, "dest": dst_id, "created": meta["created"],
                         "disks": disks}))
                    for d in disks:
                        os.link(sdir / d, cdir / d)
                    fsync_dir(cdir)
                    fsync_dir(lay.clones)
                    crashpoint("clone_box", "frozen")
                    frozen, frozen_guest = cdir / CONTAINER_DISK, cdir / DISK_NAMES[1]
                    clone_disk_pair(frozen, dstage / CONTAINER_DISK, frozen_guest, dstage,
                                    relative=True)
                    for e in entries:
                        create_cow_child_disk(cdir / e["disk"], BackingFormat.QCOW2,
                                              lay.abs(e["child"]), relative=True,
                                              persistent=True)
                    crashpoint("clone_box", "children")
                    # The first name fix (or swap) is the point of no return.
                    self._clone_forward(data)
        log.info("box_cloned", src=src_id, dst=dst_id, clone_base=lay.rel(cdir), ms=_ms(start))
        guest = ddir / DISK_NAMES[1] if len(disks) > 1 else None
        return Box(id=dst_id, dir=ddir, disk=ddir / CONTAINER_DISK, guest_disk=guest,
                   base=meta["base"], guest_base=meta["guest_base"], snapshots=(),
                   size=entries[0]["size"],
                   guest_size=entries[1]["size"] if guest is not None else None,
                   host_bytes=_host_bytes(ddir), created=meta["created"], clone_of=src_id)

    def _clone_forward(self, data: dict[str, Any]) -> None:
        """Finish a clone past its point of no return (idempotent)."""
        lay = self._layout
        dstage = lay.abs(data["dst_stage"])
        cdir = lay.abs(data["clone"])
        self._freeze_forward("clone_box", lay.box_dir(data["src"]), cdir, data["disks"])
        if dstage.exists():
            os.rename(dstage, lay.box_dir(data["dst"]))
            fsync_dir(lay.boxes)
        crashpoint("clone_box", "published")
        for e in data["disks"]:
            make_read_only(cdir / e["disk"])
        crashpoint("clone_box", "sealed")

    def _clone_committed(self, data: dict[str, Any]) -> bool:
        """Whether a clone passed its point of no return: a name fixed, a disk swapped."""
        lay = self._layout
        return _freeze_committed(lay.box_dir(data["src"]), lay.abs(data["clone"]),
                                 data["disks"])

    def _recover_clone(self, record: Record) -> None:
        data = record.data
        lay = self._layout
        if self._clone_committed(data):
            self._clone_forward(data)
            return
        sdir = lay.box_dir(data["src"])
        remove_tree(lay.abs(data["dst_stage"]))
        _remove_paths(_hidden_with(sdir, record.opid))
        _freeze_undo(sdir, lay.abs(data["clone"]), data["disks"])

    # -- the dependency graph and the removal guard ---------------------------------------

    def _images(self) -> list[str]:
        """Every qcow2 image in the store (staging and trash excluded)."""
        lay = self._layout
        out: list[str] = []

        def disks(directory: str) -> None:
            for d in DISK_NAMES:
                p = os.path.join(directory, d)
                if os.path.isfile(p):
                    out.append(p)

        def subdirs(directory: Path | str) -> list[str]:
            try:
                with os.scandir(directory) as it:
                    return [e.path for e in it if not e.name.startswith(".") and e.is_dir()]
            except FileNotFoundError:
                return []

        for b in subdirs(lay.bases):
            p = os.path.join(b, "disk.qcow2")
            if os.path.isfile(p):
                out.append(p)
        for c in subdirs(lay.clones):
            disks(c)
        for b in subdirs(lay.boxes):
            disks(b)
            for s in subdirs(os.path.join(b, "snapshots")):
                disks(s)
        return out

    def graph(self) -> DependencyGraph:
        """The dependency graph of every image in the store, read from their headers."""
        self._check_open()
        return DependencyGraph.scan(self._images())

    @staticmethod
    def _protected(records: Iterable[Record]) -> set[str]:
        """Root-relative paths named by operations in flight (gc leaves them alone)."""
        out: set[str] = set()

        def walk(value: Any) -> None:
            if isinstance(value, str):
                out.add(value)
            elif isinstance(value, dict):
                for v in value.values():
                    walk(v)
            elif isinstance(value, list):
                for v in value:
                    walk(v)

        for r in records:
            walk(r.data)
        return out

    def _dead_clones(self, graph: DependencyGraph, protected: set[str],
                     removed: frozenset[str] | set[str] = frozenset()) -> set[str]:
        """Clone-base images nothing (but other dead clone bases, or ``removed``) depends on."""
        lay = self._layout
        clones_root = str(lay.clones) + os.sep
        candidates = {n.path for n in graph if n.path.startswith(clones_root)}
        guarded = set()
        for p in candidates:
            rel = lay.rel(p)
            cdir_rel = os.path.dirname(rel)
            if rel in protected or cdir_rel in protected:
                guarded.add(p)
        # Peel: a clone base is dead when all its dependents are dead clone bases.
        alive = {p for p in candidates
                 if p in guarded or any(q not in candidates and q not in removed
                                        for q in graph.direct_dependents(p))}
        changed = True
        while changed:
            changed = False
            for p in candidates - alive:
                if any(q in alive for q in graph.direct_dependents(p)):
                    alive.add(p)
                    changed = True
        # A clone directory lives or dies as a whole (container and guest disk together).
        dead_dirs = {os.path.dirname(p) for p in candidates - alive}
        alive_dirs = {os.path.dirname(p) for p in alive}
        return {p for p in candidates if os.path.dirname(p) in dead_dirs - alive_dirs}

    def remove_snapshot(self, box_id: str, name: str, *, merge: bool = False) -> None:
        """Delete snapshot ``name`` of a box; refused while any image backs onto it.

        The refusal (:class:`SnapshotInUseError`) names every dependent image.
        With ``merge=True`` the snapshot's data is first streamed into its
        direct dependents (a safe rebase onto what the snapshot backs onto), so
        every dependent reads the same guest bytes as before; then it goes.
        """
        self._check_open()
        check_name(box_id, "box id")
        check_name(name, "snapshot name")
        start = time.perf_counter()
        key = _box_key(box_id)
        lay = self._layout
        with self._operation("remove_snapshot", (key,)):
            self._box_dir(box_id)
            sdir = self._snapshot_dir(box_id, name)
            own = {os.path.realpath(sdir / d) for d in self._disks_in(sdir)}
            with self._locks.structural(f"remove_snapshot {box_id!r} {name!r}"):
                steps = self._merge_plan(sdir, own, merge=merge)
            opid = new_opid()
            trash = lay.trash / opid
            data = {"box": box_id, "name": name, "trash": lay.rel(trash), "steps": steps}
            with self._intent("remove_snapshot", (key,), data, opid):
                crashpoint("remove_snapshot", "recorded")
                for i, step in enumerate(steps):
                    image = lay.abs(step["image"])
                    if not step["writable"]:
                        make_writable(image)
                    target = None if step["target"] is None else lay.abs(step["target"])
                    rebase(image, target, backing_format=step["format"], safe=True,
                           relative=True, allowed_roots=self._roots)
                    if not step["writable"]:
                        make_read_only(image)
                    crashpoint("remove_snapshot", f"rebased:{i}")
                with self._locks.structural(f"remove_snapshot {box_id!r} {name!r}"):
                    if steps and self._merge_plan(sdir, own, merge=False):
                        msg = f"snapshot {name!r} of box {box_id!r} gained dependents"
                        raise StoreError(msg, path=sdir, field="snapshot", value=name)
                    os.rename(sdir, trash)
                    fsync_dir(sdir.parent)
                    crashpoint("remove_snapshot", "moved")
                # Out of view now; deleting the files may take a while, outside the lock.
                remove_tree(trash)
                crashpoint("remove_snapshot", "removed")
        log.info("snapshot_removed", box=box_id, name=name, merged=len(steps), ms=_ms(start))

    def _merge_plan(self, sdir: Path, own: set[str], *, merge: bool) -> list[dict[str, Any]]:
        """The safe rebases that take the snapshot ``own`` out of every chain (under the lock).

        Without ``merge`` there must be none: any dependent is refused with
        :class:`SnapshotInUseError` naming them all.
        """
        lay = self._layout
        self._recover_dead()
        graph = self.graph()
        everyone: set[str] = set()
        for p in own:
            everyone |= graph.dependents(p)
        everyone -= own
        if everyone and not merge:
            msg = f"snapshot {sdir.name!r} of box {sdir.parent.parent.name!r} is in use"
            raise SnapshotInUseError(msg, path=sdir, field="snapshot", value=sdir.name,
                                     dependents=tuple(sorted(everyone)))
        for p in own:
            ensure_not_in_use(p, "remove the snapshot")
        if not everyone:
            return []
        steps = []
        for p in sorted(own):
            node = graph.node(p)
            # The data streamed into the dependents comes from chains confined to the store.
            with open_chain(p, allowed_roots=self._roots):
                pass
            target = None if node.backing is None else lay.rel(node.backing)
            for dep in sorted(graph.direct_dependents(p) - own):
                if not lay.under_root(dep):
                    msg = f"dependent {dep!r} lies outside the store; merge it by hand"
                    raise SnapshotInUseError(msg, path=sdir, field="snapshot",
                                             value=sdir.name, dependents=(dep,))
                ensure_not_in_use(dep, "merge the snapshot into it")
                writable = bool(os.stat(dep).st_mode & 0o200)
                steps.append({"image": lay.rel(dep), "target": target,
                              "format": node.backing_format, "writable": writable})
        return steps

    def _recover_remove_snapshot(self, record: Record) -> None:
        lay = self._layout
        # The rename into the trash is the point of no return; before it nothing was lost
        # (a merge copies data into dependents without changing what they read), so an
        # interrupted merge stops where it was, the snapshot still in place.
        for step in record.data["steps"]:
            image = lay.abs(step["image"])
            if not step["writable"] and image.exists():
                make_read_only(image)
        remove_tree(lay.abs(record.data["trash"]))

    def remove_box(self, box_id: str) -> None:
        """Delete a box with its snapshots; refused while any image outside it backs onto them.

        Clone bases that nothing but the box depended on go with it.
        """
        self._check_open()
        check_name(box_id, "box id")
        start = time.perf_counter()
        key = _box_key(box_id)
        lay = self._layout
        with self._operation("remove_box", (key,)):
            bdir = self._box_dir(box_id)
            opid = new_opid()
            trash = lay.trash / opid
            data = {"box": box_id, "trash": lay.rel(trash)}
            with contextlib.ExitStack() as stack:
                # Decide and move under the store lock; delete after releasing it.
                with self._locks.structural(f"remove_box {box_id!r}"):
                    clone_dirs = self._removal_plan(bdir)
                    stack.enter_context(self._intent("remove_box", (key,), data, opid))
                    crashpoint("remove_box", "recorded")
                    os.rename(bdir, trash)
                    fsync_dir(lay.boxes)
                    for i, cdir in enumerate(clone_dirs):
                        os.rename(cdir, lay.trash / f"{opid}-clone{i}")
                    if clone_dirs:
                        fsync_dir(lay.clones)
                    crashpoint("remove_box", "moved")
                self._remove_trash(opid)
                crashpoint("remove_box", "removed")
        log.info("box_removed", box=box_id, clone_bases=len(clone_dirs), ms=_ms(start))

    def _removal_plan(self, bdir: Path) -> list[Path]:
        """Refuse the removal of a box others depend on; the dead clone bases that go with it."""
        _recovered, live = self._recover_dead()
        graph = self.graph()
        prefix = str(bdir) + os.sep
        own = {n.path for n in graph if n.path.startswith(prefix)}
        outside: set[str] = set()
        for p in own:
            outside |= graph.dependents(p)
        outside -= own
        protected = self._protected(live)
        # Clone bases only the box itself kept alive go with it; any other dependent blocks.
        dead_before = self._dead_clones(graph, protected)
        dead_after = self._dead_clones(graph, protected, own)
        blocking = outside - dead_after
        if blocking:
            msg = f"box {bdir.name!r} cannot be removed: images outside it back onto its disks"
            raise DependentsExistError(msg, path=bdir, field="box_id", value=bdir.name,
                                       dependents=tuple(sorted(blocking)))
        orphaned = (outside & dead_after) | (dead_after - dead_before)
        for p in sorted(own | orphaned):
            ensure_not_in_use(p, "remove the box (and the clone bases only it used)")
        return sorted({Path(os.path.dirname(p)) for p in orphaned})

    def _remove_trash(self, opid: str) -> None:
        lay = self._layout
        try:
            names = os.listdir(lay.trash)
        except FileNotFoundError:
            return
        _remove_paths(lay.trash / n for n in names if n.startswith(opid))

    def _recover_remove_box(self, record: Record) -> None:
        # Renames into the trash are the commit; whatever reached it is deleted.
        self._remove_trash(record.opid)

    # -- export -----------------------------------------------------------------------------

    def export_box(self, box_id: str, dest: str | os.PathLike[str], *,
                   snapshot: str | None = None, guest: bool = False,
                   overwrite: bool = False, progress: Progress | None = None) -> Path:
        """Write the live disk (or snapshot ``snapshot``) as one standalone qcow2 at ``dest``.

        ``guest=True`` exports the guest disk instead of the container disk.
        ``progress(done_bytes, total_bytes)`` is called as the copy advances.
        The chain is opened (confined to the store) under the box's lock and
        then read from the open files, so operations on the box may go on
        during the copy. Refused while a QEMU holds the live disk.
        """
        self._check_open()
        check_name(box_id, "box id")
        dest = as_path(dest, "dest")
        if snapshot is not None:
            check_name(snapshot, "snapshot name")
        start = time.perf_counter()
        disk_name = DISK_NAMES[1] if guest else CONTAINER_DISK
        with self._operation("export_box", (_box_key(box_id),)):
            bdir = self._box_dir(box_id)
            src_dir = bdir if snapshot is None else self._snapshot_dir(box_id, snapshot)
            src = src_dir / disk_name
            if not src.is_file():
                msg = f"box {box_id!r} has no {disk_name}"
                raise NotFoundError(msg, path=src, field="disk", value=disk_name)
            if snapshot is None:
                ensure_not_in_use(src, "export the live disk")
            chain = open_chain(src, allowed_roots=self._roots)
        with chain:
            written = flatten(chain, dest, overwrite=overwrite, progress=progress)
        log.info("box_exported", box=box_id, snapshot=snapshot, dest=os.fspath(dest),
                 data_bytes=written, ms=_ms(start))
        return Path(dest)

    # -- gc and verify -------------------------------------------------------------------

    def _leftovers(self, live_opids: set[str]) -> list[Path]:
        """Hidden staging entries and trash that belong to no operation in flight."""
        lay = self._layout
        found: list[Path] = []

        def hidden(directory: Path) -> None:
            try:
                names = os.listdir(directory)
            except (FileNotFoundError, NotADirectoryError):
                return
            found.extend(directory / n for n in names if n.startswith("."))

        for d in (lay.boxes, lay.bases, lay.clones, lay.journal):
            hidden(d)
        for b in self.list_boxes():
            hidden(lay.box_dir(b))
            hidden(lay.snapshots_dir(b))
        with contextlib.suppress(FileNotFoundError):
            found.extend(lay.trash / n for n in os.listdir(lay.trash))
        # Re-read the journal after listing: an entry's record is written before it.
        live_opids = live_opids | self._journal.opids()
        # A temporary file a live writer holds (flock) is not left over, journaled or not;
        # nor is one that is gone by now (a writer published it and removed its name
        # after the listing: checked after temp_held, which says False for a gone file).
        return [p for p in found if not any(o in p.name for o in live_opids)
                and not temp_held(p) and os.path.lexists(p)]

    def gc(self, *, dry_run: bool = False) -> GcReport:
        """Remove clone bases nothing depends on and what interrupted operations left behind.

        Interrupted operations are first finished or rolled back. With
        ``dry_run`` nothing is changed and the report says what would go.
        """
        self._check_open()
        start = time.perf_counter()
        lay = self._layout
        with _reported("gc", lay.root), self._locks.structural("gc"):
            recovered, live = self._recover_dead(dry_run=dry_run)
            live_opids = {r.opid for r in live}
            graph = self.graph()
            dead = self._dead_clones(graph, self._protected(live))
            # A clone base a running QEMU holds (opened directly) waits for a later gc.
            clone_dirs = sorted({os.path.dirname(p) for p in dead}
                                - {os.path.dirname(p) for p in dead if image_in_use(p)})
            leftovers = self._leftovers(live_opids)
            freed = sum(_host_bytes(Path(c)) for c in clone_dirs)
            freed += sum(_host_bytes(p) if p.is_dir() else p.lstat().st_size
                         for p in leftovers if os.path.lexists(p))
            if not dry_run:
                for c in clone_dirs:
                    remove_tree(Path(c))
                for p in leftovers:
                    if p.suffix == ".tmp" and p.is_file() and not p.is_symlink():
                        remove_stale_temp(p)  # under its lock: a writer just starting keeps it
                    else:
                        remove_tree(p)
        report = GcReport(dry_run=dry_run, recovered=tuple(recovered),
                          clone_bases=tuple(lay.rel(c) for c in clone_dirs),
                          leftovers=tuple(lay.rel(p) for p in leftovers), bytes_freed=freed)
        log.info("store_gc", dry_run=dry_run, recovered=len(recovered),
                 clone_bases=len(clone_dirs), leftovers=len(leftovers), bytes=freed,
                 ms=_ms(start))
        return report

    def verify(self) -> VerifyReport:
        """Check the whole store; the report lists every problem found (``ok`` when none).

        Every chain opens (confined to the store), every qcow2 image checks
        clean (no corruption, leak or check error), no image backs onto a
        missing file or into a cycle, metadata agrees with the files and
        headers (box and snapshot names, disks, bases), snapshots and clone
        bases are read-only, and nothing is left over from an interrupted
        operation. Nothing is changed. The tree is read under the store lock;
        the images' contents are checked after it is released (an image a
        running QEMU holds is listed in ``in_flight``, not checked).
        """
        self._check_open()
        start = time.perf_counter()
        verifier = Verifier(self)
        with self._locks.structural("verify"):
            verifier.structure()
        verifier.contents()
        report = verifier.report()
        log.info("store_verified", ok=report.ok, problems=len(report.problems),
                 images=report.images, ms=_ms(start))
        return report
