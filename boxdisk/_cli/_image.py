"""Image commands, named and shaped like qemu-img's: create, info, check, map, compare, ...

Output formats follow qemu-img's so scripts written for one read the other:
``--output=json`` prints the same keys (``virtual-size``, ``cluster-size``,
``backing-filename``, ...) and exit codes mean the same things (``check``: 0
clean, 2 corruptions, 3 leaks only; ``compare``: 0 identical, 1 different,
2 error).

Formats: a backing file's format always comes from its header (never probed).
The top image's format is ``-f`` when given; otherwise a name ending in
``.raw``, ``.ext4``, ``.iso`` or ``.bin`` is raw, and anything else is qcow2
when it starts with the qcow2 magic and raw when it does not. A file named as
raw is never parsed as qcow2, so a guest's raw disk cannot pose as a qcow2
that names a host file as its backing file.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from boxdisk._errors import BackingChainError, CorruptImageError, InvalidArgumentError

from ._progress import progress_for
from ._sizes import format_size, parse_size

__all__ = ["add_image_commands", "top_format"]

_RAW_NAMES = (".raw", ".ext4", ".iso", ".bin")
_QCOW2_MAGIC = b"QFI\xfb"
_MAX_CHAIN = 64


def top_format(path: str, explicit: str | None) -> str:
    """The format to open a user-named top image as (see the module docstring)."""
    if explicit is not None:
        if explicit not in ("raw", "qcow2"):
            msg = f"unknown format {explicit!r} (boxdisk reads raw and qcow2)"
            raise InvalidArgumentError(msg, path=path, field="format", value=explicit)
        return explicit
    if path.lower().endswith(_RAW_NAMES):
        return "raw"
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError:
        return "qcow2"  # let the open that follows report the real error
    return "qcow2" if magic == _QCOW2_MAGIC else "raw"


def _json(value: Any) -> None:
    print(json.dumps(value, indent=4))


# -- create ---------------------------------------------------------------------------


def _parse_options(text: str | None) -> dict[str, str]:
    opts: dict[str, str] = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            msg = f"option {item!r} is not KEY=VALUE"
            raise InvalidArgumentError(msg, field="options", value=item)
        opts[key.strip()] = value.strip()
    unknown = set(opts) - {"cluster_size"}
    if unknown:
        msg = (f"unsupported option(s) {', '.join(sorted(unknown))}; boxdisk creates qcow2 v3 "
               f"images and takes only cluster_size")
        raise InvalidArgumentError(msg, field="options", value=sorted(unknown))
    return opts


def _cmd_create(args: argparse.Namespace) -> int:
    from boxdisk.qcow2 import (  # noqa: PLC0415 - commands import what they need
        DEFAULT_CLUSTER_SIZE,
        create_cow_child_disk,
        create_disk,
    )

    opts = _parse_options(args.options)
    cluster_size = parse_size(opts.get("cluster_size", str(DEFAULT_CLUSTER_SIZE)),
                              what="cluster_size")
    size = None if args.size is None else parse_size(args.size)
    path = Path(args.path)
    if args.format == "raw":
        if args.backing is not None:
            msg = "a raw image cannot have a backing file"
            raise InvalidArgumentError(msg, path=path, field="backing_file")
        if size is None:
            msg = "a size is needed for an image without a backing file"
            raise InvalidArgumentError(msg, path=path, field="size")
        _create_raw(path, size)
    elif args.backing is not None:
        if args.backing_format is None:
            msg = "-F BACKING_FMT is required with -b (boxdisk never probes a backing file)"
            raise InvalidArgumentError(msg, path=path, field="backing_format")
        # As qemu-img: a relative backing name is relative to the new image's directory,
        # and it is stored relative.
        relative = not os.path.isabs(args.backing)
        base = Path(args.backing) if not relative else path.parent / args.backing
        create_cow_child_disk(base, args.backing_format, path, size, relative=relative,
                              persistent=True, cluster_size=cluster_size)
    else:
        if size is None:
            msg = "a size is needed for an image without a backing file"
            raise InvalidArgumentError(msg, path=path, field="size")
        create_disk(path, persistent=True, size=size, cluster_size=cluster_size)
    if not args.quiet:
        from boxdisk.qcow2 import qcow2_virtual_size  # noqa: PLC0415

        shown = (size if args.format == "raw" else qcow2_virtual_size(path))
        extra = ""
        if args.backing is not None:
            extra = f" backing_file={args.backing} backing_fmt={args.backing_format}"
        if args.format == "qcow2":
            extra = f" cluster_size={cluster_size}" + extra
        print(f"Formatting '{args.path}', fmt={args.format}{extra} size={shown}")
    return 0


def _create_raw(path: Path, size: int) -> None:
    from boxdisk.qcow2 import _fsync_dir  # noqa: PLC0415

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        from boxdisk._errors import DiskExistsError  # noqa: PLC0415

        msg = "path exists; not overwriting"
        raise DiskExistsError(msg, path=path) from None
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(str(path.parent))


# -- info -------------------------------------------------------------------------------


def _actual_size(path: str) -> int:
    return os.stat(path).st_blocks * 512


def _full_backing(image: str, name: str) -> str:
    """QEMU's path_combine: a relative backing name is relative to the image's directory."""
    return name if os.path.isabs(name) else os.path.join(os.path.dirname(image), name)


def image_info(path: str, fmt: str) -> dict[str, Any]:
    """``qemu-img info --output=json`` facts of one image, under qemu-img's keys."""
    if fmt == "raw":
        return {"virtual-size": os.stat(path).st_size, "filename": path, "format": "raw",
                "actual-size": _actual_size(path), "dirty-flag": False}
    from boxdisk.format import (  # noqa: PLC0415
        COMPAT_LAZY_REFCOUNTS,
        INCOMPAT_CORRUPT,
        INCOMPAT_DIRTY,
    )
    from boxdisk.qcow2 import read_header  # noqa: PLC0415

    h = read_header(path)
    data: dict[str, Any] = {
        "compat": "0.10" if h.version == 2 else "1.1",
        "compression-type": "zstd" if h.compression_type == 1 else "zlib",
    }
    if h.version >= 3:
        data["lazy-refcounts"] = bool(h.compatible_features & COMPAT_LAZY_REFCOUNTS)
    data["refcount-bits"] = h.refcount_bits
    if h.version >= 3:
        data["corrupt"] = bool(h.incompatible_features & INCOMPAT_CORRUPT)
        data["extended-l2"] = h.extended_l2
    info: dict[str, Any] = {
        "virtual-size": h.size, "filename": path, "cluster-size": h.cluster_size,
        "format": "qcow2", "actual-size": _actual_size(path),
        "format-specific": {"type": "qcow2", "data": data},
    }
    if h.backing_file is not None:
        if h.backing_format is not None:
            info["backing-filename-format"] = h.backing_format
        info["full-backing-filename"] = _full_backing(path, h.backing_file)
        info["backing-filename"] = h.backing_file
    info["dirty-flag"] = bool(h.incompatible_features & INCOMPAT_DIRTY)
    return info


