"""A user's own data: a folder with one sub-folder per class, or a CSV/Parquet manifest.

folder (data.path = the folder):
    <path>/<class>/*.jpg                       split per class 50/20/30 into train/val/test, deterministic
    <path>/{train,val,test}/<class>/*.jpg      the given split; without val, 20% of train becomes val
  Class names are the folder names; labels follow their sorted order.

manifest (data.path = a .csv or .parquet file) with columns path, label, classname and optionally split
(train/val/test). Paths are relative to the manifest's folder. Without a split column the records are
split 50/20/30 like a folder; with one that lacks val, 20% of train becomes val.
"""

from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath

from aape.data.images import DataError
from aape.data.records import SPLITS, DatasetNotFoundError, DatasetSplits, Record, SplitFileError, classnames_from_records
from aape.data.splits import list_class_dirs, records_from_class_dirs, split_by_proportion, split_trainval

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("path", "label", "classname")
GENERATED = "deterministic {how} split (not an official split)"


def _need_path(path: str | None, kind: str) -> Path:
    if not path:
        what = "an image folder with one sub-folder per class" if kind == "folder" else "a CSV or Parquet manifest"
        raise DataError(f"data.dataset is '{kind}' but data.path is not set; set data.path to {what}")
    resolved = Path(path)
    if not resolved.exists():
        raise DatasetNotFoundError(f"data.path {path} does not exist (data.dataset: {kind})")
    return resolved


def load_folder(path: str | None) -> DatasetSplits:
    folder = _need_path(path, "folder")
    if not folder.is_dir():
        raise DataError(f"data.path {folder} is not a folder; data.dataset 'folder' needs a folder of class folders")
    subdirs = list_class_dirs(folder)
    if subdirs and set(subdirs) <= set(SPLITS) and {"train", "test"} <= set(subdirs):
        return _load_presplit_folder(folder, subdirs)
    if not subdirs:
        raise DataError(f"{folder} has no class sub-folders; put each class's images in {folder}/<class name>/")
    records = records_from_class_dirs(folder, subdirs)
    _no_empty_classes(folder, subdirs, records)
    train, val, test = split_by_proportion(records, str(folder))
    return _splits("folder", folder, subdirs, train, val, test, GENERATED.format(how="50/20/30"))


def _load_presplit_folder(folder: Path, parts: list[str]) -> DatasetSplits:
    classes = list_class_dirs(folder / "train")
    for part in parts:
        found = list_class_dirs(folder / part)
        if found != classes:
            raise SplitFileError(
                f"{folder / part} has class folders {sorted(set(found) ^ set(classes))[:5]} that "
                f"{folder / 'train'} does not (or the other way round); every split needs the same class folders"
            )
    loaded = {p: records_from_class_dirs(folder, classes, prefix=p) for p in parts}
    _no_empty_classes(folder / "train", classes, loaded["train"])
    if "val" in loaded:
        train, val, how = loaded["train"], loaded["val"], "the folder's own train/val/test split"
    else:
        train, val = split_trainval(loaded["train"], str(folder / "train"))
        how = "the folder's own train/test split; val = a deterministic 20% of train"
    return _splits("folder", folder, classes, train, val, loaded["test"], how, official=True)


def _no_empty_classes(folder: Path, classes: list[str], records: list[Record]) -> None:
    present = {r.label for r in records}
    empty = [c for i, c in enumerate(classes) if i not in present]
    if empty:
        raise DataError(f"class folder(s) {empty[:5]} in {folder} contain no images (.jpg, .png, ...); add images or remove them")


def _splits(kind: str, root: Path, classes: list[str], train, val, test, how: str, official: bool = False) -> DatasetSplits:
    if not official:
        log.warning("%s %s: %s", kind, root, how)
    return DatasetSplits(
        name=kind,
        image_root=str(root),
        classnames=list(classes),
        train=train,
        val=val,
        test=test,
        split_source=f"{root}: {how}",
        official_split=official,
        notes=[] if official else [f"{how}: numbers do not compare with other splits of these images"],
    ).validate()


def read_manifest_table(path: Path):
    import pandas as pd

    try:
        if path.suffix.lower() == ".parquet":
            table = pd.read_parquet(path)
        elif path.suffix.lower() in (".csv", ".tsv"):
            table = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",", dtype={"path": str, "classname": str})
        else:
            raise DataError(f"manifest {path} must end in .csv, .tsv or .parquet")
    except DataError:
        raise
    except Exception as exc:  # pandas/pyarrow raise many types for corrupt files
        raise SplitFileError(f"cannot read manifest {path}: {type(exc).__name__}: {exc}") from None
    missing = [c for c in MANIFEST_COLUMNS if c not in table.columns]
    if missing:
        raise SplitFileError(
            f"manifest {path} lacks column(s) {missing}; it needs path, label, classname "
            f"(and optionally split) - found {list(table.columns)}"
        )
    return table


def load_manifest(path: str | None) -> DatasetSplits:
    manifest = _need_path(path, "manifest")
    table = read_manifest_table(manifest)
    records_by_split: dict[str, list[Record]] = {s: [] for s in SPLITS}
    has_split = "split" in table.columns
    for row_number, row in enumerate(table.itertuples(index=False), start=2 if manifest.suffix != ".parquet" else 0):
        rel = str(row.path).replace("\\", "/")
        where = f"manifest {manifest}, row {row_number}"
        if PurePosixPath(rel).is_absolute() or ".." in PurePosixPath(rel).parts:
            raise SplitFileError(f"{where}: path {rel!r} must be relative to the manifest's folder {manifest.parent} (no '..')")
        try:
            label = int(row.label)
        except (TypeError, ValueError):
            raise SplitFileError(f"{where}: label {row.label!r} is not an integer") from None
        split = str(row.split).strip().lower() if has_split else "train"
        if split not in SPLITS:
            raise SplitFileError(f"{where}: split {row.split!r} must be one of {', '.join(SPLITS)}")
        records_by_split[split].append(Record(rel, label, str(row.classname)))
    everything = [r for part in records_by_split.values() for r in part]
    classnames = classnames_from_records(everything, f"manifest {manifest}")
    if not has_split:
        train, val, test = split_by_proportion(everything, str(manifest))
        how = GENERATED.format(how="50/20/30")
    else:
        if not records_by_split["test"]:
            raise SplitFileError(f"manifest {manifest} has a split column but no 'test' rows; add test rows or drop the column")
        if records_by_split["val"]:
            train, val, how = records_by_split["train"], records_by_split["val"], "the manifest's own split"
        else:
            train, val = split_trainval(records_by_split["train"], str(manifest))
            how = "the manifest's train/test split; val = a deterministic 20% of train"
        test = records_by_split["test"]
    return _splits("manifest", manifest.parent, classnames, train, val, test, how, official=has_split)
