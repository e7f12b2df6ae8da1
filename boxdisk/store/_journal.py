"""The intent journal: what a multi-step operation is about to do, written before it does it.

A record is one small JSON file in ``.boxdisk/journal/``, named
``OPID.KEYHASHES.json``: the operation's id and the hashes of the lock keys
(boxes, bases) it holds, so that whoever later takes one of those locks finds
the record by its name alone. The record holds everything needed to undo the
operation or to finish it; every path in it is relative to the store root.

The record is created (and its directory synced) before the operation's first
step and removed after its last; a record left behind by a crash is recovered
by the next process that takes its locks, which undoes the operation or, if it
had passed its point of no return (the files say which), finishes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import attrs

from boxdisk._errors import StoreError
from boxdisk._log import get_logger

from ._fs import dump_json, fsync_dir, publish_new_file, read_json
from ._layout import Layout, key_hash

__all__ = ["CRASH_ENV", "TRACE_ENV", "Journal", "Record", "crashpoint", "new_opid"]

log = get_logger(__name__)

#: Test hook: ``OP:STEP`` names the step boundary at which the process SIGKILLs itself.
CRASH_ENV = "BOXDISK_STORE_CRASH_AT"
#: Test hook: a file to which every step boundary reached is appended, one per line.
TRACE_ENV = "BOXDISK_STORE_TRACE"

_SUFFIX = ".json"


def crashpoint(op: str, step: str) -> None:
    """A step boundary of ``op``; the crash tests kill the process here (see ``CRASH_ENV``)."""
    env = os.environ
    if TRACE_ENV in env:
        with open(env[TRACE_ENV], "a", encoding="utf-8") as f:
            f.write(f"{op}:{step}\n")
    if env.get(CRASH_ENV) == f"{op}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def new_opid() -> str:
    """A fresh operation id: 16 hex digits, unique across processes."""
    return secrets.token_hex(8)


@attrs.define(frozen=True)
class Record:
    """One journal record: an operation in flight (or interrupted)."""

    opid: str
    op: str
    keys: tuple[str, ...]
    data: dict[str, Any]
    path: Path


class Journal:
    """The records of one store's in-flight operations."""

    def __init__(self, layout: Layout) -> None:
        self._layout = layout
        self._dir = layout.journal

    # -- writing ---------------------------------------------------------------

    def begin(self, op: str, keys: tuple[str, ...], data: dict[str, Any],
              *, opid: str | None = None) -> Record:
        """Record the intent of ``op`` (durably) before its first step."""
        opid = opid or new_opid()
        hashes = "+".join(sorted(key_hash(k) for k in keys))
        path = self._dir / f"{opid}.{hashes}{_SUFFIX}"
        body = {"op": op, "opid": opid, "keys": list(keys), "pid": os.getpid(),
                "started": time.time(), "data": data}
        # Other processes list the journal at any time (recovery, gc, verify): a record must
        # never be seen half-written, or it would be taken for a dead process's and removed.
        publish_new_file(path, dump_json(body))
        try:
            fsync_dir(self._dir)
        except BaseException:
            # Nothing was done yet: a record that may not last must not stay either.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            raise
        return Record(opid, op, tuple(keys), data, path)

    def finish(self, record: Record) -> None:
        """Forget a record whose operation is complete (or undone).

        Not synced: a record that reappears after a power loss is recovered
        again, and every recovery is idempotent.
        """
        with contextlib.suppress(FileNotFoundError):
            os.unlink(record.path)

    # -- reading ---------------------------------------------------------------

    def names(self) -> list[str]:
        """File names of every record now in the journal."""
        try:
            return [n for n in os.listdir(self._dir)
                    if n.endswith(_SUFFIX) and not n.startswith(".")]
        except FileNotFoundError:
            return []

    def touching(self, keys: tuple[str, ...]) -> list[str]:
        """Names of the records that hold any of ``keys`` (found by name, nothing read)."""
        wanted = {key_hash(k) for k in keys}
        out = []
        for name in self.names():
            parts = name.split(".")
            if len(parts) == 3 and wanted.intersection(parts[1].split("+")):
                out.append(name)
        return out

    def opids(self) -> set[str]:
        """The operation ids of every record now in the journal."""
        return {n.split(".", 1)[0] for n in self.names()}

    def load(self, name: str) -> Record | None:
        """Read a record; None when it is gone (finished meanwhile) or was never completed.

        A record appears complete (hard-linked into place once written and
        fsynced), so one that does not parse is not one being written: it was
        damaged, and is removed (nothing can be recovered from it).
        """
        path = self._dir / name
        try:
            body = read_json(path)
        except FileNotFoundError:
            return None
        except StoreError as exc:
            log.warning("journal_record_unreadable", path=str(path), error=exc.message)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return None
        try:
            return Record(str(body["opid"]), str(body["op"]),
                          tuple(str(k) for k in body["keys"]), dict(body["data"]), path)
        except (KeyError, TypeError, ValueError) as exc:
            msg = f"journal record is malformed ({exc!r})"
            raise StoreError(msg, path=path, field="record", value=name) from None

    def describe(self, name: str) -> dict[str, Any]:
        """The raw body of a record (for reports); empty when unreadable."""
        try:
            body = json.loads((self._dir / name).read_bytes()[: 1 << 20])
        except (OSError, ValueError):
            return {}
        return body if isinstance(body, dict) else {}
