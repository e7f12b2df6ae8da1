"""create_disk and create_cow_child_disk: every image boxdisk creates is one QEMU accepts.

The oracle: ``qemu-img check`` finds no errors and no leaks, ``qemu-img info``
reports the virtual size, cluster size, backing name and backing format boxdisk
intended, and data written through QEMU into a child reads back while the base
stays unchanged.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

import boxdisk
from boxdisk import (
    BackingChainError,
    BackingFormat,
    BoxdiskError,
    DiskExistsError,
    DiskFormat,
    InvalidArgumentError,
    create_cow_child_disk,
    create_disk,
    qcow2_virtual_size,
    read_backing_file_path,
)
from tests.conftest import Qemu

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CLUSTER_SIZES = [512, 4 * KiB, 64 * KiB, 2 * MiB]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(path: Path) -> tuple[int, int, int, str]:
    """What must not change about a file boxdisk was told not to touch."""
    st = path.lstat()
    return (st.st_ino, st.st_size, st.st_mtime_ns, digest(path) if path.is_file() else "")


@pytest.fixture
def raw_base(qemu: Qemu, tmp_path: Path) -> Path:
    """A 4 MiB raw base: 0x5a everywhere but 0xc3 in its second MiB."""
    base = tmp_path / "bases" / "base.raw"
    base.parent.mkdir()
    qemu.img("create", "-q", "-f", "raw", base, "4M")
    qemu.write(base, ["write -P 0x5a 0 4M", "write -P 0xc3 1M 1M"], fmt="raw")
    return base


@pytest.fixture
def qcow2_base(qemu: Qemu, tmp_path: Path) -> Path:
    """A 4 MiB qcow2 base made by QEMU, with the same pattern as ``raw_base``."""
    base = tmp_path / "bases" / "base.qcow2"
    base.parent.mkdir(exist_ok=True)
    qemu.img("create", "-q", "-f", "qcow2", base, "4M")
    qemu.write(base, ["write -P 0x5a 0 4M", "write -P 0xc3 1M 1M"])
    return base


# -- create_disk --------------------------------------------------------------


def test_create_disk_defaults(qemu: Qemu, tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "disk.qcow2"
    disk = create_disk(path, persistent=True)
    assert disk.path == path
    assert disk.format is DiskFormat.QCOW2
    assert disk.persistent
    qemu.assert_clean(path)
    info = qemu.info(path)
    assert info["virtual-size"] == 10 * GiB == boxdisk.DEFAULT_DISK_SIZE
    assert info["cluster-size"] == 64 * KiB == boxdisk.DEFAULT_CLUSTER_SIZE
    assert info["format-specific"]["data"]["compat"] == "1.1"
    assert "backing-filename" not in info
    # Sparse: the metadata of an empty 10 GiB image is a few clusters, not the L1 table.
    assert path.stat().st_blocks * 512 <= 512 * KiB
    assert qcow2_virtual_size(path) == 10 * GiB
    assert read_backing_file_path(path) is None


@pytest.mark.parametrize("cluster_size", CLUSTER_SIZES)
@pytest.mark.parametrize("size", [0, 512, 3 * MiB + 512, 10 * GiB])
def test_create_disk_is_clean(qemu: Qemu, tmp_path: Path, cluster_size: int, size: int) -> None:
    path = tmp_path / "disk.qcow2"
    with create_disk(path, size=size, cluster_size=cluster_size, persistent=False):
        qemu.assert_clean(path)
        info = qemu.info(path)
        assert (info["virtual-size"], info["cluster-size"]) == (size, cluster_size)
    assert not path.exists()


def test_create_disk_takes_qemu_writes(qemu: Qemu, tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    create_disk(path, size=64 * MiB, cluster_size=4 * KiB, persistent=False).leak()
    qemu.write(path, ["write -P 0x11 0 1M", "write -P 0x22 63M 1M", "write -z 10M 1M"])
    qemu.assert_clean(path)
    qemu.io("-c", "read -P 0x11 0 1M", "-c", "read -P 0x22 63M 1M", "-c", "read -P 0 1M 62M",
            path)


def test_create_disk_rounds_size_up_to_sectors(qemu: Qemu, tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    create_disk(path, True, size=1000)
    assert qemu.info(path)["virtual-size"] == 1024
    assert qcow2_virtual_size(path) == 1024


@pytest.mark.parametrize("cluster_size", [0, 256, 1000, 4 * MiB, -512])
def test_create_disk_refuses_bad_cluster_size(tmp_path: Path, cluster_size: int) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        create_disk(tmp_path / "d.qcow2", size=MiB, cluster_size=cluster_size, persistent=False)
    assert info.value.field == "cluster_size"
    assert not (tmp_path / "d.qcow2").exists()


def test_create_disk_refuses_bad_size(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        create_disk(tmp_path / "d.qcow2", size=-1, persistent=False)
    assert info.value.field == "size"
    with pytest.raises(InvalidArgumentError):
        create_disk(tmp_path / "d.qcow2", size=1 << 50, cluster_size=512, persistent=False)
    assert not (tmp_path / "d.qcow2").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_create_disk_existing_same_image_is_returned_persistent(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    create_disk(path, size=GiB, persistent=False).leak()
    before = snapshot(path)
    again = create_disk(path, size=GiB, persistent=False)  # asked for an ephemeral disk...
    assert again.persistent  # ...but it did not create the file, so it never deletes it
    again.close()
    assert snapshot(path) == before


def test_create_disk_existing_qemu_image_is_reused(qemu: Qemu, tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", path, "1G")
    before = snapshot(path)
    with create_disk(path, size=GiB, persistent=False) as disk:
        assert disk.persistent
    assert snapshot(path) == before


def _occupants(tmp_path: Path, qemu: Qemu) -> dict[str, Path]:
    """Things that can sit at a disk's path that create_disk must refuse and not touch."""
    out: dict[str, Path] = {}
    other = tmp_path / "other-size.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", other, "2G")
    out["other-size"] = other
    (tmp_path / "b.raw").write_bytes(bytes(GiB // 1024))
    child = tmp_path / "child.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-b", "b.raw", "-F", "raw", child, "1G")
    out["has-backing"] = child
    garbage = tmp_path / "garbage.img"
    garbage.write_bytes(b"precious guest data" * 1000)
    out["not-qcow2"] = garbage
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    out["empty-file"] = empty
    raw = tmp_path / "raw.img"
    raw.write_bytes(bytes(GiB // 1024))
    out["raw-image"] = raw
    directory = tmp_path / "dir.qcow2"
    directory.mkdir()
    (directory / "keep").write_text("x")
    out["directory"] = directory
    dangling = tmp_path / "dangling.qcow2"
    dangling.symlink_to(tmp_path / "nowhere")
    out["dangling-symlink"] = dangling
    return out


@pytest.mark.parametrize(
    "occupant",
    ["other-size", "has-backing", "not-qcow2", "empty-file", "raw-image", "directory",
     "dangling-symlink"],
)
def test_create_disk_never_touches_something_else(
    qemu: Qemu, tmp_path: Path, occupant: str
) -> None:
    path = _occupants(tmp_path, qemu)[occupant]
    before = snapshot(path) if not path.is_symlink() else (os.readlink(path),)
    with pytest.raises(DiskExistsError) as info:
        create_disk(path, size=GiB, persistent=False)
    assert isinstance(info.value, FileExistsError)
    assert info.value.path == str(path)
    after = snapshot(path) if not path.is_symlink() else (os.readlink(path),)
    assert after == before
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_create_disk_leaves_no_temporary_files(tmp_path: Path) -> None:
    for i in range(5):
        create_disk(tmp_path / f"d{i}.qcow2", True, size=MiB)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"d{i}.qcow2" for i in range(5)]


# -- create_cow_child_disk: the interop matrix --------------------------------


@pytest.mark.parametrize("cluster_size", CLUSTER_SIZES)
@pytest.mark.parametrize("base_format", ["raw", "qcow2"])
@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_child_is_clean_and_reads_through(
    qemu: Qemu, tmp_path: Path, request: pytest.FixtureRequest,
    cluster_size: int, base_format: str, relative: bool,
) -> None:
    base: Path = request.getfixturevalue(f"{base_format}_base")
    base_digest = digest(base)
    child = tmp_path / "boxes" / "b1" / "disk.qcow2"
    disk = create_cow_child_disk(base, BackingFormat(base_format), child, relative=relative,
                                 cluster_size=cluster_size, persistent=False)
    try:
        qemu.assert_clean(child)
        info = qemu.info(child)
        assert info["virtual-size"] == 4 * MiB
        assert info["cluster-size"] == cluster_size
        expected_name = "../../bases/" + base.name if relative else os.path.realpath(base)
        assert info["backing-filename"] == expected_name
        assert info["backing-filename-format"] == base_format
        assert os.path.samefile(info["full-backing-filename"], base)
        assert read_backing_file_path(child) == expected_name

        qemu.io("-c", "read -P 0x5a 0 1M", "-c", "read -P 0xc3 1M 1M",
                "-c", "read -P 0x5a 2M 2M", child)
        qemu.write(child, ["write -P 0xee 512k 1M", "write -z 3M 4k"])
        qemu.assert_clean(child)
        qemu.io("-c", "read -P 0x5a 0 512k", "-c", "read -P 0xee 512k 1M",
                "-c", "read -P 0xc3 1536k 512k", "-c", "read -P 0x5a 2M 1M",
                "-c", "read -P 0 3M 4k", "-c", "read -P 0x5a 3076k 1020k", child)
        assert digest(base) == base_digest
    finally:
        disk.close()
    assert not child.exists()
    assert base.exists()


def test_child_is_ephemeral_by_default_and_persistent_on_request(
    tmp_path: Path, raw_base: Path
) -> None:
    eph = create_cow_child_disk(raw_base, BackingFormat.RAW, tmp_path / "e.qcow2", persistent=False)
    assert not eph.persistent
    eph.close()
    assert not (tmp_path / "e.qcow2").exists()
    per = create_cow_child_disk(raw_base, BackingFormat.RAW, tmp_path / "p.qcow2",
                                persistent=True)
    per.close()
    assert (tmp_path / "p.qcow2").exists()


def test_child_default_size_is_base_size(qemu: Qemu, tmp_path: Path) -> None:
    raw = tmp_path / "odd.raw"
    raw.write_bytes(b"\x01" * (3 * MiB + 1000))
    with create_cow_child_disk(raw, "raw", tmp_path / "c1.qcow2", persistent=False) as c1:
        # QEMU rounds a qcow2's size up to whole sectors; boxdisk does the same.
        assert qemu.info(c1.path)["virtual-size"] == 3 * MiB + 1024
    q = tmp_path / "q.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", q, "7M")
    with create_cow_child_disk(q, BackingFormat.QCOW2, tmp_path / "c2.qcow2",
            persistent=False) as c2:
        assert qemu.info(c2.path)["virtual-size"] == 7 * MiB
        qemu.assert_clean(c2.path)


def test_child_larger_than_base_reads_zeros_past_it(
    qemu: Qemu, tmp_path: Path, raw_base: Path
) -> None:
    with create_cow_child_disk(raw_base, "raw", tmp_path / "big.qcow2", 64 * MiB,
            persistent=False) as child:
        qemu.assert_clean(child.path)
        assert qemu.info(child.path)["virtual-size"] == 64 * MiB
        qemu.io("-c", "read -P 0x5a 0 1M", "-c", "read -P 0 4M 60M", child.path)


def test_child_of_child_of_qemu_v2_base(qemu: Qemu, tmp_path: Path) -> None:
    base = tmp_path / "v2.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4096", base, "2M")
    qemu.write(base, ["write -P 0x42 0 2M"])
    mid = create_cow_child_disk(base, "qcow2", tmp_path / "mid.qcow2", persistent=True)
    top = create_cow_child_disk(mid.path, "qcow2", tmp_path / "top.qcow2", relative=True,
                                persistent=True)
    qemu.write(mid.path, ["write -P 0x43 0 4k"])
    qemu.io("-c", "read -P 0x43 0 4k", "-c", "read -P 0x42 4k 2044k", top.path)
    chain = qemu.info(top.path, "--backing-chain")
    assert [i["format"] for i in chain] == ["qcow2", "qcow2", "qcow2"]
    for image in (top.path, mid.path):
        qemu.assert_clean(image)


