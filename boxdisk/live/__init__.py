"""Live boxes: talking to the QEMU that runs a box, through QMP and the guest agent.

This package is imported only by operations on a box attached to a running
QEMU (``BoxStore.attach``), so ``import boxdisk`` never loads ``qemu.qmp``.
"""

from __future__ import annotations

import logging

from ._block import (
    BlockNode,
    Listing,
    add_and_switch,
    add_overlay,
    block_nodes,
    find_nodes,
    frozen_guest,
    node_file,
    remove_node,
    run_job,
    switch_to_existing,
    switch_to_overlays,
    top_files,
    wait_job,
    writable_nodes,
)
from ._qmp import DEFAULT_TIMEOUT, Qmp

# qemu.qmp logs through the standard library; without this, Python's last-resort
# handler would print its warnings to stderr of an application that configured nothing.
logging.getLogger("qemu.qmp").addHandler(logging.NullHandler())

__all__ = [
    "DEFAULT_TIMEOUT",
    "BlockNode",
    "Listing",
    "Qmp",
    "add_and_switch",
    "add_overlay",
    "block_nodes",
    "find_nodes",
    "frozen_guest",
    "node_file",
    "remove_node",
    "run_job",
    "switch_to_existing",
    "switch_to_overlays",
    "top_files",
    "wait_job",
    "writable_nodes",
]
