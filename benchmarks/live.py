"""A live snapshot of a running box: boxdisk against QEMU's own, against the same QEMU.

One paused ``qemu-system-x86_64`` (no guest kernel needed) runs two disks
through guest devices, each with its own chain. On the first, boxdisk takes
snapshots the way the store does (the overlay created natively and made
durable, then opened and switched onto in one ``transaction``:
``blockdev-snapshot-sync`` of the existing file); on the second, QEMU
takes them itself (``blockdev-snapshot-sync``: QEMU creates the overlay).
Both are timed over the same QMP socket in one run, alternating, and each is
followed by a guest write so every layer holds data. Then the store's whole
operation (``BoxStore.snapshot`` of an attached box: journal, two barriers,
the same switch) is timed on a box of a store, and the interval the guest's
I/O is held (the ``transaction``; with a guest agent the freeze as well) is
reported as a median and p99.

Target (issue 14): boxdisk's live snapshot <= 1.0x QEMU's own time.

    python benchmarks/live.py [-n 100] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from boxdisk import create_cow_child_disk, create_disk
from boxdisk.live import Qmp, switch_to_existing
from boxdisk.store import BoxStore

MIB = 1 << 20


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def start_qemu(work: Path, drives: dict[str, Path]) -> subprocess.Popen[bytes]:
    """QEMU with the drives on guest devices and two QMP sockets (one client each):
    ``bench.qmp`` for this script, ``store.qmp`` for the store, as a launcher would give."""
    cmd = ["qemu-system-x86_64", "-machine", "q35", "-nodefaults", "-display", "none", "-S"]
    for sock in ("bench.qmp", "store.qmp"):
        cmd += ["-qmp", f"unix:{work / sock},server=on,wait=off"]
    for name, image in drives.items():
        cmd += ["-blockdev", json.dumps({"driver": "qcow2", "node-name": name, "file": {
            "driver": "file", "filename": os.fspath(image)}}),
                "-device", f"virtio-blk-pci,drive={name},id={name}"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not all((work / s).exists() for s in ("bench.qmp", "store.qmp")):
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit("qemu-system-x86_64 did not start")
        time.sleep(0.01)
    return proc


def guest_write(q: Qmp, drive: str, i: int) -> None:
    q.execute("human-monitor-command", {"command-line": (
        f'qemu-io -d /machine/peripheral/{drive}/virtio-backend '
        f'"write -P {i % 250 + 1} {(i % 64) * 65536} 64k"')})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=100, help="snapshots timed per kind")
    parser.add_argument("--dir", default="/var/tmp", help="where to put the images")
    args = parser.parse_args()
    if shutil.which("qemu-system-x86_64") is None:
        sys.exit("qemu-system-x86_64 is needed (Debian: qemu-system-x86)")
    work = Path(tempfile.mkdtemp(prefix="boxdisk-live-", dir=args.dir))
    try:
        return run(work, args.n)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(work: Path, n: int) -> int:
    base = work / "base.qcow2"
    with create_disk(base, True, size=64 * MIB):
        pass
    mine_dir, peer_dir = work / "mine", work / "peer"
    mine_dir.mkdir()
    peer_dir.mkdir()
    for d in (mine_dir, peer_dir):
        with create_cow_child_disk(base, "qcow2", d / "top.0.qcow2", persistent=True,
                                   relative=True):
            pass
    # The store's box, served by the same QEMU.
    store = BoxStore(work / "store")
    store.add_base(base, "os", backing_format="qcow2")
    box = store.create_box("vm1", base="os")
    proc = start_qemu(work, {"mine": mine_dir / "top.0.qcow2", "peer": peer_dir / "top.0.qcow2",
                             "box": box.disk})
    try:
        with Qmp(work / "bench.qmp") as q:
            mine_t, peer_t, held = [], [], []
            mine_top, peer_node = "mine", "peer"
            for i in range(1, n + 1):
                # boxdisk: native overlay (fsynced with its directory), blockdev-add + snapshot.
                t0 = time.perf_counter()
                path = mine_dir / f"top.{i}.qcow2"
                with create_cow_child_disk(mine_dir / f"top.{i - 1}.qcow2", "qcow2", path,
                                           persistent=True, relative=True):
                    pass
                s0 = time.perf_counter()
                switch_to_existing(q, [(mine_top, f"mine{i}", path)])  # QEMU opens ours
                t1 = time.perf_counter()
                mine_t.append(t1 - t0)
                held.append(t1 - s0)
                mine_top = f"mine{i}"
                # QEMU: blockdev-snapshot-sync creates the overlay itself.
                t0 = time.perf_counter()
                q.execute("blockdev-snapshot-sync", {
                    "node-name": peer_node, "snapshot-file": os.fspath(
                        peer_dir / f"top.{i}.qcow2"),
                    "snapshot-node-name": f"peer{i}", "format": "qcow2"})
                peer_t.append(time.perf_counter() - t0)
                peer_node = f"peer{i}"
                guest_write(q, "mine", i)
                guest_write(q, "peer", i)
            store_times, store_held = store_snapshots(store, work, q, n)
    finally:
        proc.kill()
        proc.wait()
        store.close()
    med_m, med_p = statistics.median(mine_t) * 1000, statistics.median(peer_t) * 1000
    print(f"live snapshot of a running QEMU, n={n} each, python {sys.version.split()[0]}, "
          f"{os.cpu_count()} cpus, images in {work.parent}")
    print(f"{'':34}{'median':>10}{'p90':>10}{'p99':>10}")
    for label, values in (("boxdisk (native + blockdev-snapshot)", mine_t),
                          ("QEMU blockdev-snapshot-sync", peer_t),
                          ("BoxStore.snapshot (attached box)", store_times)):
        if values:
            print(f"{label:34}{statistics.median(values) * 1000:>8.3f}ms"
                  f"{percentile(values, 90) * 1000:>8.3f}ms{percentile(values, 99) * 1000:>8.3f}ms")
    print(f"ratio boxdisk / QEMU: {med_m / med_p:.2f}x   (target <= 1.0x)")
    for label, values in (("guest I/O held, the switch", held),
                          ("guest I/O held, BoxStore.snapshot", store_held)):
        if values:
            print(f"{label:34}{statistics.median(values) * 1000:>8.3f}ms (median)"
                  f"{percentile(values, 99) * 1000:>8.3f}ms (p99)")
    return 0


def store_snapshots(store: BoxStore, work: Path, q: Qmp,
                    n: int) -> tuple[list[float], list[float]]:
    """Time BoxStore.snapshot on the attached box (a guest write after each); the held
    interval is what the store logs (``snapshot_taken``'s ``held_ms``)."""
    held: list[float] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            kv = getattr(record, "kv", {})
            if getattr(record, "event", None) == "snapshot_taken" and "held_ms" in kv:
                held.append(float(kv["held_ms"]) / 1000)

    logger = logging.getLogger("boxdisk.store")
    handler = Grab()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    times: list[float] = []
    store.attach("vm1", work / "store.qmp")
    for i in range(n):
        t0 = time.perf_counter()
        store.snapshot("vm1", f"s{i}")
        times.append(time.perf_counter() - t0)
        guest_write(q, "box", i)
    logger.removeHandler(handler)
    return times, held


if __name__ == "__main__":
    sys.exit(main())