def test_relative_child_survives_moving_the_tree(
    qemu: Qemu, tmp_path: Path, raw_base: Path
) -> None:
    child = tmp_path / "boxes" / "b1" / "disk.qcow2"
    create_cow_child_disk(raw_base, "raw", child, relative=True, persistent=False).leak()
    qemu.write(child, ["write -P 0x77 0 4k"])
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    shutil.move(tmp_path, moved)
    try:
        moved_child = moved / "boxes" / "b1" / "disk.qcow2"
        qemu.assert_clean(moved_child)
        qemu.io("-c", "read -P 0x77 0 4k", "-c", "read -P 0x5a 4k 1020k", moved_child)
    finally:
        shutil.move(moved, tmp_path)


def test_absolute_name_is_the_real_path(qemu: Qemu, tmp_path: Path, raw_base: Path) -> None:
    link_dir = tmp_path / "link"
    link_dir.symlink_to(raw_base.parent)
    with create_cow_child_disk(link_dir / "base.raw", "raw", tmp_path / "c.qcow2",
            persistent=False) as child:
        assert read_backing_file_path(child.path) == os.path.realpath(raw_base)
        assert qemu.info(child.path)["backing-filename"] == str(raw_base.resolve())


def test_relative_name_through_symlinked_child_dir(
    qemu: Qemu, tmp_path: Path, raw_base: Path
) -> None:
    real = tmp_path / "deep" / "er"
    real.mkdir(parents=True)
    (tmp_path / "alias").symlink_to(real)
    child = tmp_path / "alias" / "c.qcow2"
    with create_cow_child_disk(raw_base, "raw", child, relative=True, persistent=False):
        # QEMU opens the name relative to the child's directory as the kernel resolves it.
        qemu.assert_clean(child)
        qemu.io("-c", "read -P 0x5a 0 1M", child)


