"""boxdisk.live against a real QEMU: the QMP connection, node discovery, the switch, block jobs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from boxdisk import (
    BlockJobError,
    LiveError,
    QmpCommandError,
    QmpConnectError,
    QmpProtocolError,
    create_cow_child_disk,
    create_disk,
)
from boxdisk.live import (
    Qmp,
    add_and_switch,
    add_overlay,
    find_nodes,
    frozen_guest,
    node_file,
    remove_node,
    run_job,
    switch_to_existing,
    switch_to_overlays,
    top_files,
)

from .vm import Vm, not_qmp_socket, writes

MiB = 1 << 20


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def chain(tmp_path: Path) -> dict[str, Path]:
    """base.qcow2 <- top.qcow2 and base.qcow2 <- guest.qcow2 (relative names), 16 MiB each."""
    base = tmp_path / "base.qcow2"
    with create_disk(base, True, size=16 * MiB):
        pass
    out = {"base": base}
    for name in ("top", "guest"):
        with create_cow_child_disk(base, "qcow2", tmp_path / f"{name}.qcow2",
                                   persistent=True, relative=True):
            pass
        out[name] = tmp_path / f"{name}.qcow2"
    return out


def _overlay(over: Path, path: Path) -> Path:
    with create_cow_child_disk(over, "qcow2", path, persistent=True, relative=True):
        pass
    return path


# -- the connection ----------------------------------------------------------------------


def test_commands_answer_and_errors_carry_qemus_text(tmp_path: Path,
                                                     chain: dict[str, Path]) -> None:
    vm = Vm(tmp_path, {"d0": chain["top"]})
    try:
        assert "qemu" in vm.qmp.execute("query-version")
        with pytest.raises(QmpCommandError) as err:
            vm.qmp.execute("blockdev-del", {"node-name": "no-such-node"})
        assert "no-such-node" in err.value.message  # QEMU's own words
        assert err.value.field == "blockdev-del"
        assert err.value.value == "GenericError"
        assert err.value.path == os.fspath(vm.monitor_path)
    finally:
        vm.quit()


def test_a_missing_or_refusing_socket_is_a_connect_error(tmp_path: Path) -> None:
    with pytest.raises(QmpConnectError):
        Qmp(tmp_path / "nothing.sock")
    dead = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(os.fspath(dead))
    s.close()  # the name stays, nobody listens: ECONNREFUSED
    with pytest.raises(QmpConnectError) as err:
        Qmp(dead)
    assert isinstance(err.value, ConnectionError)


def _serve(srv: socket.socket, reply: bytes | None) -> threading.Thread:
    def run() -> None:
        conn, _ = srv.accept()
        with conn:
            if reply is not None:
                conn.sendall(reply)
            time.sleep(1.5)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("reply", [b"SSH-2.0-OpenSSH_9.2\r\n", b'{"hello": 1}\n', None],
                         ids=["ssh-banner", "other-json", "silent"])
def test_a_socket_that_is_not_qmp_is_refused_in_bounded_time(tmp_path: Path,
                                                             reply: bytes | None) -> None:
    path = tmp_path / "other.sock"
    srv = not_qmp_socket(path)
    try:
        t = _serve(srv, reply)
        start = time.monotonic()
        with pytest.raises(QmpProtocolError):
            Qmp(path, timeout=0.5)
        assert time.monotonic() - start < 5
        t.join()
    finally:
        srv.close()


# -- finding nodes -------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["blockdev", "drive"])
def test_nodes_are_found_by_their_files(tmp_path: Path, chain: dict[str, Path],
                                        style: str) -> None:
    vm = Vm(tmp_path, {"d0": chain["top"], "d1": chain["guest"]}, style=style)
    try:
        # Through a symbolic link, too: matched by file identity.
        link = tmp_path / "link.qcow2"
        link.symlink_to(chain["top"])
        nodes = find_nodes(vm.qmp, [chain["top"], chain["guest"], link, chain["base"],
                                    tmp_path / "absent.qcow2"])
        assert set(nodes) == {os.fspath(p) for p in (chain["top"], chain["guest"], link,
                                                     chain["base"])}
        top = nodes[os.fspath(chain["top"])]
        assert not top.read_only and top.driver == "qcow2"
        assert nodes[os.fspath(chain["base"])].read_only  # a backing node
        if style == "blockdev":
            assert top.name == "d0"
        assert sorted(top_files(vm.qmp).values()) == sorted(
            os.fspath(p) for p in (chain["top"], chain["guest"]))
    finally:
        vm.quit()


def test_node_file_reads_qemus_json_filenames() -> None:
    assert node_file("/a/b.qcow2") == "/a/b.qcow2"
    assert node_file('json:{"driver": "qcow2", "file": {"driver": "file", '
                     '"filename": "/x/o.qcow2"}}') == "/x/o.qcow2"
    assert node_file('json:{"driver": "qcow2", "file": {"driver": "nbd"}}') is None
    assert node_file("json:{not json") is None


# -- the switch ----------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["blockdev", "drive"])
def test_a_switch_freezes_both_tops_at_once_and_qemu_writes_only_the_overlays(
        tmp_path: Path, chain: dict[str, Path], qemu: object, style: str) -> None:
    vm = Vm(tmp_path, {"d0": chain["top"], "d1": chain["guest"]}, style=style)
    try:
        writes(vm, "d0", 0x11, [(0, 64 << 10), (3 * MiB, 4096)])
        writes(vm, "d1", 0x22, [(MiB, 64 << 10)])
        vm.qmp.execute("human-monitor-command", {"command-line": "commit all"})
        nodes = find_nodes(vm.qmp, [chain["top"], chain["guest"]])
        ov0 = _overlay(chain["top"], tmp_path / "top.1.qcow2")
        ov1 = _overlay(chain["guest"], tmp_path / "guest.1.qcow2")
        add_overlay(vm.qmp, "ov0", ov0)
        add_overlay(vm.qmp, "ov1", ov1)
        switch_to_overlays(vm.qmp, [(nodes[os.fspath(chain["top"])].name, "ov0"),
                                    (nodes[os.fspath(chain["guest"])].name, "ov1")])
        frozen = {p: _sha(p) for p in (chain["top"], chain["guest"])}
        writes(vm, "d0", 0x33, [(0, 4096), (8 * MiB, 64 << 10)])
        writes(vm, "d1", 0x44, [(MiB, 4096)])
        vm.io("d0", "read -P 0x11 4096 61440")  # the frozen layer still shows through
        vm.io("d0", "read -P 0x33 0 4096")
        assert vm.top_chain("d0")[1:] == [os.fspath(chain["top"]), os.fspath(chain["base"])]
        assert node_file(vm.top_chain("d0")[0]) == os.fspath(ov0)
        assert {p: _sha(p) for p in frozen} == frozen
    finally:
        vm.quit()
    for p in (chain["top"], chain["guest"], ov0, ov1, chain["base"]):
        qemu.assert_clean(p)  # type: ignore[attr-defined]
    assert {p: _sha(p) for p in frozen} == frozen
    qemu.io("-r", "-c", "read -P 0x33 0 4096", "-c", "read -P 0x11 4096 61440",  # type: ignore[attr-defined]
            "-c", "read -P 0x33 8M 64k", ov0)
    qemu.io("-r", "-c", "read -P 0x11 0 4096", chain["top"])  # type: ignore[attr-defined]


def test_a_refused_switch_changes_nothing(tmp_path: Path, chain: dict[str, Path]) -> None:
    vm = Vm(tmp_path, {"d0": chain["top"], "d1": chain["guest"]})
    try:
        ov0 = _overlay(chain["top"], tmp_path / "top.1.qcow2")
        add_overlay(vm.qmp, "ov0", ov0)
        with pytest.raises(QmpCommandError) as err:
            # The second action names a node that does not exist: neither switches.
            switch_to_overlays(vm.qmp, [("d0", "ov0"), ("d1", "no-such-overlay")])
        assert "no-such-overlay" in err.value.message
        assert vm.top_chain("d0") == [os.fspath(chain["top"]), os.fspath(chain["base"])]
        remove_node(vm.qmp, "ov0")
        remove_node(vm.qmp, "ov0")  # already gone: fine
        assert "ov0" not in {n["node-name"] for n in
                             vm.qmp.execute("query-named-block-nodes", {"flat": True})}
    finally:
        vm.quit()


# -- block jobs ----------------------------------------------------------------------------


def _switched(tmp_path: Path, chain: dict[str, Path]) -> tuple[Vm, Path]:
    vm = Vm(tmp_path, {"d0": chain["top"]})
    writes(vm, "d0", 0x11, [(0, MiB)])
    ov = _overlay(chain["top"], tmp_path / "top.1.qcow2")
    add_overlay(vm.qmp, "ov", ov)
    switch_to_overlays(vm.qmp, [("d0", "ov")])
    writes(vm, "d0", 0x22, [(2 * MiB, MiB)])
    vm.io("d0", "flush")  # as a guest does before it counts on its data
    return vm, ov


def test_an_active_commit_merges_the_overlay_back_and_reports_progress(
        tmp_path: Path, chain: dict[str, Path], qemu: object) -> None:
    vm, _ = _switched(tmp_path, chain)
    seen: list[tuple[int, int]] = []
    try:
        run_job(vm.qmp, "block-commit", {"device": "ov", "top-node": "ov", "base-node": "d0"},
                job_id="commit1", progress=lambda done, total: seen.append((done, total)))
        # QEMU is back on the committed-into image, which holds both writes.
        assert vm.top_chain("d0")[0] == os.fspath(chain["top"])
        vm.io("d0", "read -P 0x22 2M 1M")
        assert seen and seen[-1][0] == seen[-1][1] > 0
        assert vm.qmp.execute("query-jobs") == []  # dismissed
    finally:
        vm.quit()
    qemu.assert_clean(chain["top"])  # type: ignore[attr-defined]
    qemu.io("-r", "-c", "read -P 0x11 0 1M", "-c", "read -P 0x22 2M 1M",  # type: ignore[attr-defined]
            chain["top"])


def test_a_stream_copies_the_backing_layer_up(tmp_path: Path, chain: dict[str, Path],
                                              qemu: object) -> None:
    vm, ov = _switched(tmp_path, chain)
    try:
        # The base was opened through top.qcow2's header: QEMU named its node itself.
        base_node = find_nodes(vm.qmp, [chain["base"]])[os.fspath(chain["base"])].name
        run_job(vm.qmp, "block-stream", {"device": "ov", "base-node": base_node,
                                         "backing-file": "base.qcow2"}, job_id="stream1")
        got = vm.top_chain("d0")
        assert [node_file(got[0]), *got[1:]] == [os.fspath(ov), os.fspath(chain["base"])]
        vm.io("d0", "read -P 0x11 0 1M")
    finally:
        vm.quit()
    qemu.assert_clean(ov)  # type: ignore[attr-defined]
    assert qemu.info(ov)["backing-filename"] == "base.qcow2"  # type: ignore[attr-defined]
    qemu.io("-r", "-c", "read -P 0x11 0 1M", "-c", "read -P 0x22 2M 1M", ov)  # type: ignore[attr-defined]


def test_a_job_is_cancelled_when_the_caller_fails_and_on_timeout(
        tmp_path: Path, chain: dict[str, Path], qemu: object) -> None:
    vm, ov = _switched(tmp_path, chain)
    try:
        def boom(done: int, total: int) -> None:
            raise KeyboardInterrupt

        # Paused with speed 1 byte/s: the job cannot finish before it is cancelled.
        with pytest.raises(KeyboardInterrupt):
            run_job(vm.qmp, "block-commit", {"device": "ov", "top-node": "ov",
                                             "base-node": "d0", "speed": 1},
                    job_id="c1", progress=boom)
        assert vm.qmp.execute("query-jobs") == []
        assert node_file(vm.top_chain("d0")[0]) == os.fspath(ov)  # nothing switched
        with pytest.raises(BlockJobError) as err:
            run_job(vm.qmp, "block-commit", {"device": "ov", "top-node": "ov",
                                             "base-node": "d0", "speed": 1},
                    job_id="c2", timeout=0.3)
        assert err.value.field == "timeout"
        assert vm.qmp.execute("query-jobs") == []
        vm.io("d0", "read -P 0x22 2M 1M")
    finally:
        vm.quit()
    for p in (ov, chain["top"]):
        qemu.assert_clean(p)  # type: ignore[attr-defined]


def test_a_job_qemu_refuses_to_start_is_a_command_error(tmp_path: Path,
                                                        chain: dict[str, Path]) -> None:
    vm = Vm(tmp_path, {"d0": chain["top"]})
    try:
        with pytest.raises(QmpCommandError):
            run_job(vm.qmp, "block-commit", {"device": "d0", "base-node": "no-such-node"},
                    job_id="bad")
    finally:
        vm.quit()


# -- the guest agent -----------------------------------------------------------------------


class _Agent:
    """A stand-in for qemu-ga (no guest runs here): answers each command, logs it."""

    def __init__(self, path: Path, *, freeze_delay: float = 0.0,
                 fail: str | None = None) -> None:
        self.log: list[str] = []
        self.srv = not_qmp_socket(path)
        self.freeze_delay = freeze_delay
        self.fail = fail
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        # One client at a time, as qemu-ga serves its socket; until the socket is closed.
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.srv.accept()
                self._serve(conn)

    def _serve(self, conn: socket.socket) -> None:
        decoder = json.JSONDecoder()
        buf = ""
        # The client may give up and hang up (a timed-out freeze): that ends this client.
        with conn, contextlib.suppress(OSError):
            while chunk := conn.recv(4096):
                buf += chunk.decode()
                while buf.strip():
                    try:  # a JSON stream, as qemu-ga reads it: not one object per line
                        msg, end = decoder.raw_decode(buf.lstrip())
                    except ValueError:
                        break
                    buf = buf.lstrip()[end:]
                    conn.sendall(self._answer(msg))

    def _answer(self, msg: dict[str, object]) -> bytes:
        cmd = str(msg["execute"])
        self.log.append(cmd)
        if cmd == "guest-fsfreeze-freeze" and self.freeze_delay:
            time.sleep(self.freeze_delay)
        reply: dict[str, object] = {"return": 1}
        if cmd == self.fail:
            reply = {"error": {"class": "GenericError",
                               "desc": "failed to freeze /: Device busy"}}
        if "id" in msg:
            reply["id"] = msg["id"]
        return json.dumps(reply).encode() + b"\n"

    def close(self) -> None:
        # shutdown wakes the accept() of the serving thread, which then ends.
        with contextlib.suppress(OSError):
            self.srv.shutdown(socket.SHUT_RDWR)
        self.srv.close()
        self.thread.join(timeout=5)


def test_a_freeze_brackets_the_block_and_the_thaw_always_runs(tmp_path: Path) -> None:
    agent = _Agent(tmp_path / "ga.sock")
    with Qmp(tmp_path / "ga.sock", agent=True) as ga:
        with frozen_guest(ga, timeout=2):
            assert agent.log == ["guest-fsfreeze-freeze"]
        assert agent.log == ["guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]
        with pytest.raises(RuntimeError), frozen_guest(ga, timeout=2):
            raise RuntimeError
        assert agent.log[-1] == "guest-fsfreeze-thaw"
    agent.close()


def test_a_failed_or_slow_freeze_is_thawed_and_raised(tmp_path: Path) -> None:
    agent = _Agent(tmp_path / "ga.sock", fail="guest-fsfreeze-freeze")
    with Qmp(tmp_path / "ga.sock", agent=True) as ga:
        with pytest.raises(QmpCommandError, match="Device busy"), frozen_guest(ga, timeout=2):
            pytest.fail("the block must not run without a freeze")
        assert agent.log == ["guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]
    agent.close()
    slow = _Agent(tmp_path / "ga2.sock", freeze_delay=1.0)
    with (Qmp(tmp_path / "ga2.sock", agent=True) as ga, pytest.raises(LiveError),
          frozen_guest(ga, timeout=0.3)):
        pytest.fail("the block must not run without a freeze")
    slow.close()
    assert slow.log[0] == "guest-fsfreeze-freeze"


def test_without_an_agent_the_block_just_runs() -> None:
    ran = []
    with frozen_guest(None, timeout=1):
        ran.append(1)
    assert ran == [1]


def test_opens_and_switch_in_one_round_trip_or_not_at_all(tmp_path: Path,
                                                          chain: dict[str, Path]) -> None:
    vm = Vm(tmp_path, {"d0": chain["top"], "d1": chain["guest"]})
    try:
        ov0 = _overlay(chain["top"], tmp_path / "top.1.qcow2")
        with pytest.raises(QmpCommandError):  # the second overlay's file does not exist
            add_and_switch(vm.qmp, [("d0", "ov0", ov0),
                                    ("d1", "ov1", tmp_path / "missing.qcow2")])
        assert vm.top_chain("d0")[0] == os.fspath(chain["top"])  # nothing switched
        remove_node(vm.qmp, "ov0")
        ov1 = _overlay(chain["guest"], tmp_path / "guest.1.qcow2")
        add_and_switch(vm.qmp, [("d0", "ov0", ov0), ("d1", "ov1", ov1)])
        assert node_file(vm.top_chain("d0")[0]) == os.fspath(ov0)
        assert node_file(vm.top_chain("d1")[0]) == os.fspath(ov1)
    finally:
        vm.quit()


def test_qemu_dying_during_a_job_leaves_both_images_valid(tmp_path: Path,
                                                          chain: dict[str, Path],
                                                          qemu: object) -> None:
    vm, ov = _switched(tmp_path, chain)
    seen: list[int] = []

    def killer(done: int, total: int) -> None:
        seen.append(done)
        if len(seen) == 3:
            vm.proc.kill()  # QEMU dies with the commit under way

    with pytest.raises(LiveError):
        run_job(vm.qmp, "block-commit", {"device": "ov", "top-node": "ov", "base-node": "d0",
                                         "speed": 64 * 1024},
                job_id="dies", progress=killer)
    vm.kill()
    for p in (ov, chain["top"], chain["base"]):
        qemu.assert_clean(p)  # type: ignore[attr-defined]
    # The overlay still reads everything the guest wrote (over the partly-merged base).
    qemu.io("-r", "-c", "read -P 0x22 2M 1M", "-c", "read -P 0x11 0 1M", ov)  # type: ignore[attr-defined]


def test_a_job_that_fails_raises_with_qemus_error(tmp_path: Path, qemu: object) -> None:
    """A stream into an overlay on a full file system: the job fails, QEMU says why."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI runs as root: this test mounts a tiny tmpfs")
        pytest.skip("mounting a tmpfs needs root")
    base, mid = tmp_path / "base.qcow2", tmp_path / "mid.qcow2"
    with create_disk(base, True, size=16 * MiB):
        pass
    with create_cow_child_disk(base, "qcow2", mid, persistent=True):
        pass
    qemu.io("-c", "write -P 0x5c 0 4M", mid)  # type: ignore[attr-defined]
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", os.fspath(small)],
                   check=True)
    try:
        top = small / "top.qcow2"
        with create_cow_child_disk(mid, "qcow2", top, persistent=True):
            pass
        vm = Vm(tmp_path, {"d0": top})  # copying mid's 4 MiB up cannot fit in 1 MiB
        try:
            base_node = find_nodes(vm.qmp, [base])[os.fspath(base)].name
            with pytest.raises(BlockJobError) as err:
                run_job(vm.qmp, "block-stream", {"device": "d0", "base-node": base_node},
                        job_id="full")
            assert "No space left on device" in err.value.message  # QEMU's own words
            assert vm.qmp.execute("query-jobs") == []  # dismissed
        finally:
            vm.quit()
    finally:
        subprocess.run(["umount", os.fspath(small)], check=True)


