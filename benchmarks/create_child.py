"""Durable COW children: boxdisk in-process against ``qemu-img create``, from one run.

For N rounds each side makes a qcow2 child of the same raw base:

* boxdisk: ``create_cow_child_disk(base, RAW, child)`` — header, refcounts and a
  sparse L1 written natively, the file fsynced, linked into place, the directory
  fsynced (what the function always does);
* QEMU: ``qemu-img create -f qcow2 -b BASE -F raw CHILD``, one process per child.

It prints the median and 90th percentile per child for each, their ratio, and
the cost of fsyncing a small new file plus its directory: the floor under any
durable create on this machine, and the exact syscalls boxdisk makes for a
child run in a bare loop (so the Python cost is the difference). Targets:
<= 0.5 ms per durable child and >= 10x faster than qemu-img.

    python benchmarks/create_child.py [-n 500] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from boxdisk import BackingFormat, create_cow_child_disk

BASE_SIZE = 1 << 30  # a 1 GiB raw base (sparse)


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank."""
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def time_boxdisk(base: Path, out: Path, n: int) -> list[float]:
    samples = []
    for i in range(n):
        child = out / f"child-{i}.qcow2"
        t0 = time.perf_counter_ns()
        create_cow_child_disk(base, BackingFormat.RAW, child, persistent=True)
        samples.append((time.perf_counter_ns() - t0) / 1e6)
    return samples


def time_qemu_img(qemu_img: str, base: Path, out: Path, n: int) -> list[float]:
    samples = []
    for i in range(n):
        child = out / f"child-{i}.qcow2"
        argv = [qemu_img, "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(child)]
        t0 = time.perf_counter_ns()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        samples.append((time.perf_counter_ns() - t0) / 1e6)
    return samples


def time_fsync_floor(out: Path, n: int) -> list[float]:
    """fsync of a freshly written 4 KiB file plus fsync of its directory."""
    samples = []
    dir_fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(n):
            fd = os.open(out / f"f-{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, bytes(4096))
                t0 = time.perf_counter_ns()
                os.fsync(fd)
                os.fsync(dir_fd)
                samples.append((time.perf_counter_ns() - t0) / 1e6)
            finally:
                os.close(fd)
    finally:
        os.close(dir_fd)
    return samples


def time_syscall_floor(out: Path, n: int) -> list[float]:
    """The exact syscalls of a durable child, in a bare loop: what no Python code can beat.

    Create a temporary file (O_EXCL), write a header, a refcount table and a
    refcount block, set the length, fsync, link into place, unlink the
    temporary name, fsync the directory.
    """
    cs = 64 * 1024
    chunks = [(0, bytes(512)), (cs, bytes(8)), (2 * cs, bytes(8))]
    samples = []
    for i in range(n):
        tmp, dst = out / f".c-{i}.tmp", out / f"c-{i}.qcow2"
        t0 = time.perf_counter_ns()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        for off, data in chunks:
            os.pwrite(fd, data, off)
        os.ftruncate(fd, 4 * cs)
        os.fsync(fd)
        os.close(fd)
        os.link(tmp, dst)
        os.unlink(tmp)
        dir_fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        os.fsync(dir_fd)
        os.close(dir_fd)
        samples.append((time.perf_counter_ns() - t0) / 1e6)
    return samples


def fresh(root: Path, name: str) -> Path:
    d = root / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    return d


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=500, help="children per side (default 500)")
    ap.add_argument("--dir", type=Path, default=None,
                    help="where to create files (default: a temporary directory)")
    args = ap.parse_args(argv)
    # The application decides what boxdisk logs: keep the timed loop free of log output.

    qemu_img = shutil.which("qemu-img")
    with tempfile.TemporaryDirectory(prefix="boxdisk-bench-", dir=args.dir) as tmp:
        root = Path(tmp)
        base = root / "base.raw"
        with base.open("wb") as f:
            f.truncate(BASE_SIZE)
        warm = max(5, args.n // 50)
        time_boxdisk(base, fresh(root, "warm-boxdisk"), warm)
        ours = time_boxdisk(base, fresh(root, "boxdisk"), args.n)
        floor = time_fsync_floor(fresh(root, "fsync"), args.n)
        syscalls = time_syscall_floor(fresh(root, "syscalls"), args.n)
        theirs: list[float] = []
        if qemu_img:
            time_qemu_img(qemu_img, base, fresh(root, "warm-qemu"), warm)
            theirs = time_qemu_img(qemu_img, base, fresh(root, "qemu"), args.n)

    rows = [("boxdisk create_cow_child_disk", ours)]
    if theirs:
        rows.append(("qemu-img create (a process each)", theirs))
    print(f"create_child: {args.n} qcow2 children of a 1 GiB raw base, per child "
          f"(python {sys.version.split()[0]})")
    print(f"{'':34} {'median':>10} {'p90':>10}")
    for name, s in rows:
        print(f"{name:34} {statistics.median(s):>7.3f} ms {percentile(s, 90):>7.3f} ms")
    if theirs:
        r_med = statistics.median(theirs) / statistics.median(ours)
        r_p90 = percentile(theirs, 90) / percentile(ours, 90)
        print(f"{'ratio qemu-img / boxdisk':34} {r_med:>8.1f} x {r_p90:>8.1f} x")
    else:
        print("qemu-img not found: install qemu-utils for the comparison")
    print(f"{'fsync floor (4 KiB file + dir)':34} {statistics.median(floor):>7.3f} ms "
          f"{percentile(floor, 90):>7.3f} ms")
    print(f"{'syscall floor (same calls, bare)':34} {statistics.median(syscalls):>7.3f} ms "
          f"{percentile(syscalls, 90):>7.3f} ms")
    med = statistics.median(ours)
    verdict = [f"per durable child {med:.3f} ms ({'meets' if med <= 0.5 else 'misses'} "
               f"<= 0.5 ms)"]
    if theirs:
        ratio = statistics.median(theirs) / med
        verdict.append(f"{ratio:.0f}x qemu-img ({'meets' if ratio >= 10 else 'misses'} >= 10x)")
    print("target: " + "; ".join(verdict))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
