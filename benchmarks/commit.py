"""commit: boxdisk against ``qemu-img commit`` on copies of the same chain, one run.

A 1 GiB qcow2 base (64 KiB clusters) holding 256 MiB of data, under a top
holding 512 MiB of data in 1 MiB stretches scattered over the disk (some over
the base's data, some not). Each run starts from a fresh copy of that chain
(made and synced untimed); ``boxdisk.commit(top)`` and ``qemu-img commit top``
each copy the top's data into the base and then empty the top. Target:
boxdisk <= 1.2x qemu-img's time.

Both results are checked: ``qemu-img check`` clean and ``qemu-img compare``
between the two bases and the two tops. Times are the best of several runs;
the machine may be shared, so single runs are noisy.

    python benchmarks/commit.py [--dir DIR] [--runs N] [--quick]
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import GIB, MIB, run

from boxdisk import commit


def build(d: Path, size: int, base_data: int, top_data: int) -> None:
    d.mkdir()
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", d / "base.qcow2",
        str(size))
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", "-b",
        "base.qcow2", "-F", "qcow2", d / "top.qcow2", str(size))
    rng = random.Random(4)
    mibs = list(range(size // MIB))
    base_cmds = "".join(f"write -P {rng.randrange(1, 256)} {m * MIB} 1M\n"
                        for m in sorted(rng.sample(mibs, base_data // MIB)))
    top_cmds = "".join(f"write -P {rng.randrange(1, 256)} {m * MIB} 1M\n"
                       for m in rng.sample(mibs, top_data // MIB))  # written in random order
    run("qemu-io", "-f", "qcow2", d / "base.qcow2", stdin=base_cmds + "flush\n")
    run("qemu-io", "-f", "qcow2", d / "top.qcow2", stdin=top_cmds + "flush\n")


def fresh(pristine: Path, work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(pristine, work)
    subprocess.run(["sync"], check=True)


def timed(runs: int, pristine: Path, work: Path, fn: object) -> float:
    best = float("inf")
    for _ in range(runs):
        fresh(pristine, work)
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", help="work directory (default: a temporary one)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a 128 MiB top, one run")
    args = parser.parse_args()
    runs = 1 if args.quick else args.runs
    top_data = 128 * MIB if args.quick else 512 * MIB
    root = Path(tempfile.mkdtemp(prefix="boxdisk-bench-commit-", dir=args.dir))
    try:
        print(f"boxdisk commit benchmark in {root} (best of {runs}; the machine may be "
              f"shared)\n")
        pristine, mine, theirs = root / "pristine", root / "boxdisk", root / "qemu"
        build(pristine, GIB, 256 * MIB, top_data)
        t_box = timed(runs, pristine, mine, lambda: commit(mine / "top.qcow2"))
        t_qemu = timed(runs, pristine, theirs,
                       lambda: run("qemu-img", "commit", "-q", "-f", "qcow2",
                                   theirs / "top.qcow2"))
        for p in ("base.qcow2", "top.qcow2"):
            for d in (mine, theirs):
                run("qemu-img", "check", d / p)
            run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", mine / p, theirs / p)
        print(f"commit of a {top_data // MIB} MiB top (1 MiB stretches, random order) into a "
              f"1 GiB base with 256 MiB of data")
        rows = [
            ("boxdisk.commit", f"{t_box:.2f} s", f"{top_data / MIB / t_box:,.0f} MiB/s"),
            ("qemu-img commit", f"{t_qemu:.2f} s", f"{top_data / MIB / t_qemu:,.0f} MiB/s"),
            ("boxdisk / qemu-img", f"{t_box / t_qemu:.2f}x", "time ratio (target <= 1.2x)"),
        ]
        for name, value, note in rows:
            print(f"    {name:<22}{value:>12}   {note}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
