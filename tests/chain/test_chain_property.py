"""Property: for any sequence of qemu-io operations over a chain, boxdisk reads, maps
and flattens it exactly as QEMU does."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from boxdisk.ops import flatten

from .chains import KIB, Layer, assert_matches_qemu, build_chain

pytestmark = pytest.mark.qemu

SIZE = 1024 * KIB


@st.composite
def qemu_io_op(draw: st.DrawFn, *, qcow2: bool, size: int) -> str:
    verbs = ["write -P {p}", "write -P {p}", "write -z", "discard"] if qcow2 else ["write -P {p}"]
    verb = draw(st.sampled_from(verbs)).format(p=draw(st.integers(0, 255)))
    sectors = size // 512
    first = draw(st.integers(0, sectors - 1))
    count = draw(st.integers(1, min(300, sectors - first)))
    return f"{verb} {first * 512} {count * 512}"


@st.composite
def chains(draw: st.DrawFn) -> list[Layer]:
    depth = draw(st.integers(1, 4))
    base = draw(st.sampled_from(["raw", "qcow2"]))
    layers = []
    for i in range(depth):
        fmt = base if i == 0 else "qcow2"
        opts: tuple[str, ...] = ()
        if fmt == "qcow2":
            opts = draw(st.sampled_from([(), ("-o", "cluster_size=4k"), ("-o", "cluster_size=512"),
                                         ("-o", "extended_l2=on"), ("-o", "compat=0.10")]))
        size = draw(st.sampled_from([SIZE, SIZE // 2, SIZE + 512])) if i < depth - 1 else SIZE
        ops = tuple(draw(st.lists(qemu_io_op(qcow2=fmt == "qcow2", size=size), max_size=6)))
        layers.append(Layer(fmt, size, opts, ops))
    return layers


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers=chains())
def test_random_chains_match_qemu(qemu, layers: list[Layer]) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        top = build_chain(qemu, tmp, layers)
        fmt = "raw" if len(layers) == 1 and layers[0].fmt == "raw" else "qcow2"
        assert_matches_qemu(qemu, top, tmp, reads=10, fmt=fmt)
        dst = tmp / "flat.qcow2"
        flatten(top, dst, src_format=fmt)
        qemu.assert_clean(dst)
        proc = qemu.img("compare", "-f", fmt, "-F", "qcow2", top, dst, check=False)
        assert proc.returncode == 0, proc.stdout
