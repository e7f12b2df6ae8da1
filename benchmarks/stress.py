"""Crash and load: N processes on one store, SIGKILLed at random, every guest byte checked.

Rounds of N worker processes share one store. Each worker owns its boxes
(``w<N>b<K>``) and runs random operations on them: guest writes (half through
boxdisk's writer, half through ``qemu-io``, a real QEMU), create_box (over a
qcow2 base and a raw guest base, or standalone), snapshot, restore,
clone_box, remove_snapshot (with and without merge), remove_box, export_box,
import_box (of an export), gc and verify. Shared are the bases, the store
lock, the journal and gc: one worker's crashed operation is recovered by
whichever process next takes its locks.

Each worker keeps a model of what every disk of its boxes and snapshots must
read, one value per 4 KiB block, and records the operation it is about to run
before running it. The controller kills workers (SIGKILL to the worker and its
qemu-io) at random moments (a seeded delay after a chosen operation starts) and
at step boundaries (``BOXDISK_STORE_CRASH_AT``: the store kills itself there).
After every round it reopens the store (recovering what the dead left in
flight), repairs leaked clusters (the one thing a killed writer may leave),
runs ``qemu-img check`` on every image and ``verify()``, settles each worker's
in-flight operation from what the store shows (it happened or it did not;
a killed guest write leaves each block old or new), and reads every disk of
every box and snapshot, and every export, through QEMU, comparing each block
with the model. Losses must be 0.

The seed fixes every worker's operations and the kill plan; where a kill at
a random moment lands depends on the machine's speed.

    python benchmarks/stress.py [--seed 7] [--procs 4] [--rounds 6] [--ops 40] [--dir DIR]
    python benchmarks/stress.py ... --json      # the figures as one JSON object
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

from boxdisk import AlreadyExistsError, DependentsExistError, NotFoundError
from boxdisk import check as boxdisk_check
from boxdisk._locks import remove_stale_temps
from boxdisk.chain import open_chain
from boxdisk.store import BoxStore

BLOCK = 4096
SIZE = 4 << 20
NBLK = SIZE // BLOCK
MAX_BOXES = 6
QEMU_IMG = shutil.which("qemu-img") or "qemu-img"
QEMU_IO = shutil.which("qemu-io") or "qemu-io"
#: Step boundaries of the store (its ``crashpoint`` calls) a worker may be killed at.
STEPS = [
    "create_box:recorded", "create_box:staged", "create_box:synced", "create_box:committed",
    "create_boxes:recorded", "create_boxes:staged", "create_boxes:synced",
    "create_boxes:renamed:first", "create_boxes:committed",
    "import_box:recorded", "import_box:staged", "import_box:synced", "import_box:committed",
    "snapshot:recorded", "snapshot:staged", "snapshot:synced", "snapshot:published",
    "snapshot:renamed:disk.qcow2", "snapshot:swapped:disk.qcow2",
    "snapshot:swapped:guest-rootfs.qcow2", "snapshot:sealed", "snapshot:committed",
    "snapshot_boxes:recorded", "snapshot_boxes:staged", "snapshot_boxes:synced",
    "snapshot_boxes:published", "snapshot_boxes:swapped:disk.qcow2", "snapshot_boxes:committed",
    "restore:recorded", "restore:children", "restore:synced", "restore:swapped:disk.qcow2",
    "restore:swapped:guest-rootfs.qcow2", "restore:committed",
    "clone_box:recorded", "clone_box:frozen", "clone_box:children", "clone_box:synced",
    "clone_box:renamed:disk.qcow2", "clone_box:swapped:disk.qcow2",
    "clone_box:published", "clone_box:sealed", "clone_box:committed",
    "remove_snapshot:recorded", "remove_snapshot:rebased:0", "remove_snapshot:moved",
    "remove_snapshot:synced", "remove_snapshot:removed",
    "remove_box:recorded", "remove_box:moved", "remove_box:synced", "remove_box:removed",
]
OS_PATTERN = {i: 0x10 + i % 7 for i in range(0, NBLK, 37)}
RAW_PATTERN = {i: 0x70 + i % 5 for i in range(3, NBLK, 53)}

Blocks = list[int]


def _quiet_logging(events: Path | None) -> None:
    """Append boxdisk's operation_recovered events to ``events``; print no log lines."""

    class Recovered(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if events is not None and getattr(record, "event", None) == "operation_recovered":
                kv = getattr(record, "kv", {})
                with events.open("a") as f:
                    f.write(json.dumps({"op": kv.get("op"), "pid": os.getpid()}) + "\n")

    store_log = logging.getLogger("boxdisk.store")
    store_log.setLevel(logging.INFO)
    store_log.addHandler(Recovered())
    store_log.propagate = False


def _save(path: Path, model: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(model))
    os.replace(tmp, path)


def _pattern(d: dict[int, int]) -> Blocks:
    return [d.get(i, 0) for i in range(NBLK)]


# -- the worker ---------------------------------------------------------------------------------


class Worker:
    """One worker process: random operations on its own boxes, its model kept current."""

    def __init__(self, root: Path, model_path: Path, exports: Path, seed: int) -> None:
        self.root, self.model_path, self.exports = root, model_path, exports
        self.rng = random.Random(seed)
        self.m: dict[str, Any] = json.loads(model_path.read_text())
        self.store = BoxStore(root, lock_timeout=600)

    def _name(self, kind: str) -> str:
        self.m["next"] += 1
        return f"w{self.m['w']}{kind}{self.m['next']}"

    def choose(self) -> dict[str, Any]:
        """The next operation, from the model (so a replay with the seed makes the same)."""
        rng, boxes = self.rng, sorted(self.m["boxes"])
        if not boxes:
            return self._create()
        kinds = ["write"] * 9 + ["create", "snapshot", "snapshot", "snapshot", "restore",
                                 "restore", "clone", "clone", "rmsnap", "rmsnap", "rmsnap",
                                 "rmbox", "export", "export", "import", "gc", "verify",
                                 "create_many", "snapshot_many"]
        kind = rng.choice(kinds)
        box = rng.choice(boxes)
        snaps = sorted(self.m["boxes"][box]["snaps"])
        full = len(boxes) >= MAX_BOXES
        if kind == "create" and not full:
            return self._create()
        if kind == "create_many" and len(boxes) + 3 <= MAX_BOXES:
            return {"op": "create_many", "boxes": [self._name("b") for _ in range(3)]}
        if kind == "snapshot_many":
            few = [b for b in boxes if len(self.m["boxes"][b]["snaps"]) < 4]
            if few:
                return {"op": "snapshot_many", "snap": self._name("s"), "boxes": few}
        if kind == "snapshot" and len(snaps) < 4:
            return {"op": "snapshot", "box": box, "snap": self._name("s")}
        if kind == "restore" and snaps:
            return {"op": "restore", "box": box, "snap": rng.choice(snaps)}
        if kind == "clone" and not full:
            return {"op": "clone", "box": box, "dst": self._name("b")}
        if kind == "rmsnap" and snaps:
            return {"op": "rmsnap", "box": box, "snap": rng.choice(snaps),
                    "merge": rng.random() < 0.6}
        if kind == "rmbox" and len(boxes) > 1:
            return {"op": "rmbox", "box": box}
        if kind == "export":
            snap = rng.choice([None, *snaps])
            where = self.m["boxes"][box]["disks"] if snap is None else \
                self.m["boxes"][box]["snaps"][snap]
            guest = "guest-rootfs.qcow2" in where and rng.random() < 0.4
            return {"op": "export", "box": box, "snap": snap, "guest": guest,
                    "file": self._name("e") + ".qcow2"}
        if kind == "import" and self.m["exports"] and not full:
            return {"op": "import", "box": self._name("b"),
                    "file": rng.choice(sorted(self.m["exports"]))}
        if kind in ("gc", "verify"):
            return {"op": kind}
        disk = rng.choice(sorted(self.m["boxes"][box]["disks"]))
        ranges = []
        for _ in range(rng.randint(1, 4)):
            start = rng.randrange(NBLK)
            ranges.append([start, min(NBLK - start, rng.randint(1, 24)), rng.randint(1, 255)])
        return {"op": "write", "box": box, "disk": disk, "ranges": ranges,
                "qemu": rng.random() < 0.5}

    def _create(self) -> dict[str, Any]:
        return {"op": "create", "box": self._name("b"), "base": self.rng.random() < 0.6}

    def run(self, op: dict[str, Any]) -> str:
        """Run one operation; update the model if it happened. Returns the outcome."""
        try:
            return self._run(op)
        except (AlreadyExistsError, NotFoundError, DependentsExistError) as exc:
            return type(exc).__name__

    def _run(self, op: dict[str, Any]) -> str:
        s, m, kind = self.store, self.m, op["op"]
        boxes = m["boxes"]
        if kind == "write":
            path = self.root / "boxes" / op["box"] / op["disk"]
            if op["qemu"]:
                cmds = []
                for start, n, v in op["ranges"]:
                    cmds += ["-c", f"write -P {v} {start * BLOCK} {n * BLOCK}"]
                subprocess.run([QEMU_IO, "-f", "qcow2", *cmds, path], check=True,
                               capture_output=True)
            else:
                with open_chain(path, writable=True, allowed_roots=[self.root]) as chain:
                    for start, n, v in op["ranges"]:
                        chain.write(start * BLOCK, bytes([v]) * (n * BLOCK))
                    chain.flush()
            blocks = boxes[op["box"]]["disks"][op["disk"]]
            for start, n, v in op["ranges"]:
                blocks[start : start + n] = [v] * n
        elif kind == "create":
            if op["base"]:
                s.create_box(op["box"], base="os", guest_base="raw")
                boxes[op["box"]] = {"disks": {"disk.qcow2": _pattern(OS_PATTERN),
                                              "guest-rootfs.qcow2": _pattern(RAW_PATTERN)},
                                    "snaps": {}}
            else:
                s.create_box(op["box"], size=SIZE)
                boxes[op["box"]] = {"disks": {"disk.qcow2": [0] * NBLK}, "snaps": {}}
        elif kind == "create_many":
            s.create_boxes(op["boxes"], base="os", guest_base="raw")
            for new in op["boxes"]:
                boxes[new] = {"disks": {"disk.qcow2": _pattern(OS_PATTERN),
                                        "guest-rootfs.qcow2": _pattern(RAW_PATTERN)},
                              "snaps": {}}
        elif kind == "snapshot":
            s.snapshot(op["box"], op["snap"])
            b = boxes[op["box"]]
            b["snaps"][op["snap"]] = copy.deepcopy(b["disks"])
        elif kind == "snapshot_many":
            s.snapshot_boxes(op["boxes"], op["snap"])
            for box in op["boxes"]:
                b = boxes[box]
                b["snaps"][op["snap"]] = copy.deepcopy(b["disks"])
        elif kind == "restore":
            s.restore(op["box"], op["snap"])
            b = boxes[op["box"]]
            b["disks"] = copy.deepcopy(b["snaps"][op["snap"]])
        elif kind == "clone":
            s.clone_box(op["box"], op["dst"])
            boxes[op["dst"]] = {"disks": copy.deepcopy(boxes[op["box"]]["disks"]), "snaps": {}}
        elif kind == "rmsnap":
            s.remove_snapshot(op["box"], op["snap"], merge=op["merge"])
            del boxes[op["box"]]["snaps"][op["snap"]]
        elif kind == "rmbox":
            s.remove_box(op["box"])
            del boxes[op["box"]]
        elif kind == "export":
            s.export_box(op["box"], self.exports / op["file"], snapshot=op["snap"],
                         guest=op["guest"])
            m["exports"][op["file"]] = copy.deepcopy(_exported(m, op))
        elif kind == "import":
            s.import_box(op["box"], self.exports / op["file"])
            boxes[op["box"]] = {"disks": {"disk.qcow2": list(m["exports"][op["file"]])},
                                "snaps": {}}
        elif kind == "gc":
            s.gc()
        elif kind == "verify":
            # Other workers run meanwhile: what a killed one left (an interrupted record,
            # leaked clusters) is reported until recovered; the round's end judges.
            report = s.verify()
            kinds = sorted({"leaks" if p.kind == "check" and p.message.startswith(
                "0 corruptions") and p.message.endswith(" 0 check errors") else p.kind
                for p in report.problems})
            if set(kinds) - {"leaks"} and "interrupted" not in kinds:
                print("P " + json.dumps([[p.kind, p.path, p.message]
                                         for p in report.problems]), flush=True)
            return "ok" if report.ok else "problems:" + ",".join(kinds)
        return "ok"


def _exported(m: dict[str, Any], op: dict[str, Any]) -> Blocks:
    b = m["boxes"][op["box"]]
    disks = b["disks"] if op["snap"] is None else b["snaps"][op["snap"]]
    blocks: Blocks = disks["guest-rootfs.qcow2" if op["guest"] else "disk.qcow2"]
    return blocks


def worker_main(argv: list[str]) -> int:
    root, model_path, exports, seed, ops, events = argv
    _quiet_logging(Path(events))
    w = Worker(Path(root), Path(model_path), Path(exports), int(seed))
    with w.store:
        for i in range(int(ops)):
            op = w.choose()
            w.m["pending"] = op
            _save(w.model_path, w.m)
            print(f"B {i}", flush=True)
            try:
                outcome = w.run(op)
            except Exception:
                print(f"X {i} {json.dumps(op)}\n{traceback.format_exc()}", flush=True)
                return 3
            w.m["pending"] = None
            _save(w.model_path, w.m)
            print(f"E {i} {op['op']} {outcome}", flush=True)
    return 0


# -- the controller: kills, recovery, verification ------------------------------------------------


class Figures:
    def __init__(self) -> None:
        self.c: Counter[str] = Counter()
        self.losses: list[str] = []
        #: What verify reported during the run that no interrupted operation explains.
        self.suspect: list[str] = []

    def loss(self, what: str) -> None:
        self.losses.append(what)


def _qemu_raw(path: Path, tmp: Path) -> bytes:
    out = tmp / "read.raw"
    subprocess.run([QEMU_IMG, "convert", "-U", "-O", "raw", path, out], check=True,
                   capture_output=True)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def _blocks_of(data: bytes) -> list[int | None]:
    """Each 4 KiB block's fill byte, or None when the block is not one repeated byte."""
    out: list[int | None] = []
    for i in range(0, len(data), BLOCK):
        blk = data[i : i + BLOCK]
        v = blk[0]
        out.append(v if blk.count(v) == BLOCK else None)
    return out


def _matches(got: list[int | None], want: list[Any]) -> bool:
    return len(got) == len(want) and all(
        g == w or (isinstance(w, list) and g in w) for g, w in zip(got, want, strict=True))


class Controller:
    def __init__(self, args: argparse.Namespace, base_dir: Path) -> None:
        self.args = args
        self.dir = base_dir
        self.root = base_dir / "store"
        self.exports = base_dir / "exports"
        self.models = base_dir / "models"
        self.tmp = base_dir / "tmp"
        self.events = base_dir / "events.jsonl"
        self.rng = random.Random(args.seed)
        self.f = Figures()

    # -- setup ----------------------------------------------------------------------

    def setup(self) -> None:
        for d in (self.exports, self.models, self.tmp):
            d.mkdir(parents=True)
        src = self.tmp / "os.qcow2"
        subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", src, str(SIZE)], check=True)
        cmds = []
        for i, v in OS_PATTERN.items():
            cmds += ["-c", f"write -P {v} {i * BLOCK} {BLOCK}"]
        subprocess.run([QEMU_IO, "-f", "qcow2", *cmds, src], check=True, capture_output=True)
        raw = self.tmp / "raw.raw"
        with raw.open("wb") as f:
            f.truncate(SIZE)
            for i, v in RAW_PATTERN.items():
                f.seek(i * BLOCK)
                f.write(bytes([v]) * BLOCK)
        with BoxStore(self.root) as store:
            store.add_base(src, "os", backing_format="qcow2")
            store.add_base(raw, "raw", backing_format="raw")
        src.unlink()
        raw.unlink()
        for w in range(self.args.procs):
            _save(self.models / f"w{w}.json",
                  {"w": w, "next": 0, "boxes": {}, "exports": {}, "pending": None})

    # -- one round ------------------------------------------------------------------

    def round(self, r: int) -> None:
        a, rng = self.args, self.rng
        procs: dict[int, subprocess.Popen[str]] = {}
        plan: dict[int, tuple[int, float]] = {}  # worker -> (op index, delay s)
        steps: dict[int, str] = {}
        for w in range(a.procs):
            env = dict(os.environ)
            if rng.random() < a.step_kills:
                steps[w] = env["BOXDISK_STORE_CRASH_AT"] = rng.choice(STEPS)
            if rng.random() < a.random_kills:
                plan[w] = (rng.randrange(a.ops), rng.uniform(0.0, 0.03))
            seed = a.seed * 1_000_003 + r * 1009 + w
            procs[w] = subprocess.Popen(
                [sys.executable, __file__, "worker", os.fspath(self.root),
                 os.fspath(self.models / f"w{w}.json"), os.fspath(self.exports), str(seed),
                 str(a.ops), os.fspath(self.events)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                start_new_session=True)
        killed: set[int] = set()
        due: dict[int, float] = {}
        outs: dict[int, list[str]] = {w: [] for w in procs}
        open_ = {procs[w].stdout.fileno(): w for w in procs}  # type: ignore[union-attr]
        while open_:
            now = time.monotonic()
            for w, t in list(due.items()):
                if now >= t:
                    del due[w]
                    if procs[w].poll() is None:
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(procs[w].pid, signal.SIGKILL)
                        killed.add(w)
            timeout = max(0.0, min(due.values()) - now) if due else 1.0
            ready, _, _ = select.select(list(open_), [], [], timeout)
            for fd in ready:
                w = open_[fd]
                line = procs[w].stdout.readline()  # type: ignore[union-attr]
                if not line:
                    del open_[fd]
                    continue
                outs[w].append(line)
                if line.startswith("P "):
                    self.f.suspect.append(f"round {r} worker {w}: {line[2:].strip()}")
                if line.startswith("B ") and w in plan and int(line.split()[1]) == plan[w][0]:
                    due[w] = time.monotonic() + plan[w][1]
                elif line.startswith("E "):
                    _, _i, kind, outcome = line.split()
                    self.f.c["operations run"] += 1
                    self.f.c[f"op {kind}"] += 1
                    if outcome.startswith("problems:"):
                        kinds = outcome.removeprefix("problems:").split(",")
                        # An interrupted operation not yet recovered explains what else
                        # verify sees (a half-moved image); anything alone is suspect.
                        key = "interrupted" if "interrupted" in kinds else ",".join(kinds)
                        self.f.c[f"verify during the run found: {key}"] += 1
                    elif outcome != "ok":
                        self.f.c["operations refused (documented refusals)"] += 1
        for w, p in procs.items():
            rc = p.wait()
            err = p.stderr.read()  # type: ignore[union-attr]
            p.stdout.close()  # type: ignore[union-attr]
            p.stderr.close()  # type: ignore[union-attr]
            if rc == -signal.SIGKILL:
                if w in killed:
                    self.f.c["kills at random moments"] += 1
                else:
                    self.f.c["kills at step boundaries"] += 1
                self.f.c["operations interrupted"] += 1
            elif rc != 0:
                x = next((i for i, line in enumerate(outs[w]) if line.startswith("X ")), -3)
                self.f.loss(f"round {r} worker {w} failed (exit {rc}): "
                            f"{''.join(outs[w][x:])}{err[-3000:]}")
        self.f.c["processes"] += len(procs)
        self.check(r)

    # -- after a round: recover, repair leaks, check, compare with the models ----------

    def check(self, r: int) -> None:
        journal = self.root / ".boxdisk" / "journal"
        self.f.c["recoveries at reopen"] += len([n for n in os.listdir(journal)
                                                 if n.endswith(".json")])
        with BoxStore(self.root) as store:
            gc = store.gc()
            self.f.c["leftovers gc removed"] += len(gc.leftovers)
            images = [Path(n.path) for n in store.graph() if n.path.endswith(".qcow2")]
            for img in images:
                report = boxdisk_check(img)
                if report.corruptions or report.check_errors:
                    self.f.loss(f"round {r}: {img}: {report.corruptions} corruptions")
                elif report.leaks:
                    boxdisk_check(img, repair="leaks")
                    self.f.c["images with leaked clusters repaired"] += 1
            for img in images:
                proc = subprocess.run([QEMU_IMG, "check", "--output=json", img],
                                      capture_output=True, text=True, check=False)
                rep = json.loads(proc.stdout) if proc.stdout else {}
                if proc.returncode != 0 or any(rep.get(k) for k in
                                               ("corruptions", "leaks", "check-errors")):
                    self.f.loss(f"round {r}: qemu-img check {img}: {proc.stdout}{proc.stderr}")
                self.f.c["images verified (qemu-img check)"] += 1
            report = store.verify()
            self.f.c["store verifications"] += 1
            for p in report.problems:
                self.f.loss(f"round {r}: verify: {p.kind}: {p.path}: {p.message}")
            for w in range(self.args.procs):
                self.settle(store, w)
        for name in os.listdir(self.exports):
            (self.exports / name).unlink()

    def settle(self, store: Any, w: int) -> None:
        """Settle worker ``w``'s in-flight operation from the store, then check every byte."""
        path = self.models / f"w{w}.json"
        m = json.loads(path.read_text())
        op = m.pop("pending")
        m["pending"] = None
        boxes = m["boxes"]
        present = {b for b in store.list_boxes() if b.startswith(f"w{w}b")}
        alternatives: dict[str, list[dict[str, Any]]] = {}
        if op is not None:
            kind = op["op"]
            if kind == "write":
                blocks = boxes[op["box"]]["disks"][op["disk"]]
                for start, n, v in op["ranges"]:
                    for i in range(start, start + n):
                        old = blocks[i] if isinstance(blocks[i], list) else [blocks[i]]
                        blocks[i] = sorted({*old, v})
            elif kind in ("create", "clone", "import"):
                new = op["box"] if kind != "clone" else op["dst"]
                if new in present:
                    if kind == "create":
                        disks = ({"disk.qcow2": _pattern(OS_PATTERN),
                                  "guest-rootfs.qcow2": _pattern(RAW_PATTERN)} if op["base"]
                                 else {"disk.qcow2": [0] * NBLK})
                    elif kind == "clone":
                        disks = copy.deepcopy(boxes[op["box"]]["disks"])
                    else:
                        disks = {"disk.qcow2": list(m["exports"][op["file"]])}
                    boxes[new] = {"disks": disks, "snaps": {}}
            elif kind == "create_many":
                made = [b for b in op["boxes"] if b in present]
                if made and made != op["boxes"]:
                    self.f.loss(f"worker {w}: a batch made {made} of {op['boxes']}")
                for new in made:
                    boxes[new] = {"disks": {"disk.qcow2": _pattern(OS_PATTERN),
                                            "guest-rootfs.qcow2": _pattern(RAW_PATTERN)},
                                  "snaps": {}}
            elif kind == "snapshot":
                if op["snap"] in store.box(op["box"]).snapshots:
                    b = boxes[op["box"]]
                    b["snaps"][op["snap"]] = copy.deepcopy(b["disks"])
            elif kind == "snapshot_many":
                taken = [b for b in op["boxes"] if op["snap"] in store.box(b).snapshots]
                if taken and taken != op["boxes"]:
                    self.f.loss(f"worker {w}: a batch snapshotted {taken} of {op['boxes']}")
                for box in taken:
                    b = boxes[box]
                    b["snaps"][op["snap"]] = copy.deepcopy(b["disks"])
            elif kind == "restore":
                b = boxes[op["box"]]
                alternatives[op["box"]] = [copy.deepcopy(b["disks"]),
                                           copy.deepcopy(b["snaps"][op["snap"]])]
            elif kind == "rmsnap":
                if op["snap"] not in store.box(op["box"]).snapshots:
                    del boxes[op["box"]]["snaps"][op["snap"]]
            elif kind == "rmbox":
                if op["box"] not in present:
                    del boxes[op["box"]]
            elif kind == "export":
                out = self.exports / op["file"]
                self.f.c["stale export temp files removed"] += remove_stale_temps(
                    os.fspath(self.exports), op["file"])
                if out.exists():
                    m["exports"][op["file"]] = copy.deepcopy(_exported(m, op))
        if set(boxes) != present:
            self.f.loss(f"worker {w}: boxes {sorted(present)} in the store, "
                        f"{sorted(boxes)} in the model")
        for box in sorted(set(boxes) & present):
            self.check_box(store, w, box, boxes[box], alternatives.get(box))
        for name, blocks in m["exports"].items():
            got = _blocks_of(_qemu_raw(self.exports / name, self.tmp))
            self.f.c["bytes of guest data checked"] += SIZE
            self.f.c["exports checked"] += 1
            if not _matches(got, blocks):
                self.f.loss(f"worker {w}: export {name} differs from the model")
        m["exports"] = {}
        _save(path, m)

    def check_box(self, store: Any, w: int, box: str, b: dict[str, Any],
                  alternatives: list[dict[str, Any]] | None) -> None:
        bdir = self.root / "boxes" / box
        snaps = set(store.box(box).snapshots)
        if snaps != set(b["snaps"]):
            self.f.loss(f"worker {w}: {box} has snapshots {sorted(snaps)}, "
                        f"the model {sorted(b['snaps'])}")
        for name in sorted(snaps & set(b["snaps"])):
            for disk, blocks in b["snaps"][name].items():
                self._compare(bdir / "snapshots" / name / disk, [blocks])
        live = alternatives or [b["disks"]]
        read = {disk: _blocks_of(_qemu_raw(bdir / disk, self.tmp)) for disk in live[0]}
        self.f.c["bytes of guest data checked"] += SIZE * len(read)
        self.f.c["disks checked"] += len(read)
        for cand in live:
            if all(_matches(read[d], cand[d]) for d in read):
                b["disks"] = {d: list(read[d]) for d in read}  # settled: exactly what is read
                return
        self.f.loss(f"worker {w}: {box}'s live disks read neither as before nor as after "
                    f"its last operation")

    def _compare(self, path: Path, candidates: list[Blocks]) -> None:
        got = _blocks_of(_qemu_raw(path, self.tmp))
        self.f.c["bytes of guest data checked"] += SIZE
        self.f.c["disks checked"] += 1
        if not any(_matches(got, c) for c in candidates):
            bad = sum(1 for g, c in zip(got, candidates[0], strict=True) if g != c)
            self.f.loss(f"{path}: {bad} blocks differ from the model")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        return worker_main(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--procs", type=int, default=4)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--ops", type=int, default=40, help="operations per worker per round")
    p.add_argument("--random-kills", type=float, default=0.5,
                   help="chance that a worker is killed at a random moment in a round")
    p.add_argument("--step-kills", type=float, default=0.3,
                   help="chance that a worker is given a step boundary to die at")
    p.add_argument("--dir", type=Path, default=None, help="where the store goes (a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the store afterwards")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    a = p.parse_args()
    base = Path(tempfile.mkdtemp(prefix="boxdisk-stress-", dir=a.dir))
    ctl = Controller(a, base)
    _quiet_logging(ctl.events)
    start = time.perf_counter()
    recovered: Counter[str] = Counter()
    try:
        ctl.setup()
        for r in range(a.rounds):
            ctl.round(r)
        with contextlib.suppress(FileNotFoundError):
            for line in ctl.events.read_text().splitlines():
                recovered[json.loads(line)["op"]] += 1
    finally:
        if not a.keep:
            shutil.rmtree(base, ignore_errors=True)
    f = ctl.f
    figures = {
        "seed": a.seed,
        "rounds": a.rounds,
        "processes": f.c["processes"],
        "operations run": f.c["operations run"] + f.c["operations interrupted"],
        "operations completed": f.c["operations run"],
        "operations refused (documented refusals)":
            f.c["operations refused (documented refusals)"],
        "kills injected": f.c["kills at random moments"] + f.c["kills at step boundaries"],
        "kills at random moments": f.c["kills at random moments"],
        "kills at step boundaries": f.c["kills at step boundaries"],
        "recoveries": sum(recovered.values()),
        "recoveries by operation": dict(sorted(recovered.items())),
        "images with leaked clusters repaired": f.c["images with leaked clusters repaired"],
        "images verified (qemu-img check)": f.c["images verified (qemu-img check)"],
        "store verifications": f.c["store verifications"],
        "disks and snapshots checked": f.c["disks checked"],
        "exports checked": f.c["exports checked"],
        "bytes of guest data checked": f.c["bytes of guest data checked"],
        "losses": len(f.losses),
        "seconds": round(time.perf_counter() - start, 1),
        "operations by kind": {k[3:]: v for k, v in sorted(f.c.items()) if k.startswith("op ")},
        "verify during the run found": {k.rsplit(": ", 1)[1]: v for k, v in sorted(f.c.items())
                                        if k.startswith("verify during")},
    }
    if a.json:
        print(json.dumps(figures))
    else:
        width = max(len(k) for k in figures)
        for k, v in figures.items():
            print(f"{k:<{width}}  {v}")
    for loss in f.losses:
        print(f"LOSS: {loss}", file=sys.stderr)
    for s in f.suspect:
        print(f"verify during the run, unexplained: {s}", file=sys.stderr)
    return 1 if f.losses else 0


if __name__ == "__main__":
    sys.exit(main())
