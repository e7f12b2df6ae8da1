"""The store's file locks: one store-wide lock for short structural changes, one per box.

Locks are ``filelock.FileLock`` (``flock(2)``): released by the kernel when
their process dies, so a crashed holder never wedges the store. The holder
writes who it is (pid, operation, box) into the lock file as it acquires, so a
process that times out can say whom it waited for.

Order, to rule out deadlocks: box (and base) locks in sorted key order, then
the store lock, innermost and briefly.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import filelock

from boxdisk._errors import LockTimeoutError
from boxdisk._log import get_logger

from ._layout import Layout

__all__ = ["STORE_KEY", "StoreLocks"]

log = get_logger(__name__)

#: The key of the store-wide lock.
STORE_KEY = "store"
_HOLDER_BYTES = 2048
_POLL = 0.005


def _describe_key(key: str) -> str:
    kind, _, name = key.partition(":")
    if key == STORE_KEY:
        return "the store lock"
    return f"the lock of {kind} {name!r}"


class StoreLocks:
    """Every lock of one store, for one process (shared by its threads)."""

    def __init__(self, layout: Layout, timeout: float) -> None:
        self._layout = layout
        self.timeout = timeout
        self._locks: dict[str, filelock.BaseFileLock] = {}
        self._guard = threading.Lock()
        self._local = threading.local()

    # -- the lock objects ------------------------------------------------------

    def _path(self, key: str) -> str:
        if key == STORE_KEY:
            return os.fspath(self._layout.store_lock)
        return os.fspath(self._layout.lock_file(key))

    def _lock(self, key: str) -> filelock.BaseFileLock:
        with self._guard:
            lock = self._locks.get(key)
            if lock is None:
                lock = filelock.FileLock(self._path(key), poll_interval=_POLL,
                                         on_acquired=self._holder_writer(key))
                self._locks[key] = lock
            return lock

    def _holder_writer(self, key: str) -> Callable[[int], None]:
        def write(fd: int) -> None:
            op = getattr(self._local, "op", "?")
            info = {"pid": os.getpid(), "key": key, "op": op, "since": time.time()}
            data = json.dumps(info).encode()[:_HOLDER_BYTES]
            # Overwritten in place at a fixed size: no truncate, no block allocation. Only a
            # note for whoever waits: a full disk or an I/O error must not refuse the lock
            # (recovery needs it most then).
            with contextlib.suppress(OSError):
                os.pwrite(fd, data.ljust(_HOLDER_BYTES), 0)

        return write

    def holder(self, key: str) -> dict[str, Any]:
        """What the lock file says about its last holder (empty when it says nothing)."""
        try:
            with open(self._path(key), "rb") as f:
                raw = f.read(_HOLDER_BYTES)
            info = json.loads(raw.strip() or b"{}")
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

    @contextlib.contextmanager
    def hold(self, keys: Iterable[str], op: str, *, timeout: float | None = None,
             blocking: bool = True) -> Iterator[None]:
        """Hold the locks of ``keys`` (sorted order) for the block.

        ``op`` (an operation and its box) is written into each lock file for
        whoever waits. Raises :class:`LockTimeoutError` naming the holder.
        """
        ordered = sorted(set(keys), key=lambda k: (k == STORE_KEY, k))
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        taken: list[filelock.BaseFileLock] = []
        previous = getattr(self._local, "op", None)
        self._local.op = op
        try:
            for key in ordered:
                lock = self._lock(key)
                remaining = max(0.0, deadline - time.monotonic())
                try:
                    if blocking:
                        lock.acquire(timeout=remaining)
                    else:
                        lock.acquire(blocking=False)
                except filelock.Timeout:
                    raise self._timeout_error(key, self.timeout if timeout is None
                                              else timeout) from None
                taken.append(lock)
            yield
        finally:
            for lock in reversed(taken):
                lock.release()
            self._local.op = previous

    def try_hold(self, keys: Iterable[str], op: str) -> contextlib.AbstractContextManager[bool]:
        """Hold ``keys`` if every one is free right now; yields whether it did."""
        return _TryHold(self, tuple(keys), op)

    def structural(self, op: str) -> contextlib.AbstractContextManager[None]:
        """Hold the store-wide lock for a short structural change."""
        return self.hold((STORE_KEY,), op)

    def held(self, key: str) -> bool:
        """Whether this thread holds ``key``."""
        lock = self._locks.get(key)
        return lock is not None and lock.is_locked

    def close(self) -> None:
        """Drop the lock objects (none may be held)."""
        with self._guard:
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
