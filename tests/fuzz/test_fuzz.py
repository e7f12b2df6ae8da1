"""Hypothesis fuzzing: mutated valid images through every operation that reads them.

For each seed (QEMU-made, boxdisk-made and the corpus's pristine images),
hypothesis draws a few structure-aware edits (tests/fuzz/mutate.py), writes
the result next to the seed's backing files, and the fuzz worker runs open,
map, a read of every extent, check, flatten and the header readers on it
(backing files confined to that directory), then repairs a copy (check with
``repair="all"``) and writes into another copy with boxdisk's writer: an image
that checked clean must not check corrupt after the writes. Every call must
return or raise a BoxdiskError subclass, within 2 s of CPU and 256 MiB of peak
RSS (tests/fuzz/harness.py explains how those are measured). A small store
with one of its images mutated must also survive ``verify``.

Budget: ``BOXDISK_FUZZ_EXAMPLES`` examples per seed (default 200, half that
per store image: about 3,700 inputs, under a minute on two cores).
Under CI the examples are derandomized, so a red CI run reproduces; locally
they are random and hypothesis keeps failures in .hypothesis/. The ``slow``
test runs 25 times more, randomly, with up to 8 edits per input, for hunting.
"""

from __future__ import annotations

import itertools
import os
import shutil
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .harness import Worker, problems
from .mutate import apply, mutations, parse
from .seeds import SEEDS, STORE_TARGETS, Seed, StoreSeed

pytestmark = pytest.mark.qemu

OPS = ("header", "open", "map", "read", "check", "flatten", "repair", "write")
EXAMPLES = int(os.environ.get("BOXDISK_FUZZ_EXAMPLES", "200"))
_CI = bool(os.environ.get("CI"))

_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=_CI,
    database=None if _CI else settings().database,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)


def _write(seed: Seed, data: bytes, work: Path) -> Path:
    """Write ``data`` as the seed's top image, beside (fresh copies of) its backing files."""
    d = work / seed.name
    d.mkdir(exist_ok=True)
    for name, content in seed.beside.items():
        (d / name).write_bytes(content)
    top = d / "fuzzed.qcow2"
    top.write_bytes(data)
    return top


def run_mutant(seed: Seed, data: bytes, worker: Worker, work: Path,
               ops: tuple[str, ...] = OPS) -> list[str]:
    """Run ``ops`` on ``data`` as the seed's top image; the broken promises, if any."""
    top = _write(seed, data, work)
    return problems(worker.run(top, ops, (top.parent,)))


#: What boxdisk refuses by design on a valid seed: check and repair refuse persistent
#: bitmaps; the writer refuses extended L2 entries, internal snapshots and bitmaps.
_REFUSED = {
    "q-bitmap": ("check", "repair", "write"),
    "q-extl2": ("write",),
    "c-extl2": ("write",),
    "q-snapshot": ("write",),
}


def test_every_seed_is_valid_and_clean(seeds: dict[str, Seed], worker: Worker,
                                       fuzz_dir: Path) -> None:
    """Unmutated, each seed opens, reads, checks clean, flattens, repairs and takes writes."""
    assert sorted(seeds) == sorted(SEEDS)
    for name, seed in seeds.items():
        results = worker.run(_write(seed, seed.top, fuzz_dir), OPS, (fuzz_dir / name,))
        assert not problems(results), name
        outcome = {r["op"]: r for r in results}
        for op in _REFUSED.get(name, ()):
            assert outcome.pop(op)["error"] == "UnsupportedFeatureError", (name, op)
        if "check" in outcome:
            assert outcome["check"]["value"] == "0", (name, outcome["check"])
        for r in outcome.values():
            assert r["outcome"] == "ok", (name, r)
        for op in ("repair", "write"):
            if op in outcome:
                assert outcome[op]["value"] == "(0, 0)", (name, outcome[op])


@pytest.mark.parametrize("seed_name", SEEDS)
@_SETTINGS
@given(data=st.data())
def test_mutated_image_gives_a_result_or_a_boxdisk_error(
    seed_name: str, seeds: dict[str, Seed], worker: Worker, fuzz_dir: Path, data: st.DataObject
) -> None:
    seed = seeds[seed_name]
    edits = data.draw(mutations(seed.layout), label="edits")
    found = run_mutant(seed, apply(seed.top, edits), worker, fuzz_dir)
    assert not found, "\n".join(found)


@pytest.mark.slow
@pytest.mark.parametrize("seed_name", SEEDS)
@settings(_SETTINGS, max_examples=25 * EXAMPLES, derandomize=False)
@given(data=st.data())
def test_mutated_image_long_run(seed_name: str, seeds: dict[str, Seed], worker: Worker,
                                fuzz_dir: Path, data: st.DataObject) -> None:
    seed = seeds[seed_name]
    edits = data.draw(mutations(seed.layout, max_edits=8), label="edits")
    found = run_mutant(seed, apply(seed.top, edits), worker, fuzz_dir)
    assert not found, "\n".join(found)


_copies = itertools.count()


def _remove(path: Path) -> None:
    for dirpath, dirs, files in os.walk(path):
        for name in dirs + files:
            p = Path(dirpath) / name
            if not p.is_symlink():
                p.chmod(p.stat().st_mode | stat.S_IWUSR)
    shutil.rmtree(path)


def test_template_store_verifies_clean(store_seed: StoreSeed, worker: Worker,
                                       fuzz_dir: Path) -> None:
    copy = fuzz_dir / "store-clean"
    shutil.copytree(store_seed.root, copy, symlinks=True)
    try:
        for target in STORE_TARGETS:
            results = worker.run(copy / store_seed.images[target], (*OPS, "verify"), (copy,))
            assert not problems(results)
            assert all(r["outcome"] == "ok" for r in results), results
            assert "problems=()" in results[-1]["value"], results[-1]
    finally:
        _remove(copy)


@pytest.mark.parametrize("target", STORE_TARGETS)
@settings(_SETTINGS, max_examples=max(1, EXAMPLES // 2))
@given(data=st.data())
def test_store_with_a_mutated_image_verifies_or_raises(
    target: str, store_seed: StoreSeed, worker: Worker, fuzz_dir: Path, data: st.DataObject
) -> None:
    """A copy of a small store with one image mutated: verify (and every image op) copes.

    ``verify`` must report the damage as problems or raise a BoxdiskError; the
    image itself goes through the same operations as in the tests above, its
    backing files confined to the store.
    """
    rel = store_seed.images[target]
    original = (store_seed.root / rel).read_bytes()
    edits = data.draw(mutations(parse(original)), label="edits")
    copy = fuzz_dir / f"store-{next(_copies)}"
    shutil.copytree(store_seed.root, copy, symlinks=True)
    try:
        image = copy / rel
        mode = image.stat().st_mode
        image.chmod(mode | stat.S_IWUSR)
        image.write_bytes(apply(original, edits))
        image.chmod(mode)  # snapshots and bases stay read-only, as the store keeps them
        found = problems(worker.run(image, (*OPS, "verify"), (copy,)))
    finally:
        _remove(copy)
    assert not found, "\n".join(found)
