"""flatten and convert: standalone, QEMU-clean, byte-identical outputs, written crash-safely.

Includes the original Rust flatten tests (standalone, two-layer raw->qcow2,
three-layer, compressed cluster: which must now work, not error).
"""

from __future__ import annotations

import os
import random
import struct
import zlib
from pathlib import Path

import pytest

from boxdisk._errors import CorruptImageError, DiskExistsError, InvalidArgumentError
from boxdisk.chain import BackingChain
from boxdisk.format import QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED, compressed_geometry
from boxdisk.image import Qcow2Image
from boxdisk.ops import convert, flatten

from ..chain.chains import KIB, MIB, Layer, build_chain, qemu_map, random_ops

pytestmark = pytest.mark.qemu

GIB = 1024 * MIB


def _assert_flat_copy(qemu, src: Path, dst: Path, *, src_fmt: str = "qcow2") -> None:
    qemu.assert_clean(dst)
    info = qemu.info(dst)
    assert "backing-filename" not in info
    assert info["format-specific"]["data"]["compat"] == "1.1"
    proc = qemu.img("compare", "-f", src_fmt, "-F", "qcow2", src, dst, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "identical" in proc.stdout


def _write_marker_raw(path: Path, clusters: int, cluster: int = 64 * KIB) -> None:
    """The seed's raw disk: each cluster starts with (cluster index + 1) as a big-endian u64."""
    with open(path, "wb") as f:
        for i in range(clusters):
            f.write(struct.pack(">Q", i + 1) + bytes(cluster - 8))


# -- the seed's tests --------------------------------------------------------------


def test_flatten_standalone_qcow2(qemu, tmp_path: Path) -> None:
    src = tmp_path / "src.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", src, "10G")
    dst = tmp_path / "dst.qcow2"
    assert flatten(src, dst) == 0
    _assert_flat_copy(qemu, src, dst)
    with Qcow2Image.open(dst) as img:
        assert img.backing_file is None
        assert img.size == 10 * GIB


def test_flatten_two_layer_chain(qemu, tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    _write_marker_raw(base, 4)
    child = tmp_path / "child.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", child, str(4 * 64 * KIB))
    dst = tmp_path / "flat.qcow2"
    flatten(child, dst)
    _assert_flat_copy(qemu, child, dst)
    with Qcow2Image.open(dst) as img:
        assert img.backing_file is None
        assert img.size == 4 * 64 * KIB
        assert struct.unpack(">Q", img.read(0, 8))[0] == 1
        assert struct.unpack(">Q", img.read(2 * 64 * KIB, 8))[0] == 3


def test_flatten_three_layer_chain(qemu, tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    _write_marker_raw(base, 2)
    mid = tmp_path / "mid.qcow2"
    top = tmp_path / "top.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid, str(128 * KIB))
    qemu.img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top, str(128 * KIB))
    dst = tmp_path / "flat.qcow2"
    flatten(top, dst)
    _assert_flat_copy(qemu, top, dst)
    with Qcow2Image.open(dst) as img:
        assert struct.unpack(">Q", img.read(64 * KIB, 8))[0] == 2


