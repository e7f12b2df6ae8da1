"""Snapshot and restore of a box (one box, or many in one operation), and their recovery.

A snapshot freezes the box's live disks (``_freeze``): prepare (stage, links,
children), barrier, commit under the store lock (publish the snapshot, fix the
frozen names, swap the children in, seal), barrier. ``snapshot_boxes`` does
the same for many boxes with the same two barriers; after a crash it is
finished for every box or undone for every box.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from boxdisk._errors import AlreadyExistsError, StoreError
from boxdisk._locks import ensure_not_in_use
from boxdisk._log import get_logger
from boxdisk.qcow2 import read_header

from ._core import StoreContext, box_key, ms
from ._freeze import (
    freeze_begun,
    freeze_forward,
    freeze_plan,
    freeze_undo,
    hidden_with,
    inode,
    remove_paths,
    write_child,
)
from ._fs import dump_json, fsync_dir, make_read_only, write_file
from ._journal import Record, crashpoint, new_opid
from ._layout import CONTAINER_DISK, DISK_NAMES, REMOVED_MARKER, SNAPSHOT_META
from ._live import ensure_stopped, stopped
from ._live_snapshot import live_snapshot
from ._queries import files_bytes
from ._values import Snapshot

__all__ = [
    "recover_restore",
    "recover_snapshot",
    "recover_snapshot_boxes",
    "restore",
    "snapshot",
    "snapshot_boxes",
]

log = get_logger(__name__)


# -- one box's freeze into a snapshot ----------------------------------------------------------


def _taken(box_id: str, name: str, final: Path) -> str:
    if (final / REMOVED_MARKER).exists():
        return (f"snapshot {name!r} of box {box_id!r} was removed while the box ran; its "
                f"name is free again once the box has stopped")
    return f"box {box_id!r} already has a snapshot {name!r}"


def _plan(ctx: StoreContext, box_id: str, name: str, opid: str) -> dict[str, Any]:
    """Check that ``name`` is free and the disks are not in use; the journal entry for the box."""
    lay = ctx.layout
    bdir = ctx.box_dir(box_id)
    final = lay.snapshot_dir(box_id, name)
    if os.path.lexists(final):
        raise AlreadyExistsError(_taken(box_id, name, final), path=final, field="snapshot",
                                 value=name)
    ensure_stopped(ctx, box_id, bdir, "snapshot the box")
    disks = ctx.idle_disks(bdir, "snapshot the box")
    stage = lay.snapshots_dir(box_id) / f".stage-{opid}"
    return {"box": box_id, "name": name, "stage": lay.rel(stage), "final": lay.rel(final),
            "created": time.time(), "disks": freeze_plan(ctx, bdir, final, disks, opid)}


def _prepare(ctx: StoreContext, data: dict[str, Any]) -> list[Path]:
    """Stage the snapshot and write the children; the paths the first barrier covers."""
    lay = ctx.layout
    bdir = lay.box_dir(data["box"])
    stage = lay.abs(data["stage"])
    paths: list[Path] = []
    if not stage.parent.is_dir():  # a box made before boxes got snapshots/ with them
        stage.parent.mkdir(exist_ok=True)
    stage.mkdir()
    write_file(stage / SNAPSHOT_META, dump_json(
        {"box": data["box"], "name": data["name"], "created": data["created"],
         "disks": {e["disk"]: e["size"] for e in data["disks"]}}))
    for e in data["disks"]:
        os.link(bdir / e["disk"], stage / e["disk"])
        write_child(stage / e["disk"], lay.abs(e["child"]), e["size"],
                    name=f"snapshots/{data['name']}/{e['disk']}")
        # The frozen file's data (guest writes not yet flushed) and the child.
        paths += [stage / e["disk"], lay.abs(e["child"])]
    return [*paths, stage / SNAPSHOT_META, stage, stage.parent, bdir]


def _commit(ctx: StoreContext, data: dict[str, Any], op: str) -> list[Path]:
    """Past the point of no return (idempotent): publish, fix names, swap, seal.

    Returns the paths the second barrier covers.
    """
    lay = ctx.layout
    bdir = lay.box_dir(data["box"])
    stage, final = lay.abs(data["stage"]), lay.abs(data["final"])
    if os.path.lexists(stage) and not os.path.lexists(final):
        os.rename(stage, final)
    crashpoint(op, "published")
    freeze_forward(ctx, op, bdir, final, data["disks"])
    for e in data["disks"]:
        make_read_only(final / e["disk"])
    crashpoint(op, "sealed")
    fixed = [final / e["disk"] for e in data["disks"] if e["new"] != e["old"]]
    return [*fixed, final.parent, bdir]


def _begun(ctx: StoreContext, data: dict[str, Any]) -> bool:
    lay = ctx.layout
    final = lay.abs(data["final"])
    return os.path.lexists(final) or freeze_begun(
        lay.box_dir(data["box"]), (lay.abs(data["stage"]), final), data["disks"])


def _undo(ctx: StoreContext, data: dict[str, Any], opid: str) -> None:
    lay = ctx.layout
    bdir = lay.box_dir(data["box"])
    freeze_undo(bdir, lay.abs(data["stage"]), data["disks"])
    remove_paths(hidden_with(bdir, opid))


def _value(ctx: StoreContext, data: dict[str, Any]) -> Snapshot:
    final = ctx.layout.abs(data["final"])
    disks = data["disks"]
    return Snapshot(box_id=data["box"], name=data["name"], dir=final,
                    disk=final / CONTAINER_DISK,
                    guest_disk=final / DISK_NAMES[1] if len(disks) > 1 else None,
                    created=data["created"], size=disks[0]["size"],
                    host_bytes=files_bytes([final / SNAPSHOT_META,
                                            *(final / e["disk"] for e in disks)]))


# -- snapshot, snapshot_boxes ----------------------------------------------------------------


def snapshot(ctx: StoreContext, box_id: str, name: str) -> Snapshot:
    """Freeze the box's live disks into snapshot ``name`` (arguments already checked)."""
    start = time.perf_counter()
    key = box_key(box_id)
    with ctx.operation("snapshot", (key,)):
        opid = new_opid()
        bdir = ctx.box_dir(box_id)
        with stopped(ctx, box_id, bdir, "snapshot the box", live=True) as (qmp, state):
            if qmp is not None and state is not None:
                if os.path.lexists(ctx.layout.snapshot_dir(box_id, name)):
                    final = ctx.layout.snapshot_dir(box_id, name)
                    raise AlreadyExistsError(_taken(box_id, name, final), path=final,
                                             field="snapshot", value=name)
                data = live_snapshot(ctx, box_id, name, bdir, qmp, state, opid)
                log.info("snapshot_taken", box=box_id, name=name, disks=len(data["disks"]),
                         live=True, held_ms=data["held_ms"], ms=ms(start))
                return _value(ctx, data)
        data = _plan(ctx, box_id, name, opid)
        with ctx.intent("snapshot", (key,), data, opid) as record:
            crashpoint("snapshot", "recorded")
            paths = _prepare(ctx, data)
            crashpoint("snapshot", "staged")
            ctx.barrier([*ctx.journal.durable_paths(record), *paths])  # durable call 1
            crashpoint("snapshot", "synced")
            with ctx.locks.structural(f"snapshot {box_id!r}"):
                sealed = _commit(ctx, data, "snapshot")
            ctx.barrier(sealed)  # durable call 2
            crashpoint("snapshot", "committed")
    log.info("snapshot_taken", box=box_id, name=name, disks=len(data["disks"]), live=False,
             ms=ms(start))
    return _value(ctx, data)


