"""``boxdisk store …``: the box store from the command line.

``--root`` defaults to ``$BOXDISK_ROOT``, then ``$XDG_DATA_HOME/boxdisk/store``
(``~/.local/share/boxdisk/store``). ``--output=json`` prints machine-readable
values for the listing commands; ``graph --format=tree|dot|json`` draws who
backs onto whom.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._progress import progress_for
from ._sizes import format_size, parse_size

__all__ = ["add_store_commands", "default_root"]


def default_root() -> Path:
    """``$BOXDISK_ROOT``, else the per-user data directory."""
    env = os.environ.get("BOXDISK_ROOT")
    if env:
        return Path(env)
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                            "share")
    return Path(data) / "boxdisk" / "store"


def _open(args: argparse.Namespace) -> Any:
    from boxdisk.store import BoxStore  # noqa: PLC0415 - commands import what they need

    return BoxStore(args.root or default_root(), lock_timeout=args.lock_timeout)


def _rel(store: Any, path: Path | str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).relative_to(store.root).as_posix()
    except ValueError:
        return str(path)


def _box_dict(store: Any, box: Any) -> dict[str, Any]:
    return {
        "id": box.id, "dir": _rel(store, box.dir), "disk": _rel(store, box.disk),
        "guest-disk": _rel(store, box.guest_disk), "base": box.base,
        "guest-base": box.guest_base, "clone-of": box.clone_of, "qmp": box.qmp,
        "guest-agent": box.guest_agent,
        "snapshots": list(box.snapshots), "virtual-size": box.size,
        "guest-virtual-size": box.guest_size, "actual-size": box.host_bytes,
        "created": box.created,
    }


def _snapshot_dict(store: Any, snap: Any) -> dict[str, Any]:
    return {
        "box": snap.box_id, "name": snap.name, "disk": _rel(store, snap.disk),
        "guest-disk": _rel(store, snap.guest_disk), "virtual-size": snap.size,
        "actual-size": snap.host_bytes, "created": snap.created,
    }


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _print(args: argparse.Namespace, value: Any, human: Callable[[], None]) -> None:
    if args.output == "json":
        print(json.dumps(value, indent=4))
    else:
        human()


# -- commands -------------------------------------------------------------------------


def _init(args: argparse.Namespace) -> int:
    with _open(args) as store:
        if args.output == "json":
            print(json.dumps({"root": str(store.root)}))
        else:
            print(f"store ready at {store.root}")
    return 0


def _base_add(args: argparse.Namespace) -> int:
    with _open(args) as store:
        path = store.add_base(args.path, args.name, backing_format=args.format, link=args.link)
        print(_rel(store, path))
    return 0


def _base_ls(args: argparse.Namespace) -> int:
    with _open(args) as store:
        names = store.list_bases()
        rows = [{"name": n, "path": _rel(store, store.base_path(n))} for n in names]

        def human() -> None:
            for r in rows:
                print(f"{r['name']}\t{r['path']}")

        _print(args, rows, human)
    return 0


def _box_create(args: argparse.Namespace) -> int:
    size = None if args.size is None else parse_size(args.size)
    with _open(args) as store:
        if len(args.box) == 1:
            box = store.create_box(args.box[0], base=args.base, size=size,
                                   guest_base=args.guest_base)
            _print(args, _box_dict(store, box), lambda: print(_rel(store, box.disk)))
            return 0
        # Several: one operation (create_boxes), all of them or none.
        boxes = store.create_boxes(args.box, base=args.base, size=size,
                                   guest_base=args.guest_base)
        _print(args, [_box_dict(store, b) for b in boxes],
               lambda: print("\n".join(str(_rel(store, b.disk)) for b in boxes)))
    return 0


def _box_ls(args: argparse.Namespace) -> int:
    with _open(args) as store:
        boxes = [store.box(b) for b in store.list_boxes()]
        rows = [_box_dict(store, b) for b in boxes]

        def human() -> None:
            print(f"{'BOX':24} {'BASE':16} {'SIZE':>10} {'ON DISK':>10} SNAPSHOTS")
            for b in boxes:
                print(f"{b.id:24} {b.base or '-':16} {format_size(b.size):>10} "
                      f"{format_size(b.host_bytes):>10} {len(b.snapshots)}")

        _print(args, rows, human)
    return 0


def _box_show(args: argparse.Namespace) -> int:
    with _open(args) as store:
        box = store.box(args.box)
        d = _box_dict(store, box)

        def human() -> None:
            print(f"box: {box.id}")
            print(f"disk: {d['disk']}")
            if box.guest_disk is not None:
                print(f"guest disk: {d['guest-disk']}")
            print(f"base: {box.base or '-'}")
            if box.clone_of:
                print(f"clone of: {box.clone_of}")
            if box.qmp:
                print(f"running: attached to QEMU at {box.qmp}"
                      + (f" (guest agent {box.guest_agent})" if box.guest_agent else ""))
            print(f"virtual size: {format_size(box.size)} ({box.size} bytes)")
            print(f"on disk: {format_size(box.host_bytes)}")
            print(f"created: {_when(box.created)}")
            print(f"snapshots: {', '.join(box.snapshots) or '-'}")

        _print(args, d, human)
    return 0


def _box_attach(args: argparse.Namespace) -> int:
    with _open(args) as store:
        store.attach(args.box, args.qmp, guest_agent=args.guest_agent)
        box = store.box(args.box)
        _print(args, _box_dict(store, box), lambda: print(f"{box.id}: attached to {box.qmp}"))
    return 0


def _box_detach(args: argparse.Namespace) -> int:
    with _open(args) as store:
        store.detach(args.box)
    return 0


def _box_rm(args: argparse.Namespace) -> int:
    with _open(args) as store:
        store.remove_box(args.box)
    return 0


def _snap_create(args: argparse.Namespace) -> int:
    with _open(args) as store:
        snap = store.snapshot(args.box, args.name)
        _print(args, _snapshot_dict(store, snap), lambda: print(_rel(store, snap.disk)))
    return 0


def _snap_ls(args: argparse.Namespace) -> int:
    with _open(args) as store:
        snaps = store.list_snapshots(args.box)
        rows = [_snapshot_dict(store, s) for s in snaps]

        def human() -> None:
            print(f"{'SNAPSHOT':24} {'CREATED':20} {'ON DISK':>10}")
            for s in snaps:
                print(f"{s.name:24} {_when(s.created):20} {format_size(s.host_bytes):>10}")

        _print(args, rows, human)
    return 0


def _snap_restore(args: argparse.Namespace) -> int:
    with _open(args) as store:
        store.restore(args.box, args.name)
    return 0


def _snap_rm(args: argparse.Namespace) -> int:
    with _open(args) as store:
        store.remove_snapshot(args.box, args.name, merge=args.merge)
    return 0


def _clone(args: argparse.Namespace) -> int:
    with _open(args) as store:
        box = store.clone_box(args.src, args.dst)
        _print(args, _box_dict(store, box), lambda: print(_rel(store, box.disk)))
    return 0


def _export(args: argparse.Namespace) -> int:
    with _open(args) as store:
        bar = progress_for("export", args.progress)
        try:
            store.export_box(args.box, args.dest, snapshot=args.snapshot, guest=args.guest,
                             overwrite=args.overwrite, progress=bar,
                             keep_snapshot=args.keep_snapshot)
        finally:
            if bar is not None:
                bar.close()
    return 0


def _import(args: argparse.Namespace) -> int:
    with _open(args) as store:
        box = store.import_box(args.box, args.image, format=args.format)
        _print(args, _box_dict(store, box), lambda: print(_rel(store, box.disk)))
    return 0


def _gc(args: argparse.Namespace) -> int:
    with _open(args) as store:
        report = store.gc(dry_run=args.dry_run)
        d = {"dry-run": report.dry_run, "recovered": list(report.recovered),
             "clone-bases": list(report.clone_bases), "leftovers": list(report.leftovers),
             "bytes-freed": report.bytes_freed}

        def human() -> None:
            verb = "would remove" if report.dry_run else "removed"
            for what, items in (("recovered", report.recovered),
                                (f"{verb} clone base", report.clone_bases),
                                (f"{verb} leftover", report.leftovers)):
                for item in items:
                    print(f"{what}: {item}")
            print(f"{verb} {format_size(report.bytes_freed)}")

        _print(args, d, human)
    return 0


def _verify(args: argparse.Namespace) -> int:
    with _open(args) as store:
        report = store.verify()
        d = {"images": report.images, "boxes": report.boxes, "ok": not report.problems,
             "in-flight": list(report.in_flight),
             "problems": [{"path": p.path, "kind": p.kind, "message": p.message}
                          for p in report.problems]}

        def human() -> None:
            for p in report.problems:
                print(f"{p.kind}: {p.path}: {p.message}")
            state = "clean" if not report.problems else f"{len(report.problems)} problem(s)"
            print(f"{report.boxes} boxes, {report.images} images: {state}")

        _print(args, d, human)
    return 0 if not report.problems else 2


# -- graph ------------------------------------------------------------------------------


def _label(store: Any, path: str) -> str:
    """What an image is to the store: ``box vm1``, ``snapshot vm1/s1``, ``base ubuntu``, ..."""
    rel = _rel(store, path) or path
    parts = rel.split("/")
    disk = parts[-1]
    guest = " (guest disk)" if disk.startswith("guest-rootfs") else ""
    if parts[0] == "bases" and len(parts) >= 3:
        return f"base {parts[1]}{guest}"
    if parts[0] == "boxes" and len(parts) == 3:
        return f"box {parts[1]}{guest}"
    if parts[0] == "boxes" and len(parts) >= 5 and parts[2] == "snapshots":
        return f"snapshot {parts[1]}/{parts[3]}{guest}"
    if parts[0] == "clones" and len(parts) >= 3:
        return f"clone base {parts[1]}{_clone_note(store, parts[1])}{guest}"
    return rel


def _clone_note(store: Any, cid: str) -> str:
    """`` (vm1 -> vm2)``: which clone made a clone base, from its metadata."""
    try:
        meta = json.loads((Path(store.root) / "clones" / cid / "clone.json").read_text())
        return f" ({meta['source']} -> {meta['dest']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def graph_tree(store: Any, graph: Any) -> list[str]:
    """The store's images as an indented tree: each base, then whatever backs onto it."""
    lines: list[str] = []
    seen: set[str] = set()

    def walk(path: str, prefix: str, last: bool, top: bool) -> None:
        connector = "" if top else ("└── " if last else "├── ")
        lines.append(f"{prefix}{connector}{_label(store, path)}")
        if path in seen:  # a backing cycle: draw it once (verify reports it)
            return
        seen.add(path)
        children = sorted(graph.direct_dependents(path), key=lambda p: _label(store, p))
        inner = prefix if top else prefix + ("    " if last else "│   ")
        for i, child in enumerate(children):
            walk(child, inner, i == len(children) - 1, False)

    bottoms = [n.path for n in graph if n.backing is None or n.backing not in graph]
    for bottom in sorted(bottoms, key=lambda p: _label(store, p)):
        walk(bottom, "", True, True)
    return lines


