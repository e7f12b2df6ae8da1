"""Which module recovers each journaled operation (the table the façade gives recovery)."""

from __future__ import annotations

from . import (
    _boxes,
    _clones,
    _live_export,
    _live_merge,
    _live_snapshot,
    _removal,
    _settle,
    _snapshots,
)
from ._recovery import Handler

__all__ = ["RECOVERY"]

#: Which module recovers each journaled operation.
RECOVERY: dict[str, Handler] = {
    "create_box": _boxes.recover_staged,
    "create_boxes": _boxes.recover_create_boxes,
    "import_box": _boxes.recover_staged,
    "add_base": _boxes.recover_staged,
    "snapshot": _snapshots.recover_snapshot,
    "snapshot_boxes": _snapshots.recover_snapshot_boxes,
    "restore": _snapshots.recover_restore,
    "clone_box": _clones.recover_clone,
    "live_snapshot": _live_snapshot.recover_live_snapshot,
    "live_clone": _live_snapshot.recover_live_snapshot,
    "live_export": _live_export.recover_live_export,
    "live_remove_snapshot": _live_merge.recover_live_remove_snapshot,
    "settle": _settle.recover_settle,
    "remove_snapshot": _removal.recover_remove_snapshot,
    "remove_box": _removal.recover_remove_box,
}
