"""A full disk or an I/O error in the middle of every store operation that writes.

One QEMU-made store (boxes over a qcow2 and a raw base, snapshots, a clone,
guest data everywhere) is copied for every failure point. Each operation is
then made to fail: on a size-limited tmpfs with a ballast file leaving less
free space than it needs (at many fill levels below the least it succeeds
with), and in this process by failing the N-th ``pwrite``/``write``/``fsync``/
``ftruncate`` with EIO (once, or from then on) or writing only half of it.

After every failure:

* the error is a ``BoxdiskError`` that names a file;
* nothing is left over at once (journal, trash, staging and temporary
  files), unless the disk stayed broken (then the next open cleans up);
* reopening the store leaves ``verify()`` clean (leaks allowed only in the
  images a merge writes in place) and ``qemu-img check`` clean on every image
  that changed or appeared;
* QEMU reads through every disk of every box and snapshot exactly what it read
  before (``qemu-img compare`` against raw copies taken before), and the
  operation happened entirely or not at all.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
import pytest

from boxdisk import BoxdiskError
from boxdisk.store import BoxStore

from ..store.helpers import KIB, MIB, SIZE, make_bases, write
from ._faults import (
    Faults,
    clear,
    copy_tree,
    file_digest,
    first_success,
    free_bytes,
    is_enospc_or_eio,
    leave_free,
    points,
    tmpfs,
    tree_digest,
)

pytestmark = pytest.mark.qemu

#: Failure points per operation in the default run (EIO once, EIO from then on, short).
POINTS = {"eio": 10, "eio-persistent": 4, "short": 4}
LEVELS = 6


def _setup(qemu: Any, root: Path, src: Path) -> None:
    """vm (two disks over the bases, snapshot s1), solo, aux (t1, t2, live over t1), twin."""
    with BoxStore(root) as store:
        make_bases(qemu, store, src)
        vm = store.create_box("vm", base="os", guest_base="rootfs")
        assert vm.guest_disk is not None
        for i in range(6):
            write(qemu, vm.disk, 0xA0 + i, i * 1536 * KIB, 96 * KIB)
            write(qemu, vm.guest_disk, 0xB0 + i, i * 2 * MIB + 8 * KIB, 80 * KIB)
        store.snapshot("vm", "s1")
        for i in range(5):
            write(qemu, vm.disk, 0xC0 + i, i * 2 * MIB + 512 * KIB, 64 * KIB)
            write(qemu, vm.guest_disk, 0xD0 + i, i * 3 * MIB, 40 * KIB)
        solo = store.create_box("solo", size=SIZE)
        write(qemu, solo.disk, 0x31, MIB, 192 * KIB)
        aux = store.create_box("aux", size=SIZE)
        for i in range(8):
            write(qemu, aux.disk, 0x40 + i, i * 2 * MIB, 72 * KIB)
        store.snapshot("aux", "t1")
        write(qemu, aux.disk, 0x52, MIB, MIB)
        store.snapshot("aux", "t2")
        store.restore("aux", "t1")
        write(qemu, aux.disk, 0x53, 5 * MIB, 128 * KIB)
        store.clone_box("aux", "twin")  # clones/C <- aux, twin; C -> t1
        write(qemu, store.box("twin").disk, 0x54, 7 * MIB, 64 * KIB)
    img = src / "import.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", img, str(SIZE))
    qemu.write(img, [f"write -P {0x61 + i} {i * MIB + 4 * KIB} 100k" for i in range(12)])


def _views(root: Path) -> dict[str, Path]:
    """Every disk of every box and snapshot, by its path relative to the store root."""
    out: dict[str, Path] = {}
    for box in sorted(os.listdir(root / "boxes")):
        if box.startswith("."):
            continue
        dirs = [root / "boxes" / box]
        snaps = root / "boxes" / box / "snapshots"
        if snaps.is_dir():
            dirs += [snaps / s for s in sorted(os.listdir(snaps)) if not s.startswith(".")]
        for d in dirs:
            for disk in ("disk.qcow2", "guest-rootfs.qcow2"):
                if (d / disk).is_file():
                    out[os.path.relpath(d / disk, root)] = d / disk
    return out


@attrs.define(frozen=True)
class Template:
    dir: Path  # holds store/ and src/
    refs: Path  # raw exports, one per view key ("/" replaced by "!")
    digests: dict[str, str]  # of every file of the store

    def ref(self, key: str) -> Path:
        return self.refs / (key.replace("/", "!") + ".raw")


@pytest.fixture(scope="module")
def template(qemu: Any, tmp_path_factory: pytest.TempPathFactory) -> Template:
    top = tmp_path_factory.mktemp("store-faults")
    tpl = top / "tpl"
    _setup(qemu, tpl / "store", tpl / "src")
    refs = top / "refs"
    refs.mkdir()
    t = Template(tpl, refs, tree_digest(tpl / "store"))
    sources = {**_views(tpl / "store"), "IMPORT": tpl / "src" / "import.qcow2",
               "BASE:os": tpl / "src" / "os.qcow2"}
    for key, path in sources.items():
        qemu.img("convert", "-O", "raw", path, t.ref(key))
    # The raw base is its own reference.
    os.link(tpl / "src" / "rootfs.raw", t.ref("BASE:rootfs"))
    return t


# -- the operations ----------------------------------------------------------------------------


Mapping = dict[str, str]  # view key -> reference key


@attrs.define(frozen=True)
class Op:
    """A store operation, and the views it leaves when it happened (from those before)."""

    run: Callable[[BoxStore, Path], Any]  # (store, work dir holding store/ src/ out/)
    after: Callable[[Mapping], Mapping]
    #: Views whose images the operation writes in place (leaks allowed after a failure).
    in_place: tuple[str, ...] = ()
    #: An output outside the store: (path relative to the work dir, view key it equals).
    output: tuple[str, str] | None = None
    #: A base it adds: (name, source file relative to the work dir).
    base: tuple[str, str] | None = None


def _snapshot_after(m: Mapping) -> Mapping:
    return {**m, "boxes/vm/snapshots/s2/disk.qcow2": "boxes/vm/disk.qcow2",
            "boxes/vm/snapshots/s2/guest-rootfs.qcow2": "boxes/vm/guest-rootfs.qcow2"}


def _clone_after(m: Mapping) -> Mapping:
    return {**m, "boxes/copy/disk.qcow2": "boxes/vm/disk.qcow2",
            "boxes/copy/guest-rootfs.qcow2": "boxes/vm/guest-rootfs.qcow2"}


def _restore_after(m: Mapping) -> Mapping:
    return {**m, "boxes/vm/disk.qcow2": "boxes/vm/snapshots/s1/disk.qcow2",
            "boxes/vm/guest-rootfs.qcow2": "boxes/vm/snapshots/s1/guest-rootfs.qcow2"}


def _merge_after(m: Mapping) -> Mapping:
    return {k: v for k, v in m.items() if k != "boxes/aux/snapshots/t1/disk.qcow2"}


OPS = {
    "snapshot": Op(lambda s, w: s.snapshot("vm", "s2"), _snapshot_after),
    "clone_box": Op(lambda s, w: s.clone_box("vm", "copy"), _clone_after),
    "restore": Op(lambda s, w: s.restore("vm", "s1"), _restore_after),
    "create_box": Op(lambda s, w: s.create_box("new", base="os", guest_base="rootfs"),
                     lambda m: {**m, "boxes/new/disk.qcow2": "BASE:os",
                                "boxes/new/guest-rootfs.qcow2": "BASE:rootfs"}),
    "export_box": Op(lambda s, w: s.export_box("vm", w / "out" / "vm.qcow2"), dict,
                     output=("out/vm.qcow2", "boxes/vm/disk.qcow2")),
    "export_box-snapshot": Op(
        lambda s, w: s.export_box("vm", w / "out" / "s1.qcow2", snapshot="s1", guest=True),
        dict, output=("out/s1.qcow2", "boxes/vm/snapshots/s1/guest-rootfs.qcow2")),
    "import_box": Op(lambda s, w: s.import_box("imp", w / "src" / "import.qcow2"),
                     lambda m: {**m, "boxes/imp/disk.qcow2": "IMPORT"}),
    "add_base-qcow2": Op(lambda s, w: s.add_base(w / "src" / "import.qcow2", "b2",
                                                 backing_format="qcow2"),
                         dict, base=("b2", "src/import.qcow2")),
    "add_base-raw": Op(lambda s, w: s.add_base(w / "src" / "rootfs.raw", "b3",
                                               backing_format="raw"),
                       dict, base=("b3", "src/rootfs.raw")),
    "remove_snapshot-merge": Op(lambda s, w: s.remove_snapshot("aux", "t1", merge=True),
                                _merge_after,
                                in_place=("boxes/aux/disk.qcow2", "boxes/aux/snapshots/t2/",
                                          "clones/")),
}


# -- judging -----------------------------------------------------------------------------------


def _compare(qemu: Any, image: Path, ref: Path) -> bool:
    fmt = "raw" if image.suffix == ".raw" else "qcow2"
    proc = qemu.img("compare", "-U", "-f", fmt, "-F", "raw", image, ref, check=False)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode == 0


def _all_read(qemu: Any, pool: ThreadPoolExecutor, tpl: Template, views: dict[str, Path],
              mapping: Mapping) -> list[str]:
    """The view keys that do not read as their reference says (all of them must)."""
    keys = sorted(views)
    same = pool.map(lambda k: _compare(qemu, views[k], tpl.ref(mapping[k])), keys)
    return [k for k, ok in zip(keys, same, strict=True) if not ok]


def _leftovers(work: Path) -> list[str]:
    root = work / "store"
    found = [f".boxdisk/journal/{n}" for n in os.listdir(root / ".boxdisk" / "journal")]
    found += [f".boxdisk/trash/{n}" for n in os.listdir(root / ".boxdisk" / "trash")]
    for dirpath, dirs, files in os.walk(root):
        if os.path.relpath(dirpath, root).startswith(".boxdisk"):
            continue
        found += [os.path.relpath(os.path.join(dirpath, n), root)
                  for n in dirs + files if n.startswith(".") and n != ".boxdisk"]
    found += [f"out/{n}" for n in os.listdir(work / "out") if n.startswith(".")]
    return found


def _images(root: Path) -> list[Path]:
    out = []
    for dirpath, _dirs, files in os.walk(root):
        if ".boxdisk" in dirpath:
            continue
        out += [Path(dirpath) / n for n in files if n.endswith(".qcow2")]
    return out


def _judge(qemu: Any, pool: ThreadPoolExecutor, tpl: Template, op: Op, work: Path,
           exc: BaseException | None, *, persistent: bool, injected: bool) -> bool:
    """Every check after one attempt; returns whether the operation took effect."""
    root = work / "store"
    if exc is not None:
        assert isinstance(exc, BoxdiskError), f"{type(exc).__name__} escaped: {exc!r}"
        assert exc.path is not None and exc.path != os.fspath(root), (
            f"the error names no file: {exc!r}")
        assert not injected or is_enospc_or_eio(exc), f"not the injected error: {exc!r}"
        if not persistent:
            assert _leftovers(work) == [], exc
    with BoxStore(root) as store:  # recovers what a broken disk kept the op from undoing
        assert _leftovers(work) == []
        report = store.verify()
        for p in report.problems:
            rel = os.path.relpath(p.path, root)
            allowed = (exc is not None and p.kind == "check"
                       and p.message.startswith("0 corruptions")
                       and any(rel.startswith(k) for k in op.in_place))
            assert allowed, f"verify: {p.kind}: {rel}: {p.message} (after {exc!r})"
    digests = tree_digest(root)
    changed = [p for p in _images(root)
               if tpl.digests.get(os.path.relpath(p, root)) != digests[os.path.relpath(p, root)]]
    for report in pool.map(qemu.check, changed):
        bad = report.get("corruptions", 0) + report.get("check-errors", 0)
        leaks = report.get("leaks", 0)
        assert not bad, report
        assert not leaks or exc is not None, report
    before: Mapping = {k: k for k in _views(tpl.dir / "store")}
    views = _views(root)
    took_effect = None
    for done, mapping in ((False, before), (True, op.after(before))):
        if set(mapping) == set(views) and not _all_read(qemu, pool, tpl, views, mapping):
            took_effect = done
            break
    assert took_effect is not None, (
        f"neither the old nor the new state: views {sorted(views)}; "
        f"mismatches against the old {_all_read(qemu, pool, tpl, views, before) if set(before) == set(views) else 'keys'}")  # noqa: E501
    if op.output is not None:
        out = work / op.output[0]
        if exc is not None:
            assert not out.exists(), f"{out} left behind by a failed export"
        else:
            assert _compare(qemu, out, tpl.ref(op.output[1]))
            assert "backing-filename" not in qemu.info(out)
        took_effect = exc is None
    if op.base is not None:
        name, source = op.base
        with BoxStore(root) as store:
            present = name in store.list_bases()
            if present:
                assert file_digest(store.base_path(name)) == file_digest(work / source)
        took_effect = present
    if exc is None:
        assert took_effect, "the operation returned but did not happen"
    return bool(took_effect)


# -- the runs -----------------------------------------------------------------------------------


def _fresh(tpl: Template, parent: Path) -> Path:
    work = parent / "work"
    if work.exists():
        clear(work)
        work.rmdir()
    work.mkdir()
    copy_tree(tpl.dir / "store", work / "store")
    copy_tree(tpl.dir / "src", work / "src")
    (work / "out").mkdir()
    return work


def _attempt(op: Op, work: Path, faults: Faults | None = None) -> BaseException | None:
    with BoxStore(work / "store", lock_timeout=5) as store:
        try:
            if faults is None:
                op.run(store, work)
            else:
                with faults:
                    op.run(store, work)
        except Exception as exc:  # judged by _judge
            return exc
    return None


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as p:
        yield p


def _injected(qemu: Any, pool: ThreadPoolExecutor, tpl: Template, tmp: Path, name: str,
              mode: str, want: int | None) -> None:
    op = OPS[name]
    counter = Faults()
    assert _attempt(op, _fresh(tpl, tmp), counter) is None
    total = counter.calls
    undone = 0
    for n in points(total, want or total):
        work = _fresh(tpl, tmp)
        faults = Faults(n, persistent=mode == "eio-persistent", short=mode == "short")
        exc = _attempt(op, work, faults)
        assert faults.failed, f"call {n} of {total} was never made"
        done = _judge(qemu, pool, tpl, op, work, exc, persistent=faults.persistent,
                      injected=mode != "short")
        undone += not done
    # The operation was really made to fail (not every failing call is absorbed).
    assert undone or mode == "short"


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("mode", list(POINTS))
def test_injected_error(qemu: Any, pool: ThreadPoolExecutor, template: Template,
                        tmp_path: Path, name: str, mode: str) -> None:
    _injected(qemu, pool, template, tmp_path, name, mode, POINTS[mode])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("mode", list(POINTS))
def test_injected_error_at_every_call(qemu: Any, pool: ThreadPoolExecutor, template: Template,
                                      tmp_path: Path, name: str, mode: str) -> None:
    _injected(qemu, pool, template, tmp_path, name, mode, None)


@pytest.mark.parametrize("name", list(OPS))
def test_disk_full(qemu: Any, pool: ThreadPoolExecutor, template: Template, tmp_path: Path,
                   name: str) -> None:
    op = OPS[name]
    with tmpfs(tmp_path / "fs", 40 * MIB) as fs:
        ballast = fs / "ballast"

        def run(free: int) -> bool:
            work = _fresh(template, fs)
            leave_free(ballast, free)
            return _attempt(op, work) is None

        room = free_bytes(fs) - 128 * KIB
        least = first_success(run, room)
        assert least > 0
        failed = 0
        for k in range(LEVELS):
            work = _fresh(template, fs)
            leave_free(ballast, least * k // LEVELS)
            exc = _attempt(op, work)
            leave_free(ballast, room)  # room again for the recovery and the checks
            failed += exc is not None
            if exc is not None:
                assert is_enospc_or_eio(exc), repr(exc)
            _judge(qemu, pool, template, op, work, exc, persistent=False, injected=False)
        assert failed >= LEVELS - 1


def test_a_full_disk_names_errno(template: Template, tmp_path: Path) -> None:
    """A store operation that runs out of space says so (errno ENOSPC in its cause)."""
    work = _fresh(template, tmp_path)
    exc = _attempt(OPS["snapshot"], work, Faults(1, err=errno.ENOSPC, persistent=True))
    assert isinstance(exc, BoxdiskError)
    assert is_enospc_or_eio(exc)
    with BoxStore(work / "store") as store:
        assert "s2" not in store.box("vm").snapshots
