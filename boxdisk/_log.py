"""boxdisk's key-value events, delivered as standard-library ``logging`` records.

Every event is a verb plus key-values (``log.info("box_created", box=…, ms=…)``).
It goes to the stdlib logger of its layer, named ``boxdisk.<layer>``
(``boxdisk.store``, ``boxdisk.image``, ``boxdisk.chain``, …: see
:func:`logger_name`), as a record that carries the event twice over:

- ``record.event`` (the verb) and ``record.kv`` (a dict of the key-values), for
  formatters and for structlog's stdlib integration (``ExtraAdder``);
- ``record.getMessage()``, rendered only when a handler asks for it, reads
  ``event key=value …`` for plain ``logging`` set-ups.

boxdisk configures nothing: it adds no handler (not even a ``NullHandler``), sets
no level and never touches structlog's global configuration. With no logging
set up, ``logging``'s defaults apply: debug and info events are dropped, and the
few warning and error events, which mean real trouble, reach stderr through its
last-resort handler. Nothing is ever written to stdout.

The level is checked before anything else, so a disabled event builds no record,
renders nothing and reads no clock. Logging never fails an operation: anything a
filter, handler or formatter raises is swallowed here, whatever
``logging.raiseExceptions`` says.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
from typing import Any

__all__ = ["Logger", "get_logger", "logger_name", "render"]

_DEBUG, _INFO, _WARNING, _ERROR = logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR

# Frames between the caller's log call and Logger.log: the level method and _emit.
_STACKLEVEL = 3


def logger_name(module: str) -> str:
    """The logger a module logs to: ``boxdisk.`` and its layer, without a leading ``_``.

    ``boxdisk.store._journal`` -> ``boxdisk.store``, ``boxdisk._disk`` ->
    ``boxdisk.disk``, ``boxdisk.qcow2`` -> ``boxdisk.qcow2``. One logger a
    layer, so the names stay put when files inside a layer move.
    """
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "boxdisk":
        return module
    return f"boxdisk.{parts[1].lstrip('_')}"


def _value(value: Any) -> str:
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, bytes):
        return repr(value)
    text = value if isinstance(value, str) else str(value)
    if text and text.isprintable() and not any(c in text for c in " \"'=\\"):
        return text
    return repr(text)


def render(event: str, kv: dict[str, Any]) -> str:
    """``event key=value …``; a value with spaces, quotes or ``=`` is quoted (``repr``)."""
    if not kv:
        return event
    return f"{event} " + " ".join(f"{key}={_value(value)}" for key, value in kv.items())


class _Message:
    """A record's ``msg``: rendered by ``str()``, that is only if a handler formats it."""

    __slots__ = ("event", "kv")

    def __init__(self, event: str, kv: dict[str, Any]) -> None:
        self.event = event
        self.kv = kv

    def __str__(self) -> str:
        return render(self.event, self.kv)

    def __repr__(self) -> str:
        return f"<boxdisk event {self.event}>"


class Logger:
    """One layer's events; methods take the event name and its key-values."""

    __slots__ = ("_logger", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._logger = logging.getLogger(name)

    def debug(self, event: str, /, **kv: Any) -> None:
        """A routine step (opened a chain, scanned a graph)."""
        if self._logger.isEnabledFor(_DEBUG):
            self._emit(_DEBUG, event, kv, None)

    def info(self, event: str, /, **kv: Any) -> None:
        """A completed operation (disk created, box cloned, image checked)."""
        if self._logger.isEnabledFor(_INFO):
            self._emit(_INFO, event, kv, None)

    def warning(self, event: str, /, **kv: Any) -> None:
        """Real trouble that did not stop the operation."""
        if self._logger.isEnabledFor(_WARNING):
            self._emit(_WARNING, event, kv, None)

    def error(self, event: str, /, **kv: Any) -> None:
        """Trouble the caller is about to see as an exception, or cannot see at all."""
        if self._logger.isEnabledFor(_ERROR):
            self._emit(_ERROR, event, kv, None)

    def exception(self, event: str, /, **kv: Any) -> None:
        """``error`` with the exception being handled attached (``exc_info``)."""
        if self._logger.isEnabledFor(_ERROR):
            self._emit(_ERROR, event, kv, True)

    def _emit(self, level: int, event: str, kv: dict[str, Any], exc_info: bool | None) -> None:
        with contextlib.suppress(Exception):  # a log write never fails an operation
            self._logger.log(level, _Message(event, kv), exc_info=exc_info,
                             extra={"event": event, "kv": kv}, stacklevel=_STACKLEVEL)

    def __repr__(self) -> str:
        return f"<boxdisk logger {self.name}>"


def get_logger(module: str) -> Logger:
    """The logger for a boxdisk module (pass ``__name__``); see :func:`logger_name`."""
    return Logger(logger_name(module))
