"""Taking things away: ``remove_snapshot`` (with its merge), ``remove_box`` and ``gc``.

A removal decides under the store lock, from a fresh scan of the images'
headers, that nothing depends on what goes; then it renames what goes into the
trash (the point of no return) and deletes the trash outside the lock.
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from boxdisk._errors import DependentsExistError, SnapshotInUseError, StoreError
from boxdisk._locks import ensure_not_in_use, image_in_use, remove_stale_temp
from boxdisk._log import get_logger
from boxdisk.chain import open_chain
from boxdisk.graph import DependencyGraph
from boxdisk.ops import rebase

from ._core import StoreContext, box_key, ms, reported
from ._fs import fsync_dir, make_read_only, make_writable, remove_tree
from ._journal import Record, crashpoint, new_opid
from ._live import ensure_stopped, stopped
from ._live_merge import live_remove_snapshot
from ._queries import graph, host_bytes, leftovers, protected
from ._values import GcReport

__all__ = [
    "dead_clones",
    "gc",
    "recover_remove_box",
    "recover_remove_snapshot",
    "remove_box",
    "remove_snapshot",
]

log = get_logger(__name__)


def dead_clones(ctx: StoreContext, graph: DependencyGraph, protected: set[str],
                removed: frozenset[str] | set[str] = frozenset()) -> set[str]:
    """Clone-base images nothing (but other dead clone bases, or ``removed``) depends on."""
    lay = ctx.layout
    clones_root = str(lay.clones) + os.sep
    candidates = {n.path for n in graph if n.path.startswith(clones_root)}
    guarded = set()
    for p in candidates:
        rel = lay.rel(p)
        cdir_rel = os.path.dirname(rel)
        if rel in protected or cdir_rel in protected:
            guarded.add(p)
    # Peel: a clone base is dead when all its dependents are dead clone bases.
    alive = {p for p in candidates
             if p in guarded or any(q not in candidates and q not in removed
                                    for q in graph.direct_dependents(p))}
    changed = True
    while changed:
        changed = False
        for p in candidates - alive:
            if any(q in alive for q in graph.direct_dependents(p)):
                alive.add(p)
                changed = True
    # A clone directory lives or dies as a whole (container and guest disk together).
    dead_dirs = {os.path.dirname(p) for p in candidates - alive}
    alive_dirs = {os.path.dirname(p) for p in alive}
    return {p for p in candidates if os.path.dirname(p) in dead_dirs - alive_dirs}


# -- remove_snapshot ------------------------------------------------------------------------


def remove_snapshot(ctx: StoreContext, box_id: str, name: str, *, merge: bool) -> None:
    """Delete a snapshot (merged into its dependents first with ``merge``)."""
    start = time.perf_counter()
    key = box_key(box_id)
    lay = ctx.layout
    with ctx.operation("remove_snapshot", (key,)):
        bdir = ctx.box_dir(box_id)
        with stopped(ctx, box_id, bdir, "remove a snapshot of the box", live=True) as (qmp,
                                                                                     state):
            if qmp is not None and state is not None:
                ctx.snapshot_dir(box_id, name)
                live_remove_snapshot(ctx, box_id, name, bdir, qmp, state, merge=merge)
                return
        sdir = ctx.snapshot_dir(box_id, name)
        own = {os.path.realpath(sdir / d) for d in ctx.disks_in(sdir)}
        with ctx.locks.structural(f"remove_snapshot {box_id!r} {name!r}"):
            steps = _merge_plan(ctx, sdir, own, merge=merge)
        opid = new_opid()
        trash = lay.trash / opid
        data = {"box": box_id, "name": name, "trash": lay.rel(trash), "steps": steps}
        with ctx.intent("remove_snapshot", (key,), data, opid) as record:
            crashpoint("remove_snapshot", "recorded")
            if steps:
                # A merge makes snapshots writable while it streams into them: the record
                # that seals them again must outlive a power cut.
                ctx.barrier(ctx.journal.durable_paths(record))
            for i, step in enumerate(steps):
                image = lay.abs(step["image"])
                if not step["writable"]:
                    make_writable(image)
                target = None if step["target"] is None else lay.abs(step["target"])
                rebase(image, target, backing_format=step["format"], safe=True,
                       relative=True, allowed_roots=ctx.roots)
                if not step["writable"]:
                    make_read_only(image)
                crashpoint("remove_snapshot", f"rebased:{i}")
            with ctx.locks.structural(f"remove_snapshot {box_id!r} {name!r}"):
                if steps and _merge_plan(ctx, sdir, own, merge=False):
                    msg = f"snapshot {name!r} of box {box_id!r} gained dependents"
                    raise StoreError(msg, path=sdir, field="snapshot", value=name)
                os.rename(sdir, trash)
                crashpoint("remove_snapshot", "moved")
            fsync_dir(sdir.parent)  # durable call 1 (without a merge, the only one)
            crashpoint("remove_snapshot", "synced")
            # Out of view now; deleting the files may take a while, outside the lock.
            remove_tree(trash)
            crashpoint("remove_snapshot", "removed")
    log.info("snapshot_removed", box=box_id, name=name, merged=len(steps), ms=ms(start))


def _merge_plan(ctx: StoreContext, sdir: Path, own: set[str], *,
                merge: bool) -> list[dict[str, Any]]:
    """The safe rebases that take the snapshot ``own`` out of every chain (under the lock).

    Without ``merge`` there must be none: any dependent is refused with
    :class:`SnapshotInUseError` naming them all.
    """
    lay = ctx.layout
    ctx.recoverer.recover_dead()
    g = graph(ctx)
    everyone: set[str] = set()
    for p in own:
        everyone |= g.dependents(p)
    everyone -= own
    if everyone and not merge:
        msg = f"snapshot {sdir.name!r} of box {sdir.parent.parent.name!r} is in use"
        raise SnapshotInUseError(msg, path=sdir, field="snapshot", value=sdir.name,
                                 dependents=tuple(sorted(everyone)))
    for p in own:
        ensure_not_in_use(p, "remove the snapshot")
    if not everyone:
        return []
    steps = []
    for p in sorted(own):
        node = g.node(p)
        # The data streamed into the dependents comes from chains confined to the store.
        with open_chain(p, allowed_roots=ctx.roots):
            pass
        target = None if node.backing is None else lay.rel(node.backing)
        for dep in sorted(g.direct_dependents(p) - own):
            if not lay.under_root(dep):
                msg = f"dependent {dep!r} lies outside the store; merge it by hand"
                raise SnapshotInUseError(msg, path=sdir, field="snapshot",
                                         value=sdir.name, dependents=(dep,))
            ensure_not_in_use(dep, "merge the snapshot into it")
            writable = bool(os.stat(dep).st_mode & 0o200)
            steps.append({"image": lay.rel(dep), "target": target,
                          "format": node.backing_format, "writable": writable})
    return steps


def recover_remove_snapshot(ctx: StoreContext, record: Record) -> None:
    """Seal what a merge made writable; delete whatever reached the trash.

    The rename into the trash is the point of no return; before it nothing was
    lost (a merge copies data into dependents without changing what they
    read), so an interrupted merge stops where it was, the snapshot in place.
    """
    lay = ctx.layout
    for step in record.data["steps"]:
        image = lay.abs(step["image"])
        if not step["writable"] and image.exists():
            make_read_only(image)
    remove_tree(lay.abs(record.data["trash"]))


# -- remove_box -----------------------------------------------------------------------------


def remove_box(ctx: StoreContext, box_id: str) -> None:
    """Delete a box with its snapshots and the clone bases only it kept alive."""
    start = time.perf_counter()
    key = box_key(box_id)
    lay = ctx.layout
    with ctx.operation("remove_box", (key,)):
        bdir = ctx.box_dir(box_id)
        ensure_stopped(ctx, box_id, bdir, "remove the box")
        opid = new_opid()
        trash = lay.trash / opid
        data = {"box": box_id, "trash": lay.rel(trash)}
        with ExitStack() as stack:
            # Decide and move under the store lock; delete after releasing it.
            with ctx.locks.structural(f"remove_box {box_id!r}"):
                clone_dirs = _removal_plan(ctx, bdir)
                stack.enter_context(ctx.intent("remove_box", (key,), data, opid))
                crashpoint("remove_box", "recorded")
                os.rename(bdir, trash)
                for i, cdir in enumerate(clone_dirs):
                    os.rename(cdir, lay.trash / f"{opid}-clone{i}")
                crashpoint("remove_box", "moved")
            ctx.barrier([lay.boxes, *([lay.clones] if clone_dirs else [])])  # durable call 1
            crashpoint("remove_box", "synced")
            _remove_trash(ctx, opid)
            crashpoint("remove_box", "removed")
    log.info("box_removed", box=box_id, clone_bases=len(clone_dirs), ms=ms(start))


def _removal_plan(ctx: StoreContext, bdir: Path) -> list[Path]:
    """Refuse the removal of a box others depend on; the dead clone bases that go with it."""
    _recovered, live = ctx.recoverer.recover_dead()
    g = graph(ctx)
    prefix = str(bdir) + os.sep
    own = {n.path for n in g if n.path.startswith(prefix)}
    outside: set[str] = set()
    for p in own:
        outside |= g.dependents(p)
    outside -= own
    guarded = protected(live)
    # Clone bases only the box itself kept alive go with it; any other dependent blocks.
    dead_before = dead_clones(ctx, g, guarded)
    dead_after = dead_clones(ctx, g, guarded, own)
    blocking = outside - dead_after
    if blocking:
        msg = f"box {bdir.name!r} cannot be removed: images outside it back onto its disks"
        raise DependentsExistError(msg, path=bdir, field="box_id", value=bdir.name,
                                   dependents=tuple(sorted(blocking)))
    orphaned = (outside & dead_after) | (dead_after - dead_before)
    for p in sorted(own | orphaned):
        ensure_not_in_use(p, "remove the box (and the clone bases only it used)")
    return sorted({Path(os.path.dirname(p)) for p in orphaned})


def _remove_trash(ctx: StoreContext, opid: str) -> None:
    lay = ctx.layout
    try:
        names = os.listdir(lay.trash)
    except FileNotFoundError:
        return
    for n in names:
        if n.startswith(opid):
            remove_tree(lay.trash / n)


def recover_remove_box(ctx: StoreContext, record: Record) -> None:
    """Renames into the trash are the commit; whatever reached it is deleted."""
    _remove_trash(ctx, record.opid)


# -- gc -------------------------------------------------------------------------------------


def gc(ctx: StoreContext, *, dry_run: bool) -> GcReport:
    """Remove dead clone bases and the leftovers of interrupted operations."""
    start = time.perf_counter()
    lay = ctx.layout
    with reported("gc", lay.root), ctx.locks.structural("gc"):
        recovered, live = ctx.recoverer.recover_dead(dry_run=dry_run)
        live_opids = {r.opid for r in live}
        g = graph(ctx)
        dead = dead_clones(ctx, g, protected(live))
        # A clone base a running QEMU holds (opened directly) waits for a later gc.
        clone_dirs = sorted({os.path.dirname(p) for p in dead}
                            - {os.path.dirname(p) for p in dead if image_in_use(p)})
        left = leftovers(ctx, live_opids)
        freed = sum(host_bytes(Path(c)) for c in clone_dirs)
        freed += sum(host_bytes(p) if p.is_dir() else p.lstat().st_size
                     for p in left if os.path.lexists(p))
        if not dry_run:
            for c in clone_dirs:
                remove_tree(Path(c))
            for p in left:
                if p.suffix == ".tmp" and p.is_file() and not p.is_symlink():
                    remove_stale_temp(p)  # under its lock: a writer just starting keeps it
                else:
                    remove_tree(p)
    report = GcReport(dry_run=dry_run, recovered=tuple(recovered),
                      clone_bases=tuple(lay.rel(c) for c in clone_dirs),
                      leftovers=tuple(lay.rel(p) for p in left), bytes_freed=freed)
    log.info("store_gc", dry_run=dry_run, recovered=len(recovered),
             clone_bases=len(clone_dirs), leftovers=len(left), bytes=freed, ms=ms(start))
    return report
