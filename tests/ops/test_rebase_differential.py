"""Safe rebase against ``qemu-img rebase`` on random chains: the differential contract.

Each seed describes a case (:func:`make_case`): a chain of one to four images
(qcow2 v2 or v3, cluster sizes 512 B to 2 MiB, now and then a raw bottom, v3
lower layers sometimes with extended L2 entries or zstd), each of its own
virtual size (multiples of 512, often not of the cluster size, often a few
sectors either side of another image's end), filled by qemu-io with pattern
writes, zero-pattern writes, ``write -z``, ``write -z -u``, discards and
compressed writes at offsets drawn towards cluster boundaries and the other
images' ends; then a new backing for the top: a lower layer of its chain, a
separately built image or chain (perhaps itself backed by a lower layer), or
none. QEMU builds the chain once; the directory is copied, and the twins are
rebased by boxdisk and by ``qemu-img rebase -b NEW -F FMT``. In half the
cases boxdisk's copy buffer and run-listing window (4 MiB, 256 MiB) are
shrunk to a few clusters, so that small images cross their boundaries.

Judged by QEMU: the guest bytes after boxdisk's rebase are those before it,
and those of QEMU's twin; ``qemu-img check`` finds nothing wrong; the header
names the backing file and format asked for; and boxdisk reads its own result
as QEMU does. A failure names the seed and prints the case as the qemu-img and
qemu-io commands that rebuild it.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import attrs
import pytest

from boxdisk import open_chain, rebase
from boxdisk.ops import _edit
from boxdisk.qcow2 import read_header

pytestmark = pytest.mark.qemu

KIB = 1024
MIB = 1024 * KIB
SECTOR = 512
CLUSTERS = (512, 1 * KIB, 2 * KIB, 4 * KIB, 8 * KIB, 16 * KIB, 32 * KIB, 64 * KIB,
            128 * KIB, 256 * KIB, 512 * KIB, 1 * MIB, 2 * MIB)
REFCOUNT_BITS = (1, 2, 4, 8, 16, 32, 64)
MIN_COMPRESSED_CLUSTER = 4 * KIB  # qemu-io's compressed writes corrupt 512 B-cluster images
MIN_EXTL2_CLUSTER = 16 * KIB  # docs/interop/qcow2.txt, "Extended L2 Entries"


@attrs.frozen
class Spec:
    """One image of a case: how qemu-img creates it and what qemu-io writes into it."""

    name: str
    fmt: str
    size: int
    cluster: int
    options: str = ""
    backing: str | None = None
    backing_fmt: str | None = None
    ops: tuple[str, ...] = ()

    def create_args(self) -> list[str]:
        args = ["create", "-q", "-f", self.fmt]
        if self.options:
            args += ["-o", self.options]
        if self.backing is not None:
            assert self.backing_fmt is not None
            args += ["-b", self.backing, "-F", self.backing_fmt]
        return [*args, self.name, str(self.size)]


@attrs.frozen
class Case:
    """A chain (images in creation order, backing files first) and the rebase to make."""

    seed: int
    images: tuple[Spec, ...]
    top: str
    new: str | None
    new_fmt: str | None
    relative: bool
    #: boxdisk's copy buffer and run-listing window, shrunk from 4 MiB and 256 MiB so
    #: that small images cross their boundaries (None: as shipped).
    chunk: int | None = None
    window: int | None = None

    def script(self) -> str:
        """The shell commands that rebuild the case and rebase it with QEMU."""
        lines = [f"# seed {self.seed}"]
        for spec in self.images:
            lines.append("qemu-img " + " ".join(spec.create_args()))
            if spec.ops:
                cmds = " ".join(f"-c '{c}'" for c in spec.ops)
                lines.append(f"qemu-io -f {spec.fmt} {cmds} {spec.name}")
        if self.new is None:
            lines.append(f"qemu-img rebase -f qcow2 -b '' {self.top}")
        else:
            lines.append(f"qemu-img rebase -f qcow2 -b {self.new} -F {self.new_fmt} {self.top}"
                         f"   # boxdisk: relative={self.relative}")
        if self.chunk is not None:
            lines.append(f"# boxdisk: _CHUNK={self.chunk} _WINDOW={self.window}")
        return "\n".join(lines)


# -- making a case from a seed ------------------------------------------------------------


def _size(rng: random.Random, cluster: int, anchor: int) -> int:
    """A virtual size: a multiple of 512, often unaligned, often a few sectors from ``anchor``."""
    roll = rng.random()
    if roll < 0.45:
        size = anchor + rng.randint(-8, 8) * SECTOR
    elif roll < 0.6:
        size = anchor + rng.randint(-2, 2) * cluster
    else:
        size = rng.randrange(1, rng.choice((256 * KIB, 2 * MIB, 5 * MIB)) // SECTOR + 1) * SECTOR
    if rng.random() < 0.25 and size >= cluster:
        size -= size % cluster
    return max(SECTOR, min(size, 6 * MIB))


def _offset(rng: random.Random, size: int, cluster: int, points: list[int]) -> int:
    roll = rng.random()
    if roll < 0.4 and points:
        off = rng.choice(points) + rng.randint(-6, 4) * SECTOR
    elif roll < 0.7:
        off = rng.randrange(0, -(-size // cluster)) * cluster
    else:
        off = rng.randrange(0, size // SECTOR) * SECTOR
    return max(0, min(off, size - SECTOR))


def _length(rng: random.Random, room: int, cluster: int, *, top: bool) -> int:
    roll = rng.random()
    if roll < (0.6 if top else 0.4):
        n = rng.randint(1, 16) * SECTOR
    elif roll < (0.97 if top else 0.85):
        n = rng.randint(1, 2 if top else 4) * cluster
    else:
        n = room
    return max(SECTOR, min(n, room))


def _ops(rng: random.Random, spec: Spec, points: list[int]) -> tuple[str, ...]:
    size, cluster, top = spec.size, spec.cluster, spec.name.startswith("T.")
    cmds: list[str] = []
    if spec.fmt == "qcow2" and cluster >= MIN_COMPRESSED_CLUSTER and rng.random() < 0.3:
        # QEMU compresses only into clusters the image does not hold yet: these come first.
        whole = size // cluster
        for c in rng.sample(range(whole), min(rng.randint(1, 3), whole)):
            cmds.append(f"write -c -P {rng.randrange(1, 256)} {c * cluster} {cluster}")
    if not top:  # a backing file with something to show through the top's holes
        off = rng.randrange(0, size // SECTOR) * SECTOR
        cmds.append(f"write -P {rng.randrange(1, 256)} {off} {rng.randint(1, size - off)}")
    kinds = (["write"] * 6 + ["zero-data"] + ["zero"] * 2 + ["discard"] * 2
             + ["zero-unmap"] * (spec.fmt == "qcow2"))
    for _ in range(rng.randint(0, 8) if top else rng.randint(2, 12)):
        off = _offset(rng, size, cluster, points)
        n = _length(rng, size - off, cluster, top=top)
        kind = rng.choice(kinds)
        if kind == "write":
            cmds.append(f"write -P {rng.randrange(1, 256)} {off} {n}")
        elif kind == "zero-data":
            cmds.append(f"write -P 0 {off} {n}")
        elif kind == "zero":
            cmds.append(f"write -z {off} {n}")
        elif kind == "zero-unmap":
            cmds.append(f"write -z -u {off} {n}")
        else:
            cmds.append(f"discard {off} {n}")
    return tuple(cmds)


def _options(rng: random.Random, cluster: int, *, top: bool) -> str:
    compat = rng.choice(("0.10", "1.1"))
    opts = [f"compat={compat}", f"cluster_size={cluster}"]
    if compat == "1.1":
        if rng.random() < 0.3:
            opts.append(f"refcount_bits={rng.choice(REFCOUNT_BITS)}")
        if rng.random() < 0.1:
            opts.append("lazy_refcounts=on")
        if not top:  # boxdisk writes no extended-L2 image, but reads them below
            if cluster >= MIN_EXTL2_CLUSTER and rng.random() < 0.2:
                opts.append("extended_l2=on")
            if rng.random() < 0.2:
                opts.append("compression_type=zstd")
    return ",".join(opts)


def make_case(seed: int) -> Case:
    """The case a seed names (deterministic: the same seed, the same commands)."""
    rng = random.Random(seed)
    top_cluster = rng.choice(CLUSTERS)

    def cluster() -> int:
        return top_cluster if rng.random() < 0.5 else rng.choice(CLUSTERS)

    depth = rng.randint(1, 4)  # images in the top's chain, the top included
    lower = [f"L{i}" for i in range(depth - 1)]
    # a new backing that could read as the old one does (the top's own backing, or none
    # under a top that has none) leaves nothing to copy: rarely worth a case
    mode = rng.choice(["none"] * (2 if lower else rng.random() < 0.1)
                      + ["lower"] * 3 * (len(lower) >= 2) + ["separate"] * 3)
    separate = [f"N{i}" for i in range(rng.randint(1, 2))] if mode == "separate" else []
    anchor = rng.randrange(1, 4 * MIB // SECTOR) * SECTOR

    # geometry first, so every image's writes can aim at the others' ends
    geometry: dict[str, tuple[int, int]] = {}
    for name in [*lower, *separate, "T"]:
        c = top_cluster if name == "T" else cluster()
        geometry[name] = (c, _size(rng, c, anchor))
    points = sorted({s for _, s in geometry.values()})

    specs: list[Spec] = []
    fmts: dict[str, str] = {}

    def add(name: str, backing: str | None) -> None:
        c, size = geometry[name]
        raw = backing is None and name != "T" and rng.random() < 0.1
        fmt = "raw" if raw else "qcow2"
        fname = f"{name}.{fmt}"
        fmts[name] = fname
        spec = Spec(name=fname, fmt=fmt, size=size, cluster=c,
                    options="" if raw else _options(rng, c, top=name == "T"),
                    backing=None if backing is None else fmts[backing],
                    backing_fmt=None if backing is None else fmts[backing].rsplit(".", 1)[1])
        specs.append(attrs.evolve(spec, ops=_ops(rng, spec, points)))

    for i, name in enumerate(lower):
        add(name, lower[i - 1] if i else None)
    if separate:
        # the separate chain may stand on one of the top's lower layers
        base = rng.choice([None, None, *lower])
        for i, name in enumerate(separate):
            add(name, separate[i - 1] if i else base)
    add("T", lower[-1] if lower else None)

    new: str | None = None
    if mode == "lower":
        new = fmts[rng.choice(lower[:-1])]
    elif mode == "separate":
        new = fmts[separate[-1]]
    shrink = rng.random() < 0.5
    return Case(seed=seed, images=tuple(specs), top=fmts["T"], new=new,
                new_fmt=None if new is None else new.rsplit(".", 1)[1],
                relative=rng.random() < 0.8,
                chunk=top_cluster * rng.randint(1, 3) if shrink else None,
                window=max(top_cluster, 64 * KIB) * rng.randint(1, 4) if shrink else None)


# -- running one -----------------------------------------------------------------------------


def _build(qemu: Any, directory: Path, case: Case) -> None:
    for spec in case.images:  # backing names are relative to the image's directory
        args = spec.create_args()
        qemu.img(*args[:-2], directory / spec.name, args[-1])
        if spec.ops:
            qemu.write(directory / spec.name, spec.ops, fmt=spec.fmt)


def _first_difference(a: bytes, b: bytes) -> str:
    if len(a) != len(b):
        return f"sizes {len(a)} and {len(b)}"
    at = next(i for i in range(len(a)) if a[i] != b[i])
    at -= at % SECTOR
    return (f"first differing sector at {at} (0x{at:x}): "
            f"{a[at:at + 16].hex()} vs {b[at:at + 16].hex()}")


def _assert_same(what: str, a: bytes, b: bytes, case: Case) -> None:
    if a != b:
        msg = f"seed {case.seed}: {what}: {_first_difference(a, b)}\n{case.script()}"
        raise AssertionError(msg)


def qemu_gets_it_wrong(case: Case) -> bool:
    """Whether the oracle's own rebase is known to change this case's guest view.

    qemu-img 7.2 rebasing a v2 image that has no backing file yet leaves the
    clusters it must keep reading as zeros unallocated (``qemu-img map`` shows
    them reaching the new backing afterwards): its zero writes, on a v2 image
    with nothing below, need not allocate anything. Such cases are judged
    against the view before the rebase alone.
    """
    top = next(s for s in case.images if s.name == case.top)
    return top.backing is None and case.new is not None and "compat=0.10" in top.options


def check_case(qemu: Any, tmp: Path, seed: int) -> None:
    """Build the seed's case, rebase twins with boxdisk and QEMU, judge boxdisk's result."""
    case = make_case(seed)
    box, twin = tmp / "box", tmp / "qemu"
    box.mkdir()
    _build(qemu, box, case)
    shutil.copytree(box, twin)
    top, qemu_top = box / case.top, twin / case.top
    before = qemu.read_raw(top, tmp)

    new = None if case.new is None else box / case.new
    with pytest.MonkeyPatch.context() as mp:
        if case.chunk is not None:
            mp.setattr(_edit, "_CHUNK", case.chunk)
            mp.setattr(_edit, "_WINDOW", case.window)
        rebase(top, new, backing_format=case.new_fmt, relative=case.relative)
    if case.new is None:
        qemu.img("rebase", "-q", "-f", "qcow2", "-b", "", qemu_top)
    else:
        name = case.new if case.relative else os.fspath(twin / case.new)
        qemu.img("rebase", "-q", "-f", "qcow2", "-b", name, "-F", case.new_fmt, qemu_top)

    header = read_header(top)
    want = None
    if new is not None:
        want = case.new if case.relative else os.path.realpath(new)
    assert (header.backing_file, header.backing_format) == (want, case.new_fmt), (
        f"seed {case.seed}: header names {header.backing_file!r} ({header.backing_format})"
        f"\n{case.script()}")
    if case.relative or case.new is None:  # QEMU stores the name as given
        theirs_header = read_header(qemu_top)
        assert (theirs_header.backing_file, theirs_header.backing_format) == (
            want, case.new_fmt), f"seed {case.seed}: QEMU's twin names another backing"
    after, theirs = qemu.read_raw(top, tmp), qemu.read_raw(qemu_top, tmp)
    _assert_same("boxdisk's rebase changed the guest view", after, before, case)
    if not qemu_gets_it_wrong(case):
        _assert_same("QEMU's own rebase changed the guest view", theirs, before, case)
        _assert_same("boxdisk's and QEMU's rebased twins differ", after, theirs, case)
    report = qemu.check(top)
    bad = {k: report.get(k, 0) for k in ("corruptions", "leaks", "check-errors")}
    assert not any(bad.values()), f"seed {case.seed}: qemu-img check {report}\n{case.script()}"
    with open_chain(top) as chain:
        own = chain.read(0, chain.size)
    _assert_same("boxdisk reads its result unlike QEMU", own, after, case)


DEFAULT_SEEDS = range(40)


@pytest.mark.parametrize("seed", DEFAULT_SEEDS, ids=lambda s: f"seed={s}")
def test_safe_rebase_matches_qemu(qemu: Any, tmp_path: Path, seed: int) -> None:
    check_case(qemu, tmp_path, seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1000, 1300), ids=lambda s: f"seed={s}")
def test_safe_rebase_matches_qemu_many_seeds(qemu: Any, tmp_path: Path, seed: int) -> None:
    check_case(qemu, tmp_path, seed)


def test_cases_cover_the_space() -> None:
    """The default seeds reach each kind of new backing, both versions, small and 2 MiB clusters."""
    cases = [make_case(seed) for seed in DEFAULT_SEEDS]
    modes = {"none" if c.new is None else c.new[0] for c in cases}
    assert modes == {"none", "L", "N"}
    tops = [next(s for s in c.images if s.name == c.top) for c in cases]
    assert {o for s in tops for o in s.options.split(",") if o.startswith("compat=")} == {
        "compat=0.10", "compat=1.1"}
    clusters = {s.cluster for c in cases for s in c.images}
    assert {512, 2 * MIB} <= clusters
    assert {c.chunk is None for c in cases} == {True, False}
    assert sum(map(qemu_gets_it_wrong, cases)) < len(cases) // 4  # the oracle judges most


def test_v2_top_without_backing_keeps_its_zeros(qemu: Any, tmp_path: Path) -> None:
    """The case :func:`qemu_gets_it_wrong` exempts, judged by the view before the rebase.

    A v2 image has no zero flag: where it reads zeros only because it has no
    backing file, the rebase must write zero data before naming one.
    """
    new, top = tmp_path / "N.qcow2", tmp_path / "T.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", new, "1M")
    qemu.write(new, ["write -P 0x7e 0 1M"])
    qemu.img("create", "-q", "-f", "qcow2", "-o", "compat=0.10,cluster_size=2048", top, "2M")
    qemu.write(top, ["write -P 0x11 4096 512"])
    before = qemu.read_raw(top, tmp_path)
    rebase(top, new, backing_format="qcow2", relative=True)
    assert read_header(top).backing_file == "N.qcow2"
    assert qemu.read_raw(top, tmp_path) == before
    qemu.assert_clean(top)
