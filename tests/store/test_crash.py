"""Crash safety: every multi-step operation, SIGKILLed at every step boundary, then recovered.

A child process runs the operation with ``BOXDISK_STORE_CRASH_AT=op:step``
and the store kills it there (``crashpoint``). Reopening the store finishes or
undoes what was in flight; then verify() is clean, ``qemu-img check`` passes on
every image, nothing is left over, no guest byte written before the operation
is lost, and the operation happened entirely or not at all.

The steps come from a first, uninterrupted run with ``BOXDISK_STORE_TRACE``,
so a new step in the store is crash-tested without touching this file.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest

from boxdisk import read_backing_file_path
from boxdisk.store import BoxStore
from boxdisk.store._journal import CRASH_ENV, TRACE_ENV
from tests.conftest import Qemu

from .helpers import (
    MIB,
    OS_DATA,
    ROOTFS_DATA,
    SIZE,
    assert_base_data,
    assert_reads,
    assert_store_clean,
    make_bases,
    reads,
    run_store,
    write,
)

pytestmark = pytest.mark.qemu

KIB = 1024


@attrs.define
class Scenario:
    """A store to start from, one operation on it, and what must hold after any crash."""

    setup: Callable[[Any, BoxStore, Path], None]
    op: str
    args: tuple[Any, ...]
    check: Callable[[Any, BoxStore, Path], None]
    done: Callable[[BoxStore], bool]
    kwargs: dict[str, Any] = attrs.field(factory=dict)
    #: The child's BoxStore options (``sync``, ``no_tmpfile``).
    store_options: dict[str, Any] = attrs.field(factory=dict)


def _box(store: BoxStore, box_id: str) -> Path:
    return store.root / "boxes" / box_id


def _setup_vm(qemu: Any, store: BoxStore, tmp: Path) -> None:
    """vm: two disks over bases; A in s1, B written after; solo: one standalone disk."""
    make_bases(qemu, store, tmp / "src")
    vm = store.create_box("vm", base="os", guest_base="rootfs")
    write(qemu, vm.disk, 0xA1, 2 * MIB)
    write(qemu, vm.guest_disk, 0xA2, 3 * MIB)
    store.snapshot("vm", "s1")
    write(qemu, vm.disk, 0xB1, 2 * MIB)
    write(qemu, vm.guest_disk, 0xB2, 3 * MIB)
    solo = store.create_box("solo", size=SIZE)
    write(qemu, solo.disk, 0xC1, MIB)


def _vm_live_intact(qemu: Any, store: BoxStore) -> None:
    vm = _box(store, "vm")
    assert_reads(qemu, vm / "disk.qcow2", 0xB1, 2 * MIB)
    assert_reads(qemu, vm / "guest-rootfs.qcow2", 0xB2, 3 * MIB)
    assert_base_data(qemu, vm / "disk.qcow2", OS_DATA[1:])
    assert_base_data(qemu, vm / "guest-rootfs.qcow2", ROOTFS_DATA)
    s1 = vm / "snapshots" / "s1"
    assert_reads(qemu, s1 / "disk.qcow2", 0xA1, 2 * MIB)
    assert_reads(qemu, s1 / "guest-rootfs.qcow2", 0xA2, 3 * MIB)


def _check_create(qemu: Any, store: BoxStore, tmp: Path) -> None:
    _vm_live_intact(qemu, store)
    if "new" in store.list_boxes():
        new = store.box("new")
        assert new.guest_disk is not None
        assert_base_data(qemu, new.disk, OS_DATA)
        assert_base_data(qemu, new.guest_disk, ROOTFS_DATA)


def _check_snapshot(qemu: Any, store: BoxStore, tmp: Path) -> None:
    _vm_live_intact(qemu, store)
    if "s2" in store.box("vm").snapshots:
        s2 = _box(store, "vm") / "snapshots" / "s2"
        assert_reads(qemu, s2 / "disk.qcow2", 0xB1, 2 * MIB)
        assert_reads(qemu, s2 / "guest-rootfs.qcow2", 0xB2, 3 * MIB)
        assert read_backing(_box(store, "vm") / "disk.qcow2") == "snapshots/s2/disk.qcow2"


def _check_solo_snapshot(qemu: Any, store: BoxStore, tmp: Path) -> None:
    assert_reads(qemu, _box(store, "solo") / "disk.qcow2", 0xC1, MIB)
    if "s" in store.box("solo").snapshots:
        assert_reads(qemu, _box(store, "solo") / "snapshots/s/disk.qcow2", 0xC1, MIB)


def _check_restore(qemu: Any, store: BoxStore, tmp: Path) -> None:
    vm = _box(store, "vm")
    container_new = reads(qemu, vm / "disk.qcow2", 0xA1, 2 * MIB)
    guest_new = reads(qemu, vm / "guest-rootfs.qcow2", 0xA2, 3 * MIB)
    assert container_new == guest_new, "restore is all or nothing across the box's disks"
    if not container_new:
        _vm_live_intact(qemu, store)
    assert_reads(qemu, vm / "snapshots/s1/disk.qcow2", 0xA1, 2 * MIB)


def _check_clone(qemu: Any, store: BoxStore, tmp: Path) -> None:
    _vm_live_intact(qemu, store)
    if "copy" in store.list_boxes():
        copy = store.box("copy")
        assert copy.guest_disk is not None
        assert_reads(qemu, copy.disk, 0xB1, 2 * MIB)
        assert_reads(qemu, copy.guest_disk, 0xB2, 3 * MIB)
        write(qemu, copy.disk, 0xD1, 2 * MIB)
        assert_reads(qemu, _box(store, "vm") / "disk.qcow2", 0xB1, 2 * MIB)
    else:
        assert os.listdir(store.root / "clones") == []


def _setup_aux(qemu: Any, store: BoxStore, tmp: Path) -> None:
    """aux: X in t1, Y in t2 (nothing backs onto t2), Z live over t1; a clone pair."""
    aux = store.create_box("aux", size=SIZE)
    write(qemu, aux.disk, 0x51, 0, MIB)
    store.snapshot("aux", "t1")
    write(qemu, aux.disk, 0x52, MIB, MIB)
    store.snapshot("aux", "t2")
    store.restore("aux", "t1")
    write(qemu, aux.disk, 0x53, 2 * MIB, MIB)
    store.clone_box("aux", "twin")  # clones/C <- aux, twin; C -> t1
    write(qemu, _box(store, "twin") / "disk.qcow2", 0x54, 3 * MIB, MIB)


def _aux_intact(qemu: Any, store: BoxStore, *, t2: bool = True) -> None:
    live = _box(store, "aux") / "disk.qcow2"
    assert_reads(qemu, live, 0x51, 0, MIB)
    assert_reads(qemu, live, 0x53, 2 * MIB, MIB)
    assert reads(qemu, live, 0, MIB, MIB)
    twin = _box(store, "twin") / "disk.qcow2"
    assert_reads(qemu, twin, 0x51, 0, MIB)
    assert_reads(qemu, twin, 0x54, 3 * MIB, MIB)
    if t2 and "t2" in store.box("aux").snapshots:
        t2_disk = _box(store, "aux") / "snapshots/t2/disk.qcow2"
        assert_reads(qemu, t2_disk, 0x51, 0, MIB)
        assert_reads(qemu, t2_disk, 0x52, MIB, MIB)


def _check_remove_t2(qemu: Any, store: BoxStore, tmp: Path) -> None:
    _aux_intact(qemu, store)


def _check_merge_t1(qemu: Any, store: BoxStore, tmp: Path) -> None:
    _aux_intact(qemu, store)  # every dependent reads what it read, merged or not


def _check_remove_twin(qemu: Any, store: BoxStore, tmp: Path) -> None:
    live = _box(store, "aux") / "disk.qcow2"
    assert_reads(qemu, live, 0x51, 0, MIB)
    assert_reads(qemu, live, 0x53, 2 * MIB, MIB)
    if "twin" in store.list_boxes():
        assert_reads(qemu, _box(store, "twin") / "disk.qcow2", 0x54, 3 * MIB, MIB)


def _setup_import(qemu: Any, store: BoxStore, tmp: Path) -> None:
    tmp.mkdir(parents=True, exist_ok=True)
    img = tmp / "import.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", img, str(SIZE))
    write(qemu, img, 0x61, 5 * MIB, 128 * KIB)
    store.create_box("vm", size=SIZE)


def _check_import(qemu: Any, store: BoxStore, tmp: Path) -> None:
    if "imp" in store.list_boxes():
        assert_reads(qemu, store.box("imp").disk, 0x61, 5 * MIB, 128 * KIB)


def _check_add_base(qemu: Any, store: BoxStore, tmp: Path) -> None:
    if "b2" in store.list_bases():
        assert store.base_path("b2").stat().st_size == (tmp / "import.qcow2").stat().st_size
        box = store.create_box("on-b2", base="b2")
        assert_reads(qemu, box.disk, 0x61, 5 * MIB, 128 * KIB)


POOL = [f"p{i:02d}" for i in range(50)]
#: Boxes of the pool whose data the checks read (all of them are checked by verify).
SAMPLE = (0, 17, 49)


def _check_pool(qemu: Any, store: BoxStore, tmp: Path, pool: list[str] = POOL) -> None:
    _vm_live_intact(qemu, store)
    made = [b for b in pool if b in store.list_boxes()]
    assert made in ([], pool), f"a batch is all or nothing: {len(made)} of {len(pool)} boxes"
    for i in SAMPLE if made else ():
        assert_base_data(qemu, _box(store, pool[i % len(pool)]) / "disk.qcow2", OS_DATA)


def _setup_pool(qemu: Any, store: BoxStore, tmp: Path) -> None:
    """vm as in _setup_vm, and a pool of 50 boxes; a few have data of their own."""
    _setup_vm(qemu, store, tmp)
    store.create_boxes(POOL, base="os")
    for i in SAMPLE:
        write(qemu, _box(store, POOL[i]) / "disk.qcow2", 0x40 + i, 3 * MIB)


def _check_pool_snapshot(qemu: Any, store: BoxStore, tmp: Path) -> None:
    _vm_live_intact(qemu, store)
    taken = [b for b in POOL if "n" in store.box(b).snapshots]
    assert taken in ([], POOL), f"a batch is all or nothing: {len(taken)} of {len(POOL)} snapshots"
    for i in SAMPLE:
        live = _box(store, POOL[i]) / "disk.qcow2"
        assert_reads(qemu, live, 0x40 + i, 3 * MIB)
        assert_base_data(qemu, live, OS_DATA)
        if taken:
            assert_reads(qemu, _box(store, POOL[i]) / "snapshots/n/disk.qcow2", 0x40 + i, 3 * MIB)


def read_backing(path: Path) -> str | None:
    return read_backing_file_path(path)


def _merged(store: BoxStore) -> bool:
    return "t1" not in store.box("aux").snapshots


SCENARIOS = {
    "create_box": Scenario(_setup_vm, "create_box", ("new",), _check_create,
                           lambda s: "new" in s.list_boxes(),
                           {"base": "os", "guest_base": "rootfs"}),
    "snapshot": Scenario(_setup_vm, "snapshot", ("vm", "s2"), _check_snapshot,
                         lambda s: "s2" in s.box("vm").snapshots),
    "snapshot-standalone": Scenario(_setup_vm, "snapshot", ("solo", "s"), _check_solo_snapshot,
                                    lambda s: "s" in s.box("solo").snapshots),
    "restore": Scenario(_setup_vm, "restore", ("vm", "s1"), _check_restore,
                        lambda s: not reads_b1(s)),
    "clone_box": Scenario(_setup_vm, "clone_box", ("vm", "copy"), _check_clone,
                          lambda s: "copy" in s.list_boxes()),
    "remove_snapshot": Scenario(_setup_aux, "remove_snapshot", ("aux", "t2"), _check_remove_t2,
                                lambda s: "t2" not in s.box("aux").snapshots),
    "remove_snapshot-merge": Scenario(_setup_aux, "remove_snapshot", ("aux", "t1"),
                                      _check_merge_t1, _merged, {"merge": True}),
    "remove_box": Scenario(_setup_aux, "remove_box", ("twin",), _check_remove_twin,
                           lambda s: "twin" not in s.list_boxes()),
    "import_box": Scenario(_setup_import, "import_box", ("imp", "IMPORT"), _check_import,
                           lambda s: "imp" in s.list_boxes()),
    "add_base": Scenario(_setup_import, "add_base", ("IMPORT", "b2"), _check_add_base,
                         lambda s: "b2" in s.list_bases(), {"backing_format": "qcow2"}),
    "create_boxes": Scenario(_setup_vm, "create_boxes", (POOL,), _check_pool,
                             lambda s: "p00" in s.list_boxes(), {"base": "os"}),
    "snapshot_boxes": Scenario(_setup_pool, "snapshot_boxes", (POOL, "n"), _check_pool_snapshot,
                               lambda s: "n" in s.box("p00").snapshots),
    # The same protocols with an fsync per file (sync="fsync") and without O_TMPFILE.
    "snapshot-fsync-no-tmpfile": Scenario(_setup_vm, "snapshot", ("vm", "s2"), _check_snapshot,
                                          lambda s: "s2" in s.box("vm").snapshots,
                                          store_options={"sync": "fsync", "no_tmpfile": True}),
    "clone_box-fsync-no-tmpfile": Scenario(_setup_vm, "clone_box", ("vm", "copy"), _check_clone,
                                           lambda s: "copy" in s.list_boxes(),
                                           store_options={"sync": "fsync", "no_tmpfile": True}),
    "create_boxes-fsync-no-tmpfile": Scenario(_setup_vm, "create_boxes", (POOL[:5],),
                                              lambda q, s, t: _check_pool(q, s, t, POOL[:5]),
                                              lambda s: "p00" in s.list_boxes(), {"base": "os"},
                                              store_options={"sync": "fsync",
                                                             "no_tmpfile": True}),
}


def reads_b1(store: BoxStore) -> bool:
    """Whether vm's live disk still reads B (not restored)."""
    return reads(Qemu(), _box(store, "vm") / "disk.qcow2", 0xB1, 2 * MIB)


