"""Relocation: a store copied or moved elsewhere opens, resolves every chain and verifies clean.

Every backing name the store writes is relative, so nothing in it points at
the old location; chains are confined to the store's own root.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from boxdisk import read_header
from boxdisk.chain import open_chain
from boxdisk.store import BoxStore

from .helpers import MIB, assert_reads, assert_store_clean, backing_names, make_bases, write

pytestmark = pytest.mark.qemu


def _populate(qemu, root: Path, src: Path) -> None:
    with BoxStore(root) as store:
        make_bases(qemu, store, src)
        vm = store.create_box("vm", base="os", guest_base="rootfs")
        write(qemu, vm.disk, 0x11, MIB)
        store.snapshot("vm", "s1")
        write(qemu, vm.disk, 0x12, 2 * MIB)
        store.snapshot("vm", "s2")
        store.restore("vm", "s1")
        write(qemu, vm.disk, 0x13, 3 * MIB)
        store.clone_box("vm", "copy")
        write(qemu, store.box("copy").disk, 0x14, 4 * MIB)
        store.create_box("plain", size=8 * MIB)


def _check(qemu, root: Path) -> None:
    with BoxStore(root) as store:
        assert store.root == root.resolve()
        assert_store_clean(qemu, store)
        for image in store._images():
            name = read_header(image).backing_file
            assert name is None or not os.path.isabs(name), (image, name)
            # Every chain resolves inside this root (symlinks resolved).
            with open_chain(image, allowed_roots=[store.root]) as chain:
                assert all(os.path.realpath(p).startswith(str(store.root)) for p in chain.paths)
        vm, copy = store.box("vm"), store.box("copy")
        assert_reads(qemu, vm.disk, 0x11, MIB)
        assert_reads(qemu, vm.disk, 0x13, 3 * MIB)
        assert_reads(qemu, copy.disk, 0x14, 4 * MIB)
        assert_reads(qemu, vm.dir / "snapshots/s2/disk.qcow2", 0x12, 2 * MIB)
        assert all(not n.startswith("/") for n in backing_names(qemu, copy.disk))
        # And it keeps working there.
        store.snapshot("copy", "after-move")
        store.remove_box("plain")
        assert_store_clean(qemu, store)


def test_copied_store_opens_and_verifies(qemu, tmp_path: Path) -> None:
    original = tmp_path / "a" / "store"
    _populate(qemu, original, tmp_path / "src")
    copy = tmp_path / "elsewhere" / "deeper" / "copied"
    shutil.copytree(original, copy, symlinks=True)
    _check(qemu, copy)
    _check(qemu, original)  # the original is untouched by the copy's changes


def test_moved_store_and_symlinked_root(qemu, tmp_path: Path) -> None:
    original = tmp_path / "store"
    _populate(qemu, original, tmp_path / "src")
    moved = tmp_path / "moved"
    original.rename(moved)
    link = tmp_path / "link-to-store"
    link.symlink_to(moved)
    _check(qemu, link)  # the root's symlink is resolved: chains stay inside the real root
    assert not original.exists()
