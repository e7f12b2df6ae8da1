"""Benchmark: boxdisk's flatten and chain reads against QEMU and cp, on the same files.

(a) a 3-layer chain, 1 GiB virtual, about half written with random data:
    boxdisk.flatten vs ``qemu-img convert -O qcow2`` vs ``cp`` (+ ``sync``) of a
    raw file holding the same number of data bytes;
(b) a 1 TiB virtual chain with 16 MiB written: flatten time and peak RSS
    (in a fresh process, so RSS is boxdisk's alone);
(c) 4 KiB random reads through a 4-layer chain.

Run: ``python3 benchmarks/flatten.py [--dir DIR] [--quick]``. Needs qemu-img.
Every output is also checked with ``qemu-img compare`` so a fast wrong answer
cannot win.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from boxdisk.chain import BackingChain
from boxdisk.ops import flatten

MIB = 1024 * 1024
GIB = 1024 * MIB


def run(*argv: str | Path) -> None:
    subprocess.run([str(a) for a in argv], check=True, capture_output=True)


def best_of(n: int, fn, fresh: Path | None = None) -> float:
    """Best wall time of ``n`` runs; ``fresh`` is removed (untimed) before each run."""
    times = []
    for _ in range(n):
        if fresh is not None and fresh.exists():
            fresh.unlink()
        subprocess.run(["sync"], check=True)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def make_layer(path: Path, below: Path | None, size: int, chunks: list[int], chunk: int,
               rng: random.Random) -> None:
    """A qcow2 layer holding random data at ``chunks`` (indices of ``chunk``-sized blocks)."""
    raw = path.with_suffix(".src.raw")
    with open(raw, "wb") as f:
        f.truncate(size)
        for c in chunks:
            f.seek(c * chunk)
            f.write(rng.randbytes(chunk))
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path)
    raw.unlink()
    if below is not None:
        run("qemu-img", "rebase", "-u", "-b", below.name, "-F", "qcow2", path)


def build_chain(d: Path, name: str, size: int, layers: list[int], chunk: int,
                seed: int) -> tuple[Path, int]:
    """Layers writing ``layers[i]`` random chunks each; returns (top, union data bytes)."""
    rng = random.Random(seed)
    n = size // chunk
    below: Path | None = None
    union: set[int] = set()
    for i, count in enumerate(layers):
        chunks = rng.sample(range(n), count)
        union.update(chunks)
        path = d / f"{name}{i}.qcow2"
        make_layer(path, below, size, sorted(chunks), chunk, rng)
        below = path
    assert below is not None
    return below, len(union) * chunk


def compare(a: Path, b: Path) -> None:
    subprocess.run(["qemu-img", "compare", "-q", a, b], check=True)


def bench_a(d: Path, quick: bool) -> None:
    size = 256 * MIB if quick else GIB
    chunk = MIB
    n = size // chunk
    top, data = build_chain(d, "a", size, [n // 4, n * 3 // 16, n // 8], chunk, seed=1)
    raw = d / "same-data.raw"
    with open(raw, "wb") as f:
        rng = random.Random(2)
        for _ in range(data // chunk):
            f.write(rng.randbytes(chunk))
    out_b, out_q, out_c = d / "flat-boxdisk.qcow2", d / "flat-qemu.qcow2", d / "copy.raw"

    out_qs = d / "flat-qemu-sync.qcow2"

    def boxdisk() -> None:
        flatten(top, out_b)

    def qemu() -> None:
        run("qemu-img", "convert", "-O", "qcow2", top, out_q)

    def qemu_sync() -> None:
        run("qemu-img", "convert", "-O", "qcow2", top, out_qs)
        run("sync", out_qs)

    def cp() -> None:
        run("cp", raw, out_c)
        run("sync", out_c)

    pairs = ((boxdisk, out_b), (qemu, out_q), (qemu_sync, out_qs), (cp, out_c))
    for fn, out in pairs:  # warm the page cache and the code paths
        best_of(1, fn, out)
    t_b, t_q, t_qs, t_c = (best_of(5, fn, out) for fn, out in pairs)
    compare(top, out_b)
    print(f"(a) 3-layer chain, {size // MIB} MiB virtual, {data // MIB} MiB of random data")
    print(f"    {'boxdisk flatten (fsynced)':<28}{t_b * 1000:9.0f} ms")
    print(f"    {'qemu-img convert -O qcow2':<28}{t_q * 1000:9.0f} ms   (no fsync)")
    print(f"    {'qemu-img convert + sync':<28}{t_qs * 1000:9.0f} ms")
    print(f"    {'cp + sync (same data bytes)':<28}{t_c * 1000:9.0f} ms")
    print(f"    flatten / qemu-img = {t_b / t_q:.2f}x   (target <= 1.0x; flatten fsyncs, "
          f"qemu-img convert does not)")
    print(f"    flatten / (qemu-img + sync) = {t_b / t_qs:.2f}x")
    print(f"    flatten / cp       = {t_b / t_c:.2f}x   (target <= 1.25x)")


CHILD = """
import resource, sys, time
sys.path.insert(0, {root!r})
from boxdisk.ops import flatten
t0 = time.perf_counter()
flatten({src!r}, {dst!r}, overwrite=True)
t = time.perf_counter() - t0
print(t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def bench_b(d: Path, quick: bool) -> None:
    size = 1 << 40
    chunk = MIB
    rng = random.Random(3)
    base = d / "b0.qcow2"
    run("qemu-img", "create", "-f", "qcow2", base, str(size))
    below = base
    for i in (1, 2):
        layer = d / f"b{i}.qcow2"
        run("qemu-img", "create", "-f", "qcow2", "-b", below.name, "-F", "qcow2", layer,
            str(size))
        below = layer
    cmds = []
    for layer_i, layer in enumerate((base, d / "b1.qcow2", d / "b2.qcow2")):
        cmds = []
        for _ in range(16 // 3 + (layer_i == 0)):
            off = rng.randrange(size // chunk) * chunk
            cmds += ["-c", f"write -P {rng.randrange(1, 255)} {off} {chunk}"]
        run("qemu-io", "-f", "qcow2", *cmds, layer)
    top, dst = below, d / "flat-tib.qcow2"
    root = str(Path(__file__).resolve().parent.parent)
    results = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", CHILD.format(root=root, src=str(top),
                                                                 dst=str(dst))],
                             check=True, capture_output=True, text=True).stdout.split()
        results.append((float(out[-2]), int(out[-1])))
    compare(top, dst)
    t, rss = min(results)
    print("(b) 3-layer chain, 1 TiB virtual, 16 MiB written")
    print(f"    flatten {t * 1000:.0f} ms (target < 500 ms), "
          f"peak RSS of the whole process {rss / 1024:.0f} MiB (target < 100 MiB)")


