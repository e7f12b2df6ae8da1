"""``check``: verify a qcow2 image's metadata as ``qemu-img check`` does, and repair it.

Classification and counts are QEMU 7.2's (block/qcow2-refcount.c
``qcow2_check_refcounts``, qemu-img.c ``img_check``); the walk itself lives in
:mod:`boxdisk.ops._check_refcounts`. :class:`CheckReport` carries qemu-img's
JSON facts under the same names (underscores for hyphens) plus the findings
that say where each problem is.

Decisions (each documented where a caller meets it):

* Raw files have no metadata to check: ``check`` raises :class:`NotQcow2Error`
  for any file without the qcow2 magic, where ``qemu-img check`` exits 63
  ("This image format does not support checks").
* Internal snapshots are checked: their L1 and L2 tables are counted as QEMU
  counts them. Repair fixes refcounts over the whole image but rewrites entries
  only in the active tables (never a table a snapshot shares).
* Images with persistent dirty bitmaps, encryption or an external data file
  are refused (:class:`UnsupportedFeatureError`): their extra structures would
  be misreported as leaks.
* A plain check takes no lock (like ``qemu-img check -U``); checking an image a
  running QEMU writes may report transient problems. Repair takes QEMU's write
  locks and raises :class:`DiskInUseError` when a QEMU holds the image.

Repair (``repair="leaks"`` as ``qemu-img check -r leaks``, ``repair="all"`` as
``-r all``) changes metadata in place, in this order, each phase durable
(fsync) before the next starts:

1. **Removals.** Clear OFLAG_COPIED where the repaired refcount will not be 1;
   and, for ``"all"``, fix active L1/L2 entries the guest cannot use as they
   are: clear reserved bits and OFLAG_COPIED on compressed clusters (QEMU's
   reads ignore them), turn entries whose L2 table or host cluster is
   misaligned or past the end of the file into empty/zero entries (QEMU reads
   those as I/O errors or zeros), and fix invalid subcluster bitmaps (QEMU's
   own ``fix_l2_entry_by_zero`` rule: allocated becomes zero).
2. **Refcounts.** Either rewrite the refcount entries that differ in place
   (raising too-low ones, lowering leaked ones), or, when the refcount
   structure itself is broken (a referenced cluster with refcount 0, a
   misaligned, shared or out-of-file refcount block), write a complete new
   refcount table and blocks past the end of the file and switch the header's
   refcount table pointer in one 12-byte write. Unlike QEMU, which rebuilds into
   free clusters inside the file, boxdisk never writes over a cluster the old
   structure might still describe.
3. **Additions.** Set OFLAG_COPIED where the refcount is now 1, and clear the
   subcluster bitmap of compressed clusters (which makes them counted).
4. **Header.** Clear the dirty and corrupt bits when the image now checks clean.

Before phase 1, unknown autoclear feature bits are cleared, as the spec asks of
any program that changes an image.

A kill at any instant leaves at most leaks, unset OFLAG_COPIED flags (which only
cost QEMU a copy-on-write) and the problems not yet repaired: never a
reference to a cluster whose refcount is lower than before, never OFLAG_COPIED
on a shared cluster, and never a half-switched refcount table. Data clusters
are never written, so the guest-visible content is unchanged except where QEMU
could not read it (the entries of phase 1, which then read zeros or the backing
file).
"""

from __future__ import annotations

import os
import struct
import time
from array import array
from typing import Any, Literal

import attrs

from boxdisk._args import as_path
from boxdisk._errors import (
    CorruptImageError,
    ImageIOError,
    InvalidArgumentError,
    NotQcow2Error,
    UnsupportedFeatureError,
)
from boxdisk._locks import lock_for_write
from boxdisk._log import get_logger
from boxdisk.format import (
    AUTOCLEAR_BITMAPS,
    EXT_BITMAPS,
    EXT_CRYPTO_HEADER,
    INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE,
    INCOMPAT_DIRTY,
    KNOWN_AUTOCLEAR,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    MAX_HOST_OFFSET,
    MAX_REFTABLE_BYTES,
    MIN_HEADER_PROBE,
    QCOW2_MAGIC,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    Qcow2Header,
    cluster_size_of,
    pack_u64_table,
    parse_header,
    unpack_u64_table,
)

