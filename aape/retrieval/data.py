"""The retrieval task's data: its datasets (a small registry), what prepare-data writes for them and
the one reader of it.

    data/retrieval.json                 dataset, image_root, split sizes and offsets, generated captions or not
    data/captions_{train,val,test}.parquet   path, image_id, captions (list of strings), one row per image

Datasets (paths under data.root, as aape.data.captions documents them):
- `easy-vqa`: offline, from the PyPI package; captions GENERATED from its question/answer metadata.
  easy-VQA has only 8 colours x 3 shapes, so many images share one caption set and could not be
  told apart by any model; the validation and test splits keep one image per distinct caption set
  (up to 24 each: validation from the package's train images, test from its test images), the
  training split is every other captioned train image.
- `coco`: Karpathy's dataset_coco.json (train + restval for training, val, the 5k test split).
- `flickr30k`: Karpathy's dataset_flickr30k.json (train, val, the 1k test split).
`data.max_images` caps each split (first N, for demo speed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from aape.atomic import atomic_write_json, atomic_write_stream
from aape.config import IMAGE_TEXT_TASKS
from aape.data.captions import (
    GENERATED_CAPTIONS_NOTICE,
    TRAINING_SPLITS,
    CaptionedImage,
    CaptionFileError,
    easy_vqa_captions,
    easy_vqa_image_root,
    read_karpathy,
)
from aape.data.images import DataError
from aape.layout import Layout

SPLITS = ("train", "val", "test")
MANIFEST = "retrieval.json"
SCHEMA = pa.schema([("path", pa.string()), ("image_id", pa.string()), ("captions", pa.list_(pa.string()))])


@dataclass
class RetrievalData:
    dataset: str
    image_root: Path
    splits: dict[str, list[CaptionedImage]]
    generated: bool
    source: str


def _distinct(records: list[CaptionedImage]) -> tuple[list[CaptionedImage], list[CaptionedImage]]:
    """(one record per distinct caption set, the others), in order."""
    seen: set[tuple[str, ...]] = set()
    kept, rest = [], []
    for record in records:
        (rest if record.captions in seen else kept).append(record)
        seen.add(record.captions)
    return kept, rest


def _easy_vqa(root: Path) -> RetrievalData:
    val, train = _distinct(easy_vqa_captions("train"))
    test, _ = _distinct(easy_vqa_captions("test"))
    return RetrievalData("easy-vqa", easy_vqa_image_root(), {"train": train, "val": val, "test": test}, True,
                         "easy-vqa package (captions generated from its question/answer metadata)")


def _karpathy(name: str, file: str) -> Callable[[Path], RetrievalData]:
    def load(root: Path) -> RetrievalData:
        folder = root / name
        path = folder / file
        if not path.is_file():
            raise CaptionFileError(
                f"{path} not found: the {name} retrieval data needs Karpathy's split file there and the images "
                f"beside it (README, section 'Retrieval'); set data.root to the folder holding {name}/"
            )
        records = read_karpathy(path, max_captions=5)
        splits = {
            "train": [r for r in records if r.split in TRAINING_SPLITS],
            "val": [r for r in records if r.split == "val"],
            "test": [r for r in records if r.split == "test"],
        }
        return RetrievalData(name, folder, splits, False, str(path))

    return load


RETRIEVAL_DATASETS: dict[str, Callable[[Path], RetrievalData]] = {
    "easy-vqa": _easy_vqa,
    "coco": _karpathy("coco", "dataset_coco.json"),
    "flickr30k": _karpathy("flickr30k", "dataset_flickr30k.json"),
}


def load_retrieval_dataset(name: str, root: str | Path, max_images: int | None = None,
                           required: tuple[str, ...] = SPLITS) -> RetrievalData:
    """The dataset's splits (each capped at max_images); every split in `required` must have images
    (a transfer target needs only its test split)."""
    try:
        loader = RETRIEVAL_DATASETS[name]
    except KeyError:
        raise DataError(f"data.dataset {name!r} is not a retrieval dataset; with run.task: retrieval choose one of "
                        f"{', '.join(RETRIEVAL_DATASETS)}") from None
    data = loader(Path(root))
    for split in SPLITS:
        records = data.splits[split][:max_images] if max_images else data.splits[split]
        if not records and split in required:
            raise DataError(f"{name}: the {split} split has no captioned images ({data.source})")
        data.splits[split] = records
    return data


# the artifact ------------------------------------------------------------------------------------


def captions_file(layout: Layout, split: str) -> Path:
    return layout.data / f"captions_{split}.parquet"


def write_retrieval_data(layout: Layout, data: RetrievalData, task: str = "retrieval") -> list[Path]:
    """The captioned image splits of an image-text task (retrieval, captioning, vqa: the manifest says which)."""
    paths = []
    for split in SPLITS:
        records = data.splits[split]
        table = pa.Table.from_pylist([{"path": r.image, "image_id": r.image_id, "captions": list(r.captions)} for r in records],
                                     schema=SCHEMA)
        path = captions_file(layout, split)
        atomic_write_stream(path, lambda handle, t=table: pq.write_table(t, handle))
        paths.append(path)
    manifest = {
        "task": task, "dataset": data.dataset, "image_root": str(data.image_root), "source": data.source,
        "generated_captions": data.generated, "notice": GENERATED_CAPTIONS_NOTICE if data.generated else None,
        "images": {s: len(data.splits[s]) for s in SPLITS},
        "captions": {s: sum(len(r.captions) for r in data.splits[s]) for s in SPLITS},
    }
    atomic_write_json(layout.data / MANIFEST, manifest)
    return [*paths, layout.data / MANIFEST]


def read_manifest(layout: Layout) -> dict[str, Any]:
    path = layout.data / MANIFEST
    if not path.is_file():
        raise DataError(f"{path} is missing: run `aape prepare-data` with run.task: retrieval first")
    manifest = json.loads(path.read_text())
    if manifest.get("task") not in IMAGE_TEXT_TASKS:
        raise DataError(f"{path} was not written for an image-text task; re-run `aape prepare-data`")
    return manifest


def read_split(layout: Layout, split: str) -> list[CaptionedImage]:
    path = captions_file(layout, split)
    if not path.is_file():
        raise DataError(f"{path} is missing: run `aape prepare-data` with run.task: retrieval first")
    rows = pq.read_table(path).to_pylist()
    return [CaptionedImage(r["path"], tuple(r["captions"]), split, r["image_id"]) for r in rows]
