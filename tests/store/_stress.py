"""One worker of the concurrency test: ``python -m tests.store._stress ROOT SEED OPS OUTDIR``.

Runs OPS random operations on the store at ROOT. The only exceptions allowed
are the documented refusals (a taken or unknown name, a dependent that forbids
a removal); anything else is printed and the worker exits 1. Prints a JSON
count of outcomes on success.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import traceback
from collections import Counter
from pathlib import Path

import structlog

from boxdisk._errors import (
    AlreadyExistsError,
    DependentsExistError,
    NotFoundError,
)
from boxdisk.store import BoxStore

#: What a worker may be told, by design, when another worker got there first.
REFUSALS = (AlreadyExistsError, NotFoundError, DependentsExistError)

BOXES = [f"b{i}" for i in range(10)]
SNAPS = [f"s{i}" for i in range(4)]
MIB = 1 << 20


def main() -> int:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    root, seed, ops, outdir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    rng = random.Random(seed)
    counts: Counter[str] = Counter()
    with BoxStore(root, lock_timeout=120) as store:
        for i in range(ops):
            op = rng.choice(["create", "create", "snapshot", "snapshot", "restore", "clone",
                             "remove_box", "remove_snapshot", "export"])
            box, other = rng.choice(BOXES), rng.choice(BOXES)
            snap = rng.choice(SNAPS)
            try:
                if op == "create":
                    if rng.random() < 0.5:
                        store.create_box(box, base="os", guest_base="rootfs")
                    else:
                        store.create_box(box, size=8 * MIB)
                elif op == "snapshot":
                    store.snapshot(box, snap)
                elif op == "restore":
                    store.restore(box, snap)
                elif op == "clone":
                    store.clone_box(box, other)
                elif op == "remove_box":
                    store.remove_box(box)
                elif op == "remove_snapshot":
                    store.remove_snapshot(box, snap, merge=rng.random() < 0.5)
                else:
                    dest = outdir / f"export-{seed}-{i}.qcow2"
                    store.export_box(box, dest, snapshot=snap if rng.random() < 0.5 else None)
                counts[f"{op}:ok"] += 1
            except REFUSALS as exc:
                counts[f"{op}:{type(exc).__name__}"] += 1
            except Exception:  # anything else fails the test, with its traceback
                print(f"worker {seed} op {i} {op}({box!r}, {other!r}, {snap!r}) failed:",
                      file=sys.stderr)
                traceback.print_exc()
                return 1
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
