"""The one exception tree, and bad input through the file API.

Every broken header of tests/badinput.py, written to a file, makes
``qcow2_virtual_size`` and ``read_backing_file_path`` raise a ``BoxdiskError``
subclass naming the file and the field: never struct.error, IndexError,
UnicodeDecodeError or MemoryError.
"""

from __future__ import annotations

import errno
import pickle
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import boxdisk
from boxdisk import (
    BackingChainError,
    BoxdiskError,
    CorruptImageError,
    DiskExistsError,
    DiskInUseError,
    ImageError,
    ImageIOError,
    InvalidArgumentError,
    NotQcow2Error,
    UnsupportedFeatureError,
    create_cow_child_disk,
    qcow2_virtual_size,
    read_backing_chain,
    read_backing_file_path,
    set_backing_file_path,
)
from tests.badinput import BAD_HEADERS, BadHeader, valid_image

TREE = [
    (ImageError, (BoxdiskError,)),
    (NotQcow2Error, (ImageError, ValueError)),
    (CorruptImageError, (ImageError, ValueError)),
    (UnsupportedFeatureError, (ImageError, NotImplementedError)),
    (ImageIOError, (ImageError, OSError)),
    (BackingChainError, (BoxdiskError,)),
    (DiskExistsError, (BoxdiskError, FileExistsError)),
    (DiskInUseError, (BoxdiskError,)),
    (InvalidArgumentError, (BoxdiskError, ValueError)),
]


@pytest.mark.parametrize(("cls", "bases"), TREE, ids=lambda x: getattr(x, "__name__", ""))
def test_error_tree(cls: type[BoxdiskError], bases: tuple[type, ...]) -> None:
    for base in bases:
        assert issubclass(cls, base)
    assert issubclass(cls, BoxdiskError)
    assert cls.__name__ in boxdisk.__all__
    assert getattr(boxdisk, cls.__name__) is cls


def test_error_tree_is_drawn_in_the_docstring() -> None:
    doc = boxdisk._errors.__doc__ or ""
    for cls, _ in TREE:
        assert cls.__name__ in doc


@pytest.mark.parametrize("cls", [cls for cls, _ in TREE] + [BoxdiskError])
def test_errors_carry_evidence_and_pickle(cls: type[BoxdiskError]) -> None:
    exc = cls("l1_size too big", path="/boxes/a/disk.qcow2", field="l1_size", value=1 << 31)
    assert str(exc) == "/boxes/a/disk.qcow2: l1_size too big"
    assert (exc.path, exc.field, exc.value) == ("/boxes/a/disk.qcow2", "l1_size", 1 << 31)
    again = pickle.loads(pickle.dumps(exc))
    assert type(again) is cls
    assert (again.path, again.field, again.value, str(again)) == (
        exc.path, exc.field, exc.value, str(exc))


def test_error_without_path() -> None:
    exc = InvalidArgumentError("bad size", field="size", value=-1)
    assert str(exc) == "bad size"
    assert exc.path is None


def test_backing_chain_error_lists_the_chain() -> None:
    exc = BackingChainError("cycle", path="c", chain=("a", "b", "c"))
    assert exc.chain == ("a", "b", "c")
    assert "a -> b -> c" in str(exc)
    again = pickle.loads(pickle.dumps(exc))
    assert isinstance(again, BackingChainError)
    assert "a -> b -> c" in str(again)


def test_path_like_paths_become_strings(tmp_path: Path) -> None:
    exc = CorruptImageError("x", path=tmp_path / "a")
    assert exc.path == str(tmp_path / "a")


# -- bad input through the file API ------------------------------------------------


@pytest.mark.parametrize("case", BAD_HEADERS, ids=lambda c: c.id)
@pytest.mark.parametrize("api", [qcow2_virtual_size, read_backing_file_path],
                         ids=["qcow2_virtual_size", "read_backing_file_path"])
def test_bad_file_names_file_and_field(tmp_path: Path, case: BadHeader, api: object) -> None:
    path = tmp_path / "disk.qcow2"
    path.write_bytes(case.build())
    with pytest.raises(BoxdiskError) as info:
        api(path)  # type: ignore[operator]
    exc = info.value
    assert isinstance(exc, case.error), f"{type(exc).__name__}: {exc}"
    assert exc.field in case.fields, f"field {exc.field!r}: {exc}"
    assert exc.path == str(path)
    assert str(path) in str(exc)


@pytest.mark.parametrize("case", BAD_HEADERS[:12] + BAD_HEADERS[-8:], ids=lambda c: c.id)
def test_bad_file_is_never_rewritten(tmp_path: Path, case: BadHeader) -> None:
    path = tmp_path / "disk.qcow2"
    data = case.build()
    path.write_bytes(data)
    new = tmp_path / "new.raw"
    new.write_bytes(b"")
    with pytest.raises(BoxdiskError):
        set_backing_file_path(path, new)
    assert path.read_bytes() == data


def test_bad_qcow2_base_is_refused_for_a_child(tmp_path: Path) -> None:
    for case in BAD_HEADERS:
        base = tmp_path / f"{case.id}.qcow2"
        base.write_bytes(case.build())
        with pytest.raises(BoxdiskError):
            create_cow_child_disk(base, "qcow2", tmp_path / "child.qcow2", persistent=False)
        assert not (tmp_path / "child.qcow2").exists()


def test_missing_file_is_an_io_error(tmp_path: Path) -> None:
    with pytest.raises(ImageIOError) as info:
        qcow2_virtual_size(tmp_path / "missing.qcow2")
    assert info.value.errno == errno.ENOENT
    assert info.value.path == str(tmp_path / "missing.qcow2")


def test_directory_is_an_io_error(tmp_path: Path) -> None:
    with pytest.raises(ImageIOError) as info:
        qcow2_virtual_size(tmp_path)
    assert info.value.errno == errno.EISDIR


def test_valid_image_reads(tmp_path: Path) -> None:
    path = tmp_path / "ok.qcow2"
    path.write_bytes(valid_image())
    assert qcow2_virtual_size(path) == 1 << 30
    assert read_backing_file_path(path) == "/var/lib/boxes/bases/base.raw"


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=2048), magic=st.booleans())
def test_arbitrary_file_raises_only_boxdisk_errors(
    tmp_path: Path, content: bytes, magic: bool
) -> None:
    path = tmp_path / "fuzz.qcow2"
    path.write_bytes((b"QFI\xfb\x00\x00\x00\x03" if magic else b"") + content)
    for api in (qcow2_virtual_size, read_backing_file_path):
        try:
            api(path)
        except BoxdiskError as exc:
            assert exc.path == str(path)
    assert isinstance(read_backing_chain(path), list)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_mutated_file_raises_only_boxdisk_errors(tmp_path: Path, data: st.DataObject) -> None:
    buf = bytearray(valid_image()[:4096])
    for _ in range(data.draw(st.integers(1, 6))):
        buf[data.draw(st.integers(0, 600))] = data.draw(st.integers(0, 255))
    path = tmp_path / "mut.qcow2"
    path.write_bytes(bytes(buf))
    try:
        qcow2_virtual_size(path)
        read_backing_file_path(path)
    except BoxdiskError as exc:
        assert exc.field or isinstance(exc, ImageIOError)
