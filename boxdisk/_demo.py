"""``boxdisk demo``: the main job, end to end, in a temporary directory.

A raw base with a known pattern, a qcow2 COW child over it, a pattern written
into the child, reads that prove the child shows its own writes over the
base's bytes while the base is unchanged, and the chain printed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from . import BackingFormat, create_cow_child_disk, read_backing_chain, read_header
from .image._qcow2_write import Qcow2Writer

__all__ = ["run_demo"]

MiB = 1 << 20


def _step(n: int, text: str) -> None:
    print(f"[{n}] {text}")


def _raw_reader(path: Path) -> tuple[int, object]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    return fd, lambda off, n: os.pread(fd, n, off)


def run_demo(*, keep: bool = False) -> int:
    """Run the demo; returns 0 when every check held."""
    root = Path(tempfile.mkdtemp(prefix="boxdisk-demo-"))
    try:
        return _demo(root)
    finally:
        if keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _demo(root: Path) -> int:
    print(f"boxdisk demo in {root}")
    base = root / "bases" / "base.raw"
    base.parent.mkdir(parents=True)
    size = 64 * MiB
    pattern = b"BASE" * (MiB // 4)
    with base.open("wb") as f:
        for _ in range(size // MiB):
            f.write(pattern)
    base_digest = hashlib.sha256(base.read_bytes()).hexdigest()
    _step(1, f"base: {base.relative_to(root)} (raw, {size // MiB} MiB of 'BASE')")

    child = root / "boxes" / "box1" / "disk.qcow2"
    start = time.perf_counter()
    disk = create_cow_child_disk(base, BackingFormat.RAW, child, relative=True, persistent=True)
    ms = (time.perf_counter() - start) * 1000
    header = read_header(disk.path)
    _step(2, f"child: {child.relative_to(root)} -> {header.backing_file} "
             f"(qcow2 v{header.version}, {header.cluster_size // 1024} KiB clusters, "
             f"made and fsynced in {ms:.2f} ms)")

    fd, read_base = _raw_reader(base)
    try:
        with Qcow2Writer(disk.path, read_below=read_base) as writer:  # type: ignore[arg-type]
            writer.write(1 * MiB, b"BOXDISK!" * 8192)  # one whole 64 KiB cluster
            writer.write(5 * MiB + 100, b"hello from the guest")  # part of a cluster
            writer.flush()
            whole = writer.read(1 * MiB, 16)
            part = writer.read(5 * MiB + 96, 28)
            untouched = writer.read(9 * MiB, 8)
    finally:
        os.close(fd)
    _step(3, "wrote 64 KiB of 'BOXDISK!' at 1 MiB and 20 bytes at 5 MiB+100 into the child")
    print(f"    read 1 MiB:      {whole!r}")
    print(f"    read 5 MiB+96:   {part!r}")
    print(f"    read 9 MiB:      {untouched!r}")
    ok = (
        whole == b"BOXDISK!BOXDISK!"
        and part == b"BASEhello from the guestBASE"
        and untouched == b"BASEBASE"
    )
    unchanged = hashlib.sha256(base.read_bytes()).hexdigest() == base_digest
    _step(4, f"base unchanged: {unchanged}; child reads its writes over the base: {ok}")

    chain = [disk.path, *read_backing_chain(disk.path)]
    _step(5, "chain (top first):")
    for depth, path in enumerate(chain):
        shown = Path(os.path.normpath(path)).relative_to(root)
        actual = os.stat(path).st_blocks * 512
        print(f"    {'  ' * depth}{shown}  ({actual // 1024} KiB on disk)")
    result = ok and unchanged
    print("demo " + ("passed" if result else "FAILED"))
    return 0 if result else 1
