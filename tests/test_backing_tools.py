"""Backing-file tools against QEMU: set_backing_file_path, read_backing_chain,
is_backing_dependency and clone_disk_pair.

Chains are made by qemu-img with relative names; ``read_backing_chain`` must list
exactly what ``qemu-img info --backing-chain`` lists, resolved the way QEMU
resolves them (against the directory of the image naming them).
"""

from __future__ import annotations

import gc
import logging
import os
import struct
from pathlib import Path

import pytest

from boxdisk import (
    GUEST_ROOTFS_DISK,
    BackingFormat,
    BoxdiskError,
    DiskExistsError,
    InvalidArgumentError,
    clone_disk_pair,
    create_cow_child_disk,
    create_disk,
    is_backing_dependency,
    read_backing_chain,
    read_backing_file_path,
    read_header,
    set_backing_file_path,
)
from tests.conftest import Qemu

MiB = 1 << 20

#: How each layer names the one below it: same directory, a sibling directory,
#: a subdirectory, the parent directory, and (once in a while) an absolute path.
LAYOUTS = ["{i}.qcow2", "../l{i}/img.qcow2", "sub{i}/img.qcow2", "../img{i}.qcow2", "ABS"]


def make_chain(qemu: Qemu, root: Path, depth: int, *, raw_base: bool = True) -> list[Path]:
    """A chain of ``depth + 1`` images made by qemu-img, base first, top last.

    Each layer writes one distinct 4 KiB pattern at its own offset, so reads
    through the top show which layer answered.
    """
    root.mkdir(parents=True, exist_ok=True)
    base = root / ("base.raw" if raw_base else "base.qcow2")
    fmt = "raw" if raw_base else "qcow2"
    qemu.img("create", "-q", "-f", fmt, base, "1M")
    qemu.write(base, ["write -P 0x10 0 1M"], fmt=fmt)
    images = [base]
    current_dir = root
    for i in range(1, depth + 1):
        layout = LAYOUTS[i % len(LAYOUTS)]
        below = images[-1]
        if layout == "ABS":
            path = current_dir / f"abs{i}.qcow2"
        else:
            # Place the new image so that ``name`` (relative to its dir) reaches ``below``.
            path = {
                "{i}.qcow2": below.parent / f"{i}.qcow2",
                "../l{i}/img.qcow2": below.parent / f"up{i}" / "img.qcow2",
                "sub{i}/img.qcow2": below.parent.parent / "top.qcow2"
                if below.parent != root else root / f"t{i}.qcow2",
                "../img{i}.qcow2": below.parent / f"down{i}" / "img.qcow2",
            }[layout]
            if path.exists():
                path = path.parent / f"n{i}-{path.name}"
        path.parent.mkdir(parents=True, exist_ok=True)
        name = str(below) if layout == "ABS" else os.path.relpath(below, path.parent)
        qemu.img("create", "-q", "-f", "qcow2", "-b", name, "-F",
                 "raw" if below.suffix == ".raw" else "qcow2", path)
        qemu.write(path, [f"write -P {0x20 + i} {i * 4}k 4k"])
        images.append(path)
        current_dir = path.parent
    return images


@pytest.mark.parametrize("depth", range(1, 11))
def test_read_backing_chain_matches_qemu(qemu: Qemu, tmp_path: Path, depth: int) -> None:
    images = make_chain(qemu, tmp_path / "store", depth)
    top = images[-1]
    info = qemu.info(top, "--backing-chain")
    assert len(info) == depth + 1
    chain = read_backing_chain(top)
    assert [str(p) for p in chain] == [i["filename"] for i in info[1:]]
    assert [p.resolve() for p in chain] == [p.resolve() for p in reversed(images[:-1])]
    # A relative spelling of the top resolves exactly as QEMU does from the same cwd.
    rel_top = os.path.relpath(top)
    rel_info = qemu.info(rel_top, "--backing-chain")
    assert [str(p) for p in read_backing_chain(rel_top)] == [i["filename"] for i in rel_info[1:]]
    for layer in images[:-1]:
        assert is_backing_dependency(layer, top)
    assert not is_backing_dependency(top, top)
    qemu.io("-c", f"read -P 0x{0x20 + depth:x} {depth * 4}k 4k",
            "-c", f"read -P 0x{0x20 + 1:x} 4k 4k", top)


