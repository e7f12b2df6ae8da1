"""Opening a chain: formats from the header, names as QEMU resolves them, and refusals.

A cycle, a missing file, a name outside ``allowed_roots``, a missing backing
format and too deep a chain each raise BackingChainError naming the chain so far.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

from boxdisk._errors import BackingChainError, InvalidArgumentError, UnsupportedFeatureError
from boxdisk.chain import DEFAULT_MAX_DEPTH, BackingChain, Extent, open_chain
from boxdisk.format import Qcow2Header, parse_header

pytestmark = pytest.mark.qemu


def _rewrite_backing(path: Path, name: str | None, fmt: str | None) -> None:
    """Point ``path`` at another backing file, header only (what a hostile image could do)."""
    buf = path.read_bytes()
    cs = 1 << int.from_bytes(buf[20:24], "big")
    header: Qcow2Header = parse_header(buf[:cs], source=str(path))
    head = header.with_backing(name, fmt).pack()
    with open(path, "r+b") as f:
        f.write(head + bytes(cs - len(head)))


def _chain(qemu, tmp_path: Path, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        p = tmp_path / f"l{i}.qcow2"
        args = ["create", "-q", "-f", "qcow2"]
        if paths:
            args += ["-b", paths[-1].name, "-F", "qcow2"]
        qemu.img(*args, p, "1M")
        paths.append(p)
    return paths


def test_open_lists_images_top_first(qemu, tmp_path: Path) -> None:
    paths = _chain(qemu, tmp_path, 3)
    with open_chain(paths[-1]) as chain:
        assert chain.paths == (str(paths[2]), str(tmp_path / "l1.qcow2"),
                               str(tmp_path / "l0.qcow2"))
        assert [img.format for img in chain.images] == ["qcow2"] * 3
        assert chain.size == 1024 * 1024
        assert chain.top is chain.images[0]
    assert chain.closed
    assert all(img.closed for img in chain.images)
    chain.close()  # idempotent


def test_close_releases_every_file(qemu, tmp_path: Path) -> None:
    paths = _chain(qemu, tmp_path, 4)
    before = len(os.listdir("/proc/self/fd"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(5):
            with BackingChain.open(paths[-1]) as chain:
                chain.read(0, 4096)
    assert len(os.listdir("/proc/self/fd")) == before


def test_reading_a_closed_chain_is_refused(qemu, tmp_path: Path) -> None:
    paths = _chain(qemu, tmp_path, 1)
    chain = BackingChain.open(paths[0])
    chain.close()
    with pytest.raises(InvalidArgumentError):
        chain.read(0, 1)


def test_self_loop(qemu, tmp_path: Path) -> None:
    (p,) = _chain(qemu, tmp_path, 1)
    _rewrite_backing(p, p.name, "qcow2")
    with pytest.raises(BackingChainError, match="loops") as info:
        BackingChain.open(p)
    assert info.value.chain == (str(p),)


def test_two_image_loop(qemu, tmp_path: Path) -> None:
    a, b = _chain(qemu, tmp_path, 2)
    _rewrite_backing(a, b.name, "qcow2")  # a -> b -> a
    with pytest.raises(BackingChainError, match="chain so far") as info:
        BackingChain.open(b)
    assert info.value.chain == (str(b), str(a))


def test_loop_through_a_symlink(qemu, tmp_path: Path) -> None:
    a, b = _chain(qemu, tmp_path, 2)
    (tmp_path / "alias.qcow2").symlink_to(b.name)
    _rewrite_backing(a, "alias.qcow2", "qcow2")
    with pytest.raises(BackingChainError, match="loops"):
        BackingChain.open(b)


def test_missing_backing_file(qemu, tmp_path: Path) -> None:
    a, b = _chain(qemu, tmp_path, 2)
    a.unlink()
    with pytest.raises(BackingChainError, match="does not exist") as info:
        BackingChain.open(b)
    assert info.value.path == str(b)
    assert info.value.chain == (str(b),)


def test_too_deep(qemu, tmp_path: Path) -> None:
    paths = _chain(qemu, tmp_path, 5)
    with BackingChain.open(paths[-1], max_depth=5) as chain:
        assert len(chain.images) == 5
    with pytest.raises(BackingChainError, match="max_depth=4") as info:
        BackingChain.open(paths[-1], max_depth=4)
    assert len(info.value.chain) == 4
    assert DEFAULT_MAX_DEPTH >= 8


def test_missing_backing_format_is_never_probed(qemu, tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    qemu.img("create", "-q", "-f", "raw", base, "1M")
    qemu.write(base, ["write -P 7 0 4k"], fmt="raw")
    top = tmp_path / "top.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top, "1M")
    _rewrite_backing(top, "base.raw", None)
    with pytest.raises(BackingChainError, match="backing_format="):
        BackingChain.open(top)
    with BackingChain.open(top, backing_format="raw") as chain:
        assert chain.read(0, 4) == b"\7" * 4


def test_missing_format_below_the_top_is_refused(qemu, tmp_path: Path) -> None:
    a, b, c = _chain(qemu, tmp_path, 3)
    _rewrite_backing(b, a.name, None)
    with pytest.raises(BackingChainError, match="without a backing format") as info:
        BackingChain.open(c, backing_format="qcow2")
    assert info.value.chain == (str(c), str(b))


def test_unknown_backing_format(qemu, tmp_path: Path) -> None:
    a, b = _chain(qemu, tmp_path, 2)
    _rewrite_backing(b, a.name, "vmdk")
    with pytest.raises(UnsupportedFeatureError, match="vmdk"):
        BackingChain.open(b)


def test_allowed_roots(qemu, tmp_path: Path) -> None:
    inside = tmp_path / "store"
    outside = tmp_path / "elsewhere"
    inside.mkdir()
    outside.mkdir()
    secret = outside / "secret.raw"
    secret.write_bytes(b"s" * 4096)
    top = inside / "top.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-b", "../elsewhere/secret.raw", "-F", "raw",
             top, "4096")
    with pytest.raises(BackingChainError, match="outside the allowed roots"):
        BackingChain.open(top, allowed_roots=[inside])
    # a symlink inside the root that leads out is still outside
    (inside / "link.raw").symlink_to(secret)
    _rewrite_backing(top, "link.raw", "raw")
    with pytest.raises(BackingChainError, match="outside the allowed roots"):
        BackingChain.open(top, allowed_roots=[inside])
    with BackingChain.open(top, allowed_roots=[inside, outside]) as chain:
        assert chain.read(0, 1) == b"s"


def test_absolute_backing_name(qemu, tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\1" * 8192)
    sub = tmp_path / "sub"
    sub.mkdir()
    top = sub / "top.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", top, "8192")
    with BackingChain.open(top) as chain:
        assert chain.paths[1] == str(base)
        assert chain.read(8000, 192) == b"\1" * 192


def test_raw_top(tmp_path: Path) -> None:
    p = tmp_path / "disk.raw"
    p.write_bytes(b"x" * 1000)
    with BackingChain.open(p, format="raw") as chain:
        assert chain.size == 1024  # whole sectors, as QEMU counts them
        assert chain.read(990, 34) == b"x" * 10 + bytes(24)
        assert list(chain.map()) == [Extent(0, 1000, 0, True, False, True, 0, str(p)),
                                     Extent(1000, 24, 0, True, True, False, 1000, str(p))]
    with pytest.raises(InvalidArgumentError):
        BackingChain.open(p, max_depth=0)


def test_read_outside_the_disk_is_refused(qemu, tmp_path: Path) -> None:
    (p,) = _chain(qemu, tmp_path, 1)
    with BackingChain.open(p) as chain:
        with pytest.raises(InvalidArgumentError):
            chain.read(1024 * 1024 - 1, 2)
        with pytest.raises(InvalidArgumentError):
            chain.read(-1, 1)
        assert chain.read(1024 * 1024, 0) == b""


@pytest.mark.parametrize("name", ["nbd:localhost:10809", "file:base.raw", "http://x/y.img",
                                  "weird:name.raw"])
def test_protocol_backing_names_are_not_files(qemu, tmp_path: Path, name: str) -> None:
    """QEMU's path_has_protocol: a ':' before any '/' names a protocol, never a local file."""
    (tmp_path / "base.raw").write_bytes(bytes(4096))
    (l0,) = _chain(qemu, tmp_path, 1)
    _rewrite_backing(l0, name, "raw")
    with pytest.raises(UnsupportedFeatureError, match="protocol") as info:
        BackingChain.open(l0)
    assert info.value.field == "backing_file"
    assert info.value.value == name


