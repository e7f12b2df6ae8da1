"""The store's values and errors: frozen values, persistent handles, the error tree, pickling."""

from __future__ import annotations

import pickle
from pathlib import Path

import attrs
import pytest

import boxdisk
from boxdisk import (
    AlreadyExistsError,
    BoxdiskError,
    DependentsExistError,
    Disk,
    InvalidNameError,
    LockTimeoutError,
    NotFoundError,
    SnapshotInUseError,
    StoreError,
    StoreFormatError,
    create_disk,
)
from boxdisk.store import Box, BoxStore, GcReport, Problem, Snapshot, VerifyReport

from .helpers import SIZE

STORE_TREE = [
    (StoreError, (BoxdiskError,)),
    (InvalidNameError, (StoreError, ValueError)),
    (NotFoundError, (StoreError, LookupError)),
    (AlreadyExistsError, (StoreError, FileExistsError)),
    (DependentsExistError, (StoreError,)),
    (SnapshotInUseError, (DependentsExistError,)),
    (LockTimeoutError, (StoreError, TimeoutError)),
    (StoreFormatError, (StoreError,)),
]


@pytest.mark.parametrize(("cls", "bases"), STORE_TREE, ids=lambda x: getattr(x, "__name__", ""))
def test_store_error_tree(cls: type[BoxdiskError], bases: tuple[type, ...]) -> None:
    assert all(issubclass(cls, b) for b in bases)
    assert getattr(boxdisk, cls.__name__) is cls and cls.__name__ in boxdisk.__all__
    assert cls.__name__ in (boxdisk._errors.__doc__ or "")
    exc = cls("it went wrong", path="/store/boxes/vm", field="box_id", value="vm")
    again = pickle.loads(pickle.dumps(exc))
    assert type(again) is cls and str(again) == str(exc) == "/store/boxes/vm: it went wrong"


def test_dependents_survive_pickling() -> None:
    exc = SnapshotInUseError("snapshot 's1' is in use", dependents=("/a", "/b"), path="/s")
    again = pickle.loads(pickle.dumps(exc))
    assert again.dependents == ("/a", "/b") and str(again) == str(exc)
    assert str(exc).count("depended on by") == 1


def test_public_names() -> None:
    for name in ("BoxStore", "Box", "Snapshot", "DependencyGraph", "GraphNode",
                 "VerifyReport", "Problem", "GcReport"):
        assert name in boxdisk.__all__ and name in boxdisk.store.__all__
        assert getattr(boxdisk, name) is getattr(boxdisk.store, name)


def test_values_are_frozen(tmp_path: Path) -> None:
    with BoxStore(tmp_path / "s") as store:
        box = store.create_box("vm", size=SIZE)
        snap = store.snapshot("vm", "s1")
        report = store.verify()
        gc = store.gc(dry_run=True)
    for value in (box, snap, report, gc, Problem("p", "kind", "msg")):
        assert attrs.has(type(value))
        field = attrs.fields(type(value))[0].name
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            setattr(value, field, None)
    assert isinstance(box, Box) and isinstance(snap, Snapshot)
    assert isinstance(report, VerifyReport) and report.ok and report.boxes == 1
    assert isinstance(gc, GcReport) and gc.dry_run


def test_store_disks_are_persistent_to_handles(tmp_path: Path) -> None:
    with BoxStore(tmp_path / "s") as store:
        box = store.create_box("vm", size=SIZE)
        with box.open_disk() as handle:
            assert isinstance(handle, Disk) and handle.persistent
        assert box.disk.exists()
        with pytest.raises(NotFoundError):
            box.open_disk(guest=True)
        # Even an ephemeral handle on a file inside a store never deletes it.
        scratch = create_disk(box.dir / "scratch.qcow2", size=SIZE, persistent=False)
        assert not scratch.persistent
        scratch.close()
        assert (box.dir / "scratch.qcow2").exists()
        (box.dir / "scratch.qcow2").unlink()
        assert store.verify().ok
