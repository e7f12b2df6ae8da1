"""The original qcow2.rs tests, ported in spirit (its flatten tests live with flatten).

The seed built its fixtures by hand as 1 KiB files that were not valid qcow2
(cluster_bits 0); boxdisk validates every header it reads, so the fixtures here
are real images made by QEMU (``-u``: the backing file need not exist).
Test names keep the seed's, so the two can be read side by side.
"""

from __future__ import annotations

import inspect
import os
import struct
from pathlib import Path

import pytest

import boxdisk
from boxdisk import (
    BackingChainError,
    BackingFormat,
    BoxdiskError,
    DiskFormat,
    ImageIOError,
    InvalidArgumentError,
    NotQcow2Error,
    read_backing_file_path,
    set_backing_file_path,
)
from tests.conftest import Qemu


@pytest.fixture
def write_qcow2_with_backing(qemu: Qemu):  # type: ignore[no-untyped-def]
    """The seed's helper: a qcow2 at ``path`` naming ``backing`` (or none)."""

    def make(path: Path, backing: str | None) -> None:
        args = ["create", "-q", "-f", "qcow2"]
        if backing is not None:
            args += ["-u", "-b", backing, "-F", "raw"]
        qemu.img(*args, path, "1M")

    return make


def test_read_backing_file_path_with_backing(write_qcow2_with_backing, tmp_path: Path) -> None:
    path = tmp_path / "test.qcow2"
    write_qcow2_with_backing(path, "/data/rootfs/base.ext4")
    assert read_backing_file_path(path) == "/data/rootfs/base.ext4"


def test_read_backing_file_path_no_backing(write_qcow2_with_backing, tmp_path: Path) -> None:
    path = tmp_path / "test.qcow2"
    write_qcow2_with_backing(path, None)
    assert read_backing_file_path(path) is None


def test_read_backing_file_path_invalid_magic(tmp_path: Path) -> None:
    path = tmp_path / "bad.qcow2"
    path.write_bytes(struct.pack(">I", 0xDEADBEEF) + bytes(60))
    with pytest.raises(NotQcow2Error) as info:
        read_backing_file_path(path)
    assert info.value.field == "magic"
    assert "not a qcow2 image" in str(info.value)
    assert str(path) in str(info.value)


def test_read_backing_file_path_file_too_short(tmp_path: Path) -> None:
    path = tmp_path / "short.qcow2"
    path.write_bytes(bytes(10))
    with pytest.raises(BoxdiskError):
        read_backing_file_path(path)
    # Ten bytes that do start with the magic are a truncated header, not "not qcow2".
    path.write_bytes(b"QFI\xfb" + bytes(6))
    with pytest.raises(BoxdiskError) as info:
        read_backing_file_path(path)
    assert info.value.field == "header"


def test_read_backing_file_path_nonexistent_file() -> None:
    with pytest.raises(ImageIOError) as info:
        read_backing_file_path(Path("/nonexistent/file.qcow2"))
    assert info.value.path == "/nonexistent/file.qcow2"
    assert isinstance(info.value, OSError)


def test_backing_format_as_str() -> None:
    assert BackingFormat.RAW.as_str() == "raw"
    assert BackingFormat.QCOW2.as_str() == "qcow2"
    assert [f.value for f in BackingFormat] == ["raw", "qcow2"]
    assert {f.name for f in DiskFormat} == {"QCOW2", "RAW", "EXT4"}


# -- set_backing_file_path ------------------------------------------------------


def _raw(path: Path, size: int = 1024) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(size))
    return path


def test_set_backing_file_path_roundtrip(write_qcow2_with_backing, tmp_path: Path) -> None:
    path = tmp_path / "test.qcow2"
    old = _raw(tmp_path / "old_backing.raw")
    write_qcow2_with_backing(path, str(old))
    assert read_backing_file_path(path) is not None
    new = _raw(tmp_path / "new_backing.raw")
    set_backing_file_path(path, new)
    assert read_backing_file_path(path) == os.path.realpath(new)


def _old_name_bytes_zeroed(path: Path, old_len: int) -> None:
    head = path.read_bytes()[:65536]
    offset, size = struct.unpack_from(">QI", head, 8)
    assert not any(head[offset + size : offset + old_len])


def test_set_backing_file_path_shorter_path(
    write_qcow2_with_backing, qemu: Qemu, tmp_path: Path
) -> None:
    path = tmp_path / "test.qcow2"
    long = _raw(tmp_path / "very" / "deeply" / "nested" / "original_backing_file.raw", 512)
    write_qcow2_with_backing(path, str(long))
    short = _raw(tmp_path / "b.raw", 512)
    set_backing_file_path(path, short)
    assert read_backing_file_path(path) == os.path.realpath(short)
    _old_name_bytes_zeroed(path, len(str(long)))
    qemu.assert_clean(path)
    assert qemu.info(path)["backing-filename"] == os.path.realpath(short)


