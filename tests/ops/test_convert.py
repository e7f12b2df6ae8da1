"""convert: a chain or a raw file to a standalone qcow2 or a sparse raw file (import/export).

Every output is judged by QEMU: ``qemu-img compare`` against the source, ``qemu-img
check`` for qcow2, and the exact bytes of ``qemu-img convert -O raw`` for raw.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from boxdisk._errors import DiskExistsError, InvalidArgumentError
from boxdisk.chain import BackingChain
from boxdisk.ops import convert, flatten

from ..chain.chains import KIB, MIB, Layer, build_chain, qemu_map, random_ops

pytestmark = pytest.mark.qemu


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def _sparse_raw(path: Path, size: int, writes: list[tuple[int, bytes]]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in writes:
            f.seek(offset)
            f.write(data)


def test_raw_import_to_qcow2(qemu, tmp_path: Path) -> None:
    raw = tmp_path / "in.raw"
    _sparse_raw(raw, 8 * MIB, [(MIB, os.urandom(300 * KIB)), (6 * MIB, bytes(128 * KIB))])
    dst = tmp_path / "out.qcow2"
    written = convert(raw, dst, output_format="qcow2", src_format="raw")
    assert written == 320 * KIB  # 300 KiB rounded up to clusters; the zeros are not data
    qemu.assert_clean(dst)
    assert "backing-filename" not in qemu.info(dst)
    assert qemu.img("compare", "-f", "raw", "-F", "qcow2", raw, dst, check=False).returncode == 0
    assert [(e["start"], e["length"]) for e in qemu_map(qemu, dst) if e["data"]] == [
        (MIB, 320 * KIB)]


def test_raw_to_sparse_raw(qemu, tmp_path: Path) -> None:
    raw = tmp_path / "in.raw"
    _sparse_raw(raw, 16 * MIB + 512, [(0, b"\1" * 4096), (9 * MIB, os.urandom(MIB)),
                                       (16 * MIB, b"\2" * 512)])
    dst = tmp_path / "out.raw"
    written = convert(raw, dst, output_format="raw", src_format="raw")
    assert dst.read_bytes() == raw.read_bytes()
    assert os.path.getsize(dst) == 16 * MIB + 512
    assert _allocated(dst) <= written + 64 * KIB


def test_chain_export_to_sparse_raw(qemu, tmp_path: Path) -> None:
    rng = random.Random(9)
    top = build_chain(qemu, tmp_path, [
        Layer("raw", 8 * MIB, (), ("write -P 1 0 1M",)),
        Layer("qcow2", 8 * MIB, (), random_ops(rng, 8 * MIB, 64 * KIB, 10, compressed=4)),
        Layer("qcow2", 8 * MIB, (), ("write -z 0 256k", "write -P 0 4M 1M")),
    ])
    dst = tmp_path / "out.raw"
    written = convert(top, dst, output_format="raw")
    assert dst.read_bytes() == qemu.read_raw(top, tmp_path)
    assert os.path.getsize(dst) == 8 * MIB
    assert _allocated(dst) <= written + 256 * KIB  # holes stay holes
    proc = qemu.img("compare", "-f", "qcow2", "-F", "raw", top, dst, check=False)
    assert proc.returncode == 0


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_compressed_base_export(qemu, tmp_path: Path, compression: str) -> None:
    rng = random.Random(compression)
    ops = tuple(f"write -P {i + 1} {i * 300 * KIB} {200 * KIB}" for i in range(10))
    top = build_chain(qemu, tmp_path, [
        Layer("qcow2", 4 * MIB, (), ops, compress=compression),
        Layer("qcow2", 4 * MIB, (), random_ops(rng, 4 * MIB, 64 * KIB, 8)),
    ])
    raw, flat = tmp_path / "out.raw", tmp_path / "out.qcow2"
    convert(top, raw, output_format="raw")
    convert(top, flat, output_format="qcow2")
    assert raw.read_bytes() == qemu.read_raw(top, tmp_path)
    qemu.assert_clean(flat)
    assert qemu.img("compare", top, flat, check=False).returncode == 0


def test_convert_to_qcow2_is_flatten(qemu, tmp_path: Path) -> None:
    rng = random.Random(4)
    top = build_chain(qemu, tmp_path, [Layer("qcow2", 4 * MIB, (), random_ops(
        rng, 4 * MIB, 64 * KIB, 12)) for _ in range(3)])
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    assert convert(top, a, output_format="qcow2") == flatten(top, b)
    assert a.read_bytes() == b.read_bytes()


def test_output_cluster_size_and_open_chain(qemu, tmp_path: Path) -> None:
    rng = random.Random(5)
    top = build_chain(qemu, tmp_path, [Layer("qcow2", 2 * MIB, ("-o", "cluster_size=512"),
                                             random_ops(rng, 2 * MIB, 512, 30))])
    dst = tmp_path / "out.qcow2"
    with BackingChain.open(top) as chain:
        convert(chain, dst, output_format="qcow2", cluster_size=2 * MIB)
        assert not chain.closed
    assert qemu.info(dst)["cluster-size"] == 2 * MIB
    qemu.assert_clean(dst)
    assert qemu.img("compare", top, dst, check=False).returncode == 0


def test_destination_rules(qemu, tmp_path: Path) -> None:
    raw = tmp_path / "in.raw"
    _sparse_raw(raw, MIB, [(0, b"x" * 512)])
    dst = tmp_path / "out.raw"
    dst.write_bytes(b"keep")
    with pytest.raises(DiskExistsError):
        convert(raw, dst, output_format="raw", src_format="raw")
    assert dst.read_bytes() == b"keep"
    seen: list[tuple[int, int]] = []
    convert(raw, dst, output_format="raw", src_format="raw", overwrite=True,
            progress=lambda d, t: seen.append((d, t)))
    assert dst.read_bytes() == raw.read_bytes()
    assert seen[-1] == (MIB, MIB)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.raw", "out.raw"]
    with pytest.raises(InvalidArgumentError, match="part of the source chain"):
        convert(raw, raw, output_format="raw", src_format="raw", overwrite=True)


def test_convert_refuses_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError):
        convert(tmp_path / "a", tmp_path / "b", output_format="vmdk")
    with pytest.raises(InvalidArgumentError):
        convert(tmp_path / "a", tmp_path / "b", output_format="raw", cluster_size=1000)


def test_raw_export_is_as_sparse_as_qemus(qemu, tmp_path: Path) -> None:
    """Zero 4 KiB blocks inside allocated clusters stay holes, as with qemu-img -S 4k."""
    src = tmp_path / "src.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", src, "8M")
    qemu.write(src, [f"write -P {i + 1} {i * 192 * KIB + 8 * KIB} 4k" for i in range(40)])
    mine, theirs = tmp_path / "mine.raw", tmp_path / "theirs.raw"
    assert convert(src, mine, output_format="raw") == 40 * 4 * KIB
    qemu.img("convert", "-f", "qcow2", "-O", "raw", src, theirs)
    assert mine.read_bytes() == theirs.read_bytes()
    assert _allocated(mine) <= _allocated(theirs)
