"""Writes through a writable chain: boxdisk against a plain file and qemu-io, one run.

(a) 1 GiB sequential write (1 MiB requests of random bytes) into a fresh 1 GiB
    qcow2 (64 KiB clusters) through ``open_chain(..., writable=True)``, then
    ``flush()``; against writing the same bytes in the same requests to a plain
    file, then ``fsync``; and against ``qemu-io`` writing the same 1 GiB (one
    ``write`` command per MiB, then ``flush``). Target: boxdisk >= 70 % of the
    plain file's throughput. Reported both durable (with the final fsync /
    flush) and page-cache only (the write loop alone, no fsync anywhere).
(b) 4 KiB random writes (aligned, 20,000 of them, over a 1 GiB fresh qcow2),
    then one flush: boxdisk against qemu-io running the same commands from a
    script on stdin. Target: >= 10,000 writes/s.
(c) the same random writes into a child of a 1 GiB base full of data: every
    write copies the rest of its 64 KiB cluster up from the base.

Every result is checked: ``qemu-img check`` clean, and ``qemu-img compare``
between boxdisk's image and QEMU's (so a fast wrong answer cannot win). Times
are the best of several runs, each on a fresh image after ``sync``; the
machine may be shared, so single runs are noisy.

    python benchmarks/write.py [--dir DIR] [--runs N] [--only a|b|c] [--quick]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import GIB, MIB, best_of, run, table

from boxdisk.chain import open_chain


def fresh_qcow2(path: Path, size: int, backing: Path | None = None) -> None:
    if path.exists():
        path.unlink()
    args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"]
    if backing is not None:
        args += ["-b", backing.name, "-F", "qcow2"]
    run(*args, path, str(size))


def check_same(a: Path, b: Path) -> None:
    for p in (a, b):
        out = subprocess.run(["qemu-img", "check", str(p)], check=False,
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(a), str(b)],
                         check=False, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def sequential(d: Path, runs: int, total: int) -> None:
    chunk = MIB
    tile = os.urandom(min(total, 64 * MIB))
    data = tile * (total // len(tile))
    view = memoryview(data)
    img, plain, qimg = d / "seq.qcow2", d / "seq.plain", d / "seq-qemu.qcow2"

    def boxdisk_write(flush: bool) -> Callable[[], None]:
        def go() -> None:
            chain = open_chain(img, writable=True)
            for off in range(0, total, chunk):
                chain.write(off, view[off : off + chunk])
            if flush:
                chain.close()  # flushes: metadata in crash-safe order, fsyncs
            else:
                results["loop"] = time.perf_counter()
                chain.close()
        return go

    def plain_write(flush: bool) -> Callable[[], None]:
        def go() -> None:
            fd = os.open(plain, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                for off in range(0, total, chunk):
                    os.write(fd, view[off : off + chunk])
                if flush:
                    os.fsync(fd)
            finally:
                os.close(fd)
        return go

    def qemu_write() -> None:
        script = "".join(f"write -P {(off // chunk) % 255 + 1} {off} {chunk}\n"
                         for off in range(0, total, chunk))
        run("qemu-io", "-f", "qcow2", "-t", "writeback", qimg, stdin=script + "flush\n")

    results: dict[str, float] = {}

    def loop_only(go: Callable[[], None]) -> float:
        best = float("inf")
        for _ in range(runs):
            fresh_qcow2(img, total)
            subprocess.run(["sync"], check=True)
            t0 = time.perf_counter()
            go()
            best = min(best, results["loop"] - t0)
        return best

    t_box = best_of(runs, boxdisk_write(True), before=lambda: fresh_qcow2(img, total), sync=True)
    no_plain = lambda: plain.unlink(missing_ok=True)  # noqa: E731
    t_plain = best_of(runs, plain_write(True), before=no_plain, sync=True)
    t_qemu = best_of(runs, qemu_write, before=lambda: fresh_qcow2(qimg, total), sync=True)
    t_box_nf = loop_only(boxdisk_write(False))
    t_plain_nf = best_of(runs, plain_write(False), before=no_plain, sync=True)
    # Correctness: boxdisk's image holds exactly the bytes written.
    raw = d / "seq.check.raw"
    run("qemu-img", "convert", "-O", "raw", img, raw)
    assert raw.read_bytes() == data
    raw.unlink()
    out = subprocess.run(["qemu-img", "check", str(img)], check=False,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout

    def mbs(t: float) -> str:
        return f"{total / MIB / t:,.0f} MiB/s"

    table(f"(a) sequential write, {total // MIB} MiB in 1 MiB requests, fresh 64 KiB-cluster "
          "qcow2", [
              ("boxdisk + flush", mbs(t_box), f"{t_box:.2f} s"),
              ("plain file + fsync", mbs(t_plain), f"{t_plain:.2f} s"),
              ("qemu-io + flush", mbs(t_qemu), f"{t_qemu:.2f} s (pattern data, 1 process)"),
              ("boxdisk / plain", f"{t_plain / t_box * 100:.0f} %",
               "of plain-file throughput (target >= 70 %)"),
              ("boxdisk / qemu-io", f"{t_qemu / t_box * 100:.0f} %", "of qemu-io throughput"),
              ("boxdisk, loop only", mbs(t_box_nf), "page cache, metadata not yet written"),
              ("plain, loop only", mbs(t_plain_nf), "page cache, no fsync"),
              ("ratio, loop only", f"{t_plain_nf / t_box_nf * 100:.0f} %",
               "of plain-file throughput"),
          ])
    for p in (plain, qimg):
        p.unlink(missing_ok=True)


def random_writes(d: Path, runs: int, count: int, *, backed: bool) -> None:
    size = GIB
    rng = random.Random(2)
    offsets = [rng.randrange(size // 4096) * 4096 for _ in range(count)]
    patterns = [rng.randrange(1, 256) for _ in range(count)]
    blocks = [bytes([v]) * 4096 for v in range(256)]
    base = d / "rbase.qcow2"
    if backed:
        fresh_qcow2(base, size)
        run("qemu-io", "-f", "qcow2", base, stdin="write -P 0x5c 0 1G\nflush\n")
    img, qimg = d / "rand.qcow2", d / "rand-qemu.qcow2"
    backing = base if backed else None

    def boxdisk_writes() -> None:
        with open_chain(img, writable=True) as chain:
            write = chain.write
            for off, v in zip(offsets, patterns, strict=True):
                write(off, blocks[v])
            chain.flush()

    script = "".join(f"write -P {v} {off} 4k\n" for off, v in zip(offsets, patterns,
                                                                   strict=True))

    def qemu_writes() -> None:
        run("qemu-io", "-f", "qcow2", "-t", "writeback", qimg, stdin=script + "flush\n")

    t_box = best_of(runs, boxdisk_writes, before=lambda: fresh_qcow2(img, size, backing), sync=True)
    t_qemu = best_of(runs, qemu_writes, before=lambda: fresh_qcow2(qimg, size, backing), sync=True)
    check_same(img, qimg)
    what = "child of a full 1 GiB base (copy-up)" if backed else "fresh 1 GiB qcow2"
    table(f"({'c' if backed else 'b'}) {count:,} random 4 KiB writes + one flush, {what}", [
        ("boxdisk", f"{count / t_box:,.0f} /s", f"{t_box:.2f} s"
         + ("" if backed else "   (target >= 10,000/s)")),
        ("qemu-io (stdin script)", f"{count / t_qemu:,.0f} /s", f"{t_qemu:.2f} s"),
        ("boxdisk / qemu-io", f"{t_qemu / t_box:.2f}x", "throughput ratio"),
    ])
    for p in (img, qimg, base):
        p.unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", help="work directory (default: a temporary one)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", choices=["a", "b", "c"])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, one run")
    args = parser.parse_args()
    runs = 1 if args.quick else args.runs
    d = Path(tempfile.mkdtemp(prefix="boxdisk-bench-write-", dir=args.dir))
    try:
        print(f"boxdisk write benchmark in {d} (best of {runs}; the machine may be shared)\n")
        if args.only in (None, "a"):
            sequential(d, runs, 256 * MIB if args.quick else GIB)
        if args.only in (None, "b"):
            random_writes(d, runs, 2000 if args.quick else 20000, backed=False)
        if args.only in (None, "c"):
            random_writes(d, runs, 2000 if args.quick else 20000, backed=True)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
