"""Locks across processes, and QEMU's image locks: who waits, who is refused, and why.

Another process holding a box (or the store) makes an operation time out with
LockTimeoutError naming the holder's pid, box and operation. A running QEMU
(qemu-io holding the image open) makes every operation that would rename,
replace or delete its disk refuse with DiskInUseError, and nothing changes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from boxdisk import DiskInUseError
from boxdisk._errors import LockTimeoutError, SnapshotInUseError
from boxdisk._locks import image_in_use
from boxdisk.store import BoxStore
from tests.conftest import QEMU_IO

from .helpers import REPO, SIZE, assert_reads, assert_store_clean, write


@contextmanager
def _holder(root: Path, keys: list[str], what: str) -> Iterator[int]:
    """A child process holding store locks (as an operation in flight would)."""
    spec = json.dumps({"root": os.fspath(root), "script": [["hold_lock", keys, {"what": what}]]})
    proc = subprocess.Popen([sys.executable, "-m", "tests.store._runner", spec], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_box_lock_timeout_names_the_holder(tmp_path: Path) -> None:
    root = tmp_path / "store"
    with BoxStore(root, lock_timeout=0.3) as store:
        store.create_box("vm", size=SIZE)
        store.create_box("other", size=SIZE)
        with _holder(root, ["box:vm"], "snapshot (box:vm)") as pid:
            with pytest.raises(LockTimeoutError) as err:
                store.snapshot("vm", "s1")
            text = str(err.value)
            assert f"pid {pid}" in text and "'vm'" in text and "snapshot" in text
            assert err.value.value["holder"]["pid"] == pid
            assert isinstance(err.value, TimeoutError)
            # Other boxes are not held up.
            store.snapshot("other", "s1")
        store.snapshot("vm", "s1")  # the holder died: its lock went with it


def test_store_lock_timeout_names_the_holder(tmp_path: Path) -> None:
    root = tmp_path / "store"
    with BoxStore(root, lock_timeout=0.3) as store:
        store.create_box("vm", size=SIZE)
        with _holder(root, ["store"], "gc") as pid:
            with pytest.raises(LockTimeoutError, match=f"store lock.*pid {pid}.*gc"):
                store.gc()
            with pytest.raises(LockTimeoutError, match="store lock"):
                store.snapshot("vm", "s1")
            assert len(os.listdir(root / ".boxdisk" / "journal")) == 1  # left for recovery
        store.snapshot("vm", "s1")  # recovers the interrupted one first
        assert store.box("vm").snapshots == ("s1",)
        assert store.verify().ok


@contextmanager
def _qemu_holding(disk: Path) -> Iterator[None]:
    """qemu-io with ``disk`` open read-write: QEMU's image locks are held until it quits."""
    proc = subprocess.Popen([QEMU_IO or "qemu-io", "-f", "qcow2", os.fspath(disk)],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 30
        while not image_in_use(disk):
            assert proc.poll() is None and time.monotonic() < deadline, "qemu-io did not start"
            time.sleep(0.01)
        yield
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait()


@pytest.mark.qemu
def test_running_qemu_blocks_renames_and_removals(qemu, bases: BoxStore, tmp_path: Path) -> None:
    store = bases
    box = store.create_box("vm", base="os", guest_base="rootfs")
    write(qemu, box.disk, 0xE1, 0)
    store.snapshot("vm", "s1")
    store.create_box("quiet", base="os")
    before = sorted(str(p) for p in store.root.rglob("*") if ".boxdisk" not in p.parts)
    with _qemu_holding(box.disk):
        for call in (lambda: store.snapshot("vm", "s2"),
                     lambda: store.restore("vm", "s1"),
                     lambda: store.clone_box("vm", "copy"),
                     lambda: store.remove_box("vm"),
                     lambda: store.remove_snapshot("vm", "s1", merge=True),
                     lambda: store.export_box("vm", tmp_path / "out.qcow2")):
            with pytest.raises(DiskInUseError) as err:
                call()
            assert err.value.path == str(box.disk) or "disk.qcow2" in str(err.value)
        # What QEMU does not hold goes on.
        store.snapshot("quiet", "s")
        store.export_box("vm", tmp_path / "snap.qcow2", snapshot="s1")
    after = sorted(str(p) for p in store.root.rglob("*") if ".boxdisk" not in p.parts)
    assert sorted(set(after) - set(before)) == sorted(
        str(p) for p in store.root.rglob("*") if "quiet" in p.parts and str(p) not in before)
    assert not (tmp_path / "out.qcow2").exists()
    assert_reads(qemu, box.disk, 0xE1, 0)
    store.snapshot("vm", "s2")  # QEMU is gone
    assert_store_clean(qemu, store)


@pytest.mark.qemu
def test_refusals_while_qemu_runs_name_the_dependents(qemu, store: BoxStore) -> None:
    box = store.create_box("vm", size=SIZE)
    store.snapshot("vm", "s1")
    store.snapshot("vm", "s2")
    store.restore("vm", "s1")  # s2 has no dependents now
    with _qemu_holding(box.disk):  # QEMU also holds s1 (read-only, as a backing file)
        with pytest.raises(SnapshotInUseError) as err:
            store.remove_snapshot("vm", "s1")
        assert str(box.disk.resolve()) in err.value.dependents
    s2 = box.dir / "snapshots" / "s2" / "disk.qcow2"
    with _qemu_holding(s2), pytest.raises(DiskInUseError):
        store.remove_snapshot("vm", "s2")
    store.remove_snapshot("vm", "s2")
    assert store.box("vm").snapshots == ("s1",)
