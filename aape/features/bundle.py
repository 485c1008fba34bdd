"""The features/ artifact format: what `extract-features` writes and every later stage reads.

    features/seed{S}/train.safetensors  views [N,V,d], clean [N,d], labels [N], rows [N]
    features/seed{S}/val.safetensors    features [N,d], labels [N], rows [N]
    features/test.safetensors           features [N,d], labels [N], rows [N]   (shared by all seeds)
    features/text.safetensors           class_prompts [C,d] (features.class_template: AAPE's),
                                        class_zeroshot [C,d] (the zero-shot baseline's template),
                                        class_ensemble [C,d] (the baseline's template ensemble),
                                        descriptions [M,d], description_class [M]
    features/index.json                 backbone identity, random_init, embed_dim, logit_scale, keys
    features/skipped.json               unreadable images that were skipped (empty list when none)

Features are float32 with L2-normalised rows; labels are global labels (int64). `rows` [N] holds,
for every feature row, its row number in the manifest Parquet it came from: it equals arange(N)
unless unreadable images were skipped (`data.skip_unreadable`), in which case those rows are
absent from every tensor of the file (features, labels and rows stay aligned) and are listed in the
file's metadata and in skipped.json. Every file carries a JSON-valued metadata header (`format`,
`identity`, `random_init`, `embed_dim`, ...); text.safetensors's also names the templates used
(`class_template`, `zeroshot_template`, `ensemble_templates` and their sources).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open

from aape.errors import AAPEError
from aape.layout import Layout

FORMAT = "aape-features/1"
INDEX_FILE = "index.json"
SKIPPED_FILE = "skipped.json"
TEXT_FILE = "text.safetensors"
TEST_FILE = "test.safetensors"


class FeatureError(AAPEError, RuntimeError):
    """Feature artifacts or cache entries are missing, stale or inconsistent; the message says what to do."""


def seed_dir(layout: Layout, seed: int) -> Path:
    return layout.seed_dir(layout.features, seed)


def split_file(layout: Layout, split: str, seed: int | None = None) -> Path:
    """features/seed{S}/{train,val}.safetensors, or the shared features/test.safetensors."""
    if split == "test":
        return layout.features / TEST_FILE
    if split not in ("train", "val") or seed is None:
        raise ValueError(f"split must be 'test', or 'train'/'val' with a seed; got {split!r}, seed={seed}")
    return seed_dir(layout, seed) / f"{split}.safetensors"


def text_file(layout: Layout) -> Path:
    return layout.features / TEXT_FILE


def index_file(layout: Layout) -> Path:
    return layout.features / INDEX_FILE


def skipped_file(layout: Layout) -> Path:
    return layout.features / SKIPPED_FILE


@dataclass
class FeatureBundle:
    """Everything the method and evaluation stages need for one seed, already on CPU as float32."""

    seed: int
    train_views: torch.Tensor  # [N, V, d] augmented views (CoOp augmentation)
    train_clean: torch.Tensor  # [N, d] evaluation preprocessing
    train_labels: torch.Tensor  # [N] int64 global labels
    val_features: torch.Tensor  # [Nv, d]
    val_labels: torch.Tensor  # [Nv]
    test_features: torch.Tensor  # [Nt, d]
    test_labels: torch.Tensor  # [Nt]
    class_prompts: torch.Tensor  # [C, d] features.class_template for every class of classes.json
    class_ensemble: torch.Tensor  # [C, d] mean over the baseline's template ensemble, re-normalised
    descriptions: torch.Tensor  # [M, d] in descriptions.parquet row order
    description_class: torch.Tensor  # [M] int64 global label of each description
    logit_scale: float
    embed_dim: int
    identity: str
    random_init: bool
    classnames: list[str] = field(default_factory=list)
    # manifest row number of each feature row (arange unless unreadable images were skipped)
    train_rows: torch.Tensor | None = None
    val_rows: torch.Tensor | None = None
    test_rows: torch.Tensor | None = None
    index: dict[str, Any] = field(default_factory=dict, repr=False)
    # [C, d] the zero-shot baseline's template per class; None in text files of older versions, which
    # the method stages can still use (they need class_prompts only) but the evaluation cannot
    class_zeroshot: torch.Tensor | None = None
    text_meta: dict[str, Any] = field(default_factory=dict, repr=False)  # text.safetensors's header

    @property
    def zeroshot_prompts(self) -> torch.Tensor:
        """class_zeroshot, or a FeatureError saying how to get it."""
        if self.class_zeroshot is None:
            raise FeatureError(
                "features/text.safetensors has no class_zeroshot (the zero-shot baseline's prompts, "
                "features.zeroshot_template): it was written by an older version. Re-run `aape extract-features`."
            )
        return self.class_zeroshot

    @property
    def num_views(self) -> int:
        return int(self.train_views.shape[1])

    @property
    def num_classes(self) -> int:
        return int(self.class_prompts.shape[0])


# reading ---------------------------------------------------------------------------------------


def read_metadata(path: Path) -> dict[str, Any]:
    """The JSON metadata header of a features file (values decoded)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = fh.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise FeatureError(f"cannot read features file {path}: {exc}. Re-run `aape extract-features`.") from None
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value
    return meta


