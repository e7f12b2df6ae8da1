"""The box store in-process against doing the same by hand with qemu-img, mv and cp, from one run.

A store of 1,000 boxes (each a COW child of a 1 GiB qcow2 base) is built
first; then N boxes are created, snapshotted, cloned and restored, one
operation at a time, each timed. The peer does the equivalent by hand, a
process per qemu-img call:

* create_box  vs ``qemu-img create -b BASE`` (one process);
* snapshot    vs ``rename`` of the live disk + ``qemu-img create -b SNAPSHOT``;
* clone_box   vs ``rename`` of the live disk + two ``qemu-img create -b`` (source, clone);
* restore     vs ``qemu-img create -b SNAPSHOT`` + ``rename`` over the live disk.

boxdisk's side does more than the peer's: every operation takes its locks,
journals its intent and fsyncs every step (the peer fsyncs nothing).

Then every box gets snapshots until the store holds 10,000 images, and
``DependencyGraph.scan`` of the whole store is timed, beside ``qemu-img info
--backing-chain`` on a sample of chains (extrapolated to all). A removal-guard
decision on that graph (is a snapshot removable, and who depends on it) is
timed beside the seed runtime's way: walking every box's chain
(``is_backing_dependency``).

Targets (issue 5): median <= 2 ms for create_box, snapshot, clone_box and
restore on a 1,000-box store; scan of 10,000 images < 1 s; a guard decision
< 10 ms. Durable operations cost what the file system's fsyncs cost: the
table prints the fsync floor of the directory used, and ``--dir /dev/shm``
shows the CPU cost alone.

    python benchmarks/store.py [-n 200] [--boxes 1000] [--images 10000] [--dir DIR]
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
from collections.abc import Callable
from pathlib import Path

from boxdisk import create_disk, is_backing_dependency
from boxdisk.graph import DependencyGraph
from boxdisk.store import BoxStore

GIB = 1 << 30


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank."""
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def timed(fn: Callable[[int], object], n: int) -> list[float]:
    """Milliseconds of ``fn(i)`` for i in range(n)."""
    out = []
    for i in range(n):
        t0 = time.perf_counter_ns()
        fn(i)
        out.append((time.perf_counter_ns() - t0) / 1e6)
    return out


