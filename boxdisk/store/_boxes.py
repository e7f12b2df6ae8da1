"""Making boxes and bases: ``add_base``, ``create_box``, ``create_boxes``, ``import_box``.

Each box (or base) is staged in a hidden directory named after the operation,
made durable by one barrier, and published by one rename, whose directory is
then fsynced: two durable calls (``docs/store.md`` lists the steps). A crash
before the rename leaves only the stage, which recovery removes; a batch is
published by one rename per box under the store lock, and recovery finishes
the renames of a batch that had begun them.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

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
    ImagePlan,
    plan_child_disk,
    plan_disk,
    read_header,
)

from ._core import StoreContext, base_key, box_key, ms
from ._fs import copy_sparse, dump_json, fsync_dir, make_read_only, remove_tree, write_file
from ._journal import Record, crashpoint, new_opid
from ._layout import BASE_META, BOX_META, CONTAINER_DISK, DISK_NAMES
from ._queries import box_value
from ._values import Box

__all__ = [
    "BoxSpec",
    "add_base",
    "check_standalone",
    "create_box",
    "create_boxes",
    "import_box",
    "recover_create_boxes",
    "recover_staged",
]

log = get_logger(__name__)


@attrs.define(frozen=True)
class BoxSpec:
    """One box of :meth:`BoxStore.create_boxes`: its id, and what ``create_box`` would take."""

    id: str
    base: str | None = None
    size: int | None = None
    guest_base: str | None = None


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


# -- bases -----------------------------------------------------------------------------------


# -- the shape all three share: stage, barrier, publish ------------------------------------


@contextlib.contextmanager
def _published(ctx: StoreContext, op: str, key: str, final: Path, what: str,
               field: str, value: str, data: dict[str, Any]) -> Iterator[tuple[Path, list[Path]]]:
    """Stage a new directory for the block, then make it durable and publish it as ``final``.

    The block gets the stage (already made) and a list it fills with the files
    it wrote; then one barrier (those files and the stage), the rename, and an
    fsync of the parent: the two durable calls of ``docs/store.md``. ``final``
    taken is :class:`AlreadyExistsError` naming ``what``.
    """
    lay = ctx.layout
    parent = final.parent
    with ctx.operation(op, (key,)):
        if os.path.lexists(final):
            msg = f"{what} {value!r} already exists"
            raise AlreadyExistsError(msg, path=final, field=field, value=value)
        opid = new_opid()
        stage = parent / f".stage-{opid}"
        with ctx.intent(op, (key,), {**data, "stage": lay.rel(stage)}, opid):
            crashpoint(op, "recorded")
            os.mkdir(stage)
            written: list[Path] = []
            yield stage, written
            crashpoint(op, "staged")
            ctx.barrier([*written, stage])  # durable call 1
            crashpoint(op, "synced")
            os.rename(stage, final)
            fsync_dir(parent)  # durable call 2
            crashpoint(op, "committed")


def recover_staged(ctx: StoreContext, record: Record) -> None:
    """The rename of the stage is the commit: a leftover stage was never one."""
    remove_tree(ctx.layout.abs(record.data["stage"]))


def add_base(ctx: StoreContext, src: Path, name: str, fmt: BackingFormat, *,
             link: bool) -> Path:
    """Copy (or hard-link) ``src`` into the store as base ``name``; its image path."""
    start = time.perf_counter()
    final = ctx.layout.base_dir(name)
    with _published(ctx, "add_base", base_key(name), final, "base", "base", name,
                    {"name": name}) as (stage, written):
        target = stage / f"disk.{fmt.value}"
        if link:
            os.link(src, target)
        else:
            copy_sparse(src, target)
        size = target.stat().st_size
        if fmt is BackingFormat.QCOW2:
            size = check_standalone(target, source=src)
        write_file(stage / BASE_META, dump_json({
            "name": name, "format": fmt.value, "created": time.time(),
            "source": os.fspath(src), "size": size, "linked": link}))
        if not link:
            make_read_only(target)
        written.extend([target, stage / BASE_META])
    log.info("base_added", name=name, format=fmt.value, size=size, linked=link, ms=ms(start))
    return final / f"disk.{fmt.value}"


# -- boxes -----------------------------------------------------------------------------------


class _Planner:
    """The images of new boxes, planned once per (base, size, disk) and kept in the context.

    Every child of one base, over the same relative name, is byte for byte the
    same image: a plan is reused while the base's file is the same one (its
    inode and mtime, one ``stat`` per box).
    """

    def __init__(self, ctx: StoreContext) -> None:
        self._ctx = ctx
        self._plans = ctx.plans
        #: Plans this planner checked against their base already (a batch checks once).
        self._checked: dict[tuple[str | None, int | None, str], ImagePlan] = {}

    def plan(self, base: str | None, size: int | None, disk: str, stage: Path) -> ImagePlan:
        key = (base, size, disk)
        checked = self._checked.get(key)
        if checked is not None:
            return checked
        self._checked[key] = plan = self._plan(key, base, size, disk, stage)
        return plan

    def _plan(self, key: tuple[str | None, int | None, str], base: str | None,
              size: int | None, disk: str, stage: Path) -> ImagePlan:
        if base is None:
            stamp: object = None
        else:
            path, fmt = self._ctx.base_image(base)
            st = os.stat(path)
            stamp = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._plans.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        if base is None:
            plan = plan_disk(DEFAULT_DISK_SIZE if size is None else size)
        else:
            plan = plan_child_disk(path, fmt, stage / disk, size, relative=True)
        self._plans[key] = (stamp, plan)
        return plan


def _stage_box(planner: _Planner, stage: Path, spec: BoxSpec,
               meta: dict[str, Any]) -> tuple[list[Path], int, int | None]:
    """Write a box into the (new, empty) ``stage``; the files written, and the disks' sizes."""
    os.mkdir(stage / "snapshots")
    box_json, disk = stage / BOX_META, stage / CONTAINER_DISK
    write_file(box_json, dump_json(meta))
    plan = planner.plan(spec.base, spec.size, CONTAINER_DISK, stage)
    write_file(disk, plan.writes, plan.file_size)
    paths = [box_json, disk]
    guest_size = None
    if spec.guest_base is not None:
        guest = planner.plan(spec.guest_base, None, DISK_NAMES[1], stage)
        write_file(stage / DISK_NAMES[1], guest.writes, guest.file_size)
        paths.insert(2, stage / DISK_NAMES[1])
        guest_size = guest.size
    return paths, plan.size, guest_size


