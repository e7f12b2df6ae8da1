"""What every family of store operations shares: paths, locks, the journal, lookups.

:class:`StoreContext` is the state of one open store. The operation modules
(``_boxes``, ``_snapshots``, ``_clones``, ``_removal``) are functions of it;
the façade (:class:`boxdisk.store.BoxStore`) wires them together, so nothing
in the package imports the façade and nothing imports in a circle. Recovery
is reached through :attr:`StoreContext.recovery`, set by the façade.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from boxdisk._errors import (
    BoxdiskError,
    ImageIOError,
    InvalidArgumentError,
    LockTimeoutError,
    NotFoundError,
    StoreError,
)
from boxdisk._locks import ensure_not_in_use
from boxdisk._log import get_logger
from boxdisk.qcow2 import BackingFormat, ImagePlan

from ._fs import Durability, read_json
from ._journal import Journal, Record
from ._layout import CONTAINER_DISK, DISK_NAMES, REMOVED_MARKER, Layout
from ._locks import StoreLocks

__all__ = [
    "Recoverer",
    "StoreContext",
    "base_key",
    "box_key",
    "check_size",
    "ms",
    "reported",
    "same_file",
]

log = get_logger(__name__)


def box_key(box_id: str) -> str:
    """The lock key of a box."""
    return f"box:{box_id}"


def base_key(name: str) -> str:
    """The lock key of a base."""
    return f"base:{name}"


def ms(start: float) -> float:
    """Milliseconds since ``start`` (``time.perf_counter()``), for log events."""
    return round((time.perf_counter() - start) * 1000, 3)


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two paths name one file (False when either is missing)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_size(size: object) -> int | None:
    """A virtual size argument: None or a non-negative int."""
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        msg = f"size {size!r} is not a non-negative number of bytes"
        raise InvalidArgumentError(msg, field="size", value=size)
    return size


@contextlib.contextmanager
def reported(what: str, root: Path) -> Iterator[None]:
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


class Recoverer(Protocol):
    """What the context needs of crash recovery (``_recovery.Recovery``)."""

    def recover(self, record: Record) -> None:
        """Undo or finish one interrupted operation."""

    def recover_dead(self, *, dry_run: bool = False) -> tuple[list[str], list[Record]]:
        """Recover every record whose owner is gone; (recovered, live records)."""


class StoreContext:
    """One open store: its layout, locks and journal, and the lookups operations share."""

    def __init__(self, layout: Layout, locks: StoreLocks, journal: Journal,
                 durability: Durability) -> None:
        self.layout = layout
        self.locks = locks
        self.journal = journal
        self.durability = durability
        #: Every chain the store opens is confined to its root.
        self.roots = (str(layout.root),)
        self.closed = False
        self.recovery: Recoverer | None = None
        #: The image plans of new boxes, kept between calls: (base, size, disk) ->
        #: (the base file's stamp, the plan). See ``_boxes._Planner``.
        self.plans: dict[tuple[str | None, int | None, str], tuple[object, ImagePlan]] = {}

    def check_open(self) -> None:
        """Raise StoreError if the store was closed."""
        if self.closed:
            msg = "the store is closed"
            raise StoreError(msg, path=self.layout.root, field="store")

    @property
    def recoverer(self) -> Recoverer:
        """The recovery the façade installed."""
        assert self.recovery is not None, "the façade installs recovery before any operation"
        return self.recovery

    def barrier(self, paths: Iterable[str | os.PathLike[str]]) -> None:
        """Make the listed files and directories durable at once (one durable call or a few)."""
        self.durability.barrier(paths)

    # -- locks and intents -------------------------------------------------------------

    @contextlib.contextmanager
    def operation(self, op: str, keys: Iterable[str], *,
                  own: str | None = None) -> Iterator[None]:
        """Hold the locks of ``keys`` for an operation, first recovering what crashed there.

        ``own`` names a record of the caller's (a batch settling its claims),
        which is neither waited for nor recovered.
        """
        self.check_open()
        wanted = set(keys)
        what = f"{op} ({', '.join(sorted(wanted))})"
        for _ in range(16):
            with self.locks.hold(wanted, what):
                names = self.journal.touching(tuple(wanted), skip=own)
                records = [r for r in map(self.journal.load, names) if r is not None]
                need = wanted.union(*(r.keys for r in records))
                if need == wanted:
                    with reported(op, self.layout.root):
                        for record in records:
                            self.recoverer.recover(record)
                        yield
                    return
            # A crashed operation held more locks than we do: take them all, then recover.
            wanted = need
        msg = f"could not settle the locks for {op}: interrupted operations keep appearing"
        raise StoreError(msg, path=self.layout.root, field="journal")

    def settle(self, op: str, keys: Iterable[str], record: Record) -> None:
        """Make the keys a batch claims (``record``) its own.

        Each key is taken once, in sorted order, after the record is
        published: an operation that held it before the record appeared is
        waited for (and one that crashed holding it is recovered); one that
        takes it after finds the record and waits for the batch's lock.
        """
        ordered = sorted(set(keys))
        what = f"{op} (settling {len(ordered)} claims)"
        for key in ordered:
            # Every operation opens (creates) its lock file before it looks at the journal:
            # a key whose lock file does not exist now was never taken, and whoever takes
            # it from now on sees the record (published before this look).
            if not os.path.exists(self.locks.path(key)):
                continue
            with self.locks.hold((key,), what, note=False):
                pass
        # Whoever held a key before our record appeared is done now, or dead with its
        # record left: those few keys are settled again, recovering what they left.
        wanted = set(ordered)
        left = set()
        for name in self.journal.touching(tuple(ordered), skip=record.path.name):
            other = self.journal.load(name)
            if other is not None:
                left |= wanted.intersection((*other.keys, *other.claims))
        for key in sorted(left):
            with self.operation(op, (key,), own=record.path.name):
                pass

    @contextlib.contextmanager
    def intent(self, op: str, keys: tuple[str, ...], data: dict[str, Any],
               opid: str, *, claims: tuple[str, ...] = ()) -> Iterator[Record]:
        """Journal ``op`` for the block; on an exception, undo (or finish) it before raising."""
        record = self.journal.begin(op, keys, data, opid=opid, claims=claims)
        try:
            yield record
        except LockTimeoutError:
            # The store lock (which undoing needs too) is busy: the record stays, and the
            # next operation on these boxes, gc() or a reopen undoes it.
            log.warning("operation_left_for_recovery", op=op, opid=opid)
            raise
        except BaseException:
            try:
                self.recoverer.recover(record)
            except (BoxdiskError, OSError) as exc:
                log.exception("operation_recovery_failed", op=op, opid=opid, error=str(exc),
                              hint="the record stays in the journal; the next open retries")
            raise
        self.journal.finish(record)

    # -- names and paths ---------------------------------------------------------------

    def box_dir(self, box_id: str) -> Path:
        """An existing box's directory (NotFoundError otherwise)."""
        bdir = self.layout.box_dir(box_id)
        if not bdir.is_dir():
            msg = f"no box {box_id!r}"
            raise NotFoundError(msg, path=bdir, field="box_id", value=box_id)
        return bdir

    def snapshot_dir(self, box_id: str, name: str) -> Path:
        """An existing snapshot's directory (NotFoundError otherwise)."""
        sdir = self.layout.snapshot_dir(box_id, name)
        if not sdir.is_dir() or (sdir / REMOVED_MARKER).exists():
            msg = f"box {box_id!r} has no snapshot {name!r}"
            raise NotFoundError(msg, path=sdir, field="snapshot", value=name)
        return sdir

    def base_image(self, name: str) -> tuple[Path, BackingFormat]:
        """A base's image file and format (NotFoundError when there is no such base)."""
        bdir = self.layout.base_dir(name)
        for fmt in (BackingFormat.QCOW2, BackingFormat.RAW):
            path = bdir / f"disk.{fmt.value}"
            if path.is_file():
                return path, fmt
        msg = f"no base {name!r}"
        raise NotFoundError(msg, path=bdir, field="base", value=name)

    @staticmethod
    def disks_in(directory: Path) -> list[str]:
        """The disks a box, snapshot or clone directory holds (the container first)."""
        disks = [d for d in DISK_NAMES if (directory / d).is_file()]
        if CONTAINER_DISK not in disks:
            msg = f"{CONTAINER_DISK} is missing"
            raise StoreError(msg, path=directory / CONTAINER_DISK, field="disk")
        return disks

    def idle_disks(self, directory: Path, action: str) -> list[str]:
        """The disks of a live box directory, refused (DiskInUseError) while QEMU holds one."""
        disks = self.disks_in(directory)
        for d in disks:
            ensure_not_in_use(directory / d, action)
        return disks

    @staticmethod
    def read_meta(path: Path, what: str) -> dict[str, Any]:
        """A metadata file's JSON object (StoreError when missing or not an object)."""
        try:
            meta = read_json(path)
        except FileNotFoundError:
            msg = f"{what} metadata is missing"
            raise StoreError(msg, path=path, field=path.name) from None
        if not isinstance(meta, dict):
            msg = f"{what} metadata is not a JSON object"
            raise StoreError(msg, path=path, field=path.name, value=meta)
        return meta
