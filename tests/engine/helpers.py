"""Helpers for the engine tests: QEMU-made images, boxdisk writers over chains, a model.

The model of a disk is a plain ``bytearray`` of its guest bytes. QEMU is the
judge of every image boxdisk wrote: ``qemu-img check`` for its metadata,
``qemu-img compare`` against the model (as a raw file) and ``qemu-io read -P``
over the model's constant runs for its bytes.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from boxdisk.chain import BackingChain, open_chain
from boxdisk.image._qcow2_write import Qcow2Writer

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

CLUSTER_SIZES = (512, 4 * KIB, 64 * KIB, 2 * MIB)

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
        args += ["-b", backing.name, "-F", backing_fmt]
    qemu.img(*args, path, str(size))
    return path


def reader_of(chain: BackingChain) -> Callable[[int, int], bytes]:
    """A ``read_below`` over ``chain``: zeros past its end (a shorter backing file)."""

    def read(offset: int, length: int) -> bytes:
        end = min(offset + length, chain.size)
        data = chain.read(offset, end - offset) if end > offset else b""
        return data + bytes(length - len(data))

    return read


@contextmanager
def writer_for(path: Path) -> Iterator[Qcow2Writer]:
    """A Qcow2Writer on ``path`` reading through its backing chain (closed on exit)."""
    with open_chain(path) as chain:
        below_spec = (chain.images[1].path, chain.images[1].format) \
            if len(chain.images) > 1 else None
    below = None if below_spec is None else open_chain(below_spec[0], format=below_spec[1])
    try:
        with Qcow2Writer(path, read_below=None if below is None else reader_of(below)) as w:
            yield w
    finally:
        if below is not None:
            below.close()


def boxdisk_read(path: Path, fmt: str = "qcow2") -> bytes:
    """The guest bytes of ``path``'s chain as boxdisk reads them."""
    with open_chain(path, format=fmt) as chain:
        return chain.read(0, chain.size)


def constant_runs(model: bytes | bytearray, *, min_len: int = 512,
                  limit: int = 200) -> list[tuple[int, int, int]]:
    """``(offset, length, byte)`` runs of one repeated byte, longest first, at most ``limit``."""
    runs: list[tuple[int, int, int]] = []
    mv = memoryview(model)
    pos, n = 0, len(model)
    while pos < n:
        value = mv[pos]
        end = pos + 1
        # Grow in doubling steps, then finish bytewise (C-speed compares).
        step = 1
        while end < n:
            chunk = min(step, n - end)
            if mv[end:end + chunk] == bytes([value]) * chunk:
                end += chunk
                step *= 2
            elif step > 1:
                step = 1
            else:
                break
        if end - pos >= min_len:
            runs.append((pos, end - pos, value))
        pos = end
    runs.sort(key=lambda r: -r[1])
    return runs[:limit]


def assert_qemu_reads(qemu: Any, path: Path, model: bytes | bytearray, tmp: Path, *,
                      fmt: str = "qcow2") -> None:
    """QEMU reads ``model`` from ``path``: ``qemu-img compare`` and ``qemu-io read -P``."""
    raw = tmp / "model.raw"
    raw.write_bytes(bytes(model))
    proc = qemu.img("compare", "-U", "-f", "raw", "-F", fmt, raw, path, check=False)
    if proc.returncode != 0:
        got = qemu.read_raw(path, tmp)
        first = next((i for i in range(min(len(got), len(model))) if got[i] != model[i]),
                     min(len(got), len(model)))
        msg = (f"qemu-img compare model vs {path.name}: {proc.stdout.strip()} "
               f"(first byte {first}: qemu {got[first:first + 8].hex()} "
               f"model {bytes(model[first:first + 8]).hex()}; sizes {len(got)}/{len(model)})")
        raise AssertionError(msg)
    raw.unlink()
    cmds: list[str] = []
    for off, length, value in constant_runs(model):
        cmds += ["-c", f"read -P {value} {off} {length}"]
    if cmds:
        proc = qemu.io("-r", "-U", "-f", fmt, *cmds, path)
        assert "verification failed" not in proc.stdout, proc.stdout


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
    block = bytes((seed * 31 + i * 7) & 0xFF for i in range(251))
    return (block * (length // 251 + 1))[:length]
