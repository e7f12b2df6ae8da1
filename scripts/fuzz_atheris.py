"""Coverage-guided fuzzing of boxdisk's read side and check with atheris (libFuzzer).

    .venv/bin/python scripts/fuzz_atheris.py [libFuzzer options] [CORPUS_DIR ...]

Each input is written as a qcow2 file in a private temporary directory, then
opened as a backing chain confined to that directory, mapped, read (the head
and tail of every extent), checked, and its header read by the seed-parity
readers. Every call must return or raise a BoxdiskError subclass; any other
exception is a crash (atheris prints it and writes the input as
``crash-<sha1>``, or where ``-artifact_prefix=`` says). A call that takes more
than 2 s of CPU time raises ``CallTooSlow``, a crash too. Memory is bounded by
libFuzzer's ``-rss_limit_mb`` (the test passes 256: the whole process,
interpreter included) and hangs by ``-timeout`` (wall seconds).

With no corpus directory, the hostile corpus (tests/data/hostile) seeds the
run; libFuzzer writes new interesting inputs into the first directory given.
Scratch files go to ``$BOXDISK_ATHERIS_DIR`` (default: a new temporary
directory, left behind, since libFuzzer exits without Python's clean-up).
tests/fuzz/test_atheris.py runs this for a bounded time in CI.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import atheris
import structlog

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))

with atheris.instrument_imports(include=["boxdisk"]):
    import boxdisk
    from boxdisk._errors import BoxdiskError
    from boxdisk.chain import BackingChain
    from boxdisk.ops import check

CPU_LIMIT = 2.0
_HEAD, _TAIL = 1024 * 1024, 64 * 1024
# libFuzzer ends the process with exit(): nothing of Python's clean-up runs, so the
# caller says where the scratch files go (the test passes a pytest tmp_path).
_DIR = Path(os.environ.get("BOXDISK_ATHERIS_DIR") or tempfile.mkdtemp(prefix="boxdisk-atheris-"))
_DIR.mkdir(parents=True, exist_ok=True)
_IMAGE = _DIR / "fuzzed.qcow2"


class CallTooSlow(Exception):
    """One call used more CPU time than the issue allows."""


def _timed(name: str, fn: Callable[[Path], object], path: Path) -> None:
    start = time.process_time()
    with contextlib.suppress(BoxdiskError):
        fn(path)
    used = time.process_time() - start
    if used > CPU_LIMIT:
        msg = f"{name} took {used:.2f} s of CPU (limit {CPU_LIMIT} s)"
        raise CallTooSlow(msg)


def _read_chain(path: Path) -> None:
    with BackingChain.open(path, allowed_roots=[_DIR]) as chain:
        for ext in chain.map():
            head = min(ext.length, _HEAD)
            chain.read(ext.start, head)
            if ext.length > head:
                tail = min(ext.length - head, _TAIL)
                chain.read(ext.start + ext.length - tail, tail)


def _header(path: Path) -> None:
    boxdisk.qcow2_virtual_size(path)
    boxdisk.read_backing_file_path(path)


def test_one_input(data: bytes) -> None:
    """libFuzzer's entry point: one input through open, map, read, check, header readers."""
    _IMAGE.write_bytes(data)
    _timed("open+map+read", _read_chain, _IMAGE)
    _timed("check", check, _IMAGE)
    _timed("header", _header, _IMAGE)


def _in_fresh_child() -> None:
    """Go on in a forked child; the parent waits for it and exits as it does.

    libFuzzer's ``-rss_limit_mb`` reads getrusage's ``ru_maxrss``, which a
    process inherits across exec from whoever spawned it: started by a test
    runner that once peaked at a gigabyte, the fuzzer would start "out of
    memory". A forked child's peak starts from this small process instead.
    """
    pid = os.fork()
    if pid == 0:
        return
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    sys.exit(code if code >= 0 else 128 - code)


def main(argv: list[str]) -> None:
    _in_fresh_child()
    args = list(argv)
    if not [a for a in args[1:] if not a.startswith("-")]:
        corpus = Path(__file__).resolve().parents[1] / "tests" / "data" / "hostile"
        work = _DIR / "corpus"
        work.mkdir(exist_ok=True)
        args += [str(work), str(corpus)]
    print(f"scratch files in {_DIR}", file=sys.stderr)
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
