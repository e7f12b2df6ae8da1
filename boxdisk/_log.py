"""structlog access for boxdisk modules; importing boxdisk configures nothing."""

from __future__ import annotations

from typing import Any

import structlog

__all__ = ["get_logger"]


def get_logger(name: str) -> Any:
    """A structlog logger bound to ``module=name``; events are a verb plus key-values."""
    return structlog.get_logger(name).bind(module=name)
