"""The image commands against qemu-img: same JSON keys and values, same exit codes.

Every test runs the installed console script in a subprocess, as a user would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Qemu

BOXDISK = str(Path(sys.executable).parent / "boxdisk")
MiB = 1 << 20


def boxdisk(*args: str | os.PathLike[str], cwd: Path | None = None,
            check: bool = False) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([BOXDISK, *map(os.fspath, args)], capture_output=True, text=True,
                          check=False, cwd=cwd, timeout=300)
    if check and proc.returncode != 0:
        pytest.fail(f"boxdisk {args} exited {proc.returncode}: {proc.stderr}")
    return proc


def qemu_json(qemu: Qemu, *args: str | os.PathLike[str], cwd: Path) -> Any:
    proc = subprocess.run(["qemu-img", *map(os.fspath, args)], capture_output=True, text=True,
                          check=False, cwd=cwd)
    assert proc.returncode in (0, 2, 3), proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def images(qemu: Qemu, tmp_path: Path) -> Path:
    """A directory of QEMU-made images of many shapes, named relative to it."""
    d = tmp_path
    img = qemu.img
    img("create", "-q", "-f", "raw", d / "base.raw", "64M")
    img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", d / "mid.qcow2")
    img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "mid.qcow2", "-F", "qcow2",
        d / "top.qcow2", "100M")
    qemu.write(d / "top.qcow2", ["write -P 1 0 1M", "write -P 2 5M 64k"])
    qemu.write(d / "mid.qcow2", ["write -P 3 4M 64k", "write -z 8M 1M", "discard 9M 64k"])
    img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=1",
        d / "small.qcow2", "3M")
    qemu.write(d / "small.qcow2", ["write -P 5 1000 3000"])
    img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=2M",
        d / "lazy.qcow2", "1G")
    img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on,compression_type=zstd",
        d / "extl2.qcow2", "10M")
    qemu.write(d / "extl2.qcow2", ["write -P 7 4k 4k"])
    img("convert", "-c", "-O", "qcow2", d / "small.qcow2", d / "compressed.qcow2")
    os.symlink("top.qcow2", d / "link.qcow2")
    return d


NAMES = ["top.qcow2", "mid.qcow2", "base.raw", "small.qcow2", "lazy.qcow2", "extl2.qcow2",
         "compressed.qcow2", "link.qcow2"]


def _without_actual_size(info: Any) -> Any:
    """actual-size is st_blocks: equal for the same file, but qemu-img is run first."""
    if isinstance(info, list):
        return [_without_actual_size(i) for i in info]
    return {k: v for k, v in info.items() if k != "actual-size"}


@pytest.mark.parametrize("name", NAMES)
def test_info_json_equals_qemu_img(qemu: Qemu, images: Path, name: str) -> None:
    ours = json.loads(boxdisk("info", "--output=json", name, cwd=images, check=True).stdout)
    theirs = qemu_json(qemu, "info", "--output=json", name, cwd=images)
    assert ours == theirs


@pytest.mark.parametrize("name", ["top.qcow2", "mid.qcow2"])
def test_info_backing_chain_json_equals_qemu_img(qemu: Qemu, images: Path, name: str) -> None:
    ours = json.loads(boxdisk("info", "--output=json", "--backing-chain", name, cwd=images,
                              check=True).stdout)
    theirs = qemu_json(qemu, "info", "--output=json", "--backing-chain", name, cwd=images)
    assert _without_actual_size(ours) == _without_actual_size(theirs)
    assert [i["filename"] for i in ours] == [i["filename"] for i in theirs]


def test_info_absolute_path_full_backing_filename(qemu: Qemu, images: Path) -> None:
    top = images / "top.qcow2"
    ours = json.loads(boxdisk("info", "--output=json", top, check=True).stdout)
    theirs = qemu_json(qemu, "info", "--output=json", top, cwd=images)
    assert ours["full-backing-filename"] == theirs["full-backing-filename"]


@pytest.mark.parametrize("name", ["top.qcow2", "mid.qcow2", "base.raw", "small.qcow2"])
def test_info_human_equals_qemu_img(qemu: Qemu, images: Path, name: str) -> None:
    ours = boxdisk("info", name, cwd=images, check=True).stdout.splitlines()
    proc = subprocess.run(["qemu-img", "info", name], capture_output=True, text=True,
                          check=True, cwd=images)
    theirs = proc.stdout.splitlines()
    # "disk size" is st_blocks of a file qemu-img has just touched; all else is equal.
    def keep(lines: list[str]) -> list[str]:
        return [ln for ln in lines if not ln.startswith("disk size:")]
    assert keep(ours) == keep(theirs)
    assert len(keep(ours)) >= 3


@pytest.mark.parametrize("name", ["top.qcow2", "mid.qcow2", "small.qcow2", "extl2.qcow2",
                                  "compressed.qcow2"])
def test_map_json_equals_qemu_img(qemu: Qemu, images: Path, name: str) -> None:
    ours = boxdisk("map", "--output=json", name, cwd=images, check=True).stdout
    theirs = subprocess.run(["qemu-img", "map", "--output=json", name], capture_output=True,
                            text=True, check=True, cwd=images).stdout
    assert json.loads(ours) == json.loads(theirs)


@pytest.mark.parametrize("name", ["top.qcow2", "mid.qcow2", "small.qcow2"])
def test_map_human_equals_qemu_img(qemu: Qemu, images: Path, name: str) -> None:
    ours = boxdisk("map", name, cwd=images, check=True).stdout
    theirs = subprocess.run(["qemu-img", "map", name], capture_output=True, text=True,
                            check=True, cwd=images).stdout
    assert ours == theirs


def test_errors_are_one_line_and_nonzero(images: Path) -> None:
    proc = boxdisk("info", "missing.qcow2", cwd=images)
    assert proc.returncode == 1
    assert proc.stderr.startswith("boxdisk: error: missing.qcow2: ")
    assert len(proc.stderr.strip().splitlines()) == 1
    (images / "junk.qcow2").write_bytes(b"QFI\xfb" + bytes(100))
    proc = boxdisk("info", "junk.qcow2", cwd=images)
    assert proc.returncode == 1
    assert proc.stderr.startswith("boxdisk: error: junk.qcow2: ")
    assert "Traceback" not in proc.stderr
    proc = boxdisk("--debug", "info", "junk.qcow2", cwd=images)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr


def test_raw_named_file_is_never_parsed_as_qcow2(qemu: Qemu, images: Path) -> None:
    """A guest's raw disk holding a qcow2 header that names a host file stays raw bytes."""
    qemu.img("create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw",
             images / "evil.qcow2", "1M")
    (images / "guest.raw").write_bytes((images / "evil.qcow2").read_bytes())
    info = json.loads(boxdisk("info", "--output=json", "guest.raw", cwd=images,
                              check=True).stdout)
    assert info["format"] == "raw"
    assert "backing-filename" not in info


