"""Flatten and chain reads: boxdisk against qemu-img, qemu-io and cp, on the same files.

(a) a 3-layer chain, 1 GiB virtual, about half of it written with random data
    spread across the layers: ``boxdisk.flatten`` (always durable: fsync,
    rename, directory fsync) against ``qemu-img convert -O qcow2`` (which does
    not fsync: its default cache mode for the output is ``unsafe``), against
    qemu-img's own durable mode (``-t writeback``: it flushes the output when
    done), against the same followed by ``sync FILE``, and against ``cp`` + ``sync FILE`` of a
    raw file holding the same number of data bytes. Targets: <= 1.0x qemu-img,
    <= 1.25x cp.
(b) a 1 TiB virtual 3-layer chain with 16 MiB written: flatten time and the
    peak RSS of a fresh process doing only that, beside ``qemu-img convert``.
    Targets: < 0.5 s, < 100 MiB.
(c) 4 KiB random reads through a 4-layer chain, in one process: boxdisk's
    ``BackingChain.read`` against ``qemu-io`` reading the same offsets from one
    script on stdin. Target: >= 20,000 reads/s.

Every output is checked with ``qemu-img compare``, so a fast wrong answer
cannot win. Times are the best of several runs (each after ``sync``); the
machine may be shared, so single runs are noisy.

    python benchmarks/flatten.py [--dir DIR] [--quick] [--only a|b|c] [--runs N]
"""

from __future__ import annotations

import argparse
import itertools
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

from boxdisk.chain import BackingChain
from boxdisk.ops import flatten

ROOT = str(Path(__file__).resolve().parent.parent)


def _remover(path: Path) -> Callable[[], None]:
    """Removes ``path`` (untimed, before a run that writes it afresh)."""
    return lambda: path.unlink(missing_ok=True)


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


