"""The live snapshot: QEMU switches a running box onto new tops; nothing it has open moves.

Nothing QEMU has open is renamed, replaced or rewritten (QEMU reopens images
by their names). So the file QEMU writes now (the top) is frozen where it is,
and:

- the new top is a new file beside it, ``disk.OPID.qcow2``, backing onto the
  old top by its name in the box's directory;
- the snapshot's directory gets a *stub*: an empty, read-only qcow2 backing
  onto the frozen file (``../../NAME``), so the snapshot reads exactly the
  frozen state, and no header needs rewriting (one the frozen file keeps,
  valid from where it is).

Durable steps: (1) the journal record, the staged snapshot and the new tops,
one barrier; in one ``transaction`` QEMU opens the new tops and switches onto
all of them (``blockdev-snapshot-sync`` of an existing file, format given), a
guest-agent freeze around it when there is an agent; (2) the snapshot is published and
``live.json`` records the new tops and the frozen files, one barrier.

Recovery asks QEMU which file it writes to: the new top means the switch
happened (finish: publish, record); the old one means it did not (undo:
close the new nodes in QEMU, remove the new files). With no QEMU to ask, a new
top QEMU wrote into has grown past the size boxdisk made it; one that did
not grow holds nothing, so undoing it loses nothing either way.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from boxdisk._errors import LiveError, QmpCommandError
from boxdisk.qcow2 import BackingFormat, ImagePlan, plan_disk, read_header

from ._core import StoreContext, box_key
from ._freeze import inode
from ._fs import dump_json, link_new_file, remove_tree, write_file
from ._journal import Record, crashpoint
from ._layout import BOX_META, CLONE_META, SNAPSHOT_META
from ._livestate import (
    LiveState,
    check_serves,
    connect,
    reach,
    read_state,
    stage_state,
    top_paths,
)

if TYPE_CHECKING:
    from boxdisk.live import Qmp

__all__ = ["live_clone", "live_snapshot", "recover_live_snapshot"]

#: Seconds a guest agent's freeze (or thaw) may take.
FREEZE_TIMEOUT = 10.0


def _entries(qmp: Qmp, state: LiveState, bdir: Path, frozen_dir: Path,
             opid: str) -> tuple[list[dict[str, Any]], list[tuple[ImagePlan, ImagePlan]]]:
    """Per disk: the journal entry, and the plans of its new top and of its stub."""
    tops = top_paths(bdir, state)
    nodes = check_serves(qmp, tops, state.nodes)
    entries: list[dict[str, Any]] = []
    plans = []
    for i, (d, top) in enumerate(tops.items()):
        size = read_header(top).size
        overlay = plan_disk(size, backing_name=top.name, backing_format=BackingFormat.QCOW2)
        stub = plan_disk(size, backing_name=os.path.relpath(top, frozen_dir),
                         backing_format=BackingFormat.QCOW2)
        entries.append({
            "disk": d, "top": top.name, "inode": inode(top), "size": size,
            "overlay": f"{d.removesuffix('.qcow2')}.{opid}.qcow2",
            "file_size": overlay.file_size, "node": nodes[d],
            "overlay_node": f"boxdisk-{opid}-{i}",
        })
        plans.append((overlay, stub))
    return entries, plans


def _stage(bdir: Path, stage: Path, meta_name: str, meta: dict[str, Any],
           entries: list[dict[str, Any]], plans: list[tuple[ImagePlan, ImagePlan]]) -> list[Path]:
    """The staged directory of stubs, and the new tops beside the old; unsynced."""
    stage.parent.mkdir(exist_ok=True)
    stage.mkdir()
    write_file(stage / meta_name, dump_json(meta))
    paths = [stage / meta_name, stage, stage.parent, bdir]
    for e, (overlay, stub) in zip(entries, plans, strict=True):
        write_file(stage / e["disk"], stub.writes, stub.file_size)
        (stage / e["disk"]).chmod(0o444)
        link_new_file(bdir / e["overlay"], overlay.writes, overlay.file_size)
        paths += [stage / e["disk"], bdir / e["overlay"]]
    return paths


def _run(ctx: StoreContext, op: str, keys: tuple[str, ...], data: dict[str, Any],
         qmp: Qmp, state: LiveState, bdir: Path, opid: str,
         staged: Callable[[], list[Path]]) -> float:
    """Journal, stage (``staged``), barrier, switch, publish, barrier; the held interval."""
    with ctx.intent(op, keys, data, opid) as record:
        crashpoint(op, "recorded")
        paths = [*ctx.journal.durable_paths(record), *staged()]
        crashpoint(op, "staged")
        ctx.barrier(paths)  # durable call 1: the new tops exist before QEMU writes to them
        crashpoint(op, "synced")
        held_ms = _switch(qmp, state, bdir, data["disks"])
        crashpoint(op, "switched")
        ctx.barrier(_forward(ctx, data, record.opid))  # durable call 2
        crashpoint(op, "committed")
    return held_ms


def _fresh_nodes_on_refusal(call: Callable[[LiveState], dict[str, Any]],
                            state: LiveState) -> dict[str, Any]:
    """Run ``call``; if QEMU has no node of a recorded name (a new QEMU on the same socket),
    run it once more with the nodes found by their files. The refused try changed nothing."""
    try:
        return call(state)
    except QmpCommandError as exc:
        if not any(n in exc.message for n in state.nodes.values()):
            raise
        return call(attrs.evolve(state, nodes={}))


def live_snapshot(ctx: StoreContext, box_id: str, name: str, bdir: Path, qmp: Qmp,
                  state: LiveState, opid: str,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Snapshot a running box (arguments checked, box locked); the journal data, with held_ms.

    ``extra`` goes into the journal record (an export's plan, for its recovery).
    """
    return _fresh_nodes_on_refusal(
        lambda s: _live_snapshot(ctx, box_id, name, bdir, qmp, s, opid, extra), state)


