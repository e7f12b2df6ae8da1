"""A real, paused QEMU serving images over QMP: what the live tests run against.

``qemu-system-x86_64 -machine none -S`` needs no guest kernel: it opens the
images, answers QMP, runs block jobs, and writes into its images when asked
through the monitor (``human-monitor-command`` running ``qemu-io``), which is
how the tests play a guest. Under CI a missing QEMU fails, it never skips.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from boxdisk.live import Qmp

QEMU_SYSTEM = shutil.which("qemu-system-x86_64")


def need_qemu_system() -> str:
    """The system emulator's path; skip (or, under CI, fail) without one."""
    if QEMU_SYSTEM is None:
        if os.environ.get("CI"):
            pytest.fail("qemu-system-x86_64 is missing under CI (scripts/test installs it)")
        pytest.skip("qemu-system-x86_64 not installed")
    return QEMU_SYSTEM


class Vm:
    """One QEMU process with ``drives`` (id -> image) opened as ``-blockdev`` or ``-drive``."""

    def __init__(self, workdir: Path, drives: dict[str, Path], *, style: str = "blockdev",
                 name: str = "vm") -> None:
        qemu = need_qemu_system()
        # QEMU serves one client per QMP socket: the test's own (``monitor``), and the one
        # the store is attached to (``qmp_path``), as a launcher would give boxdisk its own.
        self.monitor_path = workdir / f"{name}.monitor"
        self.qmp_path = workdir / f"{name}.qmp"
        cmd = [qemu, "-machine", "q35", "-nodefaults", "-display", "none", "-S",
               "-qmp", f"unix:{self.monitor_path},server=on,wait=off",
               "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        for drive_id, image in drives.items():
            # A guest's disk device on each (qdev id = the drive's id): the user QEMU
            # moves onto an overlay when it switches, and what the tests write through.
            if style == "blockdev":
                cmd += ["-blockdev", json.dumps({
                    "driver": "qcow2", "node-name": drive_id,
                    "file": {"driver": "file", "filename": os.fspath(image)}}),
                        "-device", f"virtio-blk-pci,drive={drive_id},id={drive_id}"]
            else:
                cmd += ["-drive", f"if=none,id={drive_id}-drive,file={image},format=qcow2",
                        "-device", f"virtio-blk-pci,drive={drive_id}-drive,id={drive_id}"]
        self.drives = dict(drives)
        # qemu-io run through the monitor prints to QEMU's stdout: unbuffered (stdbuf), read
        # by a thread, so each command's result can be checked when it returns.
        self.proc = subprocess.Popen(["stdbuf", "-o0", *cmd], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._out: list[str] = []
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 30
        while not (self.qmp_path.exists() and self.monitor_path.exists()):
            if self.proc.poll() is not None:
                _, err = self.proc.communicate()
                pytest.fail(f"QEMU exited at start ({self.proc.returncode}): {err}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail("QEMU's QMP socket did not appear within 30 s")
            time.sleep(0.01)
        self.qmp = Qmp(self.monitor_path)

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._out.append(line)

    def hmp(self, line: str) -> str:
        """Run a human-monitor command; its output."""
        out = self.qmp.execute("human-monitor-command", {"command-line": line})
        return str(out)

    def io(self, drive: str, command: str) -> str:
        """Run a qemu-io command in QEMU through the guest device ``drive``; fail on error."""
        mark = len(self._out)
        said = self.hmp(f'qemu-io -d /machine/peripheral/{drive}/virtio-backend "{command}"')
        deadline = time.monotonic() + 10
        verb = command.split(maxsplit=1)[0]
        done = {"write": "wrote ", "read": "read ", "discard": "discard ",
                "zero": "wrote "}.get(verb, "")
        while True:
            out = "".join(self._out[mark:])
            if any(x in out for x in ("failed", "error", "Error")) or said.strip():
                pytest.fail(f"qemu-io {drive} {command!r} in QEMU: {said}{out}")
            if not done or done in out:
                return out
            if time.monotonic() > deadline:
                pytest.fail(f"qemu-io {drive} {command!r}: no result within 10 s ({out!r})")
            time.sleep(0.002)

    def top_chain(self, drive: str) -> list[str]:
        """The files QEMU reports for a drive's chain, top first (``query-block``)."""
        for dev in self.qmp.execute("query-block"):
            inserted = dev.get("inserted") or {}
            if dev.get("qdev") == f"/machine/peripheral/{drive}/virtio-backend":
                return _chain(inserted.get("image", {}))
        pytest.fail(f"QEMU reports no device {drive}")

    def node_chain(self, node: str) -> list[str]:
        """The files of a node's chain, top first (``query-named-block-nodes``)."""
        nodes = {n["node-name"]: n for n in self.qmp.execute("query-named-block-nodes")}
        return _chain(nodes[node]["image"])

    def kill(self) -> None:
        """Stop QEMU at once."""
        if self.proc.poll() is None:
            self.proc.kill()
        if (qmp := getattr(self, "qmp", None)) is not None:  # not made yet if QEMU failed
            qmp.close()
        self.proc.wait()
        self._reader.join(timeout=5)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()

    def quit(self) -> None:
        """Ask QEMU to quit (it closes its images cleanly), then wait."""
        with contextlib.suppress(Exception):  # QEMU may close the socket before replying
            self.qmp.execute("quit")
        self.qmp.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
        self._reader.join(timeout=5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _chain(image: dict[str, Any]) -> list[str]:
    out = []
    while image:
        out.append(image["filename"])
        image = image.get("backing-image") or {}
    return out


def not_qmp_socket(path: Path) -> socket.socket:
    """A UNIX socket that accepts connections and says something that is not QMP."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(os.fspath(path))
    srv.listen(4)
    return srv


def writes(vm: Vm, drive: str, pattern: int, spans: Sequence[tuple[int, int]]) -> None:
    """Write ``pattern`` over each (offset, length) through QEMU, as a guest would."""
    for off, length in spans:
        vm.io(drive, f"write -P {pattern:#x} {off} {length}")


QEMU_STORAGE_DAEMON = shutil.which("qemu-storage-daemon")


class StorageDaemon:
    """``qemu-storage-daemon`` serving one image over NBD (a writable export), with QMP.

    What a runtime without a whole machine looks like: the block layer alone.
    Writes go through the export (``qemu-io`` on its NBD socket), so they reach
    whatever node QEMU has on top, as a guest's would.
    """

    def __init__(self, workdir: Path, image: Path, *, name: str = "qsd") -> None:
        if QEMU_STORAGE_DAEMON is None:
            if os.environ.get("CI"):
                pytest.fail("qemu-storage-daemon is missing under CI (qemu-system-common)")
            pytest.skip("qemu-storage-daemon not installed")
        self.qmp_path = workdir / f"{name}.qmp"
        self.nbd_path = workdir / f"{name}.nbd"
        cmd = [QEMU_STORAGE_DAEMON,
               "--blockdev", json.dumps({"driver": "qcow2", "node-name": "disk0", "file": {
                   "driver": "file", "filename": os.fspath(image)}}),
               "--nbd-server", f"addr.type=unix,addr.path={self.nbd_path}",
               "--export", "type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on",
               "--chardev", f"socket,id=qmp0,path={self.qmp_path},server=on,wait=off",
               "--monitor", "chardev=qmp0"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not (self.qmp_path.exists() and self.nbd_path.exists()):
            if self.proc.poll() is not None:
                _, err = self.proc.communicate()
                pytest.fail(f"qemu-storage-daemon exited at start: {err}")
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail("qemu-storage-daemon did not start within 30 s")
            time.sleep(0.01)

    def io(self, command: str) -> str:
        """A qemu-io command through the NBD export (as a guest's I/O)."""
        proc = subprocess.run(["qemu-io", "-f", "raw", "-c", command,
                               f"nbd+unix:///disk0?socket={self.nbd_path}"],
                              capture_output=True, text=True, check=False, timeout=60)
        out = proc.stdout + proc.stderr
        if proc.returncode != 0 or "failed" in out.lower():
            pytest.fail(f"qemu-io {command!r} via NBD: {out}")
        return out

    def stop(self) -> None:
        """Quit the daemon (it closes its images cleanly)."""
        if self.proc.poll() is None:
            with contextlib.suppress(Exception), Qmp(self.qmp_path) as q:
                q.execute("quit")
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()
