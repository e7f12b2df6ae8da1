"""Hostile backing names: host files, symlinks out of the root, loops, probing, FIFOs.

The chain-* images of the corpus are copied into a fresh directory laid out as
a store root would be, with an ``outside`` directory next to it holding a
secret. Every test records each file Python opens (an audit hook on the
``open`` event, which ``os.open`` raises) and asserts that nothing outside the
root was opened: refusing after reading would be too late.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from boxdisk._errors import (
    BackingChainError,
    CorruptImageError,
    ImageIOError,
    UnsupportedFeatureError,
)
from boxdisk.chain import DEFAULT_MAX_DEPTH, BackingChain
from boxdisk.ops import flatten
from tests.data.make_hostile import build

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "tests" / "data" / "hostile"

#: Every chain-* case of the corpus; test_corpus.py checks the list is complete.
CHAIN_CASES = {
    "chain-etc-shadow", "chain-self", "chain-loop-a", "chain-loop-b", "chain-loop-c",
    "chain-symlink-out", "chain-dotdot", "chain-json", "chain-no-format", "chain-vmdk",
    "chain-fifo", "chain-directory", "chain-dev-zero", "chain-probe-child",
    "chain-probe-base", "chain-corrupt-backing",
}

SECRET = b"a host secret that no image may read\n"

_recording: list[str] | None = None


def _audit(event: str, args: tuple[object, ...]) -> None:
    if _recording is not None and event == "open" and isinstance(args[0], str | bytes):
        _recording.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


@contextmanager
def opened_files() -> Iterator[list[str]]:
    """Collect the paths of every file opened inside the block."""
    global _recording  # noqa: PLW0603 - the audit hook cannot be removed, only switched
    outer = _recording
    _recording = seen = []
    try:
        yield seen
    finally:
        _recording = outer
        if outer is not None:
            outer.extend(seen)


def _inside(path: str, root: Path) -> bool:
    real = os.path.realpath(path)
    return os.path.commonpath([real, str(root)]) == str(root)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A store-like root holding the chain cases, and a secret outside it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.raw").write_bytes(SECRET * 2000)
    r = tmp_path / "root"
    r.mkdir()
    for p in CORPUS.iterdir():
        if p.name.startswith("chain-") or p.name == "hdr-l1-size-ffffffff.qcow2":
            shutil.copyfile(p, r / p.name)
    os.symlink("../outside/secret.raw", r / "escape.raw")
    os.mkfifo(r / "fifo")
    (r / "base.vmdk").write_bytes(b"# Disk DescriptorFile\n")
    return r.resolve()


def _refused(root: Path, name: str, error: type[Exception], field: str,
             *, roots: bool = True) -> Exception:
    """Open ``name`` under ``root``; it must raise ``error`` naming ``field``, reading
    nothing outside the root."""
    with opened_files() as seen, pytest.raises(error) as info:
        BackingChain.open(root / name, allowed_roots=[root] if roots else None)
    assert getattr(info.value, "field", None) == field, info.value
    if roots:
        outside = [p for p in seen if not _inside(p, root)]
        assert not outside, f"opened outside the root: {outside}"
    return info.value


def test_backing_file_etc_shadow_is_outside_the_root(root: Path) -> None:
    _refused(root, "chain-etc-shadow.qcow2", BackingChainError, "backing_file")


def test_symlink_leaving_the_root_is_resolved_before_the_check(root: Path) -> None:
    exc = _refused(root, "chain-symlink-out.qcow2", BackingChainError, "backing_file")
    assert "outside" in str(exc)


def test_symlink_to_a_host_file(root: Path) -> None:
    (root / "escape.raw").unlink()
    os.symlink("/etc/shadow", root / "escape.raw")
    _refused(root, "chain-symlink-out.qcow2", BackingChainError, "backing_file")


def test_dotdot_name_leaving_the_root(root: Path) -> None:
    _refused(root, "chain-dotdot.qcow2", BackingChainError, "backing_file")


def test_symlink_staying_inside_the_root_is_followed(root: Path) -> None:
    target = root / "inside.raw"
    target.write_bytes(bytes(4096))
    (root / "escape.raw").unlink()
    os.symlink("inside.raw", root / "escape.raw")
    with BackingChain.open(root / "chain-symlink-out.qcow2", allowed_roots=[root]) as chain:
        assert chain.paths[1] == str(root / "escape.raw")


def test_image_backed_by_itself(root: Path) -> None:
    exc = _refused(root, "chain-self.qcow2", BackingChainError, "backing_file", roots=False)
    assert "loop" in str(exc)


@pytest.mark.parametrize("start", ["a", "b", "c"])
def test_loop_of_three_files(root: Path, start: str) -> None:
    exc = _refused(root, f"chain-loop-{start}.qcow2", BackingChainError, "backing_file",
                   roots=False)
    assert isinstance(exc, BackingChainError)
    assert len(exc.chain) == 3


def test_json_backing_spec_is_not_a_file(root: Path) -> None:
    with opened_files() as seen:
        _refused(root, "chain-json.qcow2", UnsupportedFeatureError, "backing_file",
                 roots=False)
    assert seen == [str(root / "chain-json.qcow2")]


def test_backing_name_without_format_is_never_probed(root: Path) -> None:
    with opened_files() as seen:
        _refused(root, "chain-no-format.qcow2", BackingChainError, "backing_format",
                 roots=False)
    assert str(root / "chain-probe-base.raw") not in seen


def test_unsupported_backing_format_is_not_opened(root: Path) -> None:
    with opened_files() as seen:
        _refused(root, "chain-vmdk.qcow2", UnsupportedFeatureError, "format", roots=False)
    assert str(root / "base.vmdk") not in seen


def test_raw_base_that_looks_like_qcow2_is_read_as_raw(root: Path, tmp_path: Path) -> None:
    """The probing attack: the base is raw by the child's header, so its bytes are data.

    Parsed as qcow2 it would name /etc/shadow as its backing file; it never is.
    """
    base = (root / "chain-probe-base.raw").read_bytes()
    assert base[:4] == b"QFI\xfb"
    with opened_files() as seen, BackingChain.open(root / "chain-probe-child.qcow2",
                                                   allowed_roots=[root]) as chain:
        assert [img.format for img in chain.images] == ["qcow2", "raw"]
        assert chain.images[1].size == len(base)
        assert chain.images[1].backing_file is None
        data = chain.read(0, chain.size)
    assert all(_inside(p, root) for p in seen), seen
    child = build(backing="chain-probe-base.raw", backing_fmt="raw")
    cs = child.cs
    # Guest cluster 4 is unallocated in the child: it shows the base's raw bytes.
    assert data[4 * cs : 5 * cs] == base[4 * cs : 5 * cs]
    assert data[: 4 * cs] != base[: 4 * cs]
    # Past the end of the shorter raw base, unallocated clusters read as zeros.
    assert data[len(base) : 64 * cs] == bytes(64 * cs - len(base))
    with opened_files() as seen2:
        flatten(root / "chain-probe-child.qcow2", tmp_path / "flat.qcow2")
    assert "/etc/shadow" not in seen2


@pytest.mark.qemu
def test_raw_base_that_looks_like_qcow2_reads_as_qemu_reads_it(root: Path, qemu,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "qemu.raw"
    qemu.img("convert", "-f", "qcow2", "-O", "raw", root / "chain-probe-child.qcow2", out)
    with BackingChain.open(root / "chain-probe-child.qcow2") as chain:
        assert chain.read(0, chain.size) == out.read_bytes()


def test_raw_base_opened_alone_is_its_bytes(root: Path) -> None:
    base = root / "chain-probe-base.raw"
    with BackingChain.open(base, format="raw") as chain:
        assert chain.read(0, chain.size) == base.read_bytes()


def _in_subprocess(code: str) -> str:
    """Run ``code`` in a fresh interpreter with a deadline, so a hang fails instead."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


