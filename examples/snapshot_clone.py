"""Snapshot, clone, restore and remove with BoxStore — and the guard that keeps every disk.

This is what a VM launcher does around each VM between boots: snapshot its
disk, clone it for a second VM, roll back, and clean up. The removal guard
refuses to delete anything another disk still reads through, naming the
dependents; ``merge=True`` streams a snapshot into its dependents first, so
their guest-visible bytes stay the same. Writes through boxdisk's engine stand
in for the guests here.

    python examples/snapshot_clone.py [WORKDIR]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import boxdisk

MiB = 1 << 20


def guest_write(store: boxdisk.BoxStore, disk: Path, offset: int, data: bytes) -> None:
    """Stand-in for a running VM: write through the disk's chain, confined to the store."""
    with boxdisk.open_chain(disk, writable=True, allowed_roots=[store.root]) as chain:
        chain.write(offset, data)
        chain.flush()


def guest_read(store: boxdisk.BoxStore, disk: Path, offset: int, length: int) -> bytes:
    """What the VM would read at ``offset``."""
    with boxdisk.open_chain(disk, allowed_roots=[store.root]) as chain:
        return chain.read(offset, length)


def main(workdir: Path) -> int:
    golden = workdir / "golden.qcow2"
    with boxdisk.create_disk(golden, persistent=True, size=256 * MiB):
        pass  # an empty 256 MiB qcow2 stands in for an OS image

    with boxdisk.BoxStore(workdir / "store") as store:
        store.add_base(golden, "golden", backing_format="qcow2")
        web = store.create_box("web", base="golden")
        guest_write(store, web.disk, 0, b"release 1")

        # A snapshot renames the live disk (no copy); the box gets a new, empty child over it.
        store.snapshot("web", "release-1")
        guest_write(store, web.disk, 0, b"release 2")
        print(f"web: snapshots {[s.name for s in store.list_snapshots('web')]}, "
              f"live disk reads {guest_read(store, web.disk, 0, 9)!r}")

        # A clone freezes web's current state into a clone base both boxes read through.
        canary = store.clone_box("web", "canary")
        guest_write(store, canary.disk, 0, b"canary!!!")
        assert guest_read(store, web.disk, 0, 9) == b"release 2", "clone writes stay in the clone"
        print(f"canary: cloned from web, reads {guest_read(store, canary.disk, 0, 9)!r}")

        # The guard: release-1 backs the clone base, which backs both boxes.
        try:
            store.remove_snapshot("web", "release-1")
        except boxdisk.SnapshotInUseError as exc:
            names = ", ".join(Path(d).relative_to(store.root).as_posix() for d in exc.dependents)
            print(f"remove release-1 refused: still needed by {names}")
        else:
            return 1
        try:
            store.remove_box("web")
        except boxdisk.DependentsExistError as exc:
            print(f"remove web refused: {len(exc.dependents)} image(s) outside it back onto it")
        else:
            return 1

        # Roll web back; canary is untouched.
        store.restore("web", "release-1")
        print(f"web restored to release-1: reads {guest_read(store, web.disk, 0, 9)!r}")
        assert guest_read(store, canary.disk, 0, 9) == b"canary!!!"

        # Merge the snapshot away: its dependents keep every byte they showed.
        store.snapshot("web", "before-merge")
        before = {b: guest_read(store, store.box(b).disk, 0, 1 * MiB) for b in ("web", "canary")}
        store.remove_snapshot("web", "release-1", merge=True)
        after = {b: guest_read(store, store.box(b).disk, 0, 1 * MiB) for b in ("web", "canary")}
        print(f"release-1 merged into its dependents and removed; content unchanged: "
              f"{before == after}; web's snapshots now {store.box('web').snapshots}")

        # Removal order: the clone first, then its source (and the clone base goes with it).
        store.remove_box("canary")
        store.remove_box("web")
        problems = store.verify().problems
        print(f"boxes left: {store.list_boxes()}; verify: {problems or 'clean'}")
        return 0 if before == after and not problems and not store.list_boxes() else 1


if __name__ == "__main__":
    if len(sys.argv) > 1:
        sys.exit(main(Path(sys.argv[1])))
    with tempfile.TemporaryDirectory(prefix="boxdisk-snapshots-") as tmp:
        sys.exit(main(Path(tmp)))
