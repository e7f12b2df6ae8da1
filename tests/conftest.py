"""Shared test helpers: QEMU (qemu-img, qemu-io) as the oracle.

QEMU interop tests use the ``qemu`` fixture. When qemu-img is missing they
skip on a developer machine, but fail under CI (``CI`` set): the interop tests
must run there, never silently skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")


class Qemu:
    """Thin wrappers over qemu-img and qemu-io that raise with QEMU's stderr on failure."""

    def img(
        self, *args: str | os.PathLike[str], check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run qemu-img; fail the test with its stderr when ``check`` and it fails."""
        return _run([QEMU_IMG or "qemu-img", *map(os.fspath, args)], check=check)

    def io(
        self, *args: str | os.PathLike[str], check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run qemu-io."""
        return _run([QEMU_IO or "qemu-io", *map(os.fspath, args)], check=check)

    def info(self, path: str | os.PathLike[str], *extra: str) -> Any:
        """``qemu-img info --output=json`` parsed (``-U`` so held images open)."""
        return json.loads(self.img("info", "-U", "--output=json", *extra, path).stdout)

    def check(self, path: str | os.PathLike[str]) -> Any:
        """``qemu-img check --output=json`` parsed; exit codes 0-3 are results, not failures."""
        proc = self.img("check", "--output=json", path, check=False)
        if proc.returncode not in (0, 2, 3):
            pytest.fail(f"qemu-img check {path} failed ({proc.returncode}): {proc.stderr}")
        return json.loads(proc.stdout)

    def assert_clean(self, path: str | os.PathLike[str]) -> None:
        """qemu-img check reports no corruptions, no leaks and no check errors."""
        report = self.check(path)
        bad = {k: report.get(k, 0) for k in ("corruptions", "leaks", "check-errors")}
        assert not any(bad.values()), f"qemu-img check {path}: {report}"

    def write(
        self, path: str | os.PathLike[str], cmds: Sequence[str], *, fmt: str = "qcow2"
    ) -> None:
        """Run qemu-io commands (e.g. ``write -P 0xab 0 64k``) against an image."""
        args: list[str] = ["-f", fmt]
        for cmd in cmds:
            args += ["-c", cmd]
        proc = self.io(*args, path)
        if "error" in proc.stdout.lower() or "failed" in proc.stdout.lower():
            pytest.fail(f"qemu-io {cmds} on {path}: {proc.stdout}")

    def read_raw(self, path: str | os.PathLike[str], tmp: Path) -> bytes:
        """The guest-visible bytes of an image (and its chain), via ``qemu-img convert -O raw``."""
        out = tmp / f"export-{os.getpid()}-{id(path)}.raw"
        self.img("convert", "-U", "-O", "raw", path, out)
        try:
            return out.read_bytes()
        finally:
            out.unlink()


def _run(argv: list[str], *, check: bool) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr}{proc.stdout}")
    return proc


@pytest.fixture(scope="session")
def qemu() -> Qemu:
    """QEMU's tools; skip locally, fail under CI, when they are missing."""
    if QEMU_IMG is None or QEMU_IO is None:
        if os.environ.get("CI"):
            pytest.fail("qemu-img/qemu-io missing under CI: the interop tests must run there")
        pytest.skip("qemu-img/qemu-io not installed (run the README's test command)")
    return Qemu()
