"""The qcow2 header: parse what QEMU writes, pack it back byte for byte, refuse bad bytes.

Reference: docs/interop/qcow2.txt, "Header" and "Header extensions".
"""

from __future__ import annotations

import struct
from pathlib import Path

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from boxdisk._errors import (
    BoxdiskError,
    CorruptImageError,
    NotQcow2Error,
    UnsupportedFeatureError,
)
from boxdisk.format import (
    EXT_BACKING_FORMAT,
    EXT_FEATURE_TABLE,
    HEADER_V3_LENGTH,
    MIN_HEADER_PROBE,
    FeatureType,
    HeaderExtension,
    Qcow2Header,
    cluster_size_of,
    l1_entries_for,
    parse_header,
    plan_new_image,
    unknown_extensions,
)
from tests.badinput import BAD_HEADERS, CLUSTER, BadHeader, valid_image
from tests.conftest import Qemu
from tests.strategies import qcow2_headers

CLUSTER_SIZES = [512, 4096, 64 * 1024, 2 * 1024 * 1024]


def first_cluster(path: Path) -> bytes:
    """The bytes parse_header wants: the first cluster (or the whole, shorter, file)."""
    with path.open("rb") as f:
        probe = f.read(MIN_HEADER_PROBE)
        cs = cluster_size_of(probe, source=str(path))
        return probe + f.read(cs - len(probe))


def padded(header: Qcow2Header) -> bytes:
    """A header packed and zero-padded to its first cluster, as it sits in a file."""
    raw = header.pack()
    return raw + bytes(header.cluster_size - len(raw))


# -- QEMU-made headers ----------------------------------------------------------


@pytest.mark.parametrize("cluster_size", CLUSTER_SIZES)
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_parse_qemu_header(qemu: Qemu, tmp_path: Path, cluster_size: int, compat: str) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(4096))
    img = tmp_path / "img.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size},compat={compat}",
             "-b", "base.raw", "-F", "raw", img, "3G")
    info = qemu.info(img)
    h = parse_header(first_cluster(img), source=str(img))
    assert h.version == (2 if compat == "0.10" else 3)
    assert h.cluster_size == info["cluster-size"] == cluster_size
    assert h.size == info["virtual-size"] == 3 << 30
    assert h.backing_file == info["backing-filename"] == "base.raw"
    assert h.backing_format == info["backing-filename-format"] == "raw"
    assert h.l1_size == l1_entries_for(h.size, h.cluster_bits)
    assert h.refcount_bits == 16
    assert h.crypt_method == 0
    assert h.nb_snapshots == 0


@pytest.mark.parametrize(
    ("cluster_size", "options"),
    [
        (cs, opt)
        for cs in CLUSTER_SIZES
        for opt in ["compat=1.1", "compat=0.10", "refcount_bits=1", "refcount_bits=64",
                    "lazy_refcounts=on", "compression_type=zstd", "extended_l2=on"]
        # QEMU allows extended L2 entries only with clusters of 16 KiB or more.
        if not (opt == "extended_l2=on" and cs < 16384)
    ],
)
def test_qemu_header_packs_back_byte_for_byte(
    qemu: Qemu, tmp_path: Path, cluster_size: int, options: str
) -> None:
    (tmp_path / "b.qcow2").write_bytes(b"")
    qemu.img("create", "-q", "-f", "qcow2", tmp_path / "b.qcow2", "1M")
    img = tmp_path / "img.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size},{options}",
             "-b", "b.qcow2", "-F", "qcow2", img, "100M")
    buf = first_cluster(img)
    h = parse_header(buf)
    raw = h.pack()
    assert raw == buf[: len(raw)]
    assert not any(buf[len(raw) :]), "bytes after the backing name that pack() would drop"
    assert parse_header(padded(h)) == h
    assert (h.backing_file_offset, h.backing_file_size) == struct.unpack_from(">QI", buf, 8)


def test_qemu_feature_table_names(qemu: Qemu, tmp_path: Path) -> None:
    img = tmp_path / "img.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", img, "1M")
    h = parse_header(first_cluster(img))
    names = {(f.type, f.bit): f.name for f in h.feature_table}
    assert names[(FeatureType.INCOMPATIBLE, 0)] == "dirty bit"
    assert names[(FeatureType.COMPATIBLE, 0)] == "lazy refcounts"
    assert h.feature_name(FeatureType.INCOMPATIBLE, 1) == "corrupt bit"
    assert h.feature_name(FeatureType.INCOMPATIBLE, 40) == "unknown feature bit 40"
    assert list(unknown_extensions(h)) == []