def test_unicode_paths(qemu: Qemu, tmp_path: Path, raw_base: Path) -> None:
    base = raw_base.parent / "básé ✓.raw"
    raw_base.rename(base)
    for relative in (False, True):
        child = tmp_path / "bóx" / f"dïsk-{relative}.qcow2"
        with create_cow_child_disk(base, "raw", child, relative=relative, persistent=False):
            qemu.assert_clean(child)
            assert os.path.samefile(qemu.info(child)["full-backing-filename"], base)


def test_backing_format_accepts_names(tmp_path: Path, raw_base: Path) -> None:
    for i, fmt in enumerate(["raw", "RAW", DiskFormat.RAW, DiskFormat.EXT4, BackingFormat.RAW]):
        with create_cow_child_disk(raw_base, fmt, tmp_path / f"c{i}.qcow2",
                persistent=False) as child:
            assert boxdisk.read_header(child.path).backing_format == "raw"
    with pytest.raises(InvalidArgumentError) as info:
        create_cow_child_disk(raw_base, "vmdk", tmp_path / "x.qcow2", persistent=False)
    assert info.value.field == "backing_format"
    assert not (tmp_path / "x.qcow2").exists()


# -- create_cow_child_disk: refusals ----------------------------------------------


def test_child_of_missing_base_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BackingChainError):
        create_cow_child_disk(tmp_path / "nope.raw", "raw", tmp_path / "c.qcow2", persistent=False)
    with pytest.raises(BackingChainError):
        create_cow_child_disk(tmp_path, "raw", tmp_path / "c.qcow2", persistent=False)
    assert not (tmp_path / "c.qcow2").exists()


