"""compare against ``qemu-img compare``: same verdict, same offset, on many pairs.

Pairs are built by QEMU from random operations: exact copies, copies with one
byte changed anywhere, images of different sizes (the extra part zero or not),
raw against qcow2, chains against flat images, zero clusters against
unallocated ones and against written zeros.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from boxdisk import CompareResult, compare

from ..chain.chains import KIB, MIB, random_ops
from ..engine.helpers import create, qemu_compare

pytestmark = pytest.mark.qemu


def _agree(qemu: Any, a: Path, b: Path, fa: str = "qcow2", fb: str = "qcow2") -> CompareResult:
    code, offset = qemu_compare(qemu, a, b, fa, fb)
    result = compare(a, b, format_a=fa, format_b=fb)
    assert result.identical == (code == 0), (result, code, offset)
    assert result.offset == offset, (result, offset)
    back = compare(b, a, format_a=fb, format_b=fa)
    assert (back.identical, back.offset) == (result.identical, result.offset)
    return result


def _random_image(qemu: Any, path: Path, size: int, seed: int, cluster: int,
                  backing: Path | None = None) -> Path:
    create(qemu, path, size, cluster=cluster, backing=backing)
    qemu.write(path, random_ops(random.Random(seed), size, cluster, 12))
    return path


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), cluster=st.sampled_from([512, 4 * KIB, 64 * KIB]),
       size_a=st.integers(1, 64).map(lambda n: n * 32 * KIB),
       grow=st.sampled_from([0, 0, 512, 64 * KIB, 300 * KIB]),
       change=st.sampled_from(["none", "byte", "tail", "zero-vs-hole"]),
       where=st.floats(0, 1, exclude_max=True), value=st.integers(1, 255))
def test_compare_agrees_with_qemu(qemu: Any, tmp_path_factory: Any, seed: int, cluster: int,
                                  size_a: int, grow: int, change: str, where: float,
                                  value: int) -> None:
    tmp = tmp_path_factory.mktemp("cmp")
    a = _random_image(qemu, tmp / "a.qcow2", size_a, seed, cluster)
    b = tmp / "b.qcow2"
    shutil.copyfile(a, b)
    size_b = size_a + grow
    if grow:
        qemu.img("resize", "-q", "-f", "qcow2", b, str(size_b))
    if change == "byte":
        qemu.write(b, [f"write -P {value} {int(where * size_b)} 1"])
    elif change == "tail" and grow:
        qemu.write(b, [f"write -P {value} {size_a + int(where * grow)} 1"])
    elif change == "zero-vs-hole":
        # The same zeros three ways: unallocated, the zero flag, written zero bytes.
        off = int(where * size_a) // cluster * cluster
        n = min(cluster, size_a - off)
        qemu.write(a, [f"write -z {off} {n}"])
        qemu.write(b, [f"write -P 0 {off} {n}"])
    _agree(qemu, a, b)


def test_compare_raw_against_qcow2_and_chains(qemu: Any, tmp_path: Path) -> None:
    base = _random_image(qemu, tmp_path / "base.qcow2", 3 * MIB, 1, 64 * KIB)
    top = _random_image(qemu, tmp_path / "top.qcow2", 4 * MIB, 2, 64 * KIB, backing=base)
    flat = tmp_path / "flat.raw"
    qemu.img("convert", "-q", "-O", "raw", top, flat)
    assert _agree(qemu, top, flat, "qcow2", "raw").identical
    rng = random.Random(3)
    for _ in range(6):
        off = rng.randrange(4 * MIB)
        changed = tmp_path / "changed.raw"
        shutil.copyfile(flat, changed)
        with open(changed, "r+b") as f:
            f.seek(off)
            old = f.read(1)
            f.seek(off)
            f.write(bytes([old[0] ^ 0xFF]))
        result = _agree(qemu, top, changed, "qcow2", "raw")
        assert result.byte_offset == off
    # A raw file whose length is no whole number of sectors: QEMU pads it with zeros.
    odd = tmp_path / "odd.raw"
    odd.write_bytes(flat.read_bytes()[: 4 * MIB - 300])
    _agree(qemu, top, odd, "qcow2", "raw")
    _agree(qemu, odd, flat, "raw", "raw")


def test_compare_identical_disks_of_different_sizes(qemu: Any, tmp_path: Path) -> None:
    a = create(qemu, tmp_path / "a.qcow2", 1 * MIB)
    b = create(qemu, tmp_path / "b.qcow2", 3 * MIB)
    qemu.write(a, ["write -P 7 0 1M"])
    qemu.write(b, ["write -P 7 0 1M", "write -z 2M 64k"])
    result = _agree(qemu, a, b)
    assert result.identical and (result.size_a, result.size_b) == (MIB, 3 * MIB)
