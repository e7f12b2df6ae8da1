"""plan_new_image: every planned image is one QEMU accepts as clean and reads as intended."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from boxdisk._errors import InvalidArgumentError
from boxdisk.format import (
    MAX_REFCOUNT_ORDER,
    NewImageLayout,
    l1_entries_for,
    parse_header,
    plan_new_image,
    unpack_refcount_block,
    unpack_u64_table,
)
from tests.conftest import Qemu

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def write_layout(path: Path, layout: NewImageLayout) -> None:
    """Write a planned image the way create_disk does: a sparse file plus the non-zero writes."""
    with path.open("wb") as f:
        f.truncate(layout.file_size)
        for offset, data in layout.writes:
            f.seek(offset)
            f.write(data)


def image_bytes(layout: NewImageLayout) -> bytes:
    out = bytearray(layout.file_size)
    for offset, data in layout.writes:
        out[offset : offset + len(data)] = data
    return bytes(out)


def assert_qemu_reads_as_planned(qemu: Qemu, path: Path, layout: NewImageLayout) -> None:
    qemu.assert_clean(path)
    info = qemu.info(path)
    h = layout.header
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == h.size
    assert info["cluster-size"] == h.cluster_size
    assert info["format-specific"]["data"]["refcount-bits"] == h.refcount_bits
    assert info["format-specific"]["data"]["compat"] == "1.1"
    assert info.get("backing-filename") == h.backing_file
    assert info.get("backing-filename-format") == h.backing_format


@pytest.mark.parametrize("cluster_bits", range(9, 22))
@pytest.mark.parametrize("refcount_order", [0, 4, 6])
@pytest.mark.parametrize("size", [0, 512, 10 * MiB + 7 * 512, 10 * GiB])
def test_planned_image_is_clean(
    qemu: Qemu, tmp_path: Path, cluster_bits: int, refcount_order: int, size: int
) -> None:
    layout = plan_new_image(size, cluster_bits=cluster_bits, refcount_order=refcount_order)
    img = tmp_path / "new.qcow2"
    write_layout(img, layout)
    assert_qemu_reads_as_planned(qemu, img, layout)


@pytest.mark.parametrize("refcount_order", range(MAX_REFCOUNT_ORDER + 1))
def test_every_refcount_width_is_clean(qemu: Qemu, tmp_path: Path, refcount_order: int) -> None:
    # 512-byte clusters and a big disk: many L1 clusters, so refcounts spill past one block.
    layout = plan_new_image(100 * GiB, cluster_bits=9, refcount_order=refcount_order)
    img = tmp_path / "new.qcow2"
    write_layout(img, layout)
    assert_qemu_reads_as_planned(qemu, img, layout)


@pytest.mark.parametrize("cluster_size", [512, 4 * KiB, 64 * KiB, 2 * MiB])
@pytest.mark.parametrize("backing_format", ["raw", "qcow2"])
def test_planned_child_is_clean_and_reads_through(
    qemu: Qemu, tmp_path: Path, cluster_size: int, backing_format: str
) -> None:
    base = tmp_path / f"base.{backing_format}"
    qemu.img("create", "-q", "-f", backing_format, base, "3M")
    qemu.write(base, ["write -P 0x5a 0 3M"], fmt=backing_format)
    layout = plan_new_image(3 * MiB, cluster_bits=cluster_size.bit_length() - 1,
                            backing_file=base.name, backing_format=backing_format)
    child = tmp_path / "child.qcow2"
    write_layout(child, layout)
    assert_qemu_reads_as_planned(qemu, child, layout)
    qemu.io("-c", "read -P 0x5a 0 3M", child)
    qemu.write(child, ["write -P 0xa5 1M 4k"])
    qemu.assert_clean(child)
    qemu.io("-c", "read -P 0xa5 1M 4k", "-c", "read -P 0x5a 0 1M", child)
    qemu.io("-f", backing_format, "-c", "read -P 0x5a 0 3M", base)


@pytest.mark.parametrize("cluster_size", [16 * KiB, 64 * KiB, 2 * MiB])
def test_planned_extended_l2_image_is_clean(qemu: Qemu, tmp_path: Path, cluster_size: int) -> None:
    layout = plan_new_image(GiB, cluster_bits=cluster_size.bit_length() - 1, extended_l2=True)
    img = tmp_path / "x.qcow2"
    write_layout(img, layout)
    assert_qemu_reads_as_planned(qemu, img, layout)
    assert qemu.info(img)["format-specific"]["data"]["extended-l2"] is True
    qemu.write(img, ["write -P 1 0 4k"])
    qemu.assert_clean(img)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sectors=st.integers(0, 64 * GiB // 512),
    cluster_bits=st.integers(9, 21),
    refcount_order=st.integers(0, MAX_REFCOUNT_ORDER),
    backing=st.none() | st.text(alphabet="abcxyz_-.", max_size=200).map(lambda s: "b" + s),
)
def test_any_planned_image_is_clean(
    qemu: Qemu, tmp_path_factory: pytest.TempPathFactory, sectors: int, cluster_bits: int,
    refcount_order: int, backing: str | None,
) -> None:
    size = sectors * 512  # QEMU sees whole sectors only (see test_unaligned_size_*)
    try:
        layout = plan_new_image(size, cluster_bits=cluster_bits, refcount_order=refcount_order,
                                backing_file=backing, backing_format="raw" if backing else None)
    except InvalidArgumentError as exc:
        # Only limits QEMU shares: the L1 table or the name does not fit.
        assert exc.field in ("size", "backing_file")
        return
    img = tmp_path_factory.mktemp("any") / "img.qcow2"
    if backing:
        (img.parent / backing).write_bytes(b"")
    write_layout(img, layout)
    report = qemu.check(img)
    assert not report.get("corruptions") and not report.get("leaks"), report
    assert qemu.info(img)["virtual-size"] == size


@settings(max_examples=300, deadline=None)
@given(
    size=st.integers(0, 1 << 45),
    cluster_bits=st.integers(9, 16),
    refcount_order=st.integers(0, MAX_REFCOUNT_ORDER),
)
def test_plan_counts_its_own_clusters(size: int, cluster_bits: int, refcount_order: int) -> None:
    try:
        layout = plan_new_image(size, cluster_bits=cluster_bits, refcount_order=refcount_order)
    except InvalidArgumentError:
        return
    h = layout.header
    cs = h.cluster_size
    assert layout.file_size % cs == 0
    assert h.l1_size == l1_entries_for(size, cluster_bits)
    assert h.l1_table_offset + 8 * h.l1_size <= layout.file_size
    offsets = [o for o, _ in layout.writes]
    assert offsets == sorted(offsets)
    assert all(o + len(d) <= layout.file_size for o, d in layout.writes)
    # The refcount table's blocks give every cluster of the file a refcount of 1, and no more.
    writes = dict(layout.writes)
    table = unpack_u64_table(writes[h.refcount_table_offset])
    counts: list[int] = []
    for block_offset in table:
        block = writes.get(block_offset, b"")
        block += bytes(cs - len(block))
        counts += unpack_refcount_block(block, refcount_order)
    clusters = layout.file_size // cs
    assert counts[:clusters] == [1] * clusters
    assert not any(counts[clusters:])


def test_plan_header_parses_back() -> None:
    layout = plan_new_image(5 * GiB, backing_file="../bases/b.raw", backing_format="raw")
    h = parse_header(image_bytes(layout)[: 64 * KiB])
    assert h == layout.header
    assert h.backing_file == "../bases/b.raw"
    assert h.backing_format == "raw"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"size": -1}, "size"),
        ({"size": 1 << 63}, "size"),
        ({"size": GiB, "cluster_bits": 8}, "cluster_size"),
        ({"size": GiB, "cluster_bits": 22}, "cluster_size"),
        ({"size": GiB, "refcount_order": 7}, "refcount_order"),
        ({"size": GiB, "refcount_order": -1}, "refcount_order"),
        ({"size": GiB, "cluster_bits": 12, "extended_l2": True}, "cluster_size"),
        ({"size": 1 << 40, "cluster_bits": 9}, "size"),
        ({"size": GiB, "backing_file": "x" * 1024}, "backing_file"),
        ({"size": GiB, "cluster_bits": 9, "backing_file": "x" * 500}, "backing_file"),
    ],
)
def test_plan_refuses_impossible_images(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        plan_new_image(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


def test_unaligned_size_is_not_what_qemu_sees(qemu: Qemu, tmp_path: Path) -> None:
    """QEMU counts whole 512-byte sectors: a header size of 1000 reads as 512 bytes.

    ``qemu-img create`` rounds such sizes up; the format layer plans what it is
    asked, so callers (create_disk, create_cow_child_disk) must round first.
    """
    layout = plan_new_image(1000, cluster_bits=16)
    img = tmp_path / "odd.qcow2"
    write_layout(img, layout)
    qemu.assert_clean(img)
    assert qemu.info(img)["virtual-size"] == 512
