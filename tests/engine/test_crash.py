"""Crash safety: a writer cut off at any point leaves at most leaked clusters.

Two kinds of crash. A power loss, simulated: every write, truncate and fsync
the writer makes is journaled, and crash images are rebuilt from everything up
to the last fsync plus part of what came after it, in two ways. Physically:
each 512-byte sector keeps the content it had at some moment after the last
fsync (a disk persists sectors in any order, a page cache writes back pages
whenever it likes). And, stronger than any disk: an arbitrary subset of the
later writes lands, even a later write to a sector without an earlier one.
Then real process death: a writer process that ``os._exit``s just before its
N-th I/O step, and one killed with SIGKILL at a random moment.

After every crash ``qemu-img check`` must find no corruption (leaks are
allowed). Except under the arbitrary-subset model (which can tear a sector's
history apart, so only the metadata is judged), each 512-byte sector of the
guest's view, read by QEMU, must also hold one of the values it had between
the last completed flush and the operation in flight: nothing flushed is
lost, nothing unwritten shows.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from boxdisk.chain import open_chain
from boxdisk.format import parse_header
from boxdisk.image._qcow2_write import Qcow2Writer
from boxdisk.ops import check

from .crash_worker import apply, operations, run
from .helpers import KIB, MIB, assert_clean, assert_not_corrupt, create

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parents[2]


class _Journaled(Qcow2Writer):
    """A writer that journals each change it makes to its file, in order."""

    def __init__(self, path: Path, journal: list[tuple[Any, ...]]) -> None:
        self.journal = journal
        super().__init__(path)

    def _pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        self.journal.append(("w", offset, bytes(data)))
        super()._pwrite(data, offset)

    def _fsync(self) -> None:
        self.journal.append(("s",))
        super()._fsync()

    def _truncate(self, length: int) -> None:
        self.journal.append(("t", length))
        super()._truncate(length)


class _Guest:
    """Forwards guest operations to a writer, marking them in the journal."""

    def __init__(self, writer: _Journaled) -> None:
        self.writer = writer

    def write(self, offset: int, data: bytes) -> None:
        self.writer.write(offset, data)

    def write_zeroes(self, offset: int, length: int) -> None:
        self.writer.write_zeroes(offset, length)

    def discard(self, offset: int, length: int) -> None:
        self.writer.discard(offset, length)

    def flush(self) -> None:
        self.writer.flush()


class _Marks:
    """A text sink for :func:`run` that puts its progress lines into the journal."""

    def __init__(self, journal: list[tuple[Any, ...]]) -> None:
        self.journal = journal

    def write(self, text: str) -> None:
        for line in text.split("\n"):
            if line:
                word, n = line.split()
                self.journal.append((word, int(n)))

    def flush(self) -> None:
        pass


def _chain_dir(qemu: Any, tmp: Path, cluster: int, compat: str, size: int,
               options: tuple[str, ...] = ()) -> tuple[Path, bytes]:
    """A qcow2 base with data under an empty top; returns (top, what the base shows)."""
    base = create(qemu, tmp / "base.qcow2", size, cluster=cluster)
    qemu.write(base, [f"write -P 0x3c 0 {size // 2}"])
    top = create(qemu, tmp / "top.qcow2", size, cluster=cluster, backing=base, compat=compat,
                 options=options)
    return top, b"\x3c" * (size // 2) + bytes(size - size // 2)


def _states(seed: int, size: int, cluster: int, count: int, below: bytes,
            v3: bool, span: int = 3) -> list[bytes]:
    """The guest view before any operation, then after each one."""
    model = bytearray(below)
    states = [bytes(model)]
    for op in operations(seed, size, cluster, count, span=span):
        apply(op, model, below, cluster, v3)
        states.append(bytes(model))
    return states


def _assert_sectors_from(got: bytes, versions: list[bytes], where: str) -> None:
    assert all(len(v) == len(got) for v in versions)
    for s in range(0, len(got), 512):
        sector = got[s : s + 512]
        if sector == versions[0][s : s + 512] or sector == versions[-1][s : s + 512]:
            continue
        if any(v[s : s + 512] == sector for v in versions[1:-1]):
            continue
        msg = (f"{where}: sector {s // 512} (offset {s}) holds bytes it never held between "
               f"the last flush and the crash ({len(versions)} versions)")
        raise AssertionError(msg)


def _judge(qemu: Any, image: Path, tmp: Path, states: list[bytes] | None, flushed: int,
           started: int, where: str) -> None:
    """No corruption; every sector from the states after op ``flushed`` to op ``started``."""
    leaks = assert_not_corrupt(qemu, image).get("leaks", 0)
    if states is not None:
        got = qemu.read_raw(image, tmp)
        _assert_sectors_from(got, states[flushed + 1 : started + 2], where)
    # boxdisk's own check agrees, and its leak repair makes the image clean.
    report = check(image, repair="leaks")
    assert report.corruptions == 0 and report.leaks_fixed == leaks, (where, report)
    assert_clean(qemu, image)
    # boxdisk goes on writing to the repaired image, and it stays clean.
    with open_chain(image, writable=True) as chain:
        chain.write(0, b"after the crash")
        chain.discard(0, chain.size)
        chain.write_zeroes(chain.size // 3, chain.top.cluster_size)
    assert_clean(qemu, image)


def _apply_io(image: bytearray, entry: tuple[Any, ...], keep: Any = None) -> None:
    """Apply one journaled change; ``keep(sector)`` says which sectors a write reaches."""
    if entry[0] == "w":
        _, offset, data = entry
        if len(image) < offset:
            image.extend(bytes(offset - len(image)))
        if keep is None:
            image[offset : offset + len(data)] = data
            return
        end = offset + len(data)
        if len(image) < end:
            image.extend(bytes(end - len(image)))
        for sector in range(offset // 512, -(-end // 512)):
            if keep(sector):
                lo, hi = max(offset, sector * 512), min(end, sector * 512 + 512)
                image[lo:hi] = data[lo - offset : hi - offset]
    elif entry[0] == "t":
        length = entry[1]
        if length < len(image):
            del image[length:]
        else:
            image.extend(bytes(length - len(image)))


def _sector_moments(durable: bytearray, later: list[tuple[int, tuple[Any, ...]]],
                    rng: random.Random, low: int, high: int) -> bytearray:
    """The file if each sector kept what it held just before a random journal position."""
    cut: dict[int, int] = {}
    image = bytearray(durable)
    for j, entry in later:
        def keep(sector: int, j: int = j) -> bool:
            return cut.setdefault(sector, rng.randint(low, high)) > j
        _apply_io(image, entry, keep)
    return image


def _power_loss(qemu: Any, tmp: Path, *, cluster: int, compat: str, size: int, seed: int,
                count: int, crashes: int, options: tuple[str, ...] = (),
                span: int = 3) -> bytes:
    """Run, then judge ``crashes`` crash images; returns the image's bytes before the run."""
    top, below = _chain_dir(qemu, tmp, cluster, compat, size, options)
    initial = top.read_bytes()
    journal: list[tuple[Any, ...]] = []
    writer = _Journaled(top, journal)
    below_chain = open_chain(tmp / "base.qcow2")
    try:
        writer.attach_below(below_chain.read, below_chain.size)
        run(_Guest(writer), operations(seed, size, cluster, count, span=span),
            _Marks(journal))
        writer.close()
    finally:
        writer.close()
        below_chain.close()
    states = _states(seed, size, cluster, count, below, compat == "1.1", span)
    rng = random.Random(seed)
    io_points = [i for i, e in enumerate(journal) if e[0] in ("w", "t", "s")]
    points = set(rng.sample(io_points, min(crashes, len(io_points))))
    # Always crash right before and right after each header update (a moved table).
    for i, e in enumerate(journal):
        if e[0] == "w" and e[1] < cluster:
            points.update((i, i + 1))
    crash = tmp / "crash.qcow2"
    for k in sorted(points):
        last_sync = max((i for i in range(k) if journal[i][0] == "s"), default=-1)
        flushed = max((e[1] for e in journal[:k] if e[0] == "flushed"), default=-1)
        started = max((e[1] for e in journal[:k] if e[0] == "op"), default=-1)
        durable = bytearray(initial)
        for entry in journal[: last_sync + 1]:
            _apply_io(durable, entry)
        later = list(enumerate(journal[last_sync + 1 : k], start=last_sync + 1))
        crash.write_bytes(_sector_moments(durable, later, rng, last_sync, k))
        _judge(qemu, crash, tmp, states, flushed, started, f"power loss at I/O {k}")
        # Stronger than any disk: any subset of the later writes (metadata judged only).
        subset = bytearray(durable)
        for _, entry in later:
            if rng.random() < 0.5:
                _apply_io(subset, entry)
        crash.write_bytes(subset)
        _judge(qemu, crash, tmp, None, flushed, started, f"write subset at I/O {k}")
    return initial


