"""``DependencyGraph``: which image backs onto which, read from the images' own headers.

Nodes are image files (by real path); an edge ``child -> backing`` means the
child's header names that backing file. Headers are the truth: the graph is
built by reading them, never from metadata kept elsewhere. A backing file is
followed as qcow2 only when the naming header's backing-format extension says
so; raw (or unnamed) backing files are leaves. Nothing is probed.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import attrs

from ._errors import BoxdiskError
from ._log import get_logger
from .qcow2 import read_header

__all__ = ["DependencyGraph", "GraphNode"]

log = get_logger(__name__)

#: File names read as qcow2 images when a directory is scanned.
QCOW2_SUFFIXES = (".qcow2",)


@attrs.define(frozen=True)
class GraphNode:
    """One image file in the graph.

    ``backing`` is the real path of the file its header names (None without
    one); ``error`` says why the header could not be read, if it could not.
    """

    path: str
    format: str
    backing: str | None = None
    backing_format: str | None = None
    backing_name: str | None = None
    error: str | None = None


def _real(path: str | os.PathLike[str]) -> str:
    return os.path.realpath(path)


class DependencyGraph:
    """A graph of images and the backing files they name; built by :meth:`scan`."""

    def __init__(self) -> None:
        self._nodes: dict[str, GraphNode] = {}
        self._dependents: dict[str, set[str]] = {}

    # -- building ---------------------------------------------------------------

    @classmethod
    def scan(
        cls,
        paths_or_root: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
        *,
        suffixes: tuple[str, ...] = QCOW2_SUFFIXES,
    ) -> DependencyGraph:
        """Build the graph from image files, or from every ``*.qcow2`` under a directory.

        Backing files named by the headers are added too (followed when their
        format is qcow2), wherever they live.
        """
        graph = cls()
        if isinstance(paths_or_root, (str, os.PathLike)):
            root = os.fspath(paths_or_root)
            starts: list[str] = list(_walk(root, suffixes)) if os.path.isdir(root) else [root]
        else:
            starts = [os.fspath(p) for p in paths_or_root]
        for path in starts:
            graph._add(path, "qcow2")
        return graph

    def _add(self, path: str, fmt: str) -> None:
        todo = deque([(_real(path), fmt)])
        while todo:
            real, fmt = todo.popleft()
            if real in self._nodes:
                continue
            node = self._read(real, fmt)
            self._nodes[real] = node
            self._dependents.setdefault(real, set())
            if node.backing is not None:
                self._dependents.setdefault(node.backing, set()).add(real)
                if node.backing not in self._nodes:
                    todo.append((node.backing, node.backing_format or "unknown"))

    @staticmethod
    def _read(real: str, fmt: str) -> GraphNode:
        if fmt != "qcow2":
            return GraphNode(real, fmt)
        try:
            header = read_header(real)
        except BoxdiskError as exc:
            log.warning("graph_image_unreadable", path=real, error=str(exc))
            return GraphNode(real, fmt, error=str(exc))
        if header.backing_file is None:
            return GraphNode(real, fmt)
        name = header.backing_file
        # QEMU resolves a relative name against the naming image's directory.
        target = _real(os.path.join(os.path.dirname(real), name))
        return GraphNode(real, fmt, backing=target, backing_format=header.backing_format,
                         backing_name=name)

    # -- questions ----------------------------------------------------------------

    def __contains__(self, path: object) -> bool:
        return isinstance(path, (str, os.PathLike)) and _real(path) in self._nodes

    def __len__(self) -> int:
        return len(self._nodes)

    def __iter__(self) -> Iterator[GraphNode]:
        return iter(self._nodes.values())

    def node(self, path: str | os.PathLike[str]) -> GraphNode:
        """The node of an image (KeyError when the graph does not hold it)."""
        return self._nodes[_real(path)]

    def dependents(self, path: str | os.PathLike[str]) -> set[str]:
        """Every image that backs onto ``path``, directly or through others (real paths)."""
        start = _real(path)
        seen: set[str] = set()
        todo = deque(self._dependents.get(start, ()))
        while todo:
            p = todo.popleft()
            if p in seen or p == start:
                continue
            seen.add(p)
            todo.extend(self._dependents.get(p, ()))
        return seen

    def direct_dependents(self, path: str | os.PathLike[str]) -> set[str]:
        """Images whose header names ``path`` as their backing file."""
        return set(self._dependents.get(_real(path), ()))

    def can_remove(self, path: str | os.PathLike[str]) -> bool:
        """Whether no image in the graph backs onto ``path``."""
        return not self._dependents.get(_real(path))

    def chain(self, path: str | os.PathLike[str]) -> list[str]:
        """``path`` and every backing file under it, top first (stops at a cycle)."""
        out: list[str] = []
        current: str | None = _real(path)
        while current is not None and current not in out:
            out.append(current)
            node = self._nodes.get(current)
            current = None if node is None else node.backing
        return out

    def cycles(self) -> list[list[str]]:
        """Every backing cycle (each listed once, from its smallest path)."""
        found: dict[tuple[str, ...], list[str]] = {}
        for start in self._nodes:
            chain: list[str] = []
            current: str | None = start
            while current is not None and current not in chain:
                chain.append(current)
                node = self._nodes.get(current)
                current = None if node is None else node.backing
            if current is not None:
                loop = chain[chain.index(current):]
                i = loop.index(min(loop))
                key = tuple(loop[i:] + loop[:i])
                found.setdefault(key, list(key))
        return list(found.values())

    def roots(self) -> list[str]:
        """Images nothing else backs onto (the tops of chains)."""
        return sorted(p for p, deps in self._dependents.items() if not deps and p in self._nodes)

    def to_dot(self, *, relative_to: str | os.PathLike[str] | None = None) -> str:
        """The graph in Graphviz's dot language (edges point at backing files)."""
        base = None if relative_to is None else _real(relative_to)

        def label(p: str) -> str:
            shown = os.path.relpath(p, base) if base else p
            return shown.replace("\\", "\\\\").replace('"', '\\"')

        lines = ["digraph boxdisk {", "  rankdir=BT;", "  node [shape=box];"]
        for node in sorted(self._nodes.values(), key=lambda n: n.path):
            style = ' style="dashed"' if node.format != "qcow2" else ""
            lines.append(f'  "{label(node.path)}" [label="{label(node.path)}\\n{node.format}"'
                         f"{style}];")
        for node in sorted(self._nodes.values(), key=lambda n: n.path):
            if node.backing is not None:
                lines.append(f'  "{label(node.path)}" -> "{label(node.backing)}";')
        lines.append("}")
        return "\n".join(lines) + "\n"


def _walk(root: str, suffixes: tuple[str, ...]) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.endswith(suffixes) and not name.startswith("."):
                full = os.path.join(dirpath, name)
                if Path(full).is_file():
                    yield full
