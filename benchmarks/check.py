"""check: boxdisk against qemu-img check, on the same files, in one run.

(a) a 1 GiB image fully written by qemu-io, 64 KiB clusters: ``boxdisk.check``
    in this process, the same in a fresh Python process (interpreter start and
    import included, as a CLI pays them), and ``qemu-img check`` (a process).
    Target: <= 3x qemu-img check.
(b) the same 1 GiB written with 4 KiB clusters: 262,144 L2 entries, the
    per-entry cost of the walk.
(c) 256 MiB written in 64 KiB pieces from the end backwards, 4 KiB clusters:
    every L2 table holds 32 separate runs, so the walk takes its per-entry path.
(d) repair="all" of (b) with one refcount zeroed (a refcount structure
    rebuild) against ``qemu-img check -r all``, each on a fresh copy.

Every boxdisk report is compared with qemu-img's JSON, so a fast wrong answer
cannot win. Times are the best of several runs; the machine may be shared
(other work on it makes single runs noisy), so read the ratios, not the
absolute times.

    python benchmarks/check.py [--dir DIR] [--runs N] [--quick]
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import best_of

from boxdisk import check

GIB = 1 << 30
ROOT = str(Path(__file__).resolve().parent.parent)


def qemu_json(*args: str | Path) -> dict[str, object]:
    proc = subprocess.run(["qemu-img", "check", "--output=json", *map(str, args)],
                          capture_output=True, text=True, check=False)
    return json.loads(proc.stdout)


def make(path: Path, cluster: int, size: int) -> Path:
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                        f"cluster_size={cluster}", str(tmp), str(size)], check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {size}", str(tmp)],
                       check=True, capture_output=True)
        tmp.rename(path)
    return path


def make_fragmented(path: Path) -> Path:
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096",
                        str(tmp), str(256 << 20)], check=True)
        script = "".join(f"write -P {i % 250 + 1} {(4095 - i) * 65536} 64k\n"
                         for i in range(4096))
        subprocess.run(["qemu-io", "-f", "qcow2", str(tmp)], input=script, text=True,
                       check=True, capture_output=True)
        tmp.rename(path)
    return path


def row(name: str, seconds: float, peer: float | None = None) -> str:
    ratio = f"{seconds / peer:6.2f}x" if peer else ""
    return f"    {name:<44}{seconds * 1000:10.1f} ms   {ratio}"


def bench_check(path: Path, runs: int, title: str, *, fresh_process: bool) -> None:
    expected = qemu_json(path)
    got = check(path).as_qemu_json()
    assert got == expected, (got, expected)
    t_qemu = best_of(runs, lambda: subprocess.run(
        ["qemu-img", "check", str(path)], check=True, capture_output=True))
    t_box = best_of(runs, lambda: check(path))
    print(title)
    print(row("qemu-img check (process)", t_qemu))
    print(row("boxdisk.check (in process)", t_box, t_qemu))
    if fresh_process:
        code = f"import boxdisk; boxdisk.check({str(path)!r})"
        t_proc = best_of(runs, lambda: subprocess.run([sys.executable, "-c", code], check=True,
                                                      cwd=ROOT))
        print(row("boxdisk.check (fresh python process)", t_proc, t_qemu))
    print()


def zero_one_refcount(path: Path) -> None:
    with open(path, "r+b") as f:
        head = f.read(112)
        cluster_bits = struct.unpack_from(">I", head, 20)[0]
        l1_offset, rt_offset = struct.unpack_from(">QQ", head, 40)
        f.seek(l1_offset)
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FF_FFFF_FFFF_FE00
        f.seek(l2)
        data = struct.unpack(">Q", f.read(8))[0] & 0x00FF_FFFF_FFFF_FE00
        f.seek(rt_offset)
        block = struct.unpack(">Q", f.read(8))[0] & ~0x1FF
        f.seek(block + 2 * (data >> cluster_bits))  # 16-bit refcounts
        f.write(b"\0\0")


def bench_repair(source: Path, work: Path, runs: int) -> None:
    broken = work / "broken.qcow2"
    shutil.copy(source, broken)
    zero_one_refcount(broken)
    victim = work / "victim.qcow2"

    def fresh() -> None:
        shutil.copy(broken, victim)
        subprocess.run(["sync"], check=True)

    t_qemu = best_of(runs, lambda: subprocess.run(
        ["qemu-img", "check", "-r", "all", str(victim)], check=True, capture_output=True),
        before=fresh)
    assert qemu_json(victim).get("corruptions", 0) == 0
    t_box = best_of(runs, lambda: check(victim, repair="all"), before=fresh)
    report = check(victim)
    assert report.clean and report.as_qemu_json() == qemu_json(victim)
    print("(d) repair='all' of (b) with one refcount zeroed (rebuild), fresh copy each run")
    print(row("qemu-img check -r all (process)", t_qemu))
    print(row("boxdisk.check(repair='all') (in process)", t_box, t_qemu))
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="keep the images here (reused across runs)")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="3 runs, skip (d)")
    args = parser.parse_args()
    runs = 3 if args.quick else args.runs
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        keep = args.dir or Path(tmp)
        big64 = make(keep / "check-1g-64k.qcow2", 64 * 1024, GIB)
        big4 = make(keep / "check-1g-4k.qcow2", 4096, GIB)
        bench_check(big64, runs, "(a) 1 GiB fully written, 64 KiB clusters (target <= 3x)",
                    fresh_process=True)
        bench_check(big4, runs, "(b) 1 GiB fully written, 4 KiB clusters", fresh_process=True)
        frag = make_fragmented(keep / "check-256m-4k-fragmented.qcow2")
        bench_check(frag, runs, "(c) 256 MiB written backwards in 64 KiB pieces, 4 KiB clusters",
                    fresh_process=False)
        if not args.quick:
            bench_repair(big4, Path(tmp), max(1, runs // 2))


if __name__ == "__main__":
    main()
