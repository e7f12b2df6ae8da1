"""A VM launcher's use of boxdisk: a private copy-on-write disk per VM, in about a millisecond.

Every VM boots from one shared, read-only base image. Each gets its own qcow2
child of that base; the guest's writes land in the child, the base never
changes. A child made with the default (ephemeral) handle is deleted when the
handle closes, so a crashed launcher never leaves scratch disks behind; the
one VM whose disk we want to keep is kept with ``leak()``.

    python examples/launcher.py [WORKDIR]
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import structlog

import boxdisk

MiB = 1 << 20


def make_base(path: Path) -> Path:
    """A raw 'golden image': 16 MiB whose every sector says which sector it is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        for sector in range(16 * MiB // 512):
            f.write(f"sector {sector:08d} ".encode().ljust(512, b"."))
    path.chmod(0o444)  # bases are read-only; boxdisk never writes them
    return path


def main(workdir: Path) -> int:
    base = make_base(workdir / "bases" / "golden.raw")
    kept: Path | None = None
    for vm in range(3):
        start = time.perf_counter()
        # Relative backing names keep the tree movable as a whole.
        with boxdisk.create_cow_child_disk(
            base, boxdisk.BackingFormat.RAW, workdir / "vms" / f"vm{vm}" / "disk.qcow2",
            relative=True,
        ) as disk:
            ms = (time.perf_counter() - start) * 1000
            with boxdisk.open_chain(disk.path) as chain:  # what the guest will see
                first = chain.read(512 * 7, 15)
            print(f"vm{vm}: {disk.path.relative_to(workdir)} ({ms:.2f} ms), "
                  f"reads {first!r} from the base through the child")
            if vm == 2:
                kept = disk.leak()  # this VM's disk outlives its handle
        # Leaving the ``with`` block deleted vm0's and vm1's disks.
    leftovers = sorted(p.relative_to(workdir).as_posix()
                       for p in (workdir / "vms").rglob("*.qcow2"))
    print(f"disks left on disk: {leftovers}")
    assert kept is not None
    chain = [Path(os.path.normpath(p)).relative_to(workdir).as_posix()
             for p in boxdisk.read_backing_chain(kept)]
    print(f"kept: {kept.relative_to(workdir)}, backing chain {chain}")
    return 0 if leftovers == ["vms/vm2/disk.qcow2"] else 1


if __name__ == "__main__":
    # boxdisk logs key-value events through structlog and configures nothing itself;
    # the application decides. Here: warnings only.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if len(sys.argv) > 1:
        sys.exit(main(Path(sys.argv[1])))
    with tempfile.TemporaryDirectory(prefix="boxdisk-launcher-") as tmp:
        sys.exit(main(Path(tmp)))
