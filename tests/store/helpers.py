"""Helpers of the store tests: QEMU writes guest data and is the judge of every image."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from boxdisk.store import BoxStore

KIB = 1024
MIB = 1024 * KIB
#: Virtual size of the test disks: small, so whole-disk comparisons stay cheap.
SIZE = 16 * MIB
REPO = Path(__file__).resolve().parents[2]

#: Patterns QEMU writes into the bases (offset, length, byte).
OS_DATA = ((0, 1 * MIB, 0x11), (5 * MIB, 64 * KIB, 0x12))
ROOTFS_DATA = ((0, 512 * KIB, 0x21), (9 * MIB, 64 * KIB, 0x22))


def make_bases(qemu: Any, store: BoxStore, src: Path, *, size: int = SIZE) -> None:
    """Add a qcow2 base ``os`` and a raw base ``rootfs`` (QEMU-made, with data) to ``store``."""
    src.mkdir(parents=True, exist_ok=True)
    os_img = src / "os.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", os_img, str(size))
    qemu.write(os_img, [f"write -P {p:#x} {o} {n}" for o, n, p in OS_DATA])
    raw = src / "rootfs.raw"
    qemu.img("create", "-q", "-f", "raw", raw, str(size))
    qemu.write(raw, [f"write -P {p:#x} {o} {n}" for o, n, p in ROOTFS_DATA], fmt="raw")
    store.add_base(os_img, "os", backing_format="qcow2")
    store.add_base(raw, "rootfs", backing_format="raw")


def write(qemu: Any, disk: Path, pattern: int, offset: int = 0, length: int = 64 * KIB) -> None:
    """Write ``pattern`` into a guest disk with qemu-io (as a VM would)."""
    qemu.write(disk, [f"write -P {pattern:#x} {offset} {length}"])


def reads(qemu: Any, disk: Path, pattern: int, offset: int = 0, length: int = 64 * KIB) -> bool:
    """Whether QEMU reads ``pattern`` over the range (through the whole chain)."""
    proc = qemu.io("-f", "qcow2", "-r", "-U", "-c", f"read -P {pattern:#x} {offset} {length}",
                   disk, check=False)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 and "verification failed" not in out.lower():
        raise AssertionError(f"qemu-io read of {disk} failed: {out}")
    return "verification failed" not in out.lower() and "read " in out


def assert_reads(qemu: Any, disk: Path, pattern: int, offset: int = 0,
                 length: int = 64 * KIB) -> None:
    """QEMU reads ``pattern`` over the range."""
    assert reads(qemu, disk, pattern, offset, length), (
        f"{disk}: expected {pattern:#x} at [{offset}, +{length})")


def assert_base_data(qemu: Any, disk: Path, data: tuple[tuple[int, int, int], ...]) -> None:
    """The base's patterns show through ``disk``."""
    for offset, length, pattern in data:
        assert_reads(qemu, disk, pattern, offset, length)


def store_images(store: BoxStore) -> list[str]:
    """Every qcow2 image of the store."""
    return store._images()


def assert_store_clean(qemu: Any, store: BoxStore) -> None:
    """verify() finds nothing, and qemu-img check passes on every image."""
    report = store.verify()
    assert report.ok, "\n".join(f"{p.kind}: {p.path}: {p.message}" for p in report.problems)
    for image in store_images(store):
        qemu.assert_clean(image)


def backing_names(qemu: Any, image: Path) -> list[str]:
    """The backing names of every image in ``image``'s chain, as QEMU reads them."""
    infos = qemu.info(image, "--backing-chain")
    return [i["backing-filename"] for i in infos if "backing-filename" in i]


def image_bytes(qemu: Any, image: str | Path, tmp: Path) -> bytes:
    """The guest-visible bytes of an image, exported by QEMU."""
    return qemu.read_raw(image, tmp)


def run_store(root: Path, op: str, *args: Any, env: dict[str, str] | None = None,
              timeout: float = 120, store_options: dict[str, Any] | None = None,
              **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run one BoxStore operation in a child Python process (tests/store/_runner.py).

    ``store_options``: ``sync`` (the BoxStore's), ``no_tmpfile`` (force the
    named-temporary fallback for new files).
    """
    spec = json.dumps({"root": os.fspath(root), "op": op, "args": args, "kwargs": kwargs,
                       "store_options": store_options or {}})
    return subprocess.run([sys.executable, "-m", "tests.store._runner", spec], cwd=REPO,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout, check=False)
