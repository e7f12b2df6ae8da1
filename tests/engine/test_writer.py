"""The qcow2 writer on QEMU-made images: refcount widths, table growth, reuse, flags, refusals.

Every image boxdisk writes must pass ``qemu-img check`` with no corruption and
no leak, and QEMU must read exactly the bytes boxdisk was asked to write.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest

from boxdisk import CorruptImageError, InvalidArgumentError, UnsupportedFeatureError
from boxdisk.chain import open_chain
from boxdisk.format import QCOW_OFLAG_COPIED, QCOW_OFLAG_ZERO
from boxdisk.image import Qcow2Image
from boxdisk.image._qcow2_write import Qcow2Writer

from ..chain.chains import Layer, build_chain
from .helpers import (
    AUTOCLEAR_FEATURES_OFFSET,
    INCOMPATIBLE_FEATURES_OFFSET,
    KIB,
    MIB,
    assert_clean,
    assert_qemu_reads,
    create,
    header_u64,
    pattern,
    poke,
    qemu_check,
)

pytestmark = pytest.mark.qemu


def _read_header(path: Path) -> Any:
    with Qcow2Image.open(path) as img:
        return img.header


def _random_ops(chain: Any, model: bytearray, rng: random.Random, count: int,
                cluster: int) -> None:
    size = len(model)
    for _ in range(count):
        off = rng.randrange(size)
        n = min(rng.randint(1, 3 * cluster), size - off)
        kind = rng.random()
        if kind < 0.6:
            data = rng.randbytes(n)
            chain.write(off, data)
            model[off : off + n] = data
        elif kind < 0.8:
            chain.write_zeroes(off, n)
            model[off : off + n] = bytes(n)
        else:
            chain.discard(off, n)
            first, last = -(-off // cluster), (off + n) // cluster
            if off + n == size:
                last = -(-size // cluster)
            for gc in range(first, last):
                model[gc * cluster : min(size, (gc + 1) * cluster)] = bytes(
                    min(size, (gc + 1) * cluster) - gc * cluster)


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_every_refcount_width(qemu: Any, tmp_path: Path, bits: int) -> None:
    top = create(qemu, tmp_path / "d.qcow2", 2 * MIB, cluster=4 * KIB,
                 options=(f"refcount_bits={bits}",))
    model = bytearray(2 * MIB)
    rng = random.Random(bits)
    for _ in range(3):  # reopen between rounds: freed clusters found again on disk
        with open_chain(top, writable=True) as chain:
            _random_ops(chain, model, rng, 60, 4 * KIB)
        assert_clean(qemu, top)
    assert_qemu_reads(qemu, top, model, tmp_path)


def test_refcount_table_grows_and_moves(qemu: Any, tmp_path: Path) -> None:
    # 512-byte clusters, 64-bit refcounts: one block counts 64 clusters, one table
    # cluster 64 blocks, so 2 MiB of file outgrows the first refcount table.
    top = create(qemu, tmp_path / "d.qcow2", 16 * MIB, cluster=512,
                 options=("refcount_bits=64",))
    before = _read_header(top)
    model = bytearray(16 * MIB)
    with open_chain(top, writable=True) as chain:
        for i in range(0, 12 * MIB, 256 * KIB):
            data = pattern(i, 256 * KIB)
            chain.write(i, data)
            model[i : i + len(data)] = data
            if i % MIB == 0:
                chain.flush()
    after = _read_header(top)
    assert after.refcount_table_offset != before.refcount_table_offset
    assert after.refcount_table_clusters > before.refcount_table_clusters
    assert_clean(qemu, top)
    assert_qemu_reads(qemu, top, model, tmp_path)


def test_l2_tables_and_refblocks_appear_as_needed(qemu: Any, tmp_path: Path) -> None:
    # Scattered single-byte writes over a big disk: a new L2 table (and, past 2 GiB of
    # file, a new refcount block) for most of them.
    top = create(qemu, tmp_path / "d.qcow2", 64 * 1024 * MIB, cluster=64 * KIB)
    rng = random.Random(7)
    written = {}
    with open_chain(top, writable=True) as chain:
        for _ in range(200):
            off = rng.randrange(64 * 1024 * MIB)
            chain.write(off, b"\x7f")
            written[off] = 0x7F
    assert_clean(qemu, top)
    cmds: list[str] = []
    for off, value in written.items():
        cmds += ["-c", f"read -P {value} {off} 1"]
    out = qemu.io("-r", "-U", "-f", "qcow2", *cmds, top).stdout
    assert "verification failed" not in out


def test_freed_clusters_are_reused(qemu: Any, tmp_path: Path) -> None:
    top = create(qemu, tmp_path / "d.qcow2", 8 * MIB, cluster=64 * KIB)
    with open_chain(top, writable=True) as chain:
        chain.write(0, pattern(1, 4 * MIB))
    full = os.path.getsize(top)
    for round_ in range(4):
        with open_chain(top, writable=True) as chain:  # reused within a session...
            chain.discard(0, 4 * MIB)
            chain.flush()
            chain.write(0, pattern(round_, 4 * MIB))
        with open_chain(top, writable=True) as chain:  # ...and across sessions
            chain.write_zeroes(0, 8 * MIB)
        with open_chain(top, writable=True) as chain:
            chain.write(4 * MIB, pattern(round_ + 9, 4 * MIB))
            chain.write_zeroes(4 * MIB, 4 * MIB)
            # Freed clusters become free only once the change that dropped them is
            # durable: after this flush, not before.
            chain.flush()
            chain.write(0, pattern(round_, 4 * MIB))
        assert_clean(qemu, top)
        assert os.path.getsize(top) <= full + 2 * 64 * KIB
    model = bytearray(pattern(3, 4 * MIB)) + bytes(4 * MIB)
    assert_qemu_reads(qemu, top, model, tmp_path)


def test_rewrite_in_place_does_not_grow(qemu: Any, tmp_path: Path) -> None:
    top = create(qemu, tmp_path / "d.qcow2", 4 * MIB, cluster=4 * KIB)
    qemu.write(top, ["write -P 0x33 0 4M"])
    size = os.path.getsize(top)
    with open_chain(top, writable=True) as chain:
        for i in range(20):
            chain.write(i * 100_000, pattern(i, 70_000))
    assert os.path.getsize(top) == size
    assert_clean(qemu, top)


def _l2_entry_offset(path: Path, guest_cluster: int) -> tuple[int, int]:
    """(file offset of the L1 entry, file offset of the L2 entry) of a guest cluster."""
    with Qcow2Image.open(path) as img:
        per = img.cluster_size // 8
        l1_index, l2_index = divmod(guest_cluster, per)
        return (img.header.l1_table_offset + 8 * l1_index,
                img.l2_offset(l1_index) + 8 * l2_index)


def test_missing_copied_flags_are_set_on_write(qemu: Any, tmp_path: Path) -> None:
    top = create(qemu, tmp_path / "d.qcow2", 2 * MIB, cluster=64 * KIB)
    qemu.write(top, ["write -P 0x44 0 2M"])
    l1_at, l2_at = _l2_entry_offset(top, 5)
    for at in (l1_at, l2_at):
        raw = header_u64(top, at)
        assert raw & QCOW_OFLAG_COPIED
        poke(top, at, (raw & ~QCOW_OFLAG_COPIED).to_bytes(8, "big"))
    assert qemu_check(qemu, top)["corruptions"] == 2  # QEMU calls both errors
    with open_chain(top, writable=True) as chain:
        chain.write(5 * 64 * KIB + 10, b"boxdisk")
    assert header_u64(top, l1_at) & QCOW_OFLAG_COPIED
    assert header_u64(top, l2_at) & QCOW_OFLAG_COPIED
    assert_clean(qemu, top)
    model = bytearray(b"\x44" * 2 * MIB)
    model[5 * 64 * KIB + 10 : 5 * 64 * KIB + 17] = b"boxdisk"
    assert_qemu_reads(qemu, top, model, tmp_path)


def test_compressed_clusters_copy_up_and_free(qemu: Any, tmp_path: Path) -> None:
    rng = random.Random(5)
    ops = tuple(f"write -P {rng.randrange(1, 255)} {i * 64 * KIB} {64 * KIB}"
                for i in range(16))
    top = build_chain(qemu, tmp_path, [Layer(size=MIB, ops=ops, compress="zlib")])
    model = bytearray(qemu.read_raw(top, tmp_path))
    with open_chain(top, writable=True) as chain:
        chain.write(3 * 64 * KIB + 1000, b"partial")  # copy-up of an inflated cluster
        model[3 * 64 * KIB + 1000 : 3 * 64 * KIB + 1007] = b"partial"
        chain.write(4 * 64 * KIB, pattern(4, 64 * KIB))  # whole cluster: no inflate
        model[4 * 64 * KIB : 5 * 64 * KIB] = pattern(4, 64 * KIB)
        chain.discard(5 * 64 * KIB, 64 * KIB)
        model[5 * 64 * KIB : 6 * 64 * KIB] = bytes(64 * KIB)
        chain.write_zeroes(6 * 64 * KIB, 2 * 64 * KIB)
        model[6 * 64 * KIB : 8 * 64 * KIB] = bytes(2 * 64 * KIB)
        assert chain.read(0, MIB) == model
    assert_clean(qemu, top)
    assert_qemu_reads(qemu, top, model, tmp_path)


def test_preallocated_zero_clusters_take_the_data(qemu: Any, tmp_path: Path) -> None:
    top = create(qemu, tmp_path / "d.qcow2", 2 * MIB, cluster=64 * KIB)
    qemu.write(top, ["write -P 0x11 0 2M", "write -z 0 1M"])  # zero flag, cluster kept
    mapped = json.loads(qemu.img("map", "--output=json", top).stdout)
    assert mapped[0]["zero"] and "offset" in mapped[0]
    size = os.path.getsize(top)
    model = bytearray(MIB) + b"\x11" * MIB
    with open_chain(top, writable=True) as chain:
        chain.write(100, b"into a preallocated zero cluster")
        model[100:132] = b"into a preallocated zero cluster"
        chain.write(2 * 64 * KIB, pattern(2, 64 * KIB))
        model[2 * 64 * KIB : 3 * 64 * KIB] = pattern(2, 64 * KIB)
    assert os.path.getsize(top) == size
    assert_clean(qemu, top)
    assert_qemu_reads(qemu, top, model, tmp_path)


def test_map_matches_qemu_after_writes(qemu: Any, tmp_path: Path) -> None:
    base = create(qemu, tmp_path / "base.qcow2", 4 * MIB, cluster=4 * KIB)
    qemu.write(base, ["write -P 0x61 0 3M"])
    top = create(qemu, tmp_path / "top.qcow2", 4 * MIB, cluster=4 * KIB, backing=base)
    model = bytearray(b"\x61" * 3 * MIB + bytes(MIB))
    with open_chain(top, writable=True) as chain:
        _random_ops(chain, model, random.Random(11), 80, 4 * KIB)
        chain.flush()
        mine = [e.as_qemu_json() for e in chain.map()]
    theirs = json.loads(qemu.img("map", "--output=json", top).stdout)
    assert mine == theirs
    assert_clean(qemu, top)
    assert_qemu_reads(qemu, top, model, tmp_path)


def test_v2_zero_writes(qemu: Any, tmp_path: Path) -> None:
    # v2 has no zero flag: with a backing file the zeros are written as data; without
    # one an unmapped cluster reads as zeros, so whole clusters are deallocated.
    base = create(qemu, tmp_path / "base.qcow2", MIB, cluster=64 * KIB, compat="0.10")
    qemu.write(base, ["write -P 0x77 0 1M"])
    child = create(qemu, tmp_path / "child.qcow2", MIB, cluster=64 * KIB, backing=base,
                   compat="0.10")
    with open_chain(child, writable=True) as chain:
        chain.write_zeroes(64 * KIB, 256 * KIB)
    assert_clean(qemu, child)
    model = bytearray(b"\x77" * MIB)
    model[64 * KIB : 320 * KIB] = bytes(256 * KIB)
    assert_qemu_reads(qemu, child, model, tmp_path)

    alone = create(qemu, tmp_path / "alone.qcow2", MIB, cluster=64 * KIB, compat="0.10")
    qemu.write(alone, ["write -P 0x78 0 1M"])
    with open_chain(alone, writable=True) as chain:
        chain.write_zeroes(0, 512 * KIB)
    assert_clean(qemu, alone)
    allocated = json.loads(qemu.img("map", "--output=json", alone).stdout)
    assert {"start": 0, "length": 512 * KIB, "depth": 0, "present": False,
            "zero": True, "data": False} in allocated
    assert_qemu_reads(qemu, alone, bytes(512 * KIB) + b"\x78" * 512 * KIB, tmp_path)


def test_lazy_refcounts_image_written_cleanly(qemu: Any, tmp_path: Path) -> None:
    top = create(qemu, tmp_path / "d.qcow2", MIB, cluster=4 * KIB,
                 options=("lazy_refcounts=on",))
    with open_chain(top, writable=True) as chain:
        chain.write(5000, b"x" * 9000)
    assert_clean(qemu, top)


def test_unknown_autoclear_bits_are_cleared_before_writing(qemu: Any, tmp_path: Path) -> None:
    top = create(qemu, tmp_path / "d.qcow2", MIB, cluster=4 * KIB)
    poke(top, AUTOCLEAR_FEATURES_OFFSET, (1 << 5).to_bytes(8, "big"))
    with open_chain(top, writable=True) as chain:
        assert header_u64(top, AUTOCLEAR_FEATURES_OFFSET) == 0
        chain.write(0, b"after clearing")
    assert_clean(qemu, top)


@pytest.mark.parametrize(("bit", "error"), [(1 << 1, CorruptImageError),
                                            (1 << 0, CorruptImageError)])
def test_corrupt_or_dirty_images_are_refused(qemu: Any, tmp_path: Path, bit: int,
                                             error: type[Exception]) -> None:
    top = create(qemu, tmp_path / "d.qcow2", MIB, cluster=4 * KIB)
    poke(top, INCOMPATIBLE_FEATURES_OFFSET, bit.to_bytes(8, "big"))
    before = top.read_bytes()
    with pytest.raises(error) as exc:
        open_chain(top, writable=True).close()
    assert exc.value.path == str(top) and exc.value.field == "incompatible_features"
    assert top.read_bytes() == before


def test_unsupported_images_are_refused(qemu: Any, tmp_path: Path) -> None:
    snap = create(qemu, tmp_path / "snap.qcow2", MIB, cluster=4 * KIB)
    qemu.img("snapshot", "-c", "s1", snap)
    bitmap = create(qemu, tmp_path / "bitmap.qcow2", MIB, cluster=4 * KIB)
    qemu.img("bitmap", "--add", bitmap, "b0")
    extl2 = create(qemu, tmp_path / "extl2.qcow2", MIB, cluster=64 * KIB,
                   options=("extended_l2=on",))
    datafile = create(qemu, tmp_path / "datafile.qcow2", MIB,
                      options=(f"data_file={tmp_path / 'data.raw'}",))
    for path, field in [(snap, "nb_snapshots"), (bitmap, "extensions"),
                        (extl2, "incompatible_features"), (datafile, "incompatible_features")]:
        before = path.read_bytes()
        with pytest.raises(UnsupportedFeatureError) as exc:
            Qcow2Writer(path).close()
        assert exc.value.path == str(path), path
        assert exc.value.field == field, path
        assert path.read_bytes() == before


def test_entry_pointing_into_metadata_is_never_written(qemu: Any, tmp_path: Path) -> None:
    top = create(qemu, tmp_path / "d.qcow2", MIB, cluster=4 * KIB)
    qemu.write(top, ["write -P 0x21 0 64k"])
    hdr = _read_header(top)
    _, l2_at = _l2_entry_offset(top, 3)
    poke(top, l2_at, (hdr.l1_table_offset | QCOW_OFLAG_COPIED).to_bytes(8, "big"))
    before = top.read_bytes()
    with open_chain(top, writable=True) as chain:
        with pytest.raises(CorruptImageError) as exc:
            chain.write(3 * 4 * KIB, b"must not land in the L1 table")
        assert "overlaps metadata" in str(exc.value)
        assert exc.value.field == "L2 entry 0/3"
    assert top.read_bytes() == before


def test_zero_flag_entries_read_and_written(qemu: Any, tmp_path: Path) -> None:
    top = create(qemu, tmp_path / "d.qcow2", MIB, cluster=4 * KIB)
    with open_chain(top, writable=True) as chain:
        chain.write(0, b"\x01" * 64 * KIB)
        chain.write_zeroes(4 * KIB, 8 * KIB)
    _, l2_at = _l2_entry_offset(top, 1)
    assert header_u64(top, l2_at) == QCOW_OFLAG_ZERO  # plain zero cluster, host freed
    assert_clean(qemu, top)


def test_write_range_and_state_errors(qemu: Any, tmp_path: Path) -> None:
    top = create(qemu, tmp_path / "d.qcow2", MIB, cluster=4 * KIB)
    with open_chain(top) as chain, pytest.raises(InvalidArgumentError):
        chain.write(0, b"read-only chain")
    chain = open_chain(top, writable=True)
    with pytest.raises(InvalidArgumentError):
        chain.write(MIB - 1, b"ab")
    with pytest.raises(InvalidArgumentError):
        chain.write_zeroes(-1, 10)
    with pytest.raises(InvalidArgumentError):
        chain.discard(0, MIB + 1)
    chain.close()
    chain.close()  # idempotent
    with pytest.raises(InvalidArgumentError):
        chain.write(0, b"closed")
    assert_clean(qemu, top)


def test_raw_top_is_writable(qemu: Any, tmp_path: Path) -> None:
    raw = tmp_path / "d.raw"
    raw.write_bytes(b"\x09" * MIB)
    with open_chain(raw, format="raw", writable=True) as chain:
        chain.write(10, b"raw write")
        chain.write_zeroes(4096, 4096)
        chain.discard(0, MIB)  # advisory: the bytes stay
        assert chain.read(0, 19) == b"\x09" * 10 + b"raw write"
    data = raw.read_bytes()
    assert data[10:19] == b"raw write" and data[4096:8192] == bytes(4096)
    assert data[8192:] == b"\x09" * (MIB - 8192)


def test_writes_visible_to_the_chain_before_flush(qemu: Any, tmp_path: Path) -> None:
    base = create(qemu, tmp_path / "base.qcow2", MIB, cluster=4 * KIB)
    qemu.write(base, ["write -P 0x42 0 1M"])
    top = create(qemu, tmp_path / "top.qcow2", 2 * MIB, cluster=4 * KIB, backing=base)
    with open_chain(top, writable=True) as chain:
        chain.write(MIB - 2, b"abcd")  # straddles the end of the backing file
        assert chain.read(MIB - 6, 10) == b"\x42\x42\x42\x42abcd\x00\x00"
        assert [(d, r.kind.name) for d, r in chain.runs(MIB - 4096, 8192)] == [
            (0, "DATA")]
    model = bytearray(b"\x42" * MIB + bytes(MIB))
    model[MIB - 2 : MIB + 2] = b"abcd"
    assert_clean(qemu, top)
    assert_qemu_reads(qemu, top, model, tmp_path)
