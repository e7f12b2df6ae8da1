"""RawImage: the file's size is the disk's, holes are found with SEEK_DATA/SEEK_HOLE."""

from __future__ import annotations

import os
from pathlib import Path

from boxdisk.image import RawImage, RunKind


def test_holes_and_data(tmp_path: Path) -> None:
    p = tmp_path / "disk.raw"
    with open(p, "wb") as f:
        f.truncate(8 << 20)
        f.seek(1 << 20)
        f.write(b"a" * 65536)
        f.seek(6 << 20)
        f.write(b"b" * 100)
    with RawImage.open(p) as img:
        assert img.size == 8 << 20
        runs = list(img.runs())
        data = [(r.start, r.length) for r in runs if r.kind is RunKind.DATA]
        assert sum(r.length for r in runs) == img.size
        # the file system may round data up to its block size
        assert data[0][0] <= 1 << 20 < (1 << 20) + 65536 <= data[0][0] + data[0][1]
        assert any(s <= 6 << 20 < s + n for s, n in data)
        assert all(r.host_offset == r.start for r in runs)
        assert img.read((1 << 20) - 2, 4) == b"\0\0aa"
        assert img.read(6 << 20, 101) == b"b" * 100 + b"\0"
        assert [r.kind for r in img.runs(0, 4096, precise=False)] == [RunKind.DATA]
    assert img.closed


def test_empty_raw(tmp_path: Path) -> None:
    p = tmp_path / "empty.raw"
    p.write_bytes(b"")
    with RawImage.open(p) as img:
        assert img.size == 0
        assert list(img.runs()) == []
        assert img.read(0, 0) == b""
    assert not os.path.exists(tmp_path / "x")
