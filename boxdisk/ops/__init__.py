"""Operations over whole chains: flatten (to one standalone qcow2) and convert."""

from ._flatten import Progress, convert, flatten

__all__ = ["Progress", "convert", "flatten"]