def _chain_infos(path: str, fmt: str, backing_chain: bool) -> Iterator[dict[str, Any]]:
    seen: set[tuple[int, int]] = set()
    names: list[str] = []
    for _ in range(_MAX_CHAIN):
        st = os.stat(path)
        if (st.st_dev, st.st_ino) in seen:
            msg = f"backing chain loops back to {path!r}"
            raise BackingChainError(msg, path=names[-1], field="backing_file", value=path,
                                    chain=tuple(names))
        seen.add((st.st_dev, st.st_ino))
        names.append(path)
        info = image_info(path, fmt)
        yield info
        if not backing_chain or "backing-filename" not in info:
            return
        if "backing-filename-format" not in info:
            msg = ("names a backing file without a backing format; boxdisk does not probe "
                   "(set one with: boxdisk rebase -u -b NAME -F FMT)")
            raise BackingChainError(msg, path=path, field="backing_format",
                                    value=info["backing-filename"], chain=tuple(names))
        path, fmt = info["full-backing-filename"], info["backing-filename-format"]
    msg = f"backing chain is deeper than {_MAX_CHAIN} images"
    raise BackingChainError(msg, path=path, field="backing_file", chain=tuple(names))


def _print_info_human(info: dict[str, Any]) -> None:
    print(f"image: {info['filename']}")
    print(f"file format: {info['format']}")
    print(f"virtual size: {format_size(info['virtual-size'])} ({info['virtual-size']} bytes)")
    print(f"disk size: {format_size(info['actual-size'])}")
    if "cluster-size" in info:
        print(f"cluster_size: {info['cluster-size']}")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        if info["full-backing-filename"] != info["backing-filename"]:
            line += f" (actual path: {info['full-backing-filename']})"
        print(line)
        if "backing-filename-format" in info:
            print(f"backing file format: {info['backing-filename-format']}")
    if info.get("dirty-flag"):
        print("cleanly shut down: no")
    specific = info.get("format-specific")
    if specific:
        print("Format specific information:")
        for key, value in specific["data"].items():
            shown = str(value).lower() if isinstance(value, bool) else value
            print(f"    {key.replace('-', ' ')}: {shown}")


