"""A library that never prints (issue 12, item 1): subprocesses with real images.

With logging and structlog unconfigured a script using boxdisk prints exactly
its own output on stdout and nothing on stderr, a closed stdout fails nothing,
``logging.basicConfig(level=DEBUG)`` shows boxdisk's events with their keys, and
structlog's global configuration is left as it was. A disabled event builds no
record.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from boxdisk._log import get_logger

pytestmark = pytest.mark.qemu

SCRIPT = r"""
import os, sys
import boxdisk
OUT = sys.stdout
{setup}
root = sys.argv[1]
MiB = 1 << 20
base = boxdisk.create_disk(os.path.join(root, "base.qcow2"), True, size=4 * MiB)
child = boxdisk.create_cow_child_disk(base.path, "qcow2", os.path.join(root, "child.qcow2"),
                                      persistent=True)
with boxdisk.open_chain(child.path, writable=True) as chain:
    chain.write(0, b"x" * 65536)
with boxdisk.open_chain(child.path) as chain:
    assert chain.read(0, 4) == b"xxxx"
assert boxdisk.check(child.path).corruptions == 0
boxdisk.flatten(child.path, os.path.join(root, "flat.qcow2"))
boxdisk.rebase(child.path, None)
with boxdisk.BoxStore(os.path.join(root, "store")) as store:
    store.add_base(base.path, "base", backing_format="qcow2")
    store.create_box("vm1", base="base")
    store.snapshot("vm1", "s1")
    store.clone_box("vm1", "vm2")
    store.export_box("vm2", os.path.join(root, "vm2.qcow2"))
    store.remove_box("vm2")
ephemeral = boxdisk.create_disk(os.path.join(root, "scratch.qcow2"), False, size=MiB)
ephemeral.close()
print("script-done", file=OUT)
"""

STRUCTLOG_CHECK = r"""
import structlog
before = structlog.get_config()
{body}
assert structlog.get_config() == before, "boxdisk changed structlog's configuration"
assert not structlog.is_configured()
"""


def _run(tmp: Path, setup: str = "", *, stdout: int | None = subprocess.PIPE
         ) -> subprocess.CompletedProcess[str]:
    body = SCRIPT.format(setup=setup)
    code = STRUCTLOG_CHECK.format(body=body)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOXDISK")}
    return subprocess.run([sys.executable, "-c", code, str(tmp)], stdout=stdout,
                          stderr=subprocess.PIPE, text=True, env=env, check=False, timeout=120)


def test_unconfigured_prints_only_the_scripts_own_output(tmp_path: Path) -> None:
    out = _run(tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "script-done\n"
    assert out.stderr == ""


def test_a_closed_stdout_fails_no_operation(tmp_path: Path) -> None:
    """``python app.py | true``: the pipe's reader is gone before anything is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        # boxdisk's events go to the dead stdout; the script reports on stderr.
        out = _run(tmp_path, "import logging; logging.basicConfig(stream=sys.stdout, "
                   "level=logging.DEBUG)\nOUT = sys.stderr", stdout=write_end)
    finally:
        os.close(write_end)
    assert out.returncode == 0, out.stderr
    assert "script-done" in out.stderr


def test_a_broken_log_stream_fails_no_operation(tmp_path: Path) -> None:
    setup = ("import logging\nclass Broken(logging.Handler):\n"
             "    def emit(self, record): raise BrokenPipeError(32, 'Broken pipe')\n"
             "    def handleError(self, record): raise\n"
             "bd = logging.getLogger('boxdisk'); bd.addHandler(Broken()); bd.setLevel(0)\n"
             "bd.propagate = False")
    out = _run(tmp_path, setup)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "script-done\n"


def test_debug_logging_shows_the_events_with_their_keys(tmp_path: Path) -> None:
    out = _run(tmp_path, "import logging; logging.basicConfig(level=logging.DEBUG)")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "script-done\n"
    assert "boxdisk.qcow2:disk_created" in out.stderr
    assert "path=" in out.stderr and "size=" in out.stderr
    assert "boxdisk.store:" in out.stderr


def test_cli_verbose_logs_to_stderr_and_keeps_json_clean(qemu: object, tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    subprocess.run([sys.executable, "-m", "boxdisk", "create", str(img), "1M"], check=True,
                   capture_output=True)
    out = subprocess.run([sys.executable, "-m", "boxdisk", "-vv", "check", "--output=json",
                          str(img)], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["format"] == "qcow2"
    assert "boxdisk.ops image_checked" in out.stderr
    quiet = subprocess.run([sys.executable, "-m", "boxdisk", "check", "--output=json",
                            str(img)], capture_output=True, text=True, check=True)
    assert quiet.stderr == ""


def test_a_disabled_event_builds_no_record(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[logging.LogRecord] = []
    factory = logging.getLogRecordFactory()

    def spy(*args: object, **kwargs: object) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        made.append(record)
        return record

    monkeypatch.setattr(logging, "_logRecordFactory", spy)
    logger = logging.getLogger("boxdisk.qcow2")
    monkeypatch.setattr(logger, "level", logging.WARNING)
    get_logger("boxdisk.qcow2").debug("quiet_event", path="/x", size=1)
    get_logger("boxdisk.qcow2").info("quiet_event", path="/x", size=1)
    assert not [r for r in made if getattr(r, "event", None) == "quiet_event"]