@pytest.mark.parametrize(("cluster", "compat", "options"), [
    (512, "1.1", ()),
    (64 * KIB, "0.10", ()),
    (4 * KIB, "1.1", ("refcount_bits=1",)),
])
def test_power_loss_leaves_at_most_leaks(qemu: Any, tmp_path: Path, cluster: int, compat: str,
                                         options: tuple[str, ...]) -> None:
    _power_loss(qemu, tmp_path, cluster=cluster, compat=compat, size=48 * cluster + 1024,
                seed=cluster, count=40, crashes=25, options=options)


def test_power_loss_while_the_refcount_table_moves(qemu: Any, tmp_path: Path) -> None:
    # 64-bit refcounts on 512-byte clusters: a table cluster covers 2 MiB of file, so
    # these writes (up to 1 MiB each) move the refcount table mid-run.
    initial = _power_loss(qemu, tmp_path, cluster=512, compat="1.1", size=4 * MIB, seed=5,
                          count=24, crashes=30, options=("refcount_bits=64",), span=2048)
    moved = parse_header((tmp_path / "top.qcow2").read_bytes()[:512], source="top")
    assert moved.refcount_table_offset != parse_header(initial[:512]).refcount_table_offset


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6))
def test_power_loss_leaves_at_most_leaks_long(qemu: Any, tmp_path: Path, seed: int) -> None:
    cluster = (512, 4 * KIB, 64 * KIB)[seed % 3]
    _power_loss(qemu, tmp_path, cluster=cluster, compat=("0.10", "1.1")[seed % 2],
                size=40 * cluster + 512 if cluster > 512 else 3 * MIB, seed=100 + seed,
                count=120, crashes=120)


