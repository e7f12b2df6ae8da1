"""One API shape (issue 12): every public callable that takes a format, a path or a size
accepts the same forms and refuses the same mistakes with InvalidArgumentError naming the
parameter, before any file is touched. One table, one test per kind of mistake.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import boxdisk

MiB = 1 << 20


@pytest.fixture
def img(tmp_path: Path) -> Path:
    """A child (a.qcow2) over a base (b.qcow2): every operation in the table has work to do."""
    base, path = tmp_path / "b.qcow2", tmp_path / "a.qcow2"
    boxdisk.create_disk(base, True, size=MiB).close()
    boxdisk.create_cow_child_disk(base, "qcow2", path, persistent=True).close()
    return path


# (name, call(img, tmp, **override) , parameters that name a format, parameters that are paths)
Call = Callable[[Path, Path, dict[str, Any]], Any]
TABLE: list[tuple[str, Call, tuple[str, ...], tuple[str, ...]]] = [
    ("open_chain", lambda i, t, kw: boxdisk.open_chain(**{"top": i, **kw}).close(),
     ("format", "backing_format"), ("top",)),
    ("compare", lambda i, t, kw: boxdisk.compare(**{"a": i, "b": i, **kw}),
     ("format_a", "format_b"), ("a", "b")),
    ("convert", lambda i, t, kw: boxdisk.convert(
        **{"src": i, "dst": t / "o.img", "output_format": "raw", **kw}),
     ("output_format", "src_format", "backing_format"), ("src", "dst")),
    ("flatten", lambda i, t, kw: boxdisk.flatten(**{"src": i, "dst": t / "o.qcow2", **kw}),
     ("src_format", "backing_format"), ("src", "dst")),
    ("rebase", lambda i, t, kw: boxdisk.rebase(
        **{"image": i, "new_backing": t / "b.qcow2", "backing_format": "qcow2", **kw}),
     ("backing_format",), ("image", "new_backing")),
    ("resize", lambda i, t, kw: boxdisk.resize(**{"path": i, "new_size": 2 * MiB, **kw}),
     ("format",), ("path",)),
    ("commit", lambda i, t, kw: boxdisk.commit(**{"top": i, **kw}), (), ("top",)),
    ("check", lambda i, t, kw: boxdisk.check(**{"path": i, **kw}), (), ("path",)),
    ("create_disk", lambda i, t, kw: boxdisk.create_disk(
        **{"path": t / "n.qcow2", "persistent": True, "size": MiB, **kw}), (), ("path",)),
    ("create_cow_child_disk", lambda i, t, kw: boxdisk.create_cow_child_disk(
        **{"base_disk": i, "backing_format": "qcow2", "child_path": t / "c.qcow2",
           "persistent": True, **kw}),
     ("backing_format",), ("base_disk", "child_path")),
    ("set_backing_file_path", lambda i, t, kw: boxdisk.set_backing_file_path(
        **{"qcow2_path": i, "new_backing": t / "b.qcow2", **kw}),
     ("backing_format",), ("qcow2_path", "new_backing")),
    ("read_header", lambda i, t, kw: boxdisk.read_header(**{"path": i, **kw}), (), ("path",)),
    ("qcow2_virtual_size", lambda i, t, kw: boxdisk.qcow2_virtual_size(**{"path": i, **kw}),
     (), ("path",)),
    ("read_backing_file_path", lambda i, t, kw: boxdisk.read_backing_file_path(
        **{"path": i, **kw}), (), ("path",)),
    ("read_backing_chain", lambda i, t, kw: boxdisk.read_backing_chain(**{"path": i, **kw}),
     (), ("path",)),
    ("is_backing_dependency", lambda i, t, kw: boxdisk.is_backing_dependency(
        **{"target": i, "chain_root": i, **kw}), (), ("target", "chain_root")),
    ("image_in_use", lambda i, t, kw: boxdisk.image_in_use(**{"path": i, **kw}), (), ("path",)),
    ("Qcow2Image.open", lambda i, t, kw: boxdisk.Qcow2Image.open(**{"path": i, **kw}).close(),
     (), ("path",)),
    ("RawImage.open", lambda i, t, kw: boxdisk.RawImage.open(**{"path": i, **kw}).close(),
     (), ("path",)),
    ("Disk", lambda i, t, kw: boxdisk.Disk(**{"path": i, "persistent": True, **kw}),
     ("format",), ("path",)),
    ("BoxStore", lambda i, t, kw: boxdisk.BoxStore(**{"root": t / "st", **kw}).close(),
     (), ("root",)),
]

FORMATS = [(n, c, p) for n, c, fs, _ in TABLE for p in fs]
PATHS = [(n, c, p) for n, c, _, ps in TABLE for p in ps]
FORMAT_IDS = [f"{n}-{p}" for n, _, p in FORMATS]
PATH_IDS = [f"{n}-{p}" for n, _, p in PATHS]


@pytest.mark.parametrize(("name", "call", "param"), FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("bad", ["vmdk", 7])
def test_a_bad_format_names_the_parameter(img: Path, tmp_path: Path, name: str, call: Call,
                                          param: str, bad: object) -> None:
    with pytest.raises(boxdisk.InvalidArgumentError) as info:
        call(img, tmp_path, {param: bad})
    assert info.value.field == param, (name, info.value)
    assert "<" not in str(info.value), "an enum repr leaked into the message"


@pytest.mark.parametrize(("name", "call", "param"), FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("good", [boxdisk.BackingFormat.QCOW2, boxdisk.DiskFormat.QCOW2,
                                  "QCOW2"])
def test_every_format_parameter_takes_the_enum_and_the_name(
        img: Path, tmp_path: Path, name: str, call: Call, param: str, good: object) -> None:
    if name == "convert" and param == "output_format":
        good = {"QCOW2": "RAW"}.get(good, good) if isinstance(good, str) else good
    call(img, tmp_path, {param: good})


@pytest.mark.parametrize(("name", "call", "param"), PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("bad", [42, b"/tmp/x", ""])
def test_a_path_of_the_wrong_type_names_the_parameter(
        img: Path, tmp_path: Path, name: str, call: Call, param: str, bad: object) -> None:
    with pytest.raises(boxdisk.InvalidArgumentError) as info:
        call(img, tmp_path, {param: bad})
    assert info.value.field == param, (name, info.value)


@pytest.mark.parametrize(("name", "call", "param"), PATHS, ids=PATH_IDS)
def test_every_path_parameter_takes_str_and_pathlike(
        img: Path, tmp_path: Path, name: str, call: Call, param: str) -> None:
    """The table's own arguments are PathLike (the format test runs them); here each as str."""
    defaults = {"dst": tmp_path / ("o.img" if name == "convert" else "o.qcow2"),
                "child_path": tmp_path / "c.qcow2", "root": tmp_path / "st",
                "new_backing": tmp_path / "b.qcow2"}
    value = tmp_path / "n.qcow2" if name == "create_disk" else defaults.get(param, img)
    call(img, tmp_path, {param: str(value)})


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1M"])
def test_sizes_are_ints_of_bytes(tmp_path: Path, bad: object) -> None:
    with pytest.raises(boxdisk.InvalidArgumentError) as info:
        boxdisk.create_disk(tmp_path / "s.qcow2", True, size=bad)  # type: ignore[arg-type]
    assert info.value.field == "size"
    assert not (tmp_path / "s.qcow2").exists()