def test_flatten_compressed_cluster_works(qemu, tmp_path: Path) -> None:
    """The seed's hand-made compressed L2 entry: flatten must now inflate it, not error."""
    base = tmp_path / "base.raw"
    _write_marker_raw(base, 2)
    child = tmp_path / "child.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", child, str(128 * KIB))
    qemu.write(child, ["write -P 0x11 0 64k"])
    buf = child.read_bytes()
    l1 = struct.unpack_from(">Q", buf, 40)[0]
    l2 = struct.unpack_from(">Q", buf, l1)[0] & ~QCOW_OFLAG_COPIED
    data = struct.unpack_from(">Q", buf, l2)[0] & ~QCOW_OFLAG_COPIED
    c = zlib.compressobj(6, zlib.DEFLATED, -12)
    payload = c.compress(b"\x77" * 64 * KIB) + c.flush()
    shift, _, _ = compressed_geometry(16)
    word = QCOW_OFLAG_COMPRESSED | ((-(-len(payload) // 512) - 1) << shift) | data
    with open(child, "r+b") as f:
        f.seek(data)
        f.write(payload)
        f.seek(l2)
        f.write(struct.pack(">Q", word))
    dst = tmp_path / "flat.qcow2"
    flatten(child, dst)
    _assert_flat_copy(qemu, child, dst)
    with Qcow2Image.open(dst) as img:
        assert img.read(0, 64 * KIB) == b"\x77" * 64 * KIB
        assert struct.unpack(">Q", img.read(64 * KIB, 8))[0] == 2


# -- beyond the seed ---------------------------------------------------------------


def test_zero_cluster_over_base_data_stays_zero(qemu, tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", base, "1M")
    qemu.write(base, ["write -P 0xee 0 1M"])
    child = tmp_path / "child.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", child, "1M")
    qemu.write(child, ["write -z 64k 128k", "discard 512k 64k"])
    dst = tmp_path / "flat.qcow2"
    flatten(child, dst)
    _assert_flat_copy(qemu, child, dst)
    with Qcow2Image.open(dst) as img:
        assert img.read(64 * KIB, 128 * KIB) == bytes(128 * KIB)
        assert img.read(0, 64 * KIB) == b"\xee" * 64 * KIB
    assert qemu.read_raw(dst, tmp_path)[64 * KIB : 192 * KIB] == bytes(128 * KIB)


@pytest.mark.parametrize(
    "case",
    ["raw-base-d4", "qcow2-d8", "c512", "c4k", "c2m", "v2", "extl2", "compressed", "zstd",
     "short-backing", "odd-size"],
)
def test_flatten_matches_qemu(qemu, tmp_path: Path, case: str) -> None:
    rng = random.Random(case)
    size = 4 * MIB

    def layers(n: int, *, base: str = "qcow2", opts: tuple[str, ...] = (),
               cluster: int = 64 * KIB, sz: int = size) -> list[Layer]:
        return [Layer(base if i == 0 else "qcow2", sz, opts if (i or base == "qcow2") else (),
                      random_ops(rng, sz, cluster, 10, zero=bool(i or base == "qcow2"),
                                 discard=bool(i or base == "qcow2")))
                for i in range(n)]

    spec = {
        "raw-base-d4": lambda: layers(4, base="raw"),
        "qcow2-d8": lambda: layers(8),
        "c512": lambda: layers(3, opts=("-o", "cluster_size=512"), cluster=512),
        "c4k": lambda: layers(3, opts=("-o", "cluster_size=4k"), cluster=4096),
        "c2m": lambda: layers(3, opts=("-o", "cluster_size=2M"), cluster=2 * MIB, sz=16 * MIB),
        "v2": lambda: layers(3, opts=("-o", "compat=0.10")),
        "extl2": lambda: layers(3, opts=("-o", "extended_l2=on"), cluster=2 * KIB),
        "compressed": lambda: [Layer("qcow2", size, (), random_ops(rng, size, 64 * KIB, 12,
                                     zero=False, discard=False), compress="zlib"),
                               *layers(2)],
        "zstd": lambda: [Layer("qcow2", size, (), random_ops(rng, size, 64 * KIB, 12,
                               zero=False, discard=False), compress="zstd"), *layers(1)],
        "short-backing": lambda: [*layers(2, sz=1 * MIB), *layers(2, sz=3 * MIB)],
        "odd-size": lambda: [Layer("raw", 3 * MIB + 1536, (), ("write -P 3 0 3146240",)),
                             Layer("qcow2", 5 * MIB + 512, (), ("write -P 4 5242880 512",))],
    }[case]
    if case == "zstd":
        pytest.importorskip("zstandard")
    top = build_chain(qemu, tmp_path, spec())
    dst = tmp_path / "flat.qcow2"
    seen: list[tuple[int, int]] = []
    flatten(top, dst, progress=lambda done, total: seen.append((done, total)))
    _assert_flat_copy(qemu, top, dst)
    assert seen[-1][0] == seen[-1][1] == qemu.info(top)["virtual-size"]
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    # the flat image maps data exactly where the chain reads non-zero clusters
    raw = qemu.read_raw(top, tmp_path)
    for extent in qemu_map(qemu, dst):
        if extent["data"]:
            assert any(raw[extent["start"] : extent["start"] + extent["length"]])


def test_all_zero_clusters_are_left_unallocated(qemu, tmp_path: Path) -> None:
    src = tmp_path / "src.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", src, "4M")
    qemu.write(src, ["write -P 0 0 2M", "write -P 1 3M 4k"])
    dst = tmp_path / "flat.qcow2"
    assert flatten(src, dst) == 64 * KIB
    data = [e for e in qemu_map(qemu, dst) if e["data"]]
    assert [(e["start"], e["length"]) for e in data] == [(3 * MIB, 64 * KIB)]
    _assert_flat_copy(qemu, src, dst)


def test_huge_sparse_disk(qemu, tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", base, "1T")
    qemu.write(base, ["write -P 1 0 64k", "write -P 2 512G 1M", "write -P 3 1023G 64k"])
    top = tmp_path / "top.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, "1T")
    qemu.write(top, ["write -z 512G 64k"])
    dst = tmp_path / "flat.qcow2"
    assert flatten(top, dst) == 64 * KIB + MIB - 64 * KIB + 64 * KIB
    qemu.assert_clean(dst)
    with BackingChain.open(dst) as flat, BackingChain.open(top) as chain:
        for off in (0, 512 * GIB, 512 * GIB + 64 * KIB, 1023 * GIB, 700 * GIB):
            assert flat.read(off, 128 * KIB) == chain.read(off, 128 * KIB)
    assert os.path.getsize(dst) < 4 * MIB


def test_other_output_cluster_size(qemu, tmp_path: Path) -> None:
    rng = random.Random(3)
    top = build_chain(qemu, tmp_path, [Layer("qcow2", 2 * MIB, (), random_ops(rng, 2 * MIB,
                                                                              64 * KIB, 10))])
    dst = tmp_path / "flat.qcow2"
    flatten(top, dst, cluster_size=4096)
    _assert_flat_copy(qemu, top, dst)
    assert qemu.info(dst)["cluster-size"] == 4096
    with pytest.raises(InvalidArgumentError):
        flatten(top, tmp_path / "x.qcow2", cluster_size=3000)


# -- output handling ---------------------------------------------------------------


def test_existing_destination(qemu, tmp_path: Path) -> None:
    src = tmp_path / "src.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", src, "1M")
    qemu.write(src, ["write -P 5 0 4k"])
    dst = tmp_path / "dst.qcow2"
    dst.write_bytes(b"precious")
    with pytest.raises(DiskExistsError):
        flatten(src, dst)
    assert dst.read_bytes() == b"precious"
    flatten(src, dst, overwrite=True)
    _assert_flat_copy(qemu, src, dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst.qcow2", "src.qcow2"]


def test_failure_leaves_nothing_behind(qemu, tmp_path: Path) -> None:
    src = tmp_path / "src.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", src, "1M")
    qemu.write(src, ["write -P 5 0 4k", "write -P 6 512k 4k"])
    buf = src.read_bytes()
    l1 = struct.unpack_from(">Q", buf, 40)[0]
    l2 = struct.unpack_from(">Q", buf, l1)[0] & ~QCOW_OFLAG_COPIED
    with open(src, "r+b") as f:  # the second data cluster now points past the end
        f.seek(l2 + 8 * 8)
        f.write(struct.pack(">Q", (len(buf) // 65536 + 5) * 65536))
    with pytest.raises(CorruptImageError, match="L2 entry 0/8"):
        flatten(src, tmp_path / "dst.qcow2")
    assert [p.name for p in tmp_path.iterdir()] == ["src.qcow2"]


def test_destination_inside_the_chain_is_refused(qemu, tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", base, "1M")
    top = tmp_path / "top.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, "1M")
    with pytest.raises(InvalidArgumentError, match="part of the source chain"):
        flatten(top, base, overwrite=True)


def test_flatten_an_open_chain_leaves_it_open(qemu, tmp_path: Path) -> None:
    src = tmp_path / "src.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", src, "1M")
    with BackingChain.open(src) as chain:
        flatten(chain, tmp_path / "a.qcow2")
        assert not chain.closed
        assert chain.read(0, 1) == b"\0"


# -- convert -----------------------------------------------------------------------


def test_convert_raw_import(qemu, tmp_path: Path) -> None:
    raw = tmp_path / "in.raw"
    with open(raw, "wb") as f:
        f.truncate(8 * MIB)
        f.seek(MIB)
        f.write(os.urandom(300 * KIB))
    dst = tmp_path / "out.qcow2"
    convert(raw, dst, output_format="qcow2", src_format="raw")
    _assert_flat_copy(qemu, raw, dst, src_fmt="raw")


def test_convert_chain_export_is_sparse_raw(qemu, tmp_path: Path) -> None:
    rng = random.Random(9)
    top = build_chain(qemu, tmp_path, [
        Layer("raw", 8 * MIB, (), ("write -P 1 0 1M",)),
        Layer("qcow2", 8 * MIB, (), random_ops(rng, 8 * MIB, 64 * KIB, 10)),
        Layer("qcow2", 8 * MIB, (), ("write -z 0 256k", "write -P 0 4M 1M")),
    ])
    dst = tmp_path / "out.raw"
    written = convert(top, dst, output_format="raw")
    assert dst.read_bytes() == qemu.read_raw(top, tmp_path)
    assert os.path.getsize(dst) == 8 * MIB
    assert os.stat(dst).st_blocks * 512 <= written + 256 * KIB  # holes stay holes
    proc = qemu.img("compare", "-f", "qcow2", "-F", "raw", top, dst, check=False)
    assert proc.returncode == 0


def test_convert_refuses_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError):
        convert(tmp_path / "a", tmp_path / "b", output_format="vmdk")
