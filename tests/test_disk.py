"""Disk: the RAII handle. Ephemeral disks go with their handle; nothing else ever does.

Ownership, as boxdisk/_disk.py states it: a persistent disk is never deleted;
``leak()`` disarms; a handle deletes only the file it was made for (same inode);
a file inside a boxdisk store (an ancestor holds ``.boxdisk/``) is left to the store.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest

from boxdisk import (
    Disk,
    DiskExistsError,
    DiskFormat,
    ImageIOError,
    InvalidArgumentError,
    create_cow_child_disk,
    create_disk,
)

MiB = 1 << 20


def new_disk(path: Path, persistent: bool = False) -> Disk:
    return create_disk(path, persistent, size=MiB)


def test_ephemeral_disk_is_deleted_on_close(tmp_path: Path) -> None:
    disk = new_disk(tmp_path / "e.qcow2")
    assert disk.path.exists()
    assert not disk.closed
    disk.close()
    assert disk.closed
    assert not disk.path.exists()


def test_close_is_idempotent(tmp_path: Path) -> None:
    disk = new_disk(tmp_path / "e.qcow2")
    disk.close()
    disk.close()
    with disk:
        pass
    assert not disk.path.exists()


def test_close_of_missing_file_does_not_raise(tmp_path: Path) -> None:
    disk = new_disk(tmp_path / "e.qcow2")
    disk.path.unlink()
    disk.close()
    assert disk.closed


def test_context_manager(tmp_path: Path) -> None:
    with new_disk(tmp_path / "e.qcow2") as disk:
        assert isinstance(disk, Disk)
        assert disk.path.exists()
        assert os.fspath(disk) == str(tmp_path / "e.qcow2")
    assert not disk.path.exists()


def test_context_manager_cleans_up_on_error(tmp_path: Path) -> None:
    path = tmp_path / "e.qcow2"
    with pytest.raises(RuntimeError), new_disk(path):
        raise RuntimeError
    assert not path.exists()


def test_persistent_disk_is_never_deleted(tmp_path: Path) -> None:
    disk = new_disk(tmp_path / "p.qcow2", persistent=True)
    disk.close()
    with disk:
        pass
    del disk
    gc.collect()
    assert (tmp_path / "p.qcow2").exists()


def test_collected_ephemeral_disk_is_deleted(tmp_path: Path) -> None:
    path = tmp_path / "e.qcow2"
    with pytest.warns(ResourceWarning, match="garbage-collected without close"):
        new_disk(path)  # the handle is dropped at once
        gc.collect()
    assert not path.exists()


def test_collected_disk_warns_as_unclosed_files_do(tmp_path: Path) -> None:
    path = tmp_path / "e.qcow2"
    with pytest.warns(ResourceWarning) as record:
        disk = new_disk(path)
        del disk
        gc.collect()
    assert str(path) in str(record[0].message)
    assert "leak()" in str(record[0].message)


def test_leak_disarms_and_returns_path(tmp_path: Path) -> None:
    disk = new_disk(tmp_path / "e.qcow2")
    assert disk.leak() == tmp_path / "e.qcow2"
    assert disk.persistent
    assert disk.closed
    disk.close()
    del disk
    gc.collect()
    assert (tmp_path / "e.qcow2").exists()
    assert disk_leak_twice(tmp_path) == tmp_path / "twice.qcow2"


def disk_leak_twice(tmp_path: Path) -> Path:
    disk = new_disk(tmp_path / "twice.qcow2")
    disk.leak()
    return disk.leak()


def test_replaced_file_is_not_deleted(tmp_path: Path) -> None:
    path = tmp_path / "e.qcow2"
    disk = new_disk(path)
    os.link(path, tmp_path / "old-inode")  # keeps the old inode number in use
    path.unlink()
    path.write_bytes(b"a new file someone else put here")
    disk.close()
    assert path.read_bytes() == b"a new file someone else put here"


def test_replaced_file_with_recycled_inode_is_not_deleted(tmp_path: Path) -> None:
    """unlink + create at the same path never looks like the handle's own file.

    ext4 and tmpfs hand a freed inode number to the next new file; the handle
    pins its file while armed, so the number cannot be reused under it.
    """
    path = tmp_path / "e.qcow2"
    for _ in range(20):
        disk = new_disk(path)
        path.unlink()
        path.write_bytes(b"a new file someone else put here")
        disk.close()
        assert path.exists(), "deleted a file the handle never made"
        path.unlink()


def test_replaced_file_is_not_deleted_by_finalizer(tmp_path: Path) -> None:
    path = tmp_path / "e.qcow2"
    disk = new_disk(path)
    tmp = tmp_path / "other"
    tmp.write_bytes(b"other")
    os.replace(tmp, path)
    with pytest.warns(ResourceWarning):
        del disk
        gc.collect()
    assert path.read_bytes() == b"other"


def test_renamed_away_file_is_not_followed(tmp_path: Path) -> None:
    path = tmp_path / "e.qcow2"
    disk = new_disk(path)
    path.rename(tmp_path / "kept.qcow2")
    disk.close()
    assert (tmp_path / "kept.qcow2").exists()


def test_file_inside_store_is_not_deleted(tmp_path: Path) -> None:
    (tmp_path / ".boxdisk").mkdir()
    path = tmp_path / "boxes" / "b1" / "disk.qcow2"
    disk = new_disk(path)
    disk.close()
    assert path.exists()
    other = new_disk(tmp_path / "boxes" / "b2" / "disk.qcow2")
    with pytest.warns(ResourceWarning):
        del other
        gc.collect()
    assert (tmp_path / "boxes" / "b2" / "disk.qcow2").exists()


def test_store_marker_must_be_a_directory(tmp_path: Path) -> None:
    (tmp_path / ".boxdisk").write_text("not a store")
    with new_disk(tmp_path / "e.qcow2") as disk:
        pass
    assert not disk.path.exists()


def test_ephemeral_child_is_deleted_base_is_not(tmp_path: Path) -> None:
    base = new_disk(tmp_path / "base.qcow2", persistent=True)
    with create_cow_child_disk(base.path, "qcow2", tmp_path / "child.qcow2",
            persistent=False) as child:
        assert child.format is DiskFormat.QCOW2
    assert not (tmp_path / "child.qcow2").exists()
    assert base.path.exists()


def test_handle_for_a_file_it_did_not_see_deletes_nothing(tmp_path: Path) -> None:
    """A handle made before its file existed must not delete a file created later by others."""
    path = tmp_path / "late.qcow2"
    disk = Disk(path)
    path.write_bytes(b"someone else's file")
    disk.close()
    assert path.exists(), "the handle deleted a file it never owned"


def test_undeletable_file_raises_image_io_error(tmp_path: Path) -> None:
    d = tmp_path / "ro"
    d.mkdir()
    disk = new_disk(d / "e.qcow2")
    if os.geteuid() == 0:
        # Root ignores directory permissions; the immutable attribute stops it.
        undo = ["chattr", "-i", str(d / "e.qcow2")]
        subprocess.run(["chattr", "+i", str(d / "e.qcow2")], check=True)
    else:
        undo = ["chmod", "700", str(d)]
        d.chmod(0o500)
    try:
        with pytest.raises(ImageIOError):
            disk.close()
    finally:
        subprocess.run(undo, check=True)


def test_disk_repr_and_fields(tmp_path: Path) -> None:
    disk = Disk(tmp_path / "x.raw", DiskFormat.RAW, persistent=True)
    assert disk.format is DiskFormat.RAW
    assert disk.format.as_str() == "raw"
    assert DiskFormat.EXT4.as_str() == "ext4"
    assert "x.raw" in repr(disk)
    assert Disk(str(tmp_path / "s"), persistent=True).path == tmp_path / "s"


def test_ephemeral_disk_is_deleted_at_interpreter_exit(tmp_path: Path) -> None:
    path = tmp_path / "exit.qcow2"
    code = (
        "import boxdisk, sys\n"
        f"d = boxdisk.create_disk({str(path)!r}, False, size=1 << 20)\n"
        "print(d.path.exists())\n"
        "sys.modules['__main__'].keep = d\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert "True" in out.stdout.split()  # boxdisk's log lines may share stdout
    assert not path.exists()


# -- ownership without traps (issue 12) -----------------------------------------


def test_persistent_has_no_default(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        create_disk(tmp_path / "x.qcow2", size=MiB)  # type: ignore[call-arg]
    assert not (tmp_path / "x.qcow2").exists()


def test_a_second_create_of_an_armed_ephemeral_file_is_refused(tmp_path: Path) -> None:
    """The first handle will delete the file: a second handle must not promise to keep it."""
    path = tmp_path / "e.qcow2"
    first = new_disk(path)
    with pytest.raises(DiskExistsError, match="leak"):
        create_disk(path, True, size=MiB)
    with pytest.raises(DiskExistsError):
        create_disk(path, False, size=MiB)
    first.leak()
    again = create_disk(path, True, size=MiB)
    assert again.persistent
    first.close()
    again.close()
    assert path.exists()


def test_handle_for_an_existing_file_never_deletes_it(tmp_path: Path) -> None:
    path = tmp_path / "kept.qcow2"
    create_disk(path, True, size=MiB).close()
    reused = create_disk(path, False, size=MiB)  # asked ephemeral, but did not create it
    assert reused.persistent
    reused.close()
    del reused
    gc.collect()
    assert path.exists()


def test_collected_handle_deletes_only_the_file_it_created(tmp_path: Path) -> None:
    path = tmp_path / "e.qcow2"
    disk = new_disk(path)
    path.unlink()
    path.write_bytes(b"someone else's")
    with pytest.warns(ResourceWarning):
        del disk
        gc.collect()
    assert path.read_bytes() == b"someone else's"


@pytest.mark.parametrize("fmt", ["QCOW2", "qcow2", "Raw", DiskFormat.EXT4])
def test_disk_format_accepts_names_in_any_case(tmp_path: Path, fmt: object) -> None:
    disk = Disk(tmp_path / "d", fmt, persistent=True)  # type: ignore[arg-type]
    assert isinstance(disk.format, DiskFormat)


@pytest.mark.parametrize("fmt", ["QCOW3", 7, None])
def test_disk_format_is_validated(tmp_path: Path, fmt: object) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        Disk(tmp_path / "d", fmt, persistent=True)  # type: ignore[arg-type]
    assert info.value.field == "format"
    assert "DiskFormat." not in str(info.value) or "<" not in str(info.value)


def test_disk_persistent_must_be_a_bool(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="persistent"):
        Disk(tmp_path / "d", DiskFormat.QCOW2, "yes")  # type: ignore[arg-type]
