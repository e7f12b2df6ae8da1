"""Runs: where a stretch of guest bytes lives in one image ("where", never "read")."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator

import attrs

__all__ = ["Run", "RunKind", "coalesce"]


class RunKind(enum.IntEnum):
    """What one image says about a stretch of its guest bytes."""

    UNALLOCATED = 0  # not in this file: read from the backing file (or zeros)
    ZERO = 1  # reads as zeros (qcow2 zero flag, or a hole in a raw file)
    DATA = 2  # plain bytes at ``host_offset``
    COMPRESSED = 3  # one compressed cluster at ``host_offset`` (``compressed_size`` bytes)


@attrs.define(frozen=True, slots=True)
class Run:
    """A stretch ``[start, start + length)`` of guest bytes and where it lives in the file.

    ``host_offset`` is the file offset of ``start`` for DATA (and for ZERO
    stretches backed by a host cluster or a raw hole), the offset of the
    compressed data for COMPRESSED (whose guest cluster starts at ``start``
    rounded down to the cluster size), and None where no host bytes exist.
    """

    kind: RunKind
    start: int
    length: int
    host_offset: int | None = None
    compressed_size: int = 0

    @property
    def end(self) -> int:
        """One past the last guest byte."""
        return self.start + self.length


RawRun = tuple[RunKind, int, int, "int | None", int]


def coalesce(raw: Iterable[RawRun]) -> Iterator[Run]:
    """Merge adjacent raw runs of the same kind (and contiguous host bytes) into Runs."""
    kind: RunKind | None = None
    start = length = csize = 0
    host: int | None = None
    for k, s, n, h, c in raw:
        if (
            kind is k
            and k is not RunKind.COMPRESSED
            and start + length == s
            and (h is None if host is None else h == host + length)
        ):
            length += n
            continue
        if kind is not None:
            yield Run(kind, start, length, host, csize)
        kind, start, length, host, csize = k, s, n, h, c
    if kind is not None:
        yield Run(kind, start, length, host, csize)