def bench_c(d: Path, quick: bool) -> None:
    size = 256 * MIB if quick else GIB
    chunk = 64 * 1024
    n = size // chunk
    top, _ = build_chain(d, "c", size, [n // 4, n // 8, n // 8, n // 16], chunk, seed=4)
    rng = random.Random(5)
    count = 50_000
    offsets = [rng.randrange(size // 4096) * 4096 for _ in range(count)]
    with BackingChain.open(top) as chain:
        for off in offsets[:2000]:
            chain.read(off, 4096)
        t0 = time.perf_counter()
        for off in offsets:
            chain.read(off, 4096)
        t = time.perf_counter() - t0
    print(f"(c) 4 KiB random reads through a 4-layer chain ({size // MIB} MiB virtual)")
    print(f"    {count / t:,.0f} reads/s (target >= 20,000)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", help="work directory (default: a temporary one)")
    ap.add_argument("--quick", action="store_true", help="smaller images for a smoke run")
    ap.add_argument("--only", choices=["a", "b", "c"], action="append")
    args = ap.parse_args()
    if shutil.which("qemu-img") is None:
        sys.exit("qemu-img is needed for this benchmark")
    import logging  # noqa: PLC0415

    import structlog  # noqa: PLC0415 - quiet the per-call events for the benchmark

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="boxdisk-bench-") as tmp:
        d = Path(tmp)
        for name, fn in (("a", bench_a), ("b", bench_b), ("c", bench_c)):
            if args.only and name not in args.only:
                continue
            sub = d / name
            sub.mkdir()
            fn(sub, args.quick)
            shutil.rmtree(sub)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
