"""The few-shot and base-to-new protocols (docs/method.md, "Protocols"), deterministic by construction.

A draw ranks each class's images by sha256(tag, seed, relative path) and keeps the first K. It
therefore depends only on the split's content and the seed: not on listing order, absolute paths,
Python's hash(), numpy's version or the machine. Adding or removing one image changes a draw only
if that image ranks among the K kept. A class with fewer than K images gives all it has, with a
warning, as CoOp's generate_fewshot_dataset does (repeat=False).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

from aape.data.images import DataError
from aape.data.records import Record
from aape.data.splits import by_label, ranked

log = logging.getLogger(__name__)

PROTOCOLS = ("base2new", "fewshot")


@dataclass(frozen=True)
class Shortfall:
    label: int
    classname: str
    available: int
    wanted: int


def draw_tag(split: str, seed: int) -> str:
    return f"aape-fewshot:{split}:seed={seed}"


def draw_fewshot(
    records: Sequence[Record],
    shots: int,
    seed: int,
    split: str = "train",
    classes: Iterable[int] | None = None,
    shortfalls: list[Shortfall] | None = None,
) -> list[Record]:
    """K images per class (of `classes`, default all present), sorted by (label, path)."""
    if shots < 1:
        raise DataError(f"shots must be at least 1, got {shots}")
    groups = by_label(records)
    wanted = sorted(groups) if classes is None else sorted(set(classes))
    drawn: list[Record] = []
    for label in wanted:
        items = groups.get(label, [])
        if not items:
            raise DataError(
                f"class with label {label} has no {split} images, so no {shots}-shot draw is possible; "
                f"check the split file or the class list"
            )
        if len(items) < shots:
            short = Shortfall(label, items[0].classname, len(items), shots)
            log.warning("%s: class %r has only %d image(s) for %d shots; taking all of them", split, short.classname, len(items), shots)
            if shortfalls is not None:
                shortfalls.append(short)
        drawn += ranked(items, draw_tag(split, seed))[:shots]
    return sorted(drawn, key=lambda r: (r.label, r.path))


def cap_per_class(records: Sequence[Record], per_class: int | None, tag: str = "aape-test-cap") -> list[Record]:
    """At most `per_class` records per class, the same ones for every seed and machine (None = all)."""
    if per_class is None:
        return sorted(records, key=lambda r: (r.label, r.path))
    kept: list[Record] = []
    for items in by_label(records).values():
        kept += ranked(items, tag)[:per_class]
    return sorted(kept, key=lambda r: (r.label, r.path))


def base_new_split(labels: Iterable[int]) -> tuple[list[int], list[int]]:
    """Classes sorted by label: the first ceil(n/2) are base, the rest new (CoOp's subsample_classes)."""
    ordered = sorted(set(labels))
    if len(ordered) < 2:
        raise DataError(f"base-to-new needs at least 2 classes, got {len(ordered)}")
    m = math.ceil(len(ordered) / 2)
    return ordered[:m], ordered[m:]


def class_plan(protocol: str, labels: Iterable[int]) -> tuple[list[int], dict[str, list[int]]]:
    """(train_classes, eval_sets) for classes.json."""
    ordered = sorted(set(labels))
    if protocol == "base2new":
        base, new = base_new_split(ordered)
        return base, {"base": base, "new": new}
    if protocol == "fewshot":
        return ordered, {"all": ordered}
    raise DataError(f"unknown data.protocol {protocol!r}; protocols are {', '.join(PROTOCOLS)}")
