"""An embedder's box lifecycle with BoxStore: base, boxes, snapshot, clone, guard, export.

This is what a VM launcher does around each VM: create a box over a base, hand
its disk to QEMU, snapshot it, clone it for a second VM, roll back, and export.
Here a few writes through boxdisk's engine stand in for the guest.

    python examples/store_workflow.py [WORKDIR]
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

import structlog

import boxdisk

MiB = 1 << 20


def guest_write(store: boxdisk.BoxStore, disk: Path, offset: int, data: bytes) -> None:
    """Stand-in for a running VM: write through the disk's chain, confined to the store."""
    with boxdisk.open_chain(disk, writable=True, allowed_roots=[store.root]) as chain:
        chain.write(offset, data)
        chain.flush()


def guest_read(store: boxdisk.BoxStore, disk: Path, offset: int, length: int) -> bytes:
    with boxdisk.open_chain(disk, allowed_roots=[store.root]) as chain:
        return chain.read(offset, length)


def main(workdir: Path) -> int:
    golden = workdir / "golden.qcow2"
    with boxdisk.create_disk(golden, persistent=True, size=256 * MiB):
        pass  # an empty 256 MiB qcow2 stands in for an OS image

    with boxdisk.BoxStore(workdir / "store") as store:
        store.add_base(golden, "golden", backing_format="qcow2")
        web = store.create_box("web", base="golden")
        print(f"box web: hand {web.disk} to QEMU")
        guest_write(store, web.disk, 0, b"release 1")

        store.snapshot("web", "release-1")
        guest_write(store, web.disk, 0, b"release 2")

        canary = store.clone_box("web", "canary")  # a second VM from web's state
        guest_write(store, canary.disk, 0, b"canary!!!")

        try:
            store.remove_snapshot("web", "release-1")
        except boxdisk.SnapshotInUseError as exc:
            print(f"guard: release-1 is still needed by {len(exc.dependents)} image(s)")

        store.restore("web", "release-1")  # roll web back; canary is untouched
        assert guest_read(store, web.disk, 0, 9) == b"release 1"
        assert guest_read(store, canary.disk, 0, 9) == b"canary!!!"

        out = store.export_box("canary", workdir / "canary.qcow2")
        report = boxdisk.check(out)
        print(f"exported canary to {out.name}: clean={report.clean}")

        with store.ephemeral_box(base="golden") as scratch:  # gone after the block
            guest_write(store, scratch.disk, 0, b"scratch")
        print(f"boxes: {store.list_boxes()}; verify: {not store.verify().problems}")
        return 0 if report.clean and not store.verify().problems else 1


if __name__ == "__main__":
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if len(sys.argv) > 1:
        sys.exit(main(Path(sys.argv[1])))
    with tempfile.TemporaryDirectory(prefix="boxdisk-store-") as tmp:
        sys.exit(main(Path(tmp)))
