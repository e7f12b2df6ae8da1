"""The fuzz worker: a separate process that runs boxdisk's operations on one image at a time.

Run by :class:`tests.fuzz.harness.Worker` as ``python _worker.py``. Requests
and replies are length-prefixed pickles on a private pipe (fd 3 in, fd 4 out),
so nothing boxdisk prints can corrupt them. Per operation the worker reports
the outcome, the CPU time it took (``time.process_time``: user + system time
of this process, which a loaded machine does not inflate the way it inflates
wall time) and the peak resident set size reached during it (the kernel's
``VmHWM``, reset before each operation by writing 5 to /proc/self/clear_refs).

The address space is capped (RLIMIT_AS) well above the 256 MiB the tests
allow, so a runaway allocation fails fast as a MemoryError (an unexpected
exception, reported) instead of pushing the machine into swap or the OOM
killer. A hang is the parent's to detect: it kills the worker after a deadline.
"""

from __future__ import annotations

import logging
import os
import pickle
import resource
import shutil
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))

import boxdisk  # noqa: E402 - structlog is configured first, so nothing is printed
from boxdisk._errors import BoxdiskError  # noqa: E402
from boxdisk.chain import BackingChain  # noqa: E402
from boxdisk.ops import check, flatten  # noqa: E402

#: Address space allowed beyond what the worker has mapped at start-up.
_AS_HEADROOM = 768 * 1024 * 1024
#: Bytes read per extent: the first MiB and the last cluster of each extent.
_READ_HEAD = 1024 * 1024
_READ_TAIL = 64 * 1024


def _status(field: str) -> int:
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(field.encode()):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _read_extents(chain: BackingChain) -> int:
    """Read the head and tail of every extent of the map; returns bytes read."""
    done = 0
    for ext in chain.map():
        head = min(ext.length, _READ_HEAD)
        chain.read(ext.start, head)
        done += head
        if ext.length > head:
            tail = min(ext.length - head, _READ_TAIL)
            chain.read(ext.start + ext.length - tail, tail)
            done += tail
    return done


def _op_open(path: Path, roots: list[Path], out: Path) -> Any:
    with BackingChain.open(path, allowed_roots=roots) as chain:
        return len(chain.images)


def _op_map(path: Path, roots: list[Path], out: Path) -> Any:
    with BackingChain.open(path, allowed_roots=roots) as chain:
        return sum(1 for _ in chain.map())


def _op_read(path: Path, roots: list[Path], out: Path) -> Any:
    with BackingChain.open(path, allowed_roots=roots) as chain:
        return _read_extents(chain)


def _op_check(path: Path, roots: list[Path], out: Path) -> Any:
    return check(path).exit_code


def _op_flatten(path: Path, roots: list[Path], out: Path) -> Any:
    try:
        with BackingChain.open(path, allowed_roots=roots) as chain:
            return flatten(chain, out)
    finally:
        if out.exists():
            out.unlink()


def _op_header(path: Path, roots: list[Path], out: Path) -> Any:
    return boxdisk.qcow2_virtual_size(path), boxdisk.read_backing_file_path(path)


def _op_repair(path: Path, roots: list[Path], out: Path) -> Any:
    """Repair a copy (``check(repair="all")``), then check and read the result.

    The copy sits beside the image, so its relative backing name still resolves.
    """
    copy = path.with_name(f".repaired-{path.name}")
    try:
        shutil.copyfile(path, copy)
        repaired = check(copy, repair="all")
        after = check(copy)
        with BackingChain.open(copy, allowed_roots=roots) as chain:
            _read_extents(chain)
        return repaired.exit_code, after.exit_code
    finally:
        if copy.exists():
            copy.unlink()