from ._check_refcounts import (
    Finding,
    FindingKind,
    Fixes,
    Snapshot,
    Walk,
    encode_block,
    last_nonzero,
    read_snapshots,
    set_entry,
    zeros,
)

__all__ = ["CheckReport", "Finding", "FindingKind", "check"]

log = get_logger(__name__)

Repair = Literal["leaks", "all"]

_INT64_MAX = (1 << 63) - 1
_MAX_OWNERS = 8  # names kept per cluster in ``Finding.referenced_by``
_STRUCTURE_KINDS = (FindingKind.RESERVED_BITS, FindingKind.MISALIGNED,
                    FindingKind.REFCOUNT_BLOCK_PAST_END, FindingKind.REFCOUNT_BLOCK_SHARED)
# Header field offsets (docs/interop/qcow2.txt, "Header").
_L1_OFFSET, _L1_SIZE = 40, 36
_RT_OFFSET, _RT_CLUSTERS = 48, 56
_NB_SNAPSHOTS, _SN_OFFSET = 60, 64
_INCOMPATIBLE = 72
_AUTOCLEAR = 88


@attrs.define(frozen=True, kw_only=True)
class CheckReport:
    """What ``qemu-img check`` reports about an image, and where each problem is.

    The counters are qemu-img's JSON facts (``check_errors`` for
    ``check-errors`` and so on). After a repair they describe the image as
    repaired (qemu-img's "double check"), with ``corruptions_fixed`` and
    ``leaks_fixed`` saying what the repair changed. ``findings`` list the
    remaining problems (at most ``MAX_FINDINGS``; ``findings_omitted`` counts
    the rest); ``dirty`` and ``corrupt`` are the header's feature bits.
    """

    filename: str
    format: str = "qcow2"
    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    findings: tuple[Finding, ...] = ()
    findings_omitted: int = 0
    dirty: bool = False
    corrupt: bool = False

    @property
    def clean(self) -> bool:
        """No corruptions, no leaks and no check errors."""
        return not (self.corruptions or self.leaks or self.check_errors)

    @property
    def exit_code(self) -> int:
        """``qemu-img check``'s exit status: 1 check errors, 2 corruptions, 3 leaks, else 0."""
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def as_qemu_json(self) -> dict[str, Any]:
        """The dict ``qemu-img check --output=json`` prints (zero counters left out, as there)."""
        out: dict[str, Any] = {"filename": self.filename, "format": self.format,
                               "check-errors": self.check_errors}
        optional = (
            ("corruptions", self.corruptions),
            ("leaks", self.leaks),
            ("corruptions-fixed", self.corruptions_fixed),
            ("leaks-fixed", self.leaks_fixed),
            ("image-end-offset", self.image_end_offset),
            ("total-clusters", self.total_clusters),
            ("allocated-clusters", self.allocated_clusters),
            ("fragmented-clusters", self.fragmented_clusters),
            ("compressed-clusters", self.compressed_clusters),
        )
        out.update((key, value) for key, value in optional if value)
        return out


# -- opening -------------------------------------------------------------------------


def _pread(fd: int, length: int, offset: int, path: str) -> bytes:
    try:
        return os.pread(fd, length, offset)
    except OSError as exc:
        msg = f"cannot read {length} bytes at 0x{offset:x}: {exc.strerror}"
        raise ImageIOError(msg, path=path, value=offset) from exc


