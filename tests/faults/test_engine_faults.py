"""A full disk or an I/O error in the middle of flatten, convert, commit and a safe rebase.

Each operation runs on copies of one QEMU-made chain and is made to fail at
many points: on a size-limited tmpfs filled by a ballast file so that it runs
out of space at different fill levels (found by bisecting the least free space
at which it succeeds), and in this process with the N-th ``pwrite``/``write``/
``fsync``/``ftruncate`` failing with EIO (once, or from then on) or writing
only half its bytes.

After every failure: the error is a ``BoxdiskError`` naming an image of the
operation; no file appeared (no temporary file, no half output); QEMU reads
through every image exactly what it read before (``qemu-img compare`` against
raw copies taken before) — except commit's base, which it writes in place and
where each sector must hold its old bytes or the top's; and ``qemu-img check``
finds no corruption (leaks only in an image written in place).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from boxdisk import BoxdiskError, ImageIOError, commit, convert, flatten, rebase

from ..engine.helpers import KIB, MIB, assert_clean, assert_not_corrupt, create
from ._faults import (
    Faults,
    clear,
    copy_tree,
    count_calls,
    first_success,
    free_bytes,
    is_enospc_or_eio,
    leave_free,
    points,
    tmpfs,
    tree_digest,
)

pytestmark = pytest.mark.qemu

SIZE = 6 * MIB
SECTOR = 512
#: Failure points tried per operation and fault kind in the default run.
POINTS = 14
#: Fill levels tried per operation.
LEVELS = 10


def _build(qemu: Any, d: Path) -> None:
    """base <- top (scattered data, partial clusters, a zero write); other: another base."""
    d.mkdir()
    create(qemu, d / "base.qcow2", SIZE)
    create(qemu, d / "other.qcow2", SIZE)
    create(qemu, d / "top.qcow2", SIZE, backing=d / "base.qcow2")
    base = [f"write -P {0x10 + i} {i * 192 * KIB} 64k" for i in range(30)]
    other = [f"write -P {0x50 + i} {i * 256 * KIB + 4 * KIB} 100k" for i in range(22)]
    top = [f"write -P {0x90 + i} {i * 320 * KIB + 32 * KIB} 72k" for i in range(18)]
    top += ["write -z 0 64k", "write -P 0xee 1m 4k"]
    qemu.write(d / "base.qcow2", base)
    qemu.write(d / "other.qcow2", other)
    qemu.write(d / "top.qcow2", top)


@attrs.define(frozen=True)
class Refs:
    """Raw exports (by QEMU) of what each image read before the operation."""

    top: bytes
    base: bytes
    other: bytes
    dir: Path


@pytest.fixture(scope="module")
def template(qemu: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Refs]:
    root = tmp_path_factory.mktemp("engine-faults")
    tpl = root / "chain"
    _build(qemu, tpl)
    refs = root / "refs"
    refs.mkdir()
    views = {}
    for name in ("top", "base", "other"):
        out = refs / f"{name}.raw"
        qemu.img("convert", "-O", "raw", tpl / f"{name}.qcow2", out)
        views[name] = out.read_bytes()
    return tpl, Refs(views["top"], views["base"], views["other"], refs)


def _same(qemu: Any, image: Path, ref: Path) -> None:
    proc = qemu.img("compare", "-U", "-f", "qcow2", "-F", "raw", image, ref, check=False)
    assert proc.returncode == 0, f"{image} no longer reads as before: {proc.stdout}{proc.stderr}"


def _sectors_old_or_new(qemu: Any, image: Path, old: bytes, new: bytes, tmp: Path) -> None:
    got = qemu.read_raw(image, tmp)
    assert len(got) == len(old) == len(new)
    for pos in range(0, len(got), SECTOR):
        sector = got[pos : pos + SECTOR]
        assert sector in (old[pos : pos + SECTOR], new[pos : pos + SECTOR]), (
            f"{image}: sector at {pos} holds neither its old bytes nor the top's")


# -- the operations, and what must hold after each ------------------------------------------


@attrs.define(frozen=True)
class Case:
    """An operation on the chain in a work directory, and the checks after it."""

    run: Callable[[Path], Any]
    #: Checks after a failure (work dir, refs, tmp) beyond the common ones.
    failed: Callable[[Any, Path, Refs, Path], None]
    #: Checks after success.
    done: Callable[[Any, Path, Refs, Path], None]
    #: Images the operation writes in place (leaks allowed after a failure).
    in_place: tuple[str, ...] = ()
    #: Files the operation may add on success.
    outputs: tuple[str, ...] = ()
    #: A file the operation replaces (overwrite): when only the last step (the directory
    #: fsync) failed, the complete new file is already in place.
    replaces: str | None = None


def _flatten_done(qemu: Any, d: Path, refs: Refs, tmp: Path) -> None:
    assert_clean(qemu, d / "out.qcow2")
    _same(qemu, d / "out.qcow2", refs.dir / "top.raw")


def _convert_done(qemu: Any, d: Path, refs: Refs, tmp: Path) -> None:
    assert (d / "out.raw").read_bytes() == refs.top


def _untouched(qemu: Any, d: Path, refs: Refs, tmp: Path) -> None:
    _same(qemu, d / "top.qcow2", refs.dir / "top.raw")


def _commit_failed(qemu: Any, d: Path, refs: Refs, tmp: Path) -> None:
    _same(qemu, d / "top.qcow2", refs.dir / "top.raw")
    _sectors_old_or_new(qemu, d / "base.qcow2", refs.base, refs.top, tmp)


def _commit_done(qemu: Any, d: Path, refs: Refs, tmp: Path) -> None:
    _same(qemu, d / "top.qcow2", refs.dir / "top.raw")
    _same(qemu, d / "base.qcow2", refs.dir / "top.raw")
    assert_clean(qemu, d / "top.qcow2")
    assert_clean(qemu, d / "base.qcow2")


def _rebase_done(qemu: Any, d: Path, refs: Refs, tmp: Path) -> None:
    _same(qemu, d / "top.qcow2", refs.dir / "top.raw")
    assert qemu.info(d / "top.qcow2")["backing-filename"] == "other.qcow2"
    assert_clean(qemu, d / "top.qcow2")


CASES = {
    "flatten": Case(lambda d: flatten(d / "top.qcow2", d / "out.qcow2"), _untouched,
                    _flatten_done, outputs=("out.qcow2",)),
    "flatten-overwrite": Case(
        lambda d: flatten(d / "top.qcow2", d / "other.qcow2", overwrite=True),
        _untouched, lambda q, d, r, t: _same(q, d / "other.qcow2", r.dir / "top.raw"),
        replaces="other.qcow2"),
    "convert-raw": Case(lambda d: convert(d / "top.qcow2", d / "out.raw", output_format="raw"),
                        _untouched, _convert_done, outputs=("out.raw",)),
    "commit": Case(lambda d: commit(d / "top.qcow2"), _commit_failed, _commit_done,
                   in_place=("top.qcow2", "base.qcow2")),
    "rebase-safe": Case(
        lambda d: rebase(d / "top.qcow2", d / "other.qcow2", backing_format="qcow2",
                         safe=True, relative=True),
        _untouched, _rebase_done, in_place=("top.qcow2",)),
}


def _after(qemu: Any, case: Case, d: Path, before: dict[str, str], refs: Refs, tmp: Path,
           exc: BaseException | None, *, short: bool = False, last: bool = False) -> None:
    """The checks common to every failure point (``exc`` None: the operation succeeded)."""
    after = tree_digest(d)
    if exc is None:
        assert set(after) == set(before) | set(case.outputs)
        case.done(qemu, d, refs, tmp)
        return
    assert isinstance(exc, BoxdiskError), f"{type(exc).__name__} escaped: {exc!r}"
    assert exc.path is not None and os.path.dirname(exc.path) == os.fspath(d), exc
    assert short or is_enospc_or_eio(exc), f"not the injected error: {exc!r}"
    assert set(after) == set(before), f"files appeared or went: {set(after) ^ set(before)}"
    replaced = (last and case.replaces is not None
                and after[case.replaces] != before[case.replaces])
    if replaced:
        case.done(qemu, d, refs, tmp)
        before = {**before, case.replaces: after[case.replaces]}
    for name, digest in before.items():
        if name not in case.in_place:
            # Only what the operation writes in place may change (overwrite keeps dst).
            assert after[name] == digest, f"{name} changed"
    for name in ("top.qcow2", "base.qcow2", "other.qcow2"):
        if name in case.in_place:
            assert_not_corrupt(qemu, d / name)
    if "base.qcow2" not in case.in_place:
        _same(qemu, d / "base.qcow2", refs.dir / "base.raw")
    if not replaced:
        _same(qemu, d / "other.qcow2", refs.dir / "other.raw")
    case.failed(qemu, d, refs, tmp)


def _attempt(case: Case, d: Path, faults: Faults | None = None) -> BaseException | None:
    try:
        if faults is None:
            case.run(d)
        else:
            with faults:
                case.run(d)
    except Exception as exc:  # judged by _after
        return exc
    return None


@pytest.fixture
def work(tmp_path: Path, template: tuple[Path, Refs]) -> Iterator[Callable[[Path], Path]]:
    """A function that makes a fresh copy of the chain in a given (empty) directory."""
    tpl, _refs = template

    def fresh(parent: Path) -> Path:
        d = parent / "chain"
        if d.exists():
            clear(d)
            d.rmdir()
        copy_tree(tpl, d)
        return d

    yield fresh


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("mode", ["eio", "eio-persistent", "short"])
def test_injected_error(qemu: Any, tmp_path: Path, template: tuple[Path, Refs],
                        work: Callable[[Path], Path], name: str, mode: str) -> None:
    _injected(qemu, tmp_path, template, work, name, mode, POINTS)


def _injected(qemu: Any, tmp_path: Path, template: tuple[Path, Refs],
              work: Callable[[Path], Path], name: str, mode: str, want: int | None) -> None:
    case = CASES[name]
    _tpl, refs = template
    total = count_calls(lambda: case.run(work(tmp_path)))
    assert total > 5
    failures = 0
    for n in points(total, want or total):
        d = work(tmp_path)
        before = tree_digest(d)
        faults = Faults(n, persistent=mode == "eio-persistent", short=mode == "short")
        exc = _attempt(case, d, faults)
        if mode == "short" and exc is None:
            # A short write the code completed by writing the rest: a success.
            pass
        elif exc is None:
            pytest.fail(f"call {n} of {total} failed with EIO and {name} still succeeded")
        _after(qemu, case, d, before, refs, tmp_path, exc, short=mode == "short",
               last=n == total)
        failures += exc is not None
    assert failures


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("mode", ["eio", "eio-persistent", "short"])
def test_injected_error_at_every_call(qemu: Any, tmp_path: Path, template: tuple[Path, Refs],
                                      work: Callable[[Path], Path], name: str,
                                      mode: str) -> None:
    _injected(qemu, tmp_path, template, work, name, mode, None)


@pytest.mark.parametrize("name", list(CASES))
def test_disk_full(qemu: Any, tmp_path: Path, template: tuple[Path, Refs],
                   work: Callable[[Path], Path], name: str) -> None:
    case = CASES[name]
    _tpl, refs = template
    with tmpfs(tmp_path / "fs", 24 * MIB) as fs:
        ballast = fs / "ballast"

        def run(free: int) -> bool:
            d = work(fs)
            leave_free(ballast, free)
            return _attempt(case, d) is None

        hi = free_bytes(fs) - 64 * KIB
        least = first_success(run, hi)
        assert 0 < least < hi
        seen: set[str] = set()
        for k in range(LEVELS):
            free = least * k // LEVELS
            d = work(fs)
            before = tree_digest(d)
            leave_free(ballast, free)
            exc = _attempt(case, d)
            assert exc is not None, f"{name} succeeded with {free} of {least} bytes free"
            assert isinstance(exc, OSError) and is_enospc_or_eio(exc), repr(exc)
            leave_free(ballast, hi)  # room again for QEMU's checks
            _after(qemu, case, d, before, refs, tmp_path, exc)
            seen.add(str(exc))
        # The operation ran out at different points, not always at its first write.
        assert len(seen) > 1, seen


def test_enospc_is_reported_as_such(tmp_path: Path, template: tuple[Path, Refs],
                                    work: Callable[[Path], Path]) -> None:
    d = work(tmp_path)
    with Faults(1, err=errno.ENOSPC, persistent=True), pytest.raises(ImageIOError) as info:
        flatten(d / "top.qcow2", d / "out.qcow2")
    assert info.value.path == os.fspath(d / "out.qcow2")
    assert "No space left on device" in str(info.value)
