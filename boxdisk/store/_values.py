"""The values a store hands out: boxes, snapshots, and the reports of verify() and gc()."""

from __future__ import annotations

from pathlib import Path

import attrs

from boxdisk._disk import Disk, DiskFormat
from boxdisk._errors import NotFoundError

__all__ = ["Box", "GcReport", "Problem", "Snapshot", "VerifyReport"]


@attrs.define(frozen=True)
class Snapshot:
    """An immutable snapshot of a box: its disks as they were when it was taken.

    ``size`` is the container disk's virtual size; ``host_bytes`` what the
    snapshot's own files take on the host (not counting what they back onto).
    """

    box_id: str
    name: str
    dir: Path
    disk: Path
    guest_disk: Path | None
    created: float
    size: int
    host_bytes: int


@attrs.define(frozen=True)
class Box:
    """A box as it is now.

    ``disk`` is the live container disk (hand it to the VM), ``guest_disk`` the
    live guest-rootfs disk or None; ``base`` and ``guest_base`` the names of the
    store bases they descend from (None for a standalone or imported disk);
    ``snapshots`` the snapshot names, oldest first; ``size`` and ``guest_size``
    the virtual sizes; ``host_bytes`` what the box's own files (snapshots
    included) take on the host; ``clone_of`` the box it was cloned from;
    ``qmp`` and ``guest_agent`` the sockets of the QEMU that runs it (and of
    its guest agent) while it is attached (:meth:`BoxStore.attach`).
    """

    id: str
    dir: Path
    disk: Path
    guest_disk: Path | None
    base: str | None
    guest_base: str | None
    snapshots: tuple[str, ...]
    size: int
    guest_size: int | None
    host_bytes: int
    created: float
    clone_of: str | None = None
    qmp: str | None = None
    guest_agent: str | None = None

    def open_disk(self, *, guest: bool = False) -> Disk:
        """A handle on a live disk; persistent: closing it never deletes the store's file.

        The store owns its disks; a launcher that wants an ephemeral disk asks
        for an ephemeral box (:meth:`BoxStore.ephemeral_box`).
        """
        path = self.guest_disk if guest else self.disk
        if path is None:
            msg = f"box {self.id!r} has no guest disk"
            raise NotFoundError(msg, path=self.dir, field="guest_disk", value=None)
        return Disk(path, DiskFormat.QCOW2, persistent=True)


@attrs.define(frozen=True)
class Problem:
    """One thing :meth:`BoxStore.verify` found wrong: the file, what kind, and the evidence."""

    path: str
    kind: str
    message: str


@attrs.define(frozen=True)
class VerifyReport:
    """What :meth:`BoxStore.verify` checked and found; ``ok`` when nothing is wrong.

    ``in_flight`` lists operations other processes are running right now (not
    problems: their files are skipped).
    """

    images: int
    boxes: int
    problems: tuple[Problem, ...] = ()
    in_flight: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """Whether no problem was found."""
        return not self.problems


@attrs.define(frozen=True)
class GcReport:
    """What :meth:`BoxStore.gc` removed (or, with ``dry_run``, would remove).

    ``recovered`` are interrupted operations finished or rolled back,
    ``clone_bases`` clone bases nothing depended on, ``leftovers`` staging
    files and trash of interrupted operations.
    """

    dry_run: bool
    recovered: tuple[str, ...] = ()
    clone_bases: tuple[str, ...] = ()
    leftovers: tuple[str, ...] = ()
    bytes_freed: int = 0
