"""Datasets, splits, few-shot draws and base-to-new, behind one interface.

    splits = build_dataset(params.data)        # DatasetSplits(name, image_root, classnames, train, val, test)
    draw_fewshot(splits.train, shots, seed)    # K per class, deterministic
    base_new_split(range(splits.num_classes))  # ([base labels], [new labels])

Stages read what prepare-data wrote with ClassesManifest.read (data/classes.json) / read_manifest.
"""

from aape.data.images import DataError, UnreadableImageError, open_image
from aape.data.manifests import ClassesManifest, ClassesManifestError, ClassNames, manifest_metadata, read_manifest, write_manifest
from aape.data.protocol import base_new_split, cap_per_class, class_plan, draw_fewshot
from aape.data.records import (
    ClassCountError,
    DatasetNotFoundError,
    DatasetSplits,
    MissingImagesError,
    Record,
    SplitFileError,
    UnknownDatasetError,
    check_class_count,
    check_classnames,
    dataset_hash,
    split_hash,
)
from aape.data.registry import KNOWN_DATASETS, build_dataset, canonical_name, load_dataset

__all__ = [
    "KNOWN_DATASETS",
    "ClassCountError",
    "ClassNames",
    "ClassesManifest",
    "ClassesManifestError",
    "DataError",
    "DatasetNotFoundError",
    "DatasetSplits",
    "MissingImagesError",
    "Record",
    "SplitFileError",
    "UnknownDatasetError",
    "UnreadableImageError",
    "base_new_split",
    "build_dataset",
    "canonical_name",
    "cap_per_class",
    "check_class_count",
    "check_classnames",
    "class_plan",
    "dataset_hash",
    "draw_fewshot",
    "load_dataset",
    "manifest_metadata",
    "open_image",
    "read_manifest",
    "split_hash",
    "write_manifest",
]