def _live_snapshot(ctx: StoreContext, box_id: str, name: str, bdir: Path, qmp: Qmp,
                   state: LiveState, opid: str, extra: dict[str, Any] | None) -> dict[str, Any]:
    lay = ctx.layout
    final = lay.snapshot_dir(box_id, name)
    stage = lay.snapshots_dir(box_id) / f".stage-{opid}"
    entries, plans = _entries(qmp, state, bdir, final, opid)
    data: dict[str, Any] = {"kind": "snapshot", "box": box_id, "name": name,
                            "stage": lay.rel(stage), "final": lay.rel(final),
                            "created": time.time(), "qmp": state.qmp, "disks": entries,
                            **(extra or {})}
    meta = {"box": box_id, "name": name, "created": data["created"], "live": True,
            "disks": {e["disk"]: e["size"] for e in entries}}
    held_ms = _run(ctx, "live_snapshot", (box_key(box_id),), data, qmp, state, bdir, opid,
                   lambda: _stage(bdir, stage, SNAPSHOT_META, meta, entries, plans))
    return {**data, "held_ms": held_ms}


def live_clone(ctx: StoreContext, src_id: str, dst_id: str, bdir: Path, qmp: Qmp,
               state: LiveState, opid: str, meta: dict[str, Any]) -> dict[str, Any]:
    """Clone a running box: a live freeze whose stubs make the clone base, and the new box.

    The clone base (``clones/CID``) holds stubs over the frozen files, the new
    box children over the stubs; both are published after the switch.
    """
    return _fresh_nodes_on_refusal(
        lambda s: _live_clone(ctx, src_id, dst_id, bdir, qmp, s, opid, meta), state)


def _live_clone(ctx: StoreContext, src_id: str, dst_id: str, bdir: Path, qmp: Qmp,
                state: LiveState, opid: str, meta: dict[str, Any]) -> dict[str, Any]:
    lay = ctx.layout
    cdir = lay.clone_dir(opid)
    cstage = lay.clones / f".stage-{opid}"
    dstage = lay.boxes / f".stage-{opid}"
    entries, plans = _entries(qmp, state, bdir, cdir, opid)
    data: dict[str, Any] = {"kind": "clone", "box": src_id, "dst": dst_id,
                            "stage": lay.rel(cstage), "final": lay.rel(cdir),
                            "dst_stage": lay.rel(dstage), "created": meta["created"],
                            "qmp": state.qmp, "disks": entries}
    clone_meta = {"source": src_id, "dest": dst_id, "created": meta["created"], "live": True,
                  "disks": [e["disk"] for e in entries]}

    def staged() -> list[Path]:
        paths = _stage(bdir, cstage, CLONE_META, clone_meta, entries, plans)
        dstage.mkdir()
        (dstage / "snapshots").mkdir()
        write_file(dstage / BOX_META, dump_json(meta))
        paths += [dstage / BOX_META, dstage, lay.boxes]
        for e in entries:
            child = plan_disk(e["size"], backing_name=os.path.relpath(cdir / e["disk"],
                                                                      lay.box_dir(dst_id)),
                              backing_format=BackingFormat.QCOW2)
            write_file(dstage / e["disk"], child.writes, child.file_size)
            paths.append(dstage / e["disk"])
        return paths

    keys = (box_key(src_id), box_key(dst_id))
    held_ms = _run(ctx, "live_clone", keys, data, qmp, state, bdir, opid, staged)
    return {**data, "held_ms": held_ms}


