"""Fetching datasets with torchvision and placing them in CoOp's layout (data.download: true).

Each download goes to <root>/.downloads/<key>/ first; only the folders CoOp's layout needs are then
moved into <root>/<dirname>/, so an interrupted download never leaves a half dataset where the
loader looks. Before anything starts the host is probed (3 s timeout): offline, this fails within
seconds and says how to place the data by hand.

CoOp's official split files (split_zhou_*.json) are not downloadable from a stable address; without
one the loader makes a deterministic split the way CoOp does and says that it is not the official one.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from aape.atomic import atomic_write_json
from aape.data.records import DataError
from aape.errors import AAPEError
from aape.network import host_reachable

log = logging.getLogger(__name__)


class DatasetDownloadError(AAPEError, RuntimeError):
    """A download could not run (offline, host down) or failed; the message says what to do instead."""


@dataclass(frozen=True)
class Download:
    key: str
    url: str  # probed before downloading
    fetch: Callable[[Path, Path], None]  # (staging, root) -> dataset placed under root in CoOp's layout
    manual: str  # where the data must go when placed by hand


def _move(src: Path, dst: Path) -> None:
    if not src.exists():
        raise DatasetDownloadError(f"the download did not contain {src}; the archive layout may have changed")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        raise DatasetDownloadError(f"{dst} already exists; remove it or set data.download: false to use it as is")
    shutil.move(str(src), str(dst))


def _eurosat(staging: Path, root: Path) -> None:
    from torchvision.datasets import EuroSAT

    EuroSAT(str(staging), download=True)
    _move(staging / "eurosat" / "2750", root / "eurosat" / "2750")


def _flowers(staging: Path, root: Path) -> None:
    from torchvision.datasets import Flowers102

    dataset = Flowers102(str(staging), download=True)
    base = staging / "flowers-102"
    target = root / "oxford_flowers"
    for name in ("jpg", "imagelabels.mat", "setid.mat"):
        _move(base / name, target / name)
    # CoOp reads class names from cat_to_name.json ({"1": "pink primrose", ...}); torchvision has the same
    # list except for one typo, fixed so the names are CoOp's exactly
    atomic_write_json(target / "cat_to_name.json", flowers_cat_to_name(dataset.classes))


FLOWERS_FIXES = {"pink-yellow dahlia?": "pink-yellow dahlia"}


def flowers_cat_to_name(classes: list[str]) -> dict[str, str]:
    return {str(i + 1): FLOWERS_FIXES.get(c, c) for i, c in enumerate(classes)}


def _dtd(staging: Path, root: Path) -> None:
    from torchvision.datasets import DTD

    DTD(str(staging), download=True)
    _move(staging / "dtd" / "dtd" / "images", root / "dtd" / "images")


def _pets(staging: Path, root: Path) -> None:
    from torchvision.datasets import OxfordIIITPet

    OxfordIIITPet(str(staging), download=True)
    for name in ("images", "annotations"):
        _move(staging / "oxford-iiit-pet" / name, root / "oxford_pets" / name)


def _food101(staging: Path, root: Path) -> None:
    from torchvision.datasets import Food101

    Food101(str(staging), download=True)
    for name in ("images", "meta"):
        _move(staging / "food-101" / name, root / "food-101" / name)


def _aircraft(staging: Path, root: Path) -> None:
    from torchvision.datasets import FGVCAircraft

    FGVCAircraft(str(staging), download=True)
    data = staging / "fgvc-aircraft-2013b" / "data"
    target = root / "fgvc_aircraft"
    for name in ("images", "variants.txt", "images_variant_train.txt", "images_variant_val.txt", "images_variant_test.txt"):
        _move(data / name, target / name)


def _caltech101(staging: Path, root: Path) -> None:
    from torchvision.datasets import Caltech101

    Caltech101(str(staging), download=True)
    _move(staging / "caltech101" / "101_ObjectCategories", root / "caltech-101" / "101_ObjectCategories")


def _sun397(staging: Path, root: Path) -> None:
    from torchvision.datasets import SUN397

    SUN397(str(staging), download=True)
    source = staging / "SUN397"
    target = root / "sun397"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / "ClassName.txt", target / "ClassName.txt")  # CoOp reads it from the dataset folder
    _move(source, target / "SUN397")


def _cifar(key: str) -> Callable[[Path, Path], None]:
    def fetch(staging: Path, root: Path) -> None:
        from torchvision.datasets import CIFAR10, CIFAR100

        cls = CIFAR10 if key == "cifar10" else CIFAR100
        build = staging / key
        for part, train in (("train", True), ("test", False)):
            dataset = cls(str(staging), train=train, download=True)
            folders = [c.replace("/", "_") for c in dataset.classes]
            for name in folders:
                (build / part / name).mkdir(parents=True, exist_ok=True)
            for index, (image, label) in enumerate(dataset):
                image.save(build / part / folders[label] / f"{index:05d}.png")
        _move(build, root / key)

    return fetch


DOWNLOADS: dict[str, Download] = {
    d.key: d
    for d in (
        Download("eurosat", "https://huggingface.co/datasets/torchgeo/eurosat", _eurosat, "eurosat/2750/<class>/*.jpg"),
        Download("oxford_flowers", "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/", _flowers,
                 "oxford_flowers/{jpg/, imagelabels.mat, cat_to_name.json}"),
        Download("dtd", "https://www.robots.ox.ac.uk/~vgg/data/dtd/", _dtd, "dtd/images/<class>/*.jpg"),
        Download("oxford_pets", "https://www.robots.ox.ac.uk/~vgg/data/pets/", _pets, "oxford_pets/{images/, annotations/}"),
        Download("food101", "http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz", _food101, "food-101/images/<class>/*.jpg"),
        Download("fgvc_aircraft", "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/", _aircraft,
                 "fgvc_aircraft/{images/, variants.txt, images_variant_*.txt}"),
        Download("caltech101", "https://data.caltech.edu/records/mzrjq-6wc02", _caltech101,
                 "caltech-101/101_ObjectCategories/<class>/*.jpg"),
        Download("sun397", "http://vision.princeton.edu/projects/2010/SUN/", _sun397, "sun397/{SUN397/, ClassName.txt}"),
        Download("cifar10", "https://www.cs.toronto.edu/~kriz/", _cifar("cifar10"), "cifar10/{train,test}/<class>/*.png"),
        Download("cifar100", "https://www.cs.toronto.edu/~kriz/", _cifar("cifar100"), "cifar100/{train,test}/<class>/*.png"),
    )
}


def download_dataset(key: str, root: str | Path) -> None:
    """Download `key` into CoOp's layout under `root`; fails fast (seconds) when offline."""
    if key not in DOWNLOADS:
        raise DataError(
            f"dataset {key} cannot be downloaded automatically (torchvision can fetch: {', '.join(DOWNLOADS)}). "
            f"Place it under data.root={str(root)!r} as CoOp's DATASETS.md describes."
        )
    spec = DOWNLOADS[key]
    root = Path(root)
    if not host_reachable(spec.url):
        raise DatasetDownloadError(
            f"cannot download {key}: {urlparse(spec.url).hostname} is not reachable (offline?). Either run "
            f"where there is internet access, or place the dataset by hand as {root / spec.manual} "
            f"(see CoOp's DATASETS.md), or use the offline demo (data.dataset: demo-mnist)."
        )
    staging = root / ".downloads" / key
    staging.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s with torchvision into %s (this can take a while)", key, staging)
    try:
        spec.fetch(staging, root)
    except DatasetDownloadError:
        raise
    except Exception as exc:  # network and archive errors come in many types
        raise DatasetDownloadError(
            f"downloading {key} failed: {type(exc).__name__}: {exc}. The partial download is kept in {staging} "
            f"(torchvision resumes from complete archives); rerun, or place the data as {root / spec.manual}."
        ) from exc
    shutil.rmtree(staging, ignore_errors=True)
    log.info("%s is in place under %s", key, root)
