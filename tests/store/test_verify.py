"""verify() finds what is wrong, names the file, and changes nothing."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from boxdisk.qcow2 import rewrite_backing_reference
from boxdisk.store import BoxStore, _queries
from boxdisk.store._journal import CRASH_ENV

from .helpers import SIZE, run_store
from .test_locks import _qemu_holding

pytestmark = pytest.mark.qemu


def _kinds(store: BoxStore) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for p in store.verify().problems:
        out.setdefault(p.kind, set()).add(os.path.relpath(p.path, store.root))
    return out


def test_verify_reports_damage(qemu, bases: BoxStore, tmp_path: Path) -> None:
    store = bases
    store.create_box("vm", base="os")
    store.snapshot("vm", "s1")
    store.create_box("other", base="os")
    store.create_box("third", size=SIZE)
    assert store.verify().ok

    meta = store.root / "boxes/other/box.json"
    meta.write_text(json.dumps({"id": "someone-else", "base": "rootfs"}))
    snap = store.root / "boxes/vm/snapshots/s1/disk.qcow2"
    snap.chmod(0o644)
    outside = tmp_path / "outside.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", outside, str(SIZE))
    rewrite_backing_reference(store.root / "boxes/third/disk.qcow2", os.fspath(outside), "qcow2")
    (store.root / "clones" / ".stage-feedfacefeedface").mkdir()

    kinds = _kinds(store)
    assert kinds["metadata"] == {"boxes/other/box.json"}
    assert kinds["descent"] == {"boxes/other/disk.qcow2"}
    assert kinds["writable"] == {"boxes/vm/snapshots/s1/disk.qcow2"}
    assert "boxes/third/disk.qcow2" in kinds["outside"]
    assert "boxes/third/disk.qcow2" in kinds["chain"]
    assert kinds["leftover"] == {"clones/.stage-feedfacefeedface"}

    snap.unlink()  # the live disk's backing file is gone
    kinds = _kinds(store)
    assert "boxes/vm/snapshots/s1/disk.qcow2" in kinds["unreadable"]
    assert "boxes/vm/disk.qcow2" in kinds["chain"]
    assert kinds["missing"] == {"boxes/vm/snapshots/s1"}


def test_verify_does_not_report_a_temporary_file_published_meanwhile(
        qemu, store: BoxStore, monkeypatch: pytest.MonkeyPatch) -> None:
    # Found by the stress run: another process's journal record is being published
    # (written to a locked temporary file, linked into place, the temporary name
    # removed) while verify lists the journal; the name it listed is gone by the time
    # it asks whether a writer holds it. The writer is played here by a hook that
    # removes the file at that moment, as the publishing process does.
    store.create_box("vm", size=SIZE)
    tmp = store.root / ".boxdisk" / "journal" / ".0123456789abcdef.feed.json.0123456789ab.tmp"
    tmp.write_bytes(b"{}")
    real = _queries.temp_held

    def published(path: os.PathLike[str]) -> bool:
        if os.fspath(path) == os.fspath(tmp):
            tmp.unlink()
        return real(path)

    monkeypatch.setattr(_queries, "temp_held", published)
    assert store.verify().ok
    assert store.gc().leftovers == ()


def test_verify_reports_an_interrupted_operation_it_does_not_own(qemu, tmp_path: Path) -> None:
    root = tmp_path / "store"
    with BoxStore(root) as store:
        store.create_box("vm", size=SIZE)
        proc = run_store(root, "snapshot", "vm", "s1", env={CRASH_ENV: "snapshot:staged"})
        assert proc.returncode == -signal.SIGKILL
        report = store.verify()  # opened before the crash: nothing recovered yet
        assert {p.kind for p in report.problems} >= {"interrupted"}
        assert store.gc().recovered  # gc recovers it
        assert store.verify().ok
        assert store.box("vm").snapshots == ()


def test_verify_lists_images_a_qemu_holds(qemu, tmp_path: Path) -> None:
    with BoxStore(tmp_path / "store") as store:
        box = store.create_box("vm", size=SIZE)
        with _qemu_holding(box.disk):
            report = store.verify()
        assert report.ok
        assert report.in_flight == (f"image in use, not checked: {box.disk}",)
