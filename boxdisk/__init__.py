"""boxdisk: QEMU-exact qcow2 disks, backing chains and box stores for micro-VMs.

Everything public is importable from here; submodules are where things live,
not where callers must reach.
"""

from ._disk import Disk, DiskFormat
from ._errors import (
    BackingChainError,
    BoxdiskError,
    CorruptImageError,
    DiskExistsError,
    DiskInUseError,
    ImageError,
    ImageIOError,
    InvalidArgumentError,
    NotQcow2Error,
    UnsupportedFeatureError,
)
from ._locks import image_in_use
from .chain import BackingChain, Extent, open_chain
from .image import Qcow2Image, RawImage
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
    BackingFormat,
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

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_CLUSTER_SIZE",
    "DEFAULT_DISK_SIZE",
    "GUEST_ROOTFS_DISK",
    "BackingChain",
    "BackingChainError",
    "BackingFormat",
    "BoxdiskError",
    "CheckReport",
    "CompareResult",
    "CorruptImageError",
    "Disk",
    "DiskExistsError",
    "DiskFormat",
    "DiskInUseError",
    "Extent",
    "Finding",
    "FindingKind",
    "ImageError",
    "ImageIOError",
    "InvalidArgumentError",
    "NotQcow2Error",
    "Qcow2Image",
    "RawImage",
    "UnsupportedFeatureError",
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
