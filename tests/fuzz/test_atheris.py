"""The atheris target (scripts/fuzz_atheris.py) runs for a bounded time and finds nothing.

``BOXDISK_ATHERIS_SECONDS`` sets the time (default 45 s). Under CI the run is
seeded (``-seed=1``) so that, as far as libFuzzer's time-bounded run allows, a
red run reproduces. libFuzzer's own limits enforce the promises: 256 MiB of
RSS for the whole process (``-rss_limit_mb``) and a wall-clock hang limit
(``-timeout``); the target itself fails any call over 2 s of CPU time.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "fuzz_atheris.py"
HOSTILE = REPO / "tests" / "data" / "hostile"
SECONDS = int(os.environ.get("BOXDISK_ATHERIS_SECONDS", "45"))


def test_atheris_finds_nothing(tmp_path: Path) -> None:
    if importlib.util.find_spec("atheris") is None:
        pytest.fail("atheris is not installed: pip install -e '.[test]' (or '.[fuzz]')")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    args = [sys.executable, str(SCRIPT), f"-max_total_time={SECONDS}", "-rss_limit_mb=256",
            "-timeout=30", "-max_len=65536", f"-artifact_prefix={tmp_path}/",
            "-print_final_stats=1", str(corpus), str(HOSTILE)]
    if os.environ.get("CI"):
        args.insert(2, "-seed=1")
    env = {**os.environ, "BOXDISK_ATHERIS_DIR": str(tmp_path / "scratch")}
    proc = subprocess.run(args, capture_output=True, text=True, errors="replace",
                          timeout=SECONDS + 300, env=env, cwd=tmp_path, check=False)
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.split("-")[0] in
                     ("crash", "oom", "timeout", "leak", "slow-unit"))
    assert proc.returncode == 0 and not crashes, (
        f"atheris exited {proc.returncode}, inputs {crashes} in {tmp_path}:\n"
        + proc.stderr[-6000:])
    runs = re.search(r"stat::number_of_executed_units:\s*(\d+)", proc.stderr)
    assert runs is not None and int(runs.group(1)) > 0, proc.stderr[-2000:]
