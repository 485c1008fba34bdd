"""CoOp's split files and CoOp's way of splitting a dataset that has none, made deterministic.

CoOp's `split_zhou_<Name>.json` is `{"train"|"val"|"test": [[relative_path, label, class_name], ...]}`.
When it is absent CoOp shuffles with Python's global `random` (so every user got a different split);
we keep its proportions and rounding but order each class by a sha256 of the relative path, so the
generated split depends only on the file names, never on listing order, absolute paths or machine.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from aape.atomic import atomic_write_json
from aape.data.images import DataError, is_image_file
from aape.data.records import SPLITS, Record, SplitFileError, classnames_from_records

# CoOp's proportions (DescribableTextures.read_and_split_data, OxfordPets.split_trainval)
P_TRAIN, P_VAL = 0.5, 0.2
P_VAL_OF_TRAINVAL = 0.2


def rank_key(tag: str, path: str) -> tuple[bytes, str]:
    """A pseudo-random but reproducible sort key: depends on the tag and the relative path only."""
    return hashlib.sha256(f"{tag}\x00{path}".encode()).digest(), path


def ranked(records: Iterable[Record], tag: str) -> list[Record]:
    return sorted(records, key=lambda r: rank_key(tag, r.path))


def by_label(records: Iterable[Record]) -> dict[int, list[Record]]:
    groups: dict[int, list[Record]] = defaultdict(list)
    for record in records:
        groups[record.label].append(record)
    return dict(sorted(groups.items()))


def _sorted(records: Iterable[Record]) -> list[Record]:
    return sorted(records, key=lambda r: (r.label, r.path))


# -- reading and writing split files --------------------------------------------------------------
def read_split_file(path: Path) -> tuple[list[Record], list[Record], list[Record], list[str]]:
    """Parse a split_zhou-style JSON; returns train, val, test and the class names by label."""
    try:
        content = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise SplitFileError(f"split file {path} is not valid JSON ({exc}); replace it with an intact copy") from None
    if not isinstance(content, dict) or not all(k in content for k in SPLITS):
        found = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise SplitFileError(f"split file {path} must hold the keys train, val and test (found {found})")
    parts = []
    for name in SPLITS:
        records = []
        for i, entry in enumerate(content[name]):
            if not (isinstance(entry, (list, tuple)) and len(entry) == 3):
                raise SplitFileError(
                    f"split file {path}: {name}[{i}] is {entry!r}; each entry must be [relative_path, label, class_name]"
                )
            rel, label, classname = entry
            try:
                records.append(Record(_posix(str(rel)), int(label), str(classname)))
            except (TypeError, ValueError):
                raise SplitFileError(f"split file {path}: {name}[{i}] has a non-integer label {label!r}") from None
        parts.append(records)
    classnames = classnames_from_records((r for part in parts for r in part), f"split file {path}")
    return parts[0], parts[1], parts[2], classnames


def write_split_file(path: Path, train: Sequence[Record], val: Sequence[Record], test: Sequence[Record]) -> None:
    content = {name: [[r.path, r.label, r.classname] for r in part] for name, part in zip(SPLITS, (train, val, test))}
    atomic_write_json(path, content)




def _posix(path: str) -> str:
    return path.replace("\\", "/").lstrip("/")


# -- CoOp's splitting rules, deterministic ---------------------------------------------------------
def split_by_proportion(
    records: Sequence[Record], source: str, p_train: float = P_TRAIN, p_val: float = P_VAL
) -> tuple[list[Record], list[Record], list[Record]]:
    """CoOp's read_and_split_data: per class round(n*p_train) train, round(n*p_val) val, rest test."""
    train, val, test = [], [], []
    for label, items in by_label(records).items():
        items = ranked(items, "aape-split")
        n = len(items)
        n_train, n_val = round(n * p_train), round(n * p_val)
        if n_train <= 0 or n_val <= 0 or n - n_train - n_val <= 0:
            raise DataError(
                f"class {items[0].classname!r} (label {label}) in {source} has {n} image(s): too few to split "
                f"{p_train:.0%}/{p_val:.0%}/{1 - p_train - p_val:.0%} into train/val/test with at least one "
                f"image each. Add images (at least 4 per class) or remove the class."
            )
        train += items[:n_train]
        val += items[n_train : n_train + n_val]
        test += items[n_train + n_val :]
    return _sorted(train), _sorted(val), _sorted(test)


def split_trainval(records: Sequence[Record], source: str, p_val: float = P_VAL_OF_TRAINVAL) -> tuple[list[Record], list[Record]]:
    """CoOp's OxfordPets.split_trainval: per class round(n*p_val) images go to val, the rest to train."""
    train, val = [], []
    for label, items in by_label(records).items():
        items = ranked(items, "aape-trainval")
        n_val = round(len(items) * p_val)
        if n_val <= 0 or n_val >= len(items):
            raise DataError(
                f"class {items[0].classname!r} (label {label}) in {source} has {len(items)} training image(s): "
                f"too few to hold out {p_val:.0%} for validation and keep the rest for training (need at least 3)."
            )
        val += items[:n_val]
        train += items[n_val:]
    return _sorted(train), _sorted(val)


# -- folders of class folders ------------------------------------------------------------------------
def list_class_dirs(folder: Path, ignored: Iterable[str] = ()) -> list[str]:
    """Visible sub-folders, sorted (CoOp's listdir_nohidden + sort; Python's case-sensitive order)."""
    skip = set(ignored)
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        raise DataError(f"folder {folder} does not exist") from None
    return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith(".") and e.name not in skip)


def list_images(folder: Path) -> list[str]:
    """Image file names directly inside `folder`, sorted."""
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and is_image_file(e.name))


def records_from_class_dirs(
    image_root: Path,
    classes: Sequence[str],
    prefix: str = "",
    renames: Mapping[str, str] | None = None,
    classnames: Sequence[str] | None = None,
) -> list[Record]:
    """One record per image of image_root/prefix/<class>/; label = position in `classes`.

    The class name is `classnames[label]` when given, else the folder name after `renames`.
    """
    records = []
    for label, cls in enumerate(classes):
        rel_dir = f"{prefix}/{cls}" if prefix else cls
        name = classnames[label] if classnames is not None else (renames or {}).get(cls, cls)
        for file_name in list_images(image_root / rel_dir):
            records.append(Record(f"{rel_dir}/{file_name}", label, name))
    return records


def splits_classnames(train: Sequence[Record], val: Sequence[Record], test: Sequence[Record], source: str) -> list[str]:
    return classnames_from_records([*train, *val, *test], source)