def _read_header(fd: int, path: str) -> Qcow2Header:
    """The header, accepting every table placement QEMU opens.

    QEMU opens images whose L1, refcount or snapshot table starts in the header
    cluster or past 2^56 (it checks only alignment and a signed 64-bit end), and
    ``qemu-img check`` then counts the overlap; ``parse_header`` refuses them.
    So those three offsets are validated here the QEMU way and hidden from the
    parser, which checks everything else.
    """
    probe = _pread(fd, MIN_HEADER_PROBE, 0, path)
    if len(probe) < 4 or struct.unpack_from(">I", probe)[0] != QCOW2_MAGIC:
        msg = ("not a qcow2 image: raw files have no metadata to check "
               "(qemu-img check exits 63 for them)")
        raise NotQcow2Error(msg, path=path, field="magic", value=probe[:4].hex())
    cs = cluster_size_of(probe, source=path)
    buf = bytearray(_pread(fd, cs, 0, path))
    real: dict[str, int] = {}
    if len(buf) >= 72:
        tables = (("l1_table_offset", _L1_OFFSET, _L1_SIZE, 8),
                  ("refcount_table_offset", _RT_OFFSET, _RT_CLUSTERS, cs),
                  ("snapshots_offset", _SN_OFFSET, _NB_SNAPSHOTS, 40))
        for name, pos, count_pos, unit in tables:
            offset = struct.unpack_from(">Q", buf, pos)[0]
            nbytes = struct.unpack_from(">I", buf, count_pos)[0] * unit
            if not nbytes or offset % cs or (cs <= offset and offset + nbytes <= MAX_HOST_OFFSET):
                continue
            if offset > _INT64_MAX - nbytes:
                msg = f"{name} 0x{offset:x} ({nbytes} bytes) ends past 2^63"
                raise CorruptImageError(msg, path=path, field=name, value=offset)
            real[name] = offset
            struct.pack_into(">Q", buf, pos, cs)
    h = parse_header(bytes(buf), source=path)
    if real:
        h = attrs.evolve(
            h, l1_table_offset=real.get("l1_table_offset", h.l1_table_offset),
            refcount_table_offset=real.get("refcount_table_offset", h.refcount_table_offset),
            snapshots_offset=real.get("snapshots_offset", h.snapshots_offset))
    inc = h.incompatible_features
    if inc & INCOMPAT_DATA_FILE or h.data_file is not None:
        msg = "image uses an external data file, which boxdisk does not support"
        raise UnsupportedFeatureError(msg, path=path, field="incompatible_features", value=inc)
    if h.crypt_method or h.extension(EXT_CRYPTO_HEADER) is not None:
        msg = f"image is encrypted (crypt_method {h.crypt_method}); boxdisk does not check those"
        raise UnsupportedFeatureError(msg, path=path, field="crypt_method",
                                      value=h.crypt_method)
    bitmaps = h.extension(EXT_BITMAPS)
    if (h.autoclear_features & AUTOCLEAR_BITMAPS and bitmaps is not None
            and len(bitmaps.data) >= 4 and struct.unpack_from(">I", bitmaps.data)[0]):
        msg = ("image has persistent dirty bitmaps, whose clusters boxdisk does not count; "
               "use qemu-img check")
        raise UnsupportedFeatureError(msg, path=path, field="autoclear_features",
                                      value=h.autoclear_features)
    return h


# -- analysis ------------------------------------------------------------------------


@attrs.define
class _Image:
    """An open image being checked: its fd, header, size and snapshot table."""

    fd: int
    path: str
    header: Qcow2Header
    file_size: int
    snapshots: tuple[Snapshot, ...]
    snapshots_size: int

    def walk(self, *, fixes: Fixes | None = None, trace: list[int] | None = None) -> Walk:
        return Walk(self.fd, self.path, self.header, self.file_size,
                    snapshots=self.snapshots, snapshots_size=self.snapshots_size,
                    fixes=fixes, trace=trace).run()


def _open_image(fd: int, path: str) -> _Image:
    h = _read_header(fd, path)
    try:
        file_size = os.fstat(fd).st_size
    except OSError as exc:
        msg = f"cannot stat the image: {exc.strerror}"
        raise ImageIOError(msg, path=path) from exc

    def read(offset: int, length: int) -> bytes:
        data = _pread(fd, max(0, min(length, file_size - offset)), offset, path) \
            if offset < file_size else b""
        return data + bytes(length - len(data))

    snapshots, size = read_snapshots(read, h, path)
    return _Image(fd, path, h, file_size, snapshots, size)


def _annotate(image: _Image, walk: Walk) -> tuple[Finding, ...]:
    """The walk's findings, refcount mismatches naming what references their cluster."""
    findings = tuple(walk.findings)
    if not walk.mismatched:
        return findings
    owners = image.walk(trace=walk.mismatched).owners()
    out = []
    for f in findings:
        refs = owners.get(f.cluster) if f.cluster is not None else None
        if refs and f.kind in (FindingKind.REFCOUNT_TOO_LOW, FindingKind.LEAK):
            kind: FindingKind = f.kind
            if (kind is FindingKind.REFCOUNT_TOO_LOW and len(refs) > 1
                    and any(meta for _, meta in refs)):
                kind = FindingKind.OVERLAPPING_METADATA
            names = tuple(name for name, _ in refs[:_MAX_OWNERS])
            out.append(attrs.evolve(f, kind=kind, referenced_by=names))
        else:
            out.append(f)
    return tuple(out)


