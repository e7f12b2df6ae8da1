"""boxdisk: QEMU-exact qcow2 disks, backing chains and box stores for micro-VMs.

Everything public is importable from here; submodules are where things live,
not where callers must reach. Names are imported on first use (PEP 562), so
``import boxdisk`` and the ``boxdisk`` command start fast and pull in only the
layers a caller touches.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module (relative to this package) that defines it.
_EXPORTS: dict[str, str] = {
    "Disk": "._disk",
    "DiskFormat": "._formats",
    "AlreadyExistsError": "._errors",
    "BackingChainError": "._errors",
    "BlockJobError": "._errors",
    "BoxdiskError": "._errors",
    "CorruptImageError": "._errors",
    "DependentsExistError": "._errors",
    "DiskExistsError": "._errors",
    "DiskInUseError": "._errors",
    "ImageError": "._errors",
    "ImageIOError": "._errors",
    "InvalidArgumentError": "._errors",
    "InvalidNameError": "._errors",
    "LiveError": "._errors",
    "LockTimeoutError": "._errors",
    "NotFoundError": "._errors",
    "NotQcow2Error": "._errors",
    "QmpCommandError": "._errors",
    "QmpConnectError": "._errors",
    "QmpProtocolError": "._errors",
    "SnapshotInUseError": "._errors",
    "StoreError": "._errors",
    "StoreFormatError": "._errors",
    "UnsupportedFeatureError": "._errors",
    "image_in_use": "._locks",
    "BackingChain": ".chain",
    "Extent": ".chain",
    "open_chain": ".chain",
    "DependencyGraph": ".graph",
    "GraphNode": ".graph",
    "Qcow2Image": ".image",
    "RawImage": ".image",
    "CheckReport": ".ops",
    "CompareResult": ".ops",
    "Finding": ".ops",
    "FindingKind": ".ops",
    "check": ".ops",
    "commit": ".ops",
    "compare": ".ops",
    "convert": ".ops",
    "flatten": ".ops",
    "rebase": ".ops",
    "resize": ".ops",
    "BackingFormat": "._formats",
    "DEFAULT_CLUSTER_SIZE": ".qcow2",
    "DEFAULT_DISK_SIZE": ".qcow2",
    "GUEST_ROOTFS_DISK": ".qcow2",
    "clone_disk_pair": ".qcow2",
    "create_cow_child_disk": ".qcow2",
    "create_disk": ".qcow2",
    "is_backing_dependency": ".qcow2",
    "qcow2_virtual_size": ".qcow2",
    "read_backing_chain": ".qcow2",
    "read_backing_file_path": ".qcow2",
    "read_header": ".qcow2",
    "set_backing_file_path": ".qcow2",
    "Box": ".store",
    "BoxSpec": ".store",
    "BoxStore": ".store",
    "GcReport": ".store",
    "Problem": ".store",
    "Snapshot": ".store",
    "VerifyReport": ".store",
}

__all__ = [
    "DEFAULT_CLUSTER_SIZE",
    "DEFAULT_DISK_SIZE",
    "GUEST_ROOTFS_DISK",
    "AlreadyExistsError",
    "BackingChain",
    "BackingChainError",
    "BackingFormat",
    "BlockJobError",
    "Box",
    "BoxSpec",
    "BoxStore",
    "BoxdiskError",
    "CheckReport",
    "CompareResult",
    "CorruptImageError",
    "DependencyGraph",
    "DependentsExistError",
    "Disk",
    "DiskExistsError",
    "DiskFormat",
    "DiskInUseError",
    "Extent",
    "Finding",
    "FindingKind",
    "GcReport",
    "GraphNode",
    "ImageError",
    "ImageIOError",
    "InvalidArgumentError",
    "InvalidNameError",
    "LiveError",
    "LockTimeoutError",
    "NotFoundError",
    "NotQcow2Error",
    "Problem",
    "Qcow2Image",
    "QmpCommandError",
    "QmpConnectError",
    "QmpProtocolError",
    "RawImage",
    "Snapshot",
    "SnapshotInUseError",
    "StoreError",
    "StoreFormatError",
    "UnsupportedFeatureError",
    "VerifyReport",
    "__version__",
    "check",
    "clone_disk_pair",
    "commit",
    "compare",
    "convert",
    "create_cow_child_disk",
    "create_disk",
    "flatten",
    "image_in_use",
    "is_backing_dependency",
    "open_chain",
    "qcow2_virtual_size",
    "read_backing_chain",
    "read_backing_file_path",
    "read_header",
    "rebase",
    "resize",
    "set_backing_file_path",
]


if not TYPE_CHECKING:
    # Hidden from type checkers, so ``boxdisk.BoxStor`` is a mypy error: they see
    # the eager imports below instead.

    def __getattr__(name: str) -> Any:
        module = _EXPORTS.get(name)
        if module is None:
            msg = f"module 'boxdisk' has no attribute {name!r}"
            raise AttributeError(msg)
        value = getattr(importlib.import_module(module, __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers and IDEs see: the same names, eagerly
    from ._disk import (
        Disk,
    )
    from ._errors import (
        AlreadyExistsError,
        BackingChainError,
        BlockJobError,
        BoxdiskError,
        CorruptImageError,
        DependentsExistError,
        DiskExistsError,
        DiskInUseError,
        ImageError,
        ImageIOError,
        InvalidArgumentError,
        InvalidNameError,
        LiveError,
        LockTimeoutError,
        NotFoundError,
        NotQcow2Error,
        QmpCommandError,
        QmpConnectError,
        QmpProtocolError,
        SnapshotInUseError,
        StoreError,
        StoreFormatError,
        UnsupportedFeatureError,
    )
    from ._formats import (
        BackingFormat,
        DiskFormat,
    )
    from ._locks import (
        image_in_use,
    )
    from .chain import (
        BackingChain,
        Extent,
        open_chain,
    )
    from .graph import (
        DependencyGraph,
        GraphNode,
    )
    from .image import (
        Qcow2Image,
        RawImage,
    )
    from .ops import (
        CheckReport,
        CompareResult,
        Finding,
        FindingKind,
        check,
        commit,
        compare,
        convert,
        flatten,
        rebase,
        resize,
    )
    from .qcow2 import (
        DEFAULT_CLUSTER_SIZE,
        DEFAULT_DISK_SIZE,
        GUEST_ROOTFS_DISK,
        clone_disk_pair,
        create_cow_child_disk,
        create_disk,
        is_backing_dependency,
        qcow2_virtual_size,
        read_backing_chain,
        read_backing_file_path,
        read_header,
        set_backing_file_path,
    )
    from .store import (
        Box,
        BoxStore,
        GcReport,
        Problem,
        Snapshot,
        VerifyReport,
    )
