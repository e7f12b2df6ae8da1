"""Bounded memory and time on every hostile image, measured in the fuzz worker.

Each corpus image goes through every operation (open, map, read of every
extent, check, repair of a copy, flatten, the header readers) in the fuzz
worker, which measures each call's CPU time and peak RSS (tests/fuzz/harness.py).
Every call must return or raise a BoxdiskError within 2 s of CPU and 256 MiB.

Images too large to commit are built here: a disk of QEMU's largest L1 table
(32 MiB, all but one entry empty, a sparse file), and an image with many
internal snapshots whose L1 tables are QEMU's largest too.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.data.make_hostile import build
from tests.fuzz.harness import Worker, problems

CORPUS = Path(__file__).resolve().parents[2] / "tests" / "data" / "hostile"
OPS = ("header", "open", "map", "read", "check", "repair", "flatten")


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    with Worker() as w:
        yield w


@pytest.mark.parametrize("name", sorted(p.name for p in CORPUS.iterdir()
                                        if not p.name.startswith("chain-")))
def test_corpus_image_stays_within_bounds(name: str, worker: Worker) -> None:
    results = worker.run(CORPUS / name, OPS, (CORPUS,))
    found = problems(results)
    assert not found, "\n".join(found)


def _largest_l1(path: Path) -> None:
    """A 64 KiB-cluster image whose L1 table has QEMU's maximum of 4 Mi entries (2 PiB)."""
    b = build(cluster_bits=16, size=1 << 30)
    entries = 32 * 1024 * 1024 // 8
    end = len(b.buf)
    b.set_field("size", entries * 8192 * 65536)
    b.set_field("l1_size", entries)
    b.set_field("l1_table_offset", end)
    with path.open("wb") as f:
        f.write(b.buf)
        f.write(struct.pack(">Q", b.l2_offsets[0] | 1 << 63))
        f.truncate(end + entries * 8)  # the rest of the L1 table is a hole: zeros


def _many_snapshots(path: Path, count: int) -> None:
    """``count`` internal snapshots, each with its own 4 Mi-entry L1 table past the end."""
    b = build(cluster_bits=16, size=1 << 30)
    end = len(b.buf)
    entries = 32 * 1024 * 1024 // 8
    table = bytearray()
    for i in range(count):
        sid = str(i).encode()
        l1 = (1 << 40) + i * (1 << 26)
        table += struct.pack(">QIHHIIQII", l1, entries, len(sid), 0, 0, 0, 0, 0, 16)
        table += struct.pack(">QQ", 0, 1 << 30) + sid
        table += bytes(-len(table) % 8)
    b.set_field("nb_snapshots", count)
    b.set_field("snapshots_offset", end)
    path.write_bytes(bytes(b.buf) + bytes(table) + bytes(-len(table) % 65536))


def test_largest_l1_table_is_walked_in_bounded_time(tmp_path: Path, worker: Worker) -> None:
    path = tmp_path / "largest-l1.qcow2"
    _largest_l1(path)
    results = worker.run(path, OPS, (tmp_path,))
    found = problems(results)
    assert not found, "\n".join(found)
    assert {r["op"]: r["outcome"] for r in results}["read"] == "ok"


def test_many_snapshots_with_huge_l1_tables_are_bounded(tmp_path: Path, worker: Worker) -> None:
    path = tmp_path / "snapshots.qcow2"
    _many_snapshots(path, 64)
    results = worker.run(path, OPS, (tmp_path,))
    found = problems(results)
    assert not found, "\n".join(found)


def _chain_of_largest_l1(d: Path, depth: int) -> Path:
    for i in range(depth):
        link = d / f"link-{i}.qcow2"
        _largest_l1(link)
        if i + 1 < depth:
            # Same name length: "link-N.qcow2" names the next image, format qcow2.
            b = build(cluster_bits=16, size=1 << 30, backing=f"link-{i + 1}.qcow2",
                      backing_fmt="qcow2")
            with link.open("r+b") as f:
                f.write(b.buf[: b.header_end])
                f.seek(24)
                f.write(struct.pack(">Q", 4 * 1024 * 1024 * 8192 * 65536))
                f.seek(36)
                f.write(struct.pack(">IQ", 4 * 1024 * 1024, len(b.buf)))
    return d / "link-0.qcow2"


@pytest.mark.parametrize("depth", [2, 4])
def test_chain_of_largest_l1_tables_is_bounded(tmp_path: Path, worker: Worker,
                                               depth: int) -> None:
    """Two images of QEMU's largest L1 (4 Mi entries each) fit the chain's L1 bound and
    are walked within the limits; four are refused, typed, before their memory is taken.

    Regression: each image kept its L1 table twice (bytes and array), so four such
    images took 287 MiB; now a chain holds at most 8 Mi L1 entries (64 MiB).
    """
    top = _chain_of_largest_l1(tmp_path, depth)
    results = worker.run(top, ("open", "map", "read", "check", "flatten"), (tmp_path,))
    found = problems(results)
    assert not found, "\n".join(found)
    outcome = {r["op"]: r for r in results}["map"]
    if depth == 2:
        assert outcome["outcome"] == "ok", results
    else:
        assert outcome["outcome"] != "ok" and "l1_size" in str(outcome), results
