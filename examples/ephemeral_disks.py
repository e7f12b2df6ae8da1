"""Context-managed scratch disks: a private copy-on-write disk per job, gone when the job is.

Every job (a VM, a test, a build) boots from one shared, read-only base image.
Each gets its own qcow2 child of that base in about a millisecond; its writes
land in the child and the base never changes. A disk made with the default
(ephemeral) handle is deleted when the handle closes — at the end of the
``with`` block, even when the block raises — so a failed job never leaves
scratch disks behind. The one disk worth keeping is kept with ``leak()``.

    python examples/ephemeral_disks.py [WORKDIR]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

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


def job(disk: boxdisk.Disk, n: int) -> bytes:
    """Stand-in for a guest: write a marker over the base's sector 7, read it back."""
    with boxdisk.open_chain(disk.path, writable=True) as chain:
        marker = f"job {n} was here".encode()
        chain.write(512 * 7, marker)
        chain.flush()
        return chain.read(512 * 7, len(marker))


def crashing_job(disk: boxdisk.Disk) -> None:
    """A job that writes, then fails."""
    job(disk, 3)
    msg = "the job crashed"
    raise RuntimeError(msg)


def main(workdir: Path) -> int:
    base = make_base(workdir / "bases" / "golden.raw")
    jobs = workdir / "jobs"

    # 1. A standalone scratch disk: sparse, 1 GiB virtual, a few hundred KiB on the host.
    with boxdisk.create_disk(jobs / "scratch.qcow2", size=1024 * MiB, persistent=False) as scratch:
        print(f"scratch: {scratch.path.name}, {boxdisk.qcow2_virtual_size(scratch.path)} bytes "
              f"virtual, {scratch.path.stat().st_blocks * 512} on the host")
    assert not (jobs / "scratch.qcow2").exists(), "closing the handle deletes the file"

    # 2. Three jobs over the same base; the last one's disk is kept.
    kept: Path | None = None
    for n in range(3):
        start = time.perf_counter()
        # Relative backing names keep the tree movable as a whole.
        with boxdisk.create_cow_child_disk(
            base, boxdisk.BackingFormat.RAW, jobs / f"job{n}" / "disk.qcow2", relative=True,
                    persistent=False
        ) as disk:
            ms = (time.perf_counter() - start) * 1000
            seen = job(disk, n)
            print(f"job{n}: {disk.path.relative_to(workdir)} in {ms:.2f} ms, reads {seen!r}")
            if n == 2:
                kept = disk.leak()  # this job's disk outlives its handle

    # 3. A job that fails: its disk is deleted all the same.
    failed = jobs / "job3" / "disk.qcow2"
    try:
        with boxdisk.create_cow_child_disk(base, boxdisk.BackingFormat.RAW, failed,
                persistent=False) as disk:
            crashing_job(disk)
    except RuntimeError as exc:
        print(f"job3: {exc}; its disk exists afterwards: {failed.exists()}")

    leftovers = sorted(p.relative_to(workdir).as_posix() for p in jobs.rglob("*.qcow2"))
    print(f"disks left on disk: {leftovers}")
    assert kept is not None
    chain = [Path(os.path.normpath(p)).relative_to(workdir).as_posix()
             for p in boxdisk.read_backing_chain(kept)]
    print(f"kept: {kept.relative_to(workdir)}, backing chain {chain}")
    with base.open("rb") as f:
        f.seek(512 * 7)
        base_unchanged = f.read(15) == b"sector 00000007"
    print(f"base unchanged by four jobs: {base_unchanged}")
    return 0 if leftovers == ["jobs/job2/disk.qcow2"] and base_unchanged else 1


if __name__ == "__main__":
    if len(sys.argv) > 1:
        sys.exit(main(Path(sys.argv[1])))
    with tempfile.TemporaryDirectory(prefix="boxdisk-ephemeral-") as tmp:
        sys.exit(main(Path(tmp)))
