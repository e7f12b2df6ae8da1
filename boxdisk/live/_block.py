"""What boxdisk asks of a running QEMU's block layer: find nodes, switch tops, run jobs.

Every function takes an open :class:`~boxdisk.live.Qmp`. Nothing here writes
an image file: overlays are made by the caller (natively, by boxdisk) before
QEMU is asked to use them, and everything QEMU has open is changed by QEMU.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs

from boxdisk._errors import BlockJobError, LiveError, QmpCommandError
from boxdisk._log import get_logger

from ._qmp import Qmp

__all__ = [
    "BlockNode",
    "Listing",
    "add_and_switch",
    "add_overlay",
    "block_nodes",
    "find_nodes",
    "frozen_guest",
    "node_file",
    "run_job",
    "switch_to_existing",
    "switch_to_overlays",
    "top_files",
    "wait_job",
    "writable_nodes",
]

log = get_logger(__name__)

#: Progress callback: (bytes done, bytes in all), as ``flatten`` reports it.
Progress = Callable[[int, int], None]


@attrs.frozen
class BlockNode:
    """A format node of a running QEMU, found by the image file it has open."""

    #: The node's name (QEMU's own ``#blockNNN`` for a ``-drive``).
    name: str
    #: The file name QEMU opened it by.
    filename: str
    #: The format driver (``qcow2``, ``raw``).
    driver: str
    #: Whether QEMU has it open read-only (a backing node) or writable (a top).
    read_only: bool


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def node_file(filename: str) -> str | None:
    """The image file a format node's ``file`` names; None for what is not one plain file.

    A node whose backing was given at run time (an overlay after a switch) is
    reported as ``json:{...}``, QEMU's pseudo-protocol for options; its
    ``file.filename`` is the image file.
    """
    if not filename.startswith("json:"):
        return filename
    try:
        opts = json.loads(filename[5:])
    except ValueError:
        return None
    file = opts.get("file") if isinstance(opts, dict) else None
    if not isinstance(file, dict) or file.get("driver") != "file":
        return None
    name = file.get("filename")
    return name if isinstance(name, str) else None


#: Drivers of protocol nodes (the file under a format node), not images themselves.
_PROTOCOL_DRIVERS = ("file", "host_device", "host_cdrom")

#: One answer of ``query-named-block-nodes`` (flat), to ask several questions of.
Listing = list[dict[str, Any]]


def block_nodes(qmp: Qmp) -> Listing:
    """QEMU's format nodes now (``query-named-block-nodes``, flat; protocol nodes left out).

    Pass the result as ``listing`` to :func:`find_nodes` and :func:`writable_nodes`
    to ask several questions of one answer: QEMU's answer grows with the square
    of a chain's depth.
    """
    return [dict(n) for n in qmp.execute("query-named-block-nodes", {"flat": True})
            if n.get("drv") not in (*_PROTOCOL_DRIVERS, None)
            and isinstance(n.get("node-name"), str)]


def writable_nodes(qmp: Qmp, listing: Listing | None = None) -> dict[str, bool]:
    """Every format node QEMU has: name -> whether it is writable."""
    return {str(n["node-name"]): not n.get("ro")
            for n in (block_nodes(qmp) if listing is None else listing)}


def find_nodes(qmp: Qmp, files: Sequence[str | os.PathLike[str]], *,
               listing: Listing | None = None) -> dict[str, BlockNode]:
    """The format node QEMU serves each of ``files`` with (``query-named-block-nodes``).

    Matched by file identity (same device and inode), so a path QEMU was given
    through a symbolic link or with ``..`` is found too. A file with no node
    is left out of the result; a file with two format nodes (opened twice)
    gets the writable one.
    """
    wanted = [os.fspath(f) for f in files]
    found: dict[str, BlockNode] = {}
    for info in block_nodes(qmp) if listing is None else listing:
        raw = info.get("file")
        filename = node_file(raw) if isinstance(raw, str) else None
        if filename is None:
            continue
        for want in wanted:
            if _same(filename, want):
                node = BlockNode(name=str(info["node-name"]), filename=filename,
                                 driver=str(info["drv"]), read_only=bool(info.get("ro")))
                old = found.get(want)
                if old is None or (old.read_only and not node.read_only):
                    found[want] = node
    return found


def top_files(qmp: Qmp) -> dict[str, str]:
    """Node name -> file of every node QEMU writes to now (``query-named-block-nodes``)."""
    out = {}
    for info in block_nodes(qmp):
        raw = info.get("file")
        filename = node_file(raw) if isinstance(raw, str) else None
        if not info.get("ro") and filename is not None:
            out[str(info["node-name"])] = filename
    return out


def _add_command(node_name: str, path: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    return ("blockdev-add", {"driver": "qcow2", "node-name": node_name,
                             "file": {"driver": "file", "filename": os.fspath(path)},
                             "backing": None})


def _switch_command(switches: Sequence[tuple[str, str]]) -> tuple[str, dict[str, Any]]:
    return ("transaction", {"actions": [
        {"type": "blockdev-snapshot", "data": {"node": node, "overlay": overlay}}
        for node, overlay in switches]})


def add_overlay(qmp: Qmp, node_name: str, path: str | os.PathLike[str]) -> None:
    """Open the qcow2 ``path`` in QEMU as node ``node_name``, its backing left to the switch."""
    qmp.execute(*_add_command(node_name, path))


def switch_to_overlays(qmp: Qmp, switches: Sequence[tuple[str, str]]) -> None:
    """Make each overlay node the new top over its node, all at once (one ``transaction``).

    ``switches`` is (node now on top, overlay node) pairs. QEMU installs each
    node as its overlay's backing and moves every user of the node (the
    guest's device, an export) onto the overlay; with two pairs both switch
    in the same instant or neither does.
    """
    qmp.execute(*_switch_command(switches))


def add_and_switch(qmp: Qmp, pairs: Sequence[tuple[str, str, str | os.PathLike[str]]]) -> None:
    """:func:`add_overlay` for each (node, overlay node, file), then the switch, sent at once.

    QEMU runs them in order; one round trip instead of one per command. When
    any fails nothing has switched (the transaction names a node that failed
    to open, or fails itself); the caller closes the overlay nodes that opened.
    """
    commands: list[tuple[str, dict[str, Any] | None]] = [
        _add_command(overlay, path) for _node, overlay, path in pairs]
    commands.append(_switch_command([(node, overlay) for node, overlay, _path in pairs]))
    qmp.execute_all(commands)


def switch_to_existing(qmp: Qmp,
                       pairs: Sequence[tuple[str, str, str | os.PathLike[str]]]) -> None:
    """Switch each node onto an overlay file boxdisk made, opened by QEMU: one command.

    ``pairs`` is (node now on top, overlay node name, overlay file). One
    ``transaction`` of ``blockdev-snapshot-sync`` actions in ``mode:
    existing``: QEMU opens the existing qcow2 (format given, nothing probed,
    the file not rewritten), installs the node as its backing and moves the
    node's users onto it, for every pair at once or for none (a failed
    transaction closes what it opened).
    """
    qmp.execute("transaction", {"actions": [
        {"type": "blockdev-snapshot-sync", "data": {
            "node-name": node, "snapshot-file": os.fspath(path),
            "snapshot-node-name": overlay, "format": "qcow2", "mode": "existing"}}
        for node, overlay, path in pairs]})


def remove_node(qmp: Qmp, node_name: str) -> None:
    """Close a node boxdisk added (``blockdev-del``); one already gone is fine."""
    with contextlib.suppress(QmpCommandError):
        qmp.execute("blockdev-del", {"node-name": node_name})


@contextlib.contextmanager
def frozen_guest(agent: Qmp | None, *, timeout: float) -> Iterator[None]:
    """Freeze the guest's file systems for the block (``guest-fsfreeze-freeze``).

    The thaw always runs, also when the block or the freeze itself fails; a
    freeze that takes longer than ``timeout`` fails (and is thawed). Without
    an agent this does nothing: what the block captures is crash-consistent.
    """
    if agent is None:
        yield
        return
    try:
        agent.execute("guest-fsfreeze-freeze", timeout=timeout)
        yield
    finally:
        try:
            agent.execute("guest-fsfreeze-thaw", timeout=timeout)
        except LiveError as exc:
            log.exception("guest_thaw_failed", socket=agent.path, error=exc.message)
            raise


def _job(qmp: Qmp, job_id: str) -> dict[str, Any] | None:
    for job in qmp.execute("query-jobs"):
        if job.get("id") == job_id:
            return dict(job)
    return None


def run_job(qmp: Qmp, command: str, arguments: dict[str, Any], *, job_id: str,
            progress: Progress | None = None, timeout: float = 3600.0,
            complete_when_ready: bool = True, poll: float = 0.02) -> None:
    """Run one block job to its end: start it, report progress, finish or cancel it.

    ``command`` (``block-stream``, ``block-commit``) is sent with
    ``arguments`` plus the job id, ``auto-dismiss: false`` (so its error can
    be read). A job that becomes ready (an active commit) is completed with
    ``job-complete`` when ``complete_when_ready``. On an exception here
    (KeyboardInterrupt included) or past ``timeout`` seconds the job is
    cancelled and waited for. A failed or cancelled job raises
    :class:`~boxdisk.BlockJobError` with QEMU's error text.
    """
    args = {**arguments, "job-id": job_id, "auto-dismiss": False}
    qmp.execute(command, args)
    log.info("block_job_started", socket=qmp.path, job=job_id, command=command)
    wait_job(qmp, job_id, command, progress=progress, timeout=timeout,
             complete_when_ready=complete_when_ready, poll=poll)


def wait_job(qmp: Qmp, job_id: str, command: str, *, progress: Progress | None = None,
             timeout: float = 3600.0, complete_when_ready: bool = True,
             poll: float = 0.02) -> None:
    """Drive a job QEMU runs (started by :func:`run_job`, or by a process that died) to its end.

    As :func:`run_job` from the start on: progress, completion when ready,
    cancellation on an exception or past ``timeout``, BlockJobError on failure.
    """
    start = time.monotonic()
    try:
        job = _until_concluded(qmp, job_id, command, progress=progress,
                               deadline=start + timeout, complete=complete_when_ready, poll=poll)
    except BaseException:
        _cancel(qmp, job_id)
        raise
    error = job.get("error")
    qmp.execute("job-dismiss", {"id": job_id})
    if error:
        msg = f"block job {job_id} ({command}) failed: {error}"
        raise BlockJobError(msg, path=qmp.path, field="job", value=job_id)
    log.info("block_job_finished", socket=qmp.path, job=job_id, command=command,
             ms=round((time.monotonic() - start) * 1000, 1))


def _until_concluded(qmp: Qmp, job_id: str, command: str, *, progress: Progress | None,
                     deadline: float, complete: bool, poll: float) -> dict[str, Any]:
    """Watch a job until QEMU concludes it; its last ``query-jobs`` entry."""
    while True:
        job = _job(qmp, job_id)
        if job is None:
            msg = f"block job {job_id} vanished"
            raise BlockJobError(msg, path=qmp.path, field="job", value=job_id)
        if progress is not None:
            progress(int(job.get("current-progress", 0)), int(job.get("total-progress", 0)))
        status = job.get("status")
        if status == "concluded":
            return job
        if status == "ready" and complete:
            qmp.execute("job-complete", {"id": job_id})
            complete = False
        if time.monotonic() > deadline:
            msg = f"block job {job_id} ({command}) did not finish in time"
            raise BlockJobError(msg, path=qmp.path, field="timeout", value=job_id)
        qmp.events(wait=poll)  # wakes at the next job event, or after poll seconds


def _cancel(qmp: Qmp, job_id: str, wait: float = 30.0) -> None:
    """Cancel a job and wait until QEMU has ended it (best effort: QEMU may be gone)."""
    try:
        qmp.execute("job-cancel", {"id": job_id})
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            job = _job(qmp, job_id)
            if job is None or job.get("status") == "concluded":
                if job is not None:
                    qmp.execute("job-dismiss", {"id": job_id})
                log.info("block_job_cancelled", socket=qmp.path, job=job_id)
                return
            qmp.events(wait=0.02)
        log.warning("block_job_cancel_failed", socket=qmp.path, job=job_id,
                    error=f"still running after {wait:g} s")
    except LiveError as exc:
        log.warning("block_job_cancel_failed", socket=qmp.path, job=job_id, error=exc.message)
