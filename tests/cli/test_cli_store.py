"""``boxdisk store …`` end to end, through the console script, judged by qemu-io and qemu-img."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.cli.test_cli_image import BOXDISK
from tests.conftest import Qemu

MiB = 1 << 20


def store(root: Path, *args: str | os.PathLike[str], output: str | None = None,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = [BOXDISK, "store", "--root", str(root)]
    if output:
        argv.append(f"--output={output}")
    return subprocess.run([*argv, *map(os.fspath, args)], capture_output=True, text=True,
                          check=False, timeout=300, env=env)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture
def root(qemu: Qemu, tmp_path: Path) -> Path:
    r = tmp_path / "store"
    ok(store(r, "init"))
    base = tmp_path / "base.raw"
    qemu.img("create", "-q", "-f", "raw", base, "32M")
    qemu.write(base, ["write -P 0x11 0 32M"], fmt="raw")
    ok(store(r, "base", "add", "-F", "raw", base, "os"))
    return r


def test_box_snapshot_clone_restore_export(qemu: Qemu, root: Path, tmp_path: Path) -> None:
    disk = root / ok(store(root, "box", "create", "--base", "os", "vm1")).strip()
    assert disk == root / "boxes" / "vm1" / "disk.qcow2"
    qemu.write(disk, ["write -P 0xa1 1M 64k"])
    ok(store(root, "snapshot", "create", "vm1", "s1"))
    qemu.write(disk, ["write -P 0xa2 1M 64k"])
    ok(store(root, "clone", "vm1", "vm2"))
    vm2 = root / "boxes" / "vm2" / "disk.qcow2"
    qemu.io("-c", "read -P 0xa2 1M 64k", vm2)
    qemu.write(vm2, ["write -P 0xb2 1M 64k"])
    ok(store(root, "snapshot", "restore", "vm1", "s1"))
    qemu.io("-c", "read -P 0xa1 1M 64k", "-c", "read -P 0x11 0 1M", disk)
    qemu.io("-c", "read -P 0xb2 1M 64k", vm2)

    listed = json.loads(ok(store(root, "box", "ls", output="json")))
    assert [b["id"] for b in listed] == ["vm1", "vm2"]
    shown = json.loads(ok(store(root, "box", "show", "vm2", output="json")))
    assert (shown["clone-of"], shown["base"], shown["virtual-size"]) == ("vm1", "os", 32 * MiB)
    snaps = json.loads(ok(store(root, "snapshot", "ls", "vm1", output="json")))
    assert [s["name"] for s in snaps] == ["s1"]
    assert "s1" in ok(store(root, "snapshot", "ls", "vm1"))

    out = tmp_path / "vm2.qcow2"
    ok(store(root, "export", "vm2", out))
    qemu.assert_clean(out)
    assert "backing-filename" not in qemu.info(out)
    qemu.img("compare", vm2, out)
    assert store(root, "export", "vm2", out).returncode == 1  # never overwritten silently
    ok(store(root, "export", "--overwrite", "--snapshot", "s1", "vm1", out))
    qemu.io("-c", "read -P 0xa1 1M 64k", out)

    verify = json.loads(ok(store(root, "verify", output="json")))
    assert verify["ok"] and verify["boxes"] == 2


def test_several_boxes_are_created_in_one_operation(qemu: Qemu, root: Path) -> None:
    paths = ok(store(root, "box", "create", "--base", "os", "p1", "p2", "p3")).split()
    assert paths == [f"boxes/p{i}/disk.qcow2" for i in (1, 2, 3)]
    for p in paths:
        qemu.io("-c", "read -P 0x11 0 1M", root / p)  # the base's data shows through
    listed = json.loads(ok(store(root, "box", "create", "--base", "os", "q1", "q2",
                                 output="json")))
    assert [b["id"] for b in listed] == ["q1", "q2"]
    proc = store(root, "box", "create", "--base", "os", "r1", "p2")
    assert proc.returncode == 1 and "'p2'" in proc.stderr  # refused whole
    assert "r1" not in ok(store(root, "box", "ls"))


def test_removal_guard_from_the_command_line(qemu: Qemu, root: Path) -> None:
    ok(store(root, "box", "create", "--base", "os", "vm1"))
    disk = root / "boxes" / "vm1" / "disk.qcow2"
    qemu.write(disk, ["write -P 0x42 0 64k"])
    ok(store(root, "snapshot", "create", "vm1", "s1"))
    proc = store(root, "snapshot", "rm", "vm1", "s1")
    assert proc.returncode == 1
    assert proc.stderr.startswith("boxdisk: error: ")
    assert "depended on by" in proc.stderr and "boxes/vm1/disk.qcow2" in proc.stderr
    before = qemu.read_raw(disk, root.parent)
    ok(store(root, "snapshot", "rm", "--merge", "vm1", "s1"))
    assert qemu.read_raw(disk, root.parent) == before
    assert json.loads(ok(store(root, "snapshot", "ls", "vm1", output="json"))) == []
    ok(store(root, "box", "rm", "vm1"))
    assert not (root / "boxes" / "vm1").exists()


def test_graph_tree_dot_json(qemu: Qemu, root: Path) -> None:
    ok(store(root, "box", "create", "--base", "os", "vm1"))
    ok(store(root, "snapshot", "create", "vm1", "s1"))
    ok(store(root, "clone", "vm1", "vm2"))
    tree = ok(store(root, "graph")).splitlines()
    assert tree[0] == "base os"
    assert tree[1] == "└── snapshot vm1/s1"
    assert tree[2].startswith("    └── clone base ") and tree[2].endswith("(vm1 -> vm2)")
    assert tree[3:] == ["        ├── box vm1", "        └── box vm2"]
    dot = ok(store(root, "graph", "--format=dot"))
    assert dot.startswith("digraph boxdisk {") and '"boxes/vm1/disk.qcow2" -> ' in dot
    nodes = json.loads(ok(store(root, "graph", "--format=json")))
    labels = {n["label"] for n in nodes}
    assert {"base os", "snapshot vm1/s1", "box vm1", "box vm2"} <= labels


def test_root_from_environment_and_bad_names(qemu: Qemu, tmp_path: Path) -> None:
    env = {**os.environ, "BOXDISK_ROOT": str(tmp_path / "envstore")}
    proc = subprocess.run([BOXDISK, "store", "box", "create", "--size", "16M", "vm"],
                          capture_output=True, text=True, check=False, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "envstore" / "boxes" / "vm" / "disk.qcow2").is_file()
    qemu.assert_clean(tmp_path / "envstore" / "boxes" / "vm" / "disk.qcow2")
    for bad in ("../escape", ".hidden", "a/b"):
        proc = subprocess.run([BOXDISK, "store", "box", "create", "--size", "1M", bad],
                              capture_output=True, text=True, check=False, env=env)
        assert proc.returncode == 1
        assert proc.stderr.startswith("boxdisk: error:")
    proc = subprocess.run([BOXDISK, "store", "box", "show", "nope"], capture_output=True,
                          text=True, check=False, env=env)
    assert proc.returncode == 1 and "nope" in proc.stderr


def test_import_and_gc(qemu: Qemu, root: Path, tmp_path: Path) -> None:
    img = tmp_path / "standalone.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", img, "8M")
    qemu.write(img, ["write -P 0x77 0 1M"])
    ok(store(root, "import", "imported", img))
    qemu.io("-c", "read -P 0x77 0 1M", root / "boxes" / "imported" / "disk.qcow2")
    report = json.loads(ok(store(root, "gc", "--dry-run", output="json")))
    assert report["dry-run"] is True
    ok(store(root, "gc"))
