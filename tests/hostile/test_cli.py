"""The command line on every hostile image: an error message and an exit code, never a traceback.

One interpreter runs ``boxdisk.cli.main`` over every corpus image and command
(info, check, map, compare, convert, each in human and JSON output where it
has one) and reports any exception that escapes ``main``: the CLI turns every
BoxdiskError into ``boxdisk: error: ...`` and an exit code, so anything else
is a bug in the engine or the CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "tests" / "data" / "hostile"

_SWEEP = r"""
import contextlib, io, json, sys, traceback
from pathlib import Path
from boxdisk.cli import main
corpus, out = Path(sys.argv[1]), Path(sys.argv[2])
valid = corpus / "valid-base512.qcow2"
found = []
for image in sorted(corpus.iterdir()):
    if image.name.startswith("chain-"):
        continue
    f = str(image)
    commands = [
        ["info", f], ["info", "--output=json", f], ["info", "--backing-chain", f],
        ["check", f], ["check", "--output=json", f],
        ["map", f], ["map", "--output=json", f],
        ["compare", f, str(valid)],
        ["convert", "-O", "raw", f, str(out / "converted.raw")],
    ]
    for argv in commands:
        sink = io.StringIO()
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                code = main(argv)
            if not isinstance(code, int):
                found.append([argv, f"exit code {code!r}"])
        except SystemExit as exc:
            if exc.code not in (0, 1, 2, 3, 63):
                found.append([argv, f"SystemExit({exc.code!r})"])
        except BaseException:
            found.append([argv, traceback.format_exc()[-1500:]])
        for p in out.iterdir():
            p.unlink()
print(json.dumps(found))
"""


def test_cli_never_leaks_an_exception(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _SWEEP, str(CORPUS), str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found == [], "\n\n".join(f"boxdisk {' '.join(a)}:\n{e}" for a, e in found)
