"""A synchronous QMP (and guest-agent) connection over QEMU's own ``qemu.qmp`` library.

``qemu.qmp`` is asynchronous; boxdisk's API is not. Each :class:`Qmp` owns a
private event loop and runs every call on it to completion with a timeout, so
a socket that never answers (not QMP, a stopped process) costs a bounded wait,
never a hang. Every failure becomes a :class:`~boxdisk.LiveError` subclass that
names the socket and carries QEMU's own error text.

``qemu.qmp`` is imported here only: ``import boxdisk`` does not load it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Sequence
from types import TracebackType
from typing import Any, TypeVar

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError

from boxdisk._errors import QmpCommandError, QmpConnectError, QmpProtocolError
from boxdisk._log import get_logger

__all__ = ["DEFAULT_TIMEOUT", "Qmp"]

log = get_logger(__name__)

#: Seconds any one QMP exchange may take (connecting, a command's reply).
DEFAULT_TIMEOUT = 10.0

_T = TypeVar("_T")


async def _reraise(exc: BaseException) -> None:
    raise exc


class Qmp:
    """One connection to a QMP socket (``agent=True``: a QEMU guest agent's socket).

    Use as a context manager, or call :meth:`close`. :meth:`execute` sends one
    command and returns its ``return`` value; events QEMU sends meanwhile are
    kept for :meth:`events`.
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT,
                 agent: bool = False) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self.agent = agent
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient("boxdisk")
        if agent:  # the guest agent sends no greeting and negotiates nothing
            self._client.await_greeting = False
            self._client.negotiate = False
        try:
            self._run(self._client.connect(self.path), what="connect")
        except BaseException:
            self.close()  # a half-made connection leaves tasks to settle before the loop goes
            raise

    # -- plumbing ----------------------------------------------------------------------

    def _run(self, coro: Awaitable[_T], *, what: str, timeout: float | None = None) -> _T:
        """Run ``coro`` on this connection's loop, mapping failures to LiveError."""
        wait = self.timeout if timeout is None else timeout
        try:
            return self._loop.run_until_complete(asyncio.wait_for(coro, wait))
        except ExecuteError as exc:
            err = exc.error.error
            msg = f"QEMU refused {what}: {err.desc}"
            raise QmpCommandError(msg, path=self.path, field=what,
                                  value=err.class_) from None
        except ConnectError as exc:
            cause = exc.exc
            if isinstance(cause, OSError):
                msg = f"cannot connect to QMP: {cause.strerror or cause}"
                raise QmpConnectError(msg, path=self.path, field="socket",
                                      value=cause.errno) from None
            msg = f"the socket does not speak QMP: {exc.error_message}: {cause}"
            raise QmpProtocolError(msg, path=self.path, field="greeting") from None
        except TimeoutError:
            msg = f"no answer to {what} within {wait:g} s"
            raise QmpProtocolError(msg, path=self.path, field=what) from None
        except QMPError as exc:
            msg = f"QMP failed during {what}: {exc}"
            raise QmpProtocolError(msg, path=self.path, field=what) from None
        except OSError as exc:
            msg = f"QMP socket failed during {what}: {exc.strerror or exc}"
            raise QmpConnectError(msg, path=self.path, field="socket",
                                  value=exc.errno) from None

    # -- the API -----------------------------------------------------------------------

    def execute(self, command: str, arguments: dict[str, Any] | None = None, *,
                timeout: float | None = None) -> Any:
        """Send ``command`` and return QEMU's ``return`` value (QmpCommandError on an error)."""
        start = time.perf_counter()
        result = self._run(self._client.execute(command, arguments), what=command,
                           timeout=timeout)
        log.debug("qmp_command", socket=self.path, command=command,
                  ms=round((time.perf_counter() - start) * 1000, 3))
        return result

    def execute_all(self, commands: Sequence[tuple[str, dict[str, Any] | None]], *,
                    timeout: float | None = None) -> list[Any]:
        """Send several commands at once and wait for every reply; their return values.

        QEMU runs them in order, so a later command may rely on an earlier one
        (a switch onto a node just added); what is saved is the wait between
        them. If any fails, the first failure (in order) is raised, after all
        have been answered.
        """
        start = time.perf_counter()

        async def each() -> list[Any]:
            return await asyncio.gather(*(self._client.execute(c, a) for c, a in commands),
                                        return_exceptions=True)

        what = "+".join(c for c, _ in commands)
        replies = self._run(each(), what=what, timeout=timeout)
        for (command, _), reply in zip(commands, replies, strict=True):
            if isinstance(reply, BaseException):
                self._run(_reraise(reply), what=command)  # mapped to LiveError there
        log.debug("qmp_command", socket=self.path, command=what,
                  ms=round((time.perf_counter() - start) * 1000, 3))
        return list(replies)

    def events(self, wait: float = 0.0) -> list[dict[str, Any]]:
        """Events received so far; with ``wait``, up to that long for the first one."""
        listener = self._client.events
        self._run(asyncio.sleep(0), what="events")
        got = [dict(e) for e in listener.clear()]
        if got or wait <= 0:
            return got
        try:
            first = self._loop.run_until_complete(asyncio.wait_for(listener.get(), wait))
        except TimeoutError:
            return []
        return [dict(first), *(dict(e) for e in listener.clear())]

    def close(self) -> None:
        """Disconnect (idempotent)."""
        if self._loop.is_closed():
            return
        if asyncio._get_running_loop() is not None:
            # Called from inside another event loop (a collected connection, say): no loop
            # can run here, so the socket is just dropped with the loop.
            self._loop.close()
            return
        try:
            # QEMU may have gone (quit, killed): its end is closed already, which is fine.
            self._loop.run_until_complete(
                asyncio.wait_for(self._client.disconnect(), self.timeout))
        except (QMPError, OSError, EOFError, TimeoutError):
            pass
        finally:
            self._loop.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
