"""Every read path, byte for byte against the guest bytes QEMU exports.

Each scenario is a chain QEMU builds (qemu-img, qemu-io) so that one read
path is sure to be taken: compressed clusters (zlib, zstd, a partial last
cluster), zero clusters (plain, preallocated, unmapped), v2 images,
unallocated clusters falling through one to three layers, extended L2 entries
with allocated, zero and unallocated subclusters in one cluster, backing files
shorter than their children (made so, or shrunk so that their last cluster
holds bytes past their end), a raw base whose file ends inside a sector, every
cluster size class and four-layer chains.

Over each, ``BackingChain.read`` and ``read_into`` (into ``bytearray``,
``mmap``, ``memoryview`` and ``array`` targets full of 0xff garbage, with guard
bytes around slices), a chain opened for writing, and ``Qcow2Image.read`` /
``RawImage.read`` of each file alone return what ``qemu-img convert -O raw``
writes: for ranges at and across cluster, subcluster, extent and layer
boundaries, inside one cluster or subcluster (the short path), over long zero
stretches (the ``memset`` path), ending exactly at the virtual size, of length
0, 1, 4096 and odd lengths, with the default L2 cache and with two tables.
Ranges outside ``[0, size]`` raise :class:`InvalidArgumentError`, and so does
a buffer ``read_into`` cannot write.
"""

from __future__ import annotations

import json
import mmap
import random
import shutil
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from boxdisk import InvalidArgumentError, Qcow2Image, RawImage, open_chain
from boxdisk.chain import BackingChain
from boxdisk.image import Image, RunKind

from .chains import KIB, MIB, Layer, build_chain, qemu_export

pytestmark = pytest.mark.qemu

_GARBAGE = 0xFF
#: Guard bytes either side of a memoryview target: a read that strays out of
#: its buffer overwrites them.
_GUARD = 13
#: Zero stretches at least this long take ``_fill_zeros``'s memset branch.
_MEMSET_MIN = 64 * KIB

_UNALLOC, _ZERO, _DATA, _COMPRESSED = (RunKind.UNALLOCATED, RunKind.ZERO, RunKind.DATA,
                                       RunKind.COMPRESSED)

# -- building the chains ------------------------------------------------------------


def noise(directory: Path, seed: int) -> str:
    """``-s FILE`` for qemu-io: a prime-length pattern of a few byte values.

    The pattern varies byte by byte (a read from the wrong offset shows) yet
    compresses well even in 512-byte clusters (``write -c`` then really
    compresses), and never holds 0xff, the garbage targets are filled with.
    """
    path = directory / f"noise{seed}.bin"
    if not path.exists():
        rng = random.Random(seed)
        alphabet = [0, *rng.sample(range(1, 255), 5)]
        length = (4093, 5003, 6007, 7919, 3571, 2039)[seed % 6]
        path.write_bytes(bytes(rng.choice(alphabet) for _ in range(length)))
    return f"-s {path}"


