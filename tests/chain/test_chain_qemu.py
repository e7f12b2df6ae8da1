"""BackingChain reads and maps every chain QEMU makes exactly as QEMU does.

The contract test (:func:`assert_matches_qemu`) runs over chains of depth 1-8
on raw and qcow2 bases, every cluster size class, v2 images, extended L2,
compressed bases, and backing files shorter than their children.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from boxdisk.chain import BackingChain

from .chains import KIB, MIB, Layer, assert_matches_qemu, build_chain, random_ops

pytestmark = pytest.mark.qemu


def _layers(rng: random.Random, depth: int, base_fmt: str, *, size: int = 4 * MIB,
            cluster: int = 64 * KIB, options: tuple[str, ...] = (), ops: int = 12,
            zero: bool = True) -> list[Layer]:
    layers = []
    for i in range(depth):
        fmt = base_fmt if i == 0 else "qcow2"
        opts = options if fmt == "qcow2" else ()
        granule = cluster if fmt == "qcow2" else 64 * KIB
        layers.append(Layer(fmt, size, opts, random_ops(
            rng, size, granule, ops, zero=zero and fmt == "qcow2", discard=fmt == "qcow2")))
    return layers


@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("depth", range(1, 9))
def test_chain_depths(qemu, tmp_path: Path, depth: int, base_fmt: str) -> None:
    rng = random.Random(depth * 31 + len(base_fmt))
    top = build_chain(qemu, tmp_path, _layers(rng, depth, base_fmt))
    fmt = "raw" if depth == 1 and base_fmt == "raw" else "qcow2"
    assert_matches_qemu(qemu, top, tmp_path, seed=depth, fmt=fmt)


@pytest.mark.parametrize("cluster", [512, 4 * KIB, 64 * KIB, 2 * MIB])
def test_cluster_sizes(qemu, tmp_path: Path, cluster: int) -> None:
    rng = random.Random(cluster)
    size = 16 * MIB if cluster == 2 * MIB else 2 * MIB
    layers = _layers(rng, 3, "qcow2", size=size, cluster=cluster,
                     options=("-o", f"cluster_size={cluster}"))
    top = build_chain(qemu, tmp_path, layers)
    assert_matches_qemu(qemu, top, tmp_path, seed=cluster)


def test_mixed_cluster_sizes(qemu, tmp_path: Path) -> None:
    rng = random.Random(7)
    layers = [
        Layer("qcow2", 4 * MIB, ("-o", "cluster_size=512"), random_ops(rng, 4 * MIB, 512, 20)),
        Layer("qcow2", 4 * MIB, ("-o", "cluster_size=2M"), random_ops(rng, 4 * MIB, 2 * MIB, 3)),
        Layer("qcow2", 4 * MIB, ("-o", "cluster_size=4k"), random_ops(rng, 4 * MIB, 4096, 20)),
    ]
    assert_matches_qemu(qemu, build_chain(qemu, tmp_path, layers), tmp_path)


def test_v2_images(qemu, tmp_path: Path) -> None:
    rng = random.Random(2)
    layers = _layers(rng, 3, "qcow2", options=("-o", "compat=0.10"))
    top = build_chain(qemu, tmp_path, layers)
    assert qemu.info(top)["format-specific"]["data"]["compat"] == "0.10"
    assert_matches_qemu(qemu, top, tmp_path)


@pytest.mark.parametrize("cluster", [16 * KIB, 64 * KIB, 2 * MIB])
def test_extended_l2(qemu, tmp_path: Path, cluster: int) -> None:
    rng = random.Random(cluster + 1)
    size = 8 * MIB
    sub = cluster // 32
    layers = []
    for i in range(3):
        ops = list(random_ops(rng, size, cluster, 8))
        # subcluster-sized writes, zero writes and discards inside clusters
        for _ in range(12):
            off = rng.randrange(0, size // sub) * sub
            verb = rng.choice(["write -P 0x5a", "write -z", "discard", "write -P 0x17"])
            ops.append(f"{verb} {off} {sub * rng.randint(1, 3)}")
        opts = ("-o", f"extended_l2=on,cluster_size={cluster}") if i != 1 else ()
        layers.append(Layer("qcow2", size, opts, tuple(ops)))
    top = build_chain(qemu, tmp_path, layers)
    assert_matches_qemu(qemu, top, tmp_path)


def test_compressed_base(qemu, tmp_path: Path) -> None:
    rng = random.Random(5)
    size = 4 * MIB
    base_ops = (*(f"write -P {rng.randrange(1, 256)} {i * 64 * KIB} {64 * KIB}"
                  for i in range(0, 64, 3)), "write -P 9 4000000 1000")
    layers = [Layer("qcow2", size, (), base_ops, compress="zlib"),
              Layer("qcow2", size, (), random_ops(rng, size, 64 * KIB, 10)),
              Layer("qcow2", size, (), random_ops(rng, size, 64 * KIB, 10))]
    top = build_chain(qemu, tmp_path, layers)
    assert_matches_qemu(qemu, top, tmp_path)


@pytest.mark.parametrize("cluster", [4 * KIB, 64 * KIB, 2 * MIB])
def test_compressed_cluster_sizes(qemu, tmp_path: Path, cluster: int) -> None:
    size = 8 * MIB
    ops = tuple(f"write -P {i + 1} {i * 300 * KIB} {200 * KIB}" for i in range(20))
    layers = [Layer("qcow2", size, ("-o", f"cluster_size={cluster}"), ops, compress="zlib")]
    top = build_chain(qemu, tmp_path, layers)
    assert_matches_qemu(qemu, top, tmp_path)


def test_zstd_base(qemu, tmp_path: Path) -> None:
    ops = tuple(f"write -P {i + 1} {i * 256 * KIB} {100 * KIB}" for i in range(12))
    layers = [Layer("qcow2", 4 * MIB, (), ops, compress="zstd"),
              Layer("qcow2", 4 * MIB, (), ("write -P 3 0 4k", "write -z 1M 64k"))]
    top = build_chain(qemu, tmp_path, layers)
    assert_matches_qemu(qemu, top, tmp_path)


def test_backing_shorter_than_child(qemu, tmp_path: Path) -> None:
    rng = random.Random(11)
    layers = [
        Layer("raw", 1 * MIB + 4096, (), ("write -P 1 0 1052672",)),
        Layer("qcow2", 3 * MIB, (), random_ops(rng, 3 * MIB, 64 * KIB, 6)),
        Layer("qcow2", 2 * MIB, (), random_ops(rng, 2 * MIB, 64 * KIB, 4)),
        Layer("qcow2", 5 * MIB + 512, (), random_ops(rng, 5 * MIB, 64 * KIB, 4)),
    ]
    top = build_chain(qemu, tmp_path, layers)
    assert_matches_qemu(qemu, top, tmp_path)


def test_relative_names_resolve_against_the_naming_image(qemu, tmp_path: Path) -> None:
    (tmp_path / "bases").mkdir()
    (tmp_path / "boxes" / "a").mkdir(parents=True)
    base = tmp_path / "bases" / "base.raw"
    qemu.img("create", "-q", "-f", "raw", base, "1M")
    qemu.write(base, ["write -P 0x42 0 64k"], fmt="raw")
    mid = tmp_path / "bases" / "mid.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid, "1M")
    top = tmp_path / "boxes" / "a" / "disk.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-b", "../../bases/mid.qcow2", "-F", "qcow2",
             top, "1M")
    qemu.write(top, ["write -P 0x43 64k 4k"])
    expected = assert_matches_qemu(qemu, top, tmp_path)
    assert expected[:4] == b"\x42" * 4


@pytest.mark.parametrize("options", [(), ("-o", "extended_l2=on"), ("-o", "cluster_size=4k")],
                         ids=["64k", "extl2", "4k"])
def test_compressed_writes_in_every_layer(qemu, tmp_path: Path, options: tuple[str, ...]) -> None:
    """qemu-io ``write -c`` puts compressed clusters in the middle and top layers too."""
    rng = random.Random(len(options) * 7 + 1)
    cluster = 4 * KIB if "cluster_size=4k" in options else 64 * KIB
    size = 4 * MIB
    layers = [Layer("qcow2", size, options, random_ops(rng, size, cluster, 8, compressed=10))
              for _ in range(3)]
    top = build_chain(qemu, tmp_path, layers)
    mapped = assert_matches_qemu(qemu, top, tmp_path)
    assert any(mapped)


def test_metadata_preallocated_layers_map_as_qemu_does(qemu, tmp_path: Path) -> None:
    """QEMU reports the host holes of a metadata-preallocated image as zero data."""
    base = tmp_path / "base.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", base, "4M")
    qemu.write(base, ["write -P 1 64k 4k", "write -P 2 1M 192k", "write -P 3 4032k 64k"])
    top = tmp_path / "top.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata,extended_l2=on",
             "-b", "base.qcow2",
             "-F", "qcow2", top, "4M")
    qemu.write(top, ["write -P 4 2M 8k", "write -z 1M 64k"])
    assert_matches_qemu(qemu, top, tmp_path)
    assert_matches_qemu(qemu, base, tmp_path)


def test_fifo_as_backing_file_is_refused_without_hanging(qemu, tmp_path: Path) -> None:
    fifo = tmp_path / "base.raw"
    os.mkfifo(fifo)
    top = tmp_path / "top.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-u", "-b", "base.raw", "-F", "raw", top, "1M")
    code = ("import sys\nfrom boxdisk.chain import open_chain\n"
            "from boxdisk._errors import BoxdiskError\n"
            "try:\n    open_chain(sys.argv[1]).close()\nexcept BoxdiskError as e:\n"
            "    print(type(e).__name__)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(top)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.stdout.split() == ["ImageIOError"], proc.stderr


def test_read_into_writes_every_byte(qemu, tmp_path: Path) -> None:
    rng = random.Random(21)
    layers = _layers(rng, 3, "raw", size=2 * MIB)
    top = build_chain(qemu, tmp_path, layers)
    expected = qemu.read_raw(top, tmp_path)
    with BackingChain.open(top) as chain:
        buf = bytearray(b"\xff" * chain.size)
        chain.read_into(0, buf)
        assert buf == expected
        view = memoryview(buf)[4096 : 4096 + 300 * KIB]
        view[:] = b"\xee" * len(view)
        chain.read_into(4096, view)
        assert buf == expected


@pytest.mark.parametrize("size", [1000, 5000, 65536 + 1], ids=["1000", "5000", "64k+1"])
def test_raw_file_not_a_sector_multiple(qemu, tmp_path: Path, size: int) -> None:
    """QEMU rounds a raw file's size up to whole sectors; the tail reads as zeros."""
    base = tmp_path / "base.raw"
    with open(base, "wb") as f:
        f.write(random.Random(size).randbytes(min(size, 1000)))
        f.truncate(size)
    assert_matches_qemu(qemu, base, tmp_path, fmt="raw")
    top = tmp_path / "top.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top, "1M")
    qemu.write(top, ["write -P 7 512 512"])
    assert_matches_qemu(qemu, top, tmp_path)


