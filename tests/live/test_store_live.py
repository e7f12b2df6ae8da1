"""The store with boxes a real QEMU runs: attach, live snapshot, settling, refusals, crashes.

QEMU (``qemu-system-x86_64 -S``, paused, no guest kernel) opens the box's
disks through guest devices and writes into them when the tests play the
guest (``writes``); what it wrote is checked with qemu-io afterwards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from boxdisk import (
    AlreadyExistsError,
    DiskInUseError,
    LiveError,
    NotFoundError,
    QmpCommandError,
    QmpConnectError,
    QmpProtocolError,
    SnapshotInUseError,
    read_backing_file_path,
)
from boxdisk.live import node_file
from boxdisk.store import BoxStore
from boxdisk.store._journal import CRASH_ENV, TRACE_ENV
from tests.store.helpers import (
    MIB,
    OS_DATA,
    ROOTFS_DATA,
    assert_base_data,
    assert_reads,
    make_bases,
    run_store,
    write,
)

from .test_qmp import _Agent
from .vm import StorageDaemon, Vm, writes

pytestmark = pytest.mark.qemu

KIB = 1024


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def store(tmp_path: Path, qemu: Any) -> BoxStore:
    s = BoxStore(tmp_path / "store")
    make_bases(qemu, s, tmp_path / "src")
    s.create_box("vm1", base="os", guest_base="rootfs")
    s.create_box("vm2", base="os")
    return s


def _start(tmp_path: Path, store: BoxStore, box_id: str, style: str = "blockdev",
           name: str = "vm") -> Vm:
    box = store.box(box_id)
    drives = {"d0": box.disk}
    if box.guest_disk is not None:
        drives["d1"] = box.guest_disk
    return Vm(tmp_path, drives, style=style, name=name)


def _qemu_chain(vm: Vm, drive: str) -> list[str]:
    return [node_file(f) or f for f in vm.top_chain(drive)]


def _resolved(image: Path | None) -> str:
    """The file an image's backing name names (resolved from its directory)."""
    assert image is not None
    name = read_backing_file_path(image)
    assert name is not None
    return os.path.normpath(os.path.join(image.parent, name))


def _assert_no_live_leftovers(store: BoxStore, box_id: str) -> None:
    bdir = store.box(box_id).dir
    names = sorted(n for n in os.listdir(bdir) if n != "snapshots")
    expected = ["box.json", "disk.qcow2"] + (["guest-rootfs.qcow2"]
                                             if store.box(box_id).guest_disk else [])
    assert names == sorted(expected)


# -- attach and detach ---------------------------------------------------------------------


@pytest.mark.parametrize("style", ["blockdev", "drive"])
def test_attach_is_seen_by_other_processes_and_detach_forgets(
        tmp_path: Path, store: BoxStore, style: str) -> None:
    vm = _start(tmp_path, store, "vm1", style)
    try:
        store.attach("vm1", vm.qmp_path)
        assert store.box("vm1").qmp == os.fspath(vm.qmp_path)
        with BoxStore(store.root) as other:
            assert other.box("vm1").qmp == os.fspath(vm.qmp_path)
        assert store.box("vm2").qmp is None
        store.detach("vm1")
        assert store.box("vm1").qmp is None
        store.detach("vm1")  # idempotent
    finally:
        vm.quit()
    _assert_no_live_leftovers(store, "vm1")


