"""Read-only questions about a store: its boxes, bases, snapshots, images and their graph."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from boxdisk._locks import temp_held
from boxdisk.graph import DependencyGraph
from boxdisk.qcow2 import read_header

from ._core import StoreContext
from ._journal import Record
from ._layout import BOX_META, CONTAINER_DISK, DISK_NAMES, REMOVED_MARKER, SNAPSHOT_META
from ._livestate import read_state, top_paths
from ._values import Box, Snapshot

__all__ = [
    "box_value",
    "files_bytes",
    "graph",
    "host_bytes",
    "images",
    "leftovers",
    "list_bases",
    "list_boxes",
    "protected",
    "snapshot_value",
    "snapshots",
]


def host_bytes(path: Path) -> int:
    """What the files under ``path`` take on the host."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def files_bytes(paths: Iterable[Path]) -> int:
    """What the given files take on the host (a directory just made: its files are known)."""
    total = 0
    for p in paths:
        with contextlib.suppress(OSError):
            total += os.lstat(p).st_blocks * 512
    return total


def _visible_dirs(directory: Path | str) -> list[str]:
    """The names of the subdirectories that are not staging (no leading ``.``), sorted."""
    try:
        with os.scandir(directory) as it:
            return sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())
    except FileNotFoundError:
        return []


def snapshot_names(sroot: Path) -> list[str]:
    """The snapshots in a box's ``snapshots/`` (not staging, not removed while running)."""
    return [n for n in _visible_dirs(sroot) if not (sroot / n / REMOVED_MARKER).exists()]


def list_boxes(ctx: StoreContext) -> list[str]:
    """The ids of every box, sorted."""
    return _visible_dirs(ctx.layout.boxes)


def list_bases(ctx: StoreContext) -> list[str]:
    """The names of every base, sorted."""
    return _visible_dirs(ctx.layout.bases)


def box_value(ctx: StoreContext, box_id: str, bdir: Path,
              meta: dict[str, Any] | None = None) -> Box:
    """The :class:`Box` of an existing box directory."""
    if meta is None:
        meta = ctx.read_meta(bdir / BOX_META, "box")
    state = read_state(bdir)
    if state is None:
        disks = ctx.disks_in(bdir)
        disk = bdir / CONTAINER_DISK
        guest = bdir / DISK_NAMES[1] if len(disks) > 1 else None
    else:  # attached, or a live layout not settled yet: its tops
        tops = top_paths(bdir, state)
        disk, guest = tops[CONTAINER_DISK], tops.get(DISK_NAMES[1])
    snaps = snapshots(ctx, box_id, bdir)
    return Box(
        id=box_id, dir=bdir, disk=disk, guest_disk=guest,
        base=meta.get("base"), guest_base=meta.get("guest_base"),
        snapshots=tuple(s.name for s in snaps),
        size=read_header(disk).size,
        guest_size=None if guest is None else read_header(guest).size,
        host_bytes=host_bytes(bdir), created=float(meta.get("created", 0.0)),
        clone_of=meta.get("clone_of"),
        qmp=None if state is None else state.qmp,
        guest_agent=None if state is None else state.guest_agent,
    )


def snapshots(ctx: StoreContext, box_id: str, bdir: Path) -> list[Snapshot]:
    """The snapshots of a box, oldest first."""
    sroot = bdir / "snapshots"
    snaps = [snapshot_value(ctx, box_id, sroot / n) for n in snapshot_names(sroot)]
    return sorted(snaps, key=lambda s: (s.created, s.name))


def snapshot_value(ctx: StoreContext, box_id: str, sdir: Path) -> Snapshot:
    """The :class:`Snapshot` of an existing snapshot directory."""
    meta = ctx.read_meta(sdir / SNAPSHOT_META, "snapshot")
    disks = ctx.disks_in(sdir)
    disk = sdir / CONTAINER_DISK
    return Snapshot(
        box_id=box_id, name=sdir.name, dir=sdir, disk=disk,
        guest_disk=sdir / DISK_NAMES[1] if len(disks) > 1 else None,
        created=float(meta.get("created", 0.0)), size=read_header(disk).size,
        host_bytes=host_bytes(sdir),
    )


def images(ctx: StoreContext) -> list[str]:
    """Every qcow2 image in the store (staging and trash excluded)."""
    lay = ctx.layout
    out: list[str] = []

    def disks(directory: str) -> None:
        for d in DISK_NAMES:
            p = os.path.join(directory, d)
            if os.path.isfile(p):
                out.append(p)

    for b in _visible_dirs(lay.bases):
        p = os.path.join(lay.bases, b, "disk.qcow2")
        if os.path.isfile(p):
            out.append(p)
    for c in _visible_dirs(lay.clones):
        disks(os.path.join(lay.clones, c))
    for b in _visible_dirs(lay.boxes):
        bdir = os.path.join(lay.boxes, b)
        state = read_state(Path(bdir))
        if state is None:
            disks(bdir)
        else:  # the tops, and the files live snapshots froze where QEMU had them
            out.extend(os.fspath(p) for p in top_paths(Path(bdir), state).values()
                       if p.is_file())
            out.extend(os.path.join(bdir, f["file"]) for f in state.frozen
                       if os.path.isfile(os.path.join(bdir, f["file"])))
        sroot = os.path.join(bdir, "snapshots")
        for s in _visible_dirs(sroot):
            disks(os.path.join(sroot, s))
    return out


def graph(ctx: StoreContext) -> DependencyGraph:
    """The dependency graph of every image in the store, read from their headers."""
    return DependencyGraph.scan(images(ctx))


def protected(records: Iterable[Record]) -> set[str]:
    """Root-relative paths named by operations in flight (gc and verify leave them alone)."""
    out: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, str):
            out.add(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    for r in records:
        walk(r.data)
    return out


def leftovers(ctx: StoreContext, live_opids: set[str]) -> list[Path]:
    """Hidden staging entries and trash that belong to no operation in flight."""
    lay = ctx.layout
    found: list[Path] = []

    def hidden(directory: Path) -> None:
        try:
            names = os.listdir(directory)
        except (FileNotFoundError, NotADirectoryError):
            return
        found.extend(directory / n for n in names if n.startswith("."))

    for d in (lay.boxes, lay.bases, lay.clones, lay.journal):
        hidden(d)
    for b in list_boxes(ctx):
        hidden(lay.box_dir(b))
        hidden(lay.snapshots_dir(b))
    with contextlib.suppress(FileNotFoundError):
        found.extend(lay.trash / n for n in os.listdir(lay.trash))
    # Re-read the journal after listing: an entry's record is written before it.
    live_opids = live_opids | ctx.journal.opids()
    # A temporary file a live writer holds (flock) is not left over, journaled or not;
    # nor is one that is gone by now (a writer published it and removed its name
    # after the listing: checked after temp_held, which says False for a gone file).
    return [p for p in found if not any(o in p.name for o in live_opids)
            and not temp_held(p) and os.path.lexists(p)]
