"""The store's file locks: one store-wide lock for short structural changes, one per box.

Locks are ``flock(2)`` locks on small files under ``.boxdisk/locks/``: released
by the kernel when their process dies, so a crashed holder never wedges the
store. The holder writes who it is (pid, operation, box) into the lock file as
it acquires, so a process that times out can say whom it waited for.

A process keeps its lock files open between operations (up to
:data:`MAX_OPEN` of them, the least recently used closed beyond that), so
taking a lock it took before is one ``flock`` and one ``pwrite``, not an open
and a close. Threads of one process exclude each other with a thread lock per
key (a lock is re-entrant for the thread that holds it), and other processes
with the ``flock``.

Order, to rule out deadlocks: batch, box and base locks in sorted key order,
then the store lock, innermost and briefly.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any

from boxdisk._errors import LockTimeoutError
from boxdisk._log import get_logger

from ._layout import Layout

__all__ = ["MAX_OPEN", "STORE_KEY", "StoreLocks"]

log = get_logger(__name__)

#: The key of the store-wide lock.
STORE_KEY = "store"
#: Lock files a process keeps open between operations.
MAX_OPEN = 256
_HOLDER_BYTES = 2048
_POLL = 0.005


def _describe_key(key: str) -> str:
    kind, _, name = key.partition(":")
    if key == STORE_KEY:
        return "the store lock"
    return f"the lock of {kind} {name!r}"


class _KeyLock:
    """One key's lock in this process: a thread lock, a count, and the lock file's descriptor."""

    __slots__ = ("count", "fd", "owner", "path", "thread_lock")

    def __init__(self, path: str) -> None:
        self.path = path
        self.thread_lock = threading.Lock()
        self.owner: int | None = None
        self.count = 0
        self.fd: int | None = None


class StoreLocks:
    """Every lock of one store, for one process (shared by its threads)."""

    def __init__(self, layout: Layout, timeout: float) -> None:
        self._layout = layout
        self.timeout = timeout
        self._locks: OrderedDict[str, _KeyLock] = OrderedDict()
        self._guard = threading.Lock()
        self._local = threading.local()

    # -- the lock objects ------------------------------------------------------

    def path(self, key: str) -> str:
        """The lock file of ``key``."""
        return self._path(key)

    def _path(self, key: str) -> str:
        if key == STORE_KEY:
            return os.fspath(self._layout.store_lock)
        return os.fspath(self._layout.lock_file(key))

    def _lock(self, key: str) -> _KeyLock:
        with self._guard:
            lock = self._locks.get(key)
            if lock is None:
                lock = self._locks[key] = _KeyLock(self._path(key))
            self._locks.move_to_end(key)
            return lock

    def _trim(self) -> None:
        """Close the least recently used lock files beyond :data:`MAX_OPEN` (none held).

        Runs when the count passes MAX_OPEN and closes down to half of it, so
        its cost is spread over the locks taken in between.
        """
        with self._guard:
            keep = max(1, MAX_OPEN // 2)
            excess = len(self._locks) - keep
            for key in list(self._locks)[:max(0, excess)]:
                lock = self._locks[key]
                if lock.count == 0 and lock.thread_lock.acquire(blocking=False):
                    try:
                        if lock.count == 0:
                            if lock.fd is not None:
                                os.close(lock.fd)
                                lock.fd = None
                            del self._locks[key]
                    finally:
                        lock.thread_lock.release()

    def _write_holder(self, key: str, fd: int) -> None:
        op = getattr(self._local, "op", "?")
        info = {"pid": os.getpid(), "key": key, "op": op, "since": time.time()}
        data = json.dumps(info).encode()[:_HOLDER_BYTES]
        # Overwritten in place at a fixed size: no truncate, no block allocation. Only a
        # note for whoever waits: a full disk or an I/O error must not refuse the lock
        # (recovery needs it most then).
        with contextlib.suppress(OSError):
            os.pwrite(fd, data.ljust(_HOLDER_BYTES), 0)

    def holder(self, key: str) -> dict[str, Any]:
        """What the lock file says about its last holder (empty when it says nothing)."""
        try:
            with open(self._path(key), "rb") as f:
                raw = f.read(_HOLDER_BYTES)
            info = json.loads(raw.strip(b"\0 ").strip() or b"{}")
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    # -- acquiring -------------------------------------------------------------

    def _timeout_error(self, key: str, timeout: float) -> LockTimeoutError:
        info = self.holder(key)
        if info:
            since = info.get("since")
            held = (f"; held by pid {info.get('pid')} for {info.get('op')!s}"
                    + (f" since {time.ctime(since)}" if isinstance(since, (int, float)) else ""))
        else:
            held = "; the holder left no note"
        msg = f"could not take {_describe_key(key)} within {timeout:g} s{held}"
        return LockTimeoutError(msg, path=self._layout.root, field="lock",
                                value={"key": key, "holder": info})

    def _acquire(self, key: str, deadline: float, blocking: bool,
                 note: bool = True) -> _KeyLock | None:
        """Take one key (re-entrant for this thread); None when it is busy."""
        lock = self._lock(key)
        me = threading.get_ident()
        if lock.owner == me:
            lock.count += 1
            return lock
        remaining = max(0.0, deadline - time.monotonic())
        if not lock.thread_lock.acquire(timeout=remaining if blocking else 0):
            return None
        try:
            if lock.fd is None:
                lock.fd = os.open(lock.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            while True:
                try:
                    fcntl.flock(lock.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not blocking or time.monotonic() >= deadline:
                        lock.thread_lock.release()
                        return None
                    time.sleep(_POLL)
        except BaseException:
            lock.thread_lock.release()
            raise
        lock.owner, lock.count = me, 1
        if note:
            self._write_holder(key, lock.fd)
        return lock

    @staticmethod
    def _release(lock: _KeyLock) -> None:
        lock.count -= 1
        if lock.count:
            return
        lock.owner = None
        try:
            if lock.fd is not None:
                fcntl.flock(lock.fd, fcntl.LOCK_UN)
        finally:
            lock.thread_lock.release()

    @contextlib.contextmanager
    def hold(self, keys: Iterable[str], op: str, *, timeout: float | None = None,
             blocking: bool = True, note: bool = True) -> Iterator[None]:
        """Hold the locks of ``keys`` (sorted order) for the block.

        ``op`` (an operation and its box) is written into each lock file for
        whoever waits (``note=False``: not, for a lock taken only to wait for
        its holder). Raises :class:`LockTimeoutError` naming the holder.
        """
        ordered = sorted(set(keys), key=lambda k: (k == STORE_KEY, k))
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        taken: list[_KeyLock] = []
        previous = getattr(self._local, "op", None)
        self._local.op = op
        try:
            for key in ordered:
                lock = self._acquire(key, deadline, blocking, note)
                if lock is None:
                    raise self._timeout_error(key, wait)
                taken.append(lock)
            yield
        finally:
            for lock in reversed(taken):
                self._release(lock)
            self._local.op = previous
            if len(self._locks) > MAX_OPEN:
                self._trim()

    def try_hold(self, keys: Iterable[str], op: str) -> contextlib.AbstractContextManager[bool]:
        """Hold ``keys`` if every one is free right now; yields whether it did."""
        return _TryHold(self, tuple(keys), op)

    def structural(self, op: str) -> contextlib.AbstractContextManager[None]:
        """Hold the store-wide lock for a short structural change."""
        return self.hold((STORE_KEY,), op)

    def held(self, key: str) -> bool:
        """Whether this thread holds ``key``."""
        lock = self._locks.get(key)
        return lock is not None and lock.owner == threading.get_ident()

    def open_files(self) -> int:
        """How many lock files this process has open now."""
        return sum(1 for v in self._locks.values() if v.fd is not None)

    def __del__(self) -> None:
        # A store dropped without close() must not keep its lock files open for ever.
        with contextlib.suppress(Exception):
            self.close()

    def close(self) -> None:
        """Close every lock file (none may be held)."""
        with self._guard:
            for lock in self._locks.values():
                if lock.fd is not None and lock.count == 0:
                    os.close(lock.fd)
                    lock.fd = None
            self._locks.clear()


class _TryHold(contextlib.AbstractContextManager[bool]):
    def __init__(self, locks: StoreLocks, keys: tuple[str, ...], op: str) -> None:
        self._cm = locks.hold(keys, op, blocking=False)
        self._entered = False

    def __enter__(self) -> bool:
        try:
            self._cm.__enter__()
        except LockTimeoutError:
            return False
        self._entered = True
        return True

    def __exit__(self, *exc: Any) -> None:
        if self._entered:
            self._cm.__exit__(*exc)