def test_attach_refuses_what_is_not_the_boxs_qemu(tmp_path: Path, store: BoxStore) -> None:
    box_dir = store.box("vm1").dir
    before = sorted(os.listdir(box_dir))
    with pytest.raises(QmpConnectError):
        store.attach("vm1", tmp_path / "no-such.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(os.fspath(tmp_path / "other.sock"))
    srv.listen(1)
    try:
        with pytest.raises(QmpProtocolError):
            store.attach("vm1", tmp_path / "other.sock")
    finally:
        srv.close()
    vm = _start(tmp_path, store, "vm2")  # a QEMU, but it runs another box
    try:
        with pytest.raises(LiveError, match="does not have the box's disk"):
            store.attach("vm1", vm.qmp_path)
    finally:
        vm.quit()
    assert sorted(os.listdir(box_dir)) == before
    assert store.box("vm1").qmp is None


# -- the live snapshot -----------------------------------------------------------------------


@pytest.mark.parametrize("style", ["blockdev", "drive"])
def test_a_live_snapshot_freezes_both_disks_while_the_guest_keeps_writing(
        tmp_path: Path, store: BoxStore, qemu: Any, style: str) -> None:
    vm = _start(tmp_path, store, "vm1", style)
    try:
        store.attach("vm1", vm.qmp_path)
        writes(vm, "d0", 0xA1, [(0, 64 * KIB)])
        writes(vm, "d1", 0xB1, [(2 * MIB, 64 * KIB)])
        snap = store.snapshot("vm1", "s1")
        box = store.box("vm1")
        # QEMU writes the new tops; what it wrote before is frozen where it was, and the
        # snapshot reads it through a stub (no file QEMU has open was moved or rewritten).
        frozen_files = [_qemu_chain(vm, "d0")[1], _qemu_chain(vm, "d1")[1]]
        assert [_qemu_chain(vm, "d0")[0], _qemu_chain(vm, "d1")[0]] == [
            os.fspath(box.disk), os.fspath(box.guest_disk)]
        assert frozen_files == [os.fspath(box.dir / "disk.qcow2"),
                                os.fspath(box.dir / "guest-rootfs.qcow2")]
        assert [_resolved(snap.disk), _resolved(snap.guest_disk)] == frozen_files
        frozen = {Path(p): _sha(Path(p)) for p in [*frozen_files, snap.disk, snap.guest_disk]}
        writes(vm, "d0", 0xA2, [(0, 4 * KIB), (3 * MIB, 64 * KIB)])
        writes(vm, "d1", 0xB2, [(2 * MIB, 4 * KIB)])
        assert box.snapshots == ("s1",)
        snap2 = store.snapshot("vm1", "s2")
        writes(vm, "d0", 0xA3, [(4 * MIB, 64 * KIB)])
        assert {p: _sha(p) for p in frozen} == frozen
        chain = _qemu_chain(vm, "d0")
        assert chain[0] == os.fspath(store.box("vm1").disk)
        assert chain[1] == os.fspath(box.disk) == _resolved(snap2.disk)
        assert chain[2] == frozen_files[0]
        assert store.verify().ok, store.verify().problems
    finally:
        vm.quit()
    assert {p: _sha(p) for p in frozen} == frozen
    # The snapshots hold the guest's state at their instants; the box all of it.
    assert_reads(qemu, snap.disk, 0xA1, 0, 64 * KIB)
    assert_reads(qemu, snap.disk, 0x00, 3 * MIB, 64 * KIB)
    assert snap.guest_disk is not None
    assert_reads(qemu, snap.guest_disk, 0xB1, 2 * MIB, 64 * KIB)
    assert_reads(qemu, snap2.disk, 0xA2, 3 * MIB, 64 * KIB)
    assert_reads(qemu, snap2.disk, 0x00, 4 * MIB, 64 * KIB)
    live = store.box("vm1")
    assert_reads(qemu, live.disk, 0xA3, 4 * MIB, 64 * KIB)
    assert_reads(qemu, live.disk, 0xA2, 0, 4 * KIB)
    assert_reads(qemu, live.disk, 0xA1, 4 * KIB, 60 * KIB)
    assert_base_data(qemu, snap.disk, OS_DATA[1:])
    assert_base_data(qemu, snap.guest_disk, ROOTFS_DATA[:1])
    for image in store._images():
        qemu.assert_clean(image)
    # QEMU has gone: the next operation (here detach) settles the usual layout.
    store.detach("vm1")
    _assert_no_live_leftovers(store, "vm1")
    assert store.box("vm1").disk == live.dir / "disk.qcow2"
    assert_reads(qemu, store.box("vm1").disk, 0xA3, 4 * MIB, 64 * KIB)
    assert not os.stat(snap.disk).st_mode & 0o222
    assert store.verify().ok, store.verify().problems
    # and the box works offline as before
    store.snapshot("vm1", "s3")
    store.restore("vm1", "s1")
    assert_reads(qemu, store.box("vm1").disk, 0xA1, 0, 64 * KIB)
    assert store.verify().ok


def test_a_running_box_refuses_what_needs_it_stopped(tmp_path: Path, store: BoxStore,
                                                     qemu: Any) -> None:
    store.snapshot("vm1", "s0")
    vm = _start(tmp_path, store, "vm1")
    try:
        store.attach("vm1", vm.qmp_path)
        for call in (lambda: store.restore("vm1", "s0"),
                     lambda: store.remove_box("vm1"),
                     lambda: store.snapshot_boxes(["vm1", "vm2"], "b1")):
            with pytest.raises(DiskInUseError, match="running"):
                call()
        # A snapshot's files are immutable: exporting one is fine while the box runs.
        store.export_box("vm1", tmp_path / "s0.qcow2", snapshot="s0")
        qemu.assert_clean(tmp_path / "s0.qcow2")
        assert store.list_boxes() == ["vm1", "vm2"]
        assert store.box("vm2").snapshots == ()  # the batch was all or nothing
    finally:
        vm.quit()


def test_a_stale_attachment_is_dropped_when_the_locks_are_free(
        tmp_path: Path, store: BoxStore, caplog: pytest.LogCaptureFixture) -> None:
    store.snapshot("vm1", "s0")
    vm = _start(tmp_path, store, "vm1")
    store.attach("vm1", vm.qmp_path)
    store.snapshot("vm1", "s1")  # live: the top has a new name now
    vm.kill()  # QEMU gone without a word; its locks go with it
    with caplog.at_level(logging.WARNING, logger="boxdisk.store"):
        store.restore("vm1", "s0")
    assert any("box_attachment_dropped" in r.getMessage() for r in caplog.records)
    assert store.box("vm1").qmp is None
    _assert_no_live_leftovers(store, "vm1")
    assert store.verify().ok, store.verify().problems


def test_a_silent_socket_with_the_disk_held_is_in_use(tmp_path: Path, store: BoxStore) -> None:
    vm = _start(tmp_path, store, "vm1")
    try:
        store.attach("vm1", vm.qmp_path)
        moved = tmp_path / "moved.sock"
        os.rename(vm.qmp_path, moved)  # the socket is gone, QEMU still holds the disks
        with pytest.raises(DiskInUseError, match="does not answer") as err:
            store.restore("vm1", "nothing")
        assert err.value.path == os.fspath(store.box("vm1").disk)
        os.rename(moved, vm.qmp_path)
    finally:
        vm.quit()


def test_a_failed_switch_leaves_the_store_and_qemu_as_they_were(
        tmp_path: Path, store: BoxStore, qemu: Any) -> None:
    vm = _start(tmp_path, store, "vm1")
    agent = _Agent(tmp_path / "ga.sock", fail="guest-fsfreeze-freeze")
    try:
        store.attach("vm1", vm.qmp_path, guest_agent=tmp_path / "ga.sock")
        assert agent.log == ["guest-ping"]
        before = sorted(os.listdir(store.box("vm1").dir))
        with pytest.raises(QmpCommandError, match="Device busy"):
            store.snapshot("vm1", "s1")
        assert agent.log[-2:] == ["guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]
        assert sorted(os.listdir(store.box("vm1").dir)) == before
        assert store.box("vm1").snapshots == ()
        assert _qemu_chain(vm, "d0")[0] == os.fspath(store.box("vm1").disk)
        nodes = {n["node-name"] for n in vm.qmp.execute("query-named-block-nodes")}
        assert not any(n.startswith("boxdisk-") for n in nodes)
        writes(vm, "d0", 0x5A, [(0, 4096)])
    finally:
        vm.quit()
        agent.close()
    assert_reads(qemu, store.box("vm1").disk, 0x5A, 0, 4096)
    store.detach("vm1")
    assert store.verify().ok, store.verify().problems


def test_with_a_guest_agent_the_switch_is_bracketed_by_a_freeze(
        tmp_path: Path, store: BoxStore) -> None:
    vm = _start(tmp_path, store, "vm2")
    agent = _Agent(tmp_path / "ga.sock")
    try:
        store.attach("vm2", vm.qmp_path, guest_agent=tmp_path / "ga.sock")
        store.snapshot("vm2", "s1")
        assert agent.log == ["guest-ping", "guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]
    finally:
        vm.quit()
        agent.close()


# -- SIGKILL of boxdisk during a live snapshot ---------------------------------------------------


def _steps(tmp_path: Path, qemu: Any) -> list[str]:
    """The live snapshot's step boundaries, from one uninterrupted traced run."""
    s = BoxStore(tmp_path / "trace-store")
    make_bases(qemu, s, tmp_path / "trace-src")
    s.create_box("vm1", base="os", guest_base="rootfs")
    vm = _start(tmp_path, s, "vm1", name="trace")
    trace = tmp_path / "trace.txt"
    try:
        s.attach("vm1", vm.qmp_path)
        proc = run_store(s.root, "snapshot", "vm1", "s1", env={TRACE_ENV: os.fspath(trace)})
        assert proc.returncode == 0, proc.stdout + proc.stderr
    finally:
        vm.quit()
        s.close()
    steps = [line for line in trace.read_text().split() if line.startswith("live_snapshot:")]
    assert "live_snapshot:switched" in steps
    return steps


def _kill_at_every_step(tmp_path: Path, store: BoxStore, qemu: Any, box_id: str,
                        prefixes: tuple[str, ...], op: str,
                        args: Callable[[int], tuple[Any, ...]],
                        check: Callable[[BoxStore, Vm, str, int], None],
                        kwargs: dict[str, Any] | None = None,
                        before: Callable[[BoxStore, Vm, int], None] | None = None) -> None:
    """SIGKILL a live operation at each of its steps while QEMU runs; recover; check.

    The steps come from one traced run. Before each crash the guest writes
    ``0x10 + i``, after each recovery ``0x80 + i`` (elsewhere): every one of those
    writes must read back at the end, and ``check(store, vm, step, i)`` holds
    after each recovery, besides QEMU's top being the box's disk and verify().
    """
    vm = _start(tmp_path, store, box_id)
    trace = tmp_path / "trace.txt"
    try:
        store.attach(box_id, vm.qmp_path)
        if before is not None:
            before(store, vm, -1)
        proc = run_store(store.root, op, *args(-1), env={TRACE_ENV: os.fspath(trace)},
                         **(kwargs or {}))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        steps = [x for x in trace.read_text().split() if x.split(":")[0] in prefixes]
        assert len(steps) >= 3, steps
        for i, step in enumerate(steps):
            writes(vm, "d0", 0x10 + i, [(i * 64 * KIB, 64 * KIB)])
            if before is not None:
                before(store, vm, i)
            proc = run_store(store.root, op, *args(i), env={CRASH_ENV: step},
                             **(kwargs or {}))
            assert proc.returncode == -9, (step, proc.stdout, proc.stderr)
            with BoxStore(store.root) as again:  # opening recovers, asking QEMU
                box = again.box(box_id)
                assert os.path.samefile(_qemu_chain(vm, "d0")[0], box.disk), step
                if box.guest_disk is not None:
                    assert os.path.samefile(_qemu_chain(vm, "d1")[0], box.guest_disk), step
                check(again, vm, step, i)
                report = again.verify()
                assert report.ok, (step, report.problems)
            writes(vm, "d0", 0x80 + i, [(8 * MIB + i * 64 * KIB, 64 * KIB)])
    finally:
        vm.quit()
    store.detach(box_id)
    disk = store.box(box_id).disk
    for i in range(len(steps)):
        assert_reads(qemu, disk, 0x10 + i, i * 64 * KIB, 64 * KIB)
        assert_reads(qemu, disk, 0x80 + i, 8 * MIB + i * 64 * KIB, 64 * KIB)
    for image in store._images():
        qemu.assert_clean(image)
    assert store.verify().ok, store.verify().problems
    _assert_no_live_leftovers(store, box_id)


def test_sigkill_at_every_step_of_a_live_snapshot_is_recovered(
        tmp_path: Path, store: BoxStore, qemu: Any) -> None:
    taken = [1]  # the traced run's switch

    def check(again: BoxStore, vm: Vm, step: str, i: int) -> None:
        switched = f"s{i}" in again.box("vm1").snapshots
        assert switched == (step in steps[steps.index("live_snapshot:switched"):]), step
        taken[0] += switched
        # Each switch leaves QEMU two overlay nodes (its tops); an undone one, none.
        nodes = [n["node-name"] for n in vm.qmp.execute("query-named-block-nodes",
                                                        {"flat": True})]
        assert sum(n.startswith("boxdisk-") for n in nodes) == 2 * taken[0], step

    steps = _steps(tmp_path, qemu)
    _kill_at_every_step(tmp_path, store, qemu, "vm1", ("live_snapshot",), "snapshot",
                        lambda i: ("vm1", f"s{i}"), check)



def test_boxdisk_and_qemu_both_killed_after_the_switch(tmp_path: Path, store: BoxStore,
                                                       qemu: Any) -> None:
    vm = _start(tmp_path, store, "vm1")
    store.attach("vm1", vm.qmp_path)
    writes(vm, "d0", 0x61, [(0, 64 * KIB)])
    proc = run_store(store.root, "snapshot", "vm1", "s1",
                     env={CRASH_ENV: "live_snapshot:switched"})
    assert proc.returncode == -9
    writes(vm, "d0", 0x62, [(MIB, 64 * KIB)])  # into the overlay: it grows
    vm.io("d0", "flush")  # a guest's flush: the write survives QEMU's death
    vm.kill()
    with BoxStore(store.root) as again:  # no QEMU to ask: the overlay grew, so it switched
        assert again.box("vm1").snapshots == ("s1",)
        again.restore("vm1", "s1")  # settles, then restores
        assert again.verify().ok, again.verify().problems
        assert_reads(qemu, again.snapshot_info("vm1", "s1").disk, 0x61, 0, 64 * KIB)
        assert_reads(qemu, again.box("vm1").disk, 0x61, 0, 64 * KIB)
        assert again.snapshot_info("vm1", "s1").disk.exists()


def _two_live_snapshots(tmp_path: Path, store: BoxStore, name: str) -> None:
    """vm1 snapshotted twice while QEMU writes, then QEMU gone: a box left to settle."""
    vm = _start(tmp_path, store, "vm1", name=name)
    try:
        store.attach("vm1", vm.qmp_path)
        writes(vm, "d0", 0x31, [(0, 64 * KIB)])
        writes(vm, "d1", 0x41, [(MIB, 64 * KIB)])
        store.snapshot("vm1", "s1")
        writes(vm, "d0", 0x32, [(MIB, 64 * KIB)])
        store.snapshot("vm1", "s2")
        writes(vm, "d0", 0x33, [(2 * MIB, 64 * KIB)])
        writes(vm, "d1", 0x43, [(MIB, 4 * KIB)])
    finally:
        vm.quit()


def _assert_settled_content(qemu: Any, store: BoxStore) -> None:
    s1, s2 = store.snapshot_info("vm1", "s1"), store.snapshot_info("vm1", "s2")
    box = store.box("vm1")
    assert_reads(qemu, s1.disk, 0x31, 0, 64 * KIB)
    assert_reads(qemu, s1.disk, 0x00, MIB, 64 * KIB)
    assert_reads(qemu, s2.disk, 0x32, MIB, 64 * KIB)
    assert_reads(qemu, s2.disk, 0x00, 2 * MIB, 64 * KIB)
    assert_reads(qemu, box.disk, 0x33, 2 * MIB, 64 * KIB)
    assert_reads(qemu, box.disk, 0x31, 0, 64 * KIB)
    assert box.guest_disk is not None and s1.guest_disk is not None
    assert_reads(qemu, s1.guest_disk, 0x41, MIB, 64 * KIB)
    assert_reads(qemu, box.guest_disk, 0x43, MIB, 4 * KIB)
    assert_base_data(qemu, s1.disk, OS_DATA[1:])
    for image in store._images():
        qemu.assert_clean(image)


def test_sigkill_at_every_step_of_settling_is_recovered(tmp_path: Path, qemu: Any) -> None:
    # The steps, from one traced run.
    trace_store = BoxStore(tmp_path / "trace")
    make_bases(qemu, trace_store, tmp_path / "trace-src")
    trace_store.create_box("vm1", base="os", guest_base="rootfs")
    _two_live_snapshots(tmp_path, trace_store, "trace")
    trace = tmp_path / "trace.txt"
    proc = run_store(trace_store.root, "detach", "vm1", env={TRACE_ENV: os.fspath(trace)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = [line for line in trace.read_text().split() if line.startswith("settle:")]
    assert len(steps) >= 4, steps
    _assert_settled_content(qemu, trace_store)
    trace_store.close()
    for i, step in enumerate(steps):
        s = BoxStore(tmp_path / f"store{i}")
        make_bases(qemu, s, tmp_path / f"src{i}")
        s.create_box("vm1", base="os", guest_base="rootfs")
        _two_live_snapshots(tmp_path, s, f"vm{i}")
        proc = run_store(s.root, "detach", "vm1", env={CRASH_ENV: step})
        assert proc.returncode == -9, (step, proc.stdout, proc.stderr)
        s.close()
        with BoxStore(tmp_path / f"store{i}") as again:  # recovery finishes the settle
            report = again.verify()
            assert report.ok, (step, report.problems)
            _assert_no_live_leftovers(again, "vm1")
            _assert_settled_content(qemu, again)


# -- the live clone ----------------------------------------------------------------------------


def test_a_live_clone_sees_the_state_at_clone_time_and_none_of_the_later_writes(
        tmp_path: Path, store: BoxStore, qemu: Any) -> None:
    vm = _start(tmp_path, store, "vm1")
    try:
        store.attach("vm1", vm.qmp_path)
        writes(vm, "d0", 0xC1, [(0, 64 * KIB)])
        writes(vm, "d1", 0xD1, [(MIB, 64 * KIB)])
        clone = store.clone_box("vm1", "vm3")
        writes(vm, "d0", 0xC2, [(0, 4 * KIB), (2 * MIB, 64 * KIB)])
        assert clone.clone_of == "vm1" and clone.guest_disk is not None
        assert os.path.samefile(_qemu_chain(vm, "d0")[0], store.box("vm1").disk)
        # The clone can run beside it (its own QEMU) and diverge.
        vm3 = _start(tmp_path, store, "vm3", name="vm3")
        try:
            writes(vm3, "d0", 0xE1, [(3 * MIB, 64 * KIB)])
            assert store.verify().ok, store.verify().problems
        finally:
            vm3.quit()
    finally:
        vm.quit()
    assert_reads(qemu, clone.disk, 0xC1, 0, 64 * KIB)
    assert_reads(qemu, clone.disk, 0x00, 2 * MIB, 64 * KIB)
    assert_reads(qemu, clone.disk, 0xE1, 3 * MIB, 64 * KIB)
    assert_reads(qemu, clone.guest_disk, 0xD1, MIB, 64 * KIB)
    src = store.box("vm1")
    assert_reads(qemu, src.disk, 0xC2, 2 * MIB, 64 * KIB)
    assert_reads(qemu, src.disk, 0x00, 3 * MIB, 64 * KIB)
    store.detach("vm1")  # settles: the clone base gets the frozen files in place of stubs
    _assert_no_live_leftovers(store, "vm1")
    assert_reads(qemu, store.box("vm3").disk, 0xC1, 0, 64 * KIB)
    assert_reads(qemu, store.box("vm3").disk, 0xE1, 3 * MIB, 64 * KIB)
    assert_reads(qemu, store.box("vm1").disk, 0xC2, 2 * MIB, 64 * KIB)
    for image in store._images():
        qemu.assert_clean(image)
    assert store.verify().ok, store.verify().problems
    store.remove_box("vm1")  # the clone keeps its base
    assert_reads(qemu, store.box("vm3").disk, 0xC1, 0, 64 * KIB)
    assert store.verify().ok, store.verify().problems


def test_settling_waits_while_a_clone_runs_on_the_stub(tmp_path: Path, store: BoxStore,
                                                      qemu: Any) -> None:
    vm = _start(tmp_path, store, "vm1")
    store.attach("vm1", vm.qmp_path)
    writes(vm, "d0", 0xC5, [(0, 64 * KIB)])
    store.clone_box("vm1", "vm3")
    vm.quit()
    vm3 = _start(tmp_path, store, "vm3", name="vm3")  # reads through the clone base's stub
    try:
        store.detach("vm1")
        assert (store.box("vm1").dir / "live.json").exists()  # not settled under vm3's QEMU
        # Until it can be settled, nothing else may change vm1's live layout.
        for call in (lambda: store.remove_box("vm1"), lambda: store.snapshot("vm1", "x"),
                     lambda: store.remove_snapshot("vm1", "nope"),
                     lambda: store.restore("vm1", "nope")):
            with pytest.raises(DiskInUseError, match="live layout"):
                call()
        writes(vm3, "d0", 0xE5, [(MIB, 4 * KIB)])
    finally:
        vm3.quit()
    store.snapshot("vm1", "later")  # vm3 stopped: the next operation settles vm1 first
    _assert_no_live_leftovers(store, "vm1")
    assert_reads(qemu, store.box("vm3").disk, 0xC5, 0, 64 * KIB)
    assert store.verify().ok, store.verify().problems


def test_sigkill_at_every_step_of_a_live_clone_is_recovered(tmp_path: Path, store: BoxStore,
                                                            qemu: Any) -> None:
    def check(again: BoxStore, vm: Vm, step: str, i: int) -> None:
        steps = (tmp_path / "trace.txt").read_text().split()
        past = steps.index(step) >= steps.index("live_clone:switched")
        assert (f"c{i}" in again.list_boxes()) == past, step
        if past:
            assert_reads(qemu, again.box(f"c{i}").disk, 0x10 + i, i * 64 * KIB, 64 * KIB)

    _kill_at_every_step(tmp_path, store, qemu, "vm1", ("live_clone",), "clone_box",
                        lambda i: ("vm1", f"c{i}"), check)


def test_a_live_export_is_the_guests_view_at_that_instant_and_the_chain_stays(
        tmp_path: Path, store: BoxStore, qemu: Any) -> None:
    vm = _start(tmp_path, store, "vm1")
    out, kept = tmp_path / "out.qcow2", tmp_path / "kept.qcow2"
    try:
        store.attach("vm1", vm.qmp_path)
        writes(vm, "d0", 0xF1, [(0, 64 * KIB), (5 * MIB, 64 * KIB)])
        before = store.box("vm1")
        chain_before = _qemu_chain(vm, "d0")
        seen: list[tuple[int, int]] = []
        store.export_box("vm1", out, progress=lambda d, t: seen.append((d, t)))
        # The box's chain is as it was: QEMU writes the same file again.
        assert _qemu_chain(vm, "d0") == chain_before
        assert store.box("vm1").disk == before.disk
        assert store.box("vm1").snapshots == ()
        assert not (before.dir / "live.json").exists() or store.box("vm1").qmp
        writes(vm, "d0", 0xF2, [(0, 4 * KIB)])
        # keep_snapshot: the export's snapshot stays, and the export equals it.
        store.export_box("vm1", kept, keep_snapshot=True)
        [name] = store.box("vm1").snapshots
        assert name.startswith("export-")
        writes(vm, "d0", 0xF3, [(0, 4 * KIB)])
        assert store.verify().ok, store.verify().problems
    finally:
        vm.quit()
    assert seen
    assert_reads(qemu, out, 0xF1, 0, 64 * KIB)
    assert_reads(qemu, out, 0xF1, 5 * MIB, 64 * KIB)
    assert_reads(qemu, out, OS_DATA[0][2], 128 * KIB, 64 * KIB)  # the base shows through
    assert qemu.info(out).get("backing-filename") is None
    assert_reads(qemu, kept, 0xF2, 0, 4 * KIB)
    qemu.img("compare", "-U", kept, store.snapshot_info("vm1", name).disk)
    assert_reads(qemu, store.box("vm1").disk, 0xF3, 0, 4 * KIB)
    assert_reads(qemu, store.box("vm1").disk, 0xF1, 5 * MIB, 64 * KIB)
    for image in [*store._images(), out, kept]:
        qemu.assert_clean(image)
    store.detach("vm1")
    _assert_no_live_leftovers(store, "vm1")
    assert store.verify().ok, store.verify().problems


def test_sigkill_at_every_step_of_a_live_export_is_recovered(tmp_path: Path, store: BoxStore,
                                                             qemu: Any) -> None:
    def check(again: BoxStore, vm: Vm, step: str, i: int) -> None:
        # Once the switch happened the export is merged back: no snapshot is left.
        assert again.box("vm2").snapshots == (), step

    _kill_at_every_step(tmp_path, store, qemu, "vm2", ("live_snapshot", "live_export"),
                        "export_box", lambda i: ("vm2", os.fspath(tmp_path / f"e{i}.qcow2")),
                        check)


def test_qemu_gone_during_the_merge_back_is_finished_offline(tmp_path: Path, store: BoxStore,
                                                            qemu: Any) -> None:
    vm = _start(tmp_path, store, "vm2")
    store.attach("vm2", vm.qmp_path)
    writes(vm, "d0", 0x71, [(0, 64 * KIB)])
    proc = run_store(store.root, "export_box", "vm2", os.fspath(tmp_path / "x.qcow2"),
                     env={CRASH_ENV: "live_export:hidden"})
    assert proc.returncode == -9
    writes(vm, "d0", 0x72, [(MIB, 64 * KIB)])  # into the export's new top
    vm.io("d0", "flush")  # what a guest does for data it needs kept: QEMU is killed next
    vm.kill()
    with BoxStore(store.root) as again:  # no QEMU: boxdisk commits the new top itself
        box = again.box("vm2")
        assert box.snapshots == ()
        assert_reads(qemu, box.disk, 0x71, 0, 64 * KIB)
        assert_reads(qemu, box.disk, 0x72, MIB, 64 * KIB)
        again.snapshot("vm2", "after")  # settles, then works offline
        assert again.verify().ok, again.verify().problems
        for image in again._images():
            qemu.assert_clean(image)


# -- the command line ------------------------------------------------------------------------


def test_the_command_line_attaches_and_snapshots_a_running_box(tmp_path: Path,
                                                               store: BoxStore) -> None:
    def cli(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "boxdisk", "store", "--root",
                               os.fspath(store.root), *args], capture_output=True, text=True,
                              check=False, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    vm = _start(tmp_path, store, "vm1")
    try:
        cli("box", "attach", "vm1", os.fspath(vm.qmp_path))
        shown = json.loads(cli("--output", "json", "box", "show", "vm1"))
        assert shown["qmp"] == os.fspath(vm.qmp_path)
        cli("snapshot", "create", "vm1", "s1")  # another process, the running box: live
        shown = json.loads(cli("--output", "json", "box", "show", "vm1"))
        assert shown["snapshots"] == ["s1"]
        assert os.path.samefile(_qemu_chain(vm, "d0")[0], store.root / shown["disk"])
        cli("export", "--keep-snapshot", "vm1", os.fspath(tmp_path / "out.qcow2"))
        assert len(store.box("vm1").snapshots) == 2
    finally:
        vm.quit()
    cli("box", "detach", "vm1")
    _assert_no_live_leftovers(store, "vm1")


# -- removing a snapshot of a running box (merged by QEMU) ------------------------------------


def test_a_live_merge_keeps_what_every_image_reads(tmp_path: Path, store: BoxStore,
                                                  qemu: Any) -> None:
    write(qemu, store.box("vm1").disk, 0x51, 0, 64 * KIB)
    store.snapshot("vm1", "s0")  # offline, before QEMU starts: a snapshot's own file
    vm = _start(tmp_path, store, "vm1")
    try:
        store.attach("vm1", vm.qmp_path)
        writes(vm, "d0", 0x52, [(MIB, 64 * KIB)])
        store.snapshot("vm1", "s1")
        writes(vm, "d0", 0x53, [(2 * MIB, 64 * KIB)])
        store.snapshot("vm1", "s2")
        writes(vm, "d0", 0x54, [(3 * MIB, 64 * KIB)])
        with pytest.raises(SnapshotInUseError):
            store.remove_snapshot("vm1", "s1")  # without merge: the chain needs it
        depth = len(_qemu_chain(vm, "d0"))
        store.remove_snapshot("vm1", "s1", merge=True)  # a stub's: streamed into s2's file
        assert store.box("vm1").snapshots == ("s0", "s2")
        assert len(_qemu_chain(vm, "d0")) == depth - 1
        store.remove_snapshot("vm1", "s0", merge=True)  # its own file, taken before QEMU ran
        assert store.box("vm1").snapshots == ("s2",)
        assert len(_qemu_chain(vm, "d0")) == depth - 2
        # QEMU names the images under s0 through s0's directory: it stays until QEMU stops.
        sdir = store.box("vm1").dir / "snapshots" / "s0"
        assert sorted(os.listdir(sdir)) == [".removed"]
        for name in _open_files(vm):
            assert os.path.exists(name), name
        with pytest.raises(NotFoundError):
            store.snapshot_info("vm1", "s0")
        with pytest.raises(AlreadyExistsError, match="free again once the box has stopped"):
            store.snapshot("vm1", "s0")
        writes(vm, "d0", 0x55, [(4 * MIB, 64 * KIB)])
        vm.io("d0", "read -P 0x51 0 64k")
        vm.io("d0", "read -P 0x52 1M 64k")
        assert store.verify().ok, store.verify().problems
    finally:
        vm.quit()
    s2 = store.snapshot_info("vm1", "s2")
    for pattern, off in ((0x51, 0), (0x52, MIB), (0x53, 2 * MIB)):
        assert_reads(qemu, s2.disk, pattern, off, 64 * KIB)
    assert_reads(qemu, s2.disk, 0x00, 3 * MIB, 64 * KIB)
    box = store.box("vm1")
    for pattern, off in ((0x51, 0), (0x52, MIB), (0x53, 2 * MIB), (0x54, 3 * MIB),
                         (0x55, 4 * MIB)):
        assert_reads(qemu, box.disk, pattern, off, 64 * KIB)
    assert_base_data(qemu, box.disk, OS_DATA[1:])
    for image in store._images():
        qemu.assert_clean(image)
    store.detach("vm1")
    _assert_no_live_leftovers(store, "vm1")
    assert not sdir.exists()  # settled: QEMU has gone, the directory with it
    assert store.verify().ok, store.verify().problems


def test_sigkill_at_every_step_of_a_live_merge_is_recovered(tmp_path: Path, store: BoxStore,
                                                            qemu: Any) -> None:
    def take(again: BoxStore, vm: Vm, i: int) -> None:
        again.snapshot("vm2", f"m{i}")  # a live snapshot to merge away

    def check(again: BoxStore, vm: Vm, step: str, i: int) -> None:
        assert f"m{i}" not in again.box("vm2").snapshots, step  # the merge is finished

    _kill_at_every_step(tmp_path, store, qemu, "vm2", ("live_remove_snapshot",),
                        "remove_snapshot", lambda i: ("vm2", f"m{i}"), check,
                        kwargs={"merge": True}, before=take)


def test_qemu_gone_during_a_live_merge_is_finished_offline(tmp_path: Path, store: BoxStore,
                                                          qemu: Any) -> None:
    vm = _start(tmp_path, store, "vm2")
    store.attach("vm2", vm.qmp_path)
    writes(vm, "d0", 0x41, [(0, 64 * KIB)])
    store.snapshot("vm2", "t")
    writes(vm, "d0", 0x42, [(MIB, 64 * KIB)])
    vm.io("d0", "flush")
    proc = run_store(store.root, "remove_snapshot", "vm2", "t", merge=True,
                     env={CRASH_ENV: "live_remove_snapshot:recorded"})
    assert proc.returncode == -9
    vm.kill()
    with BoxStore(store.root) as again:  # no QEMU: boxdisk merges (a safe rebase) itself
        box = again.box("vm2")
        assert box.snapshots == ()
        assert_reads(qemu, box.disk, 0x41, 0, 64 * KIB)
        assert_reads(qemu, box.disk, 0x42, MIB, 64 * KIB)
        assert again.verify().ok, again.verify().problems
        for image in again._images():
            qemu.assert_clean(image)


# -- qemu-storage-daemon: the block layer without a machine ------------------------------------


def test_a_box_served_by_qemu_storage_daemon_snapshots_and_merges_live(
        tmp_path: Path, store: BoxStore, qemu: Any) -> None:
    qsd = StorageDaemon(tmp_path, store.box("vm2").disk)
    try:
        store.attach("vm2", qsd.qmp_path)
        qsd.io("write -P 0x91 0 64k")
        store.snapshot("vm2", "s1")
        qsd.io("write -P 0x92 0 4k")  # the export follows QEMU onto the new top
        qsd.io("read -P 0x91 4k 60k")
        assert store.box("vm2").disk.name != "disk.qcow2"  # a new top, nothing renamed
        store.export_box("vm2", tmp_path / "out.qcow2")
        store.remove_snapshot("vm2", "s1", merge=True)
        qsd.io("read -P 0x92 0 4k")
        assert store.verify().ok, store.verify().problems
    finally:
        qsd.stop()
    assert_reads(qemu, tmp_path / "out.qcow2", 0x92, 0, 4 * KIB)
    assert_reads(qemu, tmp_path / "out.qcow2", 0x91, 4 * KIB, 60 * KIB)
    store.detach("vm2")
    _assert_no_live_leftovers(store, "vm2")
    assert_reads(qemu, store.box("vm2").disk, 0x92, 0, 4 * KIB)
    assert_reads(qemu, store.box("vm2").disk, 0x91, 4 * KIB, 60 * KIB)
    for image in store._images():
        qemu.assert_clean(image)


def _open_files(vm: Vm) -> dict[str, tuple[int, int]]:
    """Every file QEMU has open, by the name QEMU knows it, with its (device, inode)."""
    out = {}
    for n in vm.qmp.execute("query-named-block-nodes", {"flat": True}):
        if n.get("drv") == "file":
            st = os.stat(n["file"])
            out[n["file"]] = (st.st_dev, st.st_ino)
    return out


def test_no_file_qemu_has_open_is_ever_renamed_or_replaced(tmp_path: Path, store: BoxStore,
                                                           qemu: Any) -> None:
    """QEMU reopens by name: each name it knows must keep naming the file it opened."""
    store.snapshot("vm1", "s0")
    vm = _start(tmp_path, store, "vm1")
    seen: dict[str, tuple[int, int]] = {}

    def check() -> None:
        now = _open_files(vm)
        for name, ino in seen.items():
            if name in now:
                assert now[name] == ino, f"{name} names another file now"
        seen.update(now)

    try:
        store.attach("vm1", vm.qmp_path)
        check()
        for step in (lambda: store.snapshot("vm1", "s1"),
                     lambda: store.clone_box("vm1", "vm3"),
                     lambda: store.export_box("vm1", tmp_path / "e.qcow2"),
                     lambda: store.snapshot("vm1", "s2"),
                     lambda: store.remove_snapshot("vm1", "s1", merge=True),
                     lambda: store.remove_snapshot("vm1", "s2", merge=True),
                     lambda: store.remove_snapshot("vm1", "s0", merge=True)):
            writes(vm, "d0", 0x33, [(0, 4 * KIB)])
            step()
            check()
            assert store.verify().ok, store.verify().problems
        assert len(seen) >= 6
    finally:
        vm.quit()
    for image in store._images():
        qemu.assert_clean(image)


def test_many_live_snapshots_deep(tmp_path: Path, store: BoxStore, qemu: Any) -> None:
    """Past a few dozen layers QEMU no longer reports a new top's file name (its json:{}
    options outgrow 4 KiB): the store follows QEMU's nodes by the names it recorded."""
    vm = _start(tmp_path, store, "vm2")
    try:
        store.attach("vm2", vm.qmp_path)
        for i in range(60):
            writes(vm, "d0", i + 1, [(i * 64 * KIB, 64 * KIB)])
            store.snapshot("vm2", f"s{i}")
        store.remove_snapshot("vm2", "s30", merge=True)
        store.export_box("vm2", tmp_path / "deep.qcow2")
        store.clone_box("vm2", "deep-clone")
        assert store.verify().ok, store.verify().problems
    finally:
        vm.quit()
    store.detach("vm2")
    _assert_no_live_leftovers(store, "vm2")
    for i in range(60):
        assert_reads(qemu, tmp_path / "deep.qcow2", i + 1, i * 64 * KIB, 64 * KIB)
        assert_reads(qemu, store.box("deep-clone").disk, i + 1, i * 64 * KIB, 64 * KIB)
    assert_reads(qemu, store.snapshot_info("vm2", "s40").disk, 41, 40 * 64 * KIB, 64 * KIB)
    assert_reads(qemu, store.snapshot_info("vm2", "s40").disk, 0, 41 * 64 * KIB, 64 * KIB)
    assert store.verify().ok, store.verify().problems


def test_a_new_qemu_on_the_same_socket_is_found_by_the_files(tmp_path: Path, store: BoxStore,
                                                             qemu: Any) -> None:
    """The recorded node names are a new QEMU's no more: the store finds its nodes again."""
    vm = _start(tmp_path, store, "vm2")
    try:
        store.attach("vm2", vm.qmp_path)
        store.snapshot("vm2", "s1")  # the top is now a node boxdisk named
        writes(vm, "d0", 0x13, [(0, 64 * KIB)])
    finally:
        vm.quit()
    vm = _start(tmp_path, store, "vm2")  # the launcher restarts the VM, same sockets
    try:
        store.snapshot("vm2", "s2")
        writes(vm, "d0", 0x14, [(MIB, 64 * KIB)])
        assert os.path.samefile(_qemu_chain(vm, "d0")[0], store.box("vm2").disk)
        assert store.verify().ok, store.verify().problems
    finally:
        vm.quit()
    store.detach("vm2")
    assert_reads(qemu, store.snapshot_info("vm2", "s2").disk, 0x13, 0, 64 * KIB)
    assert_reads(qemu, store.box("vm2").disk, 0x14, MIB, 64 * KIB)
    assert store.verify().ok, store.verify().problems


def test_sigkill_removing_snapshots_taken_before_the_box_started(tmp_path: Path,
                                                                store: BoxStore,
                                                                qemu: Any) -> None:
    """Their own files are in QEMU's chain: streamed by QEMU, their directories kept."""
    disk = store.box("vm2").disk
    for i in range(8):
        write(qemu, disk, 0x70 + i, i * 64 * KIB, 64 * KIB)
        store.snapshot("vm2", f"o{i}")
    vm = _start(tmp_path, store, "vm2")
    trace = tmp_path / "trace.txt"
    try:
        store.attach("vm2", vm.qmp_path)
        proc = run_store(store.root, "remove_snapshot", "vm2", "o0", merge=True,
                         env={TRACE_ENV: os.fspath(trace)})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        steps = [x for x in trace.read_text().split() if x.startswith("live_remove_snapshot:")]
        for i, step in enumerate(steps, start=1):
            proc = run_store(store.root, "remove_snapshot", "vm2", f"o{i}", merge=True,
                             env={CRASH_ENV: step})
            assert proc.returncode == -9, (step, proc.stdout, proc.stderr)
            with BoxStore(store.root) as again:
                assert f"o{i}" not in again.box("vm2").snapshots, step
                report = again.verify()
                assert report.ok, (step, report.problems)
                for name in _open_files(vm):
                    assert os.path.exists(name), (step, name)
        writes(vm, "d0", 0x7F, [(MIB, 64 * KIB)])
    finally:
        vm.quit()
    store.detach("vm2")
    _assert_no_live_leftovers(store, "vm2")
    assert not [n for n in os.listdir(store.box("vm2").dir / "snapshots")
                if n not in store.box("vm2").snapshots]
    for i in range(8):
        assert_reads(qemu, store.box("vm2").disk, 0x70 + i, i * 64 * KIB, 64 * KIB)
    assert_reads(qemu, store.box("vm2").disk, 0x7F, MIB, 64 * KIB)
    for s in store.box("vm2").snapshots:
        assert not os.stat(store.snapshot_info("vm2", s).disk).st_mode & 0o222
    for image in store._images():
        qemu.assert_clean(image)
    assert store.verify().ok, store.verify().problems


def test_a_live_clone_removed_before_its_source_settles(tmp_path: Path, store: BoxStore,
                                                       qemu: Any) -> None:
    """The clone goes with its base, but the source's chain still runs through the frozen
    file: settling brings the base back, as the source's own."""
    vm = _start(tmp_path, store, "vm1")
    try:
        store.attach("vm1", vm.qmp_path)
        writes(vm, "d0", 0xA7, [(0, 64 * KIB)])
        store.clone_box("vm1", "vm3")
        store.remove_box("vm3")  # takes the clone base (only vm3 needed the stubs)
        writes(vm, "d0", 0xA8, [(MIB, 64 * KIB)])
        vm.io("d0", "flush")
    finally:
        vm.quit()
    clones = store.root / "clones"
    assert os.listdir(clones) == []  # gone with vm3
    store.detach("vm1")
    _assert_no_live_leftovers(store, "vm1")
    [cid] = os.listdir(clones)
    assert json.loads((clones / cid / "clone.json").read_text())["recreated"] is True
    assert_reads(qemu, store.box("vm1").disk, 0xA7, 0, 64 * KIB)
    assert_reads(qemu, store.box("vm1").disk, 0xA8, MIB, 64 * KIB)
    for image in store._images():
        qemu.assert_clean(image)
    assert store.verify().ok, store.verify().problems
    store.remove_box("vm1")  # and its base goes with it: nothing else needs it
    assert os.listdir(clones) == []
    assert store.verify().ok, store.verify().problems
