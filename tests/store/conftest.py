"""Fixtures of the store tests: a store in a temporary directory, QEMU-made bases."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from boxdisk.store import BoxStore

from .helpers import SIZE, make_bases


@pytest.fixture
def store(tmp_path: Path) -> Iterator[BoxStore]:
    """An empty store under the test's temporary directory (closed afterwards)."""
    with BoxStore(tmp_path / "store") as s:
        yield s


@pytest.fixture
def bases(qemu, store: BoxStore, tmp_path: Path) -> BoxStore:
    """The store with a qcow2 base ``os`` and a raw base ``rootfs``, both made by QEMU."""
    make_bases(qemu, store, tmp_path / "src", size=SIZE)
    return store
