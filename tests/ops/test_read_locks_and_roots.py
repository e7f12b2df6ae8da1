"""Reading a disk a VM is writing, and backing files outside the allowed roots.

flatten, convert and compare refuse an image another process holds for writing
(as qemu-img does without -U); a read-only holder (a VM using it as a base) is
fine. Every operation that opens chains takes ``allowed_roots``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from boxdisk import (
    BackingChainError,
    DiskInUseError,
    commit,
    compare,
    convert,
    flatten,
    rebase,
    resize,
)
from boxdisk._locks import being_written

from ..engine.helpers import MIB, create
from .test_locks import qemu_io_holding

pytestmark = pytest.mark.qemu


@pytest.fixture
def pair(qemu: Any, tmp_path: Path) -> tuple[Path, Path]:
    base = create(qemu, tmp_path / "base.qcow2", 2 * MIB)
    qemu.write(base, ["write -P 1 0 1M"])
    top = create(qemu, tmp_path / "top.qcow2", 2 * MIB, backing=base)
    qemu.write(top, ["write -P 2 512k 64k"])
    return base, top


def test_a_writing_vm_blocks_copies_and_compares(qemu: Any, pair: tuple[Path, Path],
                                                 tmp_path: Path) -> None:
    base, top = pair
    with qemu_io_holding(top):
        assert being_written(top)
        assert not being_written(base)  # QEMU opens backing files read-only
        for call in (lambda: flatten(top, tmp_path / "f.qcow2"),
                     lambda: convert(top, tmp_path / "c.raw", output_format="raw"),
                     lambda: compare(top, base)):
            with pytest.raises(DiskInUseError) as exc:
                call()
            assert exc.value.path == str(top)
        assert not (tmp_path / "f.qcow2").exists()
        # -U: the caller accepts a possibly inconsistent copy.
        flatten(top, tmp_path / "forced.qcow2", force_share=True)
        assert compare(top, base, force_share=True).identical is False
    qemu.img("compare", top, tmp_path / "forced.qcow2")


def test_a_reading_vm_does_not_block_copies(qemu: Any, pair: tuple[Path, Path],
                                            tmp_path: Path) -> None:
    _, top = pair
    with qemu_io_holding(top, read_only=True):
        assert not being_written(top)
        flatten(top, tmp_path / "f.qcow2")
        assert compare(top, tmp_path / "f.qcow2").identical


def test_replacing_a_destination_a_vm_holds_is_refused(qemu: Any, pair: tuple[Path, Path],
                                                       tmp_path: Path) -> None:
    _, top = pair
    dst = create(qemu, tmp_path / "dst.qcow2", 2 * MIB)
    before = dst.read_bytes()
    with qemu_io_holding(dst, read_only=True), pytest.raises(DiskInUseError):
        flatten(top, dst, overwrite=True)
    assert dst.read_bytes() == before
    flatten(top, dst, overwrite=True)
    qemu.img("compare", top, dst)


@pytest.fixture
def escaping(qemu: Any, tmp_path: Path) -> tuple[Path, Path]:
    """A root directory holding an image whose backing file lies outside it."""
    outside = create(qemu, tmp_path / "outside.qcow2", 2 * MIB)
    root = tmp_path / "root"
    root.mkdir()
    top = create(qemu, root / "top.qcow2", 2 * MIB, backing=outside)
    return root, top


@pytest.mark.parametrize("op", ["flatten", "convert", "compare", "commit", "rebase-safe",
                                "resize"])
def test_every_chain_opening_operation_honours_allowed_roots(
    qemu: Any, escaping: tuple[Path, Path], tmp_path: Path, op: str
) -> None:
    root, top = escaping
    before = top.read_bytes()
    roots = [root]
    calls = {
        "flatten": lambda: flatten(top, root / "o.qcow2", allowed_roots=roots),
        "convert": lambda: convert(top, root / "o.raw", output_format="raw",
                                   allowed_roots=roots),
        "compare": lambda: compare(top, top, allowed_roots=roots),
        "commit": lambda: commit(top, allowed_roots=roots),
        "rebase-safe": lambda: rebase(top, None, allowed_roots=roots),
        "resize": lambda: resize(top, 4 * MIB, allowed_roots=roots),
    }
    with pytest.raises(BackingChainError) as exc:
        calls[op]()
    assert "outside the allowed roots" in str(exc.value)
    assert top.read_bytes() == before
    assert not (root / "o.qcow2").exists() and not (root / "o.raw").exists()


def test_rebase_onto_a_file_outside_the_roots_is_refused(qemu: Any, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    img = create(qemu, root / "img.qcow2", 2 * MIB)
    outside = create(qemu, tmp_path / "outside.qcow2", 2 * MIB)
    before = img.read_bytes()
    for safe in (True, False):
        with pytest.raises(BackingChainError):
            rebase(img, outside, backing_format="qcow2", safe=safe, allowed_roots=[root])
    assert img.read_bytes() == before
    inside = create(qemu, root / "inside.qcow2", 2 * MIB)
    rebase(img, inside, backing_format="qcow2", allowed_roots=[root])
    assert qemu.info(img)["backing-filename"] == str(inside)
