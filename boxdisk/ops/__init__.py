"""Operations over whole chains: flatten, convert, commit, rebase, compare, resize, check."""

from boxdisk._locks import image_in_use

from ._check import CheckReport, Finding, FindingKind, check
from ._compare import CompareResult, compare
from ._edit import commit, rebase, resize
from ._flatten import Progress, convert, flatten

__all__ = [
    "CheckReport",
    "CompareResult",
    "Finding",
    "FindingKind",
    "Progress",
    "check",
    "commit",
    "compare",
    "convert",
    "flatten",
    "image_in_use",
    "rebase",
    "resize",
]