def fsync_floor(directory: Path, n: int = 200) -> list[float]:
    """Create a 4 KiB file, fsync it and its directory: the floor of one durable step."""
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    out = []
    try:
        for i in range(n):
            t0 = time.perf_counter_ns()
            fd = os.open(directory / f"floor-{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, bytes(4096))
            os.fsync(fd)
            os.close(fd)
            os.fsync(dfd)
            out.append((time.perf_counter_ns() - t0) / 1e6)
    finally:
        os.close(dfd)
    return out


def fs_type(path: Path) -> str:
    best, kind = "", "?"
    with open("/proc/mounts", encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            mount = parts[1]
            if str(path).startswith(mount) and len(mount) > len(best):
                best, kind = mount, parts[2]
    return f"{kind} ({best})"


def run(qemu_img: str, work: Path, n: int, boxes: int, images: int) -> int:
    root = work / "store"
    store = BoxStore(root)
    base_src = work / "base.qcow2"
    create_disk(base_src, persistent=True, size=GIB)
    store.add_base(base_src, "os", backing_format="qcow2")
    base = store.base_path("os")

    t0 = time.perf_counter()
    for i in range(boxes):
        store.create_box(f"box{i:05d}", base="os")
    print(f"built a store of {boxes} boxes in {time.perf_counter() - t0:.1f} s "
          f"on {fs_type(root)}")

    rows: list[tuple[str, list[float], list[float], str, float]] = []
    peer = work / "peer"
    peer.mkdir()

    # create_box
    mine = timed(lambda i: store.create_box(f"new{i:05d}", base="os"), n)

    def peer_create(i: int) -> None:
        subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                        str(peer / f"live{i}.qcow2")], check=True)

    rows.append(("create_box", mine, timed(peer_create, n), "qemu-img create", 2.0))

    # snapshot
    mine = timed(lambda i: store.snapshot(f"new{i:05d}", "s1"), n)

    def peer_snapshot(i: int) -> None:
        live, snap = peer / f"live{i}.qcow2", peer / f"snap{i}.qcow2"
        os.rename(live, snap)
        subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-b", snap.name, "-F", "qcow2",
                        str(live)], check=True)

    rows.append(("snapshot", mine, timed(peer_snapshot, n), "rename + qemu-img create", 2.0))

    # clone_box
    mine = timed(lambda i: store.clone_box(f"new{i:05d}", f"clone{i:05d}"), n)

    def peer_clone(i: int) -> None:
        live, frozen = peer / f"live{i}.qcow2", peer / f"frozen{i}.qcow2"
        os.rename(live, frozen)
        for child in (live, peer / f"copy{i}.qcow2"):
            subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-b", frozen.name,
                            "-F", "qcow2", str(child)], check=True)

    rows.append(("clone_box", mine, timed(peer_clone, n), "rename + 2 qemu-img create", 2.0))

    # restore
    mine = timed(lambda i: store.restore(f"new{i:05d}", "s1"), n)

    def peer_restore(i: int) -> None:
        tmp = peer / f"tmp{i}.qcow2"
        subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-b", f"snap{i}.qcow2",
                        "-F", "qcow2", str(tmp)], check=True)
        os.rename(tmp, peer / f"live{i}.qcow2")

    rows.append(("restore", mine, timed(peer_restore, n), "qemu-img create + rename", 2.0))
    floor = fsync_floor(peer)

    # A store of `images` images: snapshots on every box until the count is reached.
    t0 = time.perf_counter()
    ids = store.list_boxes()
    count = len(store.graph())
    k = 0
    while count < images:
        store.snapshot(ids[k % len(ids)], f"g{k // len(ids)}")
        count += 1
        k += 1
    print(f"grew it to {count} images ({len(ids)} boxes) in {time.perf_counter() - t0:.1f} s")

    scans = []
    graph = DependencyGraph.scan([])
    for _ in range(3):
        t0 = time.perf_counter_ns()
        graph = DependencyGraph.scan(store._images())  # what the store's guard scans
        scans.append((time.perf_counter_ns() - t0) / 1e6)
    n_images = len(graph)
    sample = [store.box(b).disk for b in ids[: min(50, len(ids))]]
    per_chain = timed(lambda i: subprocess.run(
        [qemu_img, "info", "-U", "--backing-chain", "--output=json", str(sample[i])],
        check=True, stdout=subprocess.DEVNULL), len(sample))
    chains = len(ids)
    qemu_scan = [statistics.median(per_chain) * chains]

    # A removal-guard decision on that graph: a snapshot deep in a chain.
    target = store.root / "boxes" / ids[0] / "snapshots" / "g0" / "disk.qcow2"
    guard = timed(lambda i: (graph.can_remove(target), graph.dependents(target)), 200)
    tops = [store.box(b).disk for b in ids]
    seed_guard = timed(lambda i: [t for t in tops if is_backing_dependency(target, t)], 3)
    full_refusal = timed(lambda i: _refused(store, ids[0]), 3)

    print()
    print(f"store: {boxes} boxes, then {n_images} images; n={n} per operation "
          f"(python {sys.version.split()[0]}, {os.cpu_count()} cpus, shared machine)")
    header = (f"{'operation':<28}{'boxdisk med':>12}{'p90':>9}   {'peer':<26}{'peer med':>10}"
              f"{'ratio':>8}   target")
    print(header)
    print("-" * len(header))
    for name, mine_s, peer_s, peer_name, target_ms in rows:
        med = statistics.median(mine_s)
        pmed = statistics.median(peer_s)
        verdict = "meets" if med <= target_ms else "misses"
        print(f"{name:<28}{med:>9.3f} ms{percentile(mine_s, 90):>6.2f} ms   {peer_name:<26}"
              f"{pmed:>7.2f} ms{pmed / med:>7.1f}x   <= {target_ms:g} ms ({verdict})")
    med = statistics.median(scans)
    print(f"{f'scan of {n_images} images':<28}{med:>9.1f} ms{max(scans):>6.0f} ms   "
          f"{'qemu-img info, all chains*':<26}{qemu_scan[0]:>7.0f} ms"
          f"{qemu_scan[0] / med:>7.1f}x   < 1000 ms ({'meets' if med < 1000 else 'misses'})")
    med = statistics.median(guard)
    smed = statistics.median(seed_guard)
    print(f"{'guard decision (graph)':<28}{med:>9.3f} ms{percentile(guard, 90):>6.2f} ms   "
          f"{'seed: walk every chain':<26}{smed:>7.0f} ms{smed / med:>7.0f}x   "
          f"< 10 ms ({'meets' if med < 10 else 'misses'})")
    print(f"{'remove_snapshot refusal':<28}{statistics.median(full_refusal):>9.1f} ms"
          f"{'':>9}   (the store's own guard: a fresh scan under the store lock, then decide)")
    print(f"{'fsync floor (4 KiB + dir)':<28}{statistics.median(floor):>9.3f} ms"
          f"{percentile(floor, 90):>6.2f} ms   (one durable step on this file system)")
    print(f"* qemu-img info --backing-chain on {len(sample)} chains "
          f"(median {statistics.median(per_chain):.1f} ms each), times {chains} chains")
    store.close()
    return 0


def _refused(store: BoxStore, box_id: str) -> None:
    try:
        store.remove_snapshot(box_id, "g0")
    except Exception as exc:  # the expected refusal: the chain above depends on g0
        if type(exc).__name__ != "SnapshotInUseError":
            raise
    else:
        msg = "the snapshot was removed, though a chain depends on it"
        raise AssertionError(msg)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=200, help="operations timed per kind")
    parser.add_argument("--boxes", type=int, default=1000)
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--dir", type=Path, default=None, help="where to build the store")
    args = parser.parse_args()
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        print("qemu-img is needed for the peer column (apt-get install qemu-utils)")
        return 1
    work = Path(tempfile.mkdtemp(prefix="boxdisk-store-bench-", dir=args.dir))
    try:
        return run(qemu_img, work, args.n, args.boxes, args.images)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