_OPEN_AND_REPORT = """
import sys
from boxdisk.chain import BackingChain
from boxdisk._errors import BoxdiskError
try:
    with BackingChain.open(sys.argv[1] if len(sys.argv) > 1 else {path!r}) as c:
        c.read(0, c.size)
    print("opened")
except BoxdiskError as e:
    print(type(e).__name__, e.field)
"""


def test_fifo_backing_file_is_refused_without_blocking(root: Path) -> None:
    out = _in_subprocess(_OPEN_AND_REPORT.format(path=str(root / "chain-fifo.qcow2")))
    assert out == "ImageIOError path"


def test_fifo_as_the_top_image_is_refused_without_blocking(root: Path) -> None:
    out = _in_subprocess(_OPEN_AND_REPORT.format(path=str(root / "fifo")))
    assert out == "ImageIOError path"


def test_directory_backing_file(root: Path) -> None:
    _refused(root, "chain-directory.qcow2", ImageIOError, "path")


def test_character_device_backing_file(root: Path) -> None:
    _refused(root, "chain-dev-zero.qcow2", ImageIOError, "path", roots=False)
    _refused(root, "chain-dev-zero.qcow2", BackingChainError, "backing_file")


def test_corrupt_backing_file_is_named_in_the_error(root: Path) -> None:
    exc = _refused(root, "chain-corrupt-backing.qcow2", CorruptImageError, "l1_size")
    assert isinstance(exc, CorruptImageError)
    assert exc.path == str(root / "hdr-l1-size-ffffffff.qcow2")


def test_chain_deeper_than_the_limit(tmp_path: Path) -> None:
    n = DEFAULT_MAX_DEPTH + 1
    for i in range(n):
        backing = f"link-{i + 1}.qcow2" if i + 1 < n else None
        img = build(backing=backing, backing_fmt="qcow2" if backing else None)
        (tmp_path / f"link-{i}.qcow2").write_bytes(img.bytes())
    with pytest.raises(BackingChainError) as info:
        BackingChain.open(tmp_path / "link-0.qcow2")
    assert info.value.field == "backing_file"
    assert len(info.value.chain) == DEFAULT_MAX_DEPTH
    with BackingChain.open(tmp_path / "link-1.qcow2") as chain:
        assert len(chain.images) == DEFAULT_MAX_DEPTH


_EVERY_ENTRY_POINT = """
import logging
import sys
import structlog
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
import boxdisk
from boxdisk._errors import BoxdiskError
from boxdisk._locks import image_in_use
from boxdisk.ops import check
path = sys.argv[1]
for fn in (check, boxdisk.qcow2_virtual_size, boxdisk.read_backing_file_path,
           boxdisk.read_header):
    try:
        fn(path)
        print(fn.__name__, "returned")
    except BoxdiskError as e:
        print(fn.__name__, type(e).__name__)
print("read_backing_chain", boxdisk.read_backing_chain(path))
print("image_in_use", image_in_use(path))
"""


def test_fifo_never_blocks_a_header_reader_or_check(tmp_path: Path) -> None:
    """Regression: check() and the seed-parity header readers opened a FIFO blocking."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    proc = subprocess.run([sys.executable, "-c", _EVERY_ENTRY_POINT, str(fifo)],
                          capture_output=True, text=True, timeout=60, check=False, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "check ImageIOError", "qcow2_virtual_size ImageIOError",
        "read_backing_file_path ImageIOError", "read_header ImageIOError",
        "read_backing_chain []", "image_in_use False",
    ]