def test_read_backing_chain_of_qcow2_base(qemu: Qemu, tmp_path: Path) -> None:
    images = make_chain(qemu, tmp_path, 3, raw_base=False)
    assert [p.resolve() for p in read_backing_chain(images[-1])] == [
        p.resolve() for p in reversed(images[:-1])
    ]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The events boxdisk logged at warning level or above (``record.event``)."""
    return [getattr(r, "event", r.getMessage()) for r in caplog.records
            if r.levelno >= logging.WARNING]


def test_read_backing_chain_of_standalone_image(qemu: Qemu, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    img = tmp_path / "a.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", img, "1M")
    assert read_backing_chain(img) == []
    assert _warnings(caplog) == []


def test_read_backing_chain_stops_at_missing_file(qemu: Qemu, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    images = make_chain(qemu, tmp_path, 4)
    images[1].unlink()
    chain = read_backing_chain(images[-1])
    assert [p.resolve() for p in chain] == [images[3].resolve(), images[2].resolve()]
    assert _warnings(caplog) == ["backing_chain_missing"]
    assert not is_backing_dependency(images[0], images[-1])


def test_read_backing_chain_stops_at_cycle(qemu: Qemu, tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", a, "1M")
    qemu.img("create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", b)
    qemu.img("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", a)  # a -> b -> a
    chain = read_backing_chain(b)
    assert chain == [a]
    assert _warnings(caplog) == ["backing_chain_cycle"]
    assert is_backing_dependency(a, b)
    # A self-reference is a cycle of one.
    qemu.img("rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", a)
    assert read_backing_chain(a) == []


def test_read_backing_chain_stops_at_depth_limit(qemu: Qemu, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    images = make_chain(qemu, tmp_path, 6)
    chain = read_backing_chain(images[-1], max_depth=3)
    assert len(chain) == 3
    assert _warnings(caplog) == ["backing_chain_too_deep"]
    assert len(read_backing_chain(images[-1])) == 6


def test_read_backing_chain_never_raises(tmp_path: Path) -> None:
    garbage = tmp_path / "g"
    garbage.write_bytes(b"nope")
    assert read_backing_chain(garbage) == []
    assert read_backing_chain(tmp_path / "missing") == []
    assert read_backing_chain(tmp_path) == []
    assert not is_backing_dependency(tmp_path / "missing", garbage)


def test_read_backing_chain_stops_under_corrupt_layer(qemu: Qemu, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    images = make_chain(qemu, tmp_path, 3)
    with images[1].open("r+b") as f:  # the lowest qcow2 layer gets version 9
        f.seek(4)
        f.write(struct.pack(">I", 9))
    chain = read_backing_chain(images[-1])
    assert [p.resolve() for p in chain] == [images[2].resolve(), images[1].resolve()]
    assert _warnings(caplog) == ["backing_chain_unreadable"]


def test_is_backing_dependency_of_boxdisk_children(tmp_path: Path) -> None:
    base = create_disk(tmp_path / "base.qcow2", True, size=MiB).path
    snap = create_cow_child_disk(base, "qcow2", tmp_path / "snap.qcow2", persistent=True).path
    box = create_cow_child_disk(snap, "qcow2", tmp_path / "box" / "disk.qcow2", relative=True,
                                persistent=True).path
    other = create_disk(tmp_path / "other.qcow2", True, size=MiB).path
    assert is_backing_dependency(snap, box)
    assert is_backing_dependency(base, box)
    assert is_backing_dependency(tmp_path / "box" / ".." / "snap.qcow2", box)
    assert not is_backing_dependency(box, snap)
    assert not is_backing_dependency(other, box)
    assert not is_backing_dependency(tmp_path / "missing.qcow2", box)
    (tmp_path / "snap-link.qcow2").symlink_to(snap)
    assert is_backing_dependency(tmp_path / "snap-link.qcow2", box)


# -- set_backing_file_path against QEMU -------------------------------------------


@pytest.fixture
def moved_base(qemu: Qemu, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(child, old base, new base): the base's bytes copied to a new place."""
    old = tmp_path / "old" / "base.raw"
    old.parent.mkdir()
    qemu.img("create", "-q", "-f", "raw", old, "2M")
    qemu.write(old, ["write -P 0x61 0 2M"], fmt="raw")
    child = tmp_path / "box" / "disk.qcow2"
    create_cow_child_disk(old, "raw", child, persistent=True)
    qemu.write(child, ["write -P 0x62 1M 4k"])
    new = tmp_path / "new" / "place" / "for" / "the" / "base.raw"
    new.parent.mkdir(parents=True)
    new.write_bytes(old.read_bytes())
    return child, old, new


