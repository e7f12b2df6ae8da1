"""Clone and export: a new box from a box's current state, a standalone image of a box."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from boxdisk._errors import AlreadyExistsError, NotFoundError
from boxdisk._locks import ensure_not_in_use
from boxdisk._log import get_logger
from boxdisk.chain import open_chain
from boxdisk.ops import Progress, flatten

from ._core import StoreContext, box_key, ms
from ._freeze import (
    freeze_begun,
    freeze_forward,
    freeze_plan,
    freeze_undo,
    hidden_with,
    remove_paths,
    write_child,
)
from ._fs import dump_json, make_read_only, remove_tree, write_file
from ._journal import Record, crashpoint, new_opid
from ._layout import BOX_META, CLONE_META, CONTAINER_DISK, DISK_NAMES
from ._live import stopped
from ._live_export import live_export, log_export
from ._live_snapshot import live_clone
from ._livestate import LiveState
from ._queries import files_bytes
from ._values import Box

if TYPE_CHECKING:
    from boxdisk.live import Qmp

__all__ = ["clone_box", "export_box", "recover_clone"]

log = get_logger(__name__)


def clone_box(ctx: StoreContext, src_id: str, dst_id: str) -> Box:
    """A new box ``dst_id`` with the current state of ``src_id`` (arguments already checked)."""
    start = time.perf_counter()
    lay = ctx.layout
    keys = (box_key(src_id), box_key(dst_id))
    with ctx.operation("clone_box", keys):
        sdir = ctx.box_dir(src_id)
        ddir = lay.box_dir(dst_id)
        if os.path.lexists(ddir):
            msg = f"box {dst_id!r} already exists"
            raise AlreadyExistsError(msg, path=ddir, field="box_id", value=dst_id)
        with stopped(ctx, src_id, sdir, "clone the box", live=True) as (qmp, state):
            if qmp is not None and state is not None:
                return _live(ctx, src_id, dst_id, sdir, qmp, state, start)
        disks = ctx.idle_disks(sdir, "clone the box (freezing its live disk)")
        src_meta = ctx.read_meta(sdir / BOX_META, "box")
        opid = new_opid()
        cdir = lay.clone_dir(opid)
        dstage = lay.boxes / f".stage-{opid}"
        entries = freeze_plan(ctx, sdir, cdir, disks, opid)
        data = {"src": src_id, "dst": dst_id, "clone": lay.rel(cdir),
                "dst_stage": lay.rel(dstage), "disks": entries}
        meta: dict[str, Any] = {"id": dst_id, "created": time.time(),
                                "base": src_meta.get("base"),
                                "guest_base": src_meta.get("guest_base"), "clone_of": src_id}
        with ctx.intent("clone_box", keys, data, opid) as record:
            crashpoint("clone_box", "recorded")
            dstage.mkdir()
            (dstage / "snapshots").mkdir()
            write_file(dstage / BOX_META, dump_json(meta))
            with ctx.locks.structural(f"clone_box {src_id!r} -> {dst_id!r}"):
                # Visible at once (gc and verify see it; the record protects it).
                cdir.mkdir()
                write_file(cdir / CLONE_META, dump_json(
                    {"source": src_id, "dest": dst_id, "created": meta["created"],
                     "disks": disks}))
                for d in disks:
                    os.link(sdir / d, cdir / d)
            crashpoint("clone_box", "frozen")
            paths: list[Path] = [*ctx.journal.durable_paths(record)]
            for e in entries:
                write_child(cdir / e["disk"], dstage / e["disk"], e["size"], staged=True)
                write_child(cdir / e["disk"], lay.abs(e["child"]), e["size"])
                paths += [cdir / e["disk"], dstage / e["disk"], lay.abs(e["child"])]
            paths += [cdir / CLONE_META, cdir, lay.clones, dstage / BOX_META, dstage, lay.boxes,
                      sdir]
            crashpoint("clone_box", "children")
            ctx.barrier(paths)  # durable call 1
            crashpoint("clone_box", "synced")
            with ctx.locks.structural(f"clone_box {src_id!r} -> {dst_id!r}"):
                sealed = _clone_forward(ctx, data)
            ctx.barrier(sealed)  # durable call 2
            crashpoint("clone_box", "committed")
    log.info("box_cloned", src=src_id, dst=dst_id, clone_base=lay.rel(cdir), ms=ms(start))
    guest = ddir / DISK_NAMES[1] if len(disks) > 1 else None
    return Box(id=dst_id, dir=ddir, disk=ddir / CONTAINER_DISK, guest_disk=guest,
               base=meta["base"], guest_base=meta["guest_base"], snapshots=(),
               size=entries[0]["size"],
               guest_size=entries[1]["size"] if guest is not None else None,
               host_bytes=files_bytes([ddir / BOX_META, *(ddir / d for d in disks)]),
               created=meta["created"], clone_of=src_id)


def _live(ctx: StoreContext, src_id: str, dst_id: str, sdir: Path, qmp: Qmp,
          state: LiveState, start: float) -> Box:
    """Clone a running box: QEMU switches it onto new tops, the clone over the frozen state."""
    src_meta = ctx.read_meta(sdir / BOX_META, "box")
    meta: dict[str, Any] = {"id": dst_id, "created": time.time(),
                            "base": src_meta.get("base"),
                            "guest_base": src_meta.get("guest_base"), "clone_of": src_id}
    data = live_clone(ctx, src_id, dst_id, sdir, qmp, state, new_opid(), meta)
    log.info("box_cloned", src=src_id, dst=dst_id, clone_base=data["final"], ms=ms(start))
    entries = data["disks"]
    ddir = ctx.layout.box_dir(dst_id)
    guest = ddir / DISK_NAMES[1] if len(entries) > 1 else None
    return Box(id=dst_id, dir=ddir, disk=ddir / CONTAINER_DISK, guest_disk=guest,
               base=meta["base"], guest_base=meta["guest_base"], snapshots=(),
               size=entries[0]["size"],
               guest_size=entries[1]["size"] if guest is not None else None,
               host_bytes=files_bytes([ddir / BOX_META, *(ddir / e["disk"] for e in entries)]),
               created=meta["created"], clone_of=src_id)


def _clone_forward(ctx: StoreContext, data: dict[str, Any]) -> list[Path]:
    """Finish a clone past its point of no return (idempotent); what to make durable."""
    lay = ctx.layout
    dstage = lay.abs(data["dst_stage"])
    cdir = lay.abs(data["clone"])
    sdir = lay.box_dir(data["src"])
    freeze_forward(ctx, "clone_box", sdir, cdir, data["disks"])
    if dstage.exists():
        os.rename(dstage, lay.box_dir(data["dst"]))
    crashpoint("clone_box", "published")
    for e in data["disks"]:
        make_read_only(cdir / e["disk"])
    crashpoint("clone_box", "sealed")
    fixed = [cdir / e["disk"] for e in data["disks"] if e["new"] != e["old"]]
    return [*fixed, sdir, lay.boxes]


def recover_clone(ctx: StoreContext, record: Record) -> None:
    """Finish a clone past its point of no return; otherwise undo it."""
    data = record.data
    lay = ctx.layout
    sdir = lay.box_dir(data["src"])
    cdir = lay.abs(data["clone"])
    published = (os.path.lexists(lay.box_dir(data["dst"]))
                 and not os.path.lexists(lay.abs(data["dst_stage"])))
    if published or freeze_begun(sdir, (cdir,), data["disks"]):
        ctx.barrier(_clone_forward(ctx, data))
        return
    remove_tree(lay.abs(data["dst_stage"]))
    remove_paths(hidden_with(sdir, record.opid))
    freeze_undo(sdir, cdir, data["disks"])


def export_box(ctx: StoreContext, box_id: str, dest: Path, *, snapshot: str | None,
               guest: bool, overwrite: bool, progress: Progress | None,
               keep_snapshot: bool = False) -> Path:
    """Flatten a box's live disk (or a snapshot's) into one standalone qcow2 at ``dest``."""
    start = time.perf_counter()
    disk_name = DISK_NAMES[1] if guest else CONTAINER_DISK
    with ctx.operation("export_box", (box_key(box_id),)):
        bdir = ctx.box_dir(box_id)
        if snapshot is None:
            with stopped(ctx, box_id, bdir, "export the live disk", live=True) as (qmp, state):
                if qmp is not None and state is not None:
                    name, written = live_export(ctx, box_id, bdir, qmp, state, dest,
                                                guest=guest, overwrite=overwrite,
                                                progress=progress, keep_snapshot=keep_snapshot)
                    log_export(box_id, name, dest, written, keep_snapshot, start)
                    return Path(dest)
        src_dir = bdir if snapshot is None else ctx.snapshot_dir(box_id, snapshot)
        src = src_dir / disk_name
        if not src.is_file():
            msg = f"box {box_id!r} has no {disk_name}"
            raise NotFoundError(msg, path=src, field="disk", value=disk_name)
        if snapshot is None:
            ensure_not_in_use(src, "export the live disk")
        chain = open_chain(src, allowed_roots=ctx.roots)
    with chain:
        written = flatten(chain, dest, overwrite=overwrite, progress=progress)
    log.info("box_exported", box=box_id, snapshot=snapshot, dest=os.fspath(dest),
             data_bytes=written, ms=ms(start), live=False)
    return Path(dest)
