"""The fuzz harness notices each broken promise: a foreign exception, CPU, memory, a hang."""

from __future__ import annotations

from pathlib import Path

import pytest

from .harness import CPU_LIMIT, RSS_LIMIT, Worker, problems


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("canary") / "x.qcow2"
    p.write_bytes(b"not an image")
    return p


def test_a_boxdisk_error_is_a_result(worker: Worker, image: Path) -> None:
    [r] = worker.run(image, ("open",), (image.parent,))
    assert (r["outcome"], r["error"], r["field"]) == ("error", "NotQcow2Error", "magic")
    assert problems([r]) == []
    assert 0 <= r["cpu"] < CPU_LIMIT
    assert 0 < r["peak_rss"] < RSS_LIMIT


def test_another_exception_is_a_problem(worker: Worker, image: Path) -> None:
    [found] = problems(worker.run(image, ("canary-raise",), (image.parent,)))
    assert "ValueError is not a BoxdiskError" in found


def test_memory_past_the_limit_is_a_problem(worker: Worker, image: Path) -> None:
    [found] = problems(worker.run(image, ("canary-alloc",), (image.parent,)))
    assert "peak RSS" in found


def test_a_runaway_allocation_fails_fast(worker: Worker, image: Path) -> None:
    [found] = problems(worker.run(image, ("canary-huge",), (image.parent,)))
    assert "MemoryError is not a BoxdiskError" in found


def test_cpu_past_the_limit_is_a_problem(worker: Worker, image: Path) -> None:
    [found] = problems(worker.run(image, ("canary-spin",), (image.parent,)))
    assert "s of CPU" in found


def test_a_hang_is_killed_and_the_next_input_runs(image: Path) -> None:
    with Worker(hang_seconds=2) as w:
        [found] = problems(w.run(image, ("canary-hang",), (image.parent,)))
        assert "hang" in found
        assert w.restarts == 1
        [r] = w.run(image, ("open",), (image.parent,))
        assert r["outcome"] == "error"
