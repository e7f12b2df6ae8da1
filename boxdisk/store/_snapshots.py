"""Snapshot and restore of a box, and their recovery."""

from __future__ import annotations

import os
import time
from typing import Any

from boxdisk._errors import AlreadyExistsError, StoreError
from boxdisk._locks import ensure_not_in_use
from boxdisk._log import get_logger
from boxdisk.qcow2 import BackingFormat, create_cow_child_disk

from ._core import StoreContext, box_key, ms
from ._freeze import (
    freeze_committed,
    freeze_forward,
    freeze_plan,
    freeze_undo,
    hidden_with,
    remove_paths,
)
from ._fs import dump_json, fsync_dir, make_read_only, remove_tree, write_new_file
from ._journal import Record, crashpoint, new_opid
from ._layout import CONTAINER_DISK, DISK_NAMES, SNAPSHOT_META
from ._queries import host_bytes
from ._values import Snapshot

__all__ = ["recover_restore", "recover_snapshot", "restore", "snapshot"]

log = get_logger(__name__)


def snapshot(ctx: StoreContext, box_id: str, name: str) -> Snapshot:
    """Freeze the box's live disks into snapshot ``name`` (arguments already checked)."""
    start = time.perf_counter()
    key = box_key(box_id)
    lay = ctx.layout
    with ctx.operation("snapshot", (key,)):
        bdir = ctx.box_dir(box_id)
        final = lay.snapshot_dir(box_id, name)
        if os.path.lexists(final):
            msg = f"box {box_id!r} already has a snapshot {name!r}"
            raise AlreadyExistsError(msg, path=final, field="snapshot", value=name)
        disks = ctx.disks_in(bdir)
        for d in disks:
            ensure_not_in_use(bdir / d, "snapshot the box")
        opid = new_opid()
        stage = lay.snapshots_dir(box_id) / f".stage-{opid}"
        entries = freeze_plan(ctx, bdir, final, disks, opid)
        created = time.time()
        data = {"box": box_id, "name": name, "stage": lay.rel(stage),
                "final": lay.rel(final), "disks": entries}
        with ctx.intent("snapshot", (key,), data, opid):
            crashpoint("snapshot", "recorded")
            if not stage.parent.is_dir():
                stage.parent.mkdir(exist_ok=True)
                fsync_dir(bdir)  # the first snapshot's directory must outlive a power loss
            stage.mkdir()
            write_new_file(stage / SNAPSHOT_META, dump_json(
                {"box": box_id, "name": name, "created": created,
                 "disks": {e["disk"]: e["size"] for e in entries}}))
            crashpoint("snapshot", "staged")
            with ctx.locks.structural(f"snapshot {box_id!r}"):
                for d in disks:
                    os.link(bdir / d, stage / d)
                fsync_dir(stage)
                os.rename(stage, final)
                fsync_dir(final.parent)
                crashpoint("snapshot", "linked")
                for e in entries:
                    create_cow_child_disk(final / e["disk"], BackingFormat.QCOW2,
                                          lay.abs(e["child"]), relative=True,
                                          persistent=True)
                crashpoint("snapshot", "children")
                # The first name fix (or swap) is the point of no return.
                _snapshot_forward(ctx, data)
    log.info("snapshot_taken", box=box_id, name=name, disks=len(disks), ms=ms(start))
    return Snapshot(box_id=box_id, name=name, dir=final, disk=final / CONTAINER_DISK,
                    guest_disk=final / DISK_NAMES[1] if len(disks) > 1 else None,
                    created=created, size=entries[0]["size"], host_bytes=host_bytes(final))


def _snapshot_forward(ctx: StoreContext, data: dict[str, Any]) -> None:
    """Finish a committed snapshot (idempotent): fix the names, swap in the children, seal."""
    lay = ctx.layout
    final = lay.abs(data["final"])
    freeze_forward(ctx, "snapshot", lay.box_dir(data["box"]), final, data["disks"])
    for e in data["disks"]:
        make_read_only(final / e["disk"])
    crashpoint("snapshot", "sealed")


def recover_snapshot(ctx: StoreContext, record: Record) -> None:
    """Finish a snapshot past its point of no return; otherwise undo it."""
    data = record.data
    lay = ctx.layout
    bdir = lay.box_dir(data["box"])
    if freeze_committed(bdir, lay.abs(data["final"]), data["disks"]):
        _snapshot_forward(ctx, data)
        return
    freeze_undo(bdir, lay.abs(data["final"]), data["disks"])
    remove_tree(lay.abs(data["stage"]))
    remove_paths(hidden_with(bdir, record.opid))


def restore(ctx: StoreContext, box_id: str, name: str) -> None:
    """Give the box fresh live disks over snapshot ``name`` (arguments already checked)."""
    start = time.perf_counter()
    key = box_key(box_id)
    lay = ctx.layout
    with ctx.operation("restore", (key,)):
        bdir = ctx.box_dir(box_id)
        sdir = ctx.snapshot_dir(box_id, name)
        disks = ctx.disks_in(bdir)
        if ctx.disks_in(sdir) != disks:
            msg = f"snapshot {name!r} does not hold the same disks as the box ({disks})"
            raise StoreError(msg, path=sdir, field="disks", value=ctx.disks_in(sdir))
        for d in disks:
            ensure_not_in_use(bdir / d, "restore the box (replacing its live disk)")
        opid = new_opid()
        entries = [{"disk": d, "child": lay.rel(bdir / f".{d}.{opid}.new")} for d in disks]
        data = {"box": box_id, "name": name, "disks": entries}
        with ctx.intent("restore", (key,), data, opid):
            crashpoint("restore", "recorded")
            for e in entries:
                create_cow_child_disk(sdir / e["disk"], BackingFormat.QCOW2,
                                      lay.abs(e["child"]), relative=True, persistent=True)
            crashpoint("restore", "children")
            _restore_forward(ctx, data)
    log.info("box_restored", box=box_id, snapshot=name, ms=ms(start))


def _restore_forward(ctx: StoreContext, data: dict[str, Any]) -> None:
    lay = ctx.layout
    bdir = lay.box_dir(data["box"])
    for e in data["disks"]:
        child = lay.abs(e["child"])
        if child.exists():
            os.rename(child, bdir / e["disk"])
        crashpoint("restore", f"swapped:{e['disk']}")
    fsync_dir(bdir)


def recover_restore(ctx: StoreContext, record: Record) -> None:
    """Finish a restore whose children were all made; otherwise undo it.

    Children are created in disk order and swapped in the same order, so the
    last disk's child exists exactly when all children were made and that one
    is not yet swapped: then finish; otherwise either nothing was swapped
    (undo) or all was.
    """
    lay = ctx.layout
    last = lay.abs(record.data["disks"][-1]["child"])
    if last.exists():
        _restore_forward(ctx, record.data)
    remove_paths(hidden_with(lay.box_dir(record.data["box"]), record.opid))
