"""One test per bug the full-disk and I/O-error runs found, and the stale temporary files.

Each names the failure it pins down; the sweeps in test_engine_faults.py and
test_store_faults.py found them.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from boxdisk import ImageIOError, create_cow_child_disk, flatten
from boxdisk import _locks as locks_module
from boxdisk._locks import create_temp, remove_stale_temp, remove_stale_temps, temp_held
from boxdisk.image._qcow2_write import Qcow2Writer
from boxdisk.store import BoxStore
from boxdisk.store._journal import Journal

from ..engine.helpers import KIB, MIB, assert_clean, assert_not_corrupt, create
from ..store.test_locks import _holder  # a child process holding store locks
from ._faults import Faults, tmpfs

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parents[2]


def _chain(qemu: Any, d: Path) -> Path:
    create(qemu, d / "base.qcow2", 16 * MIB)
    create(qemu, d / "top.qcow2", 16 * MIB, backing=d / "base.qcow2")
    qemu.write(d / "base.qcow2", [f"write -P {0x20 + i} {i * MIB} 256k" for i in range(16)])
    qemu.write(d / "top.qcow2", ["write -P 0x77 4m 8m"])
    return d / "top.qcow2"


def _temps(d: Path) -> list[str]:
    return sorted(n for n in os.listdir(d) if n.endswith(".tmp"))


# -- the writer: a failed data write must not be mapped --------------------------------------


def test_a_failed_data_write_is_never_mapped(qemu: Any, tmp_path: Path) -> None:
    """The writer maps a cluster before writing its data; after the write fails, closing
    must not commit that mapping (the cluster would read zeros, or half its bytes)."""
    img = create(qemu, tmp_path / "a.qcow2", 4 * MIB)
    qemu.write(img, ["write -P 0x11 0 1m"])
    writer = Qcow2Writer(img)
    with Faults(1):
        with pytest.raises(ImageIOError) as info:
            writer.write(0, b"\x22" * (256 * KIB))
        # The writer is stopped: it refuses more writes, naming the first failure.
        with pytest.raises(ImageIOError, match="earlier write to the image failed"):
            writer.write(MIB, b"\x33" * 4096)
    writer.close()
    assert info.value.path == os.fspath(img)
    assert_not_corrupt(qemu, img)
    proc = qemu.io("-r", "-c", "read -P 0x11 0 1m", img)
    assert "verification failed" not in proc.stdout


def test_a_full_disk_in_a_write_says_no_space(qemu: Any, tmp_path: Path) -> None:
    """A write that fills the disk is reported as ENOSPC (not as a bare short write)."""
    with tmpfs(tmp_path / "fs", 2 * MIB) as fs:
        img = create(qemu, fs / "a.qcow2", 64 * MIB)
        with Qcow2Writer(img) as writer, pytest.raises(ImageIOError) as info:
            writer.write(0, b"\x5a" * (4 * MIB))
        assert "No space left on device" in str(info.value)
        assert_not_corrupt(qemu, img)


# -- creating images: short writes ---------------------------------------------------------


def test_a_short_write_never_makes_a_broken_child(qemu: Any, tmp_path: Path) -> None:
    """A short pwrite while a new image is written used to be taken as complete."""
    base = create(qemu, tmp_path / "base.qcow2", MIB)
    with Faults() as counter:
        create_cow_child_disk(base, "qcow2", tmp_path / "probe.qcow2", relative=True,
                              persistent=True)
    writes = [i + 1 for i, name in enumerate(counter.log) if name == "pwrite"]
    assert len(writes) >= 3
    for n in writes:
        child = tmp_path / f"child{n}.qcow2"
        with Faults(n, short=True) as f:
            create_cow_child_disk(base, "qcow2", child, relative=True, persistent=True)
        assert f.failed == ["pwrite"]
        assert_clean(qemu, child)
        assert qemu.info(child)["backing-filename"] == "base.qcow2"
    assert _temps(tmp_path) == []


# -- atomic output: the last directory fsync -------------------------------------------------


def test_a_failed_final_fsync_leaves_no_destination(qemu: Any, tmp_path: Path) -> None:
    top = _chain(qemu, tmp_path)
    dst = tmp_path / "out.qcow2"
    counter = Faults()
    with counter:
        flatten(top, dst)
    dst.unlink()
    with Faults(counter.calls), pytest.raises(ImageIOError) as info:  # the directory fsync
        flatten(top, dst)
    assert info.value.path == os.fspath(dst)
    assert not dst.exists()
    assert _temps(tmp_path) == []


# -- the store --------------------------------------------------------------------------------


def test_a_lock_note_that_cannot_be_written_does_not_refuse_the_lock(tmp_path: Path) -> None:
    """The holder note in a lock file is a courtesy; a full disk must not fail the lock."""
    with BoxStore(tmp_path / "store") as store:
        store.create_box("vm", size=MIB)
        with Faults(1, err=errno.ENOSPC) as f:
            store.snapshot("vm", "s")
        assert f.failed == ["pwrite"]
        assert store.box("vm").snapshots == ("s",)


@pytest.mark.parametrize("step", ["write", "fsync"])
def test_a_journal_record_that_cannot_be_written_or_made_durable_goes(tmp_path: Path,
                                                                      step: str) -> None:
    """Intent records are written before the first step and made durable by the first
    barrier; if either fails, no record stays and nothing was done."""
    with BoxStore(tmp_path / "store", sync="fsync") as store:
        store.create_box("vm", size=MIB)
        with Faults() as counter:
            store.snapshot("vm", "probe")
        # The record is the operation's first os.write; the first barrier fsyncs it first.
        first = counter.log.index("write")
        n = 1 + (first if step == "write" else counter.log.index("fsync", first))
        with Faults(n, err=errno.EIO), pytest.raises(ImageIOError) as info:
            store.snapshot("vm", "s")
        assert ".boxdisk/journal" in os.fspath(info.value.path)
        assert info.value.errno == errno.EIO
        assert os.listdir(tmp_path / "store" / ".boxdisk" / "journal") == []
        assert store.box("vm").snapshots == ("probe",)
        assert store.verify().ok


def test_store_errors_keep_errno_and_name_the_file(tmp_path: Path) -> None:
    with BoxStore(tmp_path / "store") as store:
        store.create_box("vm", size=MIB)
        with Faults(2, err=errno.ENOSPC, persistent=True), \
                pytest.raises(ImageIOError) as info:
            store.clone_box("vm", "copy")
        assert info.value.errno == errno.ENOSPC
        assert info.value.path is not None
        assert "No space left on device" in str(info.value)
        assert store.list_boxes() == ["vm"]


# -- stale temporary files ----------------------------------------------------------------------

_KILL_AT_FIRST_PROGRESS = """
import os, signal, sys
from boxdisk import flatten
flatten(sys.argv[1], sys.argv[2], progress=lambda done, total: os.kill(os.getpid(),
        signal.SIGKILL))
