"""docs/logging.md lists every event boxdisk emits, with its logger, level and keys, and no other.

The sources are read, not imported: every ``log = get_logger(__name__)`` module's
``log.<level>("event", key=…)`` calls, its logger named by
:func:`boxdisk._log.logger_name`. The page's event tables sit under a heading
per logger (``### `boxdisk.store```); a row reads
``| `event` | level | `key`, `key` | meaning |``.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

from boxdisk._log import logger_name

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "boxdisk"
DOC = ROOT / "docs" / "logging.md"

# Logger method -> the level its records have.
LEVELS = {"debug": "debug", "info": "info", "warning": "warning", "error": "error",
          "exception": "error"}
_CALL = re.compile(r"\blog\.(?:debug|info|warning|error|exception)\(")

_HEADING = re.compile(r"^#{2,}\s+`(boxdisk(?:\.\w+)?)`\s*$")
_ROW = re.compile(r"^\|\s*`(?P<event>[a-z][a-z0-9_]*)`\s*\|\s*(?P<level>\w+)[^|]*\|"
                  r"(?P<keys>[^|]*)\|")
_LOGGER_ROW = re.compile(r"^\|\s*`(?P<logger>boxdisk\.\w+)`\s*\|(?P<where>[^|]*)\|")

# (logger, event) -> (level, keys)
Events = dict[tuple[str, str], tuple[str, frozenset[str]]]


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _logging_modules() -> dict[Path, str]:
    """Each module that makes a logger, and that logger's name."""
    found = {}
    for path in _sources():
        text = path.read_text()
        if "get_logger(" not in text or path.name == "_log.py":
            continue
        tree = ast.parse(text)
        made = [node for node in tree.body if isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Call)
                and getattr(node.value.func, "id", None) == "get_logger"]
        assert [ast.unparse(n) for n in made] == ["log = get_logger(__name__)"], (
            f"{path}: loggers are made once, at module level, as log = get_logger(__name__)")
        found[path] = logger_name(_module(path))
    return found


def _source_events() -> Events:
    levels: dict[tuple[str, str], set[str]] = defaultdict(set)
    keys: dict[tuple[str, str], set[str]] = defaultdict(set)
    for path, logger in _logging_modules().items():
        text = path.read_text()
        calls = 0
        for node in ast.walk(ast.parse(text)):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "log"
                    and node.func.attr in LEVELS):
                continue
            calls += 1
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            assert node.args and isinstance(node.args[0], ast.Constant) and isinstance(
                node.args[0].value, str), f"{where}: an event name is a string literal"
            assert len(node.args) == 1, f"{where}: key-values are keyword arguments"
            assert all(k.arg for k in node.keywords), f"{where}: keys are spelled out, no **"
            event = (logger, node.args[0].value)
            levels[event].add(LEVELS[node.func.attr])
            keys[event].update(k.arg for k in node.keywords if k.arg)
        # Every call the text shows was read (none hides behind another spelling).
        assert len(_CALL.findall(text)) == calls, f"{path}: a log call the scan missed"
    for event, found in levels.items():
        assert len(found) == 1, f"{event}: one event, one level (found {sorted(found)})"
    return {event: (levels[event].pop(), frozenset(keys[event])) for event in levels}


def _doc_tables() -> tuple[Events, dict[str, str]]:
    """The page's events by logger, and its loggers table (logger -> where from)."""
    events: Events = {}
    loggers: dict[str, str] = {}
    heading = None
    in_events = False
    for number, line in enumerate(DOC.read_text().splitlines(), start=1):
        if line.startswith("## "):
            in_events = line.strip() == "## Events"
            heading = None
        if m := _HEADING.match(line):
            heading = m[1]
            continue
        if (m := _LOGGER_ROW.match(line)) and not in_events:
            loggers[m["logger"]] = m["where"]
            continue
        if in_events and heading and (m := _ROW.match(line)):
            key = (heading, m["event"])
            assert key not in events, f"docs/logging.md:{number}: {key} listed twice"
            events[key] = (m["level"], frozenset(re.findall(r"`([a-z][a-z0-9_]*)`", m["keys"])))
    return events, loggers


def test_the_scan_finds_events() -> None:
    events = _source_events()
    assert ("boxdisk.qcow2", "disk_created") in events
    assert ("boxdisk.store", "box_created") in events
    assert events[("boxdisk.store", "operation_recovery_failed")][0] == "error"


def test_every_emitted_event_is_documented() -> None:
    documented, _ = _doc_tables()
    missing = sorted(set(_source_events()) - set(documented))
    assert not missing, f"events boxdisk emits that docs/logging.md does not list: {missing}"


def test_every_documented_event_is_emitted() -> None:
    documented, _ = _doc_tables()
    stale = sorted(set(documented) - set(_source_events()))
    assert not stale, f"events docs/logging.md lists that boxdisk does not emit: {stale}"


def test_levels_and_keys_match() -> None:
    documented, _ = _doc_tables()
    wrong = {event: {"source": found, "doc": documented[event]}
             for event, found in _source_events().items()
             if event in documented and documented[event] != found}
    assert not wrong, f"level or keys differ between boxdisk and docs/logging.md: {wrong}"


def test_every_logger_is_in_the_loggers_table() -> None:
    _, loggers = _doc_tables()
    for path, logger in _logging_modules().items():
        rel = path.relative_to(ROOT).as_posix()
        assert logger in loggers, f"{rel} logs to {logger}, missing from the loggers table"
        named = re.findall(r"`([^`]+)`", loggers[logger])
        assert any(rel == n or (n.endswith("/") and rel.startswith(n)) for n in named), (
            f"{rel} logs to {logger}, but the table says that comes from {named}")
    assert set(loggers) == set(_logging_modules().values()), "a logger no module uses is listed"
