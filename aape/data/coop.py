"""The 11 few-shot datasets in CoOp's layout (DATASETS.md of KaiyangZhou/CoOp), read as CoOp reads them.

`$ROOT/<dirname>/split_zhou_<SplitName>.json` is the community's split: when present it is used as is
(class names included, exactly as CoOp prints them). When it is absent, the split is rebuilt from the
dataset's own files following CoOp's code (same proportions, class-name rules and label order), with
a deterministic order instead of CoOp's unseeded shuffle, and flagged as not the official split.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from aape.data.records import DatasetNotFoundError, DatasetSplits, Record, SplitFileError
from aape.data.splits import (
    list_class_dirs,
    read_split_file,
    records_from_class_dirs,
    split_by_proportion,
    split_trainval,
    splits_classnames,
)

log = logging.getLogger(__name__)

Parts = tuple[list[Record], list[Record], list[Record]]

# CoOp's class-name rules (datasets/caltech101.py, datasets/eurosat.py)
CALTECH_IGNORED = ("BACKGROUND_Google", "Faces_easy")
CALTECH_RENAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}
EUROSAT_RENAMES = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}
# folder name -> CoOp's class name, per dataset key; other loaders keep the names they read
CLASS_RENAMES: dict[str, dict[str, str]] = {"caltech101": CALTECH_RENAMES, "eurosat": EUROSAT_RENAMES}


@dataclass(frozen=True)
class CoopDataset:
    key: str  # our dataset key (data.dataset)
    dirname: str  # folder under data.root
    image_subdir: str  # image root inside it ("" = the dataset folder itself)
    split_name: str | None  # split_zhou_<split_name>.json; None when the official lists are the split
    rebuild: Callable[[Path, Path], Parts]  # (dataset_dir, image_dir) -> split, when no split file
    rebuild_from: str  # which files the rebuild reads, for messages
    torchvision: str | None = None  # torchvision class that can download it

    @property
    def split_file_name(self) -> str | None:
        return f"split_zhou_{self.split_name}.json" if self.split_name else None


def _require(path: Path, spec_key: str, what: str) -> Path:
    if not path.exists():
        raise DatasetNotFoundError(
            f"{what} {path} is missing for dataset {spec_key}. Lay the dataset out as CoOp's DATASETS.md "
            f"describes (github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md), or add its split_zhou_*.json file."
        )
    return path


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


# -- rebuilds, one per dataset, following CoOp's datasets/*.py -------------------------------------
def _folder_split(ignored=(), renames=None) -> Callable[[Path, Path], Parts]:
    def rebuild(dataset_dir: Path, image_dir: Path) -> Parts:
        _require(image_dir, dataset_dir.name, "image folder")
        classes = list_class_dirs(image_dir, ignored)
        records = records_from_class_dirs(image_dir, classes, renames=renames)
        return split_by_proportion(records, str(image_dir))

    return rebuild


def _pets(dataset_dir: Path, image_dir: Path) -> Parts:
    def read(name: str) -> list[Record]:
        path = _require(dataset_dir / "annotations" / name, "oxford_pets", "annotation file")
        records = []
        for line in _lines(path):
            imname, label = line.split(" ")[:2]
            breed = "_".join(imname.split("_")[:-1]).lower()
            records.append(Record(f"{imname}.jpg", int(label) - 1, breed))
        return records

    train, val = split_trainval(read("trainval.txt"), str(dataset_dir / "annotations" / "trainval.txt"))
    return train, val, sorted(read("test.txt"), key=lambda r: (r.label, r.path))


def _cars(dataset_dir: Path, image_dir: Path) -> Parts:
    from scipy.io import loadmat

    meta = loadmat(_require(dataset_dir / "devkit" / "cars_meta.mat", "stanford_cars", "class list"))["class_names"][0]

    def read(folder: str, anno: Path) -> list[Record]:
        annotations = loadmat(_require(anno, "stanford_cars", "annotation file"))["annotations"][0]
        records = []
        for item in annotations:
            label = int(item["class"][0, 0]) - 1
            words = str(meta[label][0]).split(" ")
            year = words.pop(-1)
            records.append(Record(f"{folder}/{item['fname'][0]}", label, " ".join([year, *words])))
        return records

    trainval = read("cars_train", dataset_dir / "devkit" / "cars_train_annos.mat")
    test = read("cars_test", dataset_dir / "cars_test_annos_withlabels.mat")
    train, val = split_trainval(trainval, str(dataset_dir / "devkit" / "cars_train_annos.mat"))
    return train, val, sorted(test, key=lambda r: (r.label, r.path))


def _flowers(dataset_dir: Path, image_dir: Path) -> Parts:
    from scipy.io import loadmat

    labels = loadmat(_require(dataset_dir / "imagelabels.mat", "oxford_flowers", "label file"))["labels"][0]
    names_file = _require(dataset_dir / "cat_to_name.json", "oxford_flowers", "class-name file")
    lab2cname = json.loads(names_file.read_text())
    records = [Record(f"image_{i + 1:05d}.jpg", int(y) - 1, lab2cname[str(int(y))]) for i, y in enumerate(labels)]
    return split_by_proportion(records, str(dataset_dir / "imagelabels.mat"))


def _sun397(dataset_dir: Path, image_dir: Path) -> Parts:
    classes = [line[1:] for line in _lines(_require(dataset_dir / "ClassName.txt", "sun397", "class list"))]
    cname2lab = {c: i for i, c in enumerate(classes)}

    def classname(folder: str) -> str:
        return " ".join(folder.split("/")[1:][::-1])  # drop the letter, put indoor/outdoor first

    if (dataset_dir / "Training_01.txt").exists():

        def read(name: str) -> list[Record]:
            out = []
            for line in _lines(_require(dataset_dir / name, "sun397", "partition file")):
                rel = line[1:]
                folder = rel.rsplit("/", 1)[0]
                out.append(Record(rel, cname2lab[folder], classname(folder)))
            return out

        train, val = split_trainval(read("Training_01.txt"), str(dataset_dir / "Training_01.txt"))
        return train, val, sorted(read("Testing_01.txt"), key=lambda r: (r.label, r.path))
    log.warning("sun397: Training_01.txt/Testing_01.txt absent; splitting every class folder 50/20/30 instead")
    records = records_from_class_dirs(image_dir, classes, classnames=[classname(c) for c in classes])
    return split_by_proportion(records, str(image_dir))


def _ucf101(dataset_dir: Path, image_dir: Path) -> Parts:
    lists = dataset_dir / "ucfTrainTestlist"
    cname2lab = {}
    for line in _lines(_require(lists / "classInd.txt", "ucf101", "class list")):
        label, action = line.split(" ")
        cname2lab[action] = int(label) - 1

    def read(name: str) -> list[Record]:
        out = []
        for line in _lines(_require(lists / name, "ucf101", "partition file")):
            action, filename = line.split(" ")[0].split("/")
            renamed = "_".join(re.findall("[A-Z][^A-Z]*", action))
            out.append(Record(f"{renamed}/{filename.replace('.avi', '.jpg')}", cname2lab[action], renamed))
        return out

    train, val = split_trainval(read("trainlist01.txt"), str(lists / "trainlist01.txt"))
    return train, val, sorted(read("testlist01.txt"), key=lambda r: (r.label, r.path))


def _fgvc_aircraft(dataset_dir: Path, image_dir: Path) -> Parts:
    """The official variant lists are the split (CoOp has no split_zhou file for FGVC-Aircraft)."""
    classes = _lines(_require(dataset_dir / "variants.txt", "fgvc_aircraft", "class list"))
    cname2lab = {c: i for i, c in enumerate(classes)}

    def read(part: str) -> list[Record]:
        path = _require(dataset_dir / f"images_variant_{part}.txt", "fgvc_aircraft", "variant list")
        out = []
        for line in _lines(path):
            imname, *words = line.split(" ")
            variant = " ".join(words)
            if variant not in cname2lab:
                raise SplitFileError(f"{path}: image {imname} has variant {variant!r}, which is not in variants.txt")
            out.append(Record(f"{imname}.jpg", cname2lab[variant], variant))
        return out

    return read("train"), read("val"), read("test")


COOP_DATASETS: dict[str, CoopDataset] = {
    spec.key: spec
    for spec in (
        CoopDataset("caltech101", "caltech-101", "101_ObjectCategories", "Caltech101",
                    _folder_split(CALTECH_IGNORED, CALTECH_RENAMES), "101_ObjectCategories/<class>/", "Caltech101"),
        CoopDataset("oxford_pets", "oxford_pets", "images", "OxfordPets", _pets,
                    "annotations/trainval.txt, annotations/test.txt", "OxfordIIITPet"),
        CoopDataset("stanford_cars", "stanford_cars", "", "StanfordCars", _cars,
                    "devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat"),
        CoopDataset("oxford_flowers", "oxford_flowers", "jpg", "OxfordFlowers", _flowers,
                    "imagelabels.mat, cat_to_name.json", "Flowers102"),
        CoopDataset("food101", "food-101", "images", "Food101", _folder_split(), "images/<class>/", "Food101"),
        CoopDataset("fgvc_aircraft", "fgvc_aircraft", "images", None, _fgvc_aircraft,
                    "variants.txt, images_variant_{train,val,test}.txt", "FGVCAircraft"),
        CoopDataset("sun397", "sun397", "SUN397", "SUN397", _sun397,
                    "ClassName.txt, Training_01.txt, Testing_01.txt", "SUN397"),
        CoopDataset("dtd", "dtd", "images", "DescribableTextures", _folder_split(), "images/<class>/", "DTD"),
        CoopDataset("eurosat", "eurosat", "2750", "EuroSAT", _folder_split(renames=EUROSAT_RENAMES),
                    "2750/<class>/", "EuroSAT"),
        CoopDataset("ucf101", "ucf101", "UCF-101-midframes", "UCF101", _ucf101,
                    "ucfTrainTestlist/classInd.txt, trainlist01.txt, testlist01.txt"),
    )
}


def load_coop_dataset(spec: CoopDataset, root: str) -> DatasetSplits:
    dataset_dir = Path(root) / spec.dirname
    image_root = Path(root) / spec.dirname / spec.image_subdir if spec.image_subdir else dataset_dir
    if not dataset_dir.is_dir():
        how = (f"set data.download: true to fetch it with torchvision ({spec.torchvision}), or "
               if spec.torchvision else "")
        raise DatasetNotFoundError(
            f"dataset {spec.key} not found: expected the folder {dataset_dir} (data.root={root!r}). "
            f"Check data.root, {how}lay it out as CoOp's DATASETS.md describes "
            f"(github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md)."
        )
    split_file = dataset_dir / spec.split_file_name if spec.split_file_name else None
    notes: list[str] = []
    if split_file is not None and split_file.is_file():
        train, val, test, classnames = read_split_file(split_file)
        source, official = f"{split_file} (CoOp's official split)", True
    elif split_file is None:
        train, val, test = spec.rebuild(dataset_dir, image_root)
        classnames = splits_classnames(train, val, test, f"{spec.key} ({spec.rebuild_from})")
        source, official = f"{dataset_dir}/{{{spec.rebuild_from}}} (the dataset's official lists)", True
    else:
        train, val, test = spec.rebuild(dataset_dir, image_root)
        classnames = splits_classnames(train, val, test, f"{spec.key} ({spec.rebuild_from})")
        source, official = f"generated from {spec.rebuild_from} (NOT the official CoOp split)", False
        note = (
            f"{split_file.name} not found in {dataset_dir}: made a deterministic split the way CoOp does for a "
            f"new dataset. It is NOT CoOp's official split, so numbers do not compare with published tables; "
            f"put CoOp's {split_file.name} there (see CoOp's DATASETS.md) for comparable results."
        )
        log.warning(note)
        notes.append(note)
    return DatasetSplits(
        name=spec.key,
        image_root=str(image_root),
        classnames=classnames,
        train=train,
        val=val,
        test=test,
        split_source=source,
        official_split=official,
        notes=notes,
    ).validate()

