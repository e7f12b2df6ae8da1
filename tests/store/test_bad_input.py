"""Bad input to the store: refused with the documented error before any file is touched.

Box ids and snapshot names (and base names) must be single safe path
components; unknown ones are NotFoundError, taken ones AlreadyExistsError; a
directory that is not a store, or one a newer boxdisk wrote, is refused
without a change.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from boxdisk import CorruptImageError, InvalidArgumentError
from boxdisk._errors import (
    AlreadyExistsError,
    InvalidNameError,
    NotFoundError,
    StoreError,
    StoreFormatError,
)
from boxdisk.store import BoxStore
from boxdisk.store._names import check_name

from .helpers import SIZE

BAD_NAMES = ["", ".", "..", ".hidden", "a/b", "/abs", "a\\b", "nul\0byte", "x" * 256,
             "é" * 200, "tab\there", "new\nline", 7, b"bytes"]


def _tree(root: Path, *, meta: bool = True) -> list[tuple[str, int, int]]:
    """Every entry under ``root`` with its size and mtime: equal before and after = untouched.

    ``meta=False`` leaves out ``.boxdisk/`` (checking only that its journal and
    trash are empty): looking a box up takes its lock, a lock file once made
    stays (waiters must share its inode), and a refusal that comes after an
    operation began leaves its journal directory's mtime changed.
    """
    out = []
    if not meta:
        assert not os.listdir(root / ".boxdisk" / "journal")
        assert not os.listdir(root / ".boxdisk" / "trash")
    for dirpath, dirnames, filenames in os.walk(root):
        if not meta and ".boxdisk" in dirnames:
            dirnames.remove(".boxdisk")
        for name in sorted(dirnames + filenames):
            st = os.lstat(os.path.join(dirpath, name))
            # A directory's mtime moves when a staging entry comes and goes: files only.
            mtime = 0 if stat.S_ISDIR(st.st_mode) else st.st_mtime_ns
            out.append((os.path.relpath(os.path.join(dirpath, name), root), st.st_size, mtime))
    return sorted(out)


@pytest.fixture
def populated(tmp_path: Path) -> BoxStore:
    store = BoxStore(tmp_path / "store")
    store.create_box("vm", size=SIZE)
    store.snapshot("vm", "s1")
    yield store
    store.close()


def _calls(bad: Any, tmp: Path) -> list[Callable[[BoxStore], object]]:
    img = tmp / "img.qcow2"
    return [
        lambda s: s.create_box(bad, size=SIZE),
        lambda s: s.create_box("new", base=bad),
        lambda s: s.create_box("new", size=SIZE, guest_base=bad),
        lambda s: s.box(bad),
        lambda s: s.list_snapshots(bad),
        lambda s: s.snapshot(bad, "x"),
        lambda s: s.snapshot("vm", bad),
        lambda s: s.restore("vm", bad),
        lambda s: s.restore(bad, "s1"),
        lambda s: s.clone_box("vm", bad),
        lambda s: s.clone_box(bad, "new"),
        lambda s: s.remove_snapshot("vm", bad),
        lambda s: s.remove_box(bad),
        lambda s: s.export_box(bad, tmp / "out.qcow2"),
        lambda s: s.export_box("vm", tmp / "out.qcow2", snapshot=bad),
        lambda s: s.import_box(bad, img),
        lambda s: s.add_base(img, bad, backing_format="qcow2"),
        lambda s: s.base_path(bad),
        lambda s: s.snapshot_info("vm", bad),
    ]


@pytest.mark.parametrize("bad", BAD_NAMES, ids=repr)
def test_invalid_names_touch_nothing(populated: BoxStore, tmp_path: Path, bad: Any) -> None:
    (tmp_path / "img.qcow2").write_bytes(b"")
    before = _tree(populated.root)
    for call in _calls(bad, tmp_path):
        with pytest.raises(InvalidNameError) as err:
            call(populated)
        assert isinstance(err.value, ValueError)
        assert err.value.value == bad
    assert _tree(populated.root) == before


@settings(max_examples=200, deadline=None)
@given(name=st.text(min_size=1, max_size=300))
def test_names_are_checked_for_every_string(name: str) -> None:
    ok = (len(name) <= 255 and not name.startswith(".") and name.isprintable()
          and not any(c in name for c in "/\\\0")
          and len(name.encode("utf-8", "surrogatepass")) <= 255)
    if ok:
        assert check_name(name, "box id") == name
    else:
        with pytest.raises(InvalidNameError):
            check_name(name, "box id")


def test_unknown_things_are_not_found(populated: BoxStore, tmp_path: Path) -> None:
    before = _tree(populated.root, meta=False)
    calls: list[Callable[[], object]] = [
        lambda: populated.box("ghost"),
        lambda: populated.list_snapshots("ghost"),
        lambda: populated.snapshot("ghost", "s"),
        lambda: populated.restore("ghost", "s1"),
        lambda: populated.restore("vm", "ghost"),
        lambda: populated.clone_box("ghost", "new"),
        lambda: populated.remove_snapshot("vm", "ghost"),
        lambda: populated.remove_snapshot("ghost", "s1"),
        lambda: populated.remove_box("ghost"),
        lambda: populated.export_box("ghost", tmp_path / "o.qcow2"),
        lambda: populated.export_box("vm", tmp_path / "o.qcow2", snapshot="ghost"),
        lambda: populated.create_box("new", base="ghost"),
        lambda: populated.create_box("new", size=SIZE, guest_base="ghost"),
        lambda: populated.base_path("ghost"),
        lambda: populated.add_base(tmp_path / "missing.qcow2", "b", backing_format="qcow2"),
        lambda: populated.import_box("new", tmp_path / "missing.qcow2"),
    ]
    for call in calls:
        with pytest.raises(NotFoundError) as err:
            call()
        assert isinstance(err.value, LookupError) and err.value.path
    assert _tree(populated.root, meta=False) == before


def test_taken_names_already_exist(qemu, populated: BoxStore, tmp_path: Path) -> None:
    img = tmp_path / "img.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", img, str(SIZE))
    populated.add_base(img, "b", backing_format="qcow2")
    before = _tree(populated.root, meta=False)
    calls: list[Callable[[], object]] = [
        lambda: populated.create_box("vm", size=SIZE),
        lambda: populated.snapshot("vm", "s1"),
        lambda: populated.clone_box("vm", "vm"),
        lambda: populated.import_box("vm", img),
        lambda: populated.add_base(img, "b", backing_format="qcow2"),
    ]
    for call in calls:
        with pytest.raises(AlreadyExistsError) as err:
            call()
        assert isinstance(err.value, FileExistsError)
    assert _tree(populated.root, meta=False) == before


def test_bad_images_are_refused(qemu, populated: BoxStore, tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    child = tmp_path / "child.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", base, str(SIZE))
    qemu.img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", child)
    before = _tree(populated.root, meta=False)
    with pytest.raises(InvalidArgumentError, match="backing file"):
        populated.add_base(child, "child", backing_format="qcow2")
    with pytest.raises(InvalidArgumentError, match="backing file"):
        populated.import_box("child", child)
    with pytest.raises(InvalidArgumentError):
        populated.import_box("x", base, format="vmdk")
    with pytest.raises(InvalidArgumentError):
        populated.add_base(base, "x", backing_format="vmdk")
    for size in (-1, 1.5, "10G", True):
        with pytest.raises(InvalidArgumentError):
            populated.create_box("x", size=size)  # type: ignore[arg-type]
    # A refcount table entry pointing past the file: qemu-img check calls it corrupt.
    corrupt = tmp_path / "corrupt.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", corrupt, str(SIZE))
    qemu.write(corrupt, ["write -P 0x1 0 64k"])
    data = bytearray(corrupt.read_bytes())
    rt_offset = int.from_bytes(data[48:56], "big")
    data[rt_offset:rt_offset + 8] = (1 << 40).to_bytes(8, "big")
    corrupt.write_bytes(bytes(data))
    assert qemu.check(corrupt).get("check-errors", 0) or qemu.check(corrupt).get("corruptions")
    with pytest.raises(CorruptImageError, match="corruptions") as err:
        populated.import_box("bad", corrupt)
    assert err.value.path == str(corrupt)
    with pytest.raises(CorruptImageError):
        populated.add_base(corrupt, "bad", backing_format="qcow2")
    assert _tree(populated.root, meta=False) == before


def test_not_a_store_is_refused_unchanged(tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    before = _tree(busy)
    with pytest.raises(StoreFormatError, match="not a boxdisk store"):
        BoxStore(busy)
    assert _tree(busy) == before
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(StoreFormatError, match="not a directory"):
        BoxStore(afile)
    assert afile.read_text() == "x"


def test_a_version_1_store_is_migrated_on_open(tmp_path: Path) -> None:
    """Version 2 added live state; a version-1 store (none) only gets the new marker."""
    root = tmp_path / "store"
    with BoxStore(root) as store:
        store.create_box("vm1")
    marker = root / ".boxdisk" / "store.json"
    marker.write_text(json.dumps({"format": "boxdisk-store", "version": 1, "created": 1.0}))
    with BoxStore(root) as store:
        assert store.list_boxes() == ["vm1"]
    info = json.loads(marker.read_text())
    assert info == {"format": "boxdisk-store", "version": 2, "created": 1.0,
                    "migrated_from": 1}
    assert not [n for n in os.listdir(root / ".boxdisk") if n.startswith(".")]


@pytest.mark.parametrize(("content", "match"), [
    ({"format": "boxdisk-store", "version": 3}, "newer boxdisk"),
    ({"format": "boxdisk-store", "version": 99, "future": True}, "newer boxdisk"),
    ({"format": "something-else", "version": 1}, "not a boxdisk store"),
    ({"format": "boxdisk-store"}, "no valid version"),
    ([1, 2, 3], "not a boxdisk store"),
    (None, "cannot read"),
])
def test_marker_problems(tmp_path: Path, content: Any, match: str) -> None:
    root = tmp_path / "store"
    BoxStore(root).close()
    marker = root / ".boxdisk" / "store.json"
    marker.chmod(0o644)
    marker.write_text("{not json" if content is None else json.dumps(content))
    before = _tree(root)
    with pytest.raises(StoreFormatError, match=match) as err:
        BoxStore(root)
    assert err.value.path
    assert _tree(root) == before
    marker.unlink()
    with pytest.raises(StoreFormatError, match=r"store\.json is missing"):
        BoxStore(root)


def test_lock_timeout_and_closed_store(tmp_path: Path) -> None:
    for bad in (-1, "soon", None):
        with pytest.raises(InvalidArgumentError):
            BoxStore(tmp_path / "s", lock_timeout=bad)  # type: ignore[arg-type]
    store = BoxStore(tmp_path / "s2", lock_timeout=0.5)
    assert store.lock_timeout == 0.5
    store.close()
    store.close()  # idempotent
    assert store.closed
    with pytest.raises(StoreError, match="closed"):
        store.create_box("vm", size=SIZE)
    with pytest.raises(StoreError, match="closed"), store:
        pass
