"""Safe rebase onto a backing longer than the old one (issue 12, item 0), judged by QEMU.

Past the old backing's end the guest read zeros; after the rebase it must
still read zeros, not the new backing's bytes (v2 tops get explicit zero
data, v3 tops zero clusters). Also: a header-only rewrite clears unknown
autoclear feature bits, as the specification requires of a writer that does
not know them.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest

from boxdisk import rebase, set_backing_file_path
from boxdisk.qcow2 import read_header

pytestmark = pytest.mark.qemu

MIB = 1 << 20


def _chain(qemu: Any, tmp: Path, compat: str, cluster: int) -> tuple[Path, Path]:
    low, mid, top = tmp / "L.qcow2", tmp / "M.qcow2", tmp / "T.qcow2"
    opts = f"compat={compat},cluster_size={cluster}"
    qemu.img("create", "-q", "-f", "qcow2", "-o", opts, low, "4M")
    qemu.io("-c", "write -P 0xaa 0 4M", low)
    qemu.img("create", "-q", "-f", "qcow2", "-o", opts, "-b", low, "-F", "qcow2", mid, "2M")
    qemu.img("create", "-q", "-f", "qcow2", "-o", opts, "-b", mid, "-F", "qcow2", top, "4M")
    qemu.io("-c", "write -P 0x11 4096 8192", top)
    return low, top


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("cluster", [512, 64 * 1024, 2 * MIB])
def test_rebase_onto_a_longer_backing_keeps_zeros_past_the_old_end(
        qemu: Any, tmp_path: Path, compat: str, cluster: int) -> None:
    low, top = _chain(qemu, tmp_path, compat, cluster)
    before = tmp_path / "before.raw"
    qemu.img("convert", "-O", "raw", top, before)
    rebase(top, low, backing_format="qcow2")
    assert read_header(top).backing_file is not None
    out = qemu.img("compare", "-F", "raw", top, before, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    qemu.assert_clean(top)


def test_rebase_to_standalone_and_the_enum_form_agree(qemu: Any, tmp_path: Path) -> None:
    import boxdisk  # noqa: PLC0415

    low, top = _chain(qemu, tmp_path, "1.1", 64 * 1024)
    before = tmp_path / "before.raw"
    qemu.img("convert", "-O", "raw", top, before)
    rebase(top, low, backing_format=boxdisk.BackingFormat.QCOW2)
    rebase(top, None)
    assert read_header(top).backing_file is None
    assert qemu.img("compare", "-F", "raw", top, before, check=False).returncode == 0
    qemu.assert_clean(top)


def test_header_rewrite_clears_unknown_autoclear_bits(qemu: Any, tmp_path: Path) -> None:
    base, other, top = tmp_path / "b.qcow2", tmp_path / "o.qcow2", tmp_path / "t.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", base, "1M")
    qemu.img("create", "-q", "-f", "qcow2", other, "1M")
    qemu.img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top, "1M")
    with top.open("r+b") as f:  # autoclear_features: header offset 88 (v3)
        f.seek(88)
        (bits,) = struct.unpack(">Q", f.read(8))
        f.seek(88)
        f.write(struct.pack(">Q", bits | 1 << 5))
    assert read_header(top).autoclear_features & 1 << 5
    set_backing_file_path(top, other, backing_format="qcow2")
    assert not read_header(top).autoclear_features & 1 << 5
    qemu.assert_clean(top)
