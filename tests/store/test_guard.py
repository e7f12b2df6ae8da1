"""The removal guard: nothing that anything backs onto is removed; a merge keeps guest bytes.

Dependents come from the images' headers. A refusal names every dependent
image; ``merge=True`` streams the snapshot's data into its dependents first, and
``qemu-img compare`` proves each dependent reads exactly what it read before.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from boxdisk import read_header
from boxdisk._errors import DependentsExistError, SnapshotInUseError
from boxdisk.store import BoxStore, DependencyGraph

from .helpers import MIB, SIZE, assert_reads, assert_store_clean, write

pytestmark = pytest.mark.qemu


def _real(p: Path | str) -> str:
    return os.path.realpath(p)


def _snap(store: BoxStore, box: str, name: str) -> Path:
    return store.root / "boxes" / box / "snapshots" / name / "disk.qcow2"


def _raw_copies(qemu, images: list[str], tmp: Path) -> dict[str, Path]:
    """QEMU's export of what each image's guest reads now."""
    out = {}
    for i, img in enumerate(images):
        raw = tmp / f"before-{i}.raw"
        qemu.img("convert", "-U", "-O", "raw", img, raw)
        out[img] = raw
    return out


def _assert_unchanged(qemu, before: dict[str, Path]) -> None:
    for img, raw in before.items():
        proc = qemu.img("compare", "-U", "-f", "raw", raw, img, check=False)
        assert proc.returncode == 0, f"{img}: {proc.stdout}{proc.stderr}"


def test_snapshot_under_the_live_disk_is_refused(qemu, store: BoxStore) -> None:
    box = store.create_box("vm", size=SIZE)
    store.snapshot("vm", "s1")
    with pytest.raises(SnapshotInUseError) as err:
        store.remove_snapshot("vm", "s1")
    assert err.value.dependents == (_real(box.disk),)
    assert _real(box.disk) in str(err.value)
    assert _snap(store, "vm", "s1").exists()
    assert_store_clean(qemu, store)


def test_refusal_names_every_dependent(qemu, bases: BoxStore) -> None:
    store = bases
    store.create_box("vm", base="os", guest_base="rootfs")
    store.snapshot("vm", "s1")
    store.snapshot("vm", "s2")          # s2 -> s1, live -> s2
    clone = store.clone_box("vm", "copy")  # C -> s2; vm, copy -> C
    with pytest.raises(SnapshotInUseError) as err:
        store.remove_snapshot("vm", "s1")
    deps = set(err.value.dependents)
    c_disk = os.path.realpath(clone.dir / read_header(clone.disk).backing_file)
    expected = {_real(_snap(store, "vm", "s2")), c_disk, _real(store.box("vm").disk),
                _real(clone.disk)}
    guest = {_real(p) for p in (store.box("vm").guest_disk, clone.guest_disk,
                                _snap(store, "vm", "s2").with_name("guest-rootfs.qcow2"))}
    expected |= guest | {os.path.join(os.path.dirname(c_disk), "guest-rootfs.qcow2")}
    assert deps == expected
    # The guard agrees with a fresh graph read from the headers.
    graph = DependencyGraph.scan(store.root)
    s1 = _snap(store, "vm", "s1")
    assert not graph.can_remove(s1)
    assert graph.dependents(s1) | graph.dependents(s1.with_name("guest-rootfs.qcow2")) == deps
    # The clone's base backs onto s2: that snapshot is guarded too, and so is the box.
    with pytest.raises(SnapshotInUseError):
        store.remove_snapshot("vm", "s2")
    with pytest.raises(DependentsExistError) as box_err:
        store.remove_box("vm")
    assert set(box_err.value.dependents) >= {_real(clone.disk), c_disk}
    assert store.list_boxes() == ["copy", "vm"]
    assert_store_clean(qemu, store)


def test_merge_keeps_every_dependent_byte_identical(qemu, bases: BoxStore,
                                                    tmp_path: Path) -> None:
    store = bases
    box = store.create_box("vm", base="os", guest_base="rootfs")
    write(qemu, box.disk, 0x11, 2 * MIB, 3 * MIB)
    write(qemu, box.guest_disk, 0x12, 1 * MIB, MIB)
    store.snapshot("vm", "s1")
    write(qemu, box.disk, 0x13, 3 * MIB, 64 * 1024)
    store.snapshot("vm", "s2")
    write(qemu, box.disk, 0x14, 4 * MIB, 64 * 1024)
    clone = store.clone_box("vm", "copy")
    write(qemu, clone.disk, 0x15, 2 * MIB, 64 * 1024)
    store.restore("vm", "s1")            # a live disk directly over s1
    write(qemu, box.disk, 0x16, 6 * MIB, 64 * 1024)

    graph = store.graph()
    s1 = [_snap(store, "vm", "s1"), _snap(store, "vm", "s1").with_name("guest-rootfs.qcow2")]
    dependents = sorted(set().union(*(graph.dependents(p) for p in s1)))
    assert len(dependents) >= 6
    before = _raw_copies(qemu, dependents, tmp_path)

    store.remove_snapshot("vm", "s1", merge=True)
    assert not s1[0].parent.exists()
    _assert_unchanged(qemu, before)
    assert store.box("vm").snapshots == ("s2",)
    # Snapshots and clone bases stay read-only after the merge wrote into them.
    assert not os.stat(_snap(store, "vm", "s2")).st_mode & 0o222
    assert_reads(qemu, box.disk, 0x11, 2 * MIB, MIB)
    assert_reads(qemu, clone.disk, 0x15, 2 * MIB, 64 * 1024)
    assert_store_clean(qemu, store)

    # Merging the bottom snapshot of a standalone box makes its dependents standalone.
    solo = store.create_box("solo", size=SIZE)
    write(qemu, solo.disk, 0x21, 0, MIB)
    store.snapshot("solo", "only")
    write(qemu, solo.disk, 0x22, MIB, MIB)
    before = _raw_copies(qemu, [str(solo.disk)], tmp_path)
    store.remove_snapshot("solo", "only", merge=True)
    assert read_header(solo.disk).backing_file is None
    _assert_unchanged(qemu, before)
    assert_store_clean(qemu, store)


def test_merge_with_nothing_depending_just_removes(qemu, store: BoxStore) -> None:
    store.create_box("vm", size=SIZE)
    store.snapshot("vm", "s1")
    store.snapshot("vm", "s2")
    store.remove_snapshot("vm", "s2", merge=True)  # the live disk backs onto s2: merged
    store.restore("vm", "s1")
    store.snapshot("vm", "s3")
    store.restore("vm", "s1")
    store.remove_snapshot("vm", "s3", merge=True)  # nothing backs onto s3
    assert store.box("vm").snapshots == ("s1",)
    assert_store_clean(qemu, store)


def test_remove_box_refused_while_another_box_backs_onto_it(qemu, store: BoxStore) -> None:
    src = store.create_box("src", size=SIZE)
    write(qemu, src.disk, 0x31, 0)
    store.snapshot("src", "s")
    clone = store.clone_box("src", "dst")  # C -> src/snapshots/s
    with pytest.raises(DependentsExistError) as err:
        store.remove_box("src")
    assert _real(clone.disk) in err.value.dependents
    assert not any(d.startswith(str(src.dir) + "/") for d in err.value.dependents)
    store.remove_box("dst")   # C then only serves src
    store.remove_box("src")   # and goes with it
    assert os.listdir(store.root / "clones") == []
    assert_store_clean(qemu, store)