def read_tensors(path: Path, required: tuple[str, ...]) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FeatureError(f"features file {path} is missing. Run `aape extract-features` first.")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise FeatureError(f"features file {path} is unreadable ({exc}). Re-run `aape extract-features`.") from None
    missing = [k for k in required if k not in tensors]
    if missing:
        raise FeatureError(
            f"features file {path} lacks {', '.join(missing)} (has {', '.join(sorted(tensors))}). "
            f"It was written by another version; re-run `aape extract-features`."
        )
    return tensors


def read_index(layout: Layout) -> dict[str, Any]:
    path = index_file(layout)
    if not path.is_file():
        raise FeatureError(f"{path} is missing. Run `aape extract-features` first.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FeatureError(f"{path} is not valid JSON ({exc}). Re-run `aape extract-features`.") from None


def _rows_or_arange(tensors: dict[str, torch.Tensor], n: int) -> torch.Tensor:
    return tensors["rows"] if "rows" in tensors else torch.arange(n)


def load_bundle(layout: Layout, seed: int) -> FeatureBundle:
    """Load the cached features of one seed (plus the shared test and text features)."""
    index = read_index(layout)
    train_path, val_path, test_path = (split_file(layout, s, seed) for s in ("train", "val", "test"))
    seeds = index.get("seeds", [])
    if seed not in seeds or not train_path.is_file():
        raise FeatureError(
            f"no features for seed {seed} in {layout.features} (the last extraction covered seeds {seeds}). "
            f"Add the seed to run.seeds and run `aape extract-features`."
        )
    train = read_tensors(train_path, ("views", "clean", "labels"))
    val = read_tensors(val_path, ("features", "labels"))
    test = read_tensors(test_path, ("features", "labels"))
    text = read_tensors(text_file(layout), ("class_prompts", "class_ensemble", "descriptions", "description_class"))
    identity = index["identity"]
    headers = {path: read_metadata(path) for path in (train_path, val_path, test_path, text_file(layout))}
    for path, header in headers.items():
        file_identity = header.get("identity")
        if file_identity != identity:
            raise FeatureError(
                f"{path} was computed with backbone {file_identity!r} but index.json says {identity!r}: "
                f"the features directory mixes two runs. Re-run `aape extract-features`."
            )
    return FeatureBundle(
        seed=seed,
        train_views=train["views"],
        train_clean=train["clean"],
        train_labels=train["labels"],
        val_features=val["features"],
        val_labels=val["labels"],
        test_features=test["features"],
        test_labels=test["labels"],
        class_prompts=text["class_prompts"],
        class_ensemble=text["class_ensemble"],
        descriptions=text["descriptions"],
        description_class=text["description_class"],
        logit_scale=float(index["logit_scale"]),
        embed_dim=int(index["embed_dim"]),
        identity=identity,
        random_init=bool(index["random_init"]),
        classnames=list(index.get("classnames", [])),
        train_rows=_rows_or_arange(train, len(train["labels"])),
        val_rows=_rows_or_arange(val, len(val["labels"])),
        test_rows=_rows_or_arange(test, len(test["labels"])),
        index=index,
        class_zeroshot=text.get("class_zeroshot"),
        text_meta=headers[text_file(layout)],
    )