def test_qemu_opens_an_existing_overlay_and_switches_in_one_command(
        tmp_path: Path, chain: dict[str, Path], qemu: object) -> None:
    vm = Vm(tmp_path, {"d0": chain["top"], "d1": chain["guest"]})
    try:
        ov0 = _overlay(chain["top"], tmp_path / "top.1.qcow2")
        before = ov0.read_bytes()
        with pytest.raises(QmpCommandError):  # one file missing: neither switches
            switch_to_existing(vm.qmp, [("d0", "x0", ov0),
                                        ("d1", "x1", tmp_path / "missing.qcow2")])
        assert vm.top_chain("d0")[0] == os.fspath(chain["top"])
        assert "x0" not in {n["node-name"] for n in
                            vm.qmp.execute("query-named-block-nodes", {"flat": True})}
        ov1 = _overlay(chain["guest"], tmp_path / "guest.1.qcow2")
        switch_to_existing(vm.qmp, [("d0", "x0", ov0), ("d1", "x1", ov1)])
        assert ov0.read_bytes() == before  # QEMU opened it; it rewrote nothing
        writes(vm, "d0", 0x3C, [(0, 4096)])
        assert node_file(vm.top_chain("d0")[0]) == os.fspath(ov0)
    finally:
        vm.quit()
    qemu.assert_clean(ov0)  # type: ignore[attr-defined]
    assert qemu.info(ov0)["backing-filename"] == "top.qcow2"  # type: ignore[attr-defined]