def recover_snapshot(ctx: StoreContext, record: Record) -> None:
    """Finish a snapshot past its point of no return; otherwise undo it."""
    data = record.data
    if _begun(ctx, data):
        ctx.barrier(_commit(ctx, data, "snapshot"))
    else:
        _undo(ctx, data, record.opid)


def snapshot_boxes(ctx: StoreContext, pairs: list[tuple[str, str]]) -> list[Snapshot]:
    """Snapshot every (box, name) of ``pairs`` (checked by the caller) in one operation."""
    start = time.perf_counter()
    opid = new_opid()
    batch = f"batch:{opid}"
    keys = tuple(box_key(b) for b, _ in pairs)
    with ctx.operation("snapshot_boxes", (batch,)):
        for box_id, _name in pairs:
            ctx.box_dir(box_id)
        data: dict[str, Any] = {"snapshots": []}
        with ctx.intent("snapshot_boxes", (batch,), data, opid, claims=keys) as record:
            crashpoint("snapshot_boxes", "recorded")
            ctx.settle("snapshot_boxes", keys, record)
            # Planned once the boxes are the batch's: nothing changes them from here on.
            entries = [_plan(ctx, b, n, opid) for b, n in pairs]
            data["snapshots"] = entries
            ctx.journal.rewrite(record, data)
            paths = [*ctx.journal.durable_paths(record)]
            for entry in entries:
                paths += _prepare(ctx, entry)
            crashpoint("snapshot_boxes", "staged")
            ctx.barrier(paths)  # durable call 1, whatever the number of boxes
            crashpoint("snapshot_boxes", "synced")
            sealed: list[Path] = []
            with ctx.locks.structural(f"snapshot_boxes ({len(pairs)} boxes)"):
                for entry in entries:
                    sealed += _commit(ctx, entry, "snapshot_boxes")
            ctx.barrier(sealed)  # durable call 2
            crashpoint("snapshot_boxes", "committed")
    log.info("snapshots_taken", snapshots=len(entries), ms=ms(start))
    return [_value(ctx, e) for e in entries]


