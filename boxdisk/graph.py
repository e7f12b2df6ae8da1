"""``DependencyGraph``: which image backs onto which, read from the images' own headers.

Nodes are image files, keyed by real path; an edge ``child -> backing`` means
the child's header names that backing file. Headers are the truth: the graph is
built by reading them, never from metadata kept elsewhere. A relative backing
name resolves, as in QEMU, against the directory of the naming image as it was
opened (a symlinked image's names resolve next to the link). A backing file is
followed as qcow2 only when the naming header's backing-format extension says
so; raw (or unnamed-format) backing files are leaves. Nothing is probed.

Building is bounded: one header read per image (at most a cluster of bytes),
and the work is linear in the number of images and edges.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator

import attrs

from ._args import as_path, as_paths
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

    ``path`` is its real path, ``format`` what the image naming it said it is
    (``qcow2`` for the images a scan starts from). ``backing`` is the real
    path of the file its header names (None without one), ``backing_name``
    the name verbatim and ``backing_format`` the backing-format extension.
    ``error`` says why the file could not be read (missing, not qcow2, ...).
    """

    path: str
    format: str
    backing: str | None = None
    backing_format: str | None = None
    backing_name: str | None = None
    error: str | None = None


class _Resolver:
    """Real paths with the directories' real paths cached (a scan resolves each dir once)."""

    def __init__(self) -> None:
        self._dirs: dict[str, str] = {}

    def directory(self, path: str) -> str:
        """The real path of an absolute, normalized directory path."""
        real = self._dirs.get(path)
        if real is None:
            head, tail = os.path.split(path)
            if not tail or head == path:
                real = os.path.realpath(path)
            else:
                # One lstat per new directory: its parent's real path is (usually) cached.
                joined = os.path.join(self.directory(head), tail)
                real = os.path.realpath(joined) if os.path.islink(joined) else joined
            self._dirs[path] = real
        return real

    def file(self, path: str) -> str:
        """The real path of a file (resolved like ``os.path.realpath``)."""
        head, tail = os.path.split(os.path.abspath(path))
        full = os.path.join(self.directory(head), tail)
        return os.path.realpath(full) if os.path.islink(full) else full

    def backing(self, child_opened: str, name: str) -> tuple[str, str]:
        """(path as QEMU opens it, real path) of the backing name ``name`` of ``child_opened``."""
        if os.path.isabs(name):
            return name, self.file(name)
        opened = os.path.join(os.path.dirname(child_opened), name)
        parts = name.split("/")
        ups = 0
        while ups < len(parts) and parts[ups] == "..":
            ups += 1
        if ".." in parts[ups:]:
            # A ".." after a component that may be a symlink: let realpath walk it.
            return opened, os.path.realpath(opened)
        # From a real directory, leading ".." steps are physical: join them lexically.
        base = self.directory(os.path.dirname(os.path.abspath(child_opened)))
        return opened, self.file(os.path.normpath(os.path.join(base, name)))


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
        """Build the graph from qcow2 image files, or from every ``*.qcow2`` under a directory.

        A directory is walked without following symlinked directories and
        skipping hidden entries (names starting with ``.``, such as a store's
        ``.boxdisk/`` and staging files). Backing files named by the headers
        are added too (read when their format is qcow2), wherever they live.
        """
        graph = cls()
        resolver = _Resolver()
        if isinstance(paths_or_root, (str, os.PathLike)):
            root = as_path(paths_or_root, "paths_or_root")
            starts: list[str] = list(_walk(root, suffixes)) if os.path.isdir(root) else [root]
        else:
            starts = as_paths(paths_or_root, "paths_or_root") or []
        for path in starts:
            graph._add(resolver, path, "qcow2")
        log.debug("graph_scanned", images=len(graph._nodes), starts=len(starts))
        return graph

    def _add(self, resolver: _Resolver, path: str, fmt: str) -> None:
        real = resolver.file(path)
        todo = deque([(path, real, fmt)])
        while todo:
            opened, real, fmt = todo.popleft()
            if real in self._nodes:
                continue
            node, next_opened = self._read(resolver, opened, real, fmt)
            self._nodes[real] = node
            self._dependents.setdefault(real, set())
            if node.backing is not None:
                self._dependents.setdefault(node.backing, set()).add(real)
                if node.backing not in self._nodes and next_opened is not None:
                    todo.append((next_opened, node.backing, node.backing_format or "unknown"))

    @staticmethod
    def _read(resolver: _Resolver, opened: str, real: str,
              fmt: str) -> tuple[GraphNode, str | None]:
        if fmt != "qcow2":
            error = None if os.path.exists(real) else "missing"
            return GraphNode(real, fmt, error=error), None
        try:
            header = read_header(real)
        except BoxdiskError as exc:
            log.warning("graph_image_unreadable", path=real, error=str(exc))
            error = "missing" if not os.path.lexists(real) else exc.message
            return GraphNode(real, fmt, error=error), None
        if header.backing_file is None:
            return GraphNode(real, fmt), None
        name = header.backing_file
        target_opened, target = resolver.backing(opened, name)
        node = GraphNode(real, fmt, backing=target, backing_format=header.backing_format,
                         backing_name=name)
        return node, target_opened

    # -- questions ----------------------------------------------------------------

    def __contains__(self, path: object) -> bool:
        return isinstance(path, (str, os.PathLike)) and os.path.realpath(path) in self._nodes

    def __len__(self) -> int:
        return len(self._nodes)

    def __iter__(self) -> Iterator[GraphNode]:
        return iter(self._nodes.values())

    def __repr__(self) -> str:
        edges = sum(1 for n in self._nodes.values() if n.backing is not None)
        return f"<DependencyGraph {len(self._nodes)} images, {edges} edges>"

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
        seen: set[str] = set()
        current: str | None = _real(path)
        while current is not None and current not in seen:
            out.append(current)
            seen.add(current)
            node = self._nodes.get(current)
            current = None if node is None else node.backing
        return out

    def cycles(self) -> list[list[str]]:
        """Every backing cycle, each listed once starting from its smallest path."""
        found: dict[tuple[str, ...], list[str]] = {}
        done: set[str] = set()
        for start in self._nodes:
            if start in done:
                continue
            chain: list[str] = []
            index: dict[str, int] = {}
            current: str | None = start
            while current is not None and current not in index and current not in done:
                index[current] = len(chain)
                chain.append(current)
                node = self._nodes.get(current)
                current = None if node is None else node.backing
            if current is not None and current in index:
                loop = chain[index[current]:]
                i = loop.index(min(loop))
                key = tuple(loop[i:] + loop[:i])
                found.setdefault(key, list(key))
            done.update(chain)
        return sorted(found.values())

    def roots(self) -> list[str]:
        """Images nothing else backs onto (the tops of chains)."""
        return sorted(p for p, deps in self._dependents.items() if not deps and p in self._nodes)

    def to_dot(self, *, relative_to: str | os.PathLike[str] | None = None) -> str:
        """The graph in Graphviz's dot language (edges point at backing files)."""
        base = None if relative_to is None else _real(relative_to, "relative_to")

        def label(p: str) -> str:
            shown = os.path.relpath(p, base) if base else p
            return shown.replace("\\", "\\\\").replace('"', '\\"')

        lines = ["digraph boxdisk {", "  rankdir=BT;", "  node [shape=box];"]
        ordered = sorted(self._nodes.values(), key=lambda n: n.path)
        for node in ordered:
            style = ' style="dashed"' if node.format != "qcow2" else ""
            if node.error is not None:
                style += ' color="red"'
            lines.append(f'  "{label(node.path)}" [label="{label(node.path)}\\n{node.format}"'
                         f"{style}];")
        for node in ordered:
            if node.backing is not None:
                lines.append(f'  "{label(node.path)}" -> "{label(node.backing)}";')
        lines.append("}")
        return "\n".join(lines) + "\n"


def _walk(root: str, suffixes: tuple[str, ...]) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(suffixes) and not name.startswith("."):
                full = os.path.join(dirpath, name)
                if os.path.isfile(full):
                    yield full


def _real(path: str | os.PathLike[str], param: str = "path") -> str:
    return os.path.realpath(as_path(path, param))
