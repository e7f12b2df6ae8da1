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

from boxdisk._errors import DiskInUseError, LiveError, SnapshotInUseError
from boxdisk._locks import image_in_use
from boxdisk._log import get_logger
from boxdisk.ops import rebase

from ._core import StoreContext, box_key, ms
from ._fs import remove_tree
from ._journal import Record, crashpoint, new_opid
from ._livestate import LiveState, connect, qemu_nodes, read_state, stage_state
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
    from boxdisk.live import find_nodes  # noqa: PLC0415

    lay = ctx.layout
    sdir = ctx.snapshot_dir(box_id, name)
    g = graph(ctx)
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
        if entry is None:
            # QEMU names every image under this one through the snapshot's directory
            # (it resolves backing names from the name it opened each image by), so the
            # directory must outlive this QEMU: only a stopped box can lose it.
            msg = (f"refusing to remove snapshot {name!r} while box {box_id!r} runs: it was "
                   f"taken before the box started, and the running QEMU names the images "
                   f"under it through its directory; stop the box first")
            raise DiskInUseError(msg, path=sdir, field="qmp", value=qmp.path)
        if len(deps) != 1:
            msg = (f"snapshot {name!r} of running box {box_id!r} has {len(deps)} images over "
                   f"it; a live merge takes one (the running chain's); stop the box first")
            raise SnapshotInUseError(msg, path=sdir, field="snapshot", value=name,
                                     dependents=tuple(sorted(deps)))
        [above] = deps
        node = g.node(frozen)
        present = qemu_nodes(qmp)
        # QEMU's nodes by the names the live state recorded (see _livestate): the frozen
        # file's, the one over it (a later frozen file, or the top), and under it a
        # frozen file's or, for a base or an older snapshot, the one found by its file.
        frozen_node = entry["node"]
        later = [f for f in state.frozen if f["disk"] == d
                 and os.path.realpath(bdir / f["file"]) == above]
        above_node = later[0]["node"] if later else state.nodes.get(d)
        below = [f for f in state.frozen if f["disk"] == d and node.backing is not None
                 and os.path.realpath(bdir / f["file"]) == node.backing]
        if below:
            base_node: str | None = below[0]["node"]
        elif node.backing is None:
            base_node = None
        else:
            found = find_nodes(qmp, [node.backing]).get(node.backing)
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
                    run_job(qmp, "block-stream", args, job_id=job, timeout=STREAM_TIMEOUT)
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
    if os.path.lexists(sdir):
        os.rename(sdir, trash)
    crashpoint("live_remove_snapshot", "moved")
    state = read_state(bdir) or LiveState(qmp=data.get("qmp"))
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
    paths = stage_state(bdir, attrs.evolve(state, frozen=frozen_left), opid)
    ctx.barrier([*paths, sdir.parent, lay.trash])
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
    qmp: Qmp | None
    try:
        qmp = connect(record.data["qmp"]) if record.data.get("qmp") else None
    except LiveError:
        qmp = None
    try:
        _finish(ctx, record.data, record.opid, qmp)
    finally:
        if qmp is not None:
            qmp.close()