@pytest.mark.parametrize("relative", [False, True])
def test_set_backing_then_qemu_follows_new_base(
    qemu: Qemu, moved_base: tuple[Path, Path, Path], relative: bool
) -> None:
    child, old, new = moved_base
    set_backing_file_path(child, new, relative=relative)
    old.unlink()
    info = qemu.info(child)
    expected = os.path.relpath(new.resolve(), child.parent.resolve()) if relative else str(
        new.resolve())
    assert info["backing-filename"] == expected
    assert info["backing-filename-format"] == "raw"
    assert os.path.samefile(info["full-backing-filename"], new)
    qemu.assert_clean(child)
    qemu.io("-c", "read -P 0x61 0 1M", "-c", "read -P 0x62 1M 4k", "-c", "read -P 0x61 1028k 1020k",
            child)
    assert read_backing_chain(child) == [child.parent / expected] if relative else [new.resolve()]


def test_set_backing_rewrites_backing_format(qemu: Qemu, tmp_path: Path) -> None:
    raw = tmp_path / "b.raw"
    raw.write_bytes(bytes(MiB))
    child = create_cow_child_disk(raw, "raw", tmp_path / "c.qcow2", persistent=True).path
    q = tmp_path / "b.qcow2"
    qemu.img("convert", "-O", "qcow2", "-f", "raw", raw, q)
    set_backing_file_path(child, q, backing_format=BackingFormat.QCOW2)
    info = qemu.info(child)
    assert info["backing-filename-format"] == "qcow2"
    assert read_header(child).backing_format == "qcow2"
    qemu.assert_clean(child)
    qemu.io("-c", "read -P 0 0 1M", child)
    # Without backing_format the extension is kept as it is.
    set_backing_file_path(child, q)
    assert qemu.info(child)["backing-filename-format"] == "qcow2"


def test_set_backing_keeps_other_extensions_and_data(qemu: Qemu, tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", base, "2M")
    child = tmp_path / "c.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "-b", "base.qcow2",
             "-F", "qcow2", child)
    qemu.write(child, ["write -P 0x71 0 64k"])
    before = read_header(child)
    tail_before = child.read_bytes()[65536:]
    base2 = tmp_path / "elsewhere" / "base.qcow2"
    base2.parent.mkdir()
    base2.write_bytes(base.read_bytes())
    set_backing_file_path(child, base2)
    after = read_header(child)
    assert after.extensions == before.extensions
    assert after.compatible_features == before.compatible_features
    assert child.read_bytes()[65536:] == tail_before
    qemu.assert_clean(child)
    qemu.io("-c", "read -P 0x71 0 64k", child)


def test_set_backing_refuses_name_that_does_not_fit(qemu: Qemu, tmp_path: Path) -> None:
    base = tmp_path / "b.raw"
    base.write_bytes(bytes(MiB))
    child = create_cow_child_disk(base, "raw", tmp_path / "c.qcow2", cluster_size=512,
                                  persistent=True).path
    deep = tmp_path / ("x" * 200) / ("y" * 200)
    deep.mkdir(parents=True)
    far = deep / "base.raw"
    far.write_bytes(bytes(MiB))
    before = child.read_bytes()
    with pytest.raises(InvalidArgumentError):
        set_backing_file_path(child, far)
    assert child.read_bytes() == before
    qemu.assert_clean(child)


def test_set_backing_on_qemu_v2_image(qemu: Qemu, tmp_path: Path) -> None:
    base = tmp_path / "b.raw"
    base.write_bytes(b"\x33" * MiB)
    child = tmp_path / "c.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "b.raw", "-F", "raw", child)
    new = tmp_path / "sub" / "b2.raw"
    new.parent.mkdir()
    new.write_bytes(base.read_bytes())
    set_backing_file_path(child, new, relative=True)
    assert read_backing_file_path(child) == "sub/b2.raw"
    assert qemu.info(child)["format-specific"]["data"]["compat"] == "0.10"
    qemu.assert_clean(child)
    qemu.io("-c", "read -P 0x33 0 1M", child)


# -- clone_disk_pair ----------------------------------------------------------------


@pytest.fixture
def box(qemu: Qemu, tmp_path: Path) -> tuple[Path, Path]:
    """A box's container disk and guest disk, both qcow2 with data."""
    d = tmp_path / "boxes" / "src"
    d.mkdir(parents=True)
    container, guest = d / "disk.qcow2", d / GUEST_ROOTFS_DISK
    qemu.img("create", "-q", "-f", "qcow2", container, "8M")
    qemu.img("create", "-q", "-f", "qcow2", guest, "3M")
    qemu.write(container, ["write -P 0xc1 0 8M"])
    qemu.write(guest, ["write -P 0x91 0 3M"])
    return container, guest