def _graph(args: argparse.Namespace) -> int:
    with _open(args) as store:
        graph = store.graph()
        if args.format == "dot":
            print(graph.to_dot(relative_to=store.root), end="")
        elif args.format == "json":
            nodes = [{"path": _rel(store, n.path), "label": _label(store, n.path),
                      "format": n.format, "backing": _rel(store, n.backing),
                      "error": n.error} for n in sorted(graph, key=lambda n: n.path)]
            print(json.dumps(nodes, indent=4))
        else:
            for line in graph_tree(store, graph):
                print(line)
    return 0


# -- the parser -----------------------------------------------------------------------------


def add_store_commands(sub: Any) -> None:
    """Add ``boxdisk store …`` to the ``boxdisk`` subparsers."""
    store = sub.add_parser("store", help="manage a store of boxes (bases, snapshots, clones)")
    store.add_argument("--root", type=Path, default=None,
                       help="store directory (default: $BOXDISK_ROOT, else "
                            "~/.local/share/boxdisk/store)")
    store.add_argument("--lock-timeout", type=float, default=30.0, metavar="SECONDS")
    store.add_argument("--output", choices=("human", "json"), default="human")
    cmds = store.add_subparsers(dest="store_command", metavar="COMMAND", required=True)

    p = cmds.add_parser("init", help="create the store (or check an existing one)")
    p.set_defaults(func=_init)

    base = cmds.add_parser("base", help="read-only base images")
    bcmds = base.add_subparsers(dest="base_command", metavar="COMMAND", required=True)
    p = bcmds.add_parser("add", help="copy an image into the store as a base")
    p.add_argument("-F", dest="format", required=True, choices=("qcow2", "raw"),
                   help="the image's format (never probed)")
    p.add_argument("--link", action="store_true", help="hard-link instead of copying")
    p.add_argument("path", metavar="PATH")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=_base_add)
    p = bcmds.add_parser("ls", help="list the bases")
    p.set_defaults(func=_base_ls)

    box = cmds.add_parser("box", help="boxes and their live disks")
    xcmds = box.add_subparsers(dest="box_command", metavar="COMMAND", required=True)
    p = xcmds.add_parser("create", help="create a box (a COW child of a base); several boxes "
                         "are made in one all-or-nothing operation")
    p.add_argument("--base", metavar="NAME")
    p.add_argument("--guest-base", metavar="NAME", help="also a guest-rootfs disk over NAME")
    p.add_argument("--size", metavar="SIZE", help="e.g. 10G (default: the base's)")
    p.add_argument("box", metavar="BOX", nargs="+")
    p.set_defaults(func=_box_create)
    p = xcmds.add_parser("ls", help="list the boxes")
    p.set_defaults(func=_box_ls)
    p = xcmds.add_parser("show", help="one box's facts")
    p.add_argument("box", metavar="BOX")
    p.set_defaults(func=_box_show)
    p = xcmds.add_parser("rm", help="remove a box (refused while anything depends on it)")
    p.add_argument("box", metavar="BOX")
    p.set_defaults(func=_box_rm)
    p = xcmds.add_parser("attach", help="record the running QEMU (its QMP socket) that serves "
                         "the box: snapshot, clone and export then work live")
    p.add_argument("--guest-agent", metavar="SOCKET",
                   help="the QEMU guest agent's socket: the guest's file systems are frozen "
                        "around each switch")
    p.add_argument("box", metavar="BOX")
    p.add_argument("qmp", metavar="QMP_SOCKET")
    p.set_defaults(func=_box_attach)
    p = xcmds.add_parser("detach", help="forget the box's QEMU (after it stopped)")
    p.add_argument("box", metavar="BOX")
    p.set_defaults(func=_box_detach)

    snap = cmds.add_parser("snapshot", help="snapshots of a box")
    scmds = snap.add_subparsers(dest="snapshot_command", metavar="COMMAND", required=True)
    p = scmds.add_parser("create", help="freeze the live disk as a snapshot")
    p.add_argument("box", metavar="BOX")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=_snap_create)
    p = scmds.add_parser("ls", help="list a box's snapshots")
    p.add_argument("box", metavar="BOX")
    p.set_defaults(func=_snap_ls)
    p = scmds.add_parser("restore", help="give the box a fresh disk over a snapshot")
    p.add_argument("box", metavar="BOX")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=_snap_restore)
    p = scmds.add_parser("rm", help="remove a snapshot (refused while anything depends on it)")
    p.add_argument("--merge", action="store_true",
                   help="first stream its data into its dependents (safe rebase)")
    p.add_argument("box", metavar="BOX")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=_snap_rm)

    p = cmds.add_parser("clone", help="clone a box (both diverge from here)")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.set_defaults(func=_clone)

    p = cmds.add_parser("export", help="write a box's disk as one standalone qcow2")
    p.add_argument("--snapshot", metavar="NAME", help="export this snapshot instead")
    p.add_argument("--guest", action="store_true", help="export the guest disk")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DEST")
    p.add_argument("--keep-snapshot", action="store_true",
                   help="of a running box: keep the export's snapshot (export-ID) instead "
                        "of merging it back")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("box", metavar="BOX")
    p.add_argument("dest", metavar="DEST")
    p.set_defaults(func=_export)

    p = cmds.add_parser("import", help="make a standalone image a new box")
    p.add_argument("-f", dest="format", choices=("qcow2", "raw"), default="qcow2")
    p.add_argument("box", metavar="BOX")
    p.add_argument("image", metavar="IMAGE")
    p.set_defaults(func=_import)

    p = cmds.add_parser("gc", help="remove unused clone bases and leftovers")
    p.add_argument("--dry-run", action="store_true", help="only say what would go")
    p.set_defaults(func=_gc)

    p = cmds.add_parser("verify", help="check every chain and image (exit 2 on problems)")
    p.set_defaults(func=_verify)

    p = cmds.add_parser("graph", help="who backs onto whom")
    p.add_argument("--format", choices=("tree", "dot", "json"), default="tree")
    p.set_defaults(func=_graph)