def _meta(spec: BoxSpec) -> dict[str, Any]:
    return {"id": spec.id, "created": time.time(), "base": spec.base,
            "guest_base": spec.guest_base, "clone_of": None}


def _box(final: Path, spec: BoxSpec, meta: dict[str, Any], size: int,
         guest_size: int | None) -> Box:
    """The value of a box just made: its files are known, nothing is walked."""
    disk = final / CONTAINER_DISK
    guest = final / DISK_NAMES[1] if guest_size is not None else None
    files = (final / BOX_META, disk) if guest is None else (final / BOX_META, disk, guest)
    used = sum(os.lstat(f).st_blocks * 512 for f in files)
    return Box(id=spec.id, dir=final, disk=disk, guest_disk=guest,
               base=spec.base, guest_base=spec.guest_base, snapshots=(), size=size,
               guest_size=guest_size, host_bytes=used, created=meta["created"])


def create_box(ctx: StoreContext, box_id: str, *, base: str | None, size: int | None,
               guest_base: str | None) -> Box:
    """Create one box (arguments already checked)."""
    start = time.perf_counter()
    spec = BoxSpec(box_id, base, size, guest_base)
    for b in (base, guest_base):
        if b is not None:
            ctx.base_image(b)  # an unknown base: NotFoundError before anything is written
    final = ctx.layout.box_dir(box_id)
    meta = _meta(spec)
    with _published(ctx, "create_box", box_key(box_id), final, "box", "box_id", box_id,
                    {"box": box_id}) as (stage, written):
        paths, disk_size, guest_size = _stage_box(_Planner(ctx), stage, spec, meta)
        written.extend(paths)
    box = _box(final, spec, meta, disk_size, guest_size)
    log.info("box_created", box=box_id, base=base, guest_base=guest_base, ms=ms(start))
    return box