def test_clone_disk_pair(qemu: Qemu, tmp_path: Path, box: tuple[Path, Path]) -> None:
    container, guest = box
    dst = tmp_path / "boxes" / "dst"
    got = clone_disk_pair(container, dst / "disk.qcow2", guest, dst)
    assert got == (dst / "disk.qcow2", dst / GUEST_ROOTFS_DISK)
    for child, src, size, pattern in [(got[0], container, 8 * MiB, "0xc1"),
                                       (got[1], guest, 3 * MiB, "0x91")]:
        assert child is not None
        qemu.assert_clean(child)
        info = qemu.info(child)
        assert info["virtual-size"] == size
        assert info["backing-filename-format"] == "qcow2"
        assert os.path.samefile(info["full-backing-filename"], src)
        qemu.io("-c", f"read -P {pattern} 0 {size}", child)
    # Writes to a clone stay in the clone.
    qemu.write(got[0], ["write -P 0xc2 0 64k"])
    qemu.io("-c", "read -P 0xc1 0 64k", container)


def test_clone_disk_pair_children_outlive_everything(
    tmp_path: Path, box: tuple[Path, Path]
) -> None:
    container, guest = box
    dst = tmp_path / "dst"
    got = clone_disk_pair(container, dst / "disk.qcow2", guest, dst)
    gc.collect()
    assert all(p is not None and p.exists() for p in got)


def test_clone_disk_pair_without_guest(tmp_path: Path, box: tuple[Path, Path]) -> None:
    container, _ = box
    dst = tmp_path / "dst"
    got = clone_disk_pair(container, dst / "disk.qcow2", tmp_path / "no-guest.qcow2", dst)
    assert got == (dst / "disk.qcow2", None)
    assert not (dst / GUEST_ROOTFS_DISK).exists()


def test_clone_disk_pair_is_all_or_nothing(tmp_path: Path, box: tuple[Path, Path]) -> None:
    container, _ = box
    bad_guest = tmp_path / "guest.qcow2"
    bad_guest.write_bytes(b"not an image" * 100)
    dst = tmp_path / "dst"
    with pytest.raises(BoxdiskError):
        clone_disk_pair(container, dst / "disk.qcow2", bad_guest, dst)
    assert not (dst / "disk.qcow2").exists()
    assert not (dst / GUEST_ROOTFS_DISK).exists()


def test_clone_disk_pair_into_store_is_all_or_nothing(
    tmp_path: Path, box: tuple[Path, Path]
) -> None:
    # A store directory (marked by .boxdisk/) is where clones normally go.
    (tmp_path / ".boxdisk").mkdir()
    container, _ = box
    bad_guest = tmp_path / "guest.qcow2"
    bad_guest.write_bytes(b"not an image" * 100)
    dst = tmp_path / "boxes" / "dst"
    with pytest.raises(BoxdiskError):
        clone_disk_pair(container, dst / "disk.qcow2", bad_guest, dst)
    assert not (dst / "disk.qcow2").exists(), "half a clone left behind"


def test_clone_disk_pair_keeps_existing_container_on_failure(
    qemu: Qemu, tmp_path: Path, box: tuple[Path, Path]
) -> None:
    container, _ = box
    dst = tmp_path / "dst"
    first = clone_disk_pair(container, dst / "disk.qcow2", tmp_path / "none", dst)[0]
    qemu.write(first, ["write -P 0xdd 0 4k"])  # the clone now holds data
    bad_guest = tmp_path / "guest.qcow2"
    bad_guest.write_bytes(b"x" * 4096)
    with pytest.raises(BoxdiskError):
        clone_disk_pair(container, dst / "disk.qcow2", bad_guest, dst)
    qemu.io("-c", "read -P 0xdd 0 4k", first)  # it existed before: never removed


def test_clone_disk_pair_refuses_occupied_destination(
    tmp_path: Path, box: tuple[Path, Path]
) -> None:
    container, guest = box
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / GUEST_ROOTFS_DISK).write_bytes(b"someone else's file")
    with pytest.raises(DiskExistsError):
        clone_disk_pair(container, dst / "disk.qcow2", guest, dst)
    assert not (dst / "disk.qcow2").exists()
    assert (dst / GUEST_ROOTFS_DISK).read_bytes() == b"someone else's file"
