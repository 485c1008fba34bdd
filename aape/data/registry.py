"""Every dataset by name, behind one call: `build_dataset(data_cfg) -> DatasetSplits`.

Names are matched case-insensitively and without '-'/'_', so CoOp's config names ("EuroSAT",
"DescribableTextures") and torchvision's ("Flowers102", "OxfordIIITPet") work as well as ours.
"""

from __future__ import annotations

import difflib
import logging
import re
from pathlib import Path
from typing import Callable

from aape.config import DataConfig
from aape.data.coop import CLASS_RENAMES, COOP_DATASETS, load_coop_dataset
from aape.data.custom import load_folder, load_manifest
from aape.data.demo import DEMO_KEY, load_demo_mnist
from aape.data.imagenet import IMAGENET_VARIANTS, load_imagenet, load_imagenet_variant
from aape.data.records import DatasetNotFoundError, DatasetSplits, UnknownDatasetError

log = logging.getLogger(__name__)

FEWSHOT_DATASETS = ("imagenet", *COOP_DATASETS)  # the 11 of CoOp's benchmark
DOMAIN_SHIFT_DATASETS = tuple(IMAGENET_VARIANTS)
EXTRA_DATASETS = ("cifar10", "cifar100")  # torchvision downloads, folder layout
USER_DATASETS = ("folder", "manifest")
KNOWN_DATASETS = (DEMO_KEY, *FEWSHOT_DATASETS, *DOMAIN_SHIFT_DATASETS, *EXTRA_DATASETS, *USER_DATASETS)

_ALIASES = {
    # CoOp's dataset class names
    "caltech101": "caltech101", "oxfordpets": "oxford_pets", "stanfordcars": "stanford_cars",
    "oxfordflowers": "oxford_flowers", "food101": "food101", "fgvcaircraft": "fgvc_aircraft",
    "sun397": "sun397", "describabletextures": "dtd", "eurosat": "eurosat", "ucf101": "ucf101",
    "imagenetsketch": "imagenet_sketch", "imageneta": "imagenet_a", "imagenetr": "imagenet_r",
    # torchvision's and common spellings
    "flowers102": "oxford_flowers", "oxfordiiitpet": "oxford_pets", "pets": "oxford_pets", "cars": "stanford_cars",
    "aircraft": "fgvc_aircraft", "imagenet1k": "imagenet", "demomnist": DEMO_KEY, "mnist": DEMO_KEY,
}


def _squash(name: str) -> str:
    return re.sub(r"[-_\s]", "", name.strip().lower())


def canonical_name(name: str) -> str:
    """Our key for a dataset name ('EuroSAT' -> 'eurosat', 'imagenet-a' -> 'imagenet_a'); raises if unknown."""
    squashed = _squash(name)
    for key in KNOWN_DATASETS:
        if _squash(key) == squashed:
            return key
    if squashed in _ALIASES:
        return _ALIASES[squashed]
    close = difflib.get_close_matches(name.strip().lower(), KNOWN_DATASETS, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownDatasetError(
        f"unknown dataset {name!r} (data.dataset).{hint} Known datasets: {', '.join(KNOWN_DATASETS)}. "
        f"For your own images use 'folder' (data.path = a folder of class folders) or 'manifest' "
        f"(data.path = a CSV/Parquet file with path, label, classname)."
    )


def name_key(name: str) -> str:
    """The key to match a dataset name by, never raising: `canonical_name` for a dataset the registry
    knows, else the name without case, '-', '_' or spaces (a custom dataset's own name, or a spelling
    only another table knows, like an alias in aape/prompts/templates.yaml). The two kinds of key
    cannot collide: a squashed name equal to a known key would have been recognised as that dataset."""
    try:
        return canonical_name(name)
    except UnknownDatasetError:
        return _squash(name)


def class_renames(name: str) -> dict[str, str]:
    """The loader's {folder name: class name} renames for dataset `name` ({} when none or unknown)."""
    try:
        return dict(CLASS_RENAMES.get(canonical_name(name), {}))
    except UnknownDatasetError:  # e.g. the folder name a custom dataset records in classes.json
        return {}


def dataset_folder(name: str, root: str | Path) -> Path | None:
    """The folder under `root` that dataset `name` is read from; None when there is none to look
    for: the demo (built on first use) and custom datasets (data.path)."""
    key = canonical_name(name)
    if key == "imagenet":
        return Path(root) / "imagenet"
    if key in IMAGENET_VARIANTS:
        return Path(root) / IMAGENET_VARIANTS[key].dirname
    if key in COOP_DATASETS:
        return Path(root) / COOP_DATASETS[key].dirname
    if key in EXTRA_DATASETS:
        return Path(root) / key
    return None


def build_dataset(cfg: DataConfig) -> DatasetSplits:
    """The dataset named by data.dataset, downloading it first when data.download allows."""
    key = canonical_name(cfg.dataset)
    if key == DEMO_KEY:
        return load_demo_mnist(cfg.root)
    if key == "folder":
        return load_folder(cfg.path)
    if key == "manifest":
        return load_manifest(cfg.path)
    loader = _loader(key)
    try:
        return loader(cfg.root)
    except DatasetNotFoundError:
        if not cfg.download:
            raise
    from aape.data.download import download_dataset

    download_dataset(key, cfg.root)
    return loader(cfg.root)


def load_dataset(name: str, root: str | Path, download: bool = False, path: str | None = None) -> DatasetSplits:
    """Convenience for other stages (cross-dataset and domain-shift evaluation)."""
    return build_dataset(DataConfig(dataset=name, root=str(root), download=download, path=path))


def _loader(key: str) -> Callable[[str], DatasetSplits]:
    if key == "imagenet":
        return load_imagenet
    if key in IMAGENET_VARIANTS:
        return lambda root: load_imagenet_variant(IMAGENET_VARIANTS[key], root)
    if key in COOP_DATASETS:
        return lambda root: load_coop_dataset(COOP_DATASETS[key], root)
    if key in EXTRA_DATASETS:
        return lambda root: _load_cifar(key, root)
    raise UnknownDatasetError(f"no loader for dataset {key!r}")  # unreachable when KNOWN_DATASETS is consistent


def _load_cifar(key: str, root: str) -> DatasetSplits:
    folder = Path(root) / key
    if not folder.is_dir():
        raise DatasetNotFoundError(
            f"dataset {key} not found: expected {folder}/{{train,test}}/<class>/*.png. "
            f"Set data.download: true to fetch it with torchvision (needs internet)."
        )
    splits = load_folder(str(folder))
    splits.name = key
    return splits