def _report(image: _Image, walk: Walk, *, corruptions_fixed: int = 0, leaks_fixed: int = 0,
            extra: tuple[Finding, ...] = ()) -> CheckReport:
    h = image.header
    check_errors = walk.check_errors + sum(f.count for f in extra
                                           if f.kind.counts_as == "check_errors")
    return CheckReport(
        filename=image.path,
        check_errors=check_errors,
        corruptions=walk.corruptions,
        leaks=walk.leaks,
        corruptions_fixed=corruptions_fixed,
        leaks_fixed=leaks_fixed,
        image_end_offset=walk.image_end_offset,
        # QEMU's total_sectors is the virtual size rounded down to 512-byte sectors.
        total_clusters=-(-(h.size // 512 * 512) // h.cluster_size),
        allocated_clusters=walk.allocated,
        fragmented_clusters=walk.fragmented,
        compressed_clusters=walk.compressed,
        findings=_annotate(image, walk) + extra,
        findings_omitted=walk.findings_omitted,
        dirty=bool(h.incompatible_features & INCOMPAT_DIRTY),
        corrupt=bool(h.incompatible_features & INCOMPAT_CORRUPT),
    )


# -- the public entry point -------------------------------------------------------------


def check(path: str | os.PathLike[str], *, repair: Repair | None = None) -> CheckReport:
    """Check a qcow2 image as ``qemu-img check`` does; with ``repair``, fix it first.

    ``repair="leaks"`` frees leaked clusters; ``repair="all"`` also fixes
    refcounts that are too low (rebuilding the refcount structure when it is
    broken), OFLAG_COPIED, and the entries described in this module's notes, then
    clears the dirty bit. A repaired image's report counts what remains (as
    ``qemu-img check -r`` prints after its double check) with
    ``corruptions_fixed``/``leaks_fixed``. Raises :class:`NotQcow2Error` for raw
    files, :class:`DiskInUseError` when repairing an image a QEMU holds, and
    other :class:`BoxdiskError` subclasses for headers QEMU would not open.
    """
    if repair not in (None, "leaks", "all"):
        msg = f"repair must be None, 'leaks' or 'all', not {repair!r}"
        raise InvalidArgumentError(msg, field="repair", value=repair)
    p = as_path(path, "path")
    start = time.perf_counter()
    try:
        # O_NONBLOCK: a FIFO must not hang the check (its reads then fail, typed).
        fd = os.open(p, (os.O_RDONLY if repair is None else os.O_RDWR) | os.O_CLOEXEC
                     | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        msg = f"cannot open image: {exc.strerror}"
        raise ImageIOError(msg, path=p, field="path", value=p) from exc
    try:
        if repair is not None:
            lock_for_write(fd, p)
        image = _open_image(fd, p)
        walk = image.walk()
        report = _report(image, walk) if repair is None else _Repair(image, walk, repair).run()
    finally:
        os.close(fd)
    log.info("image_checked", path=p, repair=repair, corruptions=report.corruptions,
             leaks=report.leaks, check_errors=report.check_errors,
             corruptions_fixed=report.corruptions_fixed, leaks_fixed=report.leaks_fixed,
             ms=round((time.perf_counter() - start) * 1000, 3))
    return report


# -- repair --------------------------------------------------------------------------


class _Repair:
    """One repair of an open, locked image (see the module notes for the order)."""

    def __init__(self, image: _Image, pre: Walk, mode: Repair) -> None:
        self.image, self.pre, self.mode = image, pre, mode
        h = image.header
        self.h, self.cs, self.cb = h, h.cluster_size, h.cluster_bits
        self.fd, self.path = image.fd, image.path
        self.corruptions_fixed = self.leaks_fixed = 0
        self.new_final: array[int] | None = None
        self.wrote = False
        self.l1_fix_phase = 1

    # -- raw writes ------------------------------------------------------------------

    def _pwrite(self, data: bytes, offset: int) -> None:
        try:
            done = os.pwrite(self.fd, data, offset)
        except OSError as exc:
            msg = f"cannot write {len(data)} bytes at 0x{offset:x}: {exc.strerror}"
            raise ImageIOError(msg, path=self.path, value=offset) from exc
        if done != len(data):
            msg = f"short write at 0x{offset:x} ({done} of {len(data)} bytes)"
            raise ImageIOError(msg, path=self.path, value=offset)
        self.wrote = True

    def _sync(self) -> None:
        if not self.wrote:
            return
        try:
            os.fsync(self.fd)
        except OSError as exc:
            msg = f"fsync failed: {exc.strerror}"
            raise ImageIOError(msg, path=self.path) from exc
        self.wrote = False

    # -- planning --------------------------------------------------------------------

    def _writable_tables(self, walk: Walk, meta: dict[int, int]
                         ) -> tuple[bool, frozenset[int]]:
        """Active tables inside the file that no other metadata structure overlaps
        (``meta`` counts metadata references per cluster); the others are never written."""
        h, cs, cb = self.h, self.cs, self.cb
        l1_end = h.l1_table_offset + h.l1_size * 8
        l1_ok = bool(h.l1_size) and l1_end <= self.image.file_size and all(
            meta.get(k, 0) == 1 for k in range(h.l1_table_offset >> cb, (l1_end - 1 >> cb) + 1))
        l2_ok = frozenset(
            l2 for l2, refs in walk.active_l2.items()
            if l2 and not l2 & (cs - 1) and l2 + cs <= self.image.file_size
            and meta.get(l2 >> cb, 0) == len(refs))
        return l1_ok, l2_ok

    def run(self) -> CheckReport:
        pre, h = self.pre, self.h
        bits = h.incompatible_features & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT)
        if not (pre.corruptions or pre.leaks or pre.check_errors or bits):
            return _report(self.image, pre)
        l1_ok, l2_ok = self._writable_tables(pre, pre.meta)
        if self.mode == "leaks":
            if pre.rebuild:
                need = Finding(kind=FindingKind.REBUILD_NEEDED,
                               detail="the refcount structure must be rebuilt; "
                                      "repair='leaks' cannot, repair='all' can")
                return _report(self.image, pre, extra=(need,))
            plan = pre
            final = array(pre.ondisk.typecode, pre.ondisk[:len(pre.imrt)])
            for k, (r1, r2) in enumerate(zip(final, pre.imrt, strict=True)):
                if r1 > r2 and (k >> pre.rb_bits) not in pre.bad_blocks:
                    final[k] = r2
            fix_copied = not (pre.corruptions - pre.copied_corruptions or pre.check_errors)
            rebuild = False
        else:
            zero_past_end = h.version >= 3 or h.backing_file is None
            # A broken refcount structure is rebuilt whatever the plan finds (a rebuild
            # is always safe); tables that overlap only the old structure may then be
            # fixed too, once it is gone (phase 3).
            rebuild = bool(pre.rebuild or pre.outside_blocks or pre.bad_blocks)
            after = _without(pre.meta, pre.refstruct) if rebuild else pre.meta
            plan_l1, plan_l2 = self._writable_tables(pre, after)
            plan = self.image.walk(fixes=Fixes(plan_l1, plan_l2, zero_past_end))
            final = plan.imrt
            rebuild = rebuild or bool(plan.rebuild or plan.outside_blocks or plan.bad_blocks)
            if plan_l1 and not l1_ok:
                self.l1_fix_phase = 3
            for l2, fixes in plan.l2_fixes.items():
                if l2 not in l2_ok:
                    plan.l2_fixes[l2] = {i: (e, bm, 3) for i, (e, bm, _) in fixes.items()}
            fix_copied = True
        if rebuild:
            self.new_final = self._rebuilt_refcounts(plan)

        self._clear_unknown_autoclear()

        def final_rc(k: int) -> int | None:
            """A cluster's refcount once phase 2 is done."""
            if self.new_final is not None:
                return self.new_final[k] if k < len(self.new_final) else 0
            if k < len(final):
                return final[k]
            return pre.refcount_on_disk(k)

        self._entries(plan, l1_ok, l2_ok, final_rc if fix_copied else None, phase=1)
        self._sync()
        if rebuild:
            self._write_rebuilt(plan)
        else:
            self._write_in_place(final)
        self._sync()
        # With the refcount structure rebuilt, a table that only overlapped the old one
        # is now referenced by its L1 entries alone, and may be written.
        meta = _without(plan.meta, plan.refstruct) if rebuild else plan.meta
        l1_ok, l2_ok = self._writable_tables(plan, meta)
        self._entries(plan, l1_ok, l2_ok, final_rc if fix_copied else None, phase=3)
        self._sync()
        post_image = _open_image(self.fd, self.path)
        post = post_image.walk()
        if not (post.corruptions or post.check_errors):
            self._clear_bits(post_image.header)
            post_image = _open_image(self.fd, self.path)
        log.info("image_repaired", path=self.path, mode=self.mode, rebuilt=rebuild,
                 corruptions_fixed=self.corruptions_fixed, leaks_fixed=self.leaks_fixed)
        return _report(post_image, post, corruptions_fixed=self.corruptions_fixed,
                       leaks_fixed=self.leaks_fixed)

    # -- phases 1 and 3: table entries ------------------------------------------------

    def _entries(self, plan: Walk, l1_ok: bool, l2_ok: frozenset[int],
                 final_rc: Any, *, phase: int) -> None:
        """Entry fixes and OFLAG_COPIED changes of one phase (1 clears, 3 sets)."""
        h, cs, cb = self.h, self.cs, self.cb
        l1 = _u64s(self.image, h.l1_table_offset, h.l1_size)
        for i, e in enumerate(l1):
            if not e:
                continue
            new = plan.l1_fixes.get(i, e) if phase == self.l1_fix_phase else e
            l2 = new & L1E_OFFSET_MASK
            if l2 and final_rc is not None:
                new = self._copied(new, final_rc(l2 >> cb), phase)
            if new != e and l1_ok:
                self._pwrite(struct.pack(">Q", new), h.l1_table_offset + 8 * i)
                self.corruptions_fixed += (new & ~QCOW_OFLAG_COPIED != e & ~QCOW_OFLAG_COPIED) \
                    + (new & QCOW_OFLAG_COPIED != e & QCOW_OFLAG_COPIED)
        step = 2 if h.extended_l2 else 1
        for l2 in sorted(l2_ok):
            t = _u64s(self.image, l2, cs // 8)
            fixes = plan.l2_fixes.get(l2, {})
            changed = False
            for i in range(len(t) // step):
                e = t[step * i]
                bm = t[step * i + 1] if step == 2 else 0
                fix = fixes.get(i)
                ne, nbm = (fix[0], fix[1]) if fix is not None and fix[2] == phase else (e, bm)
                if (ne, nbm) != (e, bm):
                    self.corruptions_fixed += 1
                if ne & L2E_OFFSET_MASK and not ne & QCOW_OFLAG_COMPRESSED \
                        and final_rc is not None:
                    copied = self._copied(ne, final_rc((ne & L2E_OFFSET_MASK) >> cb), phase)
                    if copied != ne:
                        self.corruptions_fixed += 1
                        ne = copied
                if (ne, nbm) != (e, bm):
                    t[step * i] = ne
                    if step == 2:
                        t[step * i + 1] = nbm
                    changed = True
            if changed:
                self._pwrite(pack_u64_table(t), l2)

    @staticmethod
    def _copied(e: int, rc: int | None, phase: int) -> int:
        if rc is None:
            return e
        if phase == 1 and e & QCOW_OFLAG_COPIED and rc != 1:
            return e & ~QCOW_OFLAG_COPIED
        if phase == 3 and not e & QCOW_OFLAG_COPIED and rc == 1:
            return e | QCOW_OFLAG_COPIED
        return e

    # -- phase 2: refcounts ----------------------------------------------------------------

    def _count_refcount_fixes(self, final: array[int]) -> None:
        pre = self.pre
        od = pre.ondisk
        for k in range(min(len(final), len(od))):
            if (k >> pre.rb_bits) in pre.bad_blocks:
                continue
            if od[k] < final[k]:
                self.corruptions_fixed += 1
            elif od[k] > final[k]:
                self.leaks_fixed += 1

    def _write_in_place(self, final: array[int]) -> None:
        pre, cs, order = self.pre, self.cs, self.h.refcount_order
        od, per = pre.ondisk, pre.per_block
        n = min(len(final), len(od))
        for bi in range(-(-n // per)):
            a, b = bi * per, min(bi * per + per, n)
            if final[a:b] == od[a:b]:
                continue
            off = pre.reftable[bi] & ~0x1FF
            block = bytearray(pre.read(off, cs))
            for k in range(a, b):
                if final[k] != od[k]:
                    set_entry(block, k - a, final[k], order)
            self._pwrite(bytes(block), off)
        self._count_refcount_fixes(final)

    def _rebuilt_refcounts(self, plan: Walk) -> array[int]:
        """The refcounts after a rebuild: the references found, the old structure gone,
        the new one (blocks, then table) counted past everything else."""
        cs, order = self.cs, self.h.refcount_order
        rc = array(plan.imrt.typecode, plan.imrt)
        for k in plan.refstruct:
            if rc[k]:
                rc[k] -= 1
        start = max(-(-self.image.file_size // cs), last_nonzero(rc, 0, len(rc)) + 1)
        per = plan.per_block
        blocks = table = 0
        while True:
            total = start + blocks + table
            need_blocks = -(-total // per)
            need_table = -(-need_blocks * 8 // cs)
            if (need_blocks, need_table) == (blocks, table):
                break
            blocks, table = need_blocks, need_table
        if table * cs > MAX_REFTABLE_BYTES:
            msg = f"a rebuilt refcount table would need {table} clusters, past QEMU's 8 MiB"
            raise UnsupportedFeatureError(msg, path=self.path, field="refcount_table_clusters",
                                          value=table)
        rc.extend(zeros(order, start + blocks + table - len(rc)))
        for k in range(start, start + blocks + table):
            rc[k] = 1
        self._layout = (start, blocks, table)
        return rc

    def _write_rebuilt(self, plan: Walk) -> None:
        assert self.new_final is not None
        cs, order = self.cs, self.h.refcount_order
        rc, per = self.new_final, plan.per_block
        start, blocks, table = self._layout
        data = b"".join(encode_block(rc[bi * per:(bi + 1) * per], order, cs)
                        for bi in range(blocks))
        self._pwrite(data, start * cs)
        entries = [(start + bi) * cs for bi in range(blocks)]
        entries += [0] * (table * cs // 8 - blocks)
        self._pwrite(pack_u64_table(entries), (start + blocks) * cs)
        self._sync()
        # One write of 12 bytes inside one sector switches to the new structure.
        self._pwrite(struct.pack(">QI", (start + blocks) * cs, table), _RT_OFFSET)
        self._sync()
        self._count_refcount_fixes(plan.imrt)
        self.corruptions_fixed += sum(f.count for f in plan.findings
                                      if f.kind in _STRUCTURE_KINDS
                                      and f.table == "refcount table")

    def _clear_unknown_autoclear(self) -> None:
        """A program that changes an image clears the autoclear bits it does not know
        (docs/interop/qcow2.txt, "autoclear_features"), before it changes anything."""
        h = self.h
        if h.version >= 3 and h.autoclear_features & ~KNOWN_AUTOCLEAR:
            self._pwrite(struct.pack(">Q", h.autoclear_features & KNOWN_AUTOCLEAR), _AUTOCLEAR)
            self._sync()

    # -- phase 4 -----------------------------------------------------------------------

    def _clear_bits(self, h: Qcow2Header) -> None:
        if h.version < 3:
            return
        bits = INCOMPAT_DIRTY | INCOMPAT_CORRUPT
        if h.incompatible_features & bits:
            self._pwrite(struct.pack(">Q", h.incompatible_features & ~bits), _INCOMPATIBLE)
            self._sync()


def _without(meta: dict[int, int], refstruct: list[int]) -> dict[int, int]:
    """Metadata references per cluster once the old refcount structure is gone."""
    out = dict(meta)
    for k in refstruct:
        out[k] -= 1
    return out


def _u64s(image: _Image, offset: int, count: int) -> array[int]:
    """``count`` big-endian words at ``offset`` (zeros past the end of the file)."""
    inside = max(0, min(count * 8, image.file_size - offset))
    raw = _pread(image.fd, inside, offset, image.path) if inside > 0 else b""
    return unpack_u64_table(raw + bytes(count * 8 - len(raw)))
