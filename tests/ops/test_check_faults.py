"""check on images broken by editing bytes: classification and counts equal qemu-img's,
and repair="all" leaves an image both boxdisk and qemu-img call clean.

Each fault edits one QEMU-made image. The contract, per fault:

* boxdisk's report prints what ``qemu-img check --output=json`` prints, with
  the same exit code (2 for corruptions, 3 for leaks only, 1 for check errors);
* after boxdisk's repair, boxdisk and qemu-img agree again, and (for every
  fault but the L1 table on the header, which no repair can undo) both say
  clean;
* the guest-visible content is what QEMU's own ``qemu-img check -r all`` of a
  copy leaves (``qemu-img compare``), where QEMU can read that copy, and the
  original content where the fault only touched refcounts.

The kill tests stop a repair at every write (``os._exit`` in a forked child)
and check that what is left is never worse than the start.
"""

from __future__ import annotations

import os
import shutil
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest

from boxdisk import check
from boxdisk.ops import FindingKind
from boxdisk.ops import _check as check_module

from .test_check import KIB, Layout, assert_same_as_qemu, make_image, qemu_check

pytestmark = pytest.mark.qemu

_COPIED = 1 << 63
_COMPRESSED = 1 << 62
_OFFSET = 0x00FF_FFFF_FFFF_FE00
_FAR = 1 << 40  # a host offset far past the end of any test image

Edit = Callable[[Layout], None]


@attrs.define(frozen=True)
class Fault:
    """One way to break an image, and what repairing it must give."""

    id: str
    edit: Edit
    #: After boxdisk's repair="all": no corruptions, leaks or check errors.
    clean_after: bool = True
    #: The guest content after repair equals the image before the fault.
    same_as_original: bool = True
    #: QEMU's own repair leaves a copy it can read the same way (compare with it).
    qemu_readable: bool = True
    #: A second repair finds nothing more to do.
    converges: bool = True
    cluster_sizes: tuple[int, ...] = (512, 4 * KIB, 64 * KIB)
    options: tuple[str, ...] = ()
    ops: tuple[str, ...] = ("write -P 1 0 256k", "write -P 2 1M 64k", "write -c -P 3 2M 64k")
    kinds: frozenset[FindingKind] = frozenset()


def _first_data(lay: Layout) -> int:
    return lay.data_entries()[0]


