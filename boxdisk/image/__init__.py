"""The image layer: one file (qcow2 or raw) opened read-only, read at virtual offsets.

An image says where each guest byte lives (:meth:`Image.runs`) and reads it;
it never follows a backing file (that is :mod:`boxdisk.chain`'s job).
"""

from ._base import Image
from ._qcow2 import Qcow2Image
from ._raw import RawImage
from ._runs import Run, RunKind

__all__ = ["Image", "Qcow2Image", "RawImage", "Run", "RunKind"]
