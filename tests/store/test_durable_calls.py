"""Each operation makes exactly the durable system calls docs/store.md says it does.

Every durable call of the store (fsync, syncfs) passes one seam,
``boxdisk.store._fs.durable``, which tells its observers; the test runs each
operation of the table in ``docs/store.md`` ("Durable calls per operation") in
both sync modes and holds it to the documented count, so the protocol document
and the code cannot drift apart. The same run also wraps ``os.fsync`` and
``os.fdatasync``: apart from the rebase and the flatten the table names, no
durable call bypasses the seam.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from boxdisk import create_disk
from boxdisk.store import BoxStore, _fs

from .helpers import MIB, REPO

DOC = REPO / "docs" / "store.md"
_ROW = re.compile(r"^\| `(?P<op>[a-z_]+)`(?P<rest>[^|]*)\| (?P<syncfs>\d+) \| (?P<fsync>\d+) \|$")


def _documented() -> dict[str, tuple[int, int]]:
    text = DOC.read_text()
    table = text[text.index("### Durable calls per operation"):]
    table = table[: table.index("\n\n", table.index("|---"))]
    rows = {}
    for line in table.splitlines():
        m = _ROW.match(line)
        if m:
            rows[f"{m['op']}{m['rest'].rstrip()}"] = (int(m["syncfs"]), int(m["fsync"]))
    return rows


@contextmanager
def _counted() -> Iterator[tuple[list[str], list[str]]]:
    """(calls through the seam, os.fsync/os.fdatasync calls) made inside the block."""
    seam: list[str] = []
    raw: list[str] = []
    real = {name: getattr(os, name) for name in ("fsync", "fdatasync")}

    def wrap(name: str) -> Callable[[int], None]:
        def call(fd: int) -> None:
            raw.append(name)
            real[name](fd)
        return call

    def observe(call: str, path: str) -> None:
        seam.append(call)

    _fs.observers.append(observe)
    for name in real:
        setattr(os, name, wrap(name))
    try:
        yield seam, raw
    finally:
        for name, fn in real.items():
            setattr(os, name, fn)
        _fs.observers.remove(observe)


Op = Callable[[BoxStore], object]


def _nothing(store: BoxStore) -> None:
    pass


def _snapshot_nothing_backs_onto(store: BoxStore) -> None:
    store.snapshot("p00", "m")
    store.restore("p00", "n")  # now nothing backs onto m


def _scenarios(tmp: Path) -> list[tuple[str, Op, Op, bool]]:
    """(table row, set-up, the operation, whether durable calls outside the seam are expected)."""
    src = tmp / "src.qcow2"
    pool = [f"p{i:02d}" for i in range(50)]
    return [
        ("add_base", _nothing, lambda s: s.add_base(src, "extra", backing_format="qcow2"), False),
        ("create_box, one disk", _nothing, lambda s: s.create_box("a", base="os"), False),
        ("create_box, two disks", _nothing,
         lambda s: s.create_box("b", base="os", guest_base="rootfs"), False),
        ("create_boxes, 50 boxes of one disk", _nothing,
         lambda s: s.create_boxes(pool, base="os"), False),
        ("snapshot, one disk", _nothing, lambda s: s.snapshot("a", "s1"), False),
        ("snapshot, two disks", _nothing, lambda s: s.snapshot("b", "s1"), False),
        ("snapshot_boxes, 50 boxes of one disk", _nothing,
         lambda s: s.snapshot_boxes(pool, "n"), False),
        ("restore, one disk", _nothing, lambda s: s.restore("a", "s1"), False),
        ("restore, two disks", _nothing, lambda s: s.restore("b", "s1"), False),
        ("clone_box, one disk", _nothing, lambda s: s.clone_box("a", "a-copy"), False),
        ("clone_box, two disks", _nothing, lambda s: s.clone_box("b", "b-copy"), False),
        ("remove_snapshot", _snapshot_nothing_backs_onto,
         lambda s: s.remove_snapshot("p00", "m"), False),
        ("remove_snapshot, `merge=True` (plus each rebase's own)", _nothing,
         lambda s: s.remove_snapshot("p01", "n", merge=True), True),
        ("remove_box", _nothing, lambda s: s.remove_box("p02"), False),
        ("import_box (plus the flatten's own)", _nothing, lambda s: s.import_box("imp", src),
         True),
    ]


@pytest.mark.parametrize("mode", ["syncfs", "fsync"])
def test_every_operation_makes_its_documented_durable_calls(tmp_path: Path, mode: str) -> None:
    documented = _documented()
    scenarios = _scenarios(tmp_path)
    assert {row[0] for row in scenarios} == set(documented), "the table and the test differ"
    create_disk(tmp_path / "src.qcow2", persistent=True, size=4 * MIB).close()
    with BoxStore(tmp_path / "store", sync=mode) as store:
        assert store.sync == mode
        store.add_base(tmp_path / "src.qcow2", "os", backing_format="qcow2")
        store.add_base(tmp_path / "src.qcow2", "rootfs", backing_format="qcow2")
        for name, setup, op, outside in scenarios:
            setup(store)
            with _counted() as (seam, raw):
                op(store)
            want = documented[name][0 if mode == "syncfs" else 1]
            assert len(seam) == want, (name, mode, seam)
            if not outside:
                assert raw.count("fsync") == seam.count("fsync") and not raw.count("fdatasync"), (
                    name, "a durable call bypassed the seam", raw, seam)
        assert store.verify().ok
