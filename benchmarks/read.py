"""Reads through a backing chain: boxdisk against libqcow-python (C), in one process.

A 4-layer qcow2 chain (64 KiB clusters, 1 GiB virtual, about 500 MiB
allocated, spread over the layers: each layer writes runs of 1-16 clusters at
random offsets) is built with qemu-img and qemu-io and read once to warm the
page cache. Then, on the same files and in the same process:

(a) sequential 4 MiB ``BackingChain.read()`` over the whole disk, against
    libqcow's ``read_buffer_at_offset`` (which also returns ``bytes``);
(b) sequential 4 MiB ``BackingChain.read_into()`` into one reused buffer;
(c) random 4 KiB ``BackingChain.read()`` (aligned, the same offsets for both).

Targets: (a) >= 1.0x libqcow, (b) >= 2x libqcow's sequential reads,
(c) >= 1.0x libqcow. Each figure is the best of ``--runs`` runs; the spread
(worst / best) is printed beside it, since the machine may be shared. Both
readers' bytes are compared with each other and with ``qemu-img convert``'s
on a sample of the requests first, so a fast wrong answer cannot win.

libqcow-python is installed only for this benchmark (``.venv/bin/pip install
libqcow-python``), never a dependency of boxdisk; without it boxdisk is timed
alone.

    python benchmarks/read.py [--dir DIR] [--runs N] [--random N] [--quick]
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import GIB, MIB, run, table

from boxdisk.chain import BackingChain, open_chain

CLUSTER = 64 * 1024
CHUNK = 4 * MIB
LAYERS = 4


def build(d: Path, size: int, per_layer: int, seed: int) -> list[Path]:
    """The chain, bottom first: each layer writes about ``per_layer`` bytes of runs."""
    rng = random.Random(seed)
    paths: list[Path] = []
    for depth in range(LAYERS):
        path = d / f"layer{depth}.qcow2"
        args: list[str | Path] = ["qemu-img", "create", "-q", "-f", "qcow2",
                                  "-o", f"cluster_size={CLUSTER}"]
        if paths:
            args += ["-b", paths[-1].name, "-F", "qcow2"]
        run(*args, path, str(size))
        script, written = [], 0
        while written < per_layer:
            n = rng.randint(1, 16) * CLUSTER
            off = rng.randrange(0, (size - n) // CLUSTER + 1) * CLUSTER
            script.append(f"write -P {rng.randrange(1, 256)} {off} {n}")
            written += n
        run("qemu-io", "-f", "qcow2", path, stdin="\n".join(script) + "\n")
        paths.append(path)
    return paths


def allocated(paths: list[Path]) -> int:
    """Data bytes the chain's images hold (their files' allocated blocks, metadata included)."""
    return sum(os.stat(p).st_blocks * 512 for p in paths)


def warm(paths: list[Path]) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(16 * MIB):
                pass


def open_libqcow(paths: list[Path]) -> list[Any] | None:
    """The chain opened with libqcow (top first, each layer's parent set), or None."""
    try:
        import pyqcow  # type: ignore[import-not-found]  # noqa: PLC0415 - optional peer
    except ImportError:
        return None
    files = []
    for p in paths:  # bottom first: a parent must be open before its child names it
        f = pyqcow.file()
        f.open(str(p))
        if files:
            f.set_parent(files[-1])
        files.append(f)
    return files[::-1]


def timed(runs: int, fn: Callable[[], object]) -> tuple[float, float]:
    """(best, worst) wall time of ``runs`` runs of ``fn``."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), max(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", help="work directory (default: a temporary one)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--random", type=int, default=50_000, help="random 4 KiB reads per run")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--quick", action="store_true", help="256 MiB disk, 2 runs")
    args = parser.parse_args()
    size = 256 * MIB if args.quick else GIB
    runs = 2 if args.quick else args.runs
    d = Path(tempfile.mkdtemp(prefix="boxdisk-bench-read-", dir=args.dir))
    try:
        paths = build(d, size, size // 2 // LAYERS, args.seed)
        top = paths[-1]
        warm(paths)
        print(f"boxdisk read benchmark in {d}: {LAYERS}-layer chain, {size // MIB} MiB virtual, "
              f"{allocated(paths) / MIB:.0f} MiB allocated, page cache warm; "
              f"best of {runs} (spread = worst / best)\n")
        chain = open_chain(top)
        lib = open_libqcow(paths)
        if lib is None:
            print("libqcow-python is not installed (.venv/bin/pip install libqcow-python): "
                  "timing boxdisk alone\n")
        try:
            return measure(chain, lib, d, top, size, runs, args)
        finally:
            chain.close()
            for f in lib or ():
                f.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def measure(chain: BackingChain, lib: list[Any] | None, d: Path, top: Path, size: int,
            runs: int, args: argparse.Namespace) -> int:
    rng = random.Random(args.seed + 1)
    offsets = [rng.randrange(size // 4096) * 4096 for _ in range(args.random)]
    lib_read = None if lib is None else lib[0].read_buffer_at_offset

    # Correctness first: a sample of both request shapes against QEMU's bytes.
    raw = d / "qemu.raw"
    run("qemu-img", "convert", "-U", "-O", "raw", top, raw)
    with open(raw, "rb") as f:
        fd = f.fileno()
        for off in [*range(0, size, 37 * CHUNK), *offsets[:2000]]:
            n = CHUNK if off % CHUNK == 0 and off + CHUNK <= size else 4096
            want = os.pread(fd, n, off)
            assert chain.read(off, n) == want, ("boxdisk", off, n)
            if lib_read is not None:
                assert lib_read(n, off) == want, ("libqcow", off, n)
    raw.unlink()

    read, read_into = chain.read, chain.read_into
    buf = bytearray(CHUNK)
    # An application that streams a disk may read into one page-aligned mmap
    # buffer: transparent huge pages back it, and the kernel's copy out of the
    # page cache into a bytearray they do not back was up to twice as slow here.
    # Whether they back the bytearray varies from run to run, so both are timed.
    mbuf = mmap.mmap(-1, CHUNK)
    seq = range(0, size, CHUNK)

    def box_seq() -> None:
        for off in seq:
            read(off, CHUNK)

    def box_seq_into() -> None:
        for off in seq:
            read_into(off, buf)

    def box_seq_into_mmap() -> None:
        for off in seq:
            read_into(off, mbuf)

    def box_random() -> None:
        for off in offsets:
            read(off, 4096)

    def lib_seq() -> None:
        assert lib_read is not None
        for off in seq:
            lib_read(CHUNK, off)

    def lib_random() -> None:
        assert lib_read is not None
        for off in offsets:
            lib_read(4096, off)

    def gibs(t: tuple[float, float]) -> str:
        return f"{size / GIB / t[0]:,.2f} GiB/s"

    def per_s(t: tuple[float, float]) -> str:
        return f"{len(offsets) / t[0]:,.0f} /s"

    def spread(t: tuple[float, float]) -> str:
        return f"best {t[0] * 1000:,.0f} ms, spread {t[1] / t[0]:.2f}x"

    # Interleaved, so a burst of load on a shared machine hits both readers alike.
    results: dict[str, list[float]] = {}
    plan: list[tuple[str, Callable[[], None]]] = [
        ("box_seq", box_seq), ("box_into", box_seq_into),
        ("box_into_mmap", box_seq_into_mmap), ("box_rand", box_random)]
    if lib_read is not None:
        plan += [("lib_seq", lib_seq), ("lib_rand", lib_random)]
    for _ in range(runs):
        for name, fn in plan:
            t = timed(1, fn)[0]
            results.setdefault(name, []).append(t)
    r = {k: (min(v), max(v)) for k, v in results.items()}

    seq_rows = [("boxdisk read()", gibs(r["box_seq"]), spread(r["box_seq"])),
                ("boxdisk read_into(bytearray)", gibs(r["box_into"]), spread(r["box_into"])),
                ("boxdisk read_into(mmap)", gibs(r["box_into_mmap"]),
                 spread(r["box_into_mmap"]))]
    rand_rows = [("boxdisk read()", per_s(r["box_rand"]), spread(r["box_rand"]))]
    if lib_read is not None:
        ls, lr = r["lib_seq"], r["lib_rand"]
        seq_rows += [
            ("libqcow read_buffer_at_offset", gibs(ls), spread(ls)),
            ("read() / libqcow", f"{ls[0] / r['box_seq'][0]:.2f}x", "target >= 1.0x"),
            ("read_into(bytearray) / libqcow", f"{ls[0] / r['box_into'][0]:.2f}x", ""),
            ("read_into(mmap) / libqcow", f"{ls[0] / r['box_into_mmap'][0]:.2f}x",
             "target >= 2.0x"),
        ]
        rand_rows += [
            ("libqcow read_buffer_at_offset", per_s(lr), spread(lr)),
            ("read() / libqcow", f"{lr[0] / r['box_rand'][0]:.2f}x", "target >= 1.0x"),
        ]
    table(f"(a, b) sequential {CHUNK // MIB} MiB reads over {size // MIB} MiB", seq_rows)
    table(f"(c) {len(offsets):,} random 4 KiB reads", rand_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
