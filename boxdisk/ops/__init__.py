"""Operations over whole chains: flatten, convert, commit, rebase, compare and resize."""

from boxdisk._locks import image_in_use

from ._compare import CompareResult, compare
from ._edit import commit, rebase, resize
from ._flatten import Progress, convert, flatten

__all__ = [
    "CompareResult",
    "Progress",
    "commit",
    "compare",
    "convert",
    "flatten",
    "image_in_use",
    "rebase",
    "resize",
]