def test_set_backing_file_path_longer_path(
    write_qcow2_with_backing, qemu: Qemu, tmp_path: Path
) -> None:
    path = tmp_path / "test.qcow2"
    short = _raw(tmp_path / "a.raw", 512)
    write_qcow2_with_backing(path, str(short))
    long = _raw(tmp_path / "some" / "longer" / "directory" / "new_long_backing_file.raw", 512)
    set_backing_file_path(path, long)
    assert read_backing_file_path(path) == os.path.realpath(long)
    qemu.assert_clean(path)
    assert qemu.info(path)["backing-filename"] == os.path.realpath(long)


def test_set_backing_file_path_no_existing_backing(
    write_qcow2_with_backing, tmp_path: Path
) -> None:
    path = tmp_path / "no_backing.qcow2"
    write_qcow2_with_backing(path, None)
    before = path.read_bytes()
    with pytest.raises(BoxdiskError) as info:
        set_backing_file_path(path, _raw(tmp_path / "new.raw", 512))
    assert "no existing backing file reference" in str(info.value)
    assert isinstance(info.value, InvalidArgumentError)
    assert path.read_bytes() == before


def test_set_backing_file_path_nonexistent_new_backing(
    write_qcow2_with_backing, tmp_path: Path
) -> None:
    path = tmp_path / "test.qcow2"
    write_qcow2_with_backing(path, str(_raw(tmp_path / "old.raw", 512)))
    before = path.read_bytes()
    with pytest.raises(BackingChainError) as info:
        set_backing_file_path(path, Path("/nonexistent/path.raw"))
    assert "/nonexistent/path.raw" in str(info.value)
    assert path.read_bytes() == before


def test_set_backing_file_path_invalid_qcow2(tmp_path: Path) -> None:
    bad = tmp_path / "not_qcow2.bin"
    bad.write_bytes(bytes(64))
    with pytest.raises(NotQcow2Error) as info:
        set_backing_file_path(bad, _raw(tmp_path / "new.raw", 512))
    assert "not a qcow2 image" in str(info.value)
    assert bad.read_bytes() == bytes(64)


# -- the seed's public surface ----------------------------------------------------


SEED_NAMES = [
    "create_disk", "create_cow_child_disk", "qcow2_virtual_size", "read_backing_file_path",
    "set_backing_file_path", "read_backing_chain", "is_backing_dependency", "clone_disk_pair",
    "BackingFormat", "DiskFormat", "Disk",
]


@pytest.mark.parametrize("name", SEED_NAMES)
def test_seed_names_are_exported(name: str) -> None:
    assert name in boxdisk.__all__
    assert getattr(boxdisk, name) is getattr(boxdisk.qcow2, name)


def test_seed_signatures() -> None:
    sig = inspect.signature(boxdisk.create_disk)
    assert list(sig.parameters)[:2] == ["path", "persistent"]
    # Issue 12: no default, as in the Rust runtime (a caller always says which it wants).
    assert sig.parameters["persistent"].default is inspect.Parameter.empty
    assert sig.parameters["size"].default == 10 * 1024**3
    sig = inspect.signature(boxdisk.create_cow_child_disk)
    assert list(sig.parameters)[:4] == ["base_disk", "backing_format", "child_path",
                                        "virtual_size"]
    assert sig.parameters["persistent"].default is inspect.Parameter.empty
    sig = inspect.signature(boxdisk.clone_disk_pair)
    positional = [n for n, p in sig.parameters.items() if p.kind is not p.KEYWORD_ONLY]
    assert positional == ["src_container", "dst_container", "src_guest", "dst_dir"]
    # Extensions beyond the seed (``relative``) are keyword-only, so seed calls still bind.
    assert all(p.default is not p.empty for p in sig.parameters.values()
               if p.kind is p.KEYWORD_ONLY)
    sig = inspect.signature(boxdisk.set_backing_file_path)
    assert list(sig.parameters)[:2] == ["qcow2_path", "new_backing"]


@pytest.mark.parametrize("name", sorted(set(boxdisk.__all__) - {"__version__"}))
def test_every_public_name_is_documented(name: str) -> None:
    obj = getattr(boxdisk, name)
    if callable(obj):
        assert inspect.getdoc(obj), f"boxdisk.{name} has no docstring"