def create_boxes(ctx: StoreContext, specs: list[BoxSpec]) -> list[Box]:
    """Create every box of ``specs`` (checked by the caller) in one all-or-nothing operation.

    Existence is checked again once the batch has claimed the boxes
    (:meth:`StoreContext.settle`).
    """
    start = time.perf_counter()
    lay = ctx.layout
    opid = new_opid()
    batch = f"batch:{opid}"
    keys = tuple(box_key(s.id) for s in specs)
    with ctx.operation("create_boxes", (batch,)):
        planner = _Planner(ctx)
        stages = [lay.boxes / f".stage-{opid}-{i}" for i in range(len(specs))]
        entries = [{"box": s.id, "stage": lay.rel(p)} for s, p in zip(specs, stages, strict=True)]
        with ctx.intent("create_boxes", (batch,), {"boxes": entries}, opid,
                        claims=keys) as record:
            crashpoint("create_boxes", "recorded")
            ctx.settle("create_boxes", keys, record)
            taken = [s.id for s in specs if os.path.lexists(lay.box_dir(s.id))]
            if taken:
                msg = f"{len(taken)} of the boxes already exist: {', '.join(map(repr, taken))}"
                raise AlreadyExistsError(msg, path=lay.boxes, field="box_id",
                                         value=tuple(taken))
            # The record too: after a crash amid the renames, it says which boxes finish.
            paths: list[Path] = [*ctx.journal.durable_paths(record)]
            made = []
            for spec, stage in zip(specs, stages, strict=True):
                meta = _meta(spec)
                os.mkdir(stage)
                staged, size, guest_size = _stage_box(planner, stage, spec, meta)
                paths += [*staged, stage]
                made.append((spec, meta, size, guest_size))
            crashpoint("create_boxes", "staged")
            ctx.barrier(paths)  # durable call 1, whatever the number of boxes
            crashpoint("create_boxes", "synced")
            with ctx.locks.structural(f"create_boxes ({len(specs)} boxes)"):
                for i, (spec, stage) in enumerate(zip(specs, stages, strict=True)):
                    os.rename(stage, lay.box_dir(spec.id))
                    if i == 0:
                        crashpoint("create_boxes", "renamed:first")
            fsync_dir(lay.boxes)  # durable call 2
            crashpoint("create_boxes", "committed")
    boxes = [_box(lay.box_dir(spec.id), spec, meta, size, guest_size)
             for spec, meta, size, guest_size in made]
    log.info("boxes_created", boxes=len(boxes), ms=ms(start))
    return boxes


def recover_create_boxes(ctx: StoreContext, record: Record) -> None:
    """All or nothing: a batch that renamed any box into place renames the rest, else none.

    Every stage was complete and durable before the first rename, and no one
    else makes a box the batch claims, so a claimed box that exists is the
    batch's.
    """
    lay = ctx.layout
    entries = record.data["boxes"]
    started = any(os.path.lexists(lay.box_dir(e["box"])) for e in entries)
    if started:
        for e in entries:
            stage = lay.abs(e["stage"])
            if os.path.lexists(stage):
                os.rename(stage, lay.box_dir(e["box"]))
        fsync_dir(lay.boxes)
        return
    for e in entries:
        remove_tree(lay.abs(e["stage"]))


# -- import ----------------------------------------------------------------------------------


def import_box(ctx: StoreContext, box_id: str, src: Path, fmt: str) -> Box:
    """Make the standalone image ``src`` (checked by the caller) the new box ``box_id``."""
    start = time.perf_counter()
    final = ctx.layout.box_dir(box_id)
    meta = {"id": box_id, "created": time.time(), "base": None, "guest_base": None,
            "clone_of": None, "imported_from": os.fspath(src)}
    with _published(ctx, "import_box", box_key(box_id), final, "box", "box_id", box_id,
                    {"box": box_id}) as (stage, written):
        os.mkdir(stage / "snapshots")
        write_file(stage / BOX_META, dump_json(meta))
        flatten(src, stage / CONTAINER_DISK, src_format=fmt)
        written.extend([stage / BOX_META, stage / CONTAINER_DISK])
    log.info("box_imported", box=box_id, image=os.fspath(src), ms=ms(start))
    return box_value(ctx, box_id, final, meta)
