"""The layers of design.md, kept honest: every import in boxdisk/ points down, never up.

Layers, bottom first (a module may import its own layer and the ones below):

0. ``_errors``, ``_log``, ``_io``, ``_args``, ``_formats``
1. ``format`` (pure: no I/O, no logging, no locks), ``_locks``, ``_disk``, ``live`` (QMP)
2. ``image``: one file
3. ``chain``: a stack of files
4. ``ops``, ``qcow2`` (creation and the seed-parity tools), write paths over chains
5. ``store``, ``graph``
6. ``cli``, ``_demo``, ``__main__``, ``testing``, the package front door
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "boxdisk"

#: Top-level module or subpackage of boxdisk -> layer number.
LAYERS: dict[str, int] = {
    "_errors": 0,
    "_log": 0,
    "_io": 0,
    "_args": 0,
    "_formats": 0,
    "format": 1,
    "_locks": 1,
    "_disk": 1,
    "live": 1,
    "image": 2,
    "chain": 3,
    "_chain_write": 4,
    "ops": 4,
    "qcow2": 4,
    "graph": 5,
    "store": 5,
    "cli": 6,
    "_cli": 6,
    "_demo": 6,
    "__main__": 6,
    "testing": 6,
    "__init__": 6,
}

#: What the pure format layer may never import (design.md: bytes in, values out).
FORMAT_FORBIDDEN = {"os", "io", "structlog", "filelock", "fcntl", "pathlib", "shutil",
                    "subprocess", "tempfile", "mmap", "socket", "threading"}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _unit(path: Path) -> str:
    """The top-level part of boxdisk a file belongs to (``ops`` for boxdisk/ops/_edit.py)."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> list[tuple[str, int]]:
    """(absolute module name, line) for every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    package = list(rel.parts[:-1])  # e.g. ["boxdisk", "ops"]
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:  # ``from . import x``: x is a module of the package
                    found.extend((f"{mod}.{alias.name}", node.lineno) for alias in node.names)
                    continue
            else:
                mod = node.module or ""
            found.append((mod, node.lineno))
    return found


def _target_unit(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "boxdisk":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


MODULES = _modules()


def test_every_module_has_a_layer() -> None:
    missing = sorted({_unit(p) for p in MODULES} - set(LAYERS))
    assert not missing, f"give these parts of boxdisk a layer in tests/test_layering.py: {missing}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path) -> None:
    own = _unit(path)
    level = LAYERS.get(own, 6)
    upward = []
    for module, line in _imports(path):
        target = _target_unit(module)
        if target is None or target == own:
            continue
        if LAYERS.get(target, 6) > level:
            upward.append(f"line {line}: {module} (layer {LAYERS.get(target, 6)})")
    assert not upward, f"{path.name} (layer {level}, {own}) imports upward: {upward}"


@pytest.mark.parametrize("path", sorted((PACKAGE / "format").glob("*.py")),
                         ids=lambda p: p.name)
def test_format_layer_is_pure(path: Path) -> None:
    bad = []
    for module, line in _imports(path):
        root = module.split(".")[0]
        if root in FORMAT_FORBIDDEN:
            bad.append(f"line {line}: {module}")
        target = _target_unit(module)
        if target is not None and target not in ("format", "_errors"):
            bad.append(f"line {line}: {module}")
    assert not bad, f"boxdisk/format/{path.name} must not do I/O, log or lock: {bad}"


def test_importing_boxdisk_configures_no_logging() -> None:
    """structlog's global pipeline is the application's: importing boxdisk leaves it alone."""
    code = (
        "import structlog\n"
        "before = structlog.get_config()\n"
        "import boxdisk, boxdisk.chain, boxdisk.ops\n"
        "after = structlog.get_config()\n"
        "assert before == after, (before, after)\n"
        "assert not structlog.is_configured()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
