"""Building QEMU-made backing chains for the chain, image and ops tests.

A chain is a list of :class:`Layer` specs, bottom first; :func:`build_chain`
makes each with qemu-img (relative backing names, backing formats recorded)
and drives qemu-io over it. :func:`assert_matches_qemu` is the contract test:
boxdisk's bytes and map against QEMU's, on the same files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import attrs

from boxdisk.chain import BackingChain
from boxdisk.ops import flatten

KIB = 1024
MIB = 1024 * 1024


@attrs.define
class Layer:
    """One image of a chain: format, virtual size, qemu-img -o options, qemu-io commands."""

    fmt: str = "qcow2"
    size: int = 4 * MIB
    options: tuple[str, ...] = ()
    ops: tuple[str, ...] = ()
    #: Build as raw with ``ops``, then ``qemu-img convert -c`` into a compressed qcow2.
    compress: str | None = None


def compressed_ops(rng: random.Random, size: int, cluster: int, count: int) -> list[str]:
    """qemu-io compressed writes (``write -c``) of whole clusters, none twice.

    QEMU writes a compressed cluster only where the image has none yet, so
    these must come before the image's other writes.
    """
    n_clusters = size // cluster
    picked = rng.sample(range(n_clusters), min(count, n_clusters))
    return [f"write -c -P {rng.randrange(1, 256)} {c * cluster} {cluster}" for c in picked]


def random_ops(rng: random.Random, size: int, cluster: int, count: int,
               *, zero: bool = True, discard: bool = True,
               compressed: int = 0) -> tuple[str, ...]:
    """qemu-io commands: compressed writes first (``compressed`` clusters), then pattern
    writes (cluster and partial), zero writes and discards."""
    cmds: list[str] = compressed_ops(rng, size, cluster, compressed) if compressed else []
    for _ in range(count):
        kind = rng.choice(["write"] * 4 + ["partial"] * 2 + ["zero"] * zero + ["discard"] * discard)
        if kind == "partial":
            # sector-granular, deliberately not cluster-aligned
            off = rng.randrange(0, size // 512) * 512
            length = min(rng.randrange(1, 16) * 512, size - off)
        else:
            n_clusters = max(1, size // cluster)
            first = rng.randrange(n_clusters)
            count_c = rng.randint(1, max(1, min(8, n_clusters - first)))
            off, length = first * cluster, min(count_c * cluster, size - first * cluster)
        pattern = rng.randrange(1, 256)
        if kind in ("write", "partial"):
            cmds.append(f"write -P {pattern} {off} {length}")
        elif kind == "zero":
            cmds.append(f"write -z {off} {length}")
        else:
            cmds.append(f"discard {off} {length}")
    return tuple(cmds)


def build_chain(qemu: Any, directory: Path, layers: list[Layer], *,
                prefix: str = "img") -> Path:
    """Make the chain (bottom first) in ``directory``; return the top's path."""
    below: Path | None = None
    below_fmt = ""
    for depth, layer in enumerate(layers):
        path = directory / f"{prefix}{depth}.{layer.fmt}"
        if layer.compress is not None:
            raw = directory / f"{prefix}{depth}.src.raw"
            qemu.img("create", "-q", "-f", "raw", raw, str(layer.size))
            if layer.ops:
                qemu.write(raw, layer.ops, fmt="raw")
            opts = ["-o", f"compression_type={layer.compress}", *layer.options]
            qemu.img("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", *opts, raw, path)
            raw.unlink()
        else:
            args = ["create", "-q", "-f", layer.fmt, *layer.options]
            if below is not None:
                args += ["-b", below.name, "-F", below_fmt]
            qemu.img(*args, path, str(layer.size))
            if layer.ops:
                qemu.write(path, layer.ops, fmt=layer.fmt)
        below, below_fmt = path, layer.fmt
    assert below is not None
    return below


def qemu_export(qemu: Any, top: Path, tmp: Path, fmt: str = "qcow2") -> bytes:
    """The guest bytes as QEMU reads them (``qemu-img convert -f FMT -O raw``)."""
    out = tmp / f"{top.name}.qemu-export.raw"
    qemu.img("convert", "-U", "-f", fmt, "-O", "raw", top, out)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def qemu_map(qemu: Any, top: Path, fmt: str = "qcow2") -> list[dict[str, Any]]:
    """``qemu-img map --output=json`` parsed."""
    return json.loads(qemu.img("map", "-f", fmt, "--output=json", top).stdout)


def assert_matches_qemu(qemu: Any, top: Path, tmp: Path, *, seed: int = 0,
                        reads: int = 40, fmt: str = "qcow2", flat: bool = True) -> bytes:
    """boxdisk reads, maps and (``flat``) flattens ``top``'s chain exactly as QEMU does.

    Reads of random ranges equal QEMU's raw export, ``map()`` equals ``qemu-img
    map --output=json``, and the flattened image passes ``qemu-img check`` and
    ``qemu-img compare``. Returns the guest bytes.
    """
    expected = qemu_export(qemu, top, tmp, fmt)
    rng = random.Random(seed)
    with BackingChain.open(top, format=fmt) as chain:
        assert chain.size == len(expected)
        assert chain.read(0, chain.size) == expected
        for _ in range(reads):
            off = rng.randrange(0, chain.size)
            length = rng.randint(0, min(chain.size - off, 300 * KIB))
            assert chain.read(off, length) == expected[off : off + length], (off, length)
        mine = [e.as_qemu_json() for e in chain.map()]
    theirs = qemu_map(qemu, top, fmt)
    assert mine == theirs
    if flat:
        dst = tmp / f"{top.stem}-flat-{seed}.qcow2"
        flatten(top, dst, src_format=fmt, overwrite=True)
        qemu.assert_clean(dst)
        proc = qemu.img("compare", "-f", fmt, "-F", "qcow2", top, dst, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        dst.unlink()
    return expected
