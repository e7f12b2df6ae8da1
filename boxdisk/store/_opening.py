"""Opening a store: creating its layout on first use, checking its marker."""

from __future__ import annotations

import errno
import os
import time

from boxdisk._errors import StoreError, StoreFormatError
from boxdisk._log import get_logger

from ._fs import dump_json, fsync_dir, read_json, remove_tree, write_file
from ._journal import new_opid
from ._layout import FORMAT_NAME, FORMAT_VERSION, META_DIR, Layout

__all__ = ["one_file_system", "open_or_create"]

log = get_logger(__name__)


def open_or_create(lay: Layout) -> None:
    """Create the layout in a missing or empty directory; check an existing store's marker."""
    root = lay.root
    if os.path.lexists(root) and not root.is_dir():
        msg = "not a boxdisk store: the path is not a directory"
        raise StoreFormatError(msg, path=root, field="root")
    if not lay.meta.is_dir():
        _create_layout(lay)
    _check_marker(lay)
    for sub in (lay.journal, lay.locks, lay.trash, lay.bases, lay.boxes, lay.clones):
        if not sub.is_dir():
            sub.mkdir(exist_ok=True)


def _create_layout(lay: Layout) -> None:
    root = lay.root
    try:
        root.mkdir(parents=True, exist_ok=True)
        others = [n for n in os.listdir(root) if not n.startswith(f"{META_DIR}.init-")]
    except OSError as exc:
        msg = f"cannot create the store directory: {exc.strerror}"
        raise StoreError(msg, path=root, field="root") from None
    if others and META_DIR not in others:
        msg = (f"not a boxdisk store (no {META_DIR}/) and not empty "
               f"({len(others)} entries); refusing to turn it into one")
        raise StoreFormatError(msg, path=root, field=META_DIR)
    if META_DIR in others:
        return
    staging = root / f"{META_DIR}.init-{new_opid()}"
    try:
        staging.mkdir()
        for name in ("journal", "locks", "trash"):
            (staging / name).mkdir()
        write_file(staging / "store.json", dump_json(
            {"format": FORMAT_NAME, "version": FORMAT_VERSION, "created": time.time()}),
            sync=True)
        fsync_dir(staging)
        try:
            os.rename(staging, lay.meta)  # atomic: another creator may win the race
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        for sub in (lay.bases, lay.boxes, lay.clones):
            sub.mkdir(exist_ok=True)
        fsync_dir(root)
    except OSError as exc:
        msg = f"cannot create the store layout: {exc.strerror}"
        raise StoreError(msg, path=root, field="root") from None
    finally:
        remove_tree(staging)
    log.info("store_created", root=str(root))


def _check_marker(lay: Layout) -> None:
    marker = lay.marker
    try:
        info = read_json(marker)
    except FileNotFoundError:
        msg = f"not a boxdisk store: {META_DIR}/store.json is missing"
        raise StoreFormatError(msg, path=lay.root, field="store.json") from None
    except StoreError as exc:
        raise StoreFormatError(exc.message, path=marker, field="store.json") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT_NAME:
        msg = f"not a boxdisk store: store.json says {info!r}"
        raise StoreFormatError(msg, path=marker, field="format", value=info)
    version = info.get("version")
    if not isinstance(version, int) or version < 1:
        msg = f"store.json has no valid version ({version!r})"
        raise StoreFormatError(msg, path=marker, field="version", value=version)
    if version > FORMAT_VERSION:
        msg = (f"the store was written by a newer boxdisk (store version {version}; "
               f"this boxdisk reads version {FORMAT_VERSION}); nothing was changed")
        raise StoreFormatError(msg, path=marker, field="version", value=version)
    if version < FORMAT_VERSION:
        _migrate(lay, info, version)


def _migrate(lay: Layout, info: dict[str, object], version: int) -> None:
    """Bring an older store to this version (temp file, fsync, rename, fsync the directory).

    Version 2 added the live state of running boxes (``boxes/ID/live.json``:
    a box's top may have another name while QEMU runs it). A version-1 store
    has no running boxes, so only its marker changes; the new version keeps a
    boxdisk that knows no live state from misreading a store that has some.
    """
    tmp = lay.meta / f".store.json.{new_opid()}"
    write_file(tmp, dump_json({**info, "version": FORMAT_VERSION, "migrated_from": version}),
               sync=True)
    os.replace(tmp, lay.marker)
    fsync_dir(lay.meta)
    log.info("store_migrated", root=str(lay.root), old=version, new=FORMAT_VERSION)


def one_file_system(lay: Layout) -> bool:
    """Whether every directory the store writes lies on the root's file system."""
    dev = os.stat(lay.root).st_dev
    return all(os.stat(d).st_dev == dev
               for d in (lay.meta, lay.journal, lay.bases, lay.boxes, lay.clones))
