"""The crash-and-load run (benchmarks/stress.py), bounded for CI: zero losses, real kills.

Two processes, two rounds of 20 operations each, every worker killed at a
random moment (a seeded delay after a chosen operation starts) and half of
them also given a step boundary to die at. The figures it prints are checked
here; the full run (a larger size, its figures in docs/reliability.md) is
marked slow.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parents[2]


def _stress(tmp_path: Path, *args: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, REPO / "benchmarks" / "stress.py", "--json",
                           "--dir", tmp_path, *args],
                          capture_output=True, text=True, check=False, timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    figures: dict[str, Any] = json.loads(proc.stdout)
    assert figures["losses"] == 0
    assert list(tmp_path.iterdir()) == []  # the run cleans up after itself
    return figures


def test_stress_bounded(qemu: Any, tmp_path: Path) -> None:
    f = _stress(tmp_path, "--seed", "1", "--procs", "2", "--rounds", "2", "--ops", "20",
                "--random-kills", "1", "--step-kills", "0.5")
    assert f["processes"] == 4
    assert f["kills injected"] >= 2
    assert f["operations run"] >= 20
    assert f["images verified (qemu-img check)"] > 0
    assert f["bytes of guest data checked"] > 0


@pytest.mark.slow
def test_stress_full(qemu: Any, tmp_path: Path) -> None:
    f = _stress(tmp_path, "--seed", "7", "--procs", "4", "--rounds", "8", "--ops", "60")
    assert f["kills injected"] > 0
    assert f["recoveries"] > 0