def bench_a(d: Path, quick: bool, runs: int) -> None:
    size = 256 * MIB if quick else GIB
    chunk = MIB
    n = size // chunk
    top, data = build_chain(d, "a", size, [n // 4, n * 3 // 16, n // 8], chunk, seed=1)
    raw = d / "same-data.raw"
    with open(raw, "wb") as f:
        rng = random.Random(2)
        for _ in range(data // chunk):
            f.write(rng.randbytes(chunk))
    out_b, out_q, out_qw, out_qs, out_c = (
        d / "flat-boxdisk.qcow2", d / "flat-qemu.qcow2", d / "flat-qemu-wb.qcow2",
        d / "flat-qemu-sync.qcow2", d / "copy.raw")

    def boxdisk() -> None:
        flatten(top, out_b)

    def qemu() -> None:
        run("qemu-img", "convert", "-O", "qcow2", top, out_q)

    def qemu_writeback() -> None:
        run("qemu-img", "convert", "-t", "writeback", "-O", "qcow2", top, out_qw)

    def qemu_sync() -> None:
        run("qemu-img", "convert", "-O", "qcow2", top, out_qs)
        run("sync", out_qs)

    def cp() -> None:
        run("cp", raw, out_c)
        run("sync", out_c)

    pairs = ((boxdisk, out_b), (qemu, out_q), (qemu_writeback, out_qw), (qemu_sync, out_qs),
             (cp, out_c))
    for fn, out in pairs:  # warm the page cache and the code paths
        best_of(1, fn, before=_remover(out), sync=True)
    # Interleave the tools so a burst of load from elsewhere hits them alike.
    best = [float("inf")] * len(pairs)
    for _ in range(runs):
        for i, (fn, out) in enumerate(pairs):
            best[i] = min(best[i], best_of(1, fn, before=_remover(out), sync=True))
    t_b, t_q, t_qw, t_qs, t_c = best
    compare(top, out_b)
    compare(top, out_q)
    compare(top, out_qw)
    table(f"(a) 3-layer chain, {size // MIB} MiB virtual, {data // MIB} MiB of random data "
          f"(best of {runs})", [
              ("boxdisk flatten (durable)", f"{t_b * 1000:.0f} ms", ""),
              ("qemu-img convert -O qcow2", f"{t_q * 1000:.0f} ms", "not durable (no fsync)"),
              ("qemu-img convert -t writeback", f"{t_qw * 1000:.0f} ms",
               "durable (qemu-img flushes)"),
              ("qemu-img convert + sync", f"{t_qs * 1000:.0f} ms", "durable"),
              ("cp + sync (same data bytes)", f"{t_c * 1000:.0f} ms", "durable"),
              ("flatten / qemu-img", f"{t_b / t_q:.2f}x", "target <= 1.0x"),
              ("flatten / qemu-img -t writeback", f"{t_b / t_qw:.2f}x", "like for like"),
              ("flatten / (qemu-img + sync)", f"{t_b / t_qs:.2f}x", "like for like"),
              ("flatten / cp", f"{t_b / t_c:.2f}x", "target <= 1.25x"),
          ], value_width=14)


CHILD = """
import resource, sys, time
sys.path.insert(0, {root!r})
from boxdisk.ops import flatten
t0 = time.perf_counter()
flatten({src!r}, {dst!r}, overwrite=True)
t = time.perf_counter() - t0
print(t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def bench_b(d: Path, quick: bool, runs: int) -> None:
    del quick
    size = 1 << 40
    chunk = MIB
    rng = random.Random(3)
    layers = [d / f"b{i}.qcow2" for i in range(3)]
    run("qemu-img", "create", "-f", "qcow2", layers[0], str(size))
    for below, layer in itertools.pairwise(layers):
        run("qemu-img", "create", "-f", "qcow2", "-b", below.name, "-F", "qcow2", layer,
            str(size))
    for i, layer in enumerate(layers):  # 6 + 5 + 5 MiB
        cmds = []
        for _ in range(6 if i == 0 else 5):
            off = rng.randrange(size // chunk) * chunk
            cmds += ["-c", f"write -P {rng.randrange(1, 255)} {off} {chunk}"]
        run("qemu-io", "-f", "qcow2", *cmds, layer)
    top, dst, out_q = layers[-1], d / "flat-tib.qcow2", d / "flat-tib-qemu.qcow2"
    results = []
    for _ in range(runs):
        out = run(sys.executable, "-c", CHILD.format(root=ROOT, src=str(top), dst=str(dst)))
        t, rss = out.split()[-2:]
        results.append((float(t), int(rss)))
    compare(top, dst)
    t_q = best_of(runs, lambda: run("qemu-img", "convert", "-O", "qcow2", top, out_q),
                  before=_remover(out_q), sync=True)
    t, _ = min(results)
    rss = max(r for _, r in results)
    baseline = int(run(sys.executable, "-c", "import resource, sys; sys.path.insert(0, "
                       f"{ROOT!r}); import boxdisk.ops; print(resource.getrusage("
                       "resource.RUSAGE_SELF).ru_maxrss)").split()[-1])
    table(f"(b) 3-layer chain, 1 TiB virtual, 16 MiB written (best of {runs})", [
        ("boxdisk flatten (durable)", f"{t * 1000:.0f} ms", "target < 500 ms"),
        ("qemu-img convert -O qcow2", f"{t_q * 1000:.0f} ms", "not durable"),
        ("flatten / qemu-img", f"{t / t_q:.2f}x", ""),
        ("peak RSS, whole process", f"{rss / 1024:.0f} MiB", "target < 100 MiB"),
        ("  of which Python + imports", f"{baseline / 1024:.0f} MiB", "(a process that only "
                                                                       "imports boxdisk)"),
    ], value_width=14)


def bench_c(d: Path, quick: bool, runs: int) -> None:
    del runs
    size = 256 * MIB if quick else GIB
    chunk = 64 * 1024
    n = size // chunk
    top, _ = build_chain(d, "c", size, [n // 4, n // 8, n // 8, n // 16], chunk, seed=4)
    rng = random.Random(5)
    count = 50_000
    offsets = [rng.randrange(size // 4096) * 4096 for _ in range(count)]
    with BackingChain.open(top) as chain:
        for off in offsets[:2000]:  # warm the L2 caches and the page cache
            chain.read(off, 4096)
        t0 = time.perf_counter()
        for off in offsets:
            chain.read(off, 4096)
        t = time.perf_counter() - t0
        sample = [chain.read(off, 4096) for off in offsets[:50]]
    script = "".join(f"read -q {off} 4096\n" for off in offsets)
    run("qemu-io", "-f", "qcow2", "-r", top, stdin=script)  # warm
    t0 = time.perf_counter()
    run("qemu-io", "-f", "qcow2", "-r", top, stdin=script)
    t_q = time.perf_counter() - t0
    export = d / "c-export.raw"
    run("qemu-img", "convert", "-O", "raw", top, export)
    with open(export, "rb") as f:
        for off, got in zip(offsets[:50], sample, strict=True):
            f.seek(off)
            assert f.read(4096) == got
    table(f"(c) 4 KiB random reads through a 4-layer chain ({size // MIB} MiB virtual, "
          f"{count:,} reads)", [
              ("boxdisk BackingChain.read", f"{count / t:,.0f} /s", "target >= 20,000/s"),
              ("qemu-io (one process, stdin)", f"{count / t_q:,.0f} /s",
               "includes qemu-io's command parsing and start-up"),
              ("boxdisk / qemu-io", f"{(count / t) / (count / t_q):.2f}x", "higher is faster"),
          ], value_width=14)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--dir", help="work directory (default: a temporary one)")
    ap.add_argument("--quick", action="store_true", help="smaller images for a smoke run")
    ap.add_argument("--only", choices=["a", "b", "c"], action="append")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per tool (default 5)")
    args = ap.parse_args()
    if shutil.which("qemu-img") is None or shutil.which("qemu-io") is None:
        sys.exit("qemu-img and qemu-io are needed for this benchmark")
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs "
          "(other work on the machine shows up as noise)\n")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="boxdisk-bench-") as tmp:
        d = Path(tmp)
        for name, fn in (("a", bench_a), ("b", bench_b), ("c", bench_c)):
            if args.only and name not in args.only:
                continue
            sub = d / name
            sub.mkdir()
            fn(sub, args.quick, args.runs)
            shutil.rmtree(sub)


if __name__ == "__main__":
    main()
