"""Type checkers see boxdisk's real names (issue 12): a user's script, checked by
``mypy --strict`` from outside the repository against the installed package, is
clean when it uses the enum and string forms, and a misspelled name is an error.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

USER_SCRIPT = '''\
from pathlib import Path

import boxdisk
from boxdisk import BackingFormat, DiskFormat


def main(d: Path) -> None:
    boxdisk.create_disk(d / "base.qcow2", True, size=1 << 20).close()
    child = boxdisk.create_cow_child_disk(d / "base.qcow2", BackingFormat.QCOW2,
                                          str(d / "child.qcow2"), persistent=True)
    child.close()
    with boxdisk.open_chain(d / "child.qcow2", format=DiskFormat.QCOW2) as chain:
        data: bytes = chain.read(0, 512)
        chain.read_into(0, bytearray(512))
    boxdisk.rebase(d / "child.qcow2", d / "base.qcow2", backing_format=BackingFormat.QCOW2)
    boxdisk.rebase(str(d / "child.qcow2"), str(d / "base.qcow2"), backing_format="qcow2")
    boxdisk.convert(d / "child.qcow2", d / "out.raw", output_format=DiskFormat.RAW)
    store = boxdisk.BoxStore(d / "store")
    print(len(data), store, boxdisk.check(d / "child.qcow2"))
'''


def _mypy(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "user_script.py"
    script.write_text(source)
    # cwd outside the repository and no config file: mypy finds boxdisk the way a
    # user's project does, through the (editable) install and its py.typed marker.
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--config-file=", "--no-incremental",
         script.name],
        cwd=tmp_path, capture_output=True, text=True, check=False, timeout=300)


def test_a_user_script_with_enum_and_string_forms_is_strict_clean(tmp_path: Path) -> None:
    proc = _mypy(tmp_path, USER_SCRIPT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_misspelled_public_name_is_a_type_error(tmp_path: Path) -> None:
    proc = _mypy(tmp_path, 'import boxdisk\n\nstore = boxdisk.BoxStor("st")\n')
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert 'Module has no attribute "BoxStor"' in proc.stdout
