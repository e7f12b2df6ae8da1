"""Qcow2Image: features refused at open, and every bad table entry named, not misread.

Each case makes a valid image with QEMU and breaks one word of it; reading
must raise a BoxdiskError subclass that names the file and the entry.
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import pytest

from boxdisk._errors import (
    BoxdiskError,
    CorruptImageError,
    ImageIOError,
    UnsupportedFeatureError,
)
from boxdisk.chain import BackingChain
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

from ..chain.chains import qemu_map

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


@pytest.mark.parametrize("method", [1, 2], ids=["aes", "luks"])
def test_encryption_refused(img: Img, method: int) -> None:
    img.poke(32, struct.pack(">I", method))
    with pytest.raises(UnsupportedFeatureError, match="encrypted") as info:
        Qcow2Image.open(img.path)
    assert info.value.field == "crypt_method"
    assert info.value.value == method


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


# -- QEMU's own acceptance rules for compressed clusters ---------------------------


def _qemu_reads(qemu, path: Path, offset: int, length: int, pattern: int) -> bool:
    """Whether QEMU reads ``length`` bytes of ``pattern`` at ``offset`` (False: an error)."""
    proc = qemu.io("-f", "qcow2", "-c", f"read -P {pattern} {offset} {length}", path,
                   check=False)
    out = proc.stdout + proc.stderr
    return proc.returncode == 0 and "error" not in out.lower() and "fail" not in out.lower()


def _qemu_read_fails(qemu, path: Path, offset: int, length: int) -> bool:
    """Whether QEMU's read of the range fails with an I/O error (not a pattern mismatch)."""
    proc = qemu.io("-f", "qcow2", "-c", f"read {offset} {length}", path, check=False)
    return "read failed" in proc.stdout + proc.stderr


