"""Settling a box no QEMU runs any more back to the usual layout after live snapshots.

While QEMU ran, each live snapshot froze the top where QEMU had it (in the
box's directory) and left a stub in the snapshot's directory. Settling, for
each frozen file, oldest first:

1. names it in its snapshot's directory, its backing name fixed for there,
   in place of the stub (a hard link, the header rewritten, a rename);
2. fixes the backing name of the image above it (the next frozen file or the
   top) to name it in the snapshot's directory;

then renames each top to its disk's usual name, drops the frozen files' old
names and ``live.json``. It is journaled and idempotent: recovery repeats it.
Every name and backing name it will write is computed before the first step
and recorded, so a repeat after a crash does exactly the same.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import attrs

from boxdisk._locks import image_in_use
from boxdisk._log import get_logger
from boxdisk.qcow2 import read_header, rewrite_backing_reference

from ._core import StoreContext, box_key
from ._freeze import inode, moved_name
from ._fs import dump_json, make_read_only, remove_tree, write_file
from ._journal import Record, crashpoint, new_opid
from ._layout import CLONE_META, REMOVED_MARKER
from ._livestate import LiveState, read_state, stage_state, top_paths

__all__ = ["recover_settle", "settle"]

log = get_logger(__name__)


def _target(ctx: StoreContext, box_id: str, frozen: dict[str, Any]) -> Path:
    """Where a frozen file belongs: its snapshot's directory, or its clone base's."""
    lay = ctx.layout
    disk = str(frozen["disk"])
    if "clone" in frozen:
        return lay.clone_dir(str(frozen["clone"])) / disk
    return lay.snapshot_dir(box_id, str(frozen["snapshot"])) / disk


def _plan(ctx: StoreContext, box_id: str, bdir: Path, state: LiveState) -> list[dict[str, Any]]:
    """One step per frozen file: where it goes, its backing name there, who names it."""
    lay = ctx.layout
    steps: list[dict[str, Any]] = []
    for i, f in enumerate(state.frozen):
        target = _target(ctx, box_id, f)
        later = [g for g in state.frozen[i + 1:] if g["disk"] == f["disk"]]
        above = later[0]["file"] if later else state.tops[f["disk"]][0]
        frozen = bdir / f["file"]
        # Its backing name once the steps before have run: an earlier step that moved
        # the file below it renamed it (``above_new``); else the one it has now.
        below = [s for s in steps if s["above"] == f["file"] and s["disk"] == f["disk"]]
        old = below[-1]["above_new"] if below else read_header(frozen).backing_file
        steps.append({
            "disk": f["disk"], "file": f["file"], "inode": f["inode"],
            "target": lay.rel(target), "old": old,
            "new": moved_name(old, bdir, target.parent), "above": above,
            "above_new": os.path.relpath(target, bdir), "clone": f.get("clone"),
        })
    return steps


def settle(ctx: StoreContext, box_id: str, bdir: Path, state: LiveState) -> Path | None:
    """Give a box that no QEMU runs its usual layout again (under the box's lock).

    Does nothing while something still holds the box's files (a later
    operation settles it then), and returns the file that is held; None once
    the box has its usual layout.
    """
    if state.settled:
        if state.empty:
            ctx.barrier(stage_state(bdir, None, ""))
        return None
    names = [str(e[0]) for e in state.tops.values()] + [str(f["file"]) for f in state.frozen]
    # A stub in use (a clone's QEMU reads through it) must not be replaced under it either;
    # nor a removed snapshot's directory dropped while a QEMU runs the box's disks.
    stubs = [_target(ctx, box_id, f) for f in state.frozen]
    held: list[Path] = [*(bdir / n for n in names), *stubs, *top_paths(bdir, state).values()]
    for p in held:
        if p.exists() and image_in_use(p):
            return p
    opid = new_opid()
    data = {"box": box_id, "qmp": state.qmp, "guest_agent": state.guest_agent,
            "tops": state.tops, "removed": state.removed,
            "steps": _plan(ctx, box_id, bdir, state)}
    with ctx.intent("settle", (box_key(box_id),), data, opid) as record:
        crashpoint("settle", "recorded")
        ctx.barrier([*ctx.journal.durable_paths(record), *_forward(ctx, data, opid)])
    log.info("box_settled", box=box_id, snapshots=len(state.frozen))
    return None


def _forward(ctx: StoreContext, data: dict[str, Any], opid: str) -> list[Path]:
    """Every step of the settle (idempotent, unsynced); what the barrier covers."""
    lay = ctx.layout
    bdir = lay.box_dir(data["box"])
    touched: list[Path] = [bdir]
    for step in data["steps"]:
        target = lay.abs(step["target"])
        if step.get("clone") and not target.parent.is_dir():
            _recreate_clone_base(data, target.parent)
            touched += [target.parent / CLONE_META, lay.clones]
        if inode(target) != step["inode"]:
            tmp = target.parent / f".{step['disk']}.{opid}.settle"
            if not os.path.lexists(tmp):
                os.link(bdir / step["file"], tmp)
            _rename_backing(tmp, step["old"], step["new"])
            os.rename(tmp, target)  # in place of the stub
        else:
            _rename_backing(target, step["old"], step["new"])
        crashpoint("settle", f"placed:{step['target']}")
        above = bdir / step["above"]
        if above.exists():
            _rename_backing(above, step["file"], step["above_new"])
        make_read_only(target)
        touched += [target, target.parent, above]
    for d, (name, *_ino) in data["tops"].items():
        if name != d and (bdir / name).exists():
            os.rename(bdir / name, bdir / d)
    crashpoint("settle", "renamed")
    for step in data["steps"]:
        old = bdir / step["file"]
        with contextlib.suppress(FileNotFoundError):
            if inode(old) == step["inode"] and os.stat(old).st_nlink > 1:
                os.unlink(old)  # the snapshot's name keeps the file
    for name in data.get("removed", []):
        sdir = lay.snapshot_dir(data["box"], name)
        if (sdir / REMOVED_MARKER).exists():
            remove_tree(sdir)  # QEMU named images through it; no QEMU runs the box now
    state = read_state(bdir) or LiveState()
    new = attrs.evolve(state, tops={}, frozen=[], removed=[])
    return [*touched, *stage_state(bdir, new, opid)]


def _recreate_clone_base(data: dict[str, Any], cdir: Path) -> None:
    """A live clone's base whose clone went (removed with its clone) while the source was
    not settled: the source's own chain still needs the frozen file, so the base comes
    back, as the source's alone (an offline clone's base is the source's too)."""
    cdir.mkdir(exist_ok=True)
    disks = [s["disk"] for s in data["steps"] if s.get("clone") == cdir.name]
    with contextlib.suppress(FileExistsError):
        write_file(cdir / CLONE_META, dump_json({
            "source": data["box"], "dest": None, "created": time.time(), "disks": disks,
            "recreated": True}))


def _rename_backing(image: Path, old: str | None, new: str | None) -> None:
    """Rewrite an image's backing name from ``old`` to ``new`` unless that was done."""
    header = read_header(image)
    if header.backing_file == old and old != new and new is not None:
        rewrite_backing_reference(image, new, header.backing_format, header=header,
                                  sync=False)


def recover_settle(ctx: StoreContext, record: Record) -> None:
    """A settle is only ever finished: repeat it."""
    ctx.barrier(_forward(ctx, record.data, record.opid))