def mixed_ops(rng: random.Random, src: str, size: int, cluster: int, count: int, *,
              zero: bool = True, discard: bool = True) -> list[str]:
    """Whole-cluster and sector-granular writes of ``src``, zero writes and discards."""
    cmds = []
    verbs = ["write"] * 3 + ["partial"] * 3 + ["zero"] * zero + ["unmap"] * zero
    verbs += ["discard"] * discard
    for _ in range(count):
        verb = rng.choice(verbs)
        if verb == "partial":
            off = rng.randrange(size // 512) * 512
            length = min(rng.randrange(1, 24) * 512, size - off)
        else:
            first = rng.randrange(max(1, size // cluster))
            off = first * cluster
            length = min(rng.randint(1, max(1, min(6, size // cluster // 8))) * cluster,
                         size - off)
        cmd = {"write": f"write {src}", "partial": f"write {src}", "zero": "write -z",
               "unmap": "write -z -u", "discard": "discard"}[verb]
        cmds.append(f"{cmd} {off} {length}")
    return cmds


def _zlib(d: Path) -> list[Layer]:
    s0, s1 = noise(d, 1), noise(d, 2)
    size = 4 * MIB
    base = [f"write {s0} {i * 64 * KIB} {64 * KIB}" for i in range(0, 64, 3)]
    base += [f"write {s0} 1000000 300000", f"write {s1} 4000000 1000"]
    top = [f"write {s1} 10000 5000", f"write {s1} {196 * KIB} 512", "write -z 1M 128k",
           f"write {s1} 3M 64k", f"write {s1} {3 * MIB + 70 * KIB} 33"]
    return [Layer("qcow2", size, (), tuple(base), compress="zlib"),
            Layer("qcow2", size, (), tuple(top))]


def _zstd(d: Path) -> list[Layer]:
    s0, s1 = noise(d, 3), noise(d, 4)
    size = 2 * MIB + 1536  # the last cluster is partial, and compressed
    opts = ("-o", "cluster_size=4k")
    base = [f"write {s0} {i * 20 * KIB} {12 * KIB}" for i in range(100)]
    base.append(f"write {s0} {size - 6000} 6000")
    top = [f"write -c {s1} {64 * KIB} {4 * KIB}", f"write -c {s1} {size - 1536} 1536",
           f"write {s1} 5000 100", "write -z 100k 200k", f"write {s1} 1M 12k"]
    return [Layer("qcow2", size, opts, tuple(base), compress="zstd"),
            Layer("qcow2", size, ("-o", "cluster_size=4k,compression_type=zstd"),
                  tuple(top))]


def _zero_v3(d: Path) -> list[Layer]:
    s0, s1 = noise(d, 5), noise(d, 6)
    size = 4 * MIB
    top = [
        "write -z 64k 128k",  # unallocated -> zero flag, no host cluster
        f"write {s1} 1M 256k", "write -z 1M 128k",  # preallocated zero clusters
        f"write {s1} 2M 64k", "write -z -u 2M 64k",  # zero, unmapped
        "write -z 2560k 1M",  # a zero stretch far longer than the memset threshold
        f"write {s1} 3700k 4k", "write -z 3000 5000",  # partial: written as zero data
    ]
    return [Layer("qcow2", size, (), (f"write {s0} 0 {size}",)),
            Layer("qcow2", size, (), tuple(top))]


def _v2(d: Path) -> list[Layer]:
    rng = random.Random(22)
    size = 4 * MIB
    opts = ("-o", "compat=0.10")
    return [Layer("qcow2", size, opts, (f"write {noise(d, 7)} 0 3M",)),
            *(Layer("qcow2", size, opts, tuple(mixed_ops(rng, noise(d, 8 + i), size,
                                                         64 * KIB, 14)))
              for i in range(2))]


def _unallocated(d: Path) -> list[Layer]:
    """Four layers, each with a few stretches: most bytes fall through 1-3 layers."""
    size = 4 * MIB
    layers = []
    for depth in range(4):
        src = noise(d, 10 + depth)
        ops = [f"write {src} {(depth * 5 + k * 17) % 60 * 64 * KIB} {64 * KIB * (1 + k % 2)}"
               for k in range(4)]
        ops.append(f"write {src} {depth * MIB + 12345 // 512 * 512} 1536")
        layers.append(Layer("qcow2", size, (), tuple(ops)))
    return layers


def _extl2(d: Path) -> list[Layer]:
    """Extended L2 over data: clusters that mix data, zero and unallocated subclusters."""
    size = 4 * MIB
    s1, s2 = noise(d, 15), noise(d, 16)
    mid = [f"write -c {s1} 192k 64k"]  # compressed, in an extended-L2 image
    for c in range(0, 60, 4):  # subclusters of 2 KiB
        at = c * 64 * KIB
        mid += [f"write {s1} {at + 1000} 700", f"write -z {at + 6144} 2048",
                f"write -z {at + 3000} 100", f"write {s1} {at + 20 * KIB} 6k"]
    mid += ["discard 1M 4k", "write -z -u 2M 4k", "write -z 3M 200k"]
    top = []
    for c in range(1, 120, 7):  # subclusters of 1 KiB
        at = c * 32 * KIB
        top += [f"write {s2} {at + 512} 512", f"write -z {at + 8 * KIB} 1024",
                f"write {s2} {at + 30 * KIB} 3000"]
    return [Layer("qcow2", size, (), (f"write {noise(d, 14)} 0 {size}",)),
            Layer("qcow2", size, ("-o", "extended_l2=on"), tuple(mid)),
            Layer("qcow2", size, ("-o", "extended_l2=on,cluster_size=32k"), tuple(top))]


def _short_backing(d: Path) -> list[Layer]:
    s0, s1, s2 = noise(d, 17), noise(d, 18), noise(d, 19)
    base_size, mid_size, size = MIB + 1536, 2 * MIB + 512, 4 * MIB
    return [
        Layer("qcow2", base_size, (), (f"write {s0} 0 {base_size}",)),
        Layer("qcow2", mid_size, ("-o", "cluster_size=4k"),
              (f"write {s1} {MIB - 4096} 2048", f"write {s1} {mid_size - 1024} 1024")),
        Layer("qcow2", size, (),  # partial writes copy up across the backing's end
              (f"write {s2} {MIB + 1024} 1024", f"write {s2} {2 * MIB + 100 * KIB} 512",
               f"write {s2} {3 * MIB} 1536")),
    ]


def _shrunk_backing(d: Path) -> list[Layer]:
    """Backing files shrunk after writing (see ``Scenario.shrink``): their last cluster
    keeps data past the new end, which must read as zeros through the child."""
    s0, s1, s2 = noise(d, 34), noise(d, 35), noise(d, 36)
    size = 4 * MIB
    return [
        Layer("qcow2", 2 * MIB, (), (f"write {s0} 0 2M",)),
        Layer("qcow2", 3 * MIB, ("-o", "extended_l2=on,cluster_size=32k"),
              (f"write {s1} {MIB - 4096} 2048", f"write {s1} {2 * MIB - 8 * KIB} 40k",
               f"write {s1} {MIB + 1536} 3k")),
        Layer("qcow2", size, (),
              (f"write {s2} {MIB + 1024} 1024", f"write {s2} {2 * MIB + 100 * KIB} 512")),
    ]


def _raw_base(d: Path) -> list[Layer]:
    s0, s1 = noise(d, 20), noise(d, 21)
    base_size = MIB + 1024  # the file is cut to MIB + 1000 after: QEMU reads 24 zeros
    return [Layer("raw", base_size, (), (f"write {s0} 4096 {base_size - 4096}",)),
            Layer("qcow2", 2 * MIB, ("-o", "cluster_size=4k"),
                  (f"write {s1} {MIB - 512} 1024", f"write {s1} 64k 4k",
                   "write -z 200k 100k"))]


def _raw_alone(d: Path) -> list[Layer]:
    src = noise(d, 22)
    return [Layer("raw", 3 * MIB + 1024, (), (f"write {src} 0 700k", f"write {src} 2M 300k"))]


def _cluster(cluster: int, size: int) -> Callable[[Path], list[Layer]]:
    def layers(d: Path) -> list[Layer]:
        rng = random.Random(cluster)
        opts = ("-o", f"cluster_size={cluster}")
        return [Layer("qcow2", size, opts, (f"write {noise(d, 23)} 0 {size // 2}",)),
                *(Layer("qcow2", size, opts, tuple(
                    mixed_ops(rng, noise(d, 24 + i), size, cluster, 16))) for i in range(2))]
    return layers


def _cluster_2m(d: Path) -> list[Layer]:
    """2 MiB clusters; the top has extended L2, so 64 KiB subclusters (the memset size)."""
    s0, s1, s2 = noise(d, 26), noise(d, 27), noise(d, 28)
    size = 8 * MIB
    mid = (f"write {s1} {MIB + 100 * KIB} 300k", "write -z 4M 2M",
           f"write {s1} {3 * MIB + 512} 512")
    top = (f"write {s2} {64 * KIB + 512} 512", f"write -z {2 * MIB + 128 * KIB} 64k",
           f"write {s2} {2 * MIB + 192 * KIB} 200k", f"write {s2} {7 * MIB + 64 * KIB} 64k",
           "write -z 7M 64k")
    return [Layer("qcow2", size, ("-o", "cluster_size=2M"), (f"write {s0} 0 3M",)),
            Layer("qcow2", size, ("-o", "cluster_size=2M"), mid),
            Layer("qcow2", size, ("-o", "cluster_size=2M,extended_l2=on"), top)]


def _four_layers(d: Path) -> list[Layer]:
    rng = random.Random(4)
    size = 4 * MIB
    geometry = [(512, ""), (2 * MIB, ""), (32 * KIB, ",extended_l2=on"), (64 * KIB, "")]
    layers = []
    for depth, (cluster, extra) in enumerate(geometry):
        src = noise(d, 30 + depth)
        own = size - (3 - depth) * 1536  # each backing file a little shorter than its child
        # compressed clusters first (QEMU compresses only fresh ones); some get overwritten
        ops = ([f"write -c {src} {k * 5 * cluster} {cluster}" for k in range(1, 9)]
               if depth >= 2 else [])
        ops += mixed_ops(rng, src, own, cluster, 10, discard=depth > 0)
        layers.append(Layer("qcow2", own, ("-o", f"cluster_size={cluster}{extra}"),
                            tuple(ops)))
    return layers


@attrs.define(frozen=True)
class Scenario:
    """How to build one chain, and the run kinds its reads must meet."""

    layers: Callable[[Path], list[Layer]]
    kinds: frozenset[RunKind]
    fmt: str = "qcow2"
    #: Cut the base's file to this many bytes after building (a file ending mid-sector).
    truncate_base: int | None = None
    #: ``(depth, size)``: ``qemu-img resize --shrink`` layers after building (bottom: 0).
    shrink: tuple[tuple[int, int], ...] = ()


SCENARIOS: dict[str, Scenario] = {
    "zlib": Scenario(_zlib, frozenset({_COMPRESSED, _DATA, _ZERO, _UNALLOC})),
    "zstd": Scenario(_zstd, frozenset({_COMPRESSED, _DATA, _ZERO, _UNALLOC})),
    "zero-v3": Scenario(_zero_v3, frozenset({_ZERO, _DATA})),
    "v2": Scenario(_v2, frozenset({_DATA, _UNALLOC})),
    "unallocated-4-layers": Scenario(_unallocated, frozenset({_DATA, _UNALLOC})),
    "extended-l2": Scenario(_extl2, frozenset({_COMPRESSED, _DATA, _ZERO})),
    "short-backing": Scenario(_short_backing, frozenset({_DATA, _UNALLOC})),
    "shrunk-backing": Scenario(_shrunk_backing, frozenset({_DATA, _UNALLOC}),
                               shrink=((0, MIB + 1536), (1, 2 * MIB + 512))),
    "raw-base": Scenario(_raw_base, frozenset({_DATA, _ZERO}), truncate_base=MIB + 1000),
    "raw-alone": Scenario(_raw_alone, frozenset({_DATA}), fmt="raw",
                          truncate_base=3 * MIB + 700),
    "cluster-512": Scenario(_cluster(512, 2 * MIB), frozenset({_DATA, _ZERO, _UNALLOC})),
    "cluster-4k": Scenario(_cluster(4 * KIB, 5 * MIB), frozenset({_DATA, _ZERO, _UNALLOC})),
    "cluster-64k": Scenario(_cluster(64 * KIB, 4 * MIB), frozenset({_DATA, _ZERO, _UNALLOC})),
    "cluster-2M": Scenario(_cluster_2m, frozenset({_DATA, _ZERO, _UNALLOC})),
    "four-mixed-layers": Scenario(_four_layers, frozenset({_COMPRESSED, _DATA, _ZERO,
                                                           _UNALLOC})),
}


@attrs.define(frozen=True)
class Alone:
    """One file of a chain read by itself (backing ignored), and QEMU's bytes for it."""

    path: Path
    fmt: str
    expected: bytes
    cases: tuple[tuple[int, int], ...]


@attrs.define(frozen=True)
class Built:
    """A built chain: its top, QEMU's export of it, and the ranges to read."""

    top: Path
    fmt: str
    expected: bytes
    cases: tuple[tuple[int, int], ...]
    files: tuple[Alone, ...]

    def open(self) -> BackingChain:
        """The chain, opened as the public entry point opens it."""
        return open_chain(self.top, format=self.fmt)


def _json_target(path: Path, fmt: str) -> str:
    """A QEMU image spec for ``path`` alone: a qcow2 file with its backing file ignored."""
    if fmt == "raw":
        return str(path)
    spec = {"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": str(path)}}
    return "json:" + json.dumps(spec)


def _export_alone(qemu: Any, path: Path, fmt: str, tmp: Path) -> bytes:
    out = tmp / f"{path.name}.alone.raw"
    fmt_args = ["-f", "raw"] if fmt == "raw" else []
    qemu.img("convert", "-U", *fmt_args, "-O", "raw", _json_target(path, fmt), out)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def _map_starts(qemu: Any, path: Path, fmt: str, *, alone: bool) -> list[int]:
    """Where ``qemu-img map`` starts a new extent (data/zero/depth/host changes)."""
    target = _json_target(path, fmt) if alone else str(path)
    fmt_args = ["-f", fmt] if fmt == "raw" or not alone else []
    out = qemu.img("map", "-U", *fmt_args, "--output=json", target).stdout
    return [e["start"] for e in json.loads(out)]


def read_cases(size: int, expected: bytes, boundaries: list[int], granules: list[int],
               seed: int) -> tuple[tuple[int, int], ...]:
    """(offset, length) pairs: every shape of read, around every kind of boundary."""
    rng = random.Random(seed)
    cases: set[tuple[int, int]] = set()

    def add(off: int, n: int) -> None:
        if off >= 0 and n >= 0 and off + n <= size:
            cases.add((off, n))

    add(0, size)
    add(0, 0)
    add(size, 0)
    for n in (1, 2, 511, 512, 4096, 4097, _MEMSET_MIN + 3, 300 * KIB + 1):
        add(size - n, n)  # ending exactly at the virtual size
    if len(boundaries) > 80:
        boundaries = sorted(rng.sample(boundaries, 80))
    for b in boundaries:
        for off, n in ((b, 0), (b - 1, 1), (b, 1), (b - 1, 2), (b - 3, 7), (b - 2048, 4096),
                       (b, 4096), (b - 777, 1555), (b - 4095, 8191), (b - 1, 70001)):
            add(off, n)
    for g in granules:
        count = max(1, size // g)
        for c in sorted({0, 1, 2, count // 3, count // 2, count - 2, count - 1}):
            at = c * g
            # the whole unit, inside it (the short path), its edges, and across them
            for off, n in ((at, g), (at + 1, g - 2), (at + g // 3, 1), (at + g // 3, g // 3),
                           (at + g - 1, 1), (at + g - 1, 2), (at - 1, g + 2), (at, 2 * g + 1),
                           (at + 5, 3 * g)):
                add(off, n)
    zero_runs = _zero_stretches(expected, _MEMSET_MIN)
    if len(zero_runs) > 24:
        zero_runs = rng.sample(zero_runs, 24)
    for s, e in zero_runs:  # long zero stretches: alone, and between data
        for off, n in ((s, e - s), (s - 5, e - s + 10), (s + 1, _MEMSET_MIN + 1),
                       (s - 4096, 4096 + _MEMSET_MIN), (e - _MEMSET_MIN - 7, _MEMSET_MIN + 9)):
            add(off, n)
    for _ in range(60):
        off = rng.randrange(size + 1)
        n = rng.choice([0, 1, 4096, rng.randrange(1, 2 * KIB) | 1, rng.randrange(300 * KIB)])
        add(off, min(n, size - off))
    return tuple(sorted(cases))


def _zero_stretches(data: bytes, least: int) -> list[tuple[int, int]]:
    """``(start, end)`` of every run of at least ``least`` zero bytes, found block-wise."""
    block, empty = 4096, bytes(4096)
    out = []
    i, nblocks = 0, -(-len(data) // block)
    while i < nblocks:
        if data[i * block : (i + 1) * block] != empty[: len(data) - i * block]:
            i += 1
            continue
        j = i
        while j < nblocks and data[j * block : (j + 1) * block] == empty[: len(data) - j * block]:
            j += 1
        before = data[max(0, i - 1) * block : i * block]
        start = i * block - (len(before) - len(before.rstrip(b"\0")))
        after = data[j * block : (j + 1) * block]
        end = min(len(data), j * block) + len(after) - len(after.lstrip(b"\0"))
        if end - start >= least:
            out.append((start, end))
        i = j
    return out


def _granules(img: Image) -> list[int]:
    if not isinstance(img, Qcow2Image):
        return [512, 64 * KIB]
    out = [img.cluster_size, img.l2_span]
    if img.extended_l2:
        out.append(img.cluster_size // 32)
    return out


def _build(qemu: Any, directory: Path, name: str) -> Built:
    scenario = SCENARIOS[name]
    layers = scenario.layers(directory)
    top = build_chain(qemu, directory, layers)
    if scenario.truncate_base is not None:
        base = directory / f"img0.{layers[0].fmt}"
        assert layers[0].fmt == "raw"
        with base.open("r+b") as f:
            f.truncate(scenario.truncate_base)
    for depth, new_size in scenario.shrink:
        qemu.img("resize", "-q", "-f", "qcow2", "--shrink",
                 directory / f"img{depth}.qcow2", str(new_size))
    expected = qemu_export(qemu, top, directory, scenario.fmt)
    seed = sum(map(ord, name))
    want = len(expected)
    with open_chain(top, format=scenario.fmt) as chain:
        assert chain.size == want
        sizes = [img.size for img in chain.images]
        granules = sorted({g for img in chain.images for g in _granules(img)})
        paths = [(Path(img.path), img.format) for img in chain.images]
        image_granules = [_granules(img) for img in chain.images]
    boundaries = _map_starts(qemu, top, scenario.fmt, alone=False) + sizes[1:]
    files = []
    for (path, fmt), own in zip(paths, image_granules, strict=True):
        alone = _export_alone(qemu, path, fmt, directory)
        files.append(Alone(path, fmt, alone, read_cases(
            len(alone), alone, _map_starts(qemu, path, fmt, alone=True), own, seed + 1)))
    return Built(top, scenario.fmt, expected,
                 read_cases(len(expected), expected, boundaries, granules, seed), tuple(files))


@pytest.fixture(scope="module")
def chains(qemu: Any, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Built]:
    """Build each scenario once for the module, on first use."""
    built: dict[str, Built] = {}

    def get(name: str) -> Built:
        if name not in built:
            built[name] = _build(qemu, tmp_path_factory.mktemp(name), name)
        return built[name]

    return get


# -- comparing ----------------------------------------------------------------------


def _mismatches(cases: tuple[tuple[int, int], ...], expected: bytes,
                read: Callable[[int, int], bytes]) -> list[str]:
    bad = []
    for off, n in cases:
        got = read(off, n)
        want = expected[off : off + n]
        if got != want:
            first = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                         min(len(got), len(want)))
            bad.append(f"[{off}, +{n}): {len(got)} bytes, first difference at +{first} "
                       f"(got {got[first:first + 4].hex()}, QEMU {want[first:first + 4].hex()})")
    return bad


def _assert_all_match(cases: tuple[tuple[int, int], ...], expected: bytes,
                      read: Callable[[int, int], bytes]) -> None:
    bad = _mismatches(cases, expected, read)
    assert not bad, f"{len(bad)} of {len(cases)} reads differ from QEMU:\n" + "\n".join(bad[:12])


def _into_bytearray(chain: BackingChain, off: int, n: int) -> bytes:
    buf = bytearray([_GARBAGE]) * n
    chain.read_into(off, buf)
    assert len(buf) == n
    return bytes(buf)


def _into_memoryview(chain: BackingChain, off: int, n: int) -> bytes:
    """A slice, at an odd offset, of a larger buffer whose guard bytes must survive."""
    whole = bytearray([_GARBAGE]) * (n + 2 * _GUARD)
    with memoryview(whole) as view:
        chain.read_into(off, view[_GUARD : _GUARD + n])
    assert whole[:_GUARD] == whole[_GUARD + n :] == bytes([_GARBAGE]) * _GUARD
    return bytes(whole[_GUARD : _GUARD + n])


def _into_mmap(chain: BackingChain, off: int, n: int) -> bytes:
    if n == 0:  # an anonymous mmap cannot be empty: read into an empty view of one
        with mmap.mmap(-1, 1) as mm, memoryview(mm) as view:
            chain.read_into(off, view[:0])
        return b""
    with mmap.mmap(-1, n) as mm:
        mm.write(bytes([_GARBAGE]) * n)
        chain.read_into(off, mm)
        return mm[:]


def _into_mmap_view(chain: BackingChain, off: int, n: int) -> bytes:
    with mmap.mmap(-1, n + 2 * _GUARD) as mm:
        mm.write(bytes([_GARBAGE]) * len(mm))
        with memoryview(mm) as view:
            chain.read_into(off, view[_GUARD : _GUARD + n])
        assert mm[:_GUARD] == mm[_GUARD + n :] == bytes([_GARBAGE]) * _GUARD
        return mm[_GUARD : _GUARD + n]


def _into_array(chain: BackingChain, off: int, n: int) -> bytes:
    """An array('I') of ``n // 4`` items: filled bytewise, in memory order."""
    assert n % 4 == 0
    target = array("I", [0xFFFF_FFFF]) * (n // 4)
    chain.read_into(off, target)
    return target.tobytes()


_TARGETS: dict[str, Callable[[BackingChain, int, int], bytes]] = {
    "bytearray": _into_bytearray,
    "memoryview": _into_memoryview,
    "mmap": _into_mmap,
    "mmap-view": _into_mmap_view,
}


# -- the contract: every read path gives QEMU's bytes ---------------------------------


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario_takes_the_paths_it_claims(chains: Callable[[str], Built], name: str) -> None:
    """The chain really holds the run kinds its scenario is there to read."""
    built = chains(name)
    with built.open() as chain:
        kinds = {run.kind for _, run in chain.runs()}
        if name == "extended-l2":
            assert _has_mixed_subclusters(chain.images[0])  # top first
            assert _has_mixed_subclusters(chain.images[1])
    assert SCENARIOS[name].kinds <= kinds, kinds


def _has_mixed_subclusters(img: Image) -> bool:
    """Whether one cluster has allocated, zero and unallocated subclusters at once."""
    assert isinstance(img, Qcow2Image)
    assert img.extended_l2
    for l1_index in range(len(img.l1_table)):
        table = img.l2_table(l1_index)
        if table is None:
            continue
        for i in range(0, len(table), 2):
            bitmap = table[i + 1]
            zero, alloc = bitmap >> 32, bitmap & 0xFFFF_FFFF
            if alloc & ~zero and zero and ~(alloc | zero) & 0xFFFF_FFFF:
                return True
    return False


@pytest.mark.parametrize("cache", ["default", "two-tables"])
@pytest.mark.parametrize("name", SCENARIOS)
def test_read_matches_qemu(chains: Callable[[str], Built], name: str, cache: str) -> None:
    built = chains(name)
    cases = built.cases
    with built.open() as chain:
        if cache == "two-tables":
            # Evictions under the short path's memo: random order, two L2 tables per image.
            for img in chain.images:
                if isinstance(img, Qcow2Image):
                    img.set_l2_cache_bytes(0)
            cases = tuple(random.Random(len(name)).sample(cases, len(cases)))
        _assert_all_match(cases, built.expected, chain.read)
        # The same ranges again: now every L2 entry is cached and validated.
        _assert_all_match(cases, built.expected, chain.read)


@pytest.mark.parametrize("target", _TARGETS)
@pytest.mark.parametrize("name", SCENARIOS)
def test_read_into_matches_qemu(chains: Callable[[str], Built], name: str, target: str) -> None:
    built = chains(name)
    into = _TARGETS[target]
    with built.open() as chain:
        _assert_all_match(built.cases, built.expected,
                          lambda off, n: into(chain, off, n))


@pytest.mark.parametrize("name", SCENARIOS)
def test_read_into_array_fills_bytewise(chains: Callable[[str], Built], name: str) -> None:
    """An array('I') is a buffer of 4-byte items: read_into fills its bytes, in order."""
    built = chains(name)
    cases = tuple((off, n) for off, n in built.cases if n % 4 == 0)
    with built.open() as chain:
        _assert_all_match(cases, built.expected, lambda off, n: _into_array(chain, off, n))


@pytest.mark.parametrize("name", SCENARIOS)
def test_each_file_alone_matches_qemu(chains: Callable[[str], Built], name: str) -> None:
    """``Qcow2Image.read``/``RawImage.read``: the file's own clusters, unallocated as zeros."""
    for alone in chains(name).files:
        for l2_cache_bytes in (None, 0):
            if alone.fmt == "raw":
                if l2_cache_bytes is not None:
                    continue
                img: Image = RawImage.open(alone.path)
            elif l2_cache_bytes is None:
                img = Qcow2Image.open(alone.path)
            else:
                img = Qcow2Image.open(alone.path, l2_cache_bytes=l2_cache_bytes)
            want = len(alone.expected)
            with img:
                assert img.size == want
                _assert_all_match(alone.cases, alone.expected, img.read)


#: Scenarios whose top boxdisk can open for writing (it refuses extended L2 tops).
_WRITABLE = [name for name in SCENARIOS if name not in ("extended-l2", "cluster-2M")]


@pytest.mark.parametrize("name", _WRITABLE)
def test_a_writable_chain_reads_as_qemu_does(chains: Callable[[str], Built], name: str,
                                             tmp_path: Path) -> None:
    """The top opened for writing (QEMU's locks, the writer's own runs): same bytes.

    On a copy of the chain, so the other tests' files stay as QEMU left them.
    """
    built = chains(name)
    copy = tmp_path / name
    shutil.copytree(built.top.parent, copy)
    want = len(built.expected)
    with open_chain(copy / built.top.name, format=built.fmt, writable=True) as chain:
        assert chain.size == want
        _assert_all_match(built.cases, built.expected, chain.read)
        _assert_all_match(built.cases, built.expected,
                          lambda off, n: _into_memoryview(chain, off, n))


@pytest.mark.parametrize("extended", [False, True], ids=["standard-l2", "extended-l2"])
def test_an_entry_without_a_host_offset_reads_through(qemu: Any, tmp_path: Path,
                                                      extended: bool) -> None:
    """L2 entries QEMU reads as unallocated though not all zero: COPIED (and ZERO) bits
    without a host offset (qcow2_get_cluster_type: no offset, no data file)."""
    size, cluster = MIB, 64 * KIB
    opts = ("-o", "extended_l2=on") if extended else ()
    top = build_chain(qemu, tmp_path, [
        Layer("qcow2", size, (), (f"write {noise(tmp_path, 40)} 0 {size}",)),
        Layer("qcow2", size, opts, (f"write {noise(tmp_path, 41)} 1000 3000",)),
    ])
    with Qcow2Image.open(top) as img:
        l2 = img.l2_offset(0)
    copied, zero = 1 << 63, 1
    with top.open("r+b") as f:
        if extended:
            f.seek(l2 + 16)  # entry 1: (word, bitmap)
            f.write(copied.to_bytes(8, "big") + bytes(8))
        else:
            f.seek(l2 + 8)  # entries 1 and 2
            f.write(copied.to_bytes(8, "big") + (copied | zero).to_bytes(8, "big"))
    expected = qemu_export(qemu, top, tmp_path)
    cases = read_cases(size, expected, [cluster * k for k in range(5)], [cluster], 41)
    with open_chain(top) as chain:
        kinds = [run.kind for _, run in chain.runs(cluster, 2 * cluster)]
        _assert_all_match(cases, expected, chain.read)
        _assert_all_match(cases, expected, lambda off, n: _into_memoryview(chain, off, n))
    assert kinds == ([_DATA] if extended else [_DATA, _ZERO])  # from the base, then zeros
    alone = _export_alone(qemu, top, "qcow2", tmp_path)
    with Qcow2Image.open(top) as img:
        _assert_all_match(cases, alone, img.read)


# -- the edges of the disk, and what read_into accepts ---------------------------------


@pytest.mark.parametrize("name", ["zlib", "extended-l2", "short-backing", "raw-alone"])
def test_reads_past_the_end_raise(chains: Callable[[str], Built], name: str) -> None:
    """Only ``[0, size]`` can be read; ``read(size, 0)`` is the empty read at the end."""
    built = chains(name)
    with built.open() as chain:
        size = chain.size
        assert chain.read(size, 0) == b""
        chain.read_into(size, bytearray())
        assert chain.read(size - 1, 1) == built.expected[-1:]
        for off, n in ((size - 1, 2), (size, 1), (size + 1, 0), (-1, 1), (-1, 0),
                       (0, size + 1), (size - 4096, 8192)):
            with pytest.raises(InvalidArgumentError):
                chain.read(off, n)
            with pytest.raises(InvalidArgumentError):
                chain.read_into(off, bytearray(n))
        for alone in built.files:
            opener = RawImage.open if alone.fmt == "raw" else Qcow2Image.open
            with opener(alone.path) as img:
                assert img.read(img.size, 0) == b""
                for off, n in ((img.size - 1, 2), (img.size, 1), (-1, 1), (0, -1)):
                    with pytest.raises(InvalidArgumentError):
                        img.read(off, n)


def test_a_negative_length_is_an_invalid_argument(chains: Callable[[str], Built]) -> None:
    with chains("zlib").open() as chain, pytest.raises(InvalidArgumentError):
        chain.read(0, -1)


def test_a_closed_chain_refuses_reads(chains: Callable[[str], Built]) -> None:
    built = chains("zero-v3")
    chain = built.open()
    assert chain.read(0, 4096) == built.expected[:4096]
    chain.close()
    for off, n in ((0, 4096), (64 * KIB, 4096), (0, 0)):
        with pytest.raises(InvalidArgumentError):
            chain.read(off, n)
        with pytest.raises(InvalidArgumentError):
            chain.read_into(off, bytearray(n))


@pytest.mark.parametrize("buf", [
    pytest.param(lambda: b"\x00" * 4096, id="bytes"),
    pytest.param(lambda: b"", id="empty-bytes"),
    pytest.param(lambda: memoryview(bytearray(4096)).toreadonly(), id="readonly-view"),
    pytest.param(lambda: "x" * 4096, id="str"),
    pytest.param(lambda: 4096, id="int"),
    pytest.param(lambda: None, id="None"),
    pytest.param(lambda: [0] * 4096, id="list"),
    pytest.param(object, id="object"),
])
def test_read_into_refuses_what_it_cannot_write(chains: Callable[[str], Built],
                                                buf: Callable[[], Any]) -> None:
    with chains("zero-v3").open() as chain:
        for off in (0, 64 * KIB):  # a data cluster and a zero cluster (the short path)
            with pytest.raises(InvalidArgumentError):
                chain.read_into(off, buf())


def test_read_into_refuses_a_readonly_mmap(chains: Callable[[str], Built]) -> None:
    with (chains("zero-v3").open() as chain, mmap.mmap(-1, 4096, prot=mmap.PROT_READ) as mm,
          pytest.raises(InvalidArgumentError)):
        chain.read_into(0, mm)


def test_read_into_refuses_a_strided_view(chains: Callable[[str], Built]) -> None:
    """``read_into`` takes a *contiguous* buffer; a strided view is InvalidArgumentError."""
    with chains("zero-v3").open() as chain:
        for off in (0, 64 * KIB):  # a data cluster, then a zero cluster
            with memoryview(bytearray(64)) as whole, pytest.raises(InvalidArgumentError):
                chain.read_into(off, whole[::2])


def test_read_into_fills_other_buffer_shapes(chains: Callable[[str], Built]) -> None:
    """Any writable C-contiguous buffer is filled as bytes: 2-D views, 8-byte items."""
    built = chains("four-mixed-layers")
    with built.open() as chain:
        for off in (0, 511, 3 * MIB + 7):
            grid = bytearray([_GARBAGE]) * (64 * KIB * 2)
            with memoryview(grid).cast("B", (2, 64 * KIB)) as view:
                chain.read_into(off, view)
            assert grid == built.expected[off : off + len(grid)]
            wide = array("Q", [2**64 - 1]) * 9000
            chain.read_into(off, wide)
            assert wide.tobytes() == built.expected[off : off + 72000]


def test_a_closed_image_refuses_reads(chains: Callable[[str], Built]) -> None:
    built = chains("zero-v3")
    img = Qcow2Image.open(built.files[0].path)
    assert img.read(0, 4096) == built.files[0].expected[:4096]
    img.close()
    for off in (0, 64 * KIB, 3 * MIB):  # data, zero, unallocated
        with pytest.raises(InvalidArgumentError):
            img.read(off, 16)


# -- property: any range of a fixed chain reads as QEMU reads it -------------------------


@pytest.fixture(scope="module")
def fixed(chains: Callable[[str], Built]) -> Built:
    """A four-layer chain: 512 B, 2 MiB, 32 KiB extended-L2 and 64 KiB clusters,
    compressed, zero and unallocated clusters, each backing a little shorter."""
    return chains("four-mixed-layers")


def _ranges(size: int, boundaries: list[int]) -> st.SearchStrategy[tuple[int, int]]:
    near = st.builds(lambda b, d: min(max(b + d, 0), size),
                     st.sampled_from(boundaries), st.integers(-3000, 3000))
    offsets = st.one_of(st.integers(0, size), near)
    lengths = st.one_of(st.integers(0, 5000), st.integers(0, 400 * KIB),
                        st.sampled_from([0, 1, 512, 4096, _MEMSET_MIN]))
    return st.tuples(offsets, lengths).map(lambda t: (t[0], min(t[1], size - t[0])))


_FIXED_BOUNDARIES = sorted({4 * MIB - k * 1536 for k in range(4)}
                           | {k * 32 * KIB for k in range(128)} | {2 * MIB})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_range_reads_as_qemu_reads_it(fixed: Built, data: st.DataObject) -> None:
    size = len(fixed.expected)
    off, n = data.draw(_ranges(size, _FIXED_BOUNDARIES), label="range")
    want = fixed.expected[off : off + n]
    with fixed.open() as chain:
        assert chain.read(off, n) == want
        assert _into_memoryview(chain, off, n) == want
