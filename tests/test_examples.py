"""Every program in examples/ runs to success, and so does ``boxdisk demo`` (both entry points)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def test_there_are_examples() -> None:
    assert EXAMPLES


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(example: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(example), str(tmp_path)], capture_output=True,
                          text=True, check=False, timeout=300)
    assert proc.returncode == 0, f"{example.name} failed:\n{proc.stdout}\n{proc.stderr}"
    if example.name == "vm_launcher.py" and (os.environ.get("CI") or
                                            shutil.which("qemu-system-x86_64")):
        # The test command installs qemu-system-x86; in CI the QEMU part must run.
        assert "QEMU opened the chain" in proc.stdout, proc.stdout
        assert "QEMU check passed: True" in proc.stdout, proc.stdout


def test_demo_via_python_m(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "boxdisk", "demo"], capture_output=True,
                          text=True, check=False, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "demo passed" in proc.stdout
    assert list(tmp_path.iterdir()) == [], "the demo must clean up after itself"


def test_demo_via_console_script(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "boxdisk"
    assert script.exists(), "the boxdisk console script is not installed in this environment"
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run([str(script), "demo"], capture_output=True, text=True, check=False,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []
