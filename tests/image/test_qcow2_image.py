"""Qcow2Image: features refused at open, and every bad table entry named, not misread.

Each case makes a valid image with QEMU and breaks one word of it; reading
must raise a BoxdiskError subclass that names the file and the entry.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest

from boxdisk._errors import BoxdiskError, CorruptImageError, UnsupportedFeatureError
from boxdisk.format import (
    INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE,
    INCOMPAT_DIRTY,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    compressed_geometry,
)
from boxdisk.image import Qcow2Image, RawImage, RunKind, _compress

pytestmark = pytest.mark.qemu

CS = 65536


class Img:
    """A QEMU-made image with guest cluster 0 written, and where its tables live."""

    def __init__(self, qemu, tmp_path: Path, *opts: str) -> None:
        self.path = tmp_path / "img.qcow2"
        qemu.img("create", "-q", "-f", "qcow2", *opts, self.path, "1M")
        qemu.write(self.path, ["write -P 0xaa 0 64k", "write -P 0xbb 128k 64k"])
        buf = self.path.read_bytes()
        self.l1_offset = struct.unpack_from(">Q", buf, 40)[0]
        self.rt_offset = struct.unpack_from(">Q", buf, 48)[0]
        self.l2_offset = struct.unpack_from(">Q", buf, self.l1_offset)[0] & ~QCOW_OFLAG_COPIED
        self.data_offset = struct.unpack_from(">Q", buf, self.l2_offset)[0] & ~QCOW_OFLAG_COPIED
        self.size = len(buf)

    def poke(self, offset: int, data: bytes) -> None:
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(data)

    def poke_u64(self, offset: int, value: int) -> None:
        self.poke(offset, struct.pack(">Q", value))

    def set_incompat(self, bits: int) -> None:
        buf = self.path.read_bytes()
        cur = struct.unpack_from(">Q", buf, 72)[0]
        self.poke_u64(72, cur | bits)

    def read_all(self) -> bytes:
        with Qcow2Image.open(self.path) as img:
            return img.read(0, img.size)


@pytest.fixture
def img(qemu, tmp_path: Path) -> Img:
    return Img(qemu, tmp_path)


def test_reads_own_clusters(img: Img) -> None:
    data = img.read_all()
    assert data[:CS] == b"\xaa" * CS
    assert data[CS : 2 * CS] == bytes(CS)
    assert data[2 * CS : 3 * CS] == b"\xbb" * CS
    with Qcow2Image.open(img.path) as q:
        kinds = [(r.kind, r.start, r.length) for r in q.runs()]
        assert kinds[0] == (RunKind.DATA, 0, CS)
        assert q.refcount(0) == 1
        assert q.refcount(img.data_offset // CS) == 1
        assert q.refcount(10_000) == 0
        assert q.l2_table(0) is not None
        assert q.l2_table(1) is None


def test_image_is_a_context_manager_and_closes_once(img: Img) -> None:
    q = Qcow2Image.open(img.path)
    with q:
        assert not q.closed
    assert q.closed
    q.close()
    with pytest.raises(BoxdiskError):
        q.read(0, 1)


def _expect(img: Img, match: str, exc: type[BoxdiskError] = CorruptImageError) -> BoxdiskError:
    with pytest.raises(exc, match=match) as info:
        img.read_all()
    assert info.value.path == str(img.path)
    return info.value


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (lambda i: i.l2_offset + 512, "L1 entry 0: .*not cluster-aligned"),
        (lambda i: (i.size // CS + 10) * CS, "L1 entry 0: L2 table .* past the end"),
        (lambda i: i.l2_offset | 1 << 56, "L1 entry 0: reserved bits"),
        (lambda i: i.l2_offset | 1 << 0, "L1 entry 0: reserved bits"),
        (lambda i: i.rt_offset, "L1 entry 0: L2 table .* overlaps the refcount table"),
        (lambda i: i.l1_offset, "L1 entry 0: L2 table .* overlaps the L1 table"),
    ],
    ids=["misaligned", "past-eof", "bit56", "low-bit", "into-reftable", "into-l1"],
)
def test_bad_l1_entry(img: Img, value, match: str) -> None:
    img.poke_u64(img.l1_offset, value(img))
    err = _expect(img, match)
    assert err.field == "L1 entry 0"


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (lambda i: i.data_offset + 512, "L2 entry 0/0: .*not cluster-aligned"),
        (lambda i: (i.size // CS + 10) * CS, "L2 entry 0/0: data cluster .* past the end"),
        (lambda i: i.data_offset | 1 << 56, "L2 entry 0/0: reserved bits"),
        (lambda i: i.l1_offset, "L2 entry 0/0: data cluster .* overlaps the L1 table"),
        (lambda i: i.rt_offset, "L2 entry 0/0: data cluster .* overlaps the refcount table"),
    ],
    ids=["misaligned", "past-eof", "bit56", "into-l1", "into-reftable"],
)
def test_bad_l2_entry(img: Img, value, match: str) -> None:
    img.poke_u64(img.l2_offset, value(img))
    err = _expect(img, match)
    assert err.field == "L2 entry 0/0"


def test_contiguous_run_running_past_eof_names_the_first_bad_entry(img: Img) -> None:
    last = (img.size - 1) // CS * CS
    img.poke_u64(img.l2_offset + 8 * 2, last | QCOW_OFLAG_COPIED)
    img.poke_u64(img.l2_offset + 8 * 3, (last + CS) | QCOW_OFLAG_COPIED)
    _expect(img, "L2 entry 0/3: data cluster .* past the end")


def _compressed_word(offset: int, sectors: int) -> int:
    shift, _, _ = compressed_geometry(16)
    return QCOW_OFLAG_COMPRESSED | ((sectors - 1) << shift) | offset


def test_compressed_descriptor_past_eof(img: Img) -> None:
    img.poke_u64(img.l2_offset, _compressed_word(img.size - 512, 8))
    _expect(img, "L2 entry 0/0: compressed data .* runs past the end")


def test_compressed_descriptor_in_header(img: Img) -> None:
    img.poke_u64(img.l2_offset, _compressed_word(0, 1))
    _expect(img, "inside the header cluster")


@pytest.mark.parametrize(
    "payload",
    [
        lambda: _deflate(b"x" * 1000),  # too short
        lambda: _deflate(b"y" * (CS + 1)),  # too long
        lambda: b"\xff" * 600,  # not deflate at all
    ],
    ids=["short", "long", "garbage"],
)
def test_compressed_cluster_must_inflate_to_one_cluster(img: Img, payload) -> None:
    data = payload()
    img.poke(img.data_offset, data + bytes(-len(data) % 512))
    img.poke_u64(img.l2_offset, _compressed_word(img.data_offset, -(-len(data) // 512)))
    _expect(img, "compressed")


def _deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -12)
    return c.compress(data) + c.flush()


def test_hand_made_compressed_cluster_reads(img: Img) -> None:
    """The seed's compressed-cluster case: a valid descriptor now reads, not errors."""
    data = _deflate(b"\x5c" * CS)
    img.poke(img.data_offset, data)
    img.poke_u64(img.l2_offset, _compressed_word(img.data_offset, -(-len(data) // 512)))
    assert img.read_all()[:CS] == b"\x5c" * CS


def test_zero_flag_in_v2_image(qemu, tmp_path: Path) -> None:
    img = Img(qemu, tmp_path, "-o", "compat=0.10")
    img.poke_u64(img.l2_offset, QCOW_OFLAG_ZERO)
    _expect(img, "zero cluster in a version 2 image")


def test_zero_flag_reads_zeros_over_own_data(img: Img) -> None:
    img.poke_u64(img.l2_offset, img.data_offset | QCOW_OFLAG_COPIED | QCOW_OFLAG_ZERO)
    assert img.read_all()[:CS] == bytes(CS)


def test_corrupt_bit_refused(img: Img) -> None:
    img.set_incompat(INCOMPAT_CORRUPT)
    with pytest.raises(CorruptImageError, match="corrupt"):
        Qcow2Image.open(img.path)


def test_dirty_bit_refused_only_when_trusting_refcounts(img: Img) -> None:
    img.set_incompat(INCOMPAT_DIRTY)
    with Qcow2Image.open(img.path) as q:
        assert q.read(0, 1) == b"\xaa"
    with pytest.raises(CorruptImageError, match="dirty"):
        Qcow2Image.open(img.path, trust_refcounts=True)


def test_external_data_file_refused(img: Img) -> None:
    img.set_incompat(INCOMPAT_DATA_FILE)
    with pytest.raises(UnsupportedFeatureError, match="external data file"):
        Qcow2Image.open(img.path)


def test_encryption_refused(img: Img) -> None:
    img.poke(32, struct.pack(">I", 1))
    with pytest.raises(UnsupportedFeatureError, match="encrypted"):
        Qcow2Image.open(img.path)


def test_unknown_incompatible_bit_refused(img: Img) -> None:
    img.set_incompat(1 << 20)
    with pytest.raises(UnsupportedFeatureError, match="bit 20"):
        Qcow2Image.open(img.path)


def test_l1_table_past_eof_refused_at_open(img: Img) -> None:
    img.poke(36, struct.pack(">I", 4_000_000))  # l1_size: 32 MB of L1 in a small file
    with pytest.raises(CorruptImageError, match="L1 table"):
        Qcow2Image.open(img.path)


def test_zstd_without_the_extra_names_it(qemu, tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "z.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", path, "1M")
    monkeypatch.setattr(_compress, "_zstd", lambda: None)
    with pytest.raises(UnsupportedFeatureError, match=r"pip install boxdisk\[zstd\]"):
        Qcow2Image.open(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BoxdiskError, match="cannot open"):
        Qcow2Image.open(tmp_path / "nope.qcow2")
    with pytest.raises(BoxdiskError, match="cannot open"):
        RawImage.open(tmp_path / "nope.raw")


def test_not_qcow2(tmp_path: Path) -> None:
    p = tmp_path / "x.raw"
    p.write_bytes(b"\0" * 4096)
    with pytest.raises(BoxdiskError, match="not a qcow2"):
        Qcow2Image.open(p)
