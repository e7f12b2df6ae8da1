"""A writer process for the crash tests, and the operation stream it and the tests share.

Run as ``python -m tests.engine.crash_worker TOP SEED COUNT CLUSTER EXIT_AT``: it
opens ``TOP`` writable through boxdisk and applies the operations
:func:`operations` yields for ``SEED``. Before operation ``i`` it prints
``op i``; after a flush returns, ``flushed i``. With ``EXIT_AT >= 0`` it
dies (``os._exit``) just before its ``EXIT_AT``-th write, truncate or fsync of
the image file; otherwise it prints ``io N`` (how many it made) at the end.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Iterator
from typing import Any

Op = tuple[Any, ...]


def operations(seed: int, size: int, cluster: int, count: int, *,
               span: int = 3) -> Iterator[Op]:
    """A deterministic stream of guest operations (writes, zero writes, discards, flushes).

    Each covers at most ``span`` clusters.
    """
    rng = random.Random(seed)
    for _ in range(count):
        r = rng.random()
        off = rng.randrange(size)
        n = min(rng.randint(1, span * cluster), size - off)
        if rng.random() < 0.4:
            off -= off % cluster
            n = min(-(-n // cluster) * cluster, size - off)
        if r < 0.5:
            yield ("write", off, rng.randbytes(n))
        elif r < 0.65:
            yield ("zero", off, n)
        elif r < 0.8:
            yield ("discard", off, n)
        else:
            yield ("flush",)


def apply(op: Op, model: bytearray, below: bytes, cluster: int, v3: bool) -> None:
    """What ``op`` does to the guest's view (``below``: what the backing chain shows)."""
    if op[0] == "write":
        _, off, data = op
        model[off : off + len(data)] = data
    elif op[0] == "zero":
        _, off, n = op
        model[off : off + n] = bytes(n)
    elif op[0] == "discard":
        _, off, n = op
        size = len(model)
        first, last = -(-off // cluster), (off + n) // cluster
        if n and off + n == size:
            last = -(-size // cluster)
        for gc in range(first, last):
            s, e = gc * cluster, min(size, (gc + 1) * cluster)
            model[s:e] = bytes(e - s) if v3 else below[s:e]


def run(chain: Any, ops: Iterator[Op], out: Any) -> None:
    """Apply the operations to an open writable chain, reporting progress on ``out``."""
    for i, op in enumerate(ops):
        print(f"op {i}", file=out, flush=True)
        if op[0] == "write":
            chain.write(op[1], op[2])
        elif op[0] == "zero":
            chain.write_zeroes(op[1], op[2])
        elif op[0] == "discard":
            chain.discard(op[1], op[2])
        else:
            chain.flush()
            print(f"flushed {i}", file=out, flush=True)


def main(argv: list[str]) -> int:
    from boxdisk.chain import open_chain  # noqa: PLC0415
    from boxdisk.image._qcow2_write import Qcow2Writer  # noqa: PLC0415

    top, seed, count, cluster, exit_at = argv[0], *map(int, argv[1:5])
    calls = [0]

    def counted(name: str) -> Any:
        real = getattr(Qcow2Writer, name)

        def step(self: Any, *args: Any) -> Any:
            if calls[0] == exit_at:
                os._exit(77)
            calls[0] += 1
            return real(self, *args)

        return step

    for name in ("_pwrite", "_fsync", "_truncate"):
        setattr(Qcow2Writer, name, counted(name))
    with open_chain(top, writable=True) as chain:
        run(chain, operations(seed, chain.size, cluster, count), sys.stdout)
    print(f"io {calls[0]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