def test_qcow2_child_of_non_qcow2_base_is_refused(tmp_path: Path, raw_base: Path) -> None:
    with pytest.raises(BoxdiskError) as info:
        create_cow_child_disk(raw_base, "qcow2", tmp_path / "c.qcow2", persistent=False)
    assert info.value.field == "magic"
    assert not (tmp_path / "c.qcow2").exists()


def test_backing_name_too_long_is_refused(tmp_path: Path) -> None:
    deep = tmp_path
    while len(str(deep)) < 1100:
        deep = deep / ("d" * 100)
    deep.mkdir(parents=True)
    base = deep / "base.raw"
    base.write_bytes(bytes(MiB))
    with pytest.raises(InvalidArgumentError):
        create_cow_child_disk(base, "raw", tmp_path / "c.qcow2", persistent=False)
    assert not (tmp_path / "c.qcow2").exists()
    # ...but the same base, named relatively, fits.
    with create_cow_child_disk(base, "raw", deep / "c.qcow2", relative=True,
            persistent=False) as child:
        assert read_backing_file_path(child.path) == "base.raw"


def test_existing_same_child_is_returned_persistent(
    qemu: Qemu, tmp_path: Path, raw_base: Path
) -> None:
    child = tmp_path / "c.qcow2"
    create_cow_child_disk(raw_base, "raw", child, relative=True, persistent=False).leak()
    qemu.write(child, ["write -P 0x99 0 4k"])  # the box's data
    before = snapshot(child)
    # Same backing named differently (absolute now, through a symlink): same file.
    (tmp_path / "alias.raw").symlink_to(raw_base)
    again = create_cow_child_disk(tmp_path / "alias.raw", BackingFormat.RAW, child,
            persistent=False)
    assert again.persistent
    again.close()
    assert snapshot(child) == before