def _cmd_info(args: argparse.Namespace) -> int:
    infos = list(_chain_infos(args.image, top_format(args.image, args.format),
                              args.backing_chain))
    if args.output == "json":
        _json(infos if args.backing_chain else infos[0])
        return 0
    for i, info in enumerate(infos):
        if i:
            print()
        _print_info_human(info)
    return 0


# -- check ------------------------------------------------------------------------------


def _cmd_check(args: argparse.Namespace) -> int:
    from boxdisk.ops import check  # noqa: PLC0415

    fmt = top_format(args.image, args.format)
    if fmt != "qcow2":
        msg = f"this image format ({fmt}) does not support checks"
        raise InvalidArgumentError(msg, path=args.image, field="format", value=fmt)
    report = check(args.image, repair=args.repair)
    if args.output == "json":
        _json(report.as_qemu_json())
    else:
        _print_check_human(report)
    if report.check_errors:
        return 1
    if report.corruptions:
        return 2
    if report.leaks:
        return 3
    return 0


def _print_check_human(report: Any) -> None:
    for finding in report.findings:
        print(str(finding))
    if report.leaks_fixed or report.corruptions_fixed:
        print(f"The following inconsistencies were found and repaired:\n\n"
              f"    {report.leaks_fixed} leaked clusters\n"
              f"    {report.corruptions_fixed} corruptions\n")
    if not (report.corruptions or report.leaks or report.check_errors):
        print("No errors were found on the image.")
    else:
        if report.corruptions:
            print(f"\n{report.corruptions} errors were found on the image.\n"
                  "Data may be corrupted, or further writes to the image may corrupt it.")
        if report.leaks:
            print(f"\n{report.leaks} leaked clusters were found on the image.\n"
                  "This means waste of disk space, but no harm to data.")
        if report.check_errors:
            print(f"\n{report.check_errors} internal errors have occurred during the check.")
    total = report.total_clusters
    if total:
        def pct(n: int) -> str:
            return f"{n * 100 / total:.2f}%"

        print(f"{report.allocated_clusters}/{total} = {pct(report.allocated_clusters)} "
              f"allocated, {pct(report.fragmented_clusters)} fragmented, "
              f"{pct(report.compressed_clusters)} compressed clusters")
    if report.image_end_offset:
        print(f"Image end offset: {report.image_end_offset}")


# -- map --------------------------------------------------------------------------------


