"""Start-up time of the command line: ``boxdisk --version`` and ``boxdisk info`` vs qemu-img.

Each command runs N times as a fresh process; the median wall time is printed
beside qemu-img's for the same job. Target: both boxdisk commands under 150 ms.

    python benchmarks/cli_startup.py [-n 20]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BOXDISK = str(Path(sys.executable).parent / "boxdisk")


def median_ms(argv: list[str], n: int) -> float:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=20, help="runs per command (default 20)")
    args = ap.parse_args(argv)
    qemu_img = shutil.which("qemu-img")
    with tempfile.TemporaryDirectory(prefix="boxdisk-bench-") as tmp:
        base = Path(tmp) / "base.raw"
        subprocess.run([BOXDISK, "create", "-q", "-f", "raw", str(base), "64M"], check=True)
        img = Path(tmp) / "disk.qcow2"
        subprocess.run([BOXDISK, "create", "-q", "-b", "base.raw", "-F", "raw", str(img)],
                       check=True)
        rows = [
            ("--version", [BOXDISK, "--version"], [qemu_img, "--version"] if qemu_img else None),
            ("info IMAGE", [BOXDISK, "info", str(img)],
             [qemu_img, "info", str(img)] if qemu_img else None),
        ]
        print(f"cli_startup: median of {args.n} runs per command")
        print(f"{'command':14} {'boxdisk':>10} {'qemu-img':>10} {'ratio':>7}  target")
        for name, ours, theirs in rows:
            a = median_ms(ours, args.n)
            b = median_ms(theirs, args.n) if theirs else float("nan")
            verdict = "meets" if a < 150 else "misses"
            print(f"{name:14} {a:>7.1f} ms {b:>7.1f} ms {a / b:>6.1f}x  < 150 ms: {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