def _args(scenario: Scenario, tmp: Path) -> list[Any]:
    return [os.fspath(tmp / "src" / "import.qcow2") if a == "IMPORT" else a
            for a in scenario.args]


def _steps(trace: Path) -> list[str]:
    seen: list[str] = []
    for line in trace.read_text().splitlines():
        if line not in seen:
            seen.append(line)
    return seen


def _assert_nothing_left(root: Path) -> None:
    assert os.listdir(root / ".boxdisk" / "journal") == []
    assert os.listdir(root / ".boxdisk" / "trash") == []
    for d in (root / "boxes", root / "bases", root / "clones"):
        assert [n for n in os.listdir(d) if n.startswith(".")] == []


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_sigkill_at_every_step(qemu, tmp_path: Path, name: str) -> None:
    scenario = SCENARIOS[name]
    template = tmp_path / "template"
    with BoxStore(template) as store:
        scenario.setup(qemu, store, tmp_path / "src")
    args = _args(scenario, tmp_path)

    # An uninterrupted run lists the step boundaries (and must itself succeed).
    trace_root = tmp_path / "trace"
    shutil.copytree(template, trace_root, symlinks=True)
    trace = tmp_path / "trace.txt"
    proc = run_store(trace_root, scenario.op, *args, env={TRACE_ENV: os.fspath(trace)},
                     store_options=scenario.store_options, **scenario.kwargs)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = _steps(trace)
    assert steps and all(s.startswith(f"{scenario.op}:") for s in steps)
    assert f"{scenario.op}:recorded" in steps
    with BoxStore(trace_root) as done:
        scenario.check(qemu, done, tmp_path / "src")
        assert_store_clean(qemu, done)

    outcomes = []
    for i, step in enumerate(steps):
        root = tmp_path / f"crash-{i}"
        shutil.copytree(template, root, symlinks=True)
        proc = run_store(root, scenario.op, *args, env={CRASH_ENV: step},
                         store_options=scenario.store_options, **scenario.kwargs)
        assert proc.returncode == -signal.SIGKILL, (step, proc.returncode, proc.stdout,
                                                    proc.stderr)
        assert os.listdir(root / ".boxdisk" / "journal"), f"{step}: no intent was recorded"
        with BoxStore(root) as store:  # reopening recovers
            _assert_nothing_left(root)
            assert_store_clean(qemu, store)
            scenario.check(qemu, store, tmp_path / "src")
            outcomes.append(scenario.done(store))
        shutil.rmtree(root)
    # Undone before the point of no return, finished after it: never both, never back.
    assert not outcomes[0]
    assert outcomes == sorted(outcomes), list(zip(steps, outcomes, strict=True))


def test_an_open_store_recovers_when_it_takes_the_lock(qemu, tmp_path: Path) -> None:
    """A process that had the store open before another one crashed recovers lazily."""
    root = tmp_path / "store"
    with BoxStore(root) as store:
        vm = store.create_box("vm", size=SIZE)
        write(qemu, vm.disk, 0x71, 0)
        proc = run_store(root, "snapshot", "vm", "s1",
                         env={CRASH_ENV: "snapshot:swapped:disk.qcow2"})
        assert proc.returncode == -signal.SIGKILL
        assert len(os.listdir(root / ".boxdisk" / "journal")) == 1
        store.create_box("other", size=SIZE)  # other boxes do not recover vm's operation
        assert len(os.listdir(root / ".boxdisk" / "journal")) == 1
        snap = store.snapshot("vm", "s2")  # taking vm's lock finishes s1 first
        assert store.box("vm").snapshots == ("s1", "s2")
        assert_reads(qemu, snap.disk, 0x71, 0)
        _assert_nothing_left(root)
        assert_store_clean(qemu, store)
