"""Exporting a running box: a live snapshot, the frozen chain flattened, then merged back.

The guest keeps writing to the new top while the frozen chain is copied out.
Unless the caller keeps the export's snapshot, QEMU then merges the new top
back into the frozen file with an active ``block-commit`` (QEMU reports the
job ready when the two are in sync and pivots on ``job-complete``), so the
box's chain is as it was before the export.

The copy and the merge are journaled (``live_export``) and, unless the
snapshot is kept, only ever finished by merging back: the snapshot is taken
out of view first (the commit changes the frozen file it reads), then the
commit runs; after a crash, recovery completes the job QEMU still has,
restarts it, or, with QEMU gone, commits offline (boxdisk's own ``commit``),
then tidies up.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from boxdisk._log import get_logger
from boxdisk.chain import open_chain
from boxdisk.ops import Progress, commit, flatten

from ._core import StoreContext, box_key, ms
from ._freeze import inode
from ._fs import remove_tree
from ._journal import Record, crashpoint, new_opid
from ._layout import CONTAINER_DISK, DISK_NAMES
from ._live_snapshot import live_snapshot
from ._livestate import LiveState, reach, read_state, stage_state

if TYPE_CHECKING:
    from boxdisk.live import Qmp

__all__ = ["live_export", "log_export", "recover_live_export"]

log = get_logger(__name__)

#: How long a merge-back job may take before it is cancelled (and finished by recovery).
MERGE_TIMEOUT = 3600.0


def live_export(ctx: StoreContext, box_id: str, bdir: Path, qmp: Qmp, state: LiveState,
                dest: Path, *, guest: bool, overwrite: bool, progress: Progress | None,
                keep_snapshot: bool) -> tuple[str, int]:
    """Export the live disk of a running box (its lock held); (snapshot name, bytes written).

    The lock is held throughout: the export's snapshot must not change under
    the copy, and the merge must find the chain as it left it. The whole
    export is one journaled operation (``live_export``) around the live
    snapshot's own: after a crash anywhere, recovery finishes or undoes the
    snapshot, then merges it back (unless it was to be kept), so an export
    never leaves a snapshot nobody asked for.
    """
    lay = ctx.layout
    opid, snap_opid = new_opid(), new_opid()
    name = f"export-{snap_opid}"
    data = {"box": box_id, "name": name, "keep": keep_snapshot, "qmp": state.qmp,
            "trash": lay.rel(lay.trash / opid), "snapshot_opid": snap_opid}
    disk = DISK_NAMES[1] if guest else CONTAINER_DISK
    with ctx.intent("live_export", (box_key(box_id),), data, opid) as record:
        crashpoint("live_export", "recorded")
        live_snapshot(ctx, box_id, name, bdir, qmp, state, snap_opid)
        crashpoint("live_export", "snapshotted")
        with open_chain(lay.snapshot_dir(box_id, name) / disk,
                        allowed_roots=ctx.roots) as chain:
            written = flatten(chain, dest, overwrite=overwrite, progress=progress)
        crashpoint("live_export", "flattened")
        if not keep_snapshot:
            plan = _disks(bdir, name)
            _hide(ctx, data, record)
            _merge(ctx, {**data, "disks": plan}, record.opid, qmp, progress)
            crashpoint("live_export", "merged")
    return name, written


def _disks(bdir: Path, name: str) -> list[dict[str, Any]]:
    """What merging back the export's snapshot ``name`` takes, from the live state.

    The export holds the box's lock from its snapshot to its merge, so the
    box's tops are that snapshot's new tops and its frozen files are the last.
    """
    state = read_state(bdir) or LiveState()
    out = []
    for f in state.frozen:
        if f.get("snapshot") == name:
            d = f["disk"]
            out.append({"disk": d, "top": f["file"], "node": f["node"],
                        "overlay": state.tops[d][0], "overlay_node": state.nodes[d]})
    return out


def _hide(ctx: StoreContext, data: dict[str, Any], record: Record) -> None:
    """Take the export's snapshot out of view before the commit changes the file it reads.

    The journal record must be durable first: a power cut that undid the
    rename would bring the snapshot back, and the record takes it away again.
    """
    lay = ctx.layout
    final = lay.snapshot_dir(data["box"], data["name"])
    if os.path.lexists(final):
        os.rename(final, lay.abs(data["trash"]))
    ctx.barrier([*ctx.journal.durable_paths(record), final.parent, lay.trash])
    crashpoint("live_export", "hidden")


def _merge(ctx: StoreContext, data: dict[str, Any], opid: str, qmp: Qmp | None,
           progress: Progress | None) -> None:
    """The commit of each disk (by QEMU if it runs, else offline), then the tidy-up."""
    from boxdisk.live import remove_node, writable_nodes  # noqa: PLC0415

    lay = ctx.layout
    bdir = lay.box_dir(data["box"])
    # Which new tops QEMU still writes, asked once: merging one disk leaves the others'.
    writing = writable_nodes(qmp) if qmp is not None else {}
    for i, e in enumerate(data["disks"]):
        overlay, frozen = bdir / e["overlay"], bdir / e["top"]
        if not overlay.exists():
            continue  # merged and removed already
        if qmp is not None:
            if writing.get(e["overlay_node"]):  # QEMU still writes the new top
                _finish_or_start(qmp, f"boxdisk-merge-{opid}-{i}", e, progress)
            remove_node(qmp, e["overlay_node"])
        else:
            commit(overlay, base=frozen, keep_top=True, allowed_roots=ctx.roots)
        crashpoint("live_export", f"merged:{e['disk']}")
    state = read_state(bdir) or LiveState(qmp=data.get("qmp"))
    tops = {d: t for d, t in state.tops.items()
            if t[0] not in {e["overlay"] for e in data["disks"]}}
    nodes = dict(state.nodes)
    for e in data["disks"]:
        if e["top"] != e["disk"]:  # the frozen file is the top again, under its own name
            tops[e["disk"]] = [e["top"], *(inode(bdir / e["top"]) or [0, 0])]
        nodes[e["disk"]] = e["node"]
    frozen = [f for f in state.frozen if f.get("snapshot") != data["name"]]
    paths = stage_state(bdir, attrs.evolve(state, tops=tops, frozen=frozen, nodes=nodes), opid)
    for e in data["disks"]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(bdir / e["overlay"])
    remove_tree(lay.abs(data["trash"]))
    ctx.barrier(paths)


def _finish_or_start(qmp: Qmp, job: str, e: dict[str, Any], progress: Progress | None) -> None:
    """Drive the merge job to its end: the one an interrupted merge left QEMU, or a new one."""
    from boxdisk.live import run_job, wait_job  # noqa: PLC0415

    if any(j.get("id") == job for j in qmp.execute("query-jobs")):
        wait_job(qmp, job, "block-commit", progress=progress, timeout=MERGE_TIMEOUT)
        return
    run_job(qmp, "block-commit", {"device": e["overlay_node"], "base-node": e["node"]},
            job_id=job, progress=progress, timeout=MERGE_TIMEOUT)


def recover_live_export(ctx: StoreContext, record: Record) -> None:
    """Finish (or undo) the export's snapshot first, then merge it back unless it was kept.

    The copy is abandoned (flatten leaves at most its own temporary file).
    """
    data = record.data
    lay = ctx.layout
    bdir = lay.box_dir(data["box"])
    for name in ctx.journal.touching((box_key(data["box"]),), skip=record.path.name):
        inner = ctx.journal.load(name)
        if inner is not None and inner.opid == data["snapshot_opid"]:
            ctx.recoverer.recover(inner)  # the live snapshot, finished or undone
    if data.get("keep"):
        return
    plan = _disks(bdir, data["name"])
    if not plan:
        return  # the snapshot was undone: nothing to merge
    with reach(data.get("qmp")) as qmp:
        _hide(ctx, data, record)
        _merge(ctx, {**data, "disks": plan}, record.opid, qmp, None)


def log_export(box_id: str, name: str, dest: Path, written: int, kept: bool,
               start: float) -> None:
    """The ``box_exported`` event of a live export."""
    log.info("box_exported", box=box_id, snapshot=name if kept else None, dest=os.fspath(dest),
             data_bytes=written, ms=ms(start), live=True)