def _worker(top: Path, seed: int, count: int, cluster: int,
            exit_at: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.engine.crash_worker", str(top), str(seed), str(count),
         str(cluster), str(exit_at)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONWARNINGS": "error::ResourceWarning"},
    )


def _progress(stdout: str) -> tuple[int, int]:
    flushed = started = -1
    for line in stdout.splitlines():
        word, _, n = line.partition(" ")
        if word == "op":
            started = int(n)
        elif word == "flushed":
            flushed = int(n)
    return flushed, started


def test_process_exit_at_random_io_steps(qemu: Any, tmp_path: Path) -> None:
    cluster, size, count, seed = 4 * KIB, 48 * 4 * KIB + 512, 40, 3
    top, below = _chain_dir(qemu, tmp_path, cluster, "1.1", size)
    pristine = tmp_path / "pristine.qcow2"
    shutil.copyfile(top, pristine)
    proc = _worker(top, seed, count, cluster, -1)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    total = int(out.strip().splitlines()[-1].split()[1])
    states = _states(seed, size, cluster, count, below, True)
    for exit_at in sorted(random.Random(seed).sample(range(total), 8)):
        shutil.copyfile(pristine, top)
        proc = _worker(top, seed, count, cluster, exit_at)
        out, err = proc.communicate()
        assert proc.returncode == 77, err
        flushed, started = _progress(out)
        _judge(qemu, top, tmp_path, states, flushed, started, f"exit before I/O {exit_at}")


def test_sigkill_at_random_moments(qemu: Any, tmp_path: Path) -> None:
    cluster, size, count, seed = 64 * KIB, 32 * 64 * KIB + 512, 3000, 9
    top, below = _chain_dir(qemu, tmp_path, cluster, "1.1", size)
    pristine = tmp_path / "pristine.qcow2"
    shutil.copyfile(top, pristine)
    rng = random.Random(seed)
    for _ in range(3):
        shutil.copyfile(pristine, top)
        proc = _worker(top, seed, count, cluster, -1)
        assert proc.stdout is not None
        target = rng.randrange(20, 400)
        seen = []
        for line in proc.stdout:  # kill once the writer reaches a random operation
            seen.append(line)
            if line.startswith("op ") and int(line.split()[1]) >= target:
                proc.send_signal(signal.SIGKILL)
                break
        # Drain the same text stream: lines it buffered already must not be lost.
        rest = proc.stdout.read()
        proc.stdout.close()
        assert proc.stderr is not None
        proc.stderr.close()
        assert proc.wait() == -signal.SIGKILL
        flushed, started = _progress("".join(seen) + rest)
        states = _states(seed, size, cluster, started + 1, below, True)
        _judge(qemu, top, tmp_path, states, flushed, started, f"SIGKILL near op {target}")
