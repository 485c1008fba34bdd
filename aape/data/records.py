"""The one dataset interface: records of (relative path, global label, class name) in three splits.

Every dataset source (CoOp layouts, ImageNet and its variants, a user's folder or manifest, the
offline demo) produces a `DatasetSplits`; everything downstream (draws, base-to-new, manifests)
works on it and never looks at the file system layout again.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from aape.data.images import DataError

SPLITS = ("train", "val", "test")
_SHOW = 5  # how many culprits an error message lists before summarising the rest


class UnknownDatasetError(DataError):
    """data.dataset names no dataset we know; the message lists the known ones."""


class DatasetNotFoundError(DataError):
    """The dataset's folder or one of its required files is not where the layout says."""


class SplitFileError(DataError):
    """A split file or manifest is malformed; the message names the file and the bad entry."""


class MissingImagesError(DataError):
    """Files named by a split do not exist under the image root."""

    def __init__(self, missing: Sequence[tuple[str, str]], image_root: str | Path, source: str) -> None:
        self.missing = list(missing)
        shown = "\n    ".join(f"{split}: {path}" for split, path in self.missing[:_SHOW])
        more = f"\n    ... and {len(self.missing) - _SHOW} more" if len(self.missing) > _SHOW else ""
        super().__init__(
            f"{len(self.missing)} image(s) listed by {source} do not exist under the image root "
            f"{image_root}:\n    {shown}{more}\n"
            f"The split does not match the folder: check data.root (and data.path), that the images were "
            f"extracted completely, and that the split file belongs to this copy of the dataset; or set "
            f"data.skip_unreadable: true to drop them (they are listed in data/skipped.json)."
        )


class ClassCountError(DataError):
    """Two parts of the pipeline disagree about the classes."""


@dataclass(frozen=True, slots=True)
class Record:
    path: str  # POSIX path relative to the dataset's image root
    label: int  # global, 0-based
    classname: str


@dataclass
class DatasetSplits:
    """A dataset as the pipeline sees it. `image_root` stays as configured (relative stays relative)."""

    name: str
    image_root: str
    classnames: list[str]
    train: list[Record]
    val: list[Record]
    test: list[Record]
    split_source: str  # what the split came from, in words
    official_split: bool  # False when we generated the split (numbers then do not compare with tables)
    notes: list[str] = field(default_factory=list)
    parent_labels: list[int] | None = None  # e.g. ImageNet-A: each class's label in ImageNet
    eval_only: bool = False  # test-only datasets (ImageNet-V2/-Sketch/-A/-R)

    def split(self, name: str) -> list[Record]:
        if name not in SPLITS:
            raise KeyError(f"unknown split {name!r}; splits are {', '.join(SPLITS)}")
        return getattr(self, name)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def counts(self) -> dict[str, int]:
        return {name: len(self.split(name)) for name in SPLITS}

    def validate(self) -> "DatasetSplits":
        """Labels in range and each record's class name equal to the class list's: fail naming the record."""
        n = len(self.classnames)
        if n < 2:
            raise DataError(f"dataset {self.name} has {n} class(es) ({self.split_source}); classification needs at least 2")
        for name in SPLITS:
            for record in self.split(name):
                if not 0 <= record.label < n:
                    raise SplitFileError(
                        f"{self.split_source}: {name} record {record.path!r} has label {record.label}, "
                        f"outside 0..{n - 1} for the {n} classes of {self.name}"
                    )
                if record.classname != self.classnames[record.label]:
                    raise SplitFileError(
                        f"{self.split_source}: {name} record {record.path!r} has class name {record.classname!r} "
                        f"but label {record.label} is {self.classnames[record.label]!r} elsewhere; "
                        f"each label must have exactly one class name"
                    )
        return self


def classnames_from_records(records: Iterable[Record], source: str) -> list[str]:
    """Labels must be 0..n-1 with one name each; returns names ordered by label."""
    names: dict[int, str] = {}
    for record in records:
        known = names.setdefault(record.label, record.classname)
        if known != record.classname:
            raise SplitFileError(
                f"{source}: label {record.label} has two class names, {known!r} and {record.classname!r} "
                f"(e.g. at {record.path!r}); each label must have exactly one name"
            )
    if not names:
        raise SplitFileError(f"{source} lists no images")
    missing = sorted(set(range(max(names) + 1)) - set(names))
    if missing or min(names) < 0:
        raise SplitFileError(
            f"{source}: labels must be 0-based and contiguous; labels {missing[:_SHOW] or [min(names)]} "
            f"are missing or negative (found {len(names)} labels up to {max(names)})"
        )
    return [names[i] for i in range(len(names))]


def split_hash(train: Sequence[Record], val: Sequence[Record], test: Sequence[Record]) -> str:
    """sha256 of the split's content, independent of record order, folders and machine."""
    canonical = {
        name: sorted([r.path, r.label, r.classname] for r in records)
        for name, records in zip(SPLITS, (train, val, test))
    }
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()


def dataset_hash(splits: DatasetSplits) -> str:
    return split_hash(splits.train, splits.val, splits.test)


def find_missing_files(splits: DatasetSplits, base: Path | None = None) -> list[tuple[str, str]]:
    """(split, path) of every listed file that is not a regular file; one os.stat per file."""
    root = Path(splits.image_root) if base is None else base
    missing = []
    seen: set[str] = set()
    for name in SPLITS:
        for record in splits.split(name):
            if record.path in seen:
                continue
            seen.add(record.path)
            try:
                if not os.path.isfile(root / record.path):
                    missing.append((name, record.path))
            except OSError:
                missing.append((name, record.path))
    return missing


def check_class_count(expected: int, actual: int, what: str, fix: str | None = None) -> None:
    """Raise ClassCountError when `what` (a descriptor file, a checkpoint...) expects another class count."""
    if expected != actual:
        raise ClassCountError(
            f"{what} expects {expected} classes but the dataset has {actual}. "
            + (fix or "They must come from the same dataset and class list: rerun the stage that made it "
               "(e.g. `aape prepare-data`, then the later stages) or point to the matching file.")
        )


def check_classnames(expected: Sequence[str], actual: Sequence[str], what: str, fix: str | None = None) -> None:
    """Like check_class_count, and also names the first classes that differ."""
    check_class_count(len(expected), len(actual), what, fix)
    differ = [(i, e, a) for i, (e, a) in enumerate(zip(expected, actual)) if e != a]
    if differ:
        shown = "; ".join(f"label {i}: {e!r} vs {a!r}" for i, e, a in differ[:_SHOW])
        raise ClassCountError(
            f"{what} has the same number of classes ({len(expected)}) but {len(differ)} differ from the "
            f"dataset's ({shown}). "
            + (fix or "Regenerate it for this dataset, or use the file that belongs to it.")
        )

