"""Fixtures of the fuzz suite: the seeds (built once) and the worker process (one per session)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Qemu

from .harness import Worker
from .seeds import Seed, StoreSeed, make_seeds, make_store


@pytest.fixture(scope="session")
def seeds(qemu: Qemu, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Seed]:
    """Every seed image, built by QEMU and boxdisk into a scratch directory."""
    return make_seeds(qemu, tmp_path_factory.mktemp("fuzz-seeds"))


@pytest.fixture(scope="session")
def worker() -> Iterator[Worker]:
    """The fuzz worker process, shared by every fuzz test."""
    with Worker() as w:
        yield w


@pytest.fixture(scope="session")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where mutated images are written (one directory per seed, reused per example)."""
    return tmp_path_factory.mktemp("fuzz-inputs")


@pytest.fixture(scope="session")
def store_seed(qemu: Qemu, tmp_path_factory: pytest.TempPathFactory) -> StoreSeed:
    """A template box store whose images the store fuzz test mutates (in copies)."""
    return make_store(qemu, tmp_path_factory.mktemp("fuzz-store"))