def test_existing_qemu_child_is_returned(qemu: Qemu, tmp_path: Path, raw_base: Path) -> None:
    child = tmp_path / "c.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-b", raw_base, "-F", "raw", child)
    with create_cow_child_disk(raw_base, "raw", child, persistent=False) as again:
        assert again.persistent
    assert child.exists()


@pytest.mark.parametrize("what", ["other-base", "other-size", "other-format", "standalone",
                                  "garbage", "directory"])
def test_existing_different_child_is_refused_untouched(
    qemu: Qemu, tmp_path: Path, raw_base: Path, what: str
) -> None:
    child = tmp_path / "c.qcow2"
    other = tmp_path / "other.raw"
    other.write_bytes(bytes(4 * MiB))
    if what == "other-base":
        qemu.img("create", "-q", "-f", "qcow2", "-b", other, "-F", "raw", child)
    elif what == "other-size":
        qemu.img("create", "-q", "-f", "qcow2", "-b", raw_base, "-F", "raw", child, "8M")
    elif what == "other-format":
        qemu.img("create", "-q", "-f", "qcow2", "-u", "-b", raw_base, "-F", "qcow2", child, "4M")
    elif what == "standalone":
        qemu.img("create", "-q", "-f", "qcow2", child, "4M")
    elif what == "garbage":
        child.write_bytes(b"guest data, not an image" * 100)
    else:
        child.mkdir()
    before = snapshot(child)
    with pytest.raises(DiskExistsError):
        create_cow_child_disk(raw_base, "raw", child, persistent=False)
    assert snapshot(child) == before


def test_many_children_of_one_base(qemu: Qemu, tmp_path: Path, raw_base: Path) -> None:
    children = [
        create_cow_child_disk(raw_base, "raw", tmp_path / "boxes" / f"b{i}" / "disk.qcow2",
                              persistent=True).path
        for i in range(20)
    ]
    for i, child in enumerate(children[:5]):
        qemu.write(child, [f"write -P {i + 1} 0 64k"])
    for i, child in enumerate(children[:5]):
        qemu.io("-c", f"read -P {i + 1} 0 64k", "-c", "read -P 0x5a 64k 960k", child)
    qemu.io("-c", "read -P 0x5a 0 64k", children[10])


@pytest.mark.parametrize("o_tmpfile", [True, False])
def test_new_images_with_and_without_o_tmpfile(tmp_path: Path, o_tmpfile: bool,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """O_TMPFILE + linkat where the file system has it; the named temporary file otherwise.

    Either way the target appears whole, no temporary name is left behind,
    and an existing file is never replaced.
    """
    from boxdisk import _io  # noqa: PLC0415

    monkeypatch.setattr(_io, "use_o_tmpfile", o_tmpfile and _io.use_o_tmpfile)
    base = tmp_path / "base.qcow2"
    with create_disk(base, True, size=1 << 20):
        pass
    child = tmp_path / "child.qcow2"
    with create_cow_child_disk(base, "qcow2", child, persistent=True) as disk:
        assert disk.path == child
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.qcow2", "child.qcow2"]
    assert boxdisk.read_header(child).backing_file == str(base.resolve())
    with pytest.raises(DiskExistsError):
        create_cow_child_disk(base, "raw", child, persistent=True)
