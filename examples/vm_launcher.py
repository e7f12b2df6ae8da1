"""How a VM launcher embeds boxdisk: a box per VM, its disk handed to QEMU.

The launcher keeps a BoxStore; for each VM it creates a box over a shared
base and builds the ``qemu-system-x86_64`` command line with the box's live
disk as ``-drive file=…,format=qcow2``. QEMU follows the backing chain itself
(the store writes relative backing names with their formats, so QEMU never
probes). Once QEMU runs, the launcher attaches the box to QEMU's QMP socket
(``BoxStore.attach``): snapshots are then taken live, QEMU itself switching
onto a new top, and ``detach`` after QEMU has exited gives the box its usual
layout back. QMP goes through :mod:`boxdisk.live` (QEMU's ``qemu.qmp``).

Where ``qemu-system-x86_64`` is installed, the example starts it with
``-nographic -no-reboot``, paused (``-S``: no guest code runs, so no kernel is
needed) and with two QMP sockets, asks QEMU which chain it opened, has QEMU
read the bytes boxdisk wrote, snapshots the box live and has QEMU write after
the snapshot. Elsewhere it prints the command line.

    python examples/vm_launcher.py [WORKDIR]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import boxdisk
from boxdisk.live import Qmp, node_file

MiB = 1 << 20
PATTERN = 0x5A


def qemu_command(qemu: str, disk: Path, qmp: Path, boxdisk_qmp: Path) -> list[str]:
    """The command line a launcher would run for this box's disk.

    Two QMP sockets: QEMU serves one client per socket, and the store needs its
    own to act on the running box (any process: the attachment is in the store).
    """
    return [
        qemu, "-nographic", "-no-reboot",
        "-machine", "accel=kvm:tcg", "-m", "128",
        "-drive", f"file={disk},format=qcow2,if=virtio,cache=writeback",
        "-S",  # paused: this example only needs QEMU to open the disk
        "-qmp", f"unix:{qmp},server=on,wait=off",
        "-qmp", f"unix:{boxdisk_qmp},server=on,wait=off",
        "-serial", "none", "-monitor", "none",
    ]


def connect(path: Path, proc: subprocess.Popen[str], timeout: float = 30.0) -> Qmp:
    """boxdisk's QMP client (QEMU's own ``qemu.qmp`` underneath), once QEMU listens."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return Qmp(path)
        except boxdisk.QmpConnectError:
            if proc.poll() is not None:  # QEMU refused to start: say why
                _out, err = proc.communicate()
                msg = f"QEMU exited with status {proc.returncode}: {err.strip()}"
                raise RuntimeError(msg) from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def chain_files(image: dict[str, Any]) -> list[Path]:
    """The files of a ``query-block`` image and its backing images, top first."""
    files = []
    node: dict[str, Any] | None = image
    while node is not None:
        files.append(Path(node_file(node["filename"]) or node["filename"]))
        node = node.get("backing-image")
    return files


def run_vm(store: boxdisk.BoxStore, box: boxdisk.Box, qemu: str) -> bool:
    """Start QEMU on the box's disk, snapshot it live; True when every check held."""
    # A socket path must be short (108 bytes); the work directory may be deep.
    sockdir = Path(tempfile.mkdtemp(prefix="boxdisk-qmp-"))
    qmp_path, store_qmp = sockdir / "qmp.sock", sockdir / "boxdisk.sock"
    cmd = qemu_command(qemu, box.disk, qmp_path, store_qmp)
    expected = [box.disk, *(Path(p) for p in boxdisk.read_backing_chain(box.disk))]
    print("starting: " + " ".join(cmd))
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        with connect(qmp_path, proc) as qmp:
            [drive] = [b for b in qmp.execute("query-block") if b["device"] == "virtio0"]
            opened = chain_files(drive["inserted"]["image"])
            shown = [Path(os.path.normpath(p)).relative_to(store.root).as_posix() for p in opened]
            print(f"QEMU opened the chain {' -> '.join(shown)}")
            # QEMU reads the guest's view through the chain it opened (HMP's qemu-io;
            # QEMU 7 prints its result on QEMU's stdout, later versions on the monitor).
            out = qmp.execute("human-monitor-command", {
                "command-line": f'qemu-io virtio0 "read -P {PATTERN:#x} 1M 64k"'})
            # Tell the store which QEMU runs the box: snapshots are taken live from now on.
            connect(store_qmp, proc).close()  # QEMU listens on the store's socket too
            store.attach(box.id, store_qmp)
            snap = store.snapshot(box.id, "while-running")
            top = chain_files(next(b for b in qmp.execute("query-block")
                                   if b["device"] == "virtio0")["inserted"]["image"])[0]
            live = top.resolve() == store.box(box.id).disk.resolve()
            print(f"live snapshot {snap.name!r} taken; QEMU now writes "
                  f"{top.relative_to(store.root).as_posix()}: {live}")
            # QEMU writes after the snapshot: the snapshot must not see them.
            out += qmp.execute("human-monitor-command", {
                "command-line": 'qemu-io virtio0 "write -P 0x77 1M 4k"'})
            qmp.execute("quit")
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(sockdir, ignore_errors=True)
    store.detach(box.id)  # the VM has stopped: the box gets its usual layout back
    said = out + stdout
    read_ok = "read 65536/65536 bytes at offset 1048576" in said and "failed" not in said
    print(f"QEMU reads boxdisk's bytes at 1 MiB: {read_ok}")
    same_chain = [p.resolve() for p in opened] == [p.resolve() for p in expected]
    with boxdisk.open_chain(store.snapshot_info(box.id, "while-running").disk,
                            allowed_roots=[store.root]) as chain:
        frozen = chain.read(1 * MiB, 4096) == bytes([PATTERN]) * 4096
    with boxdisk.open_chain(store.box(box.id).disk, allowed_roots=[store.root]) as chain:
        written = chain.read(1 * MiB, 4096) == b"\x77" * 4096
    print(f"the snapshot kept the state before QEMU's write: {frozen}; the box has it: {written}")
    if not (same_chain and read_ok):
        print(f"QEMU said: {said!r}; stderr: {stderr!r}")
    return same_chain and read_ok and live and frozen and written


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
            cmd = qemu_command("qemu-system-x86_64", box.disk, Path("/run/vm1.qmp"),
                               Path("/run/vm1.boxdisk.qmp"))
            print("qemu-system-x86_64 is not installed; the launcher would run:")
            print("  " + " ".join(cmd))
            return 0
        ok = run_vm(store, box, qemu)
        # QEMU is gone: the box is snapshotted offline again.
        snap = store.snapshot("vm1", "after-boot")
        print(f"after QEMU exited: snapshot {snap.name!r} taken; QEMU check passed: {ok}")
        return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) > 1:
        sys.exit(main(Path(sys.argv[1])))
    with tempfile.TemporaryDirectory(prefix="boxdisk-vm-") as tmp:
        sys.exit(main(Path(tmp)))
