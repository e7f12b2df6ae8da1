"""How a VM launcher embeds boxdisk: a box per VM, its disk handed to QEMU.

The launcher keeps a BoxStore; for each VM it creates a box over a shared
base and builds the ``qemu-system-x86_64`` command line with the box's live
disk as ``-drive file=…,format=qcow2``. QEMU follows the backing chain itself
(the store writes relative backing names with their formats, so QEMU never
probes). While QEMU runs, it holds QEMU's image locks on the disk, and the
store refuses anything that would replace the disk under it
(:class:`boxdisk.DiskInUseError`); once QEMU has exited, the box can be
snapshotted.

Where ``qemu-system-x86_64`` is installed, the example starts it with
``-nographic -no-reboot``, paused (``-S``: no guest code runs, so no kernel is
needed) and with a QMP socket, then asks QEMU which chain it opened and has
QEMU itself read the bytes boxdisk wrote. Elsewhere it prints the command line.

    python examples/vm_launcher.py [WORKDIR]
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import boxdisk

MiB = 1 << 20
PATTERN = 0x5A


def qemu_command(qemu: str, disk: Path, qmp: Path) -> list[str]:
    """The command line a launcher would run for this box's disk."""
    return [
        qemu, "-nographic", "-no-reboot",
        "-machine", "accel=kvm:tcg", "-m", "128",
        "-drive", f"file={disk},format=qcow2,if=virtio,cache=writeback",
        "-S",  # paused: this example only needs QEMU to open the disk
        "-qmp", f"unix:{qmp},server=on,wait=off",
        "-serial", "none", "-monitor", "none",
    ]


class Qmp:
    """The least QMP client that works: one command at a time, events skipped."""

    def __init__(self, path: Path, proc: subprocess.Popen[str], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._sock = socket.socket(socket.AF_UNIX)
                self._sock.settimeout(timeout)
                self._sock.connect(str(path))
                break
            except OSError:
                self._sock.close()
                if proc.poll() is not None:  # QEMU refused to start: say why
                    _out, err = proc.communicate()
                    msg = f"QEMU exited with status {proc.returncode}: {err.strip()}"
                    raise RuntimeError(msg) from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self._file = self._sock.makefile("rw", encoding="utf-8")
        self._file.readline()  # the greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run ``command``; its ``return`` value, or RuntimeError with QEMU's message."""
        self._file.write(json.dumps({"execute": command, "arguments": arguments}) + "\n")
        self._file.flush()
        while True:
            line = self._file.readline()
            if not line:
                msg = f"QEMU closed the QMP socket during {command}"
                raise RuntimeError(msg)
            reply = json.loads(line)
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                msg = f"{command}: {reply['error']['desc']}"
                raise RuntimeError(msg)

    def close(self) -> None:
        self._file.close()
        self._sock.close()


def chain_files(image: dict[str, Any]) -> list[Path]:
    """The files of a ``query-block`` image and its backing images, top first."""
    files = []
    node: dict[str, Any] | None = image
    while node is not None:
        files.append(Path(node["filename"]))
        node = node.get("backing-image")
    return files


def run_vm(store: boxdisk.BoxStore, box: boxdisk.Box, qemu: str) -> bool:
    """Start QEMU on the box's disk; True when QEMU opened the whole chain and read our bytes."""
    # A socket path must be short (108 bytes); the work directory may be deep.
    sockdir = Path(tempfile.mkdtemp(prefix="boxdisk-qmp-"))
    qmp_path = sockdir / "qmp.sock"
    cmd = qemu_command(qemu, box.disk, qmp_path)
    print("starting: " + " ".join(cmd))
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        qmp = Qmp(qmp_path, proc)
        try:
            [drive] = [b for b in qmp.execute("query-block") if b["device"] == "virtio0"]
            opened = chain_files(drive["inserted"]["image"])
            shown = [Path(os.path.normpath(p)).relative_to(store.root).as_posix() for p in opened]
            print(f"QEMU opened the chain {' -> '.join(shown)}")
            # QEMU reads the guest's view through the chain it opened (HMP's qemu-io;
            # QEMU 7 prints its result on QEMU's stdout, later versions on the monitor).
            out = qmp.execute("human-monitor-command", **{
                "command-line": f'qemu-io virtio0 "read -P {PATTERN:#x} 1M 64k"'})
            # While QEMU holds the disk, the store will not replace it.
            try:
                store.snapshot(box.id, "while-running")
                refused = False
            except boxdisk.DiskInUseError as exc:
                refused = True
                print(f"snapshot while QEMU runs: refused ({exc})")
            qmp.execute("quit")
        finally:
            qmp.close()
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(sockdir, ignore_errors=True)
    said = out + stdout
    read_ok = "read 65536/65536 bytes at offset 1048576" in said and "failed" not in said
    print(f"QEMU reads boxdisk's bytes at 1 MiB: {read_ok}")
    expected = [box.disk, *(Path(p) for p in boxdisk.read_backing_chain(box.disk))]
    same_chain = [p.resolve() for p in opened] == [p.resolve() for p in expected]
    if not (same_chain and read_ok):
        print(f"QEMU said: {said!r}; stderr: {stderr!r}")
    return same_chain and read_ok and refused


def main(workdir: Path) -> int:
    golden = workdir / "golden.qcow2"
    with boxdisk.create_disk(golden, persistent=True, size=512 * MiB):
        pass  # an empty qcow2 stands in for an OS image

    with boxdisk.BoxStore(workdir / "store") as store:
        store.add_base(golden, "golden", backing_format="qcow2")
        box = store.create_box("vm1", base="golden")
        with boxdisk.open_chain(box.disk, writable=True, allowed_roots=[store.root]) as chain:
            chain.write(1 * MiB, bytes([PATTERN]) * (64 * 1024))  # stands in for provisioning
            chain.flush()

        qemu = shutil.which("qemu-system-x86_64")
        if qemu is None:
            cmd = qemu_command("qemu-system-x86_64", box.disk, Path("/run/vm1.qmp"))
            print("qemu-system-x86_64 is not installed; the launcher would run:")
            print("  " + " ".join(cmd))
            return 0
        ok = run_vm(store, box, qemu)
        # QEMU is gone: the box can be snapshotted now.
        snap = store.snapshot("vm1", "after-boot")
        print(f"after QEMU exited: snapshot {snap.name!r} taken; QEMU check passed: {ok}")
        return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) > 1:
        sys.exit(main(Path(sys.argv[1])))
    with tempfile.TemporaryDirectory(prefix="boxdisk-vm-") as tmp:
        sys.exit(main(Path(tmp)))
