"""Making boxes and bases: ``add_base``, ``create_box``, ``import_box``, and their recovery.

Each is staged in a hidden directory named after the operation and published
by one rename; a crash before the rename leaves only the stage, which
recovery removes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from boxdisk._errors import (
    AlreadyExistsError,
    CorruptImageError,
    InvalidArgumentError,
)
from boxdisk._log import get_logger
from boxdisk.ops import check, flatten
from boxdisk.qcow2 import (
    DEFAULT_DISK_SIZE,
    BackingFormat,
    create_cow_child_disk,
    create_disk,
    read_header,
)

from ._core import StoreContext, base_key, box_key, ms
from ._fs import copy_sparse, dump_json, fsync_dir, make_read_only, remove_tree, write_new_file
from ._journal import Record, crashpoint, new_opid
from ._layout import BASE_META, BOX_META, CONTAINER_DISK, DISK_NAMES
from ._queries import box_value, host_bytes
from ._values import Box

__all__ = [
    "add_base",
    "check_standalone",
    "create_box",
    "import_box",
    "recover_add_base",
    "recover_staged_box",
]

log = get_logger(__name__)


def check_standalone(path: Path, *, source: Path) -> int:
    """Refuse a qcow2 with a backing file or one that does not check clean; its size."""
    header = read_header(path)
    if header.backing_file is not None:
        msg = (f"image has a backing file ({header.backing_file!r}); the store takes "
               f"standalone images only (flatten it first)")
        raise InvalidArgumentError(msg, path=source, field="backing_file",
                                   value=header.backing_file)
    report = check(path)
    if report.corruptions or report.check_errors:
        msg = (f"image does not check clean: {report.corruptions} corruptions, "
               f"{report.check_errors} check errors")
        raise CorruptImageError(msg, path=source, field="check",
                                value=(report.corruptions, report.check_errors))
    return header.size


def add_base(ctx: StoreContext, src: Path, name: str, fmt: BackingFormat, *,
             link: bool) -> Path:
    """Copy (or hard-link) ``src`` into the store as base ``name``; its image path."""
    start = time.perf_counter()
    key = base_key(name)
    lay = ctx.layout
    with ctx.operation("add_base", (key,)):
        final = lay.base_dir(name)
        if os.path.lexists(final):
            msg = f"base {name!r} already exists"
            raise AlreadyExistsError(msg, path=final, field="base", value=name)
        opid = new_opid()
        stage = lay.bases / f".stage-{opid}"
        data = {"name": name, "stage": lay.rel(stage)}
        with ctx.intent("add_base", (key,), data, opid):
            crashpoint("add_base", "recorded")
            stage.mkdir()
            target = stage / f"disk.{fmt.value}"
            if link:
                os.link(src, target)
            else:
                copy_sparse(src, target)
            size = target.stat().st_size
            if fmt is BackingFormat.QCOW2:
                size = check_standalone(target, source=src)
            write_new_file(stage / BASE_META, dump_json({
                "name": name, "format": fmt.value, "created": time.time(),
                "source": os.fspath(src), "size": size, "linked": link}))
            if not link:
                make_read_only(target)
            fsync_dir(stage)
            crashpoint("add_base", "staged")
            os.rename(stage, final)
            fsync_dir(lay.bases)
            crashpoint("add_base", "committed")
    log.info("base_added", name=name, format=fmt.value, size=size, linked=link, ms=ms(start))
    return final / f"disk.{fmt.value}"


def recover_add_base(ctx: StoreContext, record: Record) -> None:
    """The rename of the stage is the commit: a leftover stage was never one."""
    remove_tree(ctx.layout.abs(record.data["stage"]))


def create_box(ctx: StoreContext, box_id: str, *, base: str | None, size: int | None,
               guest_base: str | None) -> Box:
    """Create one box (arguments already checked)."""
    start = time.perf_counter()
    key = box_key(box_id)
    lay = ctx.layout
    with ctx.operation("create_box", (key,)):
        final = lay.box_dir(box_id)
        if os.path.lexists(final):
            msg = f"box {box_id!r} already exists"
            raise AlreadyExistsError(msg, path=final, field="box_id", value=box_id)
        base_img = None if base is None else ctx.base_image(base)
        guest_img = None if guest_base is None else ctx.base_image(guest_base)
        opid = new_opid()
        stage = lay.boxes / f".stage-{opid}"
        meta: dict[str, Any] = {"id": box_id, "created": time.time(), "base": base,
                                "guest_base": guest_base, "clone_of": None}
        with ctx.intent("create_box", (key,), {"box": box_id, "stage": lay.rel(stage)}, opid):
            crashpoint("create_box", "recorded")
            stage.mkdir()
            write_new_file(stage / BOX_META, dump_json(meta))
            if base_img is None:
                create_disk(stage / CONTAINER_DISK, persistent=True,
                            size=DEFAULT_DISK_SIZE if size is None else size)
            else:
                create_cow_child_disk(base_img[0], base_img[1], stage / CONTAINER_DISK, size,
                                      relative=True, persistent=True)
            if guest_img is not None:
                create_cow_child_disk(guest_img[0], guest_img[1], stage / DISK_NAMES[1],
                                      relative=True, persistent=True)
            crashpoint("create_box", "staged")
            os.rename(stage, final)
            fsync_dir(lay.boxes)
            crashpoint("create_box", "committed")
    guest = final / DISK_NAMES[1] if guest_img is not None else None
    box = Box(id=box_id, dir=final, disk=final / CONTAINER_DISK, guest_disk=guest,
              base=base, guest_base=guest_base, snapshots=(),
              size=read_header(final / CONTAINER_DISK).size,
              guest_size=None if guest is None else read_header(guest).size,
              host_bytes=host_bytes(final), created=meta["created"])
    log.info("box_created", box=box_id, base=base, guest_base=guest_base, ms=ms(start))
    return box


def recover_staged_box(ctx: StoreContext, record: Record) -> None:
    """The rename of the staging directory is the commit: a leftover stage was never one."""
    remove_tree(ctx.layout.abs(record.data["stage"]))


def import_box(ctx: StoreContext, box_id: str, src: Path, fmt: str) -> Box:
    """Make the standalone image ``src`` (checked by the caller) the new box ``box_id``."""
    start = time.perf_counter()
    key = box_key(box_id)
    lay = ctx.layout
    with ctx.operation("import_box", (key,)):
        final = lay.box_dir(box_id)
        if os.path.lexists(final):
            msg = f"box {box_id!r} already exists"
            raise AlreadyExistsError(msg, path=final, field="box_id", value=box_id)
        opid = new_opid()
        stage = lay.boxes / f".stage-{opid}"
        meta = {"id": box_id, "created": time.time(), "base": None, "guest_base": None,
                "clone_of": None, "imported_from": os.fspath(src)}
        with ctx.intent("import_box", (key,), {"box": box_id, "stage": lay.rel(stage)}, opid):
            crashpoint("import_box", "recorded")
            stage.mkdir()
            write_new_file(stage / BOX_META, dump_json(meta))
            flatten(src, stage / CONTAINER_DISK, src_format=fmt)
            fsync_dir(stage)
            crashpoint("import_box", "staged")
            os.rename(stage, final)
            fsync_dir(lay.boxes)
            crashpoint("import_box", "committed")
    log.info("box_imported", box=box_id, image=os.fspath(src), ms=ms(start))
    return box_value(ctx, box_id, final, meta)

