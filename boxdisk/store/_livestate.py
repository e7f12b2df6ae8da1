"""What the store records about a box a QEMU runs (``live.json``), and how it reaches that QEMU.

``live.json`` exists only for a box that is attached or whose layout a live
snapshot changed and that has not been settled yet (``_settle``); for every
other box reading it costs one failed open.

- ``qmp``, ``guest_agent``: the sockets of the QEMU that runs the box (None
  once detached).
- ``tops``: disk name -> [file, device, inode] of its top where that is not
  the disk's usual name: a live snapshot cannot rename the file QEMU writes,
  so the new top gets a new name (``disk.OPID.qcow2``).
- ``frozen``: oldest first, the files live snapshots froze where QEMU had
  them: ``{"disk", "file", "inode", "snapshot" or "clone", "node"}``. The
  snapshot's directory holds a stub until the box is settled: an empty qcow2
  over the frozen file, so that no header QEMU has open is ever rewritten.
- ``nodes``: disk name -> the name of QEMU's node for its top.
- ``removed``: snapshots removed while QEMU ran whose directories stay (holding
  only ``.removed``) until it stops: QEMU names the images under them through
  those directories.

QEMU's node names are recorded because a node whose backing was given at run
time (every new top, and every frozen file under one) is reported by QEMU not
by its file name but as ``json:{...}`` options, which nest one level per layer
and stop fitting in QEMU's 4 KiB file-name field a few dozen layers down. A
recorded name is trusted only if QEMU has a node of that name now; otherwise
the node is found by its file.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from boxdisk._errors import LiveError, StoreError

from ._fs import dump_json, read_json, replace_file
from ._layout import DISK_NAMES

if TYPE_CHECKING:
    from boxdisk.live import Qmp

__all__ = [
    "CONNECT_TIMEOUT",
    "LIVE_META",
    "LiveState",
    "check_serves",
    "connect",
    "lending",
    "reach",
    "read_state",
    "stage_state",
    "top_paths",
]

#: The live state of a box, in its directory.
LIVE_META = "live.json"
#: Seconds to wait for a QEMU's QMP socket to answer before calling it gone.
CONNECT_TIMEOUT = 5.0


@attrs.frozen
class LiveState:
    """What ``live.json`` holds (see the module)."""

    qmp: str | None = None
    guest_agent: str | None = None
    tops: dict[str, list[Any]] = attrs.field(factory=dict)
    frozen: list[dict[str, Any]] = attrs.field(factory=list)
    nodes: dict[str, str] = attrs.field(factory=dict)
    removed: list[str] = attrs.field(factory=list)

    def to_json(self) -> dict[str, Any]:
        """The JSON object ``live.json`` holds."""
        return {"qmp": self.qmp, "guest_agent": self.guest_agent, "tops": self.tops,
                "frozen": self.frozen, "nodes": self.nodes, "removed": self.removed}

    @property
    def empty(self) -> bool:
        """Nothing to record: the file goes."""
        return self.qmp is None and self.settled

    @property
    def settled(self) -> bool:
        """The box has its usual layout (no live snapshot since it was last settled)."""
        return not self.tops and not self.frozen and not self.removed


def read_state(bdir: Path) -> LiveState | None:
    """The box's live state; None when it has none (the usual case: one failed open)."""
    path = bdir / LIVE_META
    try:
        raw = read_json(path)
    except FileNotFoundError:
        return None
    try:
        return LiveState(qmp=raw.get("qmp"), guest_agent=raw.get("guest_agent"),
                         tops=dict(raw.get("tops") or {}),
                         frozen=[dict(f) for f in raw.get("frozen") or []],
                         nodes=dict(raw.get("nodes") or {}),
                         removed=list(raw.get("removed") or []))
    except (AttributeError, TypeError, ValueError) as exc:
        msg = f"live state is malformed ({exc!r})"
        raise StoreError(msg, path=path, field=LIVE_META) from None


def stage_state(bdir: Path, state: LiveState | None, opid: str) -> list[Path]:
    """Replace ``live.json`` (remove it for None or an empty state); unsynced.

    The new file is linked complete under a hidden name and renamed over the
    old one. Returns the paths a barrier must cover.
    """
    path = bdir / LIVE_META
    if state is None or state.empty:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return [bdir]
    replace_file(path, bdir / f".{LIVE_META}.{opid}", dump_json(state.to_json()))
    return [path, bdir]


def top_paths(bdir: Path, state: LiveState | None) -> dict[str, Path]:
    """Disk name -> the file that is its live top now (the disk name itself unless live)."""
    out = {}
    for d in DISK_NAMES:
        entry = state.tops.get(d) if state is not None else None
        path = bdir / (entry[0] if entry else d)
        if entry or path.is_file():
            out[d] = path
    return out


def connect(path: str, *, agent: bool = False) -> Qmp:
    """A QMP (or guest-agent) connection; ``qemu.qmp`` is loaded here, on first use."""
    from boxdisk.live import Qmp  # noqa: PLC0415 - QMP only where a box runs

    return Qmp(path, timeout=CONNECT_TIMEOUT, agent=agent)


_lent = threading.local()


@contextlib.contextmanager
def lending(qmp: Qmp) -> Iterator[None]:
    """Make this thread's open connection the one :func:`reach` returns for its socket.

    QEMU serves one client per QMP socket: recovery that runs inside a failing
    operation (which holds the connection) must use that connection, not wait
    for a second one.
    """
    conns: dict[str, Qmp] = _lent.__dict__.setdefault("conns", {})
    conns[qmp.path] = qmp
    try:
        yield
    finally:
        conns.pop(qmp.path, None)


@contextlib.contextmanager
def reach(path: str | None) -> Iterator[Qmp | None]:
    """The QEMU at ``path`` for recovery: the connection lent by this thread, a new one
    (closed after), or None when no QEMU answers."""
    if path is None:
        yield None
        return
    lent = getattr(_lent, "conns", {}).get(path)
    if lent is not None:
        yield lent
        return
    try:
        qmp = connect(path)
    except LiveError:
        yield None
        return
    with qmp:
        yield qmp


def check_serves(qmp: Qmp, tops: dict[str, Path],
                 known: dict[str, str] | None = None) -> dict[str, str]:
    """Disk name -> node name of each top QEMU has open for writing; LiveError otherwise.

    ``known`` (recorded names, see the module) are used where QEMU has a
    writable node of that name; the others are found by their files. When
    every top's recorded name is one boxdisk gave (``boxdisk-OPID-N``, unique
    to one operation), QEMU is not asked at all: its answer grows with the
    square of the chain's depth (hundreds of milliseconds a hundred layers
    down), and a name QEMU does not have makes the switch itself fail, with
    nothing changed.
    """
    from boxdisk.live import block_nodes, find_nodes, writable_nodes  # noqa: PLC0415

    if known and all(known.get(d, "").startswith("boxdisk-") for d in tops):
        return {d: known[d] for d in tops}
    listing = block_nodes(qmp)  # one answer for both questions
    present = writable_nodes(qmp, listing) if known else {}
    out = {d: known[d] for d in tops if known and present.get(known.get(d, ""))}
    rest = {d: p for d, p in tops.items() if d not in out}
    nodes = find_nodes(qmp, list(rest.values()), listing=listing) if rest else {}
    for d, path in rest.items():
        node = nodes.get(os.fspath(path))
        if node is None or node.read_only:
            how = "open" if node is None else "open for writing"
            msg = f"the QEMU at {qmp.path} does not have the box's disk {path.name} {how}"
            raise LiveError(msg, path=path, field="qmp", value=qmp.path)
        out[d] = node.name
    return out