def test_colon_after_a_slash_is_a_plain_name(qemu, tmp_path: Path) -> None:
    sub = tmp_path / "a:b"
    sub.mkdir()
    (sub / "base.raw").write_bytes(b"\5" * 4096)
    (l0,) = _chain(qemu, tmp_path, 1)
    _rewrite_backing(l0, "./a:b/base.raw", "raw")
    with BackingChain.open(l0) as chain:
        assert chain.read(0, 2) == b"\5\5"
    proc = qemu.io("-c", "read -P 5 0 4096", l0, check=False)
    assert "read 4096/4096 bytes" in proc.stdout, proc.stdout + proc.stderr


def test_chain_of_huge_l1_tables_is_bounded(tmp_path: Path) -> None:
    """Sparse images may each claim a 32 MiB L1 table; a chain of them is refused, bounded."""
    import tracemalloc  # noqa: PLC0415 - only this test measures memory

    from boxdisk import BackingFormat, create_cow_child_disk, create_disk  # noqa: PLC0415
    from boxdisk.chain import MAX_CHAIN_L1_ENTRIES  # noqa: PLC0415

    size = 128 << 30  # 512-byte clusters: 4 Mi L1 entries (32 MiB), QEMU's largest
    base = create_disk(tmp_path / "l0.qcow2", persistent=True, size=size, cluster_size=512)
    paths = [base.path]
    for i in range(1, 4):
        child = create_cow_child_disk(paths[-1], BackingFormat.QCOW2, tmp_path / f"l{i}.qcow2",
                                      persistent=True, cluster_size=512)
        paths.append(child.path)
    with open_chain(paths[1]) as two:  # two of them fit
        assert len(two.images) == 2
    tracemalloc.start()
    try:
        with pytest.raises(UnsupportedFeatureError) as err:
            open_chain(paths[-1])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.value.field == "l1_size" and err.value.value > MAX_CHAIN_L1_ENTRIES
    assert peak < 160 << 20
