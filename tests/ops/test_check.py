"""check: boxdisk's report equals ``qemu-img check --output=json`` on QEMU-made images.

Clean images of every geometry QEMU makes (cluster sizes 512 B to 2 MiB, v2 and
v3, refcount widths 1 to 64 bits, zlib and zstd compressed clusters, extended
L2, zero clusters, discards, internal snapshots, preallocation), a dirty image
left by a crashed ``qemu-io`` with lazy refcounts, raw files and locked images.
Fault injection lives in test_check_faults.py, the property test in
test_check_property.py; both use the helpers here.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

import boxdisk
from boxdisk import CheckReport, check
from boxdisk._errors import (
    BoxdiskError,
    DiskInUseError,
    InvalidArgumentError,
    NotQcow2Error,
    UnsupportedFeatureError,
)
from boxdisk._locks import image_in_use
from boxdisk.ops import FindingKind

pytestmark = pytest.mark.qemu

KIB = 1024
MIB = 1024 * KIB
CLUSTER_SIZES = (512, 4 * KIB, 64 * KIB, 2 * MIB)

_COPIED = 1 << 63


# -- helpers shared by the check tests --------------------------------------------------


def qemu_check(qemu: Any, path: Path, *args: str) -> tuple[int, dict[str, Any] | None]:
    """``qemu-img check --output=json [args] path``: exit code and JSON (None if none)."""
    proc = qemu.img("check", "--output=json", *args, path, check=False)
    out = proc.stdout.strip()
    return proc.returncode, (json.loads(out) if out else None)


def assert_same_as_qemu(qemu: Any, path: Path) -> CheckReport:
    """boxdisk's check of ``path`` prints what qemu-img check prints, with its exit code."""
    report = check(path)
    rc, data = qemu_check(qemu, path)
    assert data is not None, f"qemu-img check gave no result for {path} (exit {rc})"
    assert report.as_qemu_json() == data, [str(f) for f in report.findings[:20]]
    assert report.exit_code == rc
    return report


def default_ops(cluster: int) -> tuple[str, ...]:
    """qemu-io commands making data, compressed, zero and discarded clusters in 8 MiB."""
    last = 8 * MIB - cluster
    return (
        f"write -c -P 5 {last} {cluster}",  # compressed: only on an unallocated cluster
        "write -P 1 0 300k",
        "write -P 2 1M 64k",
        "write -z 2M 128k",
        "write -P 3 3M 8k",
        "discard 1M 64k",
        "write -z -u 4M 1M",
        "write -P 4 5M 4k",
    )


def make_image(qemu: Any, path: Path, *, size: int = 8 * MIB, cluster: int = 64 * KIB,
               compat: str = "1.1", options: tuple[str, ...] = (),
               ops: tuple[str, ...] | None = None) -> Path:
    """A qcow2 made by qemu-img with these options, then written by qemu-io."""
    opts = ",".join((f"cluster_size={cluster}", f"compat={compat}", *options))
    qemu.img("create", "-q", "-f", "qcow2", "-o", opts, path, str(size))
    cmds = default_ops(cluster) if ops is None else ops
    if cmds:
        qemu.write(path, cmds)
    return path


