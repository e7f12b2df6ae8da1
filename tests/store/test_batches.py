"""Batches (create_boxes, snapshot_boxes), the O_TMPFILE fallback, kept-open lock files.

A batch makes many boxes (snapshots) in one operation: refused whole, naming
every offending entry, before any file is touched; otherwise every box (or
snapshot) exists and reads what QEMU says it must. A batch a crash interrupted
is finished or undone by whoever next touches one of the boxes it claimed.
"""

from __future__ import annotations

import ast
import os
import signal
from pathlib import Path

import pytest

from boxdisk import BoxSpec, _io
from boxdisk._errors import AlreadyExistsError, InvalidNameError, NotFoundError
from boxdisk.store import BoxStore, _fs, _locks
from boxdisk.store._journal import CRASH_ENV

from .helpers import (
    MIB,
    OS_DATA,
    REPO,
    ROOTFS_DATA,
    SIZE,
    assert_base_data,
    assert_reads,
    assert_store_clean,
    reads,
    run_store,
    write,
)
from .test_bad_input import _tree

pytestmark = pytest.mark.qemu


# -- what a batch makes -------------------------------------------------------------------------


def test_create_boxes_makes_every_box_as_create_box_would(qemu, bases: BoxStore) -> None:
    store = bases
    made = store.create_boxes(["a", BoxSpec("b", base="os", guest_base="rootfs"),
                               BoxSpec("c", size=SIZE), "d"], base="os")
    assert [b.id for b in made] == ["a", "b", "c", "d"]
    assert made == [store.box(b) for b in ("a", "b", "c", "d")]
    assert made[1].guest_disk is not None and made[0].guest_disk is None
    assert made[2].base is None and made[2].size == SIZE
    for box in (made[0], made[1], made[3]):
        assert_base_data(qemu, box.disk, OS_DATA)
    assert made[1].guest_disk is not None
    assert_base_data(qemu, made[1].guest_disk, ROOTFS_DATA)
    write(qemu, made[0].disk, 0x61, 2 * MIB)
    assert_reads(qemu, made[0].disk, 0x61, 2 * MIB)
    assert not reads(qemu, made[3].disk, 0x61, 2 * MIB)  # each box has a disk of its own
    assert_store_clean(qemu, store)
    assert store.create_boxes([]) == []


def test_snapshot_boxes_snapshots_every_box(qemu, bases: BoxStore) -> None:
    store = bases
    store.create_boxes([f"p{i}" for i in range(5)], base="os")
    for i in range(5):
        write(qemu, store.box(f"p{i}").disk, 0x30 + i, 2 * MIB)
    snaps = store.snapshot_boxes([f"p{i}" for i in range(4)] + [("p4", "other")], "n")
    assert [(s.box_id, s.name) for s in snaps] == [(f"p{i}", "n") for i in range(4)] + [
        ("p4", "other")]
    for i in range(5):
        write(qemu, store.box(f"p{i}").disk, 0x50 + i, 2 * MIB)
    for s in snaps:
        i = int(s.box_id[1:])
        assert_reads(qemu, s.disk, 0x30 + i, 2 * MIB)
        assert_reads(qemu, store.box(s.box_id).disk, 0x50 + i, 2 * MIB)
        assert snaps[i] == store.snapshot_info(s.box_id, s.name)
    store.restore("p2", "n")
    assert_reads(qemu, store.box("p2").disk, 0x32, 2 * MIB)
    assert_store_clean(qemu, store)


# -- bad input: refused whole, before any file is touched ------------------------------------------


@pytest.mark.parametrize(("specs", "kwargs", "error", "named"), [
    (["a", "b", "a", "c", "b"], {}, AlreadyExistsError, ("a", "b")),
    (["ok", ".hidden", "x/y", "fine"], {}, InvalidNameError, (".hidden", "x/y")),
    (["a", "b"], {"base": "nope"}, NotFoundError, ("nope",)),
    (["a", BoxSpec("b", base="os", guest_base="gone")], {}, NotFoundError, ("gone",)),
    (["a", "taken", "b"], {}, AlreadyExistsError, ("taken",)),
    (["a", BoxSpec("b", base="../os")], {}, InvalidNameError, ("../os",)),
])
def test_a_bad_batch_is_refused_before_any_file_is_touched(
        bases: BoxStore, specs: list[object], kwargs: dict[str, object],
        error: type[Exception], named: tuple[str, ...]) -> None:
    store = bases
    store.create_box("taken", base="os")
    before = _tree(store.root)
    with pytest.raises(error) as info:
        store.create_boxes(specs, **kwargs)  # type: ignore[arg-type]
    assert tuple(info.value.value) == named  # type: ignore[attr-defined]
    for name in named:
        assert repr(name) in str(info.value)
    assert _tree(store.root) == before
    assert store.list_boxes() == ["taken"]


@pytest.mark.parametrize(("specs", "name", "error", "named"), [
    (["vm", "other", "vm"], "s", AlreadyExistsError, ("vm",)),
    (["vm", "ghost", "phantom"], "s", NotFoundError, ("ghost", "phantom")),
    (["vm", "other"], "old", AlreadyExistsError, ("vm/old",)),
    ([("vm", ".bad"), ("other", "ok")], None, InvalidNameError, (".bad",)),
])
def test_a_bad_snapshot_batch_is_refused_before_any_file_is_touched(
        store: BoxStore, specs: list[object], name: str | None, error: type[Exception],
        named: tuple[str, ...]) -> None:
    store.create_box("vm", size=SIZE)
    store.create_box("other", size=SIZE)
    store.snapshot("vm", "old")
    before = _tree(store.root)
    with pytest.raises(error) as info:
        store.snapshot_boxes(specs, name)  # type: ignore[arg-type]
    assert tuple(info.value.value) == named  # type: ignore[attr-defined]
    assert _tree(store.root) == before


