"""The intent journal: what a multi-step operation is about to do, written before it does it.

A record is one small JSON file in ``.boxdisk/journal/``, named
``OPID.KEYHASHES.json``: the operation's id and the hashes of the lock keys
(boxes, bases) it holds, so that whoever later takes one of those locks finds
the record by its name alone. The record holds everything needed to undo the
operation or to finish it; every path in it is relative to the store root.

The record is published (complete or not at all) before the operation's first
step and removed after its last. It is not synced by itself: the operation's
first barrier, which it needs anyway before its point of no return, makes the
record durable together with the files it staged (see ``docs/store.md``). A
record left behind by a crash is recovered by the next process that takes its
locks, which undoes the operation or, if it had passed its point of no return
(the files say which), finishes it.

A batch (``create_boxes``, ``snapshot_boxes``) holds one lock of its own,
``batch:OPID``, and *claims* the boxes it works on: its record is named
``OPID.HASH.batch.json`` and lists the claimed keys inside, so an operation on
a claimed box finds it (by reading the few batch records) and waits for the
batch's lock, or recovers the batch if its owner is dead.
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

from ._fs import dump_json, link_new_file, read_json, replace_file
from ._layout import Layout, key_hash

__all__ = ["CRASH_ENV", "TRACE_ENV", "Journal", "Record", "crashpoint", "new_opid"]

log = get_logger(__name__)

#: Test hook: ``OP:STEP`` names the step boundary at which the process SIGKILLs itself.
CRASH_ENV = "BOXDISK_STORE_CRASH_AT"
#: Test hook: a file to which every step boundary reached is appended, one per line.
TRACE_ENV = "BOXDISK_STORE_TRACE"

_SUFFIX = ".json"
_BATCH = "batch"


#: The test hooks, read once: the crash tests set them in the environment of a child process.
_TRACE = os.environ.get(TRACE_ENV)
_CRASH = os.environ.get(CRASH_ENV)


def crashpoint(op: str, step: str) -> None:
    """A step boundary of ``op``; the crash tests kill the process here (see ``CRASH_ENV``)."""
    if _TRACE is None and _CRASH is None:
        return
    if _TRACE is not None:
        with open(_TRACE, "a", encoding="utf-8") as f:
            f.write(f"{op}:{step}\n")
    if f"{op}:{step}" == _CRASH:
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
    #: Keys a batch claims without holding their locks (empty for other operations).
    claims: tuple[str, ...] = ()


class Journal:
    """The records of one store's in-flight operations."""

    def __init__(self, layout: Layout) -> None:
        self._layout = layout
        self._dir = layout.journal

    # -- writing ---------------------------------------------------------------

    def begin(self, op: str, keys: tuple[str, ...], data: dict[str, Any],
              *, opid: str | None = None, claims: tuple[str, ...] = ()) -> Record:
        """Publish the intent of ``op`` before its first step (not synced: see the module).

        ``claims`` (a batch's) are the keys it works on without holding their locks.
        """
        opid = opid or new_opid()
        hashes = "+".join(sorted(key_hash(k) for k in keys))
        kind = f".{_BATCH}" if claims else ""
        path = self._dir / f"{opid}.{hashes}{kind}{_SUFFIX}"
        body = {"op": op, "opid": opid, "keys": list(keys), "pid": os.getpid(),
                "started": time.time(), "data": data}
        if claims:
            body["claims"] = list(claims)
        # Other processes list the journal at any time (recovery, gc, verify): a record must
        # never be seen half-written, or it would be taken for a dead process's and removed.
        link_new_file(path, dump_json(body))
        return Record(opid, op, tuple(keys), data, path, tuple(claims))

    def rewrite(self, record: Record, data: dict[str, Any]) -> None:
        """Replace a live record's data (a batch's, once it knows its boxes); not synced.

        The new record is linked under a hidden name and renamed over the old
        one, so a reader sees the one or the other, whole.
        """
        body = json.loads(record.path.read_bytes())
        body["data"] = data
        replace_file(record.path, self._dir / f".{record.opid}.rewrite", dump_json(body))

    def finish(self, record: Record) -> None:
        """Forget a record whose operation is complete (or undone).

        Not synced: a record that reappears after a power loss is recovered
        again, and every recovery is idempotent.
        """
        # Only a batch rewrites its record (and may leave the rewrite's temporary name).
        names = (record.path, self._dir / f".{record.opid}.rewrite") if record.claims else (
            record.path,)
        for path in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    # -- reading ---------------------------------------------------------------

    def names(self) -> list[str]:
        """File names of every record now in the journal."""
        try:
            return [n for n in os.listdir(self._dir)
                    if n.endswith(_SUFFIX) and not n.startswith(".")]
        except FileNotFoundError:
            return []

    def touching(self, keys: tuple[str, ...], *, skip: str | None = None) -> list[str]:
        """Names of the records that hold or claim any of ``keys``.

        Found by name, nothing read, except batch records (rare: only while a
        batch runs or after one crashed), whose claims are read. ``skip``, a
        record's name, is left out (the caller's own).
        """
        hashes = {key_hash(k) for k in keys}
        wanted = set(keys)
        out = []
        for name in self.names():
            if name == skip:
                continue
            parts = name.split(".")
            if len(parts) == 3 and hashes.intersection(parts[1].split("+")):
                out.append(name)
            elif len(parts) == 4 and parts[2] == _BATCH:
                record = self.load(name)
                if record is not None and wanted.intersection(record.claims):
                    out.append(name)
        return out

    def durable_paths(self, record: Record) -> tuple[Path, Path]:
        """What a barrier lists to make ``record`` durable: the file and its directory."""
        return record.path, self._dir

    def opids(self) -> set[str]:
        """The operation ids of every record now in the journal."""
        return {n.split(".", 1)[0] for n in self.names()}

    def load(self, name: str) -> Record | None:
        """Read a record; None when it is gone (finished meanwhile) or was never completed.

        A record appears complete (linked into place once written), so one
        that does not parse is not one being written: it was damaged, and is
        removed (nothing can be recovered from it).
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
                          tuple(str(k) for k in body["keys"]), dict(body["data"]), path,
                          tuple(str(k) for k in body.get("claims", ())))
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
