"""Run BoxStore operations in a child process: ``python -m tests.store._runner SPEC``.

SPEC is JSON: ``{"root", "op", "args", "kwargs"}`` for one operation, or
``{"root", "script": [[op, args, kwargs], ...]}`` for several; an optional
``"store_options"`` gives the store's ``sync`` and ``no_tmpfile`` (force the
fallback for new files, as on a file system without ``O_TMPFILE``). Exit status 0
when all succeeded; 2 with the error's class name on stdout after a
BoxdiskError. The crash tests set ``BOXDISK_STORE_CRASH_AT`` so the store
kills this process at a chosen step.
"""

from __future__ import annotations

import json
import logging
import sys
import time

import structlog

from boxdisk import BoxdiskError, _io
from boxdisk.store import BoxStore


def main() -> int:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    spec = json.loads(sys.argv[1])
    script = spec.get("script") or [[spec["op"], spec.get("args", []), spec.get("kwargs", {})]]
    options = spec.get("store_options") or {}
    if options.get("no_tmpfile"):
        _io.use_o_tmpfile = False
    with BoxStore(spec["root"], lock_timeout=spec.get("lock_timeout", 60.0),
                  sync=options.get("sync", "auto")) as store:
        for op, args, kwargs in script:
            try:
                if op == "hold_lock":
                    # Hold a lock (as an operation would) until killed.
                    with store._locks.hold(args, kwargs["what"]):
                        print("held", flush=True)
                        time.sleep(3600)
                    continue
                getattr(store, op)(*args, **kwargs)
            except BoxdiskError as exc:
                print(type(exc).__name__, exc, flush=True)
                return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
