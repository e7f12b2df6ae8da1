"""BackingChain reads and maps every chain QEMU makes exactly as QEMU does.

The contract test (:func:`assert_matches_qemu`) runs over chains of depth 1-8
on raw and qcow2 bases, every cluster size class, v2 images, extended L2,
compressed bases, and backing files shorter than their children.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

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
    pytest.importorskip("zstandard")
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