def test_parse_reads_v3_fields() -> None:
    h = plan_new_image(1 << 30, refcount_order=6, backing_file="b", backing_format="qcow2").header
    assert h.version == 3
    assert h.refcount_order == 6
    assert h.refcount_bits == 64
    assert h.header_length == 112
    assert h.l2_entries == 8192
    assert h.l2_entry_size == 8
    assert not h.extended_l2
    assert parse_header(padded(h)) == h


# -- pack/parse laws ----------------------------------------------------------


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(qcow2_headers())
def test_pack_parse_round_trip(header: Qcow2Header) -> None:
    raw = header.pack()
    assert len(raw) <= header.cluster_size
    parsed = parse_header(padded(header))
    assert parsed == header
    assert parsed.pack() == raw
    if header.backing_file is not None:
        assert parsed.backing_file_offset == len(raw) - parsed.backing_file_size


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(qcow2_headers(), st.data())
def test_parse_needs_only_what_pack_wrote(header: Qcow2Header, data: st.DataObject) -> None:
    # A file that ends right after the header (no padding) still parses.
    raw = header.pack()
    if len(raw) < header.cluster_size:
        raw += bytes(8)  # room for nothing after the end marker but zeros
    assert parse_header(raw[: header.cluster_size]) == header
    extra = data.draw(st.binary(max_size=64))
    # Bytes past the first cluster are never looked at.
    assert parse_header(padded(header) + extra) == header


@settings(max_examples=100)
@given(qcow2_headers(), st.sampled_from(["raw", "qcow2", None]), st.data())
def test_with_backing_replaces_name_and_format_only(
    header: Qcow2Header, fmt: str | None, data: st.DataObject
) -> None:
    name = data.draw(st.none() | st.text(alphabet="abc/._-", min_size=1, max_size=40))
    new = header.with_backing(name, fmt)
    assert new.backing_file == name
    assert new.backing_format == fmt
    others = [e for e in header.extensions if e.type != EXT_BACKING_FORMAT]
    assert [e for e in new.extensions if e.type != EXT_BACKING_FORMAT] == others
    assert attrs.evolve(new, backing_file=header.backing_file, extensions=header.extensions) == (
        header
    )
    try:
        raw = padded(new)
    except CorruptImageError:
        return  # does not fit a 512-byte cluster
    assert parse_header(raw) == new


@settings(max_examples=500)
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_raise_only_boxdisk_errors(buf: bytes) -> None:
    try:
        parse_header(buf)
    except BoxdiskError as exc:
        assert exc.field
        assert exc.path == "<header>"


@settings(max_examples=500)
@given(st.binary(min_size=72, max_size=1024))
def test_bytes_with_magic_raise_only_boxdisk_errors(tail: bytes) -> None:
    # With the magic, version 3 and 512-byte clusters, parsing gets far into the header.
    buf = bytearray(tail)
    struct.pack_into(">II", buf, 0, 0x514649FB, 3)
    struct.pack_into(">I", buf, 20, 9)
    try:
        parse_header(bytes(buf))
    except BoxdiskError as exc:
        assert exc.field


def _mutate(buf: bytes, data: st.DataObject, limit: int) -> bytes:
    out = bytearray(buf)
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, min(limit, len(out)) - 1))
        out[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.none() | st.integers(0, len(out)))
    return bytes(out if cut is None else out[:cut])


@settings(max_examples=600, deadline=None)
@given(st.data())
def test_mutated_planned_header_raises_only_boxdisk_errors(data: st.DataObject) -> None:
    buf = valid_image()[:CLUSTER]
    mutated = _mutate(buf, data, 200)
    try:
        h = parse_header(mutated)
    except BoxdiskError as exc:
        assert exc.field
    else:
        # Whatever parsed is a valid header: it packs, and parses back the same.
        assert parse_header(padded(h)) == h


