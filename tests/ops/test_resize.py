"""resize against ``qemu-img resize`` on twin copies: grow (L1 too), shrink an unused tail."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from boxdisk import InvalidArgumentError, UnsupportedFeatureError, qcow2_virtual_size, resize

from ..chain.chains import KIB, MIB, random_ops
from ..engine.helpers import assert_clean, assert_same_view, create

pytestmark = pytest.mark.qemu


def _twin(tmp: Path) -> Path:
    shutil.copytree(tmp / "box", tmp / "qemu")
    return tmp / "qemu"


def _setup(qemu: Any, tmp: Path, size: int, *, cluster: int = 64 * KIB, compat: str = "1.1",
           backing_size: int | None = None, ops: tuple[str, ...] | None = None) -> Path:
    box = tmp / "box"
    box.mkdir()
    base = None
    if backing_size is not None:
        base = create(qemu, box / "base.qcow2", backing_size, cluster=cluster)
        qemu.write(base, [f"write -P 0x5b 0 {backing_size}"])
    top = create(qemu, box / "top.qcow2", size, cluster=cluster, backing=base, compat=compat)
    cmds = ops if ops is not None else random_ops(random.Random(size), size, cluster, 15)
    if cmds:
        qemu.write(top, cmds)
    return top


def _resize_both(qemu: Any, top: Path, qemu_top: Path, new: int) -> None:
    resize(top, new)
    shrink = ["--shrink"] if new < qcow2_virtual_size(qemu_top) else []
    qemu.img("resize", "-q", "-f", "qcow2", *shrink, qemu_top, str(new))
    assert qcow2_virtual_size(top) == new
    assert_same_view(qemu, top, qemu_top)
    assert_clean(qemu, top)


@pytest.mark.parametrize(("size", "new", "cluster", "compat"), [
    (4 * MIB, 8 * MIB, 64 * KIB, "1.1"),
    (4 * MIB + 512, 9 * MIB - 512, 64 * KIB, "1.1"),  # partial clusters at both ends
    (1 * MIB, 64 * MIB, 512, "1.1"),  # the L1 table grows (and moves)
    (1 * MIB, 64 * MIB, 512, "0.10"),
])
def test_grow(qemu: Any, tmp_path: Path, size: int, new: int, cluster: int,
              compat: str) -> None:
    top = _setup(qemu, tmp_path, size, cluster=cluster, compat=compat)
    qemu_top = _twin(tmp_path) / "top.qcow2"
    _resize_both(qemu, top, qemu_top, new)
    qemu.write(top, [f"write -P 9 {new - 4096} 4096"])  # the new end is usable
    assert_clean(qemu, top)


@pytest.mark.parametrize("size", [1 * MIB, 1 * MIB + 1536])
def test_grow_over_a_longer_backing_file_reads_zeros(qemu: Any, tmp_path: Path,
                                                     size: int) -> None:
    top = _setup(qemu, tmp_path, size, cluster=64 * KIB, backing_size=4 * MIB,
                 ops=(f"write -P 1 0 {size // 2}",))
    qemu_top = _twin(tmp_path) / "top.qcow2"
    _resize_both(qemu, top, qemu_top, 6 * MIB)
    # QEMU agrees; and spelled out: the old backing bytes past the old end stay hidden.
    out = qemu.io("-r", "-f", "qcow2", "-c", f"read -P 0 {size} {6 * MIB - size}", top).stdout
    assert "verification failed" not in out


def test_v2_cannot_grow_over_a_longer_backing_file(qemu: Any, tmp_path: Path) -> None:
    top = _setup(qemu, tmp_path, MIB, compat="0.10", backing_size=4 * MIB, ops=())
    qemu_top = _twin(tmp_path) / "top.qcow2"
    before = top.read_bytes()
    with pytest.raises(UnsupportedFeatureError):
        resize(top, 2 * MIB)
    proc = qemu.img("resize", "-q", "-f", "qcow2", qemu_top, str(2 * MIB), check=False)
    assert proc.returncode != 0 and "Failed to zero out new clusters" in proc.stderr
    assert top.read_bytes() == before


def test_shrink_an_unused_tail(qemu: Any, tmp_path: Path) -> None:
    top = _setup(qemu, tmp_path, 8 * MIB, ops=(
        "write -P 3 0 3M",
        "write -P 0 3M 64k",  # data, but zeros: past the new end that is fine
        "write -z 5M 1M",  # zero clusters past the new end
        "write -P 4 6M 64k",
        "discard 6M 64k",  # freed again
    ))
    qemu_top = _twin(tmp_path) / "top.qcow2"
    _resize_both(qemu, top, qemu_top, 3 * MIB + 4096)
    _resize_both(qemu, top, qemu_top, 5 * MIB)  # and grow back: the tail reads zeros


def test_shrink_frees_the_tail_tables(qemu: Any, tmp_path: Path) -> None:
    # 512-byte clusters: an L2 table maps 32 KiB, so the tail holds many tables.
    top = _setup(qemu, tmp_path, 4 * MIB, cluster=512, ops=(
        "write -P 1 0 1M", "write -z 1M 2M",
    ))
    qemu_top = _twin(tmp_path) / "top.qcow2"
    _resize_both(qemu, top, qemu_top, MIB)
    allocated = json.loads(qemu.img("check", "--output=json", top).stdout)
    assert allocated["allocated-clusters"] <= MIB // 512 + 64


def test_shrink_refused_over_data(qemu: Any, tmp_path: Path) -> None:
    top = _setup(qemu, tmp_path, 4 * MIB, ops=("write -P 1 0 1M", "write -P 2 3146728 1"))
    before = top.read_bytes()
    with pytest.raises(InvalidArgumentError) as exc:
        resize(top, 2 * MIB)
    assert exc.value.field == "size" and "guest cluster 48" in str(exc.value)
    with pytest.raises(InvalidArgumentError):
        resize(top, 3 * MIB + 512)  # the straddling cluster's cut-off part holds data
    assert top.read_bytes() == before
    resize(top, 3 * MIB + 1024)  # the byte at 3 MiB + 1000 is kept: allowed
    assert_clean(qemu, top)


def test_resize_argument_errors(qemu: Any, tmp_path: Path) -> None:
    top = _setup(qemu, tmp_path, MIB, ops=())
    for bad in (-512, MIB + 100):
        with pytest.raises(InvalidArgumentError):
            resize(top, bad)
    assert qcow2_virtual_size(top) == MIB
    resize(top, MIB)  # no change
    assert_clean(qemu, top)


def test_resize_raw(qemu: Any, tmp_path: Path) -> None:
    raw = tmp_path / "d.raw"
    raw.write_bytes(b"\x01" * MIB)
    resize(raw, 2 * MIB + 100, format="raw")
    assert raw.read_bytes() == b"\x01" * MIB + bytes(MIB + 100)
    resize(raw, 1000, format="raw")
    assert raw.read_bytes() == b"\x01" * 1000
