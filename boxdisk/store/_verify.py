"""The checks of :meth:`BoxStore.verify`: chains, images, metadata against files, leftovers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from boxdisk._errors import BoxdiskError, NotFoundError, StoreError
from boxdisk._locks import image_in_use
from boxdisk.chain import open_chain
from boxdisk.graph import DependencyGraph
from boxdisk.ops import check
from boxdisk.qcow2 import BackingFormat, read_header

from ._core import StoreContext, same_file
from ._layout import (
    BASE_META,
    BOX_META,
    CLONE_META,
    CONTAINER_DISK,
    DISK_NAMES,
    REMOVED_MARKER,
    SNAPSHOT_META,
)
from ._livestate import LIVE_META, read_state, top_paths
from ._queries import images, leftovers, list_bases, list_boxes, protected
from ._values import Problem, VerifyReport

__all__ = ["Verifier"]

_WRITE_BITS = 0o222


class Verifier:
    """The checks of :meth:`BoxStore.verify`, one method per kind of thing checked."""

    def __init__(self, ctx: StoreContext) -> None:
        self.ctx = ctx
        self.lay = ctx.layout
        self.problems: list[Problem] = []
        self.in_flight: list[str] = []
        self.live_opids: set[str] = set()
        #: Root-relative paths that operations in flight name (they may be mid-change).
        self.live_paths: set[str] = set()
        self.images: list[str] = []
        self.boxes: list[str] = []

    def add(self, path: str | os.PathLike[str], kind: str, message: str) -> None:
        self.problems.append(Problem(os.fspath(path), kind, message))

    def structure(self) -> None:
        """Everything but the images' contents: run under the store lock (a stable tree)."""
        ctx = self.ctx
        for name in sorted(ctx.journal.names()):
            record = ctx.journal.load(name)
            if record is None:
                continue
            with ctx.locks.try_hold(record.keys, "verify") as free:
                if free:
                    self.add(record.path, "interrupted",
                             f"{record.op} {record.opid} was interrupted; reopening the store "
                             f"or gc() recovers it")
                else:
                    self.in_flight.append(f"{record.op} {record.opid}")
                    self.live_opids.add(record.opid)
                    self.live_paths |= protected([record])
        self.images = images(ctx)
        self.check_graph(DependencyGraph.scan(self.images))
        for path in self.images:
            self.check_chain(path)
        self.boxes = list_boxes(ctx)
        for box_id in self.boxes:
            self.check_box(box_id)
        self.check_bases()
        self.check_clones()
        for p in leftovers(ctx, self.live_opids):
            self.add(p, "leftover", "left behind by an interrupted operation; gc() removes it")

    def contents(self) -> None:
        """``check`` every image: outside the store lock, as it reads every table."""
        for path in self.images:
            self.check_image(path)

    def report(self) -> VerifyReport:
        """What was found."""
        return VerifyReport(images=len(self.images), boxes=len(self.boxes),
                            problems=tuple(self.problems), in_flight=tuple(self.in_flight))

    def check_graph(self, graph: DependencyGraph) -> None:
        for node in graph:
            if node.error is not None:
                self.add(node.path, "unreadable", node.error)
            elif node.backing is not None:
                if not self.lay.under_root(node.backing):
                    self.add(node.path, "outside",
                             f"backs onto {node.backing!r}, outside the store")
                if node.backing_format is None:
                    self.add(node.path, "backing_format",
                             "names a backing file without a backing format")
        for cycle in graph.cycles():
            self.add(cycle[0], "cycle", "backing files form a cycle: " + " -> ".join(cycle))

    def check_chain(self, path: str) -> None:
        try:
            with open_chain(path, allowed_roots=self.ctx.roots):
                pass
        except BoxdiskError as exc:
            self.add(path, "chain", f"chain does not open: {exc}")

    def check_image(self, path: str) -> None:
        if not os.path.exists(path):
            return  # removed (or moved) by an operation since the tree was read
        if image_in_use(path):
            self.in_flight.append(f"image in use, not checked: {path}")
            return
        try:
            report = check(path)
        except BoxdiskError as exc:
            if os.path.exists(path):
                self.add(path, "check", f"check failed: {exc}")
            return
        if report.corruptions or report.leaks or report.check_errors:
            self.add(path, "check", f"{report.corruptions} corruptions, {report.leaks} leaks, "
                                    f"{report.check_errors} check errors")

    def _meta(self, path: Path, what: str) -> dict[str, Any] | None:
        try:
            return self.ctx.read_meta(path, what)
        except StoreError as exc:
            self.add(path, "metadata", exc.message)
            return None

    def _read_only(self, path: Path) -> None:
        rel = self.lay.rel(path)
        if rel in self.live_paths or os.path.dirname(rel) in self.live_paths:
            return  # an operation in flight is changing it (a merge writes into a snapshot)
        if path.stat().st_mode & _WRITE_BITS:
            self.add(path, "writable", "an immutable image is writable")

    def check_box(self, box_id: str) -> None:
        lay = self.lay
        bdir = lay.box_dir(box_id)
        meta = self._meta(bdir / BOX_META, "box")
        try:
            tops = top_paths(bdir, read_state(bdir))
        except StoreError as exc:
            self.add(bdir / LIVE_META, "metadata", exc.message)
            return
        if CONTAINER_DISK not in tops or not tops[CONTAINER_DISK].is_file():
            self.add(tops.get(CONTAINER_DISK, bdir / CONTAINER_DISK), "missing",
                     "the box has no live container disk")
            return
        if meta is not None:
            if meta.get("id") != box_id:
                self.add(bdir / BOX_META, "metadata",
                         f"box.json names box {meta.get('id')!r}, the directory {box_id!r}")
            for field, disk in (("base", CONTAINER_DISK), ("guest_base", DISK_NAMES[1])):
                self.check_descent(tops.get(disk, bdir / disk), meta.get(field), field)
        for sdir in sorted(p for p in lay.snapshots_dir(box_id).glob("*")
                           if p.is_dir() and not p.name.startswith(".")
                           and not (p / REMOVED_MARKER).exists()):
            smeta = self._meta(sdir / SNAPSHOT_META, "snapshot")
            if smeta is not None and smeta.get("name") != sdir.name:
                self.add(sdir / SNAPSHOT_META, "metadata",
                         f"snapshot.json names {smeta.get('name')!r}, the directory "
                         f"{sdir.name!r}")
            if not (sdir / CONTAINER_DISK).is_file():
                self.add(sdir, "missing", "the snapshot has no container disk")
            for d in DISK_NAMES:
                if (sdir / d).is_file():
                    self._read_only(sdir / d)
            if (sdir / DISK_NAMES[1]).is_file() != (DISK_NAMES[1] in tops):
                self.add(sdir, "disks", "the snapshot and the box hold different disks")

    def check_descent(self, disk: Path, base: object, field: str) -> None:
        """The chain of a live disk ends at the base its metadata names (headers are the truth)."""
        if not disk.is_file():
            if base is not None:
                self.add(disk, "missing",
                         f"box.json names {field} {base!r} but the disk is missing")
            return
        try:
            with open_chain(disk, allowed_roots=self.ctx.roots) as chain:
                bottom = chain.paths[-1]
        except BoxdiskError:
            return  # reported by check_image
        if base is None:
            return
        if not isinstance(base, str):
            self.add(disk.parent / BOX_META, "metadata", f"{field} is not a name: {base!r}")
            return
        try:
            expected = self.ctx.base_image(base)[0]
        except NotFoundError:
            self.add(disk.parent / BOX_META, "metadata", f"{field} {base!r} is not in the store")
            return
        if not same_file(Path(bottom), expected):
            self.add(disk, "descent", f"box.json says {field} {base!r} but the chain ends at "
                                      f"{bottom!r}")

    def check_bases(self) -> None:
        lay = self.lay
        for name in list_bases(self.ctx):
            bdir = lay.base_dir(name)
            meta = self._meta(bdir / BASE_META, "base")
            try:
                path, fmt = self.ctx.base_image(name)
            except NotFoundError:
                self.add(bdir, "missing", "the base has no image")
                continue
            if meta is not None and meta.get("format") != fmt.value:
                self.add(bdir / BASE_META, "metadata",
                         f"base.json says format {meta.get('format')!r}, the file is {fmt.value}")
            if fmt is BackingFormat.QCOW2:
                try:
                    if read_header(path).backing_file is not None:
                        self.add(path, "base", "a base has a backing file")
                except BoxdiskError:
                    pass  # reported by the graph

    def check_clones(self) -> None:
        lay = self.lay
        try:
            dirs = sorted(p for p in lay.clones.iterdir()
                          if p.is_dir() and not p.name.startswith("."))
        except FileNotFoundError:
            return
        for cdir in dirs:
            self._meta(cdir / CLONE_META, "clone base")
            if not (cdir / CONTAINER_DISK).is_file():
                self.add(cdir, "missing", "the clone base has no container disk")
            for d in DISK_NAMES:
                if (cdir / d).is_file():
                    self._read_only(cdir / d)