def _op_write(path: Path, roots: list[Path], out: Path) -> Any:
    """Write through boxdisk's writer into a copy (beside the image), then check the copy."""
    from boxdisk.image._qcow2_write import Qcow2Writer  # noqa: PLC0415

    copy = path.with_name(f".written-{path.name}")
    try:
        shutil.copyfile(path, copy)
        try:
            before = check(copy).exit_code
        except BoxdiskError:
            before = None
        with Qcow2Writer.open(copy) as w:
            size = w.size
            for offset in (0, size // 2 // 512 * 512, max(0, size - 4096) // 512 * 512):
                w.write(offset, b"\xa5" * min(4096, size - offset))
            w.write_zeroes(0, min(size, 512))
        return before, check(copy).exit_code
    finally:
        if copy.exists():
            copy.unlink()


def _op_verify(path: Path, roots: list[Path], out: Path) -> Any:
    from boxdisk.store import BoxStore  # noqa: PLC0415 - only when the store is fuzzed

    with BoxStore(roots[0]) as store:
        return repr(store.verify())


def _canary(kind: str) -> Callable[[Path, list[Path], Path], Any]:
    """Operations that break each promise on purpose, to prove the harness notices."""

    def op(path: Path, roots: list[Path], out: Path) -> Any:
        if kind == "raise":
            msg = "canary"
            raise ValueError(msg)
        if kind == "alloc":
            block = bytearray(300 * 1024 * 1024)
            block[:: 4096] = b"\1" * len(block[:: 4096])
            return len(block)
        if kind == "spin":
            end = time.process_time() + 2.2
            while time.process_time() < end:
                pass
            return None
        if kind == "huge":
            return len(bytearray(4 << 30))  # past RLIMIT_AS: MemoryError
        time.sleep(3600)  # "hang"
        return None

    return op


OPS: dict[str, Callable[[Path, list[Path], Path], Any]] = {
    "open": _op_open,
    "map": _op_map,
    "read": _op_read,
    "check": _op_check,
    "flatten": _op_flatten,
    "header": _op_header,
    "verify": _op_verify,
    "repair": _op_repair,
    "write": _op_write,
    **{f"canary-{k}": _canary(k) for k in ("raise", "alloc", "spin", "huge", "hang")},
}


def run_op(name: str, path: Path, roots: list[Path], out: Path) -> dict[str, Any]:
    """Run one operation; describe its outcome, CPU time and peak memory."""
    _reset_peak()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result: dict[str, Any] = {"op": name}
    try:
        value = OPS[name](path, roots, out)
        result.update(outcome="ok", value=repr(value)[:200])
    except BoxdiskError as exc:
        result.update(outcome="error", error=type(exc).__name__, field=exc.field,
                      message=str(exc)[:500])
    except BaseException as exc:
        result.update(outcome="unexpected", error=type(exc).__name__,
                      traceback="".join(traceback.format_exception(exc))[-4000:])
    result["cpu"] = time.process_time() - cpu0
    result["wall"] = time.perf_counter() - wall0
    result["peak_rss"] = _status("VmHWM:")
    return result


def _recv(f: Any) -> Any:
    head = f.read(4)
    if len(head) < 4:
        return None
    (n,) = struct.unpack(">I", head)
    return pickle.loads(f.read(n))


def _send(f: Any, obj: Any) -> None:
    data = pickle.dumps(obj)
    f.write(struct.pack(">I", len(data)) + data)
    f.flush()


def main() -> int:
    inp = os.fdopen(int(sys.argv[1]), "rb")
    outp = os.fdopen(int(sys.argv[2]), "wb")
    limit = _status("VmSize:") + _AS_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    scratch = Path(tempfile.mkdtemp(prefix="boxdisk-fuzz-out-"))
    _send(outp, {"ready": True, "baseline_rss": _status("VmRSS:"), "as_limit": limit})
    try:
        while True:
            req = _recv(inp)
            if req is None:
                return 0
            path, roots, ops = Path(req["path"]), [Path(r) for r in req["roots"]], req["ops"]
            out = scratch / "flat.qcow2"
            _send(outp, [run_op(op, path, roots, out) for op in ops])
    finally:
        for p in scratch.iterdir():
            p.unlink()
        scratch.rmdir()


if __name__ == "__main__":
    sys.exit(main())