"""


def test_a_killed_flatten_leaves_a_temp_file_the_next_one_removes(qemu: Any,
                                                                   tmp_path: Path) -> None:
    top = _chain(qemu, tmp_path)
    dst = tmp_path / "out.qcow2"
    proc = subprocess.run([sys.executable, "-c", _KILL_AT_FIRST_PROGRESS, top, dst], cwd=REPO,
                          check=False, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = _temps(tmp_path)
    assert len(left) == 1 and left[0].startswith(".out.qcow2."), left
    assert not temp_held(tmp_path / left[0])  # its writer is dead: nobody holds it
    flatten(top, dst)
    assert _temps(tmp_path) == []
    assert_clean(qemu, dst)
    assert qemu.img("compare", top, dst, check=False).returncode == 0


def test_a_live_writers_temp_file_is_left_alone(qemu: Any, tmp_path: Path) -> None:
    top = _chain(qemu, tmp_path)
    fd, live = create_temp(os.fspath(tmp_path), "out.qcow2")
    try:
        assert temp_held(live)
        assert remove_stale_temps(os.fspath(tmp_path), "out.qcow2") == 0
        flatten(top, tmp_path / "out.qcow2")
        assert os.path.exists(live)  # another writer's, still at work
    finally:
        os.close(fd)
    assert remove_stale_temps(os.fspath(tmp_path), "out.qcow2") == 1
    assert not os.path.exists(live)


def test_only_the_destinations_own_temp_names_are_swept(tmp_path: Path) -> None:
    keep = [".out.qcow2.tmp", ".out.qcow2.zzzzzzzzzzzz.tmp", ".other.qcow2.0123456789ab.tmp",
            "out.qcow2.0123456789ab.tmp"]
    for n in keep:
        (tmp_path / n).write_bytes(b"x")
    os.symlink("/etc/passwd", tmp_path / ".out.qcow2.00000000000a.tmp")
    (tmp_path / ".out.qcow2.0123456789ab.tmp").write_bytes(b"stale")
    assert remove_stale_temps(os.fspath(tmp_path), "out.qcow2") == 1
    assert sorted(os.listdir(tmp_path)) == sorted([*keep, ".out.qcow2.00000000000a.tmp"])


def test_a_temp_file_swept_before_its_writer_locked_it_is_replaced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between creating and locking its file a writer may lose it to a sweeper: it then
    takes a new name, never writing into a file that is no longer there."""
    real = fcntl.flock
    swept: list[str] = []

    def racing_flock(fd: int, op: int) -> None:
        if not swept and op == fcntl.LOCK_EX:
            (name,) = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
            swept.append(name)
            assert remove_stale_temp(tmp_path / name)  # not locked yet: a sweeper takes it
        real(fd, op)

    monkeypatch.setattr(locks_module.fcntl, "flock", racing_flock)
    fd, path = create_temp(os.fspath(tmp_path), "out.qcow2")
    try:
        assert swept and os.path.basename(path) != swept[0]
        assert os.path.samefile(path, f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def test_gc_removes_stale_temp_files_but_not_held_ones(tmp_path: Path) -> None:
    with BoxStore(tmp_path / "store") as store:
        bdir = store.create_box("vm", size=MIB).dir
        stale = bdir / ".disk.qcow2.0123456789ab.tmp"
        stale.write_bytes(b"left by a killed writer")
        fd, held = create_temp(os.fspath(bdir), "disk.qcow2")
        try:
            report = store.gc()
            assert [os.path.basename(p) for p in report.leftovers] == [stale.name]
            assert not stale.exists()
            assert os.path.exists(held)
        finally:
            os.close(fd)
        assert [os.path.basename(p) for p in store.gc().leftovers] == [os.path.basename(held)]
        assert not os.path.exists(held)


# -- verify while another process merges ------------------------------------------------------


def test_verify_does_not_flag_a_snapshot_a_live_merge_is_writing(tmp_path: Path) -> None:
    """A merge makes a dependent snapshot writable while it streams data into it; verify in
    another process (found by benchmarks/stress.py) called that an immutable image gone
    writable. Images an operation in flight names are now left to it."""
    root = tmp_path / "store"
    with BoxStore(root) as store:
        store.create_box("aux", size=MIB)
        store.snapshot("aux", "t1")
        store.snapshot("aux", "t2")  # t2 backs onto t1: a merge of t1 writes into t2
        t2 = store.root / "boxes/aux/snapshots/t2/disk.qcow2"
        with _holder(root, ["box:aux"], "remove_snapshot (box:aux)"):
            # What remove_snapshot("aux", "t1", merge=True) has done at its first rebase.
            store._journal.begin("remove_snapshot", ("box:aux",), {
                "box": "aux", "name": "t1", "trash": ".boxdisk/trash/x", "steps": [
                    {"image": "boxes/aux/snapshots/t2/disk.qcow2", "target": None,
                     "format": None, "writable": False}]})
            t2.chmod(0o644)
            report = store.verify()
            assert [p for p in report.problems if p.kind == "writable"] == []
            assert any(f.startswith("remove_snapshot") for f in report.in_flight)


# -- the journal, read by other processes while it is written -----------------------------------


def test_a_journal_record_is_never_seen_half_written(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process's recovery (its open, its gc) lists the journal at any instant. A
    record it saw while the record was still being written did not parse, was taken for a
    dead process's and deleted, and gc then removed the live operation's staging files
    (found by benchmarks/stress.py: a snapshot's os.link failed with ENOENT)."""
    with BoxStore(tmp_path / "store") as store:
        store.create_box("vm", size=MIB)
        other = Journal(store._layout)  # another process's view of the same journal
        seen: list[tuple[str, object]] = []
        real_write = os.write

        def write(fd: int, data: Any) -> int:
            for name in other.names():  # a concurrent reader looks right now
                seen.append((name, other.load(name)))
            return real_write(fd, data)

        monkeypatch.setattr(os, "write", write)
        store.snapshot("vm", "s")
        monkeypatch.undo()
        assert seen, "the reader never saw the record while the operation ran"
        assert all(record is not None for _name, record in seen), seen
        assert store.box("vm").snapshots == ("s",)