# -- claims: a crashed batch is settled by whoever touches one of its boxes -----------------------


def test_a_crashed_batch_is_finished_by_an_operation_on_one_of_its_boxes(
        qemu, bases: BoxStore) -> None:
    store = bases
    pool = [f"p{i}" for i in range(10)]
    proc = run_store(store.root, "create_boxes", pool, base="os",
                     env={CRASH_ENV: "create_boxes:renamed:first"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert store.list_boxes() == ["p0"]  # the batch died after its first rename
    # This (already open) store takes p7's lock, finds the batch claiming p7, takes the
    # dead batch's lock and finishes it: then p7 exists and is snapshotted.
    store.snapshot("p7", "s")
    assert store.list_boxes() == pool
    with pytest.raises(AlreadyExistsError):
        store.create_box("p3", base="os")
    assert os.listdir(store.root / ".boxdisk" / "journal") == []
    assert_store_clean(qemu, store)


def test_a_batch_crashed_before_its_renames_is_undone_by_create_box(bases: BoxStore) -> None:
    store = bases
    proc = run_store(store.root, "create_boxes", ["q0", "q1", "q2"], base="os",
                     env={CRASH_ENV: "create_boxes:synced"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert store.list_boxes() == []
    store.create_box("q1", base="os")  # claims q1: the dead batch is undone first
    assert store.list_boxes() == ["q1"]
    assert [n for n in os.listdir(store.root / "boxes") if n.startswith(".")] == []
    assert store.verify().ok


# -- new files without O_TMPFILE -------------------------------------------------------------------


def test_without_o_tmpfile_every_operation_still_works(qemu, bases: BoxStore,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_io, "use_o_tmpfile", False)
    store = bases
    store.create_boxes(["a", "b"], base="os")
    write(qemu, store.box("a").disk, 0x71)
    store.snapshot("a", "s")
    store.snapshot_boxes(["a", "b"], "t")
    store.restore("a", "s")
    store.clone_box("a", "c")
    store.remove_snapshot("b", "t", merge=True)
    assert_reads(qemu, store.box("c").disk, 0x71)
    assert _io.use_o_tmpfile is False
    assert_store_clean(qemu, store)
    assert store.gc().leftovers == ()


def _has_o_tmpfile(directory: Path) -> bool:
    try:
        os.close(os.open(directory, os.O_TMPFILE | os.O_WRONLY, 0o644))
    except OSError:
        return False
    return True


def test_where_o_tmpfile_works_no_named_temporary_file_is_made(
        bases: BoxStore, monkeypatch: pytest.MonkeyPatch) -> None:
    named: list[str] = []
    real = _fs.create_temp

    def spy(directory: str, name: str, mode: int = 0o666) -> tuple[int, str]:
        named.append(name)
        return real(directory, name, mode)

    monkeypatch.setattr(_fs, "create_temp", spy)
    bases.create_box("a", base="os")
    bases.snapshot("a", "s")
    bases.restore("a", "s")
    bases.clone_box("a", "b")
    assert bases.verify().ok
    if _has_o_tmpfile(bases.root):
        assert named == [] and _io.use_o_tmpfile  # every new file was an unnamed inode
    else:
        assert named and not _io.use_o_tmpfile  # the first refusal switched to the fallback


# -- lock files stay open -------------------------------------------------------------------------


def test_a_lock_file_is_opened_once_per_process(store: BoxStore,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    store.create_box("vm", size=SIZE)
    store.snapshot("vm", "s1")
    opened: list[str] = []
    real = os.open

    def spy(path: object, *args: object, **kwargs: object) -> int:
        opened.append(os.fspath(path))  # type: ignore[arg-type]
        return real(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", spy)
    store.snapshot("vm", "s2")
    store.restore("vm", "s1")
    monkeypatch.undo()
    locks = os.fspath(store.root / ".boxdisk" / "locks")
    assert [p for p in opened if p.startswith(locks) or p.endswith("store.lock")] == []


def test_lock_files_kept_open_are_bounded(store: BoxStore, monkeypatch: pytest.MonkeyPatch,
                                         ) -> None:
    monkeypatch.setattr(_locks, "MAX_OPEN", 8)
    store.create_boxes([f"b{i}" for i in range(30)], size=MIB)
    for i in range(30):
        store.snapshot(f"b{i}", "s")
    assert store._locks.open_files() <= 8 + 2
    store.close()
    assert store._locks.open_files() == 0


# -- the package's shape --------------------------------------------------------------------------


def test_the_store_package_has_small_files_and_no_import_cycle() -> None:
    pkg = REPO / "boxdisk" / "store"
    imports: dict[str, set[str]] = {}
    for path in sorted(pkg.glob("*.py")):
        lines = path.read_text().count("\n")
        assert lines <= 500, f"{path.name} has {lines} lines"
        mod = path.stem
        imports[mod] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    imports[mod].add(node.module)
                else:
                    imports[mod].update(a.name for a in node.names)
    seen: dict[str, int] = {}

    def visit(mod: str, path: tuple[str, ...]) -> None:
        assert seen.get(mod) != 1, "import cycle: " + " -> ".join((*path, mod))
        if seen.get(mod) == 2:
            return
        seen[mod] = 1
        for dep in sorted(imports.get(mod, ())):
            visit(dep, (*path, mod))
        seen[mod] = 2

    for mod in imports:
        visit(mod, ())
    assert "_store" not in set().union(*(v for k, v in imports.items() if k != "__init__"))
