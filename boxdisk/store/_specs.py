"""The arguments of a batch (``create_boxes``, ``snapshot_boxes``), checked before any file
is touched: every offending entry is named in one error."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable

from boxdisk._errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    InvalidNameError,
    NotFoundError,
)

from ._boxes import BoxSpec
from ._core import StoreContext, check_size
from ._names import check_name

__all__ = ["box_specs", "snapshot_specs"]


def _refuse_names(bad: list[tuple[object, str]], what: str) -> None:
    if bad:
        listed = "; ".join(f"{v!r} {why}" for v, why in bad[:20])
        more = f" (and {len(bad) - 20} more)" if len(bad) > 20 else ""
        msg = f"{len(bad)} invalid {what}s in the batch: {listed}{more}"
        raise InvalidNameError(msg, field=what, value=tuple(v for v, _ in bad))


def _checked(value: object, what: str, bad: list[tuple[object, str]]) -> None:
    try:
        check_name(value, what)
    except InvalidNameError as exc:
        bad.append((value, exc.message.removeprefix(f"{what} {value!r} ")))


def _refuse_twice(ids: list[str], what: str) -> None:
    twice = sorted(i for i, n in Counter(ids).items() if n > 1)
    if twice:
        msg = f"the batch names {len(twice)} {what}s more than once: {', '.join(map(repr, twice))}"
        raise AlreadyExistsError(msg, field=what, value=tuple(twice))


def box_specs(ctx: StoreContext, specs: Iterable[str | BoxSpec], *, base: str | None,
                 size: int | None, guest_base: str | None) -> list[BoxSpec]:
    """The specs of a create_boxes call, every one checked (nothing touched yet)."""
    out = [s if isinstance(s, BoxSpec) else BoxSpec(s, base, size, guest_base) for s in specs]
    bad: list[tuple[object, str]] = []
    for s in out:
        _checked(s.id, "box id", bad)
    _refuse_names(bad, "box id")
    for s in out:
        for b in (s.base, s.guest_base):
            if b is not None:
                _checked(b, "base name", bad)
    _refuse_names(bad, "base name")
    for s in out:
        check_size(s.size)
    _refuse_twice([s.id for s in out], "box id")
    lay = ctx.layout
    taken = [s.id for s in out if os.path.lexists(lay.box_dir(s.id))]
    if taken:
        msg = f"{len(taken)} of the boxes already exist: {', '.join(map(repr, taken[:20]))}"
        raise AlreadyExistsError(msg, path=lay.boxes, field="box_id", value=tuple(taken))
    bases = sorted({b for s in out for b in (s.base, s.guest_base) if b is not None})
    missing = []
    for b in bases:
        try:
            ctx.base_image(b)
        except NotFoundError:
            missing.append(b)
    if missing:
        msg = f"the batch names {len(missing)} unknown bases: {', '.join(map(repr, missing))}"
        raise NotFoundError(msg, path=lay.bases, field="base", value=tuple(missing))
    return out


def snapshot_specs(ctx: StoreContext, specs: Iterable[str | tuple[str, str]],
                    name: str | None) -> list[tuple[str, str]]:
    """The (box, snapshot) pairs of a snapshot_boxes call, every one checked."""
    pairs: list[tuple[object, object]] = []
    for s in specs:
        if isinstance(s, tuple) and len(s) == 2:
            pairs.append((s[0], s[1]))
        else:
            if name is None:
                msg = "a box id without a snapshot name needs name="
                raise InvalidArgumentError(msg, field="name", value=s)
            pairs.append((s, name))
    bad: list[tuple[object, str]] = []
    for b, _ in pairs:
        _checked(b, "box id", bad)
    _refuse_names(bad, "box id")
    for _, n in pairs:
        _checked(n, "snapshot name", bad)
    _refuse_names(bad, "snapshot name")
    checked = [(str(b), str(n)) for b, n in pairs]
    _refuse_twice([b for b, _ in checked], "box id")
    lay = ctx.layout
    unknown = [b for b, _ in checked if not lay.box_dir(b).is_dir()]
    if unknown:
        msg = f"the batch names {len(unknown)} unknown boxes: {', '.join(map(repr, unknown))}"
        raise NotFoundError(msg, path=lay.boxes, field="box_id", value=tuple(unknown))
    taken = [f"{b}/{n}" for b, n in checked if os.path.lexists(lay.snapshot_dir(b, n))]
    if taken:
        msg = f"{len(taken)} of the snapshots already exist: {', '.join(map(repr, taken))}"
        raise AlreadyExistsError(msg, path=lay.boxes, field="snapshot", value=tuple(taken))
    return checked
