"""structlog access for boxdisk modules; importing boxdisk configures nothing."""

from __future__ import annotations

from typing import Any

import structlog

__all__ = ["get_logger"]


def get_logger(name: str) -> Any:
    """A lazy structlog logger carrying ``module=name``; events are a verb plus key-values.

    The proxy resolves structlog's configuration when it logs, so an
    application (or the CLI) that configures structlog after importing
    boxdisk still decides where boxdisk's events go.
    """
    return structlog.get_logger(module=name)
