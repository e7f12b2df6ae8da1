"""``boxdisk demo``: the whole box workflow, end to end, in a temporary directory.

A base, a box over it, data written into the box, a snapshot, a clone, a
removal the guard refuses (with the reason), a restore, an export checked
clean, and the store drawn as a tree. Each step verifies what it claims; the
demo exits 1 if any claim fails, and removes its directory either way.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from ._errors import SnapshotInUseError
from .chain import BackingChain, open_chain
from .ops import check
from .store import BoxStore

__all__ = ["run_demo"]

MiB = 1 << 20
T = TypeVar("T")


class _Demo:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.step = 0
        self.failures: list[str] = []

    def say(self, text: str) -> None:
        self.step += 1
        print(f"[{self.step}] {text}")

    def detail(self, text: str) -> None:
        print(f"    {text}")

    def expect(self, ok: bool, claim: str) -> None:
        if not ok:
            self.failures.append(claim)
            print(f"    FAILED: {claim}")

    def timed(self, fn: Callable[[], T]) -> tuple[T, float]:
        start = time.perf_counter()
        value = fn()
        return value, (time.perf_counter() - start) * 1000

    def rel(self, path: str | os.PathLike[str]) -> str:
        return os.path.relpath(path, self.root)


def run_demo(*, keep: bool = False) -> int:
    """Run the demo; returns 0 when every check held."""
    root = Path(tempfile.mkdtemp(prefix="boxdisk-demo-"))
    try:
        return _demo(_Demo(root))
    finally:
        if keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


@contextmanager
def _disk(store: BoxStore, path: Path, *, writable: bool = False) -> Iterator[BackingChain]:
    """What the guest sees of a store disk (chains confined to the store)."""
    with open_chain(path, writable=writable, allowed_roots=[store.root]) as chain:
        yield chain


def _write(store: BoxStore, path: Path, offset: int, data: bytes) -> None:
    with _disk(store, path, writable=True) as disk:
        disk.write(offset, data)
        disk.flush()


def _read(store: BoxStore, path: Path, offset: int, length: int) -> bytes:
    with _disk(store, path) as disk:
        return disk.read(offset, length)


def _make_base(path: Path) -> None:
    pattern = b"OS-IMAGE" * (MiB // 8)
    with path.open("wb") as f:
        for _ in range(64):
            f.write(pattern)


def _demo(d: _Demo) -> int:
    print(f"boxdisk demo in {d.root}")
    source = d.root / "os.raw"
    _make_base(source)
    store = BoxStore(d.root / "store")
    with store:
        store.add_base(source, "os", backing_format="raw")
        d.say(f"store at {d.rel(store.root)}; base 'os' added (64 MiB raw, "
              f"'OS-IMAGE' repeated)")

        box, ms = d.timed(lambda: store.create_box("web", base="os"))
        d.say(f"box 'web': {d.rel(box.disk)}, a copy-on-write child of 'os' ({ms:.1f} ms)")

        hello = b"hello from web, version 1"
        _write(store, box.disk, 1 * MiB, hello)
        d.say(f"wrote {hello!r} at 1 MiB into web's disk (boxdisk's own qcow2 engine)")
        d.detail(f"web reads at 1 MiB: {_read(store, box.disk, 1 * MiB, len(hello))!r}")
        d.detail(f"web reads at 9 MiB: {_read(store, box.disk, 9 * MiB, 16)!r} (the base)")
        d.expect(_read(store, box.disk, 1 * MiB, len(hello)) == hello, "web reads its write")

        snap, ms = d.timed(lambda: store.snapshot("web", "v1"))
        d.say(f"snapshot web@v1: the live disk became {d.rel(snap.disk)} (a rename, "
              f"{ms:.1f} ms); web got a new empty child over it")

        v2 = b"hello from web, version 2"
        _write(store, box.disk, 1 * MiB, v2)
        d.say(f"wrote {v2!r} over it; the snapshot still holds version 1")
        d.expect(_read(store, snap.disk, 1 * MiB, len(hello)) == hello, "snapshot unchanged")
        d.expect(_read(store, box.disk, 1 * MiB, len(v2)) == v2, "web reads version 2")

        twin, ms = d.timed(lambda: store.clone_box("web", "web2"))
        d.say(f"clone web -> web2 ({ms:.1f} ms): both read version 2, and diverge from here")
        mine = b"web2 writes its own data!"
        _write(store, twin.disk, 1 * MiB, mine)
        d.detail(f"web2 reads: {_read(store, twin.disk, 1 * MiB, len(v2))!r}")
        d.detail(f"web  reads: {_read(store, box.disk, 1 * MiB, len(v2))!r}")
        d.expect(_read(store, box.disk, 1 * MiB, len(v2)) == v2,
                 "web does not see web2's write")

        d.say("remove snapshot web@v1 ...")
        try:
            store.remove_snapshot("web", "v1")
        except SnapshotInUseError as exc:
            d.detail("refused (SnapshotInUseError): these images back onto it:")
            for dep in exc.dependents:
                d.detail(f"  {d.rel(dep)}")
        else:
            d.expect(False, "removing a snapshot that others depend on is refused")

        _, ms = d.timed(lambda: store.restore("web", "v1"))
        d.say(f"restore web to v1 ({ms:.1f} ms): web reads "
              f"{_read(store, box.disk, 1 * MiB, len(hello))!r} again")
        d.expect(_read(store, box.disk, 1 * MiB, len(hello)) == hello, "restore gives v1")
        d.expect(_read(store, twin.disk, 1 * MiB, len(mine)) == mine, "web2 unchanged")

        export = d.root / "web2.qcow2"
        _, ms = d.timed(lambda: store.export_box("web2", export))
        report = check(export)
        d.say(f"export web2 -> {d.rel(export)}: one standalone qcow2 ({ms:.1f} ms); "
              f"check: {report.corruptions} corruptions, {report.leaks} leaks")
        with open_chain(export) as exported:
            d.expect(exported.paths == (str(export),), "the export has no backing file")
            d.expect(exported.read(1 * MiB, len(mine)) == mine, "export holds web2's data")
            d.expect(exported.read(9 * MiB, 8) == b"OS-IMAGE", "export holds the base's data")
        d.expect(report.clean, "the export checks clean")

        verify = store.verify()
        d.say(f"the store: {verify.boxes} boxes, {verify.images} images, "
              f"verify: {'clean' if not verify.problems else verify.problems}")
        d.expect(not verify.problems, "the store verifies clean")
        from ._cli._store import graph_tree  # noqa: PLC0415 - the CLI's drawing

        for line in graph_tree(store, store.graph()):
            d.detail(line)

    if d.failures:
        print(f"demo FAILED: {'; '.join(d.failures)}")
        return 1
    print("demo passed")
    return 0