def _cmd_map(args: argparse.Namespace) -> int:
    from boxdisk.chain import open_chain  # noqa: PLC0415

    with open_chain(args.image, format=top_format(args.image, args.format)) as chain:
        extents = list(chain.map())
    if args.output == "json":
        rows = []
        for e in extents:
            d = e.as_qemu_json()
            text = ", ".join(f'"{k}": {json.dumps(v)}' for k, v in d.items())
            rows.append("{ " + text + "}")
        print("[" + ",\n".join(rows) + "]")
        return 0
    print(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File")

    def hx(n: int) -> str:
        return f"{n:#x}" if n else "0"

    for e in extents:
        if e.data and not e.zero:
            if e.offset is None:
                msg = "file contains compressed clusters: use --output=json"
                raise CorruptImageError(msg, path=args.image, field="map")
            print(f"{hx(e.start):<16}{hx(e.length):<16}{hx(e.offset):<16}{e.file or ''}")
    return 0


# -- compare ----------------------------------------------------------------------------


def _cmd_compare(args: argparse.Namespace) -> int:
    from boxdisk.ops import compare  # noqa: PLC0415

    result = compare(args.image1, args.image2,
                     format_a=top_format(args.image1, args.format_a),
                     format_b=top_format(args.image2, args.format_b),
                     force_share=args.force_share)
    if result.size_a != result.size_b and not args.quiet:
        print("Warning: Image size mismatch!")
    if result.identical:
        if not args.quiet:
            print("Images are identical.")
        return 0
    if not args.quiet:
        print(f"Content mismatch at offset {result.offset}!")
    return 1


# -- convert / flatten --------------------------------------------------------------------


def _cmd_convert(args: argparse.Namespace) -> int:
    from boxdisk.ops import convert  # noqa: PLC0415

    bar = progress_for("convert", args.progress)
    try:
        convert(args.src, args.dst, output_format=args.output_format,
                src_format=top_format(args.src, args.format), overwrite=args.overwrite,
                progress=bar, force_share=args.force_share)
    finally:
        if bar is not None:
            bar.close()
    return 0


def _cmd_flatten(args: argparse.Namespace) -> int:
    from boxdisk.ops import flatten  # noqa: PLC0415

    bar = progress_for("flatten", args.progress)
    try:
        flatten(args.src, args.dst, src_format=top_format(args.src, args.format),
                overwrite=args.overwrite, progress=bar, force_share=args.force_share)
    finally:
        if bar is not None:
            bar.close()
    return 0


# -- rebase / commit / resize -----------------------------------------------------------


def _cmd_rebase(args: argparse.Namespace) -> int:
    from boxdisk.ops import rebase  # noqa: PLC0415

    new: str | None = args.backing or None
    if new is not None and args.backing_format is None:
        msg = "-F BACKING_FMT is required with -b (boxdisk never probes a backing file)"
        raise InvalidArgumentError(msg, path=args.image, field="backing_format")
    relative = new is not None and not os.path.isabs(new)
    if relative:
        assert new is not None
        new = os.path.join(os.path.dirname(args.image), new)
    bar = progress_for("rebase", args.progress and not args.unsafe)
    try:
        rebase(args.image, new, backing_format=args.backing_format if new else None,
               safe=not args.unsafe, relative=relative, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    return 0


def _cmd_commit(args: argparse.Namespace) -> int:
    from boxdisk.ops import commit  # noqa: PLC0415

    bar = progress_for("commit", args.progress)
    try:
        commit(args.image, base=args.base, keep_top=args.keep, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    if not args.quiet:
        print("Image committed.")
    return 0


def _cmd_resize(args: argparse.Namespace) -> int:
    from boxdisk.ops import resize  # noqa: PLC0415
    from boxdisk.qcow2 import qcow2_virtual_size  # noqa: PLC0415

    text: str = args.size
    old = qcow2_virtual_size(args.image)
    if text[:1] in "+-":
        delta = parse_size(text[1:])
        new = old + delta if text[0] == "+" else old - delta
    else:
        new = parse_size(text)
    if new < old and not args.shrink:
        msg = f"shrinking from {old} to {new} bytes needs --shrink (data past the end is lost)"
        raise InvalidArgumentError(msg, path=args.image, field="size", value=new)
    resize(args.image, new)
    if not args.quiet:
        print("Image resized.")
    return 0


# -- the parser -----------------------------------------------------------------------------


def add_image_commands(sub: Any) -> None:
    """Add the qemu-img-shaped commands to the ``boxdisk`` subparsers."""
    outputs = ("human", "json")

    p = sub.add_parser("create", help="create a qcow2 (or raw) image, optionally a COW child")
    p.add_argument("-f", dest="format", choices=("qcow2", "raw"), default="qcow2")
    p.add_argument("-b", dest="backing", metavar="BACKING_FILE")
    p.add_argument("-F", dest="backing_format", choices=("qcow2", "raw"))
    p.add_argument("-o", dest="options", metavar="OPTIONS", help="cluster_size=SIZE")
    p.add_argument("-q", dest="quiet", action="store_true", help="print nothing")
    p.add_argument("path", metavar="FILENAME")
    p.add_argument("size", nargs="?", metavar="SIZE", help="e.g. 10G (default: the backing's)")
    p.set_defaults(func=_cmd_create)

    p = sub.add_parser("info", help="show an image's facts (qemu-img info)")
    p.add_argument("-f", dest="format", choices=("qcow2", "raw"))
    p.add_argument("--backing-chain", action="store_true", help="every image of the chain")
    p.add_argument("--output", choices=outputs, default="human")
    p.add_argument("image", metavar="FILENAME")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("check", help="check (and repair) an image's metadata")
    p.add_argument("-f", dest="format", choices=("qcow2", "raw"))
    p.add_argument("-r", dest="repair", choices=("leaks", "all"))
    p.add_argument("--output", choices=outputs, default="human")
    p.add_argument("image", metavar="FILENAME")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("map", help="where each guest byte of a chain lives")
    p.add_argument("-f", dest="format", choices=("qcow2", "raw"))
    p.add_argument("--output", choices=outputs, default="human")
    p.add_argument("image", metavar="FILENAME")
    p.set_defaults(func=_cmd_map)

    p = sub.add_parser("compare", help="compare what two disks show the guest")
    p.add_argument("-f", dest="format_a", choices=("qcow2", "raw"))
    p.add_argument("-F", dest="format_b", choices=("qcow2", "raw"))
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="read images another process is writing (may be inconsistent)")
    p.add_argument("image1", metavar="FILENAME1")
    p.add_argument("image2", metavar="FILENAME2")
    p.set_defaults(func=_cmd_compare, error_exit=2)

    for name, func, what in (("convert", _cmd_convert, "copy a chain or raw file into a "
                                                       "standalone image"),
                             ("flatten", _cmd_flatten, "write a chain as one standalone qcow2")):
        p = sub.add_parser(name, help=what)
        p.add_argument("-f", dest="format", choices=("qcow2", "raw"))
        if name == "convert":
            p.add_argument("-O", dest="output_format", choices=("qcow2", "raw"), default="raw")
        p.add_argument("-p", dest="progress", action="store_true", help="show progress")
        p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
        p.add_argument("-U", "--force-share", action="store_true",
                       help="copy an image another process is writing (may be inconsistent)")
        p.add_argument("src", metavar="SRC")
        p.add_argument("dst", metavar="DST")
        p.set_defaults(func=func)

    p = sub.add_parser("rebase", help="change an image's backing file (safe by default)")
    p.add_argument("-u", dest="unsafe", action="store_true", help="header only, copy nothing")
    p.add_argument("-b", dest="backing", required=True, metavar="BACKING_FILE",
                   help='new backing file ("" makes the image standalone)')
    p.add_argument("-F", dest="backing_format", choices=("qcow2", "raw"))
    p.add_argument("-p", dest="progress", action="store_true")
    p.add_argument("image", metavar="FILENAME")
    p.set_defaults(func=_cmd_rebase)

    p = sub.add_parser("commit", help="write an image's data into its backing file")
    p.add_argument("-b", dest="base", metavar="BASE", help="commit down to this image")
    p.add_argument("-d", dest="keep", action="store_true", help="keep the top's data")
    p.add_argument("-p", dest="progress", action="store_true")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("image", metavar="FILENAME")
    p.set_defaults(func=_cmd_commit)

    p = sub.add_parser("resize", help="grow (or, with --shrink, shrink) an image")
    p.add_argument("--shrink", action="store_true", help="allow making the image smaller")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("image", metavar="FILENAME")
    p.add_argument("size", metavar="[+|-]SIZE")
    p.set_defaults(func=_cmd_resize)
