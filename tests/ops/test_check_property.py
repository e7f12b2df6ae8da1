"""Property: whatever is written into an image's tables, check returns a report or raises
a BoxdiskError, and where qemu-img check reports counts, boxdisk reports the same.

Small QEMU-made images (several geometries, one with an internal snapshot) get
one to four table entries overwritten: L1 and L2 entries (extended L2 bitmaps
included), refcount table entries and refcount block bytes, with values drawn
from structured offsets (tables, data, the end of the file, misaligned, far
away) and flags, bit flips of the original, and arbitrary words. Then:

* ``check`` returns a :class:`CheckReport` or raises a ``BoxdiskError``, never
  anything else, and when ``qemu-img check`` prints counts boxdisk prints the
  same, with the same exit code;
* ``check(repair="all")`` does the same, and afterwards qemu-img and boxdisk
  agree on the repaired image, which has no check errors.
"""

from __future__ import annotations

import itertools
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from boxdisk import CheckReport, check
from boxdisk._errors import BoxdiskError

from .test_check import KIB, MIB, Layout, make_image, qemu_check

pytestmark = pytest.mark.qemu

_COPIED = 1 << 63
_COMPRESSED = 1 << 62

TEMPLATES: dict[str, dict[str, Any]] = {
    "v3-4k": {"cluster": 4 * KIB},
    "v3-512-refcount8": {"cluster": 512, "options": ("refcount_bits=8",)},
    "v3-64k-refcount1": {"cluster": 64 * KIB, "options": ("refcount_bits=1",)},
    "v2-4k": {"cluster": 4 * KIB, "compat": "0.10"},
    "extended-16k": {"cluster": 16 * KIB, "options": ("extended_l2=on",)},
}
_OPS = ("write -c -P 5 7M 64k", "write -P 1 0 300k", "write -z 1M 64k",
        "write -P 2 2M 8k", "discard 256k 64k")

_counter = itertools.count()


@pytest.fixture(scope="session")
def templates(qemu: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The clean images every example starts from."""
    root = tmp_path_factory.mktemp("check-templates")
    out = {}
    for name, spec in TEMPLATES.items():
        ops = _OPS if spec.get("compat") != "0.10" else _OPS[1:]
        out[name] = make_image(qemu, root / f"{name}.qcow2", ops=ops, **spec)
    snap = make_image(qemu, root / "snapshot.qcow2", cluster=4 * KIB, ops=_OPS[1:3])
    qemu.img("snapshot", "-c", "s1", snap)
    qemu.write(snap, ["write -P 9 0 64k", "write -P 8 3M 4k"])
    out["snapshot-4k"] = snap
    return out


@st.composite
def words(draw: st.DrawFn, lay: Layout, original: int) -> int:
    """A 64-bit table word worth trying in this image."""
    cs, size = lay.cs, lay.file_size
    offsets = [0, cs, lay.l1_offset, lay.rt_offset, lay.refblock(0), lay.l2_table(0),
               original & 0x00FF_FFFF_FFFF_FE00, -(-size // cs) * cs, size + 5 * cs,
               1 << 40, (1 << 56) - cs]
    kind = draw(st.sampled_from(["structured", "flip", "any", "small"]))
    if kind == "flip":
        return original ^ (1 << draw(st.integers(0, 63)))
    if kind == "any":
        return draw(st.integers(0, (1 << 64) - 1))
    if kind == "small":
        return draw(st.integers(0, 3))
    offset = draw(st.sampled_from(offsets))
    offset += draw(st.sampled_from([0, 0, 0, 512, 8, -cs]))
    offset &= (1 << 62) - 1
    flags = draw(st.sampled_from([0, _COPIED, _COMPRESSED, _COPIED | _COMPRESSED, 1,
                                  _COPIED | 1]))
    return flags | max(0, offset)


@st.composite
def mutations(draw: st.DrawFn, lay: Layout) -> list[tuple[int, bytes]]:
    """One to four (file offset, new bytes) edits of table entries."""
    out = []
    entry = 16 if lay.extended else 8
    for _ in range(draw(st.integers(1, 4))):
        table = draw(st.sampled_from(["l1", "l2", "l2", "l2", "reftable", "refblock"]))
        if table == "refblock":
            pos = lay.refblock(0) + draw(st.integers(0, min(lay.cs, 256) - 1))
            out.append((pos, bytes([draw(st.integers(0, 255))])))
            continue
        if table == "l1":
            pos = lay.l1_offset + 8 * draw(st.integers(0, lay.l1_size - 1))
        elif table == "reftable":
            pos = lay.rt_offset + 8 * draw(st.integers(0, 3))
        else:
            index = draw(st.integers(0, min(lay.cs // entry, 64) - 1))
            pos = lay.l2_table(0) + index * entry + draw(st.sampled_from([0, 8][:entry // 8]))
        out.append((pos, struct.pack(">Q", draw(words(lay, lay.u64(pos))))))
    return out


def _apply(path: Path, edits: list[tuple[int, bytes]]) -> None:
    with open(path, "r+b") as f:
        for pos, data in edits:
            f.seek(pos)
            f.write(data)


def _check_or_error(path: Path, **kwargs: Any) -> CheckReport | BoxdiskError:
    try:
        return check(path, **kwargs)
    except BoxdiskError as exc:  # the only exception check may raise
        return exc


def _agrees_with_qemu(qemu: Any, path: Path, report: CheckReport | BoxdiskError) -> None:
    rc, data = qemu_check(qemu, path)
    if data is None:
        return  # qemu-img could not check it either; boxdisk may raise or report
    assert isinstance(report, CheckReport), f"qemu-img checked it (exit {rc}): {report}"
    assert report.as_qemu_json() == data, [str(f) for f in report.findings[:30]]
    assert report.exit_code == rc


def _property(qemu: Any, templates: dict[str, Path], data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(templates)))
    template = templates[name]
    path = template.with_name(f"example-{next(_counter)}.qcow2")
    shutil.copy(template, path)
    try:
        lay = Layout(path)
        _apply(path, data.draw(mutations(lay)))
        report = _check_or_error(path)
        _agrees_with_qemu(qemu, path, report)
        if not isinstance(report, CheckReport):
            return
        repaired = _check_or_error(path, repair="all")
        if isinstance(repaired, CheckReport):
            after = _check_or_error(path)
            _agrees_with_qemu(qemu, path, after)
            assert isinstance(after, CheckReport)
            assert after.check_errors == 0
            assert (after.corruptions, after.leaks) == (repaired.corruptions, repaired.leaks)
    finally:
        path.unlink(missing_ok=True)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_mutated_tables_check_as_qemu(qemu, templates, data):
    _property(qemu, templates, data)


@pytest.mark.slow
@settings(max_examples=1500, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_mutated_tables_check_as_qemu_long(qemu, templates, data):
    _property(qemu, templates, data)


def test_templates_are_clean(qemu, templates):
    for path in templates.values():
        rc, data = qemu_check(qemu, path)
        assert rc == 0 and data is not None
        assert check(path).as_qemu_json() == data
    assert MIB  # the templates are a few MiB each
