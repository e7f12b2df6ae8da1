"""Every ```python block in README.md and docs/*.md runs.

Each document's blocks run in order, in one namespace, in a subprocess of its
own (so imports, globals and logging set-ups stay there) whose working directory
is a fresh temporary one. A block is compiled under the document's name with
its real line numbers, so a traceback points into the Markdown file.

A block that cannot run anywhere (it needs a running VM, say) is preceded by
``<!-- snippet: skip REASON -->``; the reason is required. Snippets may not name
absolute paths: they run in a scratch directory and must not write outside it.
A snippet must also leave no warning behind (an unclosed ephemeral ``Disk``
warns when collected), since readers copy what the docs show.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\s]*)")
_SKIP = re.compile(r"^\s*<!--\s*snippet:\s*skip\b(?P<reason>.*?)-->\s*$")
_ABSOLUTE = re.compile(r"""(?<![\w.])[rbf]?["'](/[^"'\s]*)""")


@attrs.frozen
class Block:
    """One fenced ``python`` block: where it starts and what it says."""

    line: int  # 1-based line of the opening fence
    code: str
    skip: str | None  # the reason given by a preceding skip marker


def blocks(text: str) -> list[Block]:
    """The ``python`` blocks of a Markdown text, in order (fences inside lists included)."""
    lines = text.splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        indent, fence, info = m["indent"], m["fence"], m["info"].lower()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            line = lines[i]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            i += 1
        i += 1  # the closing fence
        if info not in ("python", "py", "python3"):
            continue
        found.append(Block(start + 1, "\n".join(body) + "\n", _skip_reason(lines, start)))
    return found


def _skip_reason(lines: list[str], fence: int) -> str | None:
    before = fence - 1
    while before >= 0 and not lines[before].strip():
        before -= 1
    m = _SKIP.match(lines[before]) if before >= 0 else None
    return None if m is None else m["reason"].strip()


# Runs in the subprocess: argv[1] is the document's name, stdin the blocks as JSON.
_RUNNER = r"""
import gc, json, sys, traceback, warnings

name = sys.argv[1]
namespace = {"__name__": "__main__"}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for line, code in json.load(sys.stdin):
        try:
            # Padding puts each statement on its line of the Markdown file.
            exec(compile("\n" * line + code, name, "exec"), namespace)
        except BaseException:
            print(f"{name}: the block at line {line} failed:", file=sys.stderr)
            traceback.print_exc()
            sys.exit(1)
    namespace.clear()
    gc.collect()
for w in caught:
    print(f"{name}: a warning was left behind: {w.category.__name__}: {w.message}"
          f" ({w.filename}:{w.lineno})", file=sys.stderr)
sys.exit(1 if caught else 0)
"""


def _name(doc: Path) -> str:
    return str(doc.relative_to(ROOT))


def test_blocks_are_found() -> None:
    text = "\n".join([
        "# t", "```python", "a = 1", "```", "- item", "  ```py", "  b = a", "  ```",
        "<!-- snippet: skip needs a VM -->", "", "```python", "launch()", "```",
        "```sh", "ls", "```", "```python", "", "```",
    ])
    assert blocks(text) == [Block(2, "a = 1\n", None), Block(6, "b = a\n", None),
                            Block(11, "launch()\n", "needs a VM"), Block(17, "\n", None)]


def test_documents_have_snippets() -> None:
    assert sum(len(blocks(d.read_text())) for d in DOCUMENTS) > 0


@pytest.mark.parametrize("doc", DOCUMENTS, ids=_name)
def test_skip_markers_give_a_reason(doc: Path) -> None:
    for block in blocks(doc.read_text()):
        assert block.skip != "", f"{_name(doc)}:{block.line}: a skip marker needs a reason"


@pytest.mark.parametrize("doc", DOCUMENTS, ids=_name)
def test_snippets_name_no_absolute_paths(doc: Path) -> None:
    for block in blocks(doc.read_text()):
        if block.skip is None:
            found = _ABSOLUTE.findall(block.code)
            assert not found, (f"{_name(doc)}: the block at line {block.line} names "
                               f"{found}; snippets run in a scratch directory, use relative paths")


@pytest.mark.parametrize("doc", DOCUMENTS, ids=_name)
def test_snippets_run(doc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runnable = [(b.line, b.code) for b in blocks(doc.read_text()) if b.skip is None]
    if not runnable:
        return
    monkeypatch.chdir(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _RUNNER, _name(doc)], input=json.dumps(runnable),
                          capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr + proc.stdout
