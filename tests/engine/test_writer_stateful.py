"""Random writes, zero writes and discards through a writable chain, judged by QEMU.

A hypothesis state machine drives ``open_chain(top, writable=True)`` over a
QEMU-made chain (a raw or qcow2 base under a qcow2 top) and mirrors every
operation into a ``bytearray`` model of the guest's disk. Every few steps, and
at the end, the image is flushed and QEMU judges it: ``qemu-img check``
reports no corruption and no leak, and ``qemu-img compare`` and
``qemu-io read -P`` read exactly the model. Cluster sizes from 512 B to 2 MiB,
v2 and v3 tops; the base is shorter than the top, so the top's tail reads
zeros from the start.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from boxdisk.chain import BackingChain, open_chain

from .helpers import KIB, MIB, assert_clean, assert_qemu_reads, create, discarded, pattern

pytestmark = pytest.mark.qemu

_SCALE = 1 << 20
#: Guest clusters of the top, per cluster size (the disk is a little longer: a partial
#: last cluster).
_CLUSTERS = {512: 300, 4 * KIB: 64, 64 * KIB: 24, 2 * MIB: 6}
_CHECK_EVERY = 6

CONFIGS = [
    (cs, compat, base)
    for cs in (512, 4 * KIB, 64 * KIB, 2 * MIB)
    for compat in ("0.10", "1.1")
    for base in ("raw", "qcow2")
]


def _offsets() -> st.SearchStrategy[tuple[int, bool]]:
    return st.tuples(st.integers(0, _SCALE - 1), st.booleans())


class WriterMachine(RuleBasedStateMachine):
    """One chain, one model; subclasses fix the geometry and QEMU."""

    qemu: ClassVar[Any]
    root: ClassVar[Path]
    cluster: ClassVar[int]
    compat: ClassVar[str]
    base_kind: ClassVar[str]

    def __init__(self) -> None:
        super().__init__()
        cs = self.cluster
        self.size = size = cs * _CLUSTERS[cs] + 1536
        self.v3 = self.compat == "1.1"
        self.dir = Path(tempfile.mkdtemp(dir=self.root))
        base_size = size * 3 // 4 // 512 * 512
        if self.base_kind == "raw":
            base = self.dir / "base.raw"
            below = bytearray(pattern(cs, base_size))
            below[cs : 3 * cs] = bytes(2 * cs)  # a stretch of zeros
            base.write_bytes(below)
        else:
            base = create(self.qemu, self.dir / "base.qcow2", base_size, cluster=cs)
            self.qemu.write(base, [f"write -P 0x5a 0 {base_size // 2}",
                                   f"write -P 0xa5 {base_size // 2} {cs}",
                                   f"write -z {cs} {cs}"])
            below = bytearray(base_size)
            below[: base_size // 2] = b"\x5a" * (base_size // 2)
            below[base_size // 2 : base_size // 2 + cs] = b"\xa5" * cs
            below[cs : 2 * cs] = bytes(cs)
        self.below = bytes(below) + bytes(size - base_size)
        self.top = create(self.qemu, self.dir / "top.qcow2", size, cluster=cs, backing=base,
                          backing_fmt=self.base_kind, compat=self.compat)
        self.model = bytearray(self.below)
        self.chain: BackingChain = open_chain(self.top, writable=True)
        self.steps = 0

    def _range(self, where: tuple[int, bool], scaled: int) -> tuple[int, int]:
        frac, aligned = where
        cs = self.cluster
        offset = frac * self.size // _SCALE
        if aligned:
            offset -= offset % cs
        length = 1 + scaled * 3 * cs // _SCALE
        if aligned:
            length = -(-length // cs) * cs
        return offset, max(1, min(length, self.size - offset))

    def _agree_on(self, offset: int, length: int) -> None:
        assert self.chain.read(offset, length) == self.model[offset : offset + length]

    @rule(where=_offsets(), scaled=st.integers(0, _SCALE - 1), seed=st.integers(0, 2**32))
    def write(self, where: tuple[int, bool], scaled: int, seed: int) -> None:
        offset, length = self._range(where, scaled)
        data = pattern(seed, length)
        self.chain.write(offset, data)
        self.model[offset : offset + length] = data
        self._agree_on(offset, length)

    @rule(where=_offsets(), scaled=st.integers(0, _SCALE - 1))
    def write_zeroes(self, where: tuple[int, bool], scaled: int) -> None:
        offset, length = self._range(where, scaled)
        self.chain.write_zeroes(offset, length)
        self.model[offset : offset + length] = bytes(length)
        self._agree_on(offset, length)

    @rule(where=_offsets(), scaled=st.integers(0, _SCALE - 1))
    def discard(self, where: tuple[int, bool], scaled: int) -> None:
        offset, length = self._range(where, scaled)
        self.chain.discard(offset, length)
        discarded(self.model, self.below, offset, length, self.cluster, self.v3)
        self._agree_on(offset, length)

    @rule()
    def flush(self) -> None:
        self.chain.flush()

    @rule()
    def reopen(self) -> None:
        self.chain.close()
        self.chain = open_chain(self.top, writable=True)

    def _judge(self) -> None:
        self.chain.flush()
        assert_clean(self.qemu, self.top)
        assert_qemu_reads(self.qemu, self.top, self.model, self.dir)
        assert self.chain.read(0, self.size) == self.model

    @invariant()
    def qemu_agrees(self) -> None:
        self.steps += 1
        if self.steps % _CHECK_EVERY == 0:
            self._judge()

    def teardown(self) -> None:
        try:
            if not self.chain.closed:
                self._judge()
        finally:
            self.chain.close()
            shutil.rmtree(self.dir, ignore_errors=True)


def _run(qemu: Any, root: Path, config: tuple[int, str, str], examples: int,
         steps: int) -> None:
    cs, compat, base = config
    machine = type(f"Machine_{cs}_{compat}_{base}", (WriterMachine,),
                   {"qemu": qemu, "root": root, "cluster": cs, "compat": compat,
                    "base_kind": base})
    run_state_machine_as_test(
        machine,
        settings=settings(max_examples=examples, stateful_step_count=steps, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.filter_too_much]),
    )


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_writes_match_model_and_qemu(qemu: Any, tmp_path: Path,
                                     config: tuple[int, str, str]) -> None:
    _run(qemu, tmp_path, config, examples=5, steps=24)


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_writes_match_model_and_qemu_long(qemu: Any, tmp_path: Path,
                                          config: tuple[int, str, str]) -> None:
    _run(qemu, tmp_path, config, examples=40, steps=80)
