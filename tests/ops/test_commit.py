"""commit against ``qemu-img commit`` on twin copies of the same QEMU-made chains.

Each chain is built once and copied; QEMU commits one copy, boxdisk the other.
Afterwards QEMU must see the same guest bytes through the two bases and the
two tops, every image must pass ``qemu-img check``, and the top's guest view
must be what it was before.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from boxdisk import BackingChainError, commit

from ..chain.chains import KIB, MIB, Layer, build_chain, random_ops
from ..engine.helpers import assert_clean, assert_same_view

pytestmark = pytest.mark.qemu


def _twins(qemu: Any, tmp: Path, layers: list[Layer]) -> tuple[Path, Path, Path]:
    """The chain in ``tmp/box`` and a copy in ``tmp/qemu``; returns (box top, qemu top,
    a pristine copy's top)."""
    box = tmp / "box"
    box.mkdir()
    top = build_chain(qemu, box, layers)
    shutil.copytree(box, tmp / "qemu")
    shutil.copytree(box, tmp / "before")
    return top, tmp / "qemu" / top.name, tmp / "before" / top.name


def _image(top: Path, depth: int, layers: list[Layer]) -> Path:
    """The path of the image ``depth`` levels under ``top`` (0: top) in a twin directory."""
    index = len(layers) - 1 - depth
    return top.parent / f"img{index}.{layers[index].fmt}"


def _check_twins(qemu: Any, box_top: Path, qemu_top: Path, before_top: Path,
                 layers: list[Layer], base_depth: int) -> None:
    base_fmt = layers[len(layers) - 1 - base_depth].fmt
    box_base = _image(box_top, base_depth, layers)
    qemu_base = _image(qemu_top, base_depth, layers)
    assert_same_view(qemu, box_base, qemu_base, base_fmt, base_fmt)
    assert_same_view(qemu, box_top, qemu_top)
    assert_same_view(qemu, box_top, before_top)
    for depth, layer in enumerate(reversed(layers)):
        if layer.fmt == "qcow2":
            assert_clean(qemu, _image(box_top, depth, layers))


def _top_allocation(qemu: Any, top: Path) -> list[Any]:
    return [e for e in json.loads(qemu.img("map", "--output=json", top).stdout)
            if e["depth"] == 0 and e["present"]]


def _layers(seed: int, *, cluster: int = 64 * KIB, sizes: tuple[int, ...] = (4 * MIB, 4 * MIB),
            base_fmt: str = "qcow2", compat: str = "1.1",
            compressed: int = 0) -> list[Layer]:
    rng = random.Random(seed)
    layers = []
    for i, size in enumerate(sizes):
        fmt = base_fmt if i == 0 else "qcow2"
        options = () if fmt == "raw" else ("-o", f"cluster_size={cluster},compat={compat}")
        ops = random_ops(rng, size, cluster, 25, zero=fmt == "qcow2",
                         discard=fmt == "qcow2", compressed=compressed if i else 0)
        layers.append(Layer(fmt=fmt, size=size, options=options, ops=ops))
    return layers


CASES = {
    "qcow2-base": _layers(1),
    "raw-base": _layers(2, base_fmt="raw"),
    "v2-images": _layers(3, compat="0.10"),
    "small-clusters": _layers(4, cluster=4 * KIB),
    "compressed-top": _layers(5, compressed=6),
    "top-larger-than-base": _layers(6, sizes=(2 * MIB, 5 * MIB)),
    "raw-base-top-larger": _layers(7, base_fmt="raw", sizes=(2 * MIB + 4096, 5 * MIB)),
    "top-smaller-than-base": _layers(8, sizes=(6 * MIB, 3 * MIB)),
    # The base's own backing file reaches past the base's end: growing the base
    # must zero what it would otherwise show.
    "base-backing-longer": _layers(9, sizes=(6 * MIB, 2 * MIB, 6 * MIB)),
}


@pytest.mark.parametrize("case", CASES)
def test_commit_into_the_backing_file(qemu: Any, tmp_path: Path, case: str) -> None:
    layers = CASES[case]
    box_top, qemu_top, before_top = _twins(qemu, tmp_path, layers)
    seen = []
    commit(box_top, progress=lambda done, total: seen.append((done, total)))
    qemu.img("commit", "-q", "-f", "qcow2", qemu_top)
    _check_twins(qemu, box_top, qemu_top, before_top, layers, base_depth=1)
    assert _top_allocation(qemu, box_top) == []  # emptied, as QEMU empties it
    assert _top_allocation(qemu, qemu_top) == []
    assert seen and seen[-1][0] == seen[-1][1]


def test_commit_keep_top(qemu: Any, tmp_path: Path) -> None:
    layers = _layers(11)
    box_top, qemu_top, before_top = _twins(qemu, tmp_path, layers)
    commit(box_top, keep_top=True)
    qemu.img("commit", "-q", "-d", "-f", "qcow2", qemu_top)
    _check_twins(qemu, box_top, qemu_top, before_top, layers, base_depth=1)
    assert box_top.read_bytes() == before_top.read_bytes()


@pytest.mark.parametrize("sizes", [(4 * MIB, 4 * MIB, 4 * MIB),
                                   # a shorter middle image: the top reads zeros past
                                   # its end, and so must the base afterwards
                                   (4 * MIB, 2 * MIB, 5 * MIB)])
def test_commit_to_a_deeper_base(qemu: Any, tmp_path: Path, sizes: tuple[int, ...]) -> None:
    layers = _layers(12, sizes=sizes)
    box_top, qemu_top, before_top = _twins(qemu, tmp_path, layers)
    commit(box_top, base=_image(box_top, 2, layers))
    qemu.img("commit", "-q", "-f", "qcow2", "-b", _image(qemu_top, 2, layers).name, qemu_top)
    _check_twins(qemu, box_top, qemu_top, before_top, layers, base_depth=2)
    # qemu-img commit -b implies -d: the top is left as it was.
    assert box_top.read_bytes() == before_top.read_bytes()


def test_commit_explicit_immediate_base_empties_the_top(qemu: Any, tmp_path: Path) -> None:
    layers = _layers(13)
    box_top, qemu_top, before_top = _twins(qemu, tmp_path, layers)
    commit(box_top, base=_image(box_top, 1, layers))
    qemu.img("commit", "-q", "-f", "qcow2", qemu_top)
    _check_twins(qemu, box_top, qemu_top, before_top, layers, base_depth=1)
    assert _top_allocation(qemu, box_top) == []


def test_commit_twice_is_harmless(qemu: Any, tmp_path: Path) -> None:
    layers = _layers(14)
    box_top, qemu_top, before_top = _twins(qemu, tmp_path, layers)
    commit(box_top)
    commit(box_top)  # e.g. re-run after a crash: nothing left to copy
    qemu.img("commit", "-q", "-f", "qcow2", qemu_top)
    _check_twins(qemu, box_top, qemu_top, before_top, layers, base_depth=1)


def test_commit_errors(qemu: Any, tmp_path: Path) -> None:
    layers = _layers(15)
    box_top, _, _ = _twins(qemu, tmp_path, layers)
    alone = box_top.parent / "img0.qcow2"
    with pytest.raises(BackingChainError):
        commit(alone)  # no backing file
    with pytest.raises(BackingChainError):
        commit(box_top, base=tmp_path / "qemu" / "img0.qcow2")  # not in the chain
    assert_same_view(qemu, box_top, tmp_path / "before" / box_top.name)
