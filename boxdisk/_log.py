"""structlog access for boxdisk modules; importing boxdisk configures nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["get_logger", "when_structlog_loads"]

_hooks: list[Callable[[], None]] = []
_loaded = False


def when_structlog_loads(hook: Callable[[], None]) -> None:
    """Run ``hook`` once, right before boxdisk's first log event (now if one was logged).

    For the command line, which configures structlog only if something logs.
    The library itself registers nothing.
    """
    if _loaded:
        hook()
    else:
        _hooks.append(hook)


def _load() -> None:
    global _loaded  # noqa: PLW0603 - a once-only switch
    if not _loaded:
        _loaded = True
        for hook in _hooks:
            hook()


class _DeferredLogger:
    """Imports structlog at the first log call, so commands that never log never pay for it."""

    __slots__ = ("_logger", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._logger: Any = None

    def __getattr__(self, attr: str) -> Any:
        logger = self._logger
        if logger is None:
            import structlog  # noqa: PLC0415 - deferred on purpose (start-up time)

            _load()
            logger = self._logger = structlog.get_logger(module=self._name)
        return getattr(logger, attr)

    def __repr__(self) -> str:
        return f"<boxdisk logger {self._name}>"


def get_logger(name: str) -> Any:
    """A lazy structlog logger carrying ``module=name``; events are a verb plus key-values.

    Nothing is resolved until the first event: structlog is imported then, and
    its configuration is read when each event is logged, so an application (or
    the CLI) that configures structlog after importing boxdisk still decides
    where boxdisk's events go.
    """
    return _DeferredLogger(name)
