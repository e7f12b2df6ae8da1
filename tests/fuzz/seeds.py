"""Valid images to mutate: made by QEMU, made by boxdisk, and the corpus's pristine ones.

Each seed is a small image (a few KiB to a few hundred KiB) that uses the
features a mutation can then break: data, zero, compressed (zlib and zstd)
and unallocated clusters, v2 and v3, extended L2 entries, odd refcount widths,
internal snapshots, persistent bitmaps, metadata preallocation, and a backing
file named relatively (the base is written next to every mutated child).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from boxdisk import create_cow_child_disk, create_disk
from boxdisk.image._qcow2_write import Qcow2Writer
from boxdisk.ops import flatten
from tests.conftest import Qemu
from tests.data.make_hostile import build

from .mutate import Layout, parse

__all__ = ["SEEDS", "Seed", "make_seeds"]


@dataclass(frozen=True)
class Seed:
    """A valid image (``top``) and the files that must sit next to it (its backing files)."""

    name: str
    top: bytes
    beside: dict[str, bytes] = field(default_factory=dict)

    @property
    def layout(self) -> Layout:
        return parse(self.top)


def _qemu_image(qemu: Qemu, d: Path, name: str, size: str, opts: str,
                cmds: list[str], *, backing: tuple[str, str] | None = None) -> Path:
    path = d / name
    args = ["create", "-q", "-f", "qcow2", "-o", opts]
    if backing:
        args += ["-b", backing[0], "-F", backing[1]]
    qemu.img(*args, path, size)
    if cmds:
        qemu.write(path, cmds)
    return path


_DATA = ["write -P 0x11 0 4k", "write -P 0x22 12k 1k", "write -z 20k 4k",
         "write -c -P 0x33 32k 4k", "write -P 0x44 100k 8k", "discard 100k 4k"]


def _q_512(q: Qemu, d: Path) -> Path:
    return _qemu_image(q, d, "q512.qcow2", "192k", "cluster_size=512",
                       ["write -P 0x11 0 1k", "write -z 2k 1k", "write -c -P 0x22 4k 512",
                        "write -c -P 0x23 4608 512", "write -P 0x33 130k 3k"])


def _q_4k_v2(q: Qemu, d: Path) -> Path:
    return _qemu_image(q, d, "v2.qcow2", "256k", "cluster_size=4096,compat=0.10",
                       ["write -P 0x11 0 4k", "write -c -P 0x33 32k 4k",
                        "write -P 0x44 100k 8k"])


def _q_64k(q: Qemu, d: Path) -> Path:
    return _qemu_image(q, d, "q64k.qcow2", "4M", "cluster_size=65536",
                       ["write -P 0x11 0 4k", "write -c -P 0x33 64k 64k", "write -z 128k 64k",
                        "write -P 0x44 3M 64k"])


def _q_extl2(q: Qemu, d: Path) -> Path:
    return _qemu_image(q, d, "extl2.qcow2", "1M", "cluster_size=16384,extended_l2=on",
                       ["write -P 0x11 0 512", "write -P 0x12 2k 1k", "write -z 4k 2k",
                        "write -c -P 0x33 32k 16k", "write -P 0x44 512k 16k",
                        "discard 512k 4k"])


def _q_zstd(q: Qemu, d: Path) -> Path:
    return _qemu_image(q, d, "zstd.qcow2", "256k", "cluster_size=4096,compression_type=zstd",
                       ["write -c -P 0x33 0 4k", "write -c -P 0x34 8k 4k",
                        "write -P 0x44 100k 4k"])


def _q_refbits1(q: Qemu, d: Path) -> Path:
    return _qemu_image(q, d, "rb1.qcow2", "256k", "cluster_size=4096,refcount_bits=1", _DATA)


def _q_refbits64(q: Qemu, d: Path) -> Path:
    return _qemu_image(q, d, "rb64.qcow2", "256k", "cluster_size=4096,refcount_bits=64", _DATA)


def _q_snapshot(q: Qemu, d: Path) -> Path:
    p = _qemu_image(q, d, "snap.qcow2", "256k", "cluster_size=4096", _DATA[:2])
    q.img("snapshot", "-c", "s1", p)
    q.write(p, ["write -P 0x55 0 8k", "write -P 0x66 200k 4k"])
    return p


def _q_bitmap(q: Qemu, d: Path) -> Path:
    p = _qemu_image(q, d, "bitmap.qcow2", "256k", "cluster_size=4096", _DATA[:3])
    q.img("bitmap", "--add", p, "b0")
    return p


def _q_prealloc(q: Qemu, d: Path) -> Path:
    return _qemu_image(q, d, "prealloc.qcow2", "64k",
                       "cluster_size=4096,preallocation=metadata", ["write -P 0x11 0 4k"])


def _q_child(q: Qemu, d: Path) -> Path:
    (d / "base.raw").write_bytes(bytes(range(256)) * 256)
    return _qemu_image(q, d, "child.qcow2", "96k", "cluster_size=512",
                       ["write -P 0x11 1k 1k", "write -z 8k 2k", "write -c -P 0x22 16k 512"],
                       backing=("base.raw", "raw"))


def _q_child_qcow2(q: Qemu, d: Path) -> Path:
    _qemu_image(q, d, "mid.qcow2", "96k", "cluster_size=4096", ["write -P 0x21 0 16k"])
    return _qemu_image(q, d, "top.qcow2", "96k", "cluster_size=4096",
                       ["write -P 0x11 4k 4k", "write -z 8k 4k"],
                       backing=("mid.qcow2", "qcow2"))


def _b_writer(q: Qemu, d: Path) -> Path:
    p = d / "bw.qcow2"
    create_disk(p, persistent=True, size=256 * 1024, cluster_size=4096)
    with Qcow2Writer.open(p) as w:
        w.write(0, b"\x11" * 5000)
        w.write(40000, b"\x22" * 9000)
        w.write_zeroes(65536, 8192)
        w.write(200 * 1024, b"\x33" * 4096)
        w.discard(200 * 1024, 4096)
    return p


def _b_child(q: Qemu, d: Path) -> Path:
    base = _q_512(q, d)
    os.rename(base, d / "base512.qcow2")
    child = d / "bchild.qcow2"
    create_cow_child_disk(d / "base512.qcow2", "qcow2", child, 192 * 1024, relative=True,
                          persistent=True, cluster_size=4096)
    with Qcow2Writer.open(child) as w:
        w.write(1024, b"\x77" * 3000)
    return child


def _b_flat(q: Qemu, d: Path) -> Path:
    src = _q_child(q, d)
    out = d / "flat.qcow2"
    flatten(src, out, cluster_size=4096)
    return out


Builder = Callable[[Qemu, Path], Path]

#: Every seed, by name; QEMU-made (q-*) and boxdisk-made (b-*) ones need QEMU to build.
BUILDERS: dict[str, Builder] = {
    "q-512": _q_512, "q-4k-v2": _q_4k_v2, "q-64k": _q_64k, "q-extl2": _q_extl2,
    "q-zstd": _q_zstd, "q-refbits1": _q_refbits1, "q-refbits64": _q_refbits64,
    "q-snapshot": _q_snapshot, "q-bitmap": _q_bitmap, "q-prealloc": _q_prealloc,
    "q-child-raw": _q_child, "q-child-qcow2": _q_child_qcow2,
    "b-writer": _b_writer, "b-child": _b_child, "b-flatten": _b_flat,
}
#: Seeds that need no QEMU: the corpus generator's pristine images.
CORPUS_SEEDS: dict[str, Callable[[], bytes]] = {
    "c-base512": lambda: build().bytes(),
    "c-extl2": lambda: build(cluster_bits=14, extended_l2=True).bytes(),
}
SEEDS = sorted(BUILDERS) + sorted(CORPUS_SEEDS)


def make_seeds(qemu: Qemu, root: Path) -> dict[str, Seed]:
    """Build every seed under ``root`` (one directory each) and return their bytes."""
    out: dict[str, Seed] = {}
    for name, builder in BUILDERS.items():
        d = root / name
        d.mkdir(parents=True)
        top = builder(qemu, d)
        beside = {p.name: p.read_bytes() for p in d.iterdir() if p != top and p.is_file()}
        out[name] = Seed(name, top.read_bytes(), beside)
        shutil.rmtree(d)
    for name, make in CORPUS_SEEDS.items():
        out[name] = Seed(name, make())
    return out


#: Images of the template store that the store fuzz test mutates, by seed name.
STORE_TARGETS = ("s-base", "s-box-disk", "s-snapshot-disk")


@dataclass(frozen=True)
class StoreSeed:
    """A small box store (a base, a box, a snapshot) and where its images are in it."""

    root: Path
    images: dict[str, Path]  # seed name -> path relative to ``root``


def make_store(qemu: Qemu, root: Path) -> StoreSeed:
    """A store with a qcow2 base, one box over it with data, and one snapshot of the box."""
    from boxdisk.store import BoxStore  # noqa: PLC0415 - the store is fuzzed last

    src = _qemu_image(qemu, root, "base-src.qcow2", "256k", "cluster_size=4096",
                      ["write -P 0x11 0 8k", "write -c -P 0x22 16k 4k", "write -z 32k 4k"])
    store_dir = root / "store"
    with BoxStore(store_dir) as store:
        base = store.add_base(src, "base", backing_format="qcow2")
        box = store.create_box("b1", base="base")
        with Qcow2Writer.open(box.disk) as w:
            w.write(4096, b"\x33" * 6000)
        snap = store.snapshot("b1", "s1")
        with Qcow2Writer.open(box.disk) as w:
            w.write(65536, b"\x44" * 4096)
    real = store_dir.resolve()
    images = {"s-base": base, "s-box-disk": box.disk, "s-snapshot-disk": snap.disk}
    return StoreSeed(real, {k: Path(os.path.realpath(v)).relative_to(real)
                            for k, v in images.items()})
