"""QEMU's image locks, both ways: a running qemu-io keeps boxdisk out, boxdisk keeps QEMU out."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from boxdisk import DiskInUseError, commit, image_in_use, rebase, resize
from boxdisk.chain import open_chain
from boxdisk.image._qcow2_write import Qcow2Writer

from ..engine.helpers import MIB, create

pytestmark = pytest.mark.qemu


@contextmanager
def qemu_io_holding(path: Path, *, read_only: bool = False) -> Iterator[subprocess.Popen[str]]:
    """An interactive qemu-io with ``path`` open until the block ends."""
    args = ["qemu-io", "-f", "qcow2", *(["-r"] if read_only else []), str(path)]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write("length\n")  # its answer means the image is open (and locked)
        proc.stdin.flush()
        answer = proc.stdout.readline()
        assert "MiB" in answer, answer
        yield proc
    finally:
        proc.stdin.close()
        proc.wait()
        proc.stdout.close()


@pytest.fixture
def chain2(qemu: Any, tmp_path: Path) -> tuple[Path, Path]:
    base = create(qemu, tmp_path / "base.qcow2", 2 * MIB)
    qemu.write(base, ["write -P 1 0 1M"])
    top = create(qemu, tmp_path / "top.qcow2", 2 * MIB, backing=base)
    qemu.write(top, ["write -P 2 512k 1M"])
    return base, top


@pytest.mark.parametrize("read_only", [False, True])
def test_a_running_qemu_keeps_boxdisk_out(qemu: Any, chain2: tuple[Path, Path],
                                          tmp_path: Path, read_only: bool) -> None:
    base, top = chain2
    other = create(qemu, tmp_path / "other.qcow2", 2 * MIB)
    before = {p: p.read_bytes() for p in (base, top)}
    assert not image_in_use(top)
    with qemu_io_holding(top, read_only=read_only):
        assert image_in_use(top)
        # QEMU opens the backing file too: it reads it and shares no writer with it.
        assert image_in_use(base)
        with pytest.raises(DiskInUseError) as exc:
            open_chain(top, writable=True).close()
        assert exc.value.path == str(top) and exc.value.field == "lock"
        with pytest.raises(DiskInUseError):
            Qcow2Writer(top).close()
        with pytest.raises(DiskInUseError):
            commit(top)
        with pytest.raises(DiskInUseError):
            rebase(top, other, backing_format="qcow2")
        with pytest.raises(DiskInUseError):
            rebase(top, None, safe=False)
        with pytest.raises(DiskInUseError):
            resize(top, 4 * MIB)
        open_chain(top).close()  # reading is always allowed
    assert {p: p.read_bytes() for p in (base, top)} == before
    assert not image_in_use(top)
    with open_chain(top, writable=True) as chain:  # free again once qemu-io is gone
        chain.write(0, b"mine now")


def test_a_running_qemu_on_the_base_keeps_commit_out(qemu: Any,
                                                     chain2: tuple[Path, Path]) -> None:
    base, top = chain2
    before = {p: p.read_bytes() for p in (base, top)}
    with qemu_io_holding(base, read_only=True):
        assert image_in_use(base)
        with pytest.raises(DiskInUseError) as exc:
            commit(top)
        assert exc.value.path == str(base)
    assert {p: p.read_bytes() for p in (base, top)} == before


def test_boxdisk_keeps_qemu_out(qemu: Any, chain2: tuple[Path, Path]) -> None:
    _, top = chain2
    with open_chain(top, writable=True) as chain:
        chain.write(0, b"held")
        info = qemu.img("info", top, check=False)  # no -U: QEMU asks for the locks
        assert info.returncode != 0
        assert 'Failed to get shared "write" lock' in info.stderr
        rw = qemu.io("-f", "qcow2", "-c", "read 0 512", top, check=False)
        assert rw.returncode != 0 and 'Failed to get "write" lock' in rw.stderr
        assert qemu.img("info", "-U", top).returncode == 0  # -U shares: allowed
        assert image_in_use(top)
        with pytest.raises(DiskInUseError):  # and a second boxdisk writer is refused
            open_chain(top, writable=True).close()
    assert qemu.img("info", top).returncode == 0  # locks released on close
    assert not image_in_use(top)


def test_image_in_use_of_a_missing_file(tmp_path: Path) -> None:
    assert not image_in_use(tmp_path / "nothing.qcow2")
