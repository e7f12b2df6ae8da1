"""``BoxStore``: per-box directories of qcow2 disks, with snapshots, clones and safe removal.

This module is the façade: it opens (or creates) a store, checks every
argument before any file is touched, and hands each call to the module that
owns its rules:

==================  ===================================================
``_boxes``          add_base, create_box, create_boxes, import_box
``_snapshots``      snapshot, snapshot_boxes, restore
``_clones``         clone_box, export_box
``_removal``        remove_snapshot, remove_box, gc
``_queries``        list_boxes, box, snapshots, images, graph
``_verify``         verify
``_recovery``       finishing or undoing what a crashed process left
``_specs``          a batch's arguments, checked before any file is touched
``_opening``        creating and checking the layout
``_core``           locks, intents and lookups every operation shares
``_freeze``         what snapshot and clone share
``_fs``             the store's own file writes and its one durable-call seam
==================  ===================================================

Every operation is all-or-nothing across processes and crashes:

- it takes the locks of the boxes (or base) it touches, in sorted order, and
  the store-wide lock only around the steps that link, rename, create or
  delete images (so ``gc``, ``verify`` and the removal guard, which scan under
  that lock, never see half a step);
- it publishes its intent in the journal before its first step, writes what a
  step needs without syncing, and makes it durable with one barrier (one
  ``syncfs``, or an fsync per file): two durable calls per operation, listed
  step by step in ``docs/store.md``;
- whoever next takes one of its locks (or opens the store) undoes an
  interrupted operation that had not reached its point of no return, and
  finishes one that had (telling which from the files themselves).

Dependencies are read from the images' headers (:class:`DependencyGraph`),
never from metadata: a disk anything backs onto is never removed.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from boxdisk._args import as_format, as_path
from boxdisk._errors import (
    BoxdiskError,
    InvalidArgumentError,
    NotFoundError,
    StoreError,
)
from boxdisk._formats import FormatArg
from boxdisk._log import get_logger
from boxdisk.graph import DependencyGraph
from boxdisk.ops import Progress
from boxdisk.qcow2 import BackingFormat

from . import _boxes, _clones, _live, _queries, _removal, _snapshots, _specs
from ._boxes import BoxSpec
from ._core import StoreContext, check_size, ms, reported
from ._fs import SYNC_MODES, Durability
from ._handlers import RECOVERY
from ._journal import Journal, new_opid
from ._layout import Layout
from ._locks import StoreLocks
from ._names import check_name
from ._opening import one_file_system, open_or_create
from ._recovery import Recovery
from ._values import Box, GcReport, Snapshot, VerifyReport
from ._verify import Verifier

__all__ = ["BoxStore"]

log = get_logger(__name__)



class BoxStore:
    """A directory of boxes, bases, snapshots and clone bases, shared by any number of processes.

    ``BoxStore(root)`` creates the layout on first use (in a missing or empty
    directory) and opens an existing store otherwise, finishing or rolling back
    whatever a crashed process left in flight. ``lock_timeout`` bounds every
    wait for another process's lock (:class:`LockTimeoutError`).

    ``sync`` says how a step makes many files durable at once: ``"auto"`` (the
    default) with one ``syncfs(2)`` of the store's file system where the kernel
    reports its errors (Linux 5.8 and later) and the store is one file system,
    else as ``"fsync"``, one ``fsync`` per file and directory. A ``syncfs``
    also writes back other programs' unsaved data on that file system: on one
    shared with heavy writers, ``"fsync"`` keeps their data out of the store's
    latency (``docs/store.md`` counts both).

    Lifecycle: open from construction until :meth:`close` (idempotent); use it
    as a context manager. Between operations the store keeps only its lock
    files open (at most :data:`boxdisk.store._locks.MAX_OPEN`).
    """

    def __init__(self, root: str | os.PathLike[str], *, lock_timeout: float = 30.0,
                 sync: str = "auto") -> None:
        if not isinstance(lock_timeout, (int, float)) or lock_timeout < 0:
            msg = f"lock_timeout {lock_timeout!r} is not a non-negative number of seconds"
            raise InvalidArgumentError(msg, field="lock_timeout", value=lock_timeout)
        if sync not in SYNC_MODES:
            msg = f"sync {sync!r} is not one of {', '.join(map(repr, SYNC_MODES))}"
            raise InvalidArgumentError(msg, field="sync", value=sync)
        self._closed = True
        self._layout = Layout(Path(os.path.realpath(as_path(root, "root"))))
        with reported("opening the store", self._layout.root):
            open_or_create(self._layout)
            durability = Durability(self._layout.root, sync,
                                    one_file_system=one_file_system(self._layout))
            self._locks = StoreLocks(self._layout, float(lock_timeout))
            self._journal = Journal(self._layout)
            self._ctx = StoreContext(self._layout, self._locks, self._journal, durability)
            self._recovery = Recovery(self._ctx, RECOVERY)
            self._ctx.recovery = self._recovery
            self._closed = False
            self._recovery.recover_dead()

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
    def sync(self) -> str:
        """How this store makes many files durable at once: ``"syncfs"`` or ``"fsync"``."""
        return self._ctx.durability.mode

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._closed

    def close(self) -> None:
        """Close the store's lock files; later calls raise. Idempotent."""
        if not self._closed:
            self._closed = True
            self._ctx.closed = True
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

    # -- reading -----------------------------------------------------------------------

    def list_boxes(self) -> list[str]:
        """The ids of every box, sorted."""
        self._check_open()
        return _queries.list_boxes(self._ctx)

    def list_bases(self) -> list[str]:
        """The names of every base, sorted."""
        self._check_open()
        return _queries.list_bases(self._ctx)

    def base_path(self, name: str) -> Path:
        """The image file of a base."""
        self._check_open()
        check_name(name, "base name")
        return self._ctx.base_image(name)[0]

    def box(self, box_id: str) -> Box:
        """The box ``box_id`` as it is now (:class:`NotFoundError` if there is none)."""
        self._check_open()
        check_name(box_id, "box id")
        return _queries.box_value(self._ctx, box_id, self._ctx.box_dir(box_id))

    def list_snapshots(self, box_id: str) -> list[Snapshot]:
        """The snapshots of a box, oldest first."""
        self._check_open()
        check_name(box_id, "box id")
        return _queries.snapshots(self._ctx, box_id, self._ctx.box_dir(box_id))

    def snapshot_info(self, box_id: str, name: str) -> Snapshot:
        """One snapshot of a box."""
        self._check_open()
        check_name(box_id, "box id")
        check_name(name, "snapshot name")
        self._ctx.box_dir(box_id)
        return _queries.snapshot_value(self._ctx, box_id, self._ctx.snapshot_dir(box_id, name))

    def graph(self) -> DependencyGraph:
        """The dependency graph of every image in the store, read from their headers."""
        self._check_open()
        return _queries.graph(self._ctx)

    def _images(self) -> list[str]:
        """Every qcow2 image in the store (staging and trash excluded)."""
        return _queries.images(self._ctx)

    # -- bases and boxes -----------------------------------------------------------------

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
        return _boxes.add_base(self._ctx, src, name, fmt, link=link)

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
        return _boxes.create_box(self._ctx, box_id, base=base, size=check_size(size),
                                 guest_base=guest_base)

    def create_boxes(self, specs: Iterable[str | BoxSpec], *, base: str | None = None,
                     size: int | None = None, guest_base: str | None = None) -> list[Box]:
        """Create many boxes in one operation: all of them, or (after any crash) none.

        Each spec is a box id, which takes ``base``, ``size`` and
        ``guest_base`` as :meth:`create_box` would, or a :class:`BoxSpec`
        saying its own. The durable steps do not grow with the number of
        boxes (one journal record, two durable calls with ``sync="syncfs"``):
        a warm pool of a thousand boxes over one base costs a fraction of a
        thousand ``create_box`` calls. Every id, name, base and size is
        checked before any file is touched; the errors name every offending
        entry (:class:`InvalidNameError`, :class:`AlreadyExistsError` for an
        id given twice or taken, :class:`NotFoundError` for an unknown base).
        """
        self._check_open()
        checked = _specs.box_specs(self._ctx, specs, base=base, size=size, guest_base=guest_base)
        if not checked:
            return []
        return _boxes.create_boxes(self._ctx, checked)

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
            _boxes.check_standalone(src, source=src)
        return _boxes.import_box(self._ctx, box_id, src, format)

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

    # -- snapshot, restore, clone, export ------------------------------------------------------

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
        return _snapshots.snapshot(self._ctx, box_id, name)

    def snapshot_boxes(self, specs: Iterable[str | tuple[str, str]],
                       name: str | None = None) -> list[Snapshot]:
        """Snapshot many boxes in one operation: all of them, or (after any crash) none.

        Each spec is a box id (its snapshot is called ``name``) or a
        ``(box_id, snapshot_name)`` pair. As for :meth:`create_boxes`, the
        durable steps do not grow with the number of boxes, and bad input
        (a box given twice, an unknown box, a taken or invalid name) is
        refused, naming every offending entry, before any file is touched.
        """
        self._check_open()
        pairs = _specs.snapshot_specs(self._ctx, specs, name)
        if not pairs:
            return []
        return _snapshots.snapshot_boxes(self._ctx, pairs)

    def restore(self, box_id: str, name: str) -> None:
        """Give the box fresh live disks over snapshot ``name`` (its current live state goes).

        Each live disk is replaced by a rename over it, so at no instant is the
        box without a disk. Refused while a QEMU holds a live disk.
        """
        self._check_open()
        check_name(box_id, "box id")
        check_name(name, "snapshot name")
        _snapshots.restore(self._ctx, box_id, name)

    def clone_box(self, src_id: str, dst_id: str) -> Box:
        """A new box ``dst_id`` with the current state of ``src_id``; the two then diverge.

        The source's live disks are frozen (renamed, not copied) into an
        immutable clone base under ``clones/``; source and destination each get
        new COW children over it, so writes to either never show in the other.
        """
        self._check_open()
        check_name(src_id, "box id")
        check_name(dst_id, "box id")
        return _clones.clone_box(self._ctx, src_id, dst_id)

    def attach(self, box_id: str, qmp: str | os.PathLike[str], *,
               guest_agent: str | os.PathLike[str] | None = None) -> None:
        """Record that the QEMU whose QMP socket is ``qmp`` runs the box (live operations).

        QEMU is asked first (``query-named-block-nodes``) and must have the
        box's live disks open for writing, found by their files whether it was
        started with ``-drive`` or ``-blockdev``; ``guest_agent``, the socket of
        the QEMU guest agent in the VM, must answer ``guest-ping``. Other
        processes see the attachment (it is in the store). While attached,
        :meth:`snapshot` works live; :meth:`restore`, :meth:`clone_box`,
        :meth:`export_box` of the live disk, :meth:`remove_snapshot` and
        :meth:`remove_box` raise DiskInUseError saying the box is running.
        """
        self._check_open()
        check_name(box_id, "box id")
        sock = os.path.abspath(as_path(qmp, "qmp"))
        agent = None if guest_agent is None else os.path.abspath(as_path(guest_agent,
                                                                         "guest_agent"))
        _live.attach(self._ctx, box_id, sock, agent)

    def detach(self, box_id: str) -> None:
        """Forget the box's QEMU (call it when the VM has stopped); idempotent.

        When nothing holds the box's files any more, its disks are given their
        usual names again (a live snapshot had given the top a new one);
        otherwise the next operation on the box does that.
        """
        self._check_open()
        check_name(box_id, "box id")
        _live.detach(self._ctx, box_id)

    def export_box(self, box_id: str, dest: str | os.PathLike[str], *,
                   snapshot: str | None = None, guest: bool = False,
                   overwrite: bool = False, progress: Progress | None = None,
                   keep_snapshot: bool = False) -> Path:
        """Write the live disk (or snapshot ``snapshot``) as one standalone qcow2 at ``dest``.

        ``guest=True`` exports the guest disk instead of the container disk.
        ``progress(done_bytes, total_bytes)`` is called as the copy advances
        (and, on a running box, as QEMU merges back). The chain is opened
        (confined to the store) under the box's lock and then read from the
        open files, so operations on the box may go on during the copy.

        On a box attached to its running QEMU (:meth:`attach`) the export is
        live: a live snapshot (``export-OPID``) freezes the disks, the frozen
        chain is copied while the guest keeps writing, and then, unless
        ``keep_snapshot``, QEMU merges what the guest wrote meanwhile back
        into the frozen file (an active ``block-commit``) and the snapshot
        goes, so the box's chain is as it was. A QEMU holding the disk of a
        box that is not attached refuses the export (DiskInUseError).
        """
        self._check_open()
        check_name(box_id, "box id")
        dest = as_path(dest, "dest")
        if snapshot is not None:
            check_name(snapshot, "snapshot name")
        return _clones.export_box(self._ctx, box_id, Path(dest), snapshot=snapshot,
                                  guest=guest, overwrite=overwrite, progress=progress,
                                  keep_snapshot=keep_snapshot)

    # -- removal, gc and verify ------------------------------------------------------------------

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
        _removal.remove_snapshot(self._ctx, box_id, name, merge=merge)

    def remove_box(self, box_id: str) -> None:
        """Delete a box with its snapshots; refused while any image outside it backs onto them.

        Clone bases that nothing but the box depended on go with it.
        """
        self._check_open()
        check_name(box_id, "box id")
        _removal.remove_box(self._ctx, box_id)

    def gc(self, *, dry_run: bool = False) -> GcReport:
        """Remove clone bases nothing depends on and what interrupted operations left behind.

        Interrupted operations are first finished or rolled back. With
        ``dry_run`` nothing is changed and the report says what would go.
        """
        self._check_open()
        return _removal.gc(self._ctx, dry_run=dry_run)

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
        verifier = Verifier(self._ctx)
        with self._locks.structural("verify"):
            verifier.structure()
        verifier.contents()
        report = verifier.report()
        log.info("store_verified", ok=report.ok, problems=len(report.problems),
                 images=report.images, ms=ms(start))
        return report
