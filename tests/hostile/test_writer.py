"""boxdisk's writer on odd-but-valid images leaves them as clean as QEMU's writes do."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from boxdisk.image._qcow2_write import Qcow2Writer
from boxdisk.ops import check

CORPUS = Path(__file__).resolve().parents[2] / "tests" / "data" / "hostile"


def test_refcounts_past_the_end_do_not_make_the_file_grow(tmp_path: Path) -> None:
    """Regression: the writer extended the file to the last counted cluster (200 of an
    11-cluster file), turning a refcount QEMU ignores into a leak; with a refcount
    placed near the reftable's reach, the file would grow by petabytes."""
    img = tmp_path / "img.qcow2"
    shutil.copyfile(CORPUS / "ref-refcount-past-eof.qcow2", img)
    assert check(img).clean
    before = img.stat().st_size
    with Qcow2Writer.open(img) as w:
        w.write(10 * 512, b"\xa5" * 512)  # an unallocated guest cluster: one new cluster
    assert img.stat().st_size == before + 512
    assert check(img).clean


@pytest.mark.qemu
def test_refcounts_past_the_end_writes_match_qemu(qemu, tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    for p in (ours, theirs):
        shutil.copyfile(CORPUS / "ref-refcount-past-eof.qcow2", p)
    with Qcow2Writer.open(ours) as w:
        w.write(10 * 512, b"\xa5" * 512)
    qemu.write(theirs, ["write -P 0xa5 5120 512"])
    qemu.assert_clean(ours)
    assert ours.stat().st_size == theirs.stat().st_size
    assert qemu.read_raw(ours, tmp_path) == qemu.read_raw(theirs, tmp_path)