def test_qcow2_size_not_a_sector_multiple(qemu, tmp_path: Path) -> None:
    """QEMU drops a header size's partial last sector (qcow2_do_open)."""
    path = tmp_path / "odd.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", path, "1M")
    qemu.write(path, ["write -P 3 0 1M"])
    with open(path, "r+b") as f:
        f.seek(24)
        f.write((1024 * 1024 - 300).to_bytes(8, "big"))
    assert qemu.info(path)["virtual-size"] == 1024 * 1024 - 512
    assert_matches_qemu(qemu, path, tmp_path)


def test_internal_snapshots_do_not_change_what_is_read(qemu, tmp_path: Path) -> None:
    """Only the active L1 table counts; snapshot tables (and their shared clusters) do not."""
    rng = random.Random(33)
    top = build_chain(qemu, tmp_path, [Layer("qcow2", 4 * MIB, (), random_ops(
        rng, 4 * MIB, 64 * KIB, 10))])
    qemu.img("snapshot", "-c", "s1", top)
    qemu.write(top, list(random_ops(rng, 4 * MIB, 64 * KIB, 10)))
    qemu.img("snapshot", "-c", "s2", top)
    qemu.write(top, ["write -z 0 1M", "discard 2M 512k"])
    assert len(qemu.info(top)["snapshots"]) == 2
    assert_matches_qemu(qemu, top, tmp_path)
