"""The hostile-image corpus: reproducible, complete, and every case refused as stated.

Each image in tests/data/hostile/ (written by tests/data/make_hostile.py) is
opened, mapped, read in full and flattened; what must happen is stated once in
``_expect.EXPECT``: the BoxdiskError subclass, the operation that raises it and
the field it names. QEMU is asked about the same file, so the table also records
where boxdisk agrees with QEMU and where (with a reason) it is stricter.
Chain cases, which need a directory laid out around them, are in test_chains.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from boxdisk._errors import BoxdiskError
from boxdisk.chain import BackingChain
from boxdisk.ops import check, flatten

from ._expect import EXPECT, Expect
from .test_chains import CHAIN_CASES

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "tests" / "data" / "hostile"
SCRIPT = REPO / "tests" / "data" / "make_hostile.py"


def _path(name: str) -> Path:
    return CORPUS / f"{name}.qcow2"


def test_script_reproduces_the_corpus_byte_for_byte(tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    subprocess.run([sys.executable, str(SCRIPT), str(out)], check=True, capture_output=True)
    made = {p.name: p.read_bytes() for p in out.iterdir()}
    committed = {p.name: p.read_bytes() for p in CORPUS.iterdir()}
    assert sorted(made) == sorted(committed)
    differ = [name for name in made if made[name] != committed[name]]
    assert not differ, f"run {SCRIPT.relative_to(REPO)} and commit: {differ}"


def test_every_image_has_a_stated_outcome() -> None:
    stems = {p.name.rsplit(".", 1)[0] for p in CORPUS.iterdir()}
    chains = {s for s in stems if s.startswith("chain-")}
    assert stems - chains == set(EXPECT)
    assert chains == CHAIN_CASES
    for name, exp in EXPECT.items():
        assert (exp.error is None) == (exp.at is None), name
        assert exp.qemu in ("refuses", "check", "reads"), name
        if exp.error is not None and exp.qemu == "reads":
            assert exp.why, f"{name}: boxdisk is stricter than QEMU here; say why"


def _assert_error(exc: BoxdiskError, exp: Expect, path: Path) -> None:
    assert type(exc) is exp.error, f"{type(exc).__name__}: {exc}"
    assert exp.field_matches(exc.field), f"field {exc.field!r}, expected {exp.field!r}: {exc}"
    assert exc.path == str(path), "the error must name the file"


def _no_output(tmp_path: Path) -> None:
    assert sorted(os.listdir(tmp_path)) == [], "flatten left a file behind"


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_boxdisk_outcome(name: str, tmp_path: Path) -> None:
    exp = EXPECT[name]
    path = _path(name)
    dst = tmp_path / "flat.qcow2"
    if exp.at == "open":
        assert exp.error is not None
        with pytest.raises(exp.error) as info:
            BackingChain.open(path, allowed_roots=[CORPUS])
        _assert_error(info.value, exp, path)
        with pytest.raises(exp.error):
            flatten(path, dst)
        _no_output(tmp_path)
        return
    with BackingChain.open(path, allowed_roots=[CORPUS]) as chain:
        if exp.at == "map":
            assert exp.error is not None
            with pytest.raises(exp.error) as info:
                list(chain.map())
            _assert_error(info.value, exp, path)
        else:
            extents = list(chain.map())
            assert sum(e.length for e in extents) == chain.size
        if exp.at in ("map", "read"):
            assert exp.error is not None
            with pytest.raises(exp.error) as info:
                chain.read(0, chain.size)
            _assert_error(info.value, exp, path)
            with pytest.raises(exp.error):
                flatten(chain, dst)
            _no_output(tmp_path)
            return
        data = chain.read(0, chain.size)
        flatten(chain, dst)
    with BackingChain.open(dst) as flat:
        assert flat.images[0].backing_file is None
        assert flat.read(0, flat.size) == data


def _run(*argv: str | Path) -> subprocess.CompletedProcess[bytes]:
    # Bytes, not text: QEMU echoes hostile backing names, which need not be UTF-8.
    return subprocess.run([os.fspath(a) for a in argv], capture_output=True, check=False)


def _qemu_reads(path: Path) -> bool:
    """Whether QEMU opens the image (format named, never probed) and reads every byte."""
    proc = _run("qemu-img", "info", "-f", "qcow2", "--output=json", path)
    if proc.returncode != 0:
        return False
    size = json.loads(proc.stdout)["virtual-size"]
    proc = _run("qemu-io", "-f", "qcow2", "-r", "-c", f"read 0 {size}", path)
    return proc.returncode == 0 and b"failed" not in proc.stdout


@pytest.mark.qemu
@pytest.mark.parametrize("name", sorted(EXPECT))
def test_qemu_verdict(name: str, qemu, tmp_path: Path) -> None:
    """What QEMU does with the same file is what the table says; equal bytes where both read."""
    exp = EXPECT[name]
    path = _path(name)
    reads = _qemu_reads(path)
    if exp.qemu == "refuses":
        assert not reads, "QEMU reads this image; the table says it refuses it"
        return
    assert reads, "QEMU refuses this image; the table says it reads it"
    check = _run("qemu-img", "check", "-f", "qcow2", path).returncode
    if exp.qemu == "check":
        assert check in (1, 2, 3), f"qemu-img check exit {check}: no problem found"
    else:
        assert check == 0, f"qemu-img check exit {check}"
    if exp.error is None:
        out = tmp_path / "qemu.raw"
        qemu.img("convert", "-f", "qcow2", "-O", "raw", path, out)
        with BackingChain.open(path) as chain:
            assert chain.read(0, chain.size) == out.read_bytes()


@pytest.mark.qemu
def test_pristine_images_pass_qemu_check(qemu) -> None:
    for name in [n for n in EXPECT if n.startswith("valid-")]:
        qemu.assert_clean(_path(name))


#: Images QEMU's check opens although QEMU's normal open refuses them.
_CHECK_ONLY_IN_QEMU = {
    "hdr-refcount-table-clusters-0": "qemu-img check opens an image without a refcount "
    "table so that -r can build one; boxdisk's check refuses it as its open does",
}


@pytest.mark.qemu
@pytest.mark.parametrize("name", sorted(EXPECT))
def test_check_counts_as_qemu_img_check(name: str, tmp_path: Path) -> None:
    """boxdisk's check finds what qemu-img check finds, or refuses what QEMU cannot open."""
    exp = EXPECT[name]
    path = _path(name)
    proc = _run("qemu-img", "check", "-f", "qcow2", "--output=json", path)
    qemu_report = json.loads(proc.stdout) if proc.stdout.strip() else None
    try:
        report = check(path)
    except BoxdiskError as exc:
        assert exp.at == "open", f"check raised {exc!r} on an image boxdisk opens"
        assert type(exc) is exp.error
        assert exp.field_matches(exc.field)
        assert qemu_report is None or exp.qemu == "reads" or name in _CHECK_ONLY_IN_QEMU, (
            f"qemu-img check reports {qemu_report}")
        return
    assert qemu_report is not None, f"qemu-img check cannot open it: {proc.stderr!r}"
    keys = ("check-errors", "corruptions", "leaks")
    ours = report.as_qemu_json()
    assert {k: ours.get(k, 0) for k in keys} == {k: qemu_report.get(k, 0) for k in keys}
    assert report.exit_code == proc.returncode
