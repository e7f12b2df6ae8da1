"""Where everything of a store lives: one place that turns names into paths.

::

    ROOT/
      .boxdisk/store.json               format marker and version
      .boxdisk/store.lock               the store-wide lock (short structural changes)
      .boxdisk/locks/KEY.lock           per-box (and per-base) locks, holder info inside
      .boxdisk/journal/OPID.KEYS.json   intent of an operation in flight
      .boxdisk/journal/OPID.KEY.batch.json  a batch's, listing the boxes it claims
      .boxdisk/trash/OPID*              what a removal has taken out, until it is deleted
      bases/NAME/disk.{qcow2,raw}       read-only base images, with base.json
      boxes/ID/disk.qcow2               the box's live container disk
      boxes/ID/guest-rootfs.qcow2       its optional second (guest) disk
      boxes/ID/box.json                 the box's metadata
      boxes/ID/live.json                while QEMU runs it (attach): the QMP socket; the
                                        tops a live snapshot gave new names (disk.OPID.qcow2)
      boxes/ID/snapshots/               made with the box
      boxes/ID/snapshots/NAME/          an immutable snapshot: the disks, snapshot.json
      boxes/ID/snapshots/NAME/.removed  only that: removed while QEMU ran, kept till it stops
      clones/CID/                       an immutable clone base: the disks, clone.json

Staging names start with ``.`` (box ids and snapshot names never do) and carry
the operation's id, so a leftover is always traceable to its journal record.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from boxdisk.qcow2 import GUEST_ROOTFS_DISK

__all__ = [
    "BOX_META",
    "CONTAINER_DISK",
    "DISK_NAMES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "GUEST_DISK",
    "META_DIR",
    "REMOVED_MARKER",
    "Layout",
    "key_hash",
]

META_DIR = ".boxdisk"
FORMAT_NAME = "boxdisk-store"
FORMAT_VERSION = 2
CONTAINER_DISK = "disk.qcow2"
GUEST_DISK = GUEST_ROOTFS_DISK
#: The disks a box (or snapshot, or clone base) may hold, container first.
DISK_NAMES = (CONTAINER_DISK, GUEST_DISK)
BOX_META = "box.json"
SNAPSHOT_META = "snapshot.json"
CLONE_META = "clone.json"
#: In a snapshot directory: the snapshot is removed, the directory kept until the box
#: stops (a running QEMU names the images under it through the directory).
REMOVED_MARKER = ".removed"
BASE_META = "base.json"


def key_hash(key: str) -> str:
    """A short, file-name-safe digest of a lock key (``box:ID`` may be 255+ characters)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class Layout:
    """Paths of one store; ``root`` is the store's real path (symlinks resolved)."""

    __slots__ = ("_prefix", "bases", "boxes", "clones", "journal", "locks", "meta", "root",
                 "trash")

    def __init__(self, root: Path) -> None:
        self.root = root
        self._prefix = os.fspath(root).rstrip(os.sep) + os.sep
        self.meta = root / META_DIR
        self.journal = self.meta / "journal"
        self.locks = self.meta / "locks"
        self.trash = self.meta / "trash"
        self.bases = root / "bases"
        self.boxes = root / "boxes"
        self.clones = root / "clones"

    @property
    def marker(self) -> Path:
        """The file saying this directory is a store, and which version wrote it."""
        return self.meta / "store.json"

    @property
    def store_lock(self) -> Path:
        """The store-wide lock file."""
        return self.meta / "store.lock"

    def box_dir(self, box_id: str) -> Path:
        """A box's directory."""
        return self.boxes / box_id

    def snapshots_dir(self, box_id: str) -> Path:
        """The directory holding a box's snapshots."""
        return self.boxes / box_id / "snapshots"

    def snapshot_dir(self, box_id: str, name: str) -> Path:
        """One snapshot's directory."""
        return self.boxes / box_id / "snapshots" / name

    def base_dir(self, name: str) -> Path:
        """One base's directory."""
        return self.bases / name

    def clone_dir(self, cid: str) -> Path:
        """One clone base's directory."""
        return self.clones / cid

    def lock_file(self, key: str) -> Path:
        """The lock file of a box or base key."""
        return self.locks / f"{key_hash(key)}.lock"

    def rel(self, path: str | os.PathLike[str]) -> str:
        """``path`` relative to the root (journal records hold these, so a store can move)."""
        text = os.fspath(path)
        if text.startswith(self._prefix):
            tail = text[len(self._prefix):]
            parts = tail.split(os.sep)
            if tail and "" not in parts and "." not in parts and ".." not in parts:
                return tail  # already normal: what relpath would say, without its work
        return os.path.relpath(path, self.root)

    def abs(self, rel: str) -> Path:
        """The path of a root-relative name from a journal record."""
        return self.root / rel

    def under_root(self, path: str | os.PathLike[str]) -> bool:
        """Whether a real path lies inside the store."""
        real = os.path.realpath(path)
        return os.path.commonpath([real, self.root]) == str(self.root)
