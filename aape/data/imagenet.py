"""ImageNet and its four test-only variants, in CoOp's layout.

    imagenet/classnames.txt, imagenet/images/{train,val}/<wnid>/*      (val serves as the test set)
    imagenetv2/classnames.txt, imagenetv2/imagenetv2-matched-frequency-format-val/<0..999>/*
    imagenet-sketch/classnames.txt, imagenet-sketch/images/<wnid>/*
    imagenet-adversarial/classnames.txt, imagenet-adversarial/imagenet-a/<wnid>/*   (200 classes)
    imagenet-rendition/classnames.txt, imagenet-rendition/imagenet-r/<wnid>/*       (200 classes)

`classnames.txt` holds "wnid name" lines (CoOp's file, 1000 lines, sorted by wnid). Labels are the
position of the class folder in sorted order, as in CoOp; for A and R that is the position in their
200-class list, and `parent_labels` maps each of those classes to its ImageNet label.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from aape.data.imagenet_subsets import IMAGENET_A_WNIDS, IMAGENET_R_WNIDS
from aape.data.records import DatasetNotFoundError, DatasetSplits, SplitFileError
from aape.data.splits import list_class_dirs, records_from_class_dirs

log = logging.getLogger(__name__)

COOP_GUIDE = "github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"


@dataclass(frozen=True)
class ImageNetVariant:
    key: str
    dirname: str
    image_subdir: str
    subset: tuple[str, ...] | None = None  # the fixed class list (A, R); None = every ImageNet class


IMAGENET_VARIANTS: dict[str, ImageNetVariant] = {
    v.key: v
    for v in (
        ImageNetVariant("imagenetv2", "imagenetv2", "imagenetv2-matched-frequency-format-val"),
        ImageNetVariant("imagenet_sketch", "imagenet-sketch", "images"),
        ImageNetVariant("imagenet_a", "imagenet-adversarial", "imagenet-a", IMAGENET_A_WNIDS),
        ImageNetVariant("imagenet_r", "imagenet-rendition", "imagenet-r", IMAGENET_R_WNIDS),
    )
}


def read_classnames(path: Path) -> "OrderedDict[str, str]":
    """CoOp's ImageNet.read_classnames: "wnid class name" per line -> {wnid: name} in file order."""
    if not path.is_file():
        raise DatasetNotFoundError(
            f"{path} is missing: ImageNet datasets need CoOp's classnames.txt (\"wnid name\" per line) "
            f"in their folder; get it as {COOP_GUIDE} describes."
        )
    names: "OrderedDict[str, str]" = OrderedDict()
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, name = line.strip().partition(" ")
        if not name:
            raise SplitFileError(f"{path}, line {number}: {line!r} must be 'wnid class name'")
        names[wnid] = name
    return names


def _require_dir(path: Path, key: str) -> Path:
    if not path.is_dir():
        raise DatasetNotFoundError(
            f"dataset {key} not found: expected the folder {path}. Check data.root, or lay the dataset out as {COOP_GUIDE} describes."
        )
    return path


def _check_folders(folders: list[str], expected: list[str], where: Path, what: str) -> None:
    if folders != expected:
        extra = sorted(set(folders) - set(expected))
        missing = sorted(set(expected) - set(folders))
        raise SplitFileError(
            f"the class folders in {where} do not match {what}: {len(missing)} missing "
            f"({', '.join(missing[:5])}{'...' if len(missing) > 5 else ''}), {len(extra)} unexpected "
            f"({', '.join(extra[:5])}{'...' if len(extra) > 5 else ''}). Use the complete, original release."
        )


def load_imagenet(root: str) -> DatasetSplits:
    dataset_dir = _require_dir(Path(root) / "imagenet", "imagenet")
    names = read_classnames(dataset_dir / "classnames.txt")
    image_root = dataset_dir / "images"
    folders = list_class_dirs(_require_dir(image_root / "train", "imagenet"))
    _check_folders(folders, sorted(names), image_root / "train", f"{dataset_dir / 'classnames.txt'}")
    _check_folders(list_class_dirs(_require_dir(image_root / "val", "imagenet")), folders, image_root / "val", "images/train")
    classnames = [names[f] for f in folders]
    log.info("listing ImageNet's %d class folders (train and val)...", len(folders))
    train = records_from_class_dirs(image_root, folders, prefix="train", classnames=classnames)
    test = records_from_class_dirs(image_root, folders, prefix="val", classnames=classnames)
    note = "ImageNet: the official val set is the test set and, as in CoOp, also the validation set"
    return DatasetSplits(
        name="imagenet",
        image_root=str(image_root),
        classnames=classnames,
        train=train,
        val=list(test),
        test=test,
        split_source=f"{image_root}/{{train,val}} with {dataset_dir / 'classnames.txt'} (ILSVRC-2012 train/val)",
        official_split=True,
        notes=[note],
    ).validate()


def load_imagenet_variant(variant: ImageNetVariant, root: str) -> DatasetSplits:
    dataset_dir = _require_dir(Path(root) / variant.dirname, variant.key)
    names = read_classnames(dataset_dir / "classnames.txt")
    imagenet_order = sorted(names)  # ImageNet's labels: sorted wnids (CoOp's sorted train folders)
    image_root = _require_dir(dataset_dir / variant.image_subdir, variant.key)
    if variant.key == "imagenetv2":
        # folders are ImageNet labels 0..999; CoOp maps them through classnames.txt's line order
        wnids = list(names)
        folders = [str(i) for i in range(len(wnids))]
        _check_folders(sorted(list_class_dirs(image_root), key=_int_or_inf), folders, image_root, "folders 0..999")
        classnames = [names[w] for w in wnids]
        parent = [imagenet_order.index(w) for w in wnids]
    else:
        wnids = list(variant.subset) if variant.subset else imagenet_order
        folders = wnids
        _check_folders(list_class_dirs(image_root), folders, image_root,
                       f"the {len(wnids)} classes of {variant.key}")
        unknown = [w for w in wnids if w not in names]
        if unknown:
            raise SplitFileError(f"{dataset_dir / 'classnames.txt'} lacks {len(unknown)} wnid(s) of {variant.key}, e.g. {unknown[:3]}")
        classnames = [names[w] for w in wnids]
        parent = [imagenet_order.index(w) for w in wnids]
    test = records_from_class_dirs(image_root, folders, classnames=classnames)
    return DatasetSplits(
        name=variant.key,
        image_root=str(image_root),
        classnames=classnames,
        train=[],
        val=[],
        test=test,
        split_source=f"{image_root} (test only)",
        official_split=True,
        parent_labels=parent,
        eval_only=True,
    ).validate()


def _int_or_inf(name: str) -> float:
    return int(name) if name.isdigit() else float("inf")
