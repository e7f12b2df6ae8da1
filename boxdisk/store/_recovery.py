"""Crash recovery: finish or undo the operations a dead process left in the journal.

Each family of operations supplies the recovery of its own operations (a
function of the context and the record); :class:`Recovery` finds the records
whose owners are gone and runs them, under the store lock, idempotently. Which
side of its point of no return an operation stopped on is told by the files
themselves, never by a commit record.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from boxdisk._errors import StoreFormatError
from boxdisk._log import get_logger

from ._core import StoreContext
from ._journal import Record

__all__ = ["Handler", "Recovery"]

log = get_logger(__name__)

#: The recovery of one kind of operation.
Handler = Callable[[StoreContext, Record], None]


class Recovery:
    """Recovery of one open store, with a handler for every kind of operation it journals."""

    def __init__(self, ctx: StoreContext, handlers: Mapping[str, Handler]) -> None:
        self._ctx = ctx
        self._handlers = dict(handlers)

    def recover(self, record: Record) -> None:
        """Undo an interrupted operation, or finish it if it passed its point of no return.

        Each operation's recovery tells from the files which side of that
        point it stopped on; all of them are idempotent.
        """
        fn = self._handlers.get(record.op)
        if fn is None:
            msg = f"journal record of an unknown operation {record.op!r}"
            raise StoreFormatError(msg, path=record.path, field="op", value=record.op)
        with self._ctx.locks.structural(f"recover {record.op} {record.opid}"):
            fn(self._ctx, record)
        self._ctx.journal.finish(record)
        log.info("operation_recovered", op=record.op, opid=record.opid)

    def recover_dead(self, *, dry_run: bool = False) -> tuple[list[str], list[Record]]:
        """Recover every record whose owner is gone; return (recovered, live records)."""
        ctx = self._ctx
        recovered: list[str] = []
        live: list[Record] = []
        for name in sorted(ctx.journal.names()):
            record = ctx.journal.load(name)
            if record is None:
                continue
            if any(ctx.locks.held(k) for k in record.keys):
                # This thread's own operation (a crashed one was recovered when its
                # locks were taken).
                live.append(record)
                continue
            with ctx.locks.try_hold(record.keys, f"recover {record.op}") as free:
                if not free:
                    live.append(record)
                    continue
                # Re-read under the locks: its owner may have finished meanwhile.
                again = ctx.journal.load(record.path.name)
                if again is None:
                    continue
                if dry_run:
                    live.append(again)
                else:
                    self.recover(again)
                recovered.append(f"{again.op} {again.opid}")
        return recovered, live
