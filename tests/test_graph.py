"""DependencyGraph: backs-onto edges read from QEMU-made headers, resolved exactly as QEMU does.

QEMU is the oracle for where a backing name leads: ``qemu-img info
--backing-chain`` on the same image lists the same files as ``chain()``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from boxdisk import DependencyGraph as TopLevelGraph
from boxdisk.graph import DependencyGraph, GraphNode
from boxdisk.qcow2 import rewrite_backing_reference

pytestmark = pytest.mark.qemu

MIB = 1 << 20


def _create(qemu, path: Path, *, backing: str | None = None, fmt: str = "qcow2",
            backing_fmt: str = "qcow2") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    args: list[str | os.PathLike[str]] = ["create", "-q", "-f", fmt]
    if backing is not None:
        args += ["-b", backing, "-F", backing_fmt]
    qemu.img(*args, path, str(4 * MIB))
    return path


def _qemu_chain(qemu, top: Path) -> list[str]:
    return [os.path.realpath(i["filename"]) for i in qemu.info(top, "--backing-chain")]


@pytest.fixture
def tree(qemu, tmp_path: Path) -> dict[str, Path]:
    """base.raw <- mid <- (top1, top2 in another directory); abs <- mid by absolute name."""
    base = _create(qemu, tmp_path / "bases" / "base.raw", fmt="raw")
    mid = _create(qemu, tmp_path / "layers" / "mid.qcow2", backing="../bases/base.raw",
                  backing_fmt="raw")
    top1 = _create(qemu, tmp_path / "boxes" / "a" / "top1.qcow2", backing="../../layers/mid.qcow2")
    top2 = _create(qemu, tmp_path / "boxes" / "b" / "top2.qcow2", backing="../../layers/mid.qcow2")
    absolute = _create(qemu, tmp_path / "abs.qcow2", backing=str(mid))
    return {"base": base, "mid": mid, "top1": top1, "top2": top2, "abs": absolute}


def _r(p: Path) -> str:
    return os.path.realpath(p)


def test_edges_chains_and_dependents(qemu, tree: dict[str, Path], tmp_path: Path) -> None:
    graph = DependencyGraph.scan([tree["top1"], tree["top2"], tree["abs"]])
    assert TopLevelGraph is DependencyGraph
    assert len(graph) == 5  # the tops, mid and the raw base (a leaf, never opened)
    for top in ("top1", "top2", "abs"):
        assert graph.chain(tree[top]) == _qemu_chain(qemu, tree[top])
    mid = graph.node(tree["mid"])
    assert mid == GraphNode(_r(tree["mid"]), "qcow2", backing=_r(tree["base"]),
                            backing_format="raw", backing_name="../bases/base.raw")
    assert graph.node(tree["base"]).format == "raw"
    assert graph.direct_dependents(tree["mid"]) == {_r(tree[k]) for k in ("top1", "top2", "abs")}
    assert graph.dependents(tree["base"]) == {_r(tree[k]) for k in ("mid", "top1", "top2", "abs")}
    assert graph.dependents(tree["top1"]) == set()
    assert not graph.can_remove(tree["base"]) and not graph.can_remove(tree["mid"])
    assert graph.can_remove(tree["top1"])
    assert graph.roots() == sorted(_r(tree[k]) for k in ("abs", "top1", "top2"))
    assert graph.cycles() == []
    assert tree["mid"] in graph and tmp_path / "nope.qcow2" not in graph
    # Scanning the directory finds the same graph.
    walked = DependencyGraph.scan(tmp_path)
    assert {n.path for n in walked} == {n.path for n in graph}
    assert {n.path: n for n in walked} == {n.path: n for n in graph}


def test_symlinked_image_resolves_names_next_to_the_link(qemu, tmp_path: Path) -> None:
    """QEMU joins a relative name to the directory of the path it opened (the link's)."""
    (tmp_path / "real").mkdir()
    (tmp_path / "view").mkdir()
    _create(qemu, tmp_path / "real" / "base.qcow2")
    _create(qemu, tmp_path / "view" / "base.qcow2")
    _create(qemu, tmp_path / "real" / "child.qcow2", backing="base.qcow2")
    link = tmp_path / "view" / "child.qcow2"
    link.symlink_to(tmp_path / "real" / "child.qcow2")
    graph = DependencyGraph.scan([link])
    assert graph.chain(link) == _qemu_chain(qemu, link)
    assert graph.node(link).backing == _r(tmp_path / "view" / "base.qcow2")
    # Through a symlinked directory, ".." is physical (the kernel's walk), as for QEMU.
    (tmp_path / "deep" / "er").mkdir(parents=True)
    _create(qemu, tmp_path / "deep" / "base.qcow2")
    _create(qemu, tmp_path / "deep" / "er" / "c.qcow2", backing="../base.qcow2")
    (tmp_path / "shortcut").symlink_to(tmp_path / "deep" / "er")
    via = tmp_path / "shortcut" / "c.qcow2"
    assert DependencyGraph.scan([via]).chain(via) == _qemu_chain(qemu, via)


def test_missing_unknown_and_unreadable(qemu, tmp_path: Path) -> None:
    _create(qemu, tmp_path / "gone-base.qcow2")
    child = _create(qemu, tmp_path / "child.qcow2", backing="gone-base.qcow2")
    unknown = _create(qemu, tmp_path / "unknown.qcow2", backing="child.qcow2")
    rewrite_backing_reference(unknown, "child.qcow2", None)  # no backing-format extension
    _create(qemu, tmp_path / "nothere.raw", fmt="raw")
    raw_child = _create(qemu, tmp_path / "rawchild.qcow2", backing="nothere.raw",
                        backing_fmt="raw")
    (tmp_path / "nothere.raw").unlink()
    (tmp_path / "gone-base.qcow2").unlink()
    (tmp_path / "garbage.qcow2").write_bytes(b"not an image at all" * 10)
    graph = DependencyGraph.scan(tmp_path)
    assert graph.node(tmp_path / "gone-base.qcow2").error == "missing"
    assert graph.node(tmp_path / "nothere.raw").error == "missing"
    assert graph.node(tmp_path / "garbage.qcow2").error is not None
    # Without a backing-format extension the backing file is a leaf: never probed.
    node = graph.node(unknown)
    assert node.backing == _r(child) and node.backing_format is None
    assert graph.dependents(tmp_path / "gone-base.qcow2") == {_r(child), _r(unknown)}
    assert graph.node(raw_child).backing_format == "raw"
    assert 'color="red"' in graph.to_dot()


def test_cycles_are_found_and_walks_end(qemu, tmp_path: Path) -> None:
    a = _create(qemu, tmp_path / "a.qcow2")
    b = _create(qemu, tmp_path / "b.qcow2", backing="a.qcow2")
    c = _create(qemu, tmp_path / "c.qcow2", backing="b.qcow2")
    top = _create(qemu, tmp_path / "top.qcow2", backing="c.qcow2")
    self_loop = _create(qemu, tmp_path / "self.qcow2")
    # Close the loops last: QEMU itself cannot open (or create) images over a cycle.
    rewrite_backing_reference(a, "c.qcow2", "qcow2")  # a -> c -> b -> a
    rewrite_backing_reference(self_loop, "self.qcow2", "qcow2")
    graph = DependencyGraph.scan([top])
    ring = [_r(c), _r(b), _r(a)]
    start = ring.index(min(ring))
    assert graph.cycles() == [ring[start:] + ring[:start]]
    assert graph.chain(top) == [_r(top), _r(c), _r(b), _r(a)]
    assert graph.dependents(a) == {_r(b), _r(c), _r(top)}
    assert not graph.can_remove(a)
    again = DependencyGraph.scan([top, self_loop])
    assert [_r(self_loop)] in again.cycles() and len(again.cycles()) == 2
    assert again.chain(self_loop) == [_r(self_loop)]


def test_scan_skips_hidden_entries_and_other_files(qemu, tmp_path: Path) -> None:
    _create(qemu, tmp_path / "visible" / "a.qcow2")
    _create(qemu, tmp_path / ".hidden" / "b.qcow2")
    _create(qemu, tmp_path / "visible" / ".staging.qcow2")
    _create(qemu, tmp_path / "visible" / "disk.img")
    graph = DependencyGraph.scan(tmp_path)
    assert [n.path for n in graph] == [_r(tmp_path / "visible" / "a.qcow2")]
    assert "1 images" in repr(graph)


def test_dot_output(qemu, tree: dict[str, Path], tmp_path: Path) -> None:
    odd = _create(qemu, tmp_path / 'we"ird.qcow2', backing="layers/mid.qcow2")
    graph = DependencyGraph.scan([tree["top1"], odd])
    dot = graph.to_dot(relative_to=tmp_path)
    assert dot.startswith("digraph boxdisk {\n") and dot.endswith("}\n")
    assert '"boxes/a/top1.qcow2" -> "layers/mid.qcow2";' in dot
    assert '"layers/mid.qcow2" -> "bases/base.raw";' in dot
    assert '"we\\"ird.qcow2" -> "layers/mid.qcow2";' in dot
    assert '"bases/base.raw" [label="bases/base.raw\\nraw" style="dashed"];' in dot
    assert dot.count("->") == 3
    absolute = graph.to_dot()
    assert f'"{_r(tree["top1"])}"' in absolute
