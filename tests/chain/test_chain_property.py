"""Property: for any sequence of qemu-io operations over a chain, boxdisk reads, maps,
flattens and exports it exactly as QEMU does.

The default run tries a bounded number of chains; ``-m slow`` runs many more.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from boxdisk.ops import convert

from .chains import KIB, Layer, assert_matches_qemu, build_chain

pytestmark = pytest.mark.qemu

SIZE = 1024 * KIB

_OPTIONS: dict[tuple[str, ...], int] = {  # qemu-img -o options -> cluster size
    (): 64 * KIB,
    ("-o", "cluster_size=4k"): 4 * KIB,
    ("-o", "cluster_size=512"): 512,
    ("-o", "extended_l2=on"): 64 * KIB,
    ("-o", "extended_l2=on,cluster_size=16k"): 16 * KIB,
    ("-o", "compat=0.10"): 64 * KIB,
}


@st.composite
def qemu_io_op(draw: st.DrawFn, *, qcow2: bool, size: int) -> str:
    verbs = ["write -P {p}", "write -P {p}", "write -z", "discard"] if qcow2 else ["write -P {p}"]
    verb = draw(st.sampled_from(verbs)).format(p=draw(st.integers(0, 255)))
    sectors = size // 512
    first = draw(st.integers(0, sectors - 1))
    count = draw(st.integers(1, min(300, sectors - first)))
    return f"{verb} {first * 512} {count * 512}"


@st.composite
def compressed_writes(draw: st.DrawFn, *, size: int, cluster: int) -> list[str]:
    """``write -c`` of distinct whole clusters (QEMU compresses only fresh clusters)."""
    clusters = draw(st.lists(st.integers(0, size // cluster - 1), max_size=4, unique=True))
    return [f"write -c -P {draw(st.integers(0, 255))} {c * cluster} {cluster}"
            for c in clusters]


@st.composite
def chains(draw: st.DrawFn) -> list[Layer]:
    depth = draw(st.integers(1, 4))
    base = draw(st.sampled_from(["raw", "qcow2"]))
    layers = []
    for i in range(depth):
        fmt = base if i == 0 else "qcow2"
        opts: tuple[str, ...] = ()
        size = draw(st.sampled_from([SIZE, SIZE // 2, SIZE + 512])) if i < depth - 1 else SIZE
        ops: list[str] = []
        if fmt == "qcow2":
            opts = draw(st.sampled_from(sorted(_OPTIONS)))
            ops += draw(compressed_writes(size=size, cluster=_OPTIONS[opts]))
        ops += draw(st.lists(qemu_io_op(qcow2=fmt == "qcow2", size=size), max_size=6))
        layers.append(Layer(fmt, size, opts, tuple(ops)))
    return layers


def _check(qemu, layers: list[Layer]) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        top = build_chain(qemu, tmp, layers)
        fmt = "raw" if len(layers) == 1 and layers[0].fmt == "raw" else "qcow2"
        expected = assert_matches_qemu(qemu, top, tmp, reads=10, fmt=fmt)
        exported = tmp / "export.raw"
        convert(top, exported, output_format="raw", src_format=fmt)
        assert exported.read_bytes() == expected


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers=chains())
def test_random_chains_match_qemu(qemu, layers: list[Layer]) -> None:
    _check(qemu, layers)


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers=chains())
def test_many_random_chains_match_qemu(qemu, layers: list[Layer]) -> None:
    _check(qemu, layers)