def _switch(qmp: Qmp, state: LiveState, bdir: Path, entries: list[dict[str, Any]]) -> float:
    """Switch QEMU onto the new tops, all at once; how long the guest was held (ms).

    One ``transaction`` in which QEMU opens each new top (the file boxdisk
    made: ``blockdev-snapshot-sync`` in ``mode: existing``, format given) and
    installs it over the current top, for every disk or none. With a guest
    agent, the guest's file systems are frozen around it (and always thawed).
    """
    from boxdisk.live import frozen_guest, remove_node, switch_to_existing  # noqa: PLC0415

    pairs = [(e["node"], e["overlay_node"], bdir / e["overlay"]) for e in entries]
    try:
        if not state.guest_agent:
            start = time.perf_counter()
            switch_to_existing(qmp, pairs)
            return round((time.perf_counter() - start) * 1000, 3)
        with connect(state.guest_agent, agent=True) as agent:
            start = time.perf_counter()
            with frozen_guest(agent, timeout=FREEZE_TIMEOUT):
                switch_to_existing(qmp, pairs)
            return round((time.perf_counter() - start) * 1000, 3)
    except BaseException:
        # A failed transaction closes what it opened; a node left by an interruption goes.
        for _node, overlay, _path in pairs:
            with contextlib.suppress(LiveError):
                remove_node(qmp, overlay)
        raise


def _forward(ctx: StoreContext, data: dict[str, Any], opid: str) -> list[Path]:
    """Past the switch (idempotent, unsynced): publish, record the new tops; what to sync."""
    lay = ctx.layout
    bdir = lay.box_dir(data["box"])
    stage, final = lay.abs(data["stage"]), lay.abs(data["final"])
    if os.path.lexists(stage) and not os.path.lexists(final):
        os.rename(stage, final)
    paths = [final, final.parent]
    if data["kind"] == "clone":
        dstage, ddir = lay.abs(data["dst_stage"]), lay.box_dir(data["dst"])
        if os.path.lexists(dstage) and not os.path.lexists(ddir):
            os.rename(dstage, ddir)
        paths.append(lay.boxes)
    crashpoint(f"live_{data['kind']}", "published")
    where = ({"snapshot": data["name"]} if data["kind"] == "snapshot"
             else {"clone": final.name})
    state = read_state(bdir) or LiveState(qmp=data.get("qmp"))
    tops = dict(state.tops)
    frozen = list(state.frozen)
    nodes = dict(state.nodes)
    for e in data["disks"]:
        if tops.get(e["disk"], [e["disk"]])[0] == e["overlay"]:
            continue  # recorded already
        frozen.append({"disk": e["disk"], "file": e["top"], "inode": e["inode"],
                       "node": e["node"], **where})
        tops[e["disk"]] = [e["overlay"], *(inode(bdir / e["overlay"]) or [0, 0])]
        nodes[e["disk"]] = e["overlay_node"]
    new = attrs.evolve(state, tops=tops, frozen=frozen, nodes=nodes)
    return [*paths, *stage_state(bdir, new, opid)]


def _ask_qemu(qmp: Qmp | None, data: dict[str, Any]) -> bool | None:
    """Whether the box's QEMU writes to the new tops (None: no QEMU answers)."""
    from boxdisk.live import writable_nodes  # noqa: PLC0415

    if qmp is None:
        return None
    try:
        writable = writable_nodes(qmp)
    except LiveError:
        return None
    # The new tops' node names are boxdisk's own (they carry the operation's id).
    return any(writable.get(e["overlay_node"]) for e in data["disks"])


def _grown(path: Path, file_size: int) -> bool:
    """Whether QEMU wrote into a new top (it allocated clusters: the file grew)."""
    try:
        return os.stat(path).st_size > file_size
    except FileNotFoundError:
        return False


def recover_live_snapshot(ctx: StoreContext, record: Record) -> None:
    """Finish a live snapshot (or clone) QEMU had switched to; otherwise undo it."""
    from boxdisk.live import remove_node  # noqa: PLC0415

    data = record.data
    lay = ctx.layout
    bdir = lay.box_dir(data["box"])
    published = os.path.lexists(lay.abs(data["final"]))
    with reach(data.get("qmp")) as qmp:
        switched = _ask_qemu(qmp, data)
        if switched is None:
            switched = any(_grown(bdir / e["overlay"], e["file_size"]) for e in data["disks"])
        if switched or published:
            ctx.barrier(_forward(ctx, data, record.opid))
            return
        if qmp is not None:
            for e in data["disks"]:
                remove_node(qmp, e["overlay_node"])
    for e in data["disks"]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(bdir / e["overlay"])
    remove_tree(lay.abs(data["stage"]))
    if data["kind"] == "clone":
        remove_tree(lay.abs(data["dst_stage"]))
