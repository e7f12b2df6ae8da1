"""Freezing a box's live disks: what snapshot and clone_box share.

Each live file gets a second name in the frozen directory (a hard link) and
an empty child over that name is written beside the live one; one barrier
makes all of it durable. Then, past the point of no return, the frozen file's
backing name is fixed for its new directory and the child is renamed over the
live name, and a second barrier makes that durable.

Recovery tells from the files which side of the point of no return an
interrupted freeze stopped on: a frozen file whose backing name was fixed, or
a live name that no longer holds the inode it held when the operation began
(the journal records it), means the freeze had begun and is finished.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from boxdisk.qcow2 import BackingFormat, plan_disk, read_header, rewrite_backing_reference

from ._core import StoreContext
from ._fs import link_new_file, remove_tree, write_file
from ._journal import crashpoint

__all__ = [
    "freeze_begun",
    "freeze_forward",
    "freeze_plan",
    "freeze_undo",
    "hidden_with",
    "inode",
    "moved_name",
    "remove_paths",
    "write_child",
]


def moved_name(old: str | None, from_dir: Path, to_dir: Path) -> str | None:
    """The backing name that resolves, from ``to_dir``, to what ``old`` did from ``from_dir``."""
    if old is None or os.path.isabs(old):
        return old
    target = os.path.normpath(os.path.join(from_dir, old))
    return os.path.relpath(target, to_dir)


def inode(path: Path) -> list[int] | None:
    """A file's (device, inode) as the journal records it; None when it is missing."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return [st.st_dev, st.st_ino]


def write_child(over: Path, child: Path, size: int, *, name: str | None = None,
                staged: bool = False) -> None:
    """Write an empty qcow2 child of ``over`` (virtual ``size``) at ``child``; not synced.

    The child appears complete or not at all (``staged``: it goes into a
    staging directory no reader looks into, written in place). Its backing
    name is ``over`` relative to the child's directory, or ``name`` when
    ``over`` is about to be renamed to it.
    """
    if name is None:
        name = os.path.relpath(over, child.parent)
    plan = plan_disk(size, backing_name=name, backing_format=BackingFormat.QCOW2)
    (write_file if staged else link_new_file)(child, plan.writes, plan.file_size)


def freeze_plan(ctx: StoreContext, live_dir: Path, frozen_dir: Path, disks: list[str],
                opid: str) -> list[dict[str, Any]]:
    """Journal entries for freezing ``disks`` of ``live_dir`` into ``frozen_dir``.

    Each holds the disk, its backing name now and in the frozen directory,
    the child's staging name, the virtual size, and the live file's inode.
    """
    lay = ctx.layout
    entries: list[dict[str, Any]] = []
    for d in disks:
        header = read_header(live_dir / d)
        entries.append({
            "disk": d, "old": header.backing_file,
            "new": moved_name(header.backing_file, live_dir, frozen_dir),
            "child": lay.rel(live_dir / f".{d}.{opid}.new"), "size": header.size,
            "inode": inode(live_dir / d),
        })
    return entries


def freeze_begun(live_dir: Path, frozen_dirs: tuple[Path, ...],
                 entries: list[dict[str, Any]]) -> bool:
    """Whether a freeze passed its point of no return: a name fixed or a live disk swapped."""
    for e in entries:
        if inode(live_dir / e["disk"]) != e["inode"]:
            return True
        if e["new"] == e["old"]:
            continue
        for d in frozen_dirs:
            frozen = d / e["disk"]
            if frozen.exists() and read_header(frozen).backing_file == e["new"]:
                return True
    return False


def freeze_forward(ctx: StoreContext, op: str, live_dir: Path, frozen_dir: Path,
                   entries: list[dict[str, Any]]) -> None:
    """Fix the frozen files' backing names, then swap the children in (idempotent, unsynced)."""
    lay = ctx.layout
    for e in entries:
        frozen = frozen_dir / e["disk"]
        if e["new"] != e["old"]:
            header = read_header(frozen)
            if header.backing_file == e["old"]:
                rewrite_backing_reference(frozen, e["new"], header.backing_format,
                                          header=header, sync=False)
        crashpoint(op, f"renamed:{e['disk']}")
    for e in entries:
        child = lay.abs(e["child"])
        if child.exists():
            os.rename(child, live_dir / e["disk"])
        crashpoint(op, f"swapped:{e['disk']}")


def freeze_undo(live_dir: Path, frozen_dir: Path, entries: list[dict[str, Any]]) -> None:
    """Roll back a freeze short of its point of no return: remove the frozen directory.

    Its files are then extra links of the live disks (:func:`freeze_begun`
    said so), so dropping them loses nothing.
    """
    for e in entries:
        frozen = frozen_dir / e["disk"]
        if os.path.lexists(frozen) and inode(frozen) == inode(live_dir / e["disk"]):
            os.unlink(frozen)
    remove_tree(frozen_dir)


def hidden_with(directory: Path, opid: str) -> list[Path]:
    """Hidden entries of ``directory`` that belong to operation ``opid`` (its staging files)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return [directory / n for n in names if n.startswith(".") and opid in n]


def remove_paths(paths: list[Path]) -> None:
    """Remove each path (a tree or a file; a missing one is fine)."""
    for p in paths:
        remove_tree(p)
