"""rebase against ``qemu-img rebase`` on twin copies of the same QEMU-made images.

Safe mode must leave the guest's view unchanged (QEMU must read the same bytes
before and after, and the same as through QEMU's own rebase of a copy);
header-only mode must change exactly what ``qemu-img rebase -u`` changes.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from boxdisk import BackingChainError, InvalidArgumentError, rebase
from boxdisk.qcow2 import read_header

from ..chain.chains import KIB, MIB, random_ops
from ..engine.helpers import assert_clean, assert_same_view, create

pytestmark = pytest.mark.qemu


def _image(qemu: Any, path: Path, size: int, seed: int, *, fmt: str = "qcow2",
           cluster: int = 64 * KIB, backing: Path | None = None, backing_fmt: str = "qcow2",
           compat: str = "1.1", ops: int = 20) -> Path:
    if fmt == "raw":
        qemu.img("create", "-q", "-f", "raw", path, str(size))
    else:
        create(qemu, path, size, cluster=cluster, backing=backing, backing_fmt=backing_fmt,
               compat=compat)
    cmds = random_ops(random.Random(seed), size, cluster, ops, zero=fmt == "qcow2",
                      discard=fmt == "qcow2")
    qemu.write(path, cmds, fmt=fmt)
    return path


def _twins(tmp: Path) -> tuple[Path, Path]:
    shutil.copytree(tmp / "box", tmp / "qemu")
    shutil.copytree(tmp / "box", tmp / "before")
    return tmp / "qemu", tmp / "before"


def _build(qemu: Any, tmp: Path, *, old_fmt: str = "qcow2", new_fmt: str = "qcow2",
           old_size: int = 4 * MIB, new_size: int = 4 * MIB, top_size: int = 4 * MIB,
           cluster: int = 64 * KIB, compat: str = "1.1", new_chain: bool = False) -> Path:
    box = tmp / "box"
    box.mkdir()
    old = _image(qemu, box / f"old.{old_fmt}", old_size, 1, fmt=old_fmt, cluster=cluster)
    if new_chain:
        under = _image(qemu, box / "under.qcow2", new_size, 2, cluster=cluster)
        _image(qemu, box / "new.qcow2", new_size, 3, cluster=cluster, backing=under)
    else:
        _image(qemu, box / f"new.{new_fmt}", new_size, 2, fmt=new_fmt, cluster=cluster)
    return _image(qemu, box / "top.qcow2", top_size, 4, cluster=cluster, backing=old,
                  backing_fmt=old_fmt, compat=compat)


CASES: dict[str, dict[str, Any]] = {
    "qcow2-to-qcow2": {},
    "raw-to-qcow2": {"old_fmt": "raw"},
    "qcow2-to-raw": {"new_fmt": "raw"},
    "new-shorter": {"new_size": 2 * MIB},
    "new-longer-than-image": {"new_size": 6 * MIB},
    "old-shorter-than-image": {"old_size": 2 * MIB + 4096},
    "v2-top": {"compat": "0.10"},
    "small-clusters": {"cluster": 4 * KIB},
    "new-is-a-chain": {"new_chain": True},
}


@pytest.mark.parametrize("case", CASES)
def test_safe_rebase_keeps_the_guest_view(qemu: Any, tmp_path: Path, case: str) -> None:
    kw = CASES[case]
    top = _build(qemu, tmp_path, **kw)
    qemu_dir, before_dir = _twins(tmp_path)
    new_fmt = "qcow2" if kw.get("new_chain") else kw.get("new_fmt", "qcow2")
    new = top.parent / f"new.{new_fmt}"
    seen: list[tuple[int, int]] = []
    rebase(top, new, backing_format=new_fmt, relative=True,
           progress=lambda d, t: seen.append((d, t)))
    qemu.img("rebase", "-q", "-f", "qcow2", "-b", new.name, "-F", new_fmt,
             qemu_dir / "top.qcow2")
    assert read_header(top).backing_file == new.name
    assert read_header(top).backing_format == new_fmt
    assert_same_view(qemu, top, before_dir / "top.qcow2")
    assert_same_view(qemu, top, qemu_dir / "top.qcow2")
    assert_clean(qemu, top)
    assert seen and seen[-1][0] == seen[-1][1]


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_safe_rebase_to_standalone(qemu: Any, tmp_path: Path, compat: str) -> None:
    top = _build(qemu, tmp_path, compat=compat)
    qemu_dir, before_dir = _twins(tmp_path)
    rebase(top, None)
    qemu.img("rebase", "-q", "-f", "qcow2", "-b", "", qemu_dir / "top.qcow2")
    header = read_header(top)
    assert header.backing_file is None and header.backing_format is None
    assert_same_view(qemu, top, before_dir / "top.qcow2")
    assert_same_view(qemu, top, qemu_dir / "top.qcow2")
    assert_clean(qemu, top)


def test_rebase_onto_an_identical_copy_copies_nothing(qemu: Any, tmp_path: Path) -> None:
    top = _build(qemu, tmp_path)
    shutil.copyfile(top.parent / "old.qcow2", top.parent / "moved.qcow2")
    size = top.stat().st_size
    rebase(top, top.parent / "moved.qcow2", backing_format="qcow2")
    assert top.stat().st_size == size
    assert read_header(top).backing_file == str((top.parent / "moved.qcow2").resolve())


def test_rebase_twice_is_harmless(qemu: Any, tmp_path: Path) -> None:
    top = _build(qemu, tmp_path)
    _, before_dir = _twins(tmp_path)
    new = top.parent / "new.qcow2"
    rebase(top, new, backing_format="qcow2", relative=True)
    rebase(top, new, backing_format="qcow2", relative=True)  # e.g. a re-run after a crash
    assert_same_view(qemu, top, before_dir / "top.qcow2")
    assert_clean(qemu, top)


def test_unsafe_rebase_is_header_only(qemu: Any, tmp_path: Path) -> None:
    top = _build(qemu, tmp_path)
    qemu_dir, _ = _twins(tmp_path)
    new = top.parent / "new.qcow2"
    rebase(top, new, backing_format="qcow2", safe=False, relative=True)
    qemu.img("rebase", "-q", "-u", "-f", "qcow2", "-b", "new.qcow2", "-F", "qcow2",
             qemu_dir / "top.qcow2")
    mine, theirs = top.read_bytes(), (qemu_dir / "top.qcow2").read_bytes()
    assert mine[512:] == theirs[512:]  # only the header sector may differ...
    assert read_header(top) == read_header(qemu_dir / "top.qcow2")  # ...and not in meaning
    assert_same_view(qemu, top, qemu_dir / "top.qcow2")
    assert_clean(qemu, top)


def test_unsafe_rebase_needs_no_old_backing(qemu: Any, tmp_path: Path) -> None:
    top = _build(qemu, tmp_path)
    _, before_dir = _twins(tmp_path)
    (top.parent / "old.qcow2").rename(top.parent / "elsewhere.qcow2")
    with pytest.raises(BackingChainError):
        rebase(top, top.parent / "new.qcow2", backing_format="qcow2")  # safe needs it
    rebase(top, top.parent / "elsewhere.qcow2", backing_format="qcow2", safe=False)
    assert_same_view(qemu, top, before_dir / "top.qcow2")


def test_rebase_errors(qemu: Any, tmp_path: Path) -> None:
    top = _build(qemu, tmp_path)
    before = top.read_bytes()
    with pytest.raises(InvalidArgumentError):
        rebase(top, top.parent / "new.qcow2")  # no backing_format: never probed
    with pytest.raises(BackingChainError):
        rebase(top, top.parent / "missing.qcow2", backing_format="qcow2")
    assert top.read_bytes() == before