def recover_snapshot_boxes(ctx: StoreContext, record: Record) -> None:
    """All or nothing: finish every snapshot of the batch if any had begun, else undo all."""
    entries = record.data["snapshots"]
    if any(_begun(ctx, e) for e in entries):
        sealed: list[Path] = []
        for e in entries:
            sealed += _commit(ctx, e, "snapshot_boxes")
        ctx.barrier(sealed)
    else:
        for e in entries:
            _undo(ctx, e, record.opid)


# -- restore ---------------------------------------------------------------------------------


def restore(ctx: StoreContext, box_id: str, name: str) -> None:
    """Give the box fresh live disks over snapshot ``name`` (arguments already checked)."""
    start = time.perf_counter()
    key = box_key(box_id)
    lay = ctx.layout
    with ctx.operation("restore", (key,)):
        bdir = ctx.box_dir(box_id)
        ensure_stopped(ctx, box_id, bdir, "restore the box")
        sdir = ctx.snapshot_dir(box_id, name)
        disks = ctx.disks_in(bdir)
        if ctx.disks_in(sdir) != disks:
            msg = f"snapshot {name!r} does not hold the same disks as the box ({disks})"
            raise StoreError(msg, path=sdir, field="disks", value=ctx.disks_in(sdir))
        for d in disks:
            ensure_not_in_use(bdir / d, "restore the box (replacing its live disk)")
        opid = new_opid()
        entries: list[dict[str, Any]] = [{"disk": d, "child": lay.rel(bdir / f".{d}.{opid}.new"),
                    "inode": inode(bdir / d),
                    "size": read_header(sdir / d).size} for d in disks]
        data = {"box": box_id, "name": name, "disks": entries}
        with ctx.intent("restore", (key,), data, opid) as record:
            crashpoint("restore", "recorded")
            for e in entries:
                write_child(sdir / e["disk"], lay.abs(e["child"]), e["size"])
            crashpoint("restore", "children")
            ctx.barrier([*ctx.journal.durable_paths(record),
                         *(lay.abs(e["child"]) for e in entries), bdir])  # durable call 1
            crashpoint("restore", "synced")
            _restore_forward(ctx, data)
            fsync_dir(bdir)  # durable call 2
            crashpoint("restore", "committed")
    log.info("box_restored", box=box_id, snapshot=name, ms=ms(start))


def _restore_forward(ctx: StoreContext, data: dict[str, Any]) -> None:
    lay = ctx.layout
    bdir = lay.box_dir(data["box"])
    for e in data["disks"]:
        child = lay.abs(e["child"])
        if child.exists():
            os.rename(child, bdir / e["disk"])
        crashpoint("restore", f"swapped:{e['disk']}")


def recover_restore(ctx: StoreContext, record: Record) -> None:
    """Finish a restore that had made every child or swapped any disk; otherwise undo it.

    Every child is written (and made durable) before the first swap, and a
    live disk that no longer holds the inode the record names was swapped.
    """
    lay = ctx.layout
    data = record.data
    bdir = lay.box_dir(data["box"])
    swapped = any(inode(bdir / e["disk"]) != e["inode"] for e in data["disks"])
    if swapped or all(lay.abs(e["child"]).exists() for e in data["disks"]):
        _restore_forward(ctx, data)
        fsync_dir(bdir)
    remove_paths(hidden_with(bdir, record.opid))
