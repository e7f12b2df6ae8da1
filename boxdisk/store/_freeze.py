"""Freezing a box's live disks: what snapshot and clone_box share.

Each live file gets a second name in the frozen directory (a hard link), an
empty child is made over it, then the frozen file's backing name is fixed for
its new directory and the child is renamed over the live name. The first name
fix or swap is the point of no return; recovery tells from the files which
side of it an interrupted operation stopped on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from boxdisk.qcow2 import (
    BackingFormat,
    create_cow_child_disk,
    read_header,
    rewrite_backing_reference,
)

from ._core import StoreContext, same_file
from ._fs import fsync_dir, remove_tree
from ._journal import crashpoint

__all__ = ["freeze_committed", "freeze_forward", "freeze_plan", "freeze_undo", "hidden_with",
           "moved_name", "remove_paths"]


def moved_name(old: str | None, from_dir: Path, to_dir: Path) -> str | None:
    """The backing name that resolves, from ``to_dir``, to what ``old`` did from ``from_dir``."""
    if old is None or os.path.isabs(old):
        return old
    target = os.path.normpath(os.path.join(from_dir, old))
    return os.path.relpath(target, to_dir)


def fix_backing_name(image: Path, old: str | None, new: str | None) -> None:
    """Rewrite a moved image's backing name from ``old`` to ``new`` (idempotent).

    A relative name resolves against the image's directory, so an image
    renamed into another directory needs the name that reaches the same file
    from there. The header is rewritten in place (one write, fsynced).
    """
    if new == old:
        return
    header = read_header(image)
    if header.backing_file == old:
        rewrite_backing_reference(image, new, header.backing_format, header=header)


def freeze_plan(ctx: StoreContext, live_dir: Path, frozen_dir: Path, disks: list[str],
                opid: str) -> list[dict[str, Any]]:
    """Journal entries for freezing ``disks`` of ``live_dir`` into ``frozen_dir``."""
    lay = ctx.layout
    entries: list[dict[str, Any]] = []
    for d in disks:
        header = read_header(live_dir / d)
        entries.append({
            "disk": d, "old": header.backing_file,
            "new": moved_name(header.backing_file, live_dir, frozen_dir),
            "child": lay.rel(live_dir / f".{d}.{opid}.new"), "size": header.size,
        })
    return entries


def freeze_forward(ctx: StoreContext, op: str, live_dir: Path, frozen_dir: Path,
                   entries: list[dict[str, Any]]) -> None:
    """Fix the frozen files' backing names, then swap the children in (idempotent)."""
    lay = ctx.layout
    for e in entries:
        fix_backing_name(frozen_dir / e["disk"], e["old"], e["new"])
        crashpoint(op, f"renamed:{e['disk']}")
    for e in entries:
        child = lay.abs(e["child"])
        live = live_dir / e["disk"]
        if child.exists():
            os.rename(child, live)
        elif same_file(live, frozen := frozen_dir / e["disk"]):
            # Defensive: the child is created before the commit, so it exists.
            create_cow_child_disk(frozen, BackingFormat.QCOW2, child, relative=True,
                                  persistent=True)
            os.rename(child, live)
        crashpoint(op, f"swapped:{e['disk']}")
    fsync_dir(live_dir)


def freeze_committed(live_dir: Path, frozen_dir: Path, entries: list[dict[str, Any]]) -> bool:
    """Whether freezing passed its point of no return: a name fixed or a disk swapped."""
    for e in entries:
        frozen = frozen_dir / e["disk"]
        if not frozen.exists():
            continue
        if e["new"] != e["old"] and read_header(frozen).backing_file == e["new"]:
            return True
        if not same_file(frozen, live_dir / e["disk"]):
            return True
    return False


def freeze_undo(live_dir: Path, frozen_dir: Path, entries: list[dict[str, Any]]) -> None:
    """Roll back a freeze short of its point of no return: remove the frozen directory.

    Its files are then extra links of the live disks (:func:`freeze_committed`
    said so), so dropping them loses nothing.
    """
    for e in entries:
        frozen = frozen_dir / e["disk"]
        if os.path.lexists(frozen) and same_file(frozen, live_dir / e["disk"]):
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
