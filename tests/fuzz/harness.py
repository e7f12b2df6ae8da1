"""Run boxdisk on hostile inputs in a worker process, and judge every result.

A :class:`Worker` owns one long-lived child process (``_worker.py``) and
sends it one image at a time; each operation comes back with its outcome,
CPU seconds and peak RSS. :func:`problems` turns a batch of results into the
list of broken promises: an exception that is not a ``BoxdiskError``, more
than :data:`CPU_LIMIT` seconds of CPU for one call, a peak RSS above
:data:`RSS_LIMIT` during one call, or writes that turn an image that checked
clean into one with corruptions or check errors. A call that has not answered after
:data:`HANG_SECONDS` of wall time is a hang: the worker is killed (and
restarted for the next input) and the hang is reported.

Why a separate process: the tests need per-call memory and time figures that
the test runner's own allocations cannot disturb, a hard cap on what a runaway
allocation may take (RLIMIT_AS in the worker), and a way to survive a hang.
"""

from __future__ import annotations

import ast
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any, Self

__all__ = ["CPU_LIMIT", "HANG_SECONDS", "RSS_LIMIT", "Worker", "problems"]

#: Each call must finish within this much CPU time (the issue's bound).
CPU_LIMIT = 2.0
#: Each call's peak resident set size must stay below this (the issue's bound).
RSS_LIMIT = 256 * 1024 * 1024
#: Wall time after which a call counts as a hang (generous: a loaded 2-core box).
HANG_SECONDS = 60.0

_WORKER = Path(__file__).with_name("_worker.py")
_REPO = Path(__file__).resolve().parents[2]


class WorkerHang(Exception):
    """The worker did not answer in time (or died); it has been killed."""


class Worker:
    """A fuzz worker process; ``run()`` one image at a time. A context manager."""

    def __init__(self, *, hang_seconds: float = HANG_SECONDS) -> None:
        self.hang_seconds = hang_seconds
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - owned, closed in close()
        self.baseline_rss = 0
        self.restarts = 0

    def _start(self) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        self._proc = subprocess.Popen(
            [sys.executable, str(_WORKER), str(to_child_r), str(from_child_w)],
            pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=self._log, cwd=_REPO,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._w = os.fdopen(to_child_w, "wb")
        self._r = os.fdopen(from_child_r, "rb")
        hello = self._recv(HANG_SECONDS)
        self.baseline_rss = hello["baseline_rss"]

    def _recv(self, timeout: float) -> Any:
        head = self._read_exact(4, timeout)
        (n,) = struct.unpack(">I", head)
        return pickle.loads(self._read_exact(n, timeout))

    def _read_exact(self, n: int, timeout: float) -> bytes:
        buf = b""
        fd = self._r.fileno()
        while len(buf) < n:
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                self._kill()
                msg = f"no answer within {timeout} s"
                raise WorkerHang(msg)
            chunk = os.read(fd, n - len(buf))
            if not chunk:
                self._kill()
                msg = f"worker died: {self.log_tail()}"
                raise WorkerHang(msg)
            buf += chunk
        return buf

    def run(self, path: Path, ops: tuple[str, ...],
            roots: tuple[Path, ...]) -> list[dict[str, Any]]:
        """Run ``ops`` on ``path`` (backing files confined to ``roots``); one result per op.

        A hang or a dead worker yields a single ``{"outcome": "hang"}`` result.
        """
        if self._proc is None:
            self._start()
        data = pickle.dumps({"path": str(path), "roots": [str(r) for r in roots],
                             "ops": list(ops)})
        try:
            self._w.write(struct.pack(">I", len(data)) + data)
            self._w.flush()
            return list(self._recv(self.hang_seconds * len(ops)))
        except (WorkerHang, BrokenPipeError) as exc:
            self._kill()
            return [{"op": ",".join(ops), "outcome": "hang", "error": str(exc),
                     "cpu": 0.0, "wall": 0.0, "peak_rss": 0}]

    def log_tail(self) -> str:
        """The last lines the worker wrote to stdout/stderr."""
        self._log.seek(0, os.SEEK_END)
        size = self._log.tell()
        self._log.seek(max(0, size - 4000))
        return self._log.read().decode("utf-8", "replace")

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        self.restarts += 1
        for f in (self._w, self._r):
            f.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()

    def close(self) -> None:
        """Stop the worker (it exits at end of input) and release everything."""
        proc, self._proc = self._proc, None
        if proc is not None:
            self._w.close()
            try:
                proc.wait(timeout=HANG_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self._r.close()
        self._log.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def problems(results: list[dict[str, Any]]) -> list[str]:
    """Every broken promise in one input's results, as readable lines (empty: all kept)."""
    out = []
    for r in results:
        op = r["op"]
        if r["outcome"] == "hang":
            out.append(f"{op}: hang ({r['error']})")
            continue
        if r["outcome"] == "unexpected":
            out.append(f"{op}: {r['error']} is not a BoxdiskError\n{r['traceback']}")
        if op == "write" and r["outcome"] == "ok":
            before, after = ast.literal_eval(r["value"])
            if before == 0 and after in (1, 2):  # leaks may appear (QEMU's do too)
                out.append(f"write: an image that checked clean checks {after} after writes")
        if r["cpu"] > CPU_LIMIT:
            out.append(f"{op}: {r['cpu']:.2f} s of CPU (limit {CPU_LIMIT} s)")
        if r["peak_rss"] > RSS_LIMIT:
            out.append(f"{op}: peak RSS {r['peak_rss'] >> 20} MiB (limit {RSS_LIMIT >> 20} MiB)")
    return out