class Layout:
    """Where a qcow2 file keeps its tables, read straight from its bytes (for fault injection)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        raw = path.read_bytes()[:112]
        (_magic, self.version, _bo, _bs, self.cluster_bits, self.size, _crypt, self.l1_size,
         self.l1_offset, self.rt_offset, self.rt_clusters, self.nb_snapshots,
         self.snapshots_offset) = struct.unpack_from(">IIQIIQIIQQIIQ", raw)
        self.cs = 1 << self.cluster_bits
        self.refcount_order = struct.unpack_from(">I", raw, 96)[0] if self.version >= 3 else 4
        self.extended = self.version >= 3 and bool(struct.unpack_from(">Q", raw, 72)[0] & 16)

    def u64(self, offset: int) -> int:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return int(struct.unpack(">Q", f.read(8))[0])

    def put(self, offset: int, value: int, fmt: str = ">Q") -> None:
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(struct.pack(fmt, value))

    @property
    def file_size(self) -> int:
        return self.path.stat().st_size

    def l1_entry_offset(self, i: int) -> int:
        return self.l1_offset + 8 * i

    def l2_table(self, l1_index: int = 0) -> int:
        return self.u64(self.l1_entry_offset(l1_index)) & 0x00FF_FFFF_FFFF_FE00

    def l2_entry_offset(self, i: int, l1_index: int = 0) -> int:
        return self.l2_table(l1_index) + i * (16 if self.extended else 8)

    def l2_entry(self, i: int, l1_index: int = 0) -> int:
        return self.u64(self.l2_entry_offset(i, l1_index))

    def data_entries(self, l1_index: int = 0) -> list[int]:
        """Indices of standard (uncompressed, allocated) entries of one L2 table."""
        step = 16 if self.extended else 8
        out = []
        for i in range(self.cs // step):
            e = self.l2_entry(i, l1_index)
            if e & 0x00FF_FFFF_FFFF_FE00 and not e & (1 << 62):
                out.append(i)
        return out

    def refblock(self, index: int = 0) -> int:
        return self.u64(self.rt_offset + 8 * index) & ~0x1FF

    def set_refcount(self, cluster: int, value: int) -> None:
        bits = 1 << self.refcount_order
        per_block = self.cs * 8 // bits
        block = self.refblock(cluster // per_block)
        index = cluster % per_block
        with open(self.path, "r+b") as f:
            if bits >= 8:
                f.seek(block + index * bits // 8)
                f.write(value.to_bytes(bits // 8, "big"))
            else:
                per_byte = 8 // bits
                f.seek(block + index // per_byte)
                byte = f.read(1)[0]
                shift = (index % per_byte) * bits
                byte = (byte & ~(((1 << bits) - 1) << shift)) | (value << shift)
                f.seek(block + index // per_byte)
                f.write(bytes([byte]))


# -- clean images ---------------------------------------------------------------------


def _clean_cases() -> list[Any]:
    cases = []
    for cs in CLUSTER_SIZES:
        cases.append(pytest.param({"cluster": cs}, id=f"v3-{cs}"))
        cases.append(pytest.param({"cluster": cs, "compat": "0.10"}, id=f"v2-{cs}"))
    for bits in (1, 2, 4, 8, 32, 64):
        cases.append(pytest.param({"options": (f"refcount_bits={bits}",)},
                                  id=f"refcount-{bits}"))
    for bits, cs in ((1, 512), (64, 512), (2, 2 * MIB), (64, 4 * KIB)):
        cases.append(pytest.param({"cluster": cs, "options": (f"refcount_bits={bits}",)},
                                  id=f"refcount-{bits}-{cs}"))
    for cs in (16 * KIB, 64 * KIB, 2 * MIB):
        cases.append(pytest.param({"cluster": cs, "options": ("extended_l2=on",)},
                                  id=f"extended-l2-{cs}"))
    cases += [
        pytest.param({"options": ("compression_type=zstd",)}, id="zstd"),
        pytest.param({"options": ("compression_type=zstd", "extended_l2=on")},
                     id="zstd-extended-l2"),
        pytest.param({"options": ("lazy_refcounts=on",)}, id="lazy-refcounts"),
        pytest.param({"options": ("preallocation=metadata",), "ops": ()}, id="prealloc-meta"),
        pytest.param({"cluster": 4 * KIB, "options": ("preallocation=full",), "ops": ()},
                     id="prealloc-full"),
        pytest.param({"size": 1 << 30, "ops": ()}, id="empty-1g"),
        pytest.param({"size": 3 * MIB + 512, "ops": ("write -P 9 0 3M",)}, id="odd-size"),
    ]
    return cases


@pytest.mark.parametrize("spec", _clean_cases())
def test_clean_image_counts_equal_qemu(qemu, tmp_path, spec):
    path = make_image(qemu, tmp_path / "img.qcow2", **spec)
    report = assert_same_as_qemu(qemu, path)
    assert report.clean
    assert report.findings == ()
    assert not report.dirty and not report.corrupt


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_internal_snapshots_are_counted(qemu, tmp_path, compat):
    path = make_image(qemu, tmp_path / "snap.qcow2", compat=compat,
                      ops=("write -P 5 0 1M", "write -c -P 7 7M 64k"))
    qemu.img("snapshot", "-c", "first", path)
    qemu.write(path, ["write -P 6 512k 1M", "write -z 3M 64k"])
    qemu.img("snapshot", "-c", "second", path)
    qemu.write(path, ["write -P 7 3M 1M", "discard 0 128k"])
    report = assert_same_as_qemu(qemu, path)
    assert report.clean
    # Removing a snapshot is QEMU's own bookkeeping; the result must still agree.
    qemu.img("snapshot", "-d", "first", path)
    assert assert_same_as_qemu(qemu, path).clean


def test_fragmented_image_counts_equal_qemu(qemu, tmp_path):
    # Writes in reverse order scatter the clusters: fragmentation must match.
    ops = tuple(f"write -P {i % 250 + 1} {(63 - i) * 64 * KIB} 64k" for i in range(64))
    path = make_image(qemu, tmp_path / "frag.qcow2", ops=ops)
    report = assert_same_as_qemu(qemu, path)
    assert report.fragmented_clusters > 0


def test_report_values_and_json_names(qemu, tmp_path):
    path = make_image(qemu, tmp_path / "img.qcow2")
    report = check(path)
    rc, data = qemu_check(qemu, path)
    assert rc == 0 and data is not None
    assert report.as_qemu_json() == data
    assert set(data) <= {"filename", "format", "check-errors", "corruptions", "leaks",
                         "corruptions-fixed", "leaks-fixed", "image-end-offset",
                         "total-clusters", "allocated-clusters", "fragmented-clusters",
                         "compressed-clusters"}
    assert report.filename == str(path)
    assert report.format == "qcow2"
    assert report.compressed_clusters == data["compressed-clusters"] == 1
    assert report.image_end_offset == data["image-end-offset"]
    with pytest.raises(AttributeError):
        report.leaks = 1  # type: ignore[misc]
    assert boxdisk.check is check and boxdisk.CheckReport is CheckReport
    assert "check" in boxdisk.__all__ and "Finding" in boxdisk.__all__


# -- arguments, raw files, features -----------------------------------------------------


def test_raw_file_has_nothing_to_check(qemu, tmp_path):
    raw = tmp_path / "disk.raw"
    qemu.img("create", "-q", "-f", "raw", raw, "1M")
    assert qemu.img("check", raw, check=False).returncode == 63
    with pytest.raises(NotQcow2Error) as err:
        check(raw)
    assert err.value.path == str(raw) and err.value.field == "magic"
    with pytest.raises(NotQcow2Error):
        check(raw, repair="all")
    assert raw.read_bytes() == bytes(MIB)


def test_bad_repair_argument(tmp_path):
    with pytest.raises(InvalidArgumentError):
        check(tmp_path / "x.qcow2", repair="everything")  # type: ignore[arg-type]


def test_missing_file(tmp_path):
    with pytest.raises(BoxdiskError) as err:
        check(tmp_path / "missing.qcow2")
    assert err.value.path == str(tmp_path / "missing.qcow2")


def test_persistent_bitmaps_are_refused(qemu, tmp_path):
    path = make_image(qemu, tmp_path / "bm.qcow2", ops=("write -P 1 0 64k",))
    qemu.img("bitmap", "--add", path, "b0")
    with pytest.raises(UnsupportedFeatureError) as err:
        check(path)
    assert err.value.field == "autoclear_features"


# -- the dirty bit, repair="leaks" and locks -----------------------------------------------


def _crashed_lazy_image(qemu: Any, path: Path) -> Path:
    """A lazy-refcounts image whose writer aborted: dirty bit set, refcounts stale."""
    make_image(qemu, path, options=("lazy_refcounts=on",), ops=())
    proc = qemu.io("-f", "qcow2", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 3M 200k",
                   "-c", "abort", path, check=False)
    assert proc.returncode != 0  # killed by abort(3)
    return path


def test_dirty_image_from_crashed_writer(qemu, tmp_path):
    path = _crashed_lazy_image(qemu, tmp_path / "lazy.qcow2")
    before = assert_same_as_qemu(qemu, path)
    assert before.dirty and before.corruptions
    assert {f.kind for f in before.findings} >= {FindingKind.REFCOUNT_TOO_LOW,
                                                  FindingKind.COPIED_FLAG}

    leaks_copy = tmp_path / "leaks.qcow2"
    shutil.copy(path, leaks_copy)
    report = check(leaks_copy, repair="leaks")
    # As qemu-img check -r leaks, which fails here: the structure needs a rebuild.
    assert report.check_errors == 1
    assert report.findings[-1].kind is FindingKind.REBUILD_NEEDED
    assert leaks_copy.read_bytes() == path.read_bytes()

    qemu_copy = tmp_path / "qemu.qcow2"
    shutil.copy(path, qemu_copy)
    qemu.img("check", "-r", "all", qemu_copy, check=False)
    report = check(path, repair="all")
    assert report.clean and not report.dirty
    assert report.corruptions_fixed > 0
    assert not boxdisk.read_header(path).incompatible_features & 1
    assert assert_same_as_qemu(qemu, path).clean
    assert qemu.img("compare", path, qemu_copy, check=False).returncode == 0
    qemu.io("-f", "qcow2", "-c", "read -P 0x11 0 1M", "-c", "read -P 0x22 3M 200k", path)


def test_repair_of_clean_dirty_image_clears_the_bit(qemu, tmp_path):
    path = make_image(qemu, tmp_path / "img.qcow2", ops=("write -P 1 0 64k",))
    layout = Layout(path)
    layout.put(72, 1)  # the dirty bit alone; the refcounts are right
    assert check(path).dirty
    report = check(path, repair="leaks")
    assert report.clean and not report.dirty
    assert report.corruptions_fixed == report.leaks_fixed == 0
    assert assert_same_as_qemu(qemu, path).clean


def test_repair_leaks_frees_leaked_clusters(qemu, tmp_path):
    path = make_image(qemu, tmp_path / "img.qcow2", ops=("write -P 1 0 256k",))
    layout = Layout(path)
    end = -(-layout.file_size // layout.cs) + 2
    with open(path, "r+b") as f:  # two clusters past the end, counted but unused
        f.truncate(end * layout.cs)
    layout.set_refcount(end - 1, 1)
    layout.set_refcount(end - 2, 1)
    before = assert_same_as_qemu(qemu, path)
    assert before.leaks == 2 and before.corruptions == 0 and before.exit_code == 3
    assert [f.cluster for f in before.findings] == [end - 2, end - 1]
    assert all(f.kind is FindingKind.LEAK for f in before.findings)
    qemu_copy = tmp_path / "qemu.qcow2"
    shutil.copy(path, qemu_copy)
    rc, qemu_report = qemu_check(qemu, qemu_copy, "-r", "leaks")
    report = check(path, repair="leaks")
    assert qemu_report is not None and rc == 0
    assert report.leaks_fixed == qemu_report["leaks-fixed"] == 2
    assert report.clean and report.as_qemu_json() == {**qemu_report, "filename": str(path)}
    assert assert_same_as_qemu(qemu, path).clean
    assert qemu.img("compare", path, qemu_copy, check=False).returncode == 0


def test_repair_refuses_an_image_qemu_holds(qemu, tmp_path):
    path = make_image(qemu, tmp_path / "img.qcow2", ops=("write -P 1 0 64k",))
    holder = subprocess.Popen(["qemu-io", "-f", "qcow2", "-c", "sleep 60000", str(path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(2000):  # until QEMU has taken its locks
            if image_in_use(path):
                break
            time.sleep(0.01)
        assert image_in_use(path)
        before = path.read_bytes()
        with pytest.raises(DiskInUseError):
            check(path, repair="all")
        with pytest.raises(DiskInUseError):
            check(path, repair="leaks")
        assert path.read_bytes() == before
        assert check(path).clean  # a plain check takes no lock, as qemu-img check -U
    finally:
        holder.kill()
        holder.wait()


def test_check_without_repair_writes_nothing(qemu, tmp_path):
    path = make_image(qemu, tmp_path / "img.qcow2", ops=("write -P 1 0 256k",))
    layout = Layout(path)
    layout.set_refcount((layout.l2_entry(0) & 0x00FF_FFFF_FFFF_FE00) // layout.cs, 0)
    before = path.read_bytes()
    report = check(path)
    assert report.corruptions and path.read_bytes() == before


def test_repair_clears_unknown_autoclear_bits(qemu, tmp_path):
    path = make_image(qemu, tmp_path / "img.qcow2", ops=("write -P 1 0 256k",))
    layout = Layout(path)
    layout.put(88, 1 << 5)  # an autoclear bit nobody knows
    layout.set_refcount((layout.l2_entry(0) & 0x00FF_FFFF_FFFF_FE00) // layout.cs, 2)
    assert assert_same_as_qemu(qemu, path).leaks == 1
    assert check(path, repair="all").clean
    assert layout.u64(88) == 0
    assert assert_same_as_qemu(qemu, path).clean
