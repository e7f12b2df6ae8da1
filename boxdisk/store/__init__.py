"""The box store: per-box directories of qcow2 disks with snapshots, clones and safe removal.

``BoxStore`` is the handle; ``Box`` and ``Snapshot`` are the values it hands
out; ``VerifyReport`` / ``Problem`` and ``GcReport`` are what ``verify()`` and
``gc()`` return. ``DependencyGraph`` (``boxdisk.graph``) is re-exported here
because the store's removal guard stands on it.
"""

from boxdisk.graph import DependencyGraph, GraphNode

from ._boxes import BoxSpec
from ._store import BoxStore
from ._values import Box, GcReport, Problem, Snapshot, VerifyReport

__all__ = [
    "Box",
    "BoxSpec",
    "BoxStore",
    "DependencyGraph",
    "GcReport",
    "GraphNode",
    "Problem",
    "Snapshot",
    "VerifyReport",
]
