"""Boxes a running QEMU serves: attach, detach, and the check every operation makes first.

A box is *attached* when its ``live.json`` (``_livestate``) names the QMP
socket of the QEMU that runs it. Every operation on a box asks
:func:`stopped` first: a running box is refused (or, for the operations that
work live, handed the QMP connection); a stale attachment (no QEMU answers)
is dropped when the box's image locks are free; a box a live snapshot left
in the live layout is settled (``_settle``) before anything else touches it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from boxdisk._errors import DiskInUseError, QmpConnectError, QmpProtocolError
from boxdisk._locks import image_in_use
from boxdisk._log import get_logger

from ._core import StoreContext, box_key, ms
from ._journal import new_opid
from ._layout import DISK_NAMES
from ._livestate import (
    LiveState,
    check_serves,
    connect,
    lending,
    read_state,
    stage_state,
    top_paths,
)
from ._settle import settle

if TYPE_CHECKING:
    from boxdisk.live import Qmp

__all__ = ["attach", "detach", "ensure_stopped", "stopped"]

log = get_logger(__name__)


def attach(ctx: StoreContext, box_id: str, qmp: str, guest_agent: str | None) -> None:
    """Record that the QEMU at ``qmp`` runs the box, after checking that it serves its disks."""
    start = time.perf_counter()
    with ctx.operation("attach", (box_key(box_id),)):
        bdir = ctx.box_dir(box_id)
        state = read_state(bdir) or LiveState()
        with connect(qmp) as q:
            nodes = check_serves(q, top_paths(bdir, state), state.nodes)
        if guest_agent is not None:
            with connect(guest_agent, agent=True) as ga:
                ga.execute("guest-ping")
        new = attrs.evolve(state, qmp=qmp, guest_agent=guest_agent, nodes=nodes)
        ctx.barrier(stage_state(bdir, new, new_opid()))
    log.info("box_attached", box=box_id, qmp=qmp, guest_agent=guest_agent, ms=ms(start))


def detach(ctx: StoreContext, box_id: str) -> None:
    """Forget the box's QEMU; settle its layout now if nothing holds its files any more."""
    with ctx.operation("detach", (box_key(box_id),)):
        bdir = ctx.box_dir(box_id)
        state = read_state(bdir)
        if state is None:
            return
        state = attrs.evolve(state, qmp=None, guest_agent=None)
        ctx.barrier(stage_state(bdir, state, new_opid()))
        settle(ctx, box_id, bdir, state)
    log.info("box_detached", box=box_id)


@contextlib.contextmanager
def stopped(ctx: StoreContext, box_id: str, bdir: Path, action: str, *,
            live: bool = False) -> Iterator[tuple[Qmp | None, LiveState | None]]:
    """Settle the box for ``action`` (under its lock); yield its QMP connection if it runs.

    A running box (its QEMU answers) is refused with DiskInUseError unless
    ``live``, when the connection and the live state are yielded (the
    connection is closed after the block). A stale attachment (no QEMU
    answers) is dropped, with a logged event, when the box's image locks are
    free; when they are held, DiskInUseError names the file. Then the box is
    settled and (None, None) is yielded.
    """
    state = read_state(bdir)
    if state is None:
        yield None, None
        return
    if state.qmp is not None:
        try:
            q = connect(state.qmp)
        except (QmpConnectError, QmpProtocolError) as exc:
            for path in top_paths(bdir, state).values():
                if image_in_use(path):
                    msg = (f"refusing to {action}: the box is attached to QEMU at {state.qmp}, "
                           f"which does not answer ({exc.message}), and its disk is held")
                    raise DiskInUseError(msg, path=path, field="qmp", value=state.qmp) from None
            log.warning("box_attachment_dropped", box=box_id, qmp=state.qmp, reason=exc.message)
            state = attrs.evolve(state, qmp=None, guest_agent=None)
            ctx.barrier(stage_state(bdir, state, new_opid()))
        else:
            with q, lending(q):
                if not live:
                    top = top_paths(bdir, state)[DISK_NAMES[0]]
                    msg = (f"refusing to {action}: the box is running (attached to QEMU at "
                           f"{state.qmp}); stop it (and detach) first")
                    raise DiskInUseError(msg, path=top, field="qmp", value=state.qmp)
                yield q, state
            return
    held = settle(ctx, box_id, bdir, state)
    if held is not None:
        # The rest of the store knows only the usual layout: until the box can be
        # settled, nothing else may change it.
        msg = (f"refusing to {action}: a live snapshot or clone left the box in its live "
               f"layout, and another process (a clone's QEMU?) still holds {held.name}; "
               f"the box is settled once nothing holds it")
        raise DiskInUseError(msg, path=held, field="lock")
    yield None, None


def ensure_stopped(ctx: StoreContext, box_id: str, bdir: Path, action: str) -> None:
    """Refuse ``action`` on a running box (DiskInUseError); settle a stopped one."""
    with stopped(ctx, box_id, bdir, action):
        pass