def _zero_refcount(lay: Layout) -> None:
    lay.set_refcount((lay.l2_entry(_first_data(lay)) & _OFFSET) // lay.cs, 0)


def _refcount_two(lay: Layout) -> None:
    lay.set_refcount((lay.l2_entry(_first_data(lay)) & _OFFSET) // lay.cs, 2)


def _unreferenced_counted(lay: Layout) -> None:
    end = -(-lay.file_size // lay.cs)  # compressed data may end inside the last cluster
    with open(lay.path, "r+b") as f:
        f.truncate((end + 1) * lay.cs)
    lay.set_refcount(end, 1)


def _l2_entry_past_end(lay: Layout) -> None:
    lay.put(lay.l2_entry_offset(_first_data(lay)), _COPIED | _FAR)


def _l1_entry_past_end(lay: Layout) -> None:
    lay.put(lay.l1_entry_offset(0), _COPIED | _FAR)


def _l2_on_refcount_table(lay: Layout) -> None:
    lay.put(lay.l1_entry_offset(0), _COPIED | lay.rt_offset)


def _l2_on_refcount_block(lay: Layout) -> None:
    lay.put(lay.l1_entry_offset(0), _COPIED | lay.refblock(0))


def _l1_on_header(lay: Layout) -> None:
    lay.put(40, 0)


def _l2_on_header(lay: Layout) -> None:
    lay.put(lay.l1_entry_offset(0), _COPIED)


def _data_on_l2_table(lay: Layout) -> None:
    lay.put(lay.l2_entry_offset(_first_data(lay)), _COPIED | lay.l2_table())


def _data_on_l1_table(lay: Layout) -> None:
    lay.put(lay.l2_entry_offset(_first_data(lay)), _COPIED | lay.l1_offset)


def _data_misaligned(lay: Layout) -> None:
    i = _first_data(lay)
    lay.put(lay.l2_entry_offset(i), lay.l2_entry(i) + 512)


def _zero_cluster_misaligned(lay: Layout) -> None:
    i = _first_data(lay)
    lay.put(lay.l2_entry_offset(i), (lay.l2_entry(i) + 512) | 1)


def _l2_table_misaligned(lay: Layout) -> None:
    lay.put(lay.l1_entry_offset(0), lay.u64(lay.l1_entry_offset(0)) + 512)


def _refblock_misaligned(lay: Layout) -> None:
    lay.put(lay.rt_offset, lay.refblock(0) + 512)


def _near_past_end(lay: Layout) -> int:
    # Near: QEMU's repair grows the file to reach the block, which must stay small.
    return (-(-lay.file_size // lay.cs) + 16) * lay.cs


def _refblock_past_end(lay: Layout) -> None:
    lay.put(lay.rt_offset, _near_past_end(lay))


#: QEMU's BDRV_MAX_LENGTH: a read that would end past it fails (EIO) before the file.
_MAX_LENGTH = (1 << 63) - (1 << 30)


def _refblock_at_last_readable(lay: Layout) -> None:
    # Ends exactly at QEMU's limit: read (as zeros, past the end of the file).
    lay.put(lay.rt_offset, _MAX_LENGTH - lay.cs)


def _refblock_unreadable(lay: Layout) -> None:
    # One cluster further: every refcount it holds is an I/O error to QEMU (found by
    # the slow property test with 0x7fffffffffffc000 in a 16 KiB-cluster image).
    lay.put(lay.rt_offset, _MAX_LENGTH)


def _unused_refblock_past_end(lay: Layout) -> None:
    lay.put(lay.rt_offset + 8, _near_past_end(lay))


def _copied_cleared_l2(lay: Layout) -> None:
    i = _first_data(lay)
    lay.put(lay.l2_entry_offset(i), lay.l2_entry(i) & ~_COPIED)


def _copied_cleared_l1(lay: Layout) -> None:
    lay.put(lay.l1_entry_offset(0), lay.u64(lay.l1_entry_offset(0)) & ~_COPIED)


def _compressed_entry(lay: Layout) -> tuple[int, int]:
    """(L1 index, L2 index) of the first compressed cluster."""
    step = 16 if lay.extended else 8
    for l1_index in range(lay.l1_size):
        if not lay.u64(lay.l1_entry_offset(l1_index)):
            continue
        for i in range(lay.cs // step):
            if lay.l2_entry(i, l1_index) & _COMPRESSED:
                return l1_index, i
    raise AssertionError("no compressed cluster")


def _copied_on_compressed(lay: Layout) -> None:
    l1_index, i = _compressed_entry(lay)
    lay.put(lay.l2_entry_offset(i, l1_index), lay.l2_entry(i, l1_index) | _COPIED)


def _l2_reserved_bits(lay: Layout) -> None:
    i = _first_data(lay)
    lay.put(lay.l2_entry_offset(i), lay.l2_entry(i) | (1 << 57))


def _l1_reserved_bits(lay: Layout) -> None:
    lay.put(lay.l1_entry_offset(0), lay.u64(lay.l1_entry_offset(0)) | (1 << 60) | 2)


def _reftable_reserved_bits(lay: Layout) -> None:
    lay.put(lay.rt_offset, lay.u64(lay.rt_offset) | 1)


def _two_l1_entries_one_l2(lay: Layout) -> None:
    lay.put(lay.l1_entry_offset(1), lay.u64(lay.l1_entry_offset(0)))


def _bitmap_alloc_and_zero(lay: Layout) -> None:
    i = _first_data(lay)
    bitmap = lay.u64(lay.l2_entry_offset(i) + 8)
    lay.put(lay.l2_entry_offset(i) + 8, bitmap | (1 << 32))


def _bitmap_without_cluster(lay: Layout) -> None:
    step = 16
    for i in range(lay.cs // step):
        if not lay.l2_entry(i) and not lay.u64(lay.l2_entry_offset(i) + 8):
            lay.put(lay.l2_entry_offset(i) + 8, 0b101)
            return
    raise AssertionError("no unallocated entry")


def _bitmap_on_compressed(lay: Layout) -> None:
    l1_index, i = _compressed_entry(lay)
    lay.put(lay.l2_entry_offset(i, l1_index) + 8, 1 << 40)


_EXT = ("extended_l2=on",)
_EXT_SIZES = (16 * KIB, 64 * KIB)
_REFS = frozenset({FindingKind.REFCOUNT_TOO_LOW})

FAULTS = [
    Fault("zeroed-refcount", _zero_refcount, kinds=_REFS | {FindingKind.COPIED_FLAG}),
    Fault("refcount-two", _refcount_two, kinds=frozenset({FindingKind.LEAK})),
    Fault("leaked-cluster", _unreferenced_counted, kinds=frozenset({FindingKind.LEAK})),
    Fault("l2-entry-past-end", _l2_entry_past_end, same_as_original=False,
          kinds=frozenset({FindingKind.PAST_END, FindingKind.LEAK})),
    Fault("l1-entry-past-end", _l1_entry_past_end, same_as_original=False,
          kinds=frozenset({FindingKind.PAST_END, FindingKind.LEAK})),
    Fault("l2-on-refcount-table", _l2_on_refcount_table, same_as_original=False,
          kinds=frozenset({FindingKind.OVERLAPPING_METADATA})),
    Fault("l2-on-refcount-block", _l2_on_refcount_block, same_as_original=False,
          kinds=frozenset({FindingKind.REFCOUNT_BLOCK_SHARED})),
    # The header read as an L1 table: any repair that rewrites the header (as both
    # QEMU's and boxdisk's do, differently) changes what the guest sees through it.
    # Nor does a repair of it ever finish: rewriting the header rewrites the "L1 table".
    Fault("l1-on-header", _l1_on_header, clean_after=False, same_as_original=False,
          qemu_readable=False, converges=False,
          kinds=frozenset({FindingKind.OVERLAPPING_METADATA, FindingKind.RESERVED_BITS})),
    Fault("l2-on-header", _l2_on_header, same_as_original=False,
          kinds=frozenset({FindingKind.OVERLAPPING_METADATA})),
    Fault("data-on-l2-table", _data_on_l2_table, same_as_original=False,
          kinds=frozenset({FindingKind.OVERLAPPING_METADATA})),
    Fault("data-on-l1-table", _data_on_l1_table, same_as_original=False,
          kinds=frozenset({FindingKind.OVERLAPPING_METADATA})),
    Fault("data-misaligned", _data_misaligned, same_as_original=False, qemu_readable=False,
          cluster_sizes=(4 * KIB, 64 * KIB), kinds=frozenset({FindingKind.MISALIGNED})),
    Fault("zero-cluster-misaligned", _zero_cluster_misaligned, same_as_original=False,
          cluster_sizes=(4 * KIB, 64 * KIB), kinds=frozenset({FindingKind.MISALIGNED})),
    Fault("l2-table-misaligned", _l2_table_misaligned, same_as_original=False,
          qemu_readable=False, cluster_sizes=(4 * KIB, 64 * KIB),
          kinds=frozenset({FindingKind.MISALIGNED})),
    Fault("refblock-misaligned", _refblock_misaligned, qemu_readable=False,
          cluster_sizes=(4 * KIB, 64 * KIB),
          kinds=frozenset({FindingKind.MISALIGNED, FindingKind.REFCOUNT_UNREADABLE})),
    Fault("refblock-past-end", _refblock_past_end,
          kinds=frozenset({FindingKind.REFCOUNT_BLOCK_PAST_END})),
    Fault("refblock-at-last-readable-offset", _refblock_at_last_readable,
          kinds=frozenset({FindingKind.REFCOUNT_BLOCK_PAST_END})),
    Fault("refblock-unreadable", _refblock_unreadable,
          kinds=frozenset({FindingKind.REFCOUNT_BLOCK_PAST_END,
                           FindingKind.REFCOUNT_UNREADABLE})),
    Fault("unused-refblock-past-end", _unused_refblock_past_end,
          kinds=frozenset({FindingKind.REFCOUNT_BLOCK_PAST_END})),
    Fault("copied-cleared-l2", _copied_cleared_l2,
          kinds=frozenset({FindingKind.COPIED_FLAG})),
    Fault("copied-cleared-l1", _copied_cleared_l1,
          kinds=frozenset({FindingKind.COPIED_FLAG})),
    Fault("copied-on-compressed", _copied_on_compressed,
          kinds=frozenset({FindingKind.BAD_COMPRESSED_ENTRY})),
    Fault("l2-reserved-bits", _l2_reserved_bits, kinds=frozenset({FindingKind.RESERVED_BITS})),
    Fault("l1-reserved-bits", _l1_reserved_bits, kinds=frozenset({FindingKind.RESERVED_BITS})),
    Fault("reftable-reserved-bits", _reftable_reserved_bits, qemu_readable=False,
          kinds=frozenset({FindingKind.RESERVED_BITS, FindingKind.LEAK})),
    Fault("two-l1-entries-one-l2", _two_l1_entries_one_l2, same_as_original=False,
          cluster_sizes=(512, 4 * KIB),
          ops=("write -P 1 0 8k", "write -P 2 64k 4k"),
          kinds=frozenset({FindingKind.OVERLAPPING_METADATA})),
    Fault("bitmap-allocated-and-zero", _bitmap_alloc_and_zero, same_as_original=False,
          qemu_readable=False, cluster_sizes=_EXT_SIZES, options=_EXT,
          kinds=frozenset({FindingKind.BAD_SUBCLUSTER_BITMAP})),
    Fault("bitmap-without-cluster", _bitmap_without_cluster, same_as_original=False,
          qemu_readable=False, cluster_sizes=_EXT_SIZES, options=_EXT,
          kinds=frozenset({FindingKind.BAD_SUBCLUSTER_BITMAP})),
    # QEMU's repair frees the cluster such an entry points to (it does not count it),
    # so its copy reads an I/O error; boxdisk drops the bitmap and keeps the data.
    Fault("bitmap-on-compressed", _bitmap_on_compressed, qemu_readable=False,
          cluster_sizes=_EXT_SIZES, options=_EXT,
          kinds=frozenset({FindingKind.BAD_COMPRESSED_ENTRY})),
    Fault("extended-l2-zeroed-refcount", _zero_refcount, cluster_sizes=_EXT_SIZES,
          options=_EXT, kinds=_REFS),
]


def _cases() -> list[Any]:
    return [pytest.param(fault, cs, id=f"{fault.id}-{cs}")
            for fault in FAULTS for cs in fault.cluster_sizes]


def _broken(qemu: Any, tmp: Path, fault: Fault, cs: int) -> tuple[Path, Path]:
    original = make_image(qemu, tmp / "original.qcow2", cluster=cs, options=fault.options,
                          ops=fault.ops)
    broken = tmp / "broken.qcow2"
    shutil.copy(original, broken)
    fault.edit(Layout(broken))
    return original, broken


@pytest.mark.parametrize(("fault", "cs"), _cases())
def test_fault_is_classified_as_qemu_does_and_repaired(qemu, tmp_path, fault, cs):
    original, broken = _broken(qemu, tmp_path, fault, cs)
    before = assert_same_as_qemu(qemu, broken)
    assert not before.clean
    kinds = {f.kind for f in before.findings}
    assert fault.kinds <= kinds, [str(f) for f in before.findings]
    assert sum(f.count for f in before.findings if f.kind.counts_as == "corruptions") \
        == before.corruptions
    assert sum(f.count for f in before.findings if f.kind.counts_as == "leaks") == before.leaks
    assert sum(f.count for f in before.findings
               if f.kind.counts_as == "check_errors") == before.check_errors

    qemu_copy = tmp_path / "qemu.qcow2"
    shutil.copy(broken, qemu_copy)
    qemu.img("check", "-r", "all", qemu_copy, check=False)

    report = check(broken, repair="all")
    after = assert_same_as_qemu(qemu, broken)
    assert (report.corruptions, report.leaks, report.check_errors) == \
        (after.corruptions, after.leaks, after.check_errors)
    assert report.corruptions_fixed + report.leaks_fixed > 0
    if fault.clean_after:
        assert after.clean, [str(f) for f in after.findings]
    else:
        # What no repair can undo stays, and no more of it than QEMU's repair leaves.
        _, data = qemu_check(qemu, qemu_copy)
        assert data is not None
        assert 0 < after.corruptions <= data.get("corruptions", 0)
    if after.clean:
        assert not after.dirty and not after.corrupt
    if fault.same_as_original:
        proc = qemu.img("compare", original, broken, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    if fault.qemu_readable:
        proc = qemu.img("compare", qemu_copy, broken, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    else:
        qemu.read_raw(broken, tmp_path)  # boxdisk's repaired image reads back whole

    if fault.converges:
        again = check(broken, repair="all")
        assert again.corruptions_fixed == again.leaks_fixed == 0


@pytest.mark.parametrize("fault", ["refcount-two", "leaked-cluster", "copied-cleared-l2",
                                   "copied-cleared-l1", "zeroed-refcount"])
def test_fixed_counts_equal_qemu(qemu, tmp_path, fault):
    spec = next(f for f in FAULTS if f.id == fault)
    _, broken = _broken(qemu, tmp_path, spec, 64 * KIB)
    qemu_copy = tmp_path / "qemu.qcow2"
    shutil.copy(broken, qemu_copy)
    rc, data = qemu_check(qemu, qemu_copy, "-r", "all")
    report = check(broken, repair="all")
    assert data is not None
    assert report.as_qemu_json() == {**data, "filename": str(broken)}
    assert report.exit_code == rc


@pytest.mark.parametrize("fault", ["refcount-two", "leaked-cluster", "zeroed-refcount",
                                   "l2-entry-past-end"])
def test_repair_leaks_as_qemu(qemu, tmp_path, fault):
    spec = next(f for f in FAULTS if f.id == fault)
    _, broken = _broken(qemu, tmp_path, spec, 64 * KIB)
    qemu_copy = tmp_path / "qemu.qcow2"
    shutil.copy(broken, qemu_copy)
    rc, data = qemu_check(qemu, qemu_copy, "-r", "leaks")
    report = check(broken, repair="leaks")
    if data is None:
        # QEMU gives up ("need to rebuild refcount structures"); boxdisk says so.
        assert rc == 1
        assert report.findings[-1].kind is FindingKind.REBUILD_NEEDED
        assert report.check_errors == check(broken).check_errors + 1
    else:
        assert report.as_qemu_json() == {**data, "filename": str(broken)}
    assert_same_as_qemu(qemu, broken)


def test_findings_name_the_entry(qemu, tmp_path):
    _, broken = _broken(qemu, tmp_path, FAULTS[3], 64 * KIB)  # L2 entry past the end
    report = check(broken)
    past = [f for f in report.findings if f.kind is FindingKind.PAST_END]
    assert len(past) == 1
    f = past[0]
    assert (f.table, f.l1_index, f.index, f.offset) == ("L2 table", 0, 0, _FAR)
    assert f.raw == _COPIED | _FAR
    assert "past the end" in str(f)
    (tmp_path / "x").mkdir()
    _, broken = _broken(qemu, tmp_path / "x", FAULTS[5], 64 * KIB)  # L2 on the refcount table
    report = check(broken)
    overlap = [f for f in report.findings if f.kind is FindingKind.OVERLAPPING_METADATA]
    assert overlap and "refcount table" in overlap[0].referenced_by
    assert any(name.startswith("L2 table") for name in overlap[0].referenced_by)


def test_snapshot_refcount_fault(qemu, tmp_path):
    path = make_image(qemu, tmp_path / "snap.qcow2", ops=("write -P 5 0 1M",))
    qemu.img("snapshot", "-c", "s1", path)
    qemu.write(path, ["write -P 6 512k 64k"])
    original = tmp_path / "original.qcow2"
    shutil.copy(path, original)
    lay = Layout(path)
    shared = lay.l2_entry(0) & _OFFSET  # still shared with the snapshot: refcount 2
    lay.set_refcount(shared // lay.cs, 1)
    before = assert_same_as_qemu(qemu, path)
    assert before.corruptions
    report = check(path, repair="all")
    assert report.clean, [str(f) for f in report.findings]
    assert assert_same_as_qemu(qemu, path).clean
    assert qemu.img("compare", original, path, check=False).returncode == 0
    proc = qemu.img("snapshot", "-l", path)
    assert "s1" in proc.stdout


# -- killed repairs ---------------------------------------------------------------------


def _repair_killed_after(path: Path, writes: int) -> int:
    """Run check(path, repair="all") in a child that dies before write number ``writes``."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        code = 0
        try:
            done = [0]
            real = check_module._Repair._pwrite

            def pwrite(self: Any, data: bytes, offset: int) -> None:
                if done[0] == writes:
                    os._exit(9)
                done[0] += 1
                real(self, data, offset)

            check_module._Repair._pwrite = pwrite  # type: ignore[method-assign]
            check(path, repair="all")
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _dangerous(report: Any) -> tuple[set[int], set[int]]:
    """Clusters whose refcount is too low; clusters with OFLAG_COPIED but refcount != 1."""
    low = {f.cluster for f in report.findings
           if f.kind in (FindingKind.REFCOUNT_TOO_LOW, FindingKind.OVERLAPPING_METADATA)}
    copied = {f.cluster for f in report.findings
              if f.kind is FindingKind.COPIED_FLAG and f.raw is not None
              and f.raw & _COPIED and f.cluster is not None}
    return low, copied


@pytest.mark.parametrize("fault", ["zeroed-refcount", "refcount-two", "refblock-past-end",
                                   "copied-cleared-l2", "l2-entry-past-end"])
def test_repair_killed_at_every_write_never_makes_things_worse(qemu, tmp_path, fault):
    spec = next(f for f in FAULTS if f.id == fault)
    original, broken = _broken(qemu, tmp_path, spec, 4 * KIB)
    low0, copied0 = _dangerous(check(broken))
    writes = 0
    while True:
        victim = tmp_path / f"kill{writes}.qcow2"
        shutil.copy(broken, victim)
        code = _repair_killed_after(victim, writes)
        assert code in (0, 9)
        after = assert_same_as_qemu(qemu, victim)
        low, copied = _dangerous(after)
        assert low <= low0 and copied <= copied0
        if spec.same_as_original:
            assert qemu.img("compare", original, victim, check=False).returncode == 0
        finished = check(victim, repair="all")
        assert finished.clean
        victim.unlink()
        if code == 0:
            break
        writes += 1
    assert writes > 0


def test_large_sparse_file_is_bounded(qemu, tmp_path):
    path = make_image(qemu, tmp_path / "img.qcow2", ops=("write -P 1 0 64k",))
    with open(path, "r+b") as f:
        f.truncate(64 << 30)  # a 64 GiB hole: 1 Mi clusters, nothing in them
    report = assert_same_as_qemu(qemu, path)
    assert report.clean


def _misaligned_l2_tables(qemu: Any, path: Path, *, data: str, size: int,
                          pattern: int = 1) -> Path:
    """L1 entries each naming a different misaligned "L2 table" inside the file."""
    make_image(qemu, path, size=size, cluster=4 * KIB,
               ops=(f"write -P {pattern} 0 {data}",))
    lay = Layout(path)
    positions = lay.file_size // 1024 - 8  # odd multiples of 512 inside the file
    entries = b"".join((((i % positions) * 2 + 1) * 512 | _COPIED).to_bytes(8, "big")
                       for i in range(lay.l1_size))
    with open(path, "r+b") as f:
        f.seek(lay.l1_offset)
        f.write(entries)
    return path


def test_l1_entries_naming_misaligned_tables(qemu, tmp_path):
    path = _misaligned_l2_tables(qemu, tmp_path / "img.qcow2", data="256k", size=1 << 30)
    report = assert_same_as_qemu(qemu, path)
    assert FindingKind.MISALIGNED in {f.kind for f in report.findings}


def test_misaligned_tables_past_the_read_budget(qemu, tmp_path):
    # QEMU walks every one of 8192 different tables (32 MiB of them); boxdisk stops
    # once it has read as much as the file plus 16 MiB: tables cannot make check slow.
    path = _misaligned_l2_tables(qemu, tmp_path / "img.qcow2", data="8M", size=16 << 30,
                                 pattern=0)
    with pytest.raises(check_module.CorruptImageError) as err:
        check(path)
    assert err.value.path == str(path) and err.value.field == "tables"


@pytest.mark.parametrize("hole", [128 << 30, 300 << 30])
def test_huge_sparse_file_is_refused_without_allocating(qemu, tmp_path, hole):
    path = make_image(qemu, tmp_path / "img.qcow2", cluster=512, ops=("write -P 1 0 4k",))
    with open(path, "r+b") as f:
        f.truncate(hole)  # 256-600 Mi clusters of 512 bytes: 1-2.4 GiB of refcount arrays
    tracemalloc.start()
    try:
        with pytest.raises(check_module.UnsupportedFeatureError) as err:
            check(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.value.path == str(path) and err.value.field == "file size"
    assert peak < 16 << 20