def _poke_compressed(img: Img, payload: bytes) -> None:
    img.poke(img.data_offset, payload + bytes(-len(payload) % 512))
    img.poke_u64(img.l2_offset, _compressed_word(img.data_offset, -(-len(payload) // 512)))


def test_zlib_with_a_32k_window_reads_as_in_qemu(qemu, img: Img) -> None:
    """QEMU declares a 4 KiB window but inflates a cluster in one call, so references
    further back (here 5000 bytes) still resolve; boxdisk must read them too."""
    block = random.Random(1).randbytes(5000)
    data = (block * 14)[:CS]
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    _poke_compressed(img, c.compress(data) + c.flush())
    assert not _qemu_read_fails(qemu, img.path, 0, CS)
    assert img.read_all()[:CS] == data
    assert qemu.read_raw(img.path, img.path.parent)[:CS] == data


def test_zlib_reference_before_the_cluster_fails_in_qemu_and_here(qemu, img: Img) -> None:
    """A distance reaching before the cluster's first byte: "too far back" in both."""
    # A fixed-Huffman block: literal 'A', then a match of length 3 at distance 2.
    bits = [(1, 1), (1, 2)]  # BFINAL=1, then BTYPE=01 (fixed Huffman)
    def code(value: int, length: int) -> None:  # Huffman codes go MSB first
        bits.append((int(f"{value:0{length}b}"[::-1], 2), length))
    code(0x30 + ord("A"), 8)  # literal 'A' (0x30 + 65)
    code(0b0000001, 7)  # length code 257: length 3
    code(0b00001, 5)  # distance code 1: distance 2
    code(0, 7)  # end of block
    acc = n = 0
    for value, length in bits:
        acc |= value << n
        n += length
    payload = acc.to_bytes(-(-n // 8), "little")
    _poke_compressed(img, payload)
    assert _qemu_read_fails(qemu, img.path, 0, 512)
    _expect(img, "too far back")


def test_zlib_with_a_4k_window_matches_qemu(qemu, img: Img) -> None:
    c = zlib.compressobj(9, zlib.DEFLATED, -12)
    _poke_compressed(img, c.compress(b"\x3c" * CS) + c.flush())
    assert _qemu_reads(qemu, img.path, 0, CS, 0x3C)
    assert img.read_all()[:CS] == b"\x3c" * CS


def test_zlib_longer_than_a_cluster_is_refused(qemu, img: Img) -> None:
    """The one deliberate difference from QEMU: QEMU cuts such a stream at the
    cluster's end and reads on; boxdisk refuses it, since a descriptor holds
    exactly one cluster (qcow2.txt) and a longer stream means a broken image."""
    c = zlib.compressobj(9, zlib.DEFLATED, -12)
    _poke_compressed(img, c.compress(b"\x3c" * (CS + 512)) + c.flush())
    assert _qemu_reads(qemu, img.path, 0, CS, 0x3C)
    _expect(img, "inflates to more than")


def _zstd_image(qemu, tmp_path: Path) -> Img:
    return Img(qemu, tmp_path, "-o", "compression_type=zstd")


def test_zstd_cluster_of_several_frames_reads_as_qemu_reads_it(qemu, tmp_path: Path) -> None:
    import zstandard  # noqa: PLC0415

    img = _zstd_image(qemu, tmp_path)
    c = zstandard.ZstdCompressor()
    payload = c.compress(b"\x11" * 1000) + c.compress(b"\x22" * (CS - 1000))
    _poke_compressed(img, payload)
    assert _qemu_reads(qemu, img.path, 0, 1000, 0x11)
    assert _qemu_reads(qemu, img.path, 1000, CS - 1000, 0x22)
    assert img.read_all()[:CS] == b"\x11" * 1000 + b"\x22" * (CS - 1000)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda c: c.compress(b"\x11" * (CS + 1)), "more than"),
        (lambda c: c.compress(b"\x11" * 100) + bytes(200), "Unknown frame"),
        (lambda c: c.compress(b"\x11" * CS)[:-8], "cut short|unfinished|decompress"),
    ],
    ids=["too-long", "short-then-garbage", "truncated"],
)
def test_zstd_bad_clusters_fail_in_qemu_and_here(qemu, tmp_path: Path, make, match) -> None:
    import zstandard  # noqa: PLC0415

    img = _zstd_image(qemu, tmp_path)
    _poke_compressed(img, make(zstandard.ZstdCompressor()))
    assert _qemu_read_fails(qemu, img.path, 0, 512)
    _expect(img, match)


def test_compressed_offset_past_2_56(qemu, tmp_path: Path) -> None:
    """With 512-byte clusters a compressed descriptor can hold offsets >= 2^56."""
    img = Img(qemu, tmp_path, "-o", "cluster_size=512")
    shift, _, _ = compressed_geometry(9)
    buf = img.path.read_bytes()
    l1 = struct.unpack_from(">Q", buf, 40)[0]
    l2 = struct.unpack_from(">Q", buf, l1)[0] & ~QCOW_OFLAG_COPIED
    img.poke_u64(l2, QCOW_OFLAG_COMPRESSED | (1 << 57))
    with pytest.raises(CorruptImageError, match="2\\^56") as info, \
            Qcow2Image.open(img.path) as q:
        q.read(0, 512)
    assert info.value.field == "L2 entry 0/0"
    assert shift > 57


def test_l1_entry_with_only_copied_reads_as_unallocated(qemu, img: Img) -> None:
    """An L1 entry whose offset is 0 is unallocated in QEMU, whatever its COPIED bit."""
    img.poke_u64(img.l1_offset, QCOW_OFLAG_COPIED)
    assert _qemu_reads(qemu, img.path, 0, 3 * CS, 0)
    assert img.read_all() == bytes(1 << 20)


def test_l1_table_in_the_header_is_refused(img: Img) -> None:
    img.poke_u64(40, 0)  # l1_table_offset
    with pytest.raises(CorruptImageError) as info:
        Qcow2Image.open(img.path)
    assert info.value.field == "l1_table_offset"
    assert info.value.path == str(img.path)


def test_l2_table_at_offset_zero_with_reserved_flags(img: Img) -> None:
    img.poke_u64(img.l1_offset, QCOW_OFLAG_COPIED | (1 << 60))
    err = _expect(img, "L1 entry 0: reserved bits")
    assert err.field == "L1 entry 0"


def test_every_cluster_pointing_at_one_host_cluster_reads_in_bounded_memory(img: Img) -> None:
    """A hostile L2 table may map every guest cluster to the same host cluster: reading
    it is legal and costs nothing per cluster beyond the read itself."""
    words = struct.pack(">Q", img.data_offset | QCOW_OFLAG_COPIED) * 16
    img.poke(img.l2_offset, words)
    with Qcow2Image.open(img.path) as q:
        assert q.read(0, 16 * CS) == b"\xaa" * 16 * CS
        runs = list(q.runs(0, 16 * CS))
    assert [r.host_offset for r in runs] == [img.data_offset] * 16


# -- files that are not images -------------------------------------------------------


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(ImageIOError, match="directory") as info:
        Qcow2Image.open(tmp_path)
    assert info.value.path == str(tmp_path)
    with pytest.raises(ImageIOError, match="directory"):
        RawImage.open(tmp_path)


def test_character_device_is_not_an_image() -> None:
    with pytest.raises(ImageIOError, match="special file"):
        RawImage.open("/dev/zero")


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    """Opening a FIFO for reading blocks until a writer comes; boxdisk must not wait."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    code = ("import sys\nfrom boxdisk.image import RawImage\n"
            "from boxdisk._errors import ImageIOError\n"
            "try:\n    RawImage.open(sys.argv[1])\nexcept ImageIOError as e:\n"
            "    print(type(e).__name__, e.field)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(fifo)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.stdout.split() == ["ImageIOError", "path"], proc.stderr


# -- metadata preallocation (QEMU's heuristic for map) ------------------------------


def test_metadata_preallocation_is_detected_as_qemu_does(qemu, tmp_path: Path) -> None:
    pre = tmp_path / "pre.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", pre, "4M")
    with Qcow2Image.open(pre) as q:
        assert q.metadata_preallocation
    with Qcow2Image.open(Img(qemu, tmp_path).path) as q:
        assert not q.metadata_preallocation


# -- QEMU-made images with features boxdisk refuses ---------------------------------


def test_qemu_made_aes_image_is_refused(qemu, tmp_path: Path) -> None:
    path = tmp_path / "aes.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=abc", "-o",
             "encrypt.format=aes,encrypt.key-secret=sec0", path, "1M")
    with pytest.raises(UnsupportedFeatureError, match="encrypted"):
        Qcow2Image.open(path)


def test_qemu_made_external_data_file_is_refused(qemu, tmp_path: Path) -> None:
    path = tmp_path / "df.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data.raw'}", path,
             "1M")
    with pytest.raises(UnsupportedFeatureError, match="external data file") as info:
        Qcow2Image.open(path)
    assert info.value.field == "incompatible_features"


def test_refusals_hold_through_a_chain(qemu, tmp_path: Path) -> None:
    """A refused feature anywhere in a chain refuses the chain, naming that image."""
    base = tmp_path / "base.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data.raw'}", base,
             "1M")
    top = tmp_path / "top.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, "1M")
    with pytest.raises(UnsupportedFeatureError) as info:
        BackingChain.open(top)
    assert info.value.path == str(base)
    with open(top, "r+b") as f:  # a corrupt top is named before its base is opened
        f.seek(72)
        cur = struct.unpack(">Q", f.read(8))[0]
        f.seek(72)
        f.write(struct.pack(">Q", cur | INCOMPAT_CORRUPT))
    with pytest.raises(CorruptImageError, match="corrupt") as info2:
        BackingChain.open(top)
    assert info2.value.path == str(top)


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_refcounts_of_every_width(qemu, tmp_path: Path, bits: int) -> None:
    """Refcount blocks of every width read as QEMU wrote them (LSB first below a byte)."""
    img = Img(qemu, tmp_path, "-o", f"refcount_bits={bits}")
    if bits > 1:
        qemu.img("snapshot", "-c", "s1", img.path)
    data = img.data_offset // CS
    with Qcow2Image.open(img.path) as q:
        assert q.refcount(0) == 1
        assert q.refcount(data) == (2 if bits > 1 else 1)
        assert q.refcount(img.size // CS + 1000) == 0
    # Whether QEMU takes it for metadata-preallocated shows in its map.
    with BackingChain.open(img.path) as chain:
        assert [e.as_qemu_json() for e in chain.map()] == qemu_map(qemu, img.path)
    pre = tmp_path / "pre.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", f"preallocation=metadata,refcount_bits={bits}",
             pre, "8M")
    with Qcow2Image.open(pre) as q:
        assert q.metadata_preallocation


def test_huge_refcount_blocks_stay_bytes(qemu, tmp_path: Path) -> None:
    """2 MiB clusters of 1-bit refcounts: 16 Mi refcounts per block, never a Python list."""
    path = tmp_path / "big.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", "cluster_size=2M,refcount_bits=1", path, "64M")
    qemu.write(path, ["write -P 1 0 4M"])
    tracemalloc.start()
    try:
        with Qcow2Image.open(path) as q:
            assert not q.metadata_preallocation
            assert q.refcount(0) == 1
            _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024 * 1024, peak