def test_create_matches_qemu_img_info(qemu: Qemu, tmp_path: Path) -> None:
    boxdisk("create", "-q", "-f", "raw", tmp_path / "b.raw", "16M", check=True)
    boxdisk("create", "-q", "-o", "cluster_size=4k", "-b", "b.raw", "-F", "raw",
            tmp_path / "c.qcow2", check=True)
    boxdisk("create", "-q", tmp_path / "s.qcow2", "1.5G", check=True)
    c = qemu.info(tmp_path / "c.qcow2")
    assert (c["virtual-size"], c["cluster-size"], c["backing-filename"],
            c["backing-filename-format"]) == (16 * MiB, 4096, "b.raw", "raw")
    assert qemu.info(tmp_path / "s.qcow2")["virtual-size"] == 3 * (1 << 29)
    assert qemu.info(tmp_path / "b.raw")["virtual-size"] == 16 * MiB
    for name in ("c.qcow2", "s.qcow2"):
        qemu.assert_clean(tmp_path / name)
    # An existing different file is never overwritten.
    proc = boxdisk("create", "-q", tmp_path / "s.qcow2", "1G")
    assert proc.returncode == 1
    assert qemu.info(tmp_path / "s.qcow2")["virtual-size"] == 3 * (1 << 29)


@pytest.mark.parametrize(("text", "size"), [("10G", 10 << 30), ("512M", 512 << 20),
                                            ("4k", 4096), ("1048576", 1 << 20)])
def test_create_sizes(qemu: Qemu, tmp_path: Path, text: str, size: int) -> None:
    boxdisk("create", "-q", tmp_path / "x.qcow2", text, check=True)
    assert qemu.info(tmp_path / "x.qcow2")["virtual-size"] == size


def test_bad_size_is_refused(tmp_path: Path) -> None:
    proc = boxdisk("create", tmp_path / "x.qcow2", "ten gigs")
    assert proc.returncode == 1
    assert "not a size" in proc.stderr
    assert not (tmp_path / "x.qcow2").exists()
