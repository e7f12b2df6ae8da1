"""Helpers for the engine and edit-operation tests: QEMU-made images, a bytearray model.

The model of a disk is a plain ``bytearray`` of its guest bytes. QEMU is the
judge of every image boxdisk wrote: ``qemu-img check`` for its metadata,
``qemu-img compare`` against the model (as a raw file) and ``qemu-io read -P``
over the model's constant runs for its bytes.
"""

from __future__ import annotations

import json
import os
import random
import struct
from pathlib import Path
from typing import Any

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

# Header offsets (docs/interop/qcow2.txt, "Header")
INCOMPATIBLE_FEATURES_OFFSET = 72
AUTOCLEAR_FEATURES_OFFSET = 88


def create(qemu: Any, path: Path, size: int, *, cluster: int = 64 * KIB,
           backing: Path | None = None, backing_fmt: str = "qcow2", compat: str = "1.1",
           options: tuple[str, ...] = ()) -> Path:
    """``qemu-img create -f qcow2`` with the given geometry (backing named relatively)."""
    opts = f"cluster_size={cluster},compat={compat}"
    for extra in options:
        opts += f",{extra}"
    args: list[str | os.PathLike[str]] = ["create", "-q", "-f", "qcow2", "-o", opts]
    if backing is not None:
        args += ["-b", os.path.relpath(backing, path.parent), "-F", backing_fmt]
    qemu.img(*args, path, str(size))
    return path


def qemu_check(qemu: Any, path: Path, *extra: str) -> dict[str, Any]:
    """``qemu-img check -U --output=json`` parsed (works while boxdisk holds the image)."""
    proc = qemu.img("check", "-U", "--output=json", *extra, path, check=False)
    assert proc.returncode in (0, 2, 3), f"qemu-img check {path}: {proc.stderr}{proc.stdout}"
    return dict(json.loads(proc.stdout))


def assert_clean(qemu: Any, path: Path) -> dict[str, Any]:
    """qemu-img check: no corruptions, no leaks, no check errors."""
    report = qemu_check(qemu, path)
    bad = {k: report.get(k, 0) for k in ("corruptions", "leaks", "check-errors")}
    assert not any(bad.values()), f"qemu-img check {path}: {report}"
    return report


def assert_not_corrupt(qemu: Any, path: Path) -> dict[str, Any]:
    """qemu-img check: leaks allowed, but no corruption and no check error."""
    report = qemu_check(qemu, path)
    bad = {k: report.get(k, 0) for k in ("corruptions", "check-errors")}
    assert not any(bad.values()), f"qemu-img check {path}: {report}"
    return report


_SECTOR = 512
_FILLED = [bytes([v]) * _SECTOR for v in range(256)]


def constant_runs(model: bytes | bytearray, *, limit: int = 64) -> list[tuple[int, int, int]]:
    """``(offset, length, byte)`` runs of whole sectors holding one repeated byte.

    Longest first, at most ``limit``; a trailing partial sector is left out.
    """
    runs: list[tuple[int, int, int]] = []
    mv = memoryview(model)
    start, value = -1, -1
    for pos in range(0, len(model) // _SECTOR * _SECTOR, _SECTOR):
        v = mv[pos]
        filled = mv[pos : pos + _SECTOR] == _FILLED[v]
        if filled and v == value:
            continue
        if value >= 0:
            runs.append((start, pos - start, value))
        start, value = (pos, v) if filled else (-1, -1)
    if value >= 0:
        runs.append((start, len(model) // _SECTOR * _SECTOR - start, value))
    runs.sort(key=lambda r: -r[1])
    return runs[:limit]


def assert_qemu_reads(qemu: Any, path: Path, model: bytes | bytearray, tmp: Path, *,
                      fmt: str = "qcow2") -> None:
    """QEMU reads ``model`` from ``path``: ``qemu-img compare`` and ``qemu-io read -P``."""
    raw = tmp / f"model-{os.getpid()}.raw"
    raw.write_bytes(bytes(model))
    try:
        proc = qemu.img("compare", "-U", "-f", "raw", "-F", fmt, raw, path, check=False)
        if proc.returncode != 0:
            got = qemu.read_raw(path, tmp)
            first = next((i for i in range(min(len(got), len(model))) if got[i] != model[i]),
                         min(len(got), len(model)))
            msg = (f"qemu-img compare model vs {path.name}: {proc.stdout.strip()} "
                   f"{proc.stderr.strip()} (first byte {first}: qemu "
                   f"{got[first:first + 8].hex()} model {bytes(model[first:first + 8]).hex()};"
                   f" sizes {len(got)}/{len(model)})")
            raise AssertionError(msg)
    finally:
        raw.unlink()
    cmds: list[str] = []
    for off, length, value in constant_runs(model):
        cmds += ["-c", f"read -P {value} {off} {length}"]
    if cmds:
        proc = qemu.io("-r", "-U", "-f", fmt, *cmds, path)
        assert "verification failed" not in proc.stdout, proc.stdout


def qemu_compare(qemu: Any, a: Path, b: Path, fmt_a: str = "qcow2",
                 fmt_b: str = "qcow2") -> tuple[int, int | None]:
    """(exit code, mismatch offset or None) of ``qemu-img compare``."""
    proc = qemu.img("compare", "-U", "-f", fmt_a, "-F", fmt_b, a, b, check=False)
    assert proc.returncode in (0, 1), f"qemu-img compare failed: {proc.stderr}{proc.stdout}"
    offset = None
    for line in proc.stdout.splitlines():
        if line.startswith("Content mismatch at offset "):
            offset = int(line.removeprefix("Content mismatch at offset ").rstrip("!"))
    return proc.returncode, offset


def assert_same_view(qemu: Any, a: Path, b: Path, fmt_a: str = "qcow2",
                     fmt_b: str = "qcow2") -> None:
    """QEMU sees the same guest bytes (and size) through ``a`` and ``b``."""
    code, offset = qemu_compare(qemu, a, b, fmt_a, fmt_b)
    assert code == 0, f"{a} and {b} differ at {offset}"
    size_a = qemu.info(a, "-f", fmt_a)["virtual-size"]
    size_b = qemu.info(b, "-f", fmt_b)["virtual-size"]
    assert size_a == size_b


def poke(path: Path, offset: int, data: bytes) -> None:
    """Overwrite bytes of a file in place (to set header bits QEMU will not)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def header_u64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return int(struct.unpack(">Q", f.read(8))[0])


def pattern(seed: int, length: int) -> bytes:
    """Deterministic non-constant bytes (so misplaced copies inside a cluster show)."""
    return random.Random(seed).randbytes(length)


def discarded(model: bytearray, below: bytes | bytearray, offset: int, length: int,
              cluster: int, v3: bool) -> None:
    """Apply a discard to the model as QEMU's (and boxdisk's) discard acts.

    Whole clusters only (the last one counts when the range runs to the end
    of the disk); they then read as zeros in v3, and what is below in v2.
    """
    size = len(model)
    first = -(-offset // cluster)
    last = (offset + length) // cluster
    if length and offset + length == size:
        last = -(-size // cluster)
    for gc in range(first, last):
        s, e = gc * cluster, min(size, (gc + 1) * cluster)
        if v3:
            model[s:e] = bytes(e - s)
        else:
            part = bytes(below[s:e])
            model[s:e] = part + bytes(e - s - len(part))
