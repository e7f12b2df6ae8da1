"""The qcow2 header, its extensions and feature bits: parse, validate and pack.

Pure: bytes in, values out. ``source`` names the file in error messages only;
nothing here opens it. Reference: docs/interop/qcow2.txt, "Header" and
"Header extensions"; the limits are those of QEMU's ``qcow2_do_open``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import attrs

from boxdisk._errors import CorruptImageError, NotQcow2Error, UnsupportedFeatureError

from ._constants import (
    COMPRESSION_ZLIB,
    COMPRESSION_ZSTD,
    EXT_BACKING_FORMAT,
    EXT_BITMAPS,
    EXT_CRYPTO_HEADER,
    EXT_DATA_FILE,
    EXT_END,
    EXT_FEATURE_TABLE,
    FEATURE_NAMES,
    HEADER_V2_LENGTH,
    HEADER_V3_LENGTH,
    HEADER_V3_LENGTH_WITH_COMPRESSION,
    INCOMPAT_COMPRESSION,
    INCOMPAT_EXTL2,
    KNOWN_AUTOCLEAR,
    KNOWN_INCOMPATIBLE,
    MAX_BACKING_FILE_NAME,
    MAX_CLUSTER_BITS,
    MAX_HOST_OFFSET,
    MAX_L1_BYTES,
    MAX_REFCOUNT_ORDER,
    MAX_REFTABLE_BYTES,
    MAX_SNAPSHOTS,
    MIN_CLUSTER_BITS,
    MIN_EXTL2_CLUSTER_BITS,
    QCOW2_MAGIC,
    FeatureType,
)

__all__ = [
    "MIN_HEADER_PROBE",
    "FeatureName",
    "HeaderExtension",
    "Qcow2Header",
    "cluster_size_of",
    "l1_entries_for",
    "parse_header",
]

_V2 = struct.Struct(">IIQIIQIIQQIIQ")  # 72 bytes: magic .. snapshots_offset
_V3 = struct.Struct(">QQQII")  # 32 bytes: features .. header_length
_EXT = struct.Struct(">II")
_FEATURE_ENTRY = 48
_MAX_BACKING_FORMAT = 15  # QEMU keeps it in char[16]

#: Bytes a caller must read to learn the cluster size (and so how much to read).
MIN_HEADER_PROBE = 24

_DEFAULT_SOURCE = "<header>"


def _round8(n: int) -> int:
    return (n + 7) & ~7


@attrs.define(frozen=True)
class HeaderExtension:
    """One header extension: its type and its data, kept verbatim."""

    type: int = attrs.field(validator=attrs.validators.instance_of(int))
    data: bytes = attrs.field(validator=attrs.validators.instance_of(bytes))


@attrs.define(frozen=True)
class FeatureName:
    """One entry of the feature-name table extension."""

    type: FeatureType
    bit: int
    name: str


def cluster_size_of(prefix: bytes, *, source: str = _DEFAULT_SOURCE) -> int:
    """The cluster size named by the first ``MIN_HEADER_PROBE`` bytes of a qcow2 file.

    Checks magic, version and cluster_bits, so a caller knows how many bytes to
    read for :func:`parse_header` (the header, its extensions and the backing
    name all live in the first cluster).
    """
    if len(prefix) < 4 or struct.unpack_from(">I", prefix)[0] != QCOW2_MAGIC:
        magic = prefix[:4].hex()
        msg = f"not a qcow2 image (magic {magic!r}, expected 514649fb)"
        raise NotQcow2Error(msg, path=source, field="magic", value=magic)
    if len(prefix) < MIN_HEADER_PROBE:
        msg = f"qcow2 header truncated at {len(prefix)} bytes"
        raise CorruptImageError(msg, path=source, field="header", value=len(prefix))
    version, cluster_bits = struct.unpack_from(">I", prefix, 4)[0], struct.unpack_from(
        ">I", prefix, 20
    )[0]
    _check_version(version, source)
    _check_cluster_bits(cluster_bits, source)
    return 1 << int(cluster_bits)


def _check_version(version: int, source: str) -> None:
    if version not in (2, 3):
        msg = f"unsupported qcow2 version {version} (boxdisk reads versions 2 and 3)"
        raise UnsupportedFeatureError(msg, path=source, field="version", value=version)


def _check_cluster_bits(cluster_bits: int, source: str) -> None:
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        msg = (
            f"cluster_bits {cluster_bits} out of range "
            f"({MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}, 512 B to 2 MiB clusters)"
        )
        raise CorruptImageError(msg, path=source, field="cluster_bits", value=cluster_bits)


def l1_entries_for(size: int, cluster_bits: int, *, extended_l2: bool = False) -> int:
    """L1 entries needed to map ``size`` bytes (QEMU's ``size_to_l1``)."""
    entry_bytes = 16 if extended_l2 else 8
    l2_bytes_mapped = (1 << cluster_bits) // entry_bytes << cluster_bits
    return -(-size // l2_bytes_mapped)


@attrs.define(frozen=True, kw_only=True)
class Qcow2Header:
    """A qcow2 header (version 2 or 3), its extensions and its backing name.

    ``extensions`` keeps every extension in file order, unknown ones verbatim,
    so a rewritten header loses nothing. ``backing_file_offset`` and
    ``backing_file_size`` describe where the name was found; :meth:`pack`
    recomputes them, so they take no part in equality.
    """

    version: int = 3
    cluster_bits: int
    size: int
    crypt_method: int = 0
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = HEADER_V3_LENGTH_WITH_COMPRESSION
    compression_type: int = COMPRESSION_ZLIB
    #: Bytes between the known fields and ``header_length``, kept verbatim.
    header_extra: bytes = b""
    extensions: tuple[HeaderExtension, ...] = ()
    backing_file: str | None = None
    backing_file_offset: int = attrs.field(default=0, eq=False)
    backing_file_size: int = attrs.field(default=0, eq=False)

    # -- derived facts ------------------------------------------------------

    @property
    def cluster_size(self) -> int:
        """Bytes per cluster."""
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        """Whether L2 entries are 128-bit with subcluster bitmaps."""
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def l2_entry_size(self) -> int:
        """Bytes per L2 entry (8, or 16 with extended L2)."""
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        """Entries per L2 table."""
        return self.cluster_size // self.l2_entry_size

    @property
    def refcount_bits(self) -> int:
        """Width of one refcount entry in bits."""
        return 1 << self.refcount_order

    @property
    def backing_format(self) -> str | None:
        """The backing format named by the backing-format extension, if any."""
        ext = self.extension(EXT_BACKING_FORMAT)
        return None if ext is None else ext.data.decode("ascii")

    @property
    def data_file(self) -> str | None:
        """The external data file name extension, if any (boxdisk refuses such images)."""
        ext = self.extension(EXT_DATA_FILE)
        return None if ext is None else ext.data.decode("utf-8", "replace")

    @property
    def feature_table(self) -> tuple[FeatureName, ...]:
        """The feature-name table extension, decoded."""
        ext = self.extension(EXT_FEATURE_TABLE)
        if ext is None:
            return ()
        out = []
        for pos in range(0, len(ext.data) - _FEATURE_ENTRY + 1, _FEATURE_ENTRY):
            ftype, bit = ext.data[pos], ext.data[pos + 1]
            raw = ext.data[pos + 2 : pos + _FEATURE_ENTRY].split(b"\0", 1)[0]
            if ftype in (0, 1, 2):
                out.append(FeatureName(FeatureType(ftype), bit, raw.decode("utf-8", "replace")))
        return tuple(out)

    def extension(self, ext_type: int) -> HeaderExtension | None:
        """The first extension of ``ext_type``, or None."""
        for ext in self.extensions:
            if ext.type == ext_type:
                return ext
        return None

    def feature_name(self, ftype: FeatureType, bit: int) -> str:
        """A human name for a feature bit: the image's table first, then QEMU's names."""
        for entry in self.feature_table:
            if entry.type == ftype and entry.bit == bit:
                return entry.name
        return FEATURE_NAMES.get((ftype, bit), f"unknown feature bit {bit}")

    def with_backing(self, name: str | None, backing_format: str | None) -> Qcow2Header:
        """This header with a new backing name and backing-format extension.

        ``backing_format=None`` removes the extension; other extensions stay in
        place, in order.
        """
        exts = [e for e in self.extensions if e.type != EXT_BACKING_FORMAT]
        if backing_format is not None:
            fmt = HeaderExtension(EXT_BACKING_FORMAT, backing_format.encode("ascii"))
            exts.insert(0, fmt)
        return attrs.evolve(self, backing_file=name, extensions=tuple(exts))

    def without_unknown_autoclear(self) -> Qcow2Header:
        """This header with the autoclear bits boxdisk does not know cleared.

        For a rewrite that leaves the image's data and metadata alone (a new
        backing name): docs/interop/qcow2.txt, "autoclear_features", asks a
        writer to clear the bits it does not know, as ``qemu-img rebase -u``
        does. The known ones describe what such a rewrite keeps true, and stay:
        bit 0 (the bitmaps extension matches the data, which is not touched) and
        bit 1 (the external data file is raw, which does not change).
        """
        return attrs.evolve(self, autoclear_features=self.autoclear_features & KNOWN_AUTOCLEAR)

    # -- bytes --------------------------------------------------------------

    def pack(self) -> bytes:
        """The header, its extensions, the end marker and the backing name, as bytes.

        The backing name goes right after the end marker, where QEMU puts it.
        Raises ``ValueError`` (via :class:`CorruptImageError`) when it all does
        not fit into the first cluster.
        """
        backing = b"" if self.backing_file is None else self.backing_file.encode("utf-8")
        parts = [
            _V2.pack(
                QCOW2_MAGIC,
                self.version,
                0,  # backing_file_offset, patched below
                0,
                self.cluster_bits,
                self.size,
                self.crypt_method,
                self.l1_size,
                self.l1_table_offset,
                self.refcount_table_offset,
                self.refcount_table_clusters,
                self.nb_snapshots,
                self.snapshots_offset,
            )
        ]
        if self.version >= 3:
            parts.append(
                _V3.pack(
                    self.incompatible_features,
                    self.compatible_features,
                    self.autoclear_features,
                    self.refcount_order,
                    self.header_length,
                )
            )
            if self.header_length > HEADER_V3_LENGTH:
                parts.append(bytes([self.compression_type]) + bytes(7))
                parts.append(self.header_extra)
        fixed = b"".join(parts)
        head_len = HEADER_V2_LENGTH if self.version == 2 else self.header_length
        if len(fixed) != head_len:
            msg = f"header fields take {len(fixed)} bytes but header_length is {head_len}"
            raise CorruptImageError(msg, field="header_length", value=head_len)
        out = bytearray(fixed)
        for ext in self.extensions:
            out += _EXT.pack(ext.type, len(ext.data))
            out += ext.data
            out += bytes(_round8(len(ext.data)) - len(ext.data))
        out += bytes(8)  # end of the header extension area
        if backing:
            struct.pack_into(">QI", out, 8, len(out), len(backing))
            out += backing
        if len(out) > self.cluster_size:
            msg = (
                f"header, extensions and backing name take {len(out)} bytes, "
                f"more than one {self.cluster_size}-byte cluster"
            )
            raise CorruptImageError(msg, field="backing_file", value=len(out))
        return bytes(out)


def parse_header(buf: bytes, *, source: str = _DEFAULT_SOURCE) -> Qcow2Header:
    """Parse and validate a qcow2 header from the first cluster of a file.

    ``buf`` is the first ``cluster_size`` bytes (fewer if the file is shorter).
    Raises :class:`NotQcow2Error`, :class:`CorruptImageError` or
    :class:`UnsupportedFeatureError` naming ``source`` and the field.
    """
    cluster_size = cluster_size_of(buf[:MIN_HEADER_PROBE], source=source)
    if len(buf) < HEADER_V2_LENGTH:
        msg = f"qcow2 header truncated at {len(buf)} bytes"
        raise CorruptImageError(msg, path=source, field="header", value=len(buf))
    (
        _magic,
        version,
        backing_file_offset,
        backing_file_size,
        cluster_bits,
        size,
        crypt_method,
        l1_size,
        l1_table_offset,
        refcount_table_offset,
        refcount_table_clusters,
        nb_snapshots,
        snapshots_offset,
    ) = _V2.unpack_from(buf)
    incompatible = compatible = autoclear = 0
    refcount_order = 4
    header_length = HEADER_V2_LENGTH
    compression_type = COMPRESSION_ZLIB
    header_extra = b""
    if version >= 3:
        if len(buf) < HEADER_V3_LENGTH:
            msg = f"qcow2 v3 header truncated at {len(buf)} bytes"
            raise CorruptImageError(msg, path=source, field="header", value=len(buf))
        incompatible, compatible, autoclear, refcount_order, header_length = _V3.unpack_from(
            buf, HEADER_V2_LENGTH
        )
        if header_length < HEADER_V3_LENGTH or header_length % 8:
            msg = f"header_length {header_length} is not a multiple of 8 of at least 104"
            raise CorruptImageError(msg, path=source, field="header_length", value=header_length)
        if header_length > cluster_size:
            msg = f"header_length {header_length} exceeds the {cluster_size}-byte cluster"
            raise CorruptImageError(msg, path=source, field="header_length", value=header_length)
        if header_length > len(buf):
            msg = f"header_length {header_length} runs past the end of the file"
            raise CorruptImageError(msg, path=source, field="header_length", value=header_length)
        if header_length > HEADER_V3_LENGTH:
            compression_type = buf[HEADER_V3_LENGTH]
            header_extra = bytes(buf[HEADER_V3_LENGTH_WITH_COMPRESSION:header_length])
    if refcount_order > MAX_REFCOUNT_ORDER:
        msg = f"refcount_order {refcount_order} exceeds {MAX_REFCOUNT_ORDER} (64-bit refcounts)"
        raise CorruptImageError(msg, path=source, field="refcount_order", value=refcount_order)

    extensions = _parse_extensions(buf, header_length, cluster_size, source)
    backing_file = _parse_backing_name(
        buf, backing_file_offset, backing_file_size, header_length, cluster_size, source
    )
    header = Qcow2Header(
        version=version,
        cluster_bits=cluster_bits,
        size=size,
        crypt_method=crypt_method,
        l1_size=l1_size,
        l1_table_offset=l1_table_offset,
        refcount_table_offset=refcount_table_offset,
        refcount_table_clusters=refcount_table_clusters,
        nb_snapshots=nb_snapshots,
        snapshots_offset=snapshots_offset,
        incompatible_features=incompatible,
        compatible_features=compatible,
        autoclear_features=autoclear,
        refcount_order=refcount_order,
        header_length=header_length,
        compression_type=compression_type,
        header_extra=header_extra,
        extensions=extensions,
        backing_file=backing_file,
        backing_file_offset=backing_file_offset,
        backing_file_size=backing_file_size,
    )
    validate_header(header, source=source)
    return header


def _parse_extensions(
    buf: bytes, start: int, cluster_size: int, source: str
) -> tuple[HeaderExtension, ...]:
    end = min(len(buf), cluster_size)
    pos = start
    out: list[HeaderExtension] = []
    seen: set[int] = set()
    # Every extension takes at least 8 bytes of the first cluster, so this ends.
    while True:
        if pos + _EXT.size > end:
            msg = f"header extension area runs past byte {end} without an end marker"
            raise CorruptImageError(msg, path=source, field="header_extensions", value=pos)
        ext_type, length = _EXT.unpack_from(buf, pos)
        if ext_type == EXT_END:
            break
        data_end = pos + _EXT.size + length
        if data_end > end:
            msg = (
                f"header extension 0x{ext_type:08x} at byte {pos} has length {length}, "
                f"past the end of the first cluster"
            )
            raise CorruptImageError(msg, path=source, field=f"extension 0x{ext_type:08x}",
                                    value=length)
        data = bytes(buf[pos + _EXT.size : data_end])
        if ext_type in (EXT_BACKING_FORMAT, EXT_DATA_FILE, EXT_FEATURE_TABLE, EXT_BITMAPS,
                        EXT_CRYPTO_HEADER):
            if ext_type in seen:
                msg = f"header extension 0x{ext_type:08x} appears twice"
                raise CorruptImageError(msg, path=source, field=f"extension 0x{ext_type:08x}",
                                        value=ext_type)
            seen.add(ext_type)
        if ext_type == EXT_BACKING_FORMAT:
            _check_backing_format(data, source)
        out.append(HeaderExtension(ext_type, data))
        pos += _EXT.size + _round8(length)
    return tuple(out)


def _check_backing_format(data: bytes, source: str) -> None:
    field = "backing format extension"
    if len(data) > _MAX_BACKING_FORMAT:
        msg = f"backing format name of {len(data)} bytes is longer than {_MAX_BACKING_FORMAT}"
        raise CorruptImageError(msg, path=source, field=field, value=len(data))
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        msg = f"backing format name {data!r} is not ASCII"
        raise CorruptImageError(msg, path=source, field=field, value=data) from None
    if not text.isprintable() or not text:
        msg = f"backing format name {data!r} is empty or not printable"
        raise CorruptImageError(msg, path=source, field=field, value=data)


def _parse_backing_name(
    buf: bytes, offset: int, size: int, header_length: int, cluster_size: int, source: str
) -> str | None:
    if offset == 0:
        return None
    if offset >= cluster_size:  # QEMU: "Invalid backing file offset" (iotests 080)
        msg = f"backing name offset {offset} lies past the first {cluster_size}-byte cluster"
        raise CorruptImageError(msg, path=source, field="backing_file_offset", value=offset)
    limit = min(MAX_BACKING_FILE_NAME, cluster_size - offset) if offset < cluster_size else -1
    if size > limit:
        msg = (
            f"backing name of {size} bytes at offset {offset} does not fit "
            f"(at most {MAX_BACKING_FILE_NAME} bytes, inside the first {cluster_size}-byte cluster)"
        )
        raise CorruptImageError(msg, path=source, field="backing_file_size", value=size)
    if offset < header_length:
        msg = f"backing name offset {offset} lies inside the {header_length}-byte header"
        raise CorruptImageError(msg, path=source, field="backing_file_offset", value=offset)
    if offset + size > len(buf):
        msg = f"backing name at offset {offset} runs past the end of the file"
        raise CorruptImageError(msg, path=source, field="backing_file_offset", value=offset)
    raw = bytes(buf[offset : offset + size])
    if not raw:
        return None
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        msg = f"backing name {raw!r} is not UTF-8"
        raise CorruptImageError(msg, path=source, field="backing_file", value=raw) from None
    if "\0" in name:
        msg = f"backing name {name!r} contains a NUL byte"
        raise CorruptImageError(msg, path=source, field="backing_file", value=name)
    return name


def _check_table(
    name: str, offset: int, nbytes: int, cluster_size: int, source: str, *, field: str
) -> None:
    """QEMU's validate_table_offset, plus: a non-empty table never starts in the header."""
    # QEMU checks the offset of an empty table too (080: "Invalid snapshot table offset").
    if offset % cluster_size or offset >= 1 << 63:
        msg = (f"{name} offset 0x{offset:x} is not aligned to the {cluster_size}-byte "
               f"cluster, or not below 2^63")
        raise CorruptImageError(msg, path=source, field=field, value=offset)
    if nbytes == 0:
        return
    if offset + nbytes > MAX_HOST_OFFSET:
        msg = f"{name} at 0x{offset:x} ({nbytes} bytes) reaches past 2^56"
        raise CorruptImageError(msg, path=source, field=field, value=offset)
    if offset < cluster_size:
        msg = f"{name} at offset 0x{offset:x} overlaps the header cluster"
        raise CorruptImageError(msg, path=source, field=field, value=offset)


def validate_header(header: Qcow2Header, *, source: str = _DEFAULT_SOURCE) -> None:
    """Check a header against the spec and QEMU's limits; raise naming the field."""
    h = header
    _check_version(h.version, source)
    _check_cluster_bits(h.cluster_bits, source)
    cs = h.cluster_size
    unknown = h.incompatible_features & ~KNOWN_INCOMPATIBLE
    if unknown:
        bits = [b for b in range(64) if unknown >> b & 1]
        names = ", ".join(
            f"bit {b} ({h.feature_name(FeatureType.INCOMPATIBLE, b)})" for b in bits
        )
        msg = f"unknown incompatible feature {names}"
        raise UnsupportedFeatureError(msg, path=source, field="incompatible_features",
                                      value=h.incompatible_features)
    if h.compression_type not in (COMPRESSION_ZLIB, COMPRESSION_ZSTD):
        msg = f"unknown compression_type {h.compression_type}"
        raise UnsupportedFeatureError(msg, path=source, field="compression_type",
                                      value=h.compression_type)
    has_bit = bool(h.incompatible_features & INCOMPAT_COMPRESSION)
    if has_bit != (h.compression_type != COMPRESSION_ZLIB):
        msg = (
            f"compression_type {h.compression_type} disagrees with the compression type "
            f"incompatible bit ({'set' if has_bit else 'clear'})"
        )
        raise CorruptImageError(msg, path=source, field="compression_type",
                                value=h.compression_type)
    if h.extended_l2 and h.cluster_bits < MIN_EXTL2_CLUSTER_BITS:
        msg = f"extended L2 entries need clusters of at least 16 KiB, not {cs} bytes"
        raise CorruptImageError(msg, path=source, field="cluster_bits", value=h.cluster_bits)
    if h.size >= 1 << 63:
        msg = f"virtual size {h.size} does not fit in a signed 64-bit offset"
        raise CorruptImageError(msg, path=source, field="size", value=h.size)
    if h.l1_size > MAX_L1_BYTES // 8:
        msg = f"l1_size {h.l1_size} entries exceeds QEMU's 32 MiB L1 limit"
        raise CorruptImageError(msg, path=source, field="l1_size", value=h.l1_size)
    needed = l1_entries_for(h.size, h.cluster_bits, extended_l2=h.extended_l2)
    if needed > MAX_L1_BYTES // 8:
        msg = f"virtual size {h.size} needs {needed} L1 entries, past QEMU's 32 MiB L1 limit"
        raise CorruptImageError(msg, path=source, field="size", value=h.size)
    if h.l1_size < needed:
        msg = f"L1 table of {h.l1_size} entries is too small for virtual size {h.size} ({needed})"
        raise CorruptImageError(msg, path=source, field="l1_size", value=h.l1_size)
    _check_table("L1 table", h.l1_table_offset, h.l1_size * 8, cs, source,
                 field="l1_table_offset")
    if h.refcount_table_clusters == 0:
        msg = "refcount table of 0 clusters cannot describe the header's own cluster"
        raise CorruptImageError(msg, path=source, field="refcount_table_clusters", value=0)
    if h.refcount_table_clusters > MAX_REFTABLE_BYTES // cs:
        msg = (
            f"refcount_table_clusters {h.refcount_table_clusters} exceeds QEMU's "
            f"8 MiB refcount table limit"
        )
        raise CorruptImageError(msg, path=source, field="refcount_table_clusters",
                                value=h.refcount_table_clusters)
    _check_table("refcount table", h.refcount_table_offset, h.refcount_table_clusters * cs, cs,
                 source, field="refcount_table_offset")
    if h.nb_snapshots > MAX_SNAPSHOTS:
        msg = f"nb_snapshots {h.nb_snapshots} exceeds QEMU's limit of {MAX_SNAPSHOTS}"
        raise CorruptImageError(msg, path=source, field="nb_snapshots", value=h.nb_snapshots)
    # Each snapshot table entry takes at least 40 bytes (the spec's fixed part).
    _check_table("snapshot table", h.snapshots_offset, h.nb_snapshots * 40, cs, source,
                 field="snapshots_offset")
    if h.backing_file is not None and len(h.backing_file.encode("utf-8")) > MAX_BACKING_FILE_NAME:
        msg = f"backing name longer than {MAX_BACKING_FILE_NAME} bytes"
        raise CorruptImageError(msg, path=source, field="backing_file",
                                value=len(h.backing_file.encode("utf-8")))


def unknown_extensions(header: Qcow2Header) -> Iterable[HeaderExtension]:
    """Extensions boxdisk does not interpret (kept verbatim on rewrite)."""
    known = {EXT_BACKING_FORMAT, EXT_FEATURE_TABLE, EXT_BITMAPS, EXT_CRYPTO_HEADER, EXT_DATA_FILE}
    return (e for e in header.extensions if e.type not in known)
