"""Every BoxStore operation, with guest data written by QEMU before and read back by QEMU after.

QEMU (qemu-io, qemu-img) writes into the live disks as a VM would and is the
judge of every image: verify() and ``qemu-img check`` are clean after each
test, and what the guest reads is checked with ``qemu-io read -P``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from boxdisk import DiskExistsError, read_header
from boxdisk.store import Box, BoxStore, Snapshot

from .helpers import (
    MIB,
    OS_DATA,
    ROOTFS_DATA,
    SIZE,
    assert_base_data,
    assert_reads,
    assert_store_clean,
    backing_names,
    reads,
    write,
)

pytestmark = pytest.mark.qemu


def _read_only(path: Path) -> bool:
    return not path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)


# -- layout and creation ---------------------------------------------------------------


def test_first_use_creates_the_layout(tmp_path: Path) -> None:
    root = tmp_path / "new" / "store"
    with BoxStore(root) as store:
        assert store.root == root.resolve()
        for sub in ("bases", "boxes", "clones", ".boxdisk/journal", ".boxdisk/locks"):
            assert (root / sub).is_dir()
        assert store.list_boxes() == []
    with BoxStore(root) as again:  # reopening an existing store
        assert again.list_boxes() == []


def test_create_standalone_box(qemu, store: BoxStore) -> None:
    box = store.create_box("vm1", size=SIZE)
    assert isinstance(box, Box)
    assert (box.id, box.dir, box.disk) == ("vm1", store.root / "boxes/vm1",
                                          store.root / "boxes/vm1/disk.qcow2")
    assert box.guest_disk is None and box.base is None and box.snapshots == ()
    assert box.size == SIZE
    info = qemu.info(box.disk)
    assert info["virtual-size"] == SIZE and "backing-filename" not in info
    write(qemu, box.disk, 0xAB, 3 * MIB)
    assert_reads(qemu, box.disk, 0xAB, 3 * MIB)
    assert store.box("vm1").host_bytes > 0
    assert_store_clean(qemu, store)


def test_create_box_over_bases(qemu, bases: BoxStore) -> None:
    store = bases
    box = store.create_box("vm1", base="os", guest_base="rootfs")
    assert box.base == "os" and box.guest_base == "rootfs"
    assert box.guest_disk == box.dir / "guest-rootfs.qcow2"
    assert (box.size, box.guest_size) == (SIZE, SIZE)
    # Relative names inside the store, formats from the header (never probed).
    assert read_header(box.disk).backing_file == "../../bases/os/disk.qcow2"
    assert read_header(box.disk).backing_format == "qcow2"
    assert read_header(box.guest_disk).backing_file == "../../bases/rootfs/disk.raw"
    assert read_header(box.guest_disk).backing_format == "raw"
    assert_base_data(qemu, box.disk, OS_DATA)
    assert_base_data(qemu, box.guest_disk, ROOTFS_DATA)
    assert_store_clean(qemu, store)


def test_create_box_larger_than_its_base_reads_zeros_past_it(qemu, bases: BoxStore) -> None:
    box = bases.create_box("big", base="os", size=2 * SIZE)
    assert box.size == 2 * SIZE
    assert_base_data(qemu, box.disk, OS_DATA)
    assert_reads(qemu, box.disk, 0, SIZE, 1 * MIB)
    write(qemu, box.disk, 0x5A, SIZE + MIB)
    assert_reads(qemu, box.disk, 0x5A, SIZE + MIB)
    assert_store_clean(qemu, bases)


# -- snapshot and restore ----------------------------------------------------------------


@pytest.mark.parametrize("guest", [False, True], ids=["one-disk", "two-disks"])
def test_snapshot_write_restore(qemu, bases: BoxStore, guest: bool) -> None:
    store = bases
    box = store.create_box("vm", base="os", guest_base="rootfs" if guest else None)
    write(qemu, box.disk, 0xA1, 2 * MIB)
    if guest:
        write(qemu, box.guest_disk, 0xB1, 3 * MIB)
    live_inode = box.disk.stat().st_ino

    snap = store.snapshot("vm", "s1")
    assert isinstance(snap, Snapshot)
    assert snap.dir == box.dir / "snapshots" / "s1"
    # A rename, not a copy: the snapshot is the old live file.
    assert snap.disk.stat().st_ino == live_inode
    assert _read_only(snap.disk)
    assert read_header(box.disk).backing_file == "snapshots/s1/disk.qcow2"
    assert read_header(snap.disk).backing_file == "../../../../bases/os/disk.qcow2"
    assert_reads(qemu, box.disk, 0xA1, 2 * MIB)  # same guest view right after
    assert_base_data(qemu, box.disk, OS_DATA)

    write(qemu, box.disk, 0xA2, 2 * MIB)
    if guest:
        assert snap.guest_disk is not None and _read_only(snap.guest_disk)
        write(qemu, box.guest_disk, 0xB2, 3 * MIB)
    assert_reads(qemu, box.disk, 0xA2, 2 * MIB)
    assert_reads(qemu, snap.disk, 0xA1, 2 * MIB)

    store.restore("vm", "s1")
    assert_reads(qemu, box.disk, 0xA1, 2 * MIB)
    assert_base_data(qemu, box.disk, OS_DATA)
    if guest:
        assert_reads(qemu, box.guest_disk, 0xB1, 3 * MIB)
        assert_base_data(qemu, box.guest_disk, ROOTFS_DATA)
    assert store.box("vm").snapshots == ("s1",)
    assert_store_clean(qemu, store)


def test_snapshots_of_snapshots_and_restore_any(qemu, store: BoxStore) -> None:
    box = store.create_box("vm", size=SIZE)
    for i, pattern in enumerate((0x31, 0x32, 0x33)):
        write(qemu, box.disk, pattern, MIB)
        store.snapshot("vm", f"s{i}")
    write(qemu, box.disk, 0x34, MIB)
    assert [s.name for s in store.list_snapshots("vm")] == ["s0", "s1", "s2"]
    for i, pattern in ((1, 0x32), (0, 0x31), (2, 0x33)):
        store.restore("vm", f"s{i}")
        assert_reads(qemu, box.disk, pattern, MIB)
        write(qemu, box.disk, 0x99, MIB)  # thrown away by the next restore
    assert_store_clean(qemu, store)


# -- clones -----------------------------------------------------------------------------------


@pytest.mark.parametrize("guest", [False, True], ids=["one-disk", "two-disks"])
def test_clone_sees_source_at_clone_time_and_diverges(qemu, bases: BoxStore, guest: bool) -> None:
    store = bases
    src = store.create_box("src", base="os", guest_base="rootfs" if guest else None)
    write(qemu, src.disk, 0xC1, 4 * MIB)
    if guest:
        write(qemu, src.guest_disk, 0xD1, 4 * MIB)
    dst = store.clone_box("src", "dst")
    assert dst.clone_of == "src" and dst.base == "os"
    assert (dst.guest_disk is not None) == guest
    assert_reads(qemu, dst.disk, 0xC1, 4 * MIB)
    assert_base_data(qemu, dst.disk, OS_DATA)

    write(qemu, src.disk, 0xC2, 4 * MIB)
    write(qemu, dst.disk, 0xC3, 6 * MIB)
    assert_reads(qemu, src.disk, 0xC2, 4 * MIB)
    assert_reads(qemu, dst.disk, 0xC1, 4 * MIB)  # no write of the source shows
    assert not reads(qemu, src.disk, 0xC3, 6 * MIB)  # nor one of the clone
    assert_base_data(qemu, src.disk, OS_DATA[1:])
    if guest:
        assert dst.guest_disk is not None
        write(qemu, dst.guest_disk, 0xD3, 4 * MIB)
        assert_reads(qemu, src.guest_disk, 0xD1, 4 * MIB)
        assert_reads(qemu, dst.guest_disk, 0xD3, 4 * MIB)
    # Both back onto one immutable clone base under clones/.
    clone_base = read_header(src.disk).backing_file
    assert clone_base == read_header(dst.disk).backing_file
    assert clone_base is not None and clone_base.startswith("../../clones/")
    assert _read_only(src.dir / clone_base)
    assert_store_clean(qemu, store)


def test_clone_after_snapshot_and_restore_keeps_relative_names_right(qemu, store: BoxStore) -> None:
    src = store.create_box("src", size=SIZE)
    write(qemu, src.disk, 0x41, MIB)
    store.snapshot("src", "s1")
    write(qemu, src.disk, 0x42, 2 * MIB)
    store.restore("src", "s1")  # live -> snapshots/s1 (a name inside the box)
    write(qemu, src.disk, 0x43, 3 * MIB)
    dst = store.clone_box("src", "dst")
    for disk in (src.disk, dst.disk):
        assert_reads(qemu, disk, 0x41, MIB)
        assert_reads(qemu, disk, 0x43, 3 * MIB)
        assert reads(qemu, disk, 0, 2 * MIB)
    clone2 = store.clone_box("dst", "dst2")  # a clone of a clone
    assert_reads(qemu, clone2.disk, 0x43, 3 * MIB)
    assert all(not n.startswith("/") for n in backing_names(qemu, clone2.disk))
    assert_store_clean(qemu, store)


# -- removal --------------------------------------------------------------------------------


def test_remove_box_removes_everything(qemu, bases: BoxStore) -> None:
    store = bases
    box = store.create_box("vm", base="os", guest_base="rootfs")
    store.snapshot("vm", "s1")
    store.remove_box("vm")
    assert store.list_boxes() == []
    assert not box.dir.exists()
    assert sorted(os.listdir(store.root / ".boxdisk" / "trash")) == []
    assert store.list_bases() == ["os", "rootfs"]
    assert_store_clean(qemu, store)


def test_remove_box_takes_clone_bases_only_it_used(qemu, store: BoxStore) -> None:
    store.create_box("a", size=SIZE)
    store.clone_box("a", "b")
    assert len(os.listdir(store.root / "clones")) == 1
    store.remove_box("b")
    assert len(os.listdir(store.root / "clones")) == 1  # a still backs onto it
    store.remove_box("a")
    assert os.listdir(store.root / "clones") == []
    assert_store_clean(qemu, store)


def test_remove_snapshot_nothing_depends_on(qemu, store: BoxStore) -> None:
    box = store.create_box("vm", size=SIZE)
    write(qemu, box.disk, 0x51, MIB)
    store.snapshot("vm", "s1")
    store.snapshot("vm", "s2")
    store.restore("vm", "s2")  # nothing backs onto s1's child... but s2 backs onto s1
    store.snapshot("vm", "s3")
    store.restore("vm", "s1")
    store.remove_snapshot("vm", "s3")  # s3 had no dependents left
    assert store.box("vm").snapshots == ("s1", "s2")
    assert_reads(qemu, box.disk, 0x51, MIB)
    assert_store_clean(qemu, store)


# -- export and import ---------------------------------------------------------------------


def test_export_live_and_snapshot_are_standalone_copies(qemu, bases: BoxStore,
                                                        tmp_path: Path) -> None:
    store = bases
    box = store.create_box("vm", base="os", guest_base="rootfs")
    write(qemu, box.disk, 0x61, MIB)
    store.snapshot("vm", "s1")
    write(qemu, box.disk, 0x62, MIB)
    write(qemu, box.guest_disk, 0x63, 2 * MIB)

    live = store.export_box("vm", tmp_path / "live.qcow2")
    snap = store.export_box("vm", tmp_path / "snap.qcow2", snapshot="s1")
    guest = store.export_box("vm", tmp_path / "guest.qcow2", guest=True)
    for out, src in ((live, box.disk), (snap, box.dir / "snapshots/s1/disk.qcow2"),
                     (guest, box.guest_disk)):
        qemu.assert_clean(out)
        assert "backing-filename" not in qemu.info(out)
        proc = qemu.img("compare", "-U", out, src, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_reads(qemu, live, 0x62, MIB)
    assert_reads(qemu, snap, 0x61, MIB)
    with pytest.raises(DiskExistsError):
        store.export_box("vm", live)
    store.export_box("vm", live, snapshot="s1", overwrite=True)
    assert_reads(qemu, live, 0x61, MIB)
    assert_store_clean(qemu, store)


def test_import_box_from_qemu_images(qemu, store: BoxStore, tmp_path: Path) -> None:
    img = tmp_path / "in.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img, str(SIZE))
    write(qemu, img, 0x71, 7 * MIB, 300 * 1024)
    box = store.import_box("imported", img)
    assert box.base is None and box.size == SIZE
    assert_reads(qemu, box.disk, 0x71, 7 * MIB, 300 * 1024)
    proc = qemu.img("compare", img, box.disk, check=False)
    assert proc.returncode == 0, proc.stdout
    raw = tmp_path / "in.raw"
    qemu.img("convert", "-O", "raw", img, raw)
    rbox = store.import_box("from-raw", raw, format="raw")
    assert_reads(qemu, rbox.disk, 0x71, 7 * MIB, 300 * 1024)
    # An imported box is a box like any other.
    store.snapshot("imported", "s")
    store.clone_box("imported", "copy")
    assert_reads(qemu, store.box("copy").disk, 0x71, 7 * MIB, 300 * 1024)
    assert_store_clean(qemu, store)


def test_add_base_copies_links_and_seals(qemu, store: BoxStore, tmp_path: Path) -> None:
    src = tmp_path / "base.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", src, str(SIZE))
    write(qemu, src, 0x81, 0)
    path = store.add_base(src, "copied", backing_format="qcow2")
    assert path == store.root / "bases/copied/disk.qcow2"
    assert _read_only(path) and path.stat().st_ino != src.stat().st_ino
    linked = store.add_base(src, "linked", backing_format="qcow2", link=True)
    assert linked.stat().st_ino == src.stat().st_ino
    assert store.list_bases() == ["copied", "linked"]
    assert store.base_path("copied") == path
    box = store.create_box("vm", base="copied")
    assert_reads(qemu, box.disk, 0x81, 0)
    assert_store_clean(qemu, store)


# -- listing, values, gc, ephemeral boxes ------------------------------------------------------


def test_listing_and_values(qemu, bases: BoxStore) -> None:
    store = bases
    for name in ("b", "a", "c"):
        store.create_box(name, base="os")
    store.snapshot("b", "later-name-first")
    store.snapshot("b", "another")
    assert store.list_boxes() == ["a", "b", "c"]
    snaps = store.list_snapshots("b")
    assert [s.name for s in snaps] == ["later-name-first", "another"]  # oldest first
    assert snaps[0].created <= snaps[1].created
    assert all(s.size == SIZE and s.host_bytes > 0 for s in snaps)
    assert store.snapshot_info("b", "another") == snaps[1]
    box = store.box("b")
    assert box.snapshots == ("later-name-first", "another")
    assert box.created > 0 and box.host_bytes > 0


def test_gc_removes_unused_clone_bases_and_leftovers(qemu, store: BoxStore) -> None:
    store.create_box("a", size=SIZE)
    store.snapshot("a", "s")
    store.clone_box("a", "b")      # clone base C <- a, b
    store.remove_box("b")          # a still backs onto C: it stays
    store.restore("a", "s")        # a leaves C: nothing depends on it now
    stray = store.root / "boxes" / ".stage-0123456789abcdef"
    stray.mkdir()
    (stray / "box.json").write_text("{}")
    report = store.gc(dry_run=True)
    assert len(report.clone_bases) == 1 and report.leftovers == ("boxes/.stage-0123456789abcdef",)
    assert not store.verify().ok  # the leftover is reported
    assert stray.exists() and len(os.listdir(store.root / "clones")) == 1
    report = store.gc()
    assert not report.dry_run and report.bytes_freed > 0
    assert not stray.exists() and os.listdir(store.root / "clones") == []
    assert store.gc().clone_bases == ()
    assert_store_clean(qemu, store)


def test_ephemeral_box_goes_away_even_on_error(qemu, bases: BoxStore) -> None:
    store = bases
    with store.ephemeral_box(base="os") as box:
        assert box.disk.exists()
        write(qemu, box.disk, 0x91, 0)
        store.snapshot(box.id, "s")
    assert not box.dir.exists()
    with pytest.raises(RuntimeError, match="guest crashed"), store.ephemeral_box(
            base="os", guest_base="rootfs") as box2:
        assert box2.guest_disk is not None
        raise RuntimeError("guest crashed")
    assert not box2.dir.exists()
    assert store.list_boxes() == []
    assert_store_clean(qemu, store)


def test_add_base_keeps_a_sparse_raw_base_sparse(qemu, store: BoxStore, tmp_path: Path) -> None:
    raw = tmp_path / "big.raw"
    qemu.img("create", "-q", "-f", "raw", raw, str(4 << 30))  # 4 GiB, all hole
    qemu.write(raw, ["write -P 0x5c 0 64k", "write -P 0x5d 3G 1M"], fmt="raw")
    path = store.add_base(raw, "big", backing_format="raw")
    st = path.stat()
    assert st.st_size == 4 << 30 and st.st_blocks * 512 < 16 * MIB
    proc = qemu.img("compare", "-f", "raw", "-F", "raw", raw, path, check=False)
    assert proc.returncode == 0, proc.stdout
    box = store.create_box("vm", base="big")
    assert_reads(qemu, box.disk, 0x5D, 3 << 30, MIB)
    assert_store_clean(qemu, store)
