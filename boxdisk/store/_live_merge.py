"""Removing a snapshot of a running box, its data merged by QEMU (``block-stream``).

A snapshot of a running box is in QEMU's chain: its frozen file (the stub's
file, for one a live snapshot made; the snapshot's own file otherwise) has
exactly one image over it, which QEMU has open. QEMU streams the frozen
file's data into that image (``block-stream`` with the frozen file's backing
as the base, and the backing name the image keeps), then drops the frozen
file from its chain; only then does boxdisk delete the snapshot's files.
Nothing QEMU has open is written by boxdisk.

Journaled (``live_remove_snapshot``) and only ever finished: recovery waits
for (or restarts) QEMU's job, or, with QEMU gone, does the same merge itself
(a safe rebase of the image over the frozen file onto its backing).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from boxdisk._errors import LiveError, SnapshotInUseError
from boxdisk._locks import image_in_use
from boxdisk._log import get_logger
from boxdisk.ops import rebase

from ._core import StoreContext, box_key, ms
from ._fs import make_read_only, make_writable, remove_tree
from ._journal import Record, crashpoint, new_opid
from ._layout import REMOVED_MARKER
from ._livestate import LiveState, reach, read_state, stage_state, top_paths
from ._queries import graph

if TYPE_CHECKING:
    from boxdisk.live import Qmp

__all__ = ["live_remove_snapshot", "recover_live_remove_snapshot"]

log = get_logger(__name__)

#: How long one stream may take before it is cancelled (and finished by recovery).
STREAM_TIMEOUT = 3600.0


def _plan(ctx: StoreContext, box_id: str, name: str, bdir: Path, qmp: Qmp,
          state: LiveState, merge: bool) -> list[dict[str, Any]]:
    """Per disk of the snapshot: its frozen file, the image over it, its base; or refuse."""
    from boxdisk.live import block_nodes, find_nodes, writable_nodes  # noqa: PLC0415

    lay = ctx.layout
    sdir = ctx.snapshot_dir(box_id, name)
    g = graph(ctx)
    listing = block_nodes(qmp)  # one answer for every question below
    present = writable_nodes(qmp, listing)
    steps = []
    for d in ctx.disks_in(sdir):
        entry = next((f for f in state.frozen
                      if f.get("snapshot") == name and f["disk"] == d), None)
        frozen = bdir / entry["file"] if entry is not None else sdir / d
        deps = g.direct_dependents(frozen) - {os.path.realpath(sdir / d)}
        if not deps:
            steps.append({"disk": d, "frozen": lay.rel(frozen), "stub": entry is not None,
                          "above": None})
            continue
        if not merge:
            msg = f"snapshot {name!r} of box {box_id!r} is in use"
            raise SnapshotInUseError(msg, path=sdir, field="snapshot", value=name,
                                     dependents=tuple(sorted(deps)))
        if len(deps) != 1:
            msg = (f"snapshot {name!r} of running box {box_id!r} has {len(deps)} images over "
                   f"it; a live merge takes one (the running chain's); stop the box first")
            raise SnapshotInUseError(msg, path=sdir, field="snapshot", value=name,
                                     dependents=tuple(sorted(deps)))
        [above] = deps
        node = g.node(frozen)
        # QEMU's nodes by the names the live state recorded (see _livestate): the frozen
        # file's, the one over it (a later frozen file, or the top), and under it a
        # frozen file's or, for a base or an older snapshot, the one found by its file.
        if entry is not None:
            frozen_node: str | None = entry["node"]
        else:  # the snapshot's own file, opened by QEMU through its header: a plain name
            found_x = find_nodes(qmp, [frozen], listing=listing).get(os.fspath(frozen))
            frozen_node = None if found_x is None else found_x.name
        later = [f for f in state.frozen if f["disk"] == d
                 and os.path.realpath(bdir / f["file"]) == above]
        top = top_paths(bdir, state).get(d)
        if later:
            above_node: str | None = later[0]["node"]
        elif top is not None and os.path.realpath(top) == above and d in state.nodes:
            above_node = state.nodes[d]
        else:  # another snapshot's own file (or a top not recorded): found by its file
            found_a = find_nodes(qmp, [Path(above)], listing=listing).get(above)
            above_node = None if found_a is None else found_a.name
        below = [f for f in state.frozen if f["disk"] == d and node.backing is not None
                 and os.path.realpath(bdir / f["file"]) == node.backing]
        if below:
            base_node: str | None = below[0]["node"]
        elif node.backing is None:
            base_node = None
        else:
            found = find_nodes(qmp, [node.backing], listing=listing).get(node.backing)
            base_node = None if found is None else found.name
        if (frozen_node not in present or above_node not in present
                or (node.backing is not None and base_node not in present)):
            msg = (f"snapshot {name!r}: QEMU at {qmp.path} does not have its chain open as "
                   f"the store recorded it")
            raise LiveError(msg, path=frozen, field="qmp", value=qmp.path)
        steps.append({
            "disk": d, "frozen": lay.rel(frozen), "stub": entry is not None,
            "above": lay.rel(above), "above_node": above_node,
            "frozen_node": frozen_node,
            "base": None if node.backing is None else lay.rel(node.backing),
            "base_node": base_node,
            "base_format": node.backing_format,
            "backing_name": None if node.backing is None else os.path.relpath(
                node.backing, os.path.dirname(above)),
        })
    return steps


def live_remove_snapshot(ctx: StoreContext, box_id: str, name: str, bdir: Path, qmp: Qmp,
                         state: LiveState, *, merge: bool) -> None:
    """Remove snapshot ``name`` of a running box (its lock held); merged by QEMU."""
    start = time.perf_counter()
    lay = ctx.layout
    steps = _plan(ctx, box_id, name, bdir, qmp, state, merge)
    opid = new_opid()
    data = {"box": box_id, "name": name, "qmp": state.qmp,
            "trash": lay.rel(lay.trash / opid), "steps": steps}
    with ctx.intent("live_remove_snapshot", (box_key(box_id),), data, opid) as record:
        crashpoint("live_remove_snapshot", "recorded")
        ctx.barrier(ctx.journal.durable_paths(record))
        _finish(ctx, data, record.opid, qmp)
    log.info("snapshot_removed", box=box_id, name=name, merged=sum(
        s["above"] is not None for s in steps), ms=ms(start))


def _finish(ctx: StoreContext, data: dict[str, Any], opid: str, qmp: Qmp | None) -> None:
    """Stream each frozen file into the image over it, then delete the snapshot (idempotent)."""
    from boxdisk.live import remove_node, run_job, wait_job  # noqa: PLC0415

    lay = ctx.layout
    bdir = lay.box_dir(data["box"])
    for i, step in enumerate(data["steps"]):
        if step["above"] is None:
            continue
        frozen, above = lay.abs(step["frozen"]), lay.abs(step["above"])
        if qmp is not None:
            if _backs_onto(above, frozen):  # not streamed yet (QEMU rewrites the header)
                job = f"boxdisk-stream-{opid}-{i}"
                if any(j.get("id") == job for j in qmp.execute("query-jobs")):
                    wait_job(qmp, job, "block-stream", timeout=STREAM_TIMEOUT)
                else:
                    args: dict[str, Any] = {"device": step["above_node"]}
                    if step["base_node"] is not None:
                        args |= {"base-node": step["base_node"],
                                 "backing-file": step["backing_name"]}
                    # QEMU reopens the image it streams into for writing: a sealed
                    # snapshot file gets its write permission back for that long.
                    sealed = not os.stat(above).st_mode & 0o200
                    if sealed:
                        make_writable(above)
                    try:
                        run_job(qmp, "block-stream", args, job_id=job,
                                timeout=STREAM_TIMEOUT)
                    finally:
                        if sealed:
                            make_read_only(above)
            # A node the monitor owns (-blockdev, or boxdisk's blockdev-add) stays open
            # after the stream until it is deleted; one only the chain held is gone.
            remove_node(qmp, step["frozen_node"])
        elif above.exists() and _backs_onto(above, frozen):
            base = None if step["base"] is None else lay.abs(step["base"])
            rebase(above, base, backing_format=step["base_format"], safe=True, relative=True,
                   allowed_roots=ctx.roots)
        crashpoint("live_remove_snapshot", f"merged:{step['disk']}")
    sdir = lay.snapshot_dir(data["box"], data["name"])
    trash = lay.abs(data["trash"])
    state = read_state(bdir) or LiveState(qmp=data.get("qmp"))
    removed = list(state.removed)
    if any(not s["stub"] for s in data["steps"]):
        # Its own files: QEMU names the images under them through this directory, so
        # it stays, marked, holding nothing else, until the box is settled.
        if os.path.isdir(sdir):
            (sdir / REMOVED_MARKER).touch()
            for entry in os.listdir(sdir):
                if entry != REMOVED_MARKER:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(sdir / entry)
        if data["name"] not in removed:
            removed.append(data["name"])
    elif os.path.lexists(sdir):
        os.rename(sdir, trash)  # a stub's directory: QEMU never opened anything in it
    crashpoint("live_remove_snapshot", "moved")
    gone = {s["frozen"] for s in data["steps"] if s["stub"]}
    for rel in gone:
        path = lay.abs(rel)
        if image_in_use(path):  # QEMU dropped it from its chain, so this is not expected
            log.warning("frozen_file_still_open", box=data["box"], path=os.fspath(path))
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    frozen_left = [f for f in state.frozen if lay.rel(bdir / f["file"]) not in gone
                   or f.get("snapshot") != data["name"]]
    paths = stage_state(bdir, attrs.evolve(state, frozen=frozen_left, removed=removed), opid)
    ctx.barrier([*paths, sdir, sdir.parent, lay.trash] if os.path.isdir(sdir) else
                [*paths, sdir.parent, lay.trash])
    remove_tree(trash)


def _backs_onto(image: Path, target: Path) -> bool:
    from boxdisk.qcow2 import read_header  # noqa: PLC0415

    name = read_header(image).backing_file
    if name is None:
        return False
    try:
        return os.path.samefile(os.path.join(image.parent, name), target)
    except OSError:
        return False


def recover_live_remove_snapshot(ctx: StoreContext, record: Record) -> None:
    """Finish the merge (QEMU's job, or offline when QEMU is gone), then the removal."""
    with reach(record.data.get("qmp")) as qmp:
        _finish(ctx, record.data, record.opid, qmp)