@pytest.fixture(scope="module")
def qemu_headers(qemu: Qemu, tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    d = tmp_path_factory.mktemp("qemu-headers")
    qemu.img("create", "-q", "-f", "raw", d / "base.raw", "1M")
    out = []
    for i, opts in enumerate(["cluster_size=512", "cluster_size=65536", "compat=0.10",
                              "extended_l2=on,compression_type=zstd"]):
        img = d / f"h{i}.qcow2"
        qemu.img("create", "-q", "-f", "qcow2", "-o", opts, "-b", "base.raw", "-F", "raw",
                 img, "5G")
        out.append(first_cluster(img))
    return out


@settings(max_examples=600, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_mutated_qemu_header_raises_only_boxdisk_errors(
    qemu_headers: list[bytes], data: st.DataObject
) -> None:
    buf = data.draw(st.sampled_from(qemu_headers))
    mutated = _mutate(buf, data, 1024)
    try:
        h = parse_header(mutated)
    except BoxdiskError as exc:
        assert exc.field
    else:
        assert parse_header(padded(h)) == h


# -- bad input, field by field --------------------------------------------------


@pytest.mark.parametrize("case", BAD_HEADERS, ids=lambda c: c.id)
def test_bad_header_names_the_field(case: BadHeader) -> None:
    with pytest.raises(BoxdiskError) as info:
        parse_header(case.build(), source="/boxes/x/disk.qcow2")
    exc = info.value
    assert isinstance(exc, case.error), f"{type(exc).__name__}: {exc}"
    assert exc.field in case.fields, f"field {exc.field!r}: {exc}"
    assert exc.path == "/boxes/x/disk.qcow2"
    assert "/boxes/x/disk.qcow2" in str(exc)


def test_valid_image_parses() -> None:
    h = parse_header(valid_image()[:CLUSTER])
    assert h.backing_file == "/var/lib/boxes/bases/base.raw"
    assert h.backing_format == "raw"
    assert h.extension(EXT_FEATURE_TABLE) is None


def test_error_types_are_also_builtin_types() -> None:
    with pytest.raises(ValueError):
        parse_header(b"\0" * 512)
    with pytest.raises(NotImplementedError):
        buf = bytearray(valid_image()[:CLUSTER])
        struct.pack_into(">I", buf, 4, 4)
        parse_header(bytes(buf))


def test_wrong_magic_reports_what_it_found() -> None:
    with pytest.raises(NotQcow2Error) as info:
        parse_header(b"\x7fELF" + bytes(600))
    assert info.value.value == "7f454c46"


def test_unknown_incompatible_bit_is_named_from_feature_table(qemu: Qemu, tmp_path: Path) -> None:
    img = tmp_path / "img.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", img, "1M")
    buf = bytearray(first_cluster(img))
    struct.pack_into(">Q", buf, 72, 1 << 9)
    with pytest.raises(UnsupportedFeatureError) as info:
        parse_header(bytes(buf))
    assert info.value.field == "incompatible_features"
    assert "bit 9" in str(info.value)


def test_duplicate_backing_format_extension_is_refused() -> None:
    h = plan_new_image(1 << 20, backing_file="b", backing_format="raw").header
    dup = attrs.evolve(h, extensions=(*h.extensions, HeaderExtension(EXT_BACKING_FORMAT, b"raw")))
    with pytest.raises(CorruptImageError) as info:
        parse_header(padded(dup))
    assert info.value.field == f"extension 0x{EXT_BACKING_FORMAT:08x}"


def test_pack_refuses_name_past_first_cluster() -> None:
    h = plan_new_image(1 << 20, cluster_bits=9).header
    with pytest.raises(CorruptImageError) as info:
        attrs.evolve(h, backing_file="x" * 500).pack()
    assert info.value.field == "backing_file"


def test_pack_refuses_header_length_disagreeing_with_fields() -> None:
    h = plan_new_image(1 << 20).header
    with pytest.raises(CorruptImageError) as info:
        attrs.evolve(h, header_length=HEADER_V3_LENGTH + 16).pack()
    assert info.value.field == "header_length"


@pytest.mark.parametrize("cluster_bits", range(9, 22))
def test_cluster_size_of(cluster_bits: int) -> None:
    h = plan_new_image(1 << 30, cluster_bits=cluster_bits).header
    assert cluster_size_of(h.pack()[:MIN_HEADER_PROBE]) == 1 << cluster_bits


def test_empty_backing_name_reads_as_none() -> None:
    buf = bytearray(valid_image()[:CLUSTER])
    struct.pack_into(">I", buf, 16, 0)
    assert parse_header(bytes(buf)).backing_file is None
