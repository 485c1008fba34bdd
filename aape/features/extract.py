"""Write the features/ artifacts of a run: every split of every seed, the class texts, the descriptions.

All encoding goes through the cache (`image_encoder`, `text_encoder`), so this module only reads
the manifests, checks them, and assembles the files described in `aape.features.bundle`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from aape.atomic import atomic_save_tensors, atomic_write_json
from aape.backbone import RANDOM_INIT_NOTICE, Backbone, load_backbone
from aape.config import Params
from aape.data.manifests import ClassesManifest
from aape.features.bundle import (
    FORMAT,
    FeatureError,
    index_file,
    skipped_file,
    split_file,
    text_file,
)
from aape.features.baseline_templates import baseline_templates
from aape.features.image_encoder import CLEAN, SkippedImage, augmented_views, backbone_key, encode_views, raise_unreadable
from aape.features.text_encoder import encode_texts_cached, ensemble_mean, text_entry
from aape.layout import Layout

log = logging.getLogger(__name__)

# Random-init weights are drawn from this seed so that every process (a rerun of extract-features,
# the evaluation encoding extra sets) builds the same weights and finds its features in the cache.

MANIFEST_COLUMNS = ("path", "label")
DESCRIPTION_COLUMNS = ("class_index", "text")


@dataclass
class ExtractionReport:
    """What one extraction did: files written, work done, work reused, images skipped."""

    outputs: list[Path] = field(default_factory=list)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    images_encoded: int = 0
    image_views_reused: int = 0
    encode_seconds: float = 0.0
    texts_encoded: int = 0

    def add_images(self, stats: dict[str, Any]) -> None:
        self.images_encoded += stats["encoded"]
        self.image_views_reused += stats["reused"]
        self.encode_seconds += stats["seconds"]

    @property
    def images_per_s(self) -> float | None:
        return self.images_encoded / self.encode_seconds if self.encode_seconds > 0 else None


def build_backbone(params: Params) -> Backbone:
    """The backbone as every stage builds it (random-init weights are seeded in load_backbone)."""
    return load_backbone(params.backbone, params.run.device, image_size=params.data.image_size)


# inputs ----------------------------------------------------------------------------------------


def read_manifest(path: Path, num_classes: int) -> pd.DataFrame:
    if not path.is_file():
        raise FeatureError(f"manifest {path} is missing. Run `aape prepare-data` (with this run.seeds) first.")
    frame = pd.read_parquet(path)
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise FeatureError(f"manifest {path} lacks column(s) {', '.join(missing)} (has {', '.join(frame.columns)}).")
    bad = frame[(frame["label"] < 0) | (frame["label"] >= num_classes)]
    if len(bad):
        raise FeatureError(
            f"manifest {path} row {bad.index[0]} ({bad['path'].iloc[0]}) has label {bad['label'].iloc[0]}, "
            f"outside the {num_classes} classes of classes.json. Re-run `aape prepare-data`."
        )
    return frame.reset_index(drop=True)


def read_descriptions(path: Path, num_classes: int) -> pd.DataFrame:
    if not path.is_file():
        raise FeatureError(f"descriptions file {path} is missing. Run `aape generate-prompts` first.")
    frame = pd.read_parquet(path, columns=None)
    missing = [c for c in DESCRIPTION_COLUMNS if c not in frame.columns]
    if missing:
        raise FeatureError(f"descriptions file {path} lacks column(s) {', '.join(missing)}.")
    bad = frame[(frame["class_index"] < 0) | (frame["class_index"] >= num_classes)]
    if len(bad):
        raise FeatureError(
            f"descriptions file {path} row {bad.index[0]} has class_index {bad['class_index'].iloc[0]}, outside the "
            f"{num_classes} classes of classes.json: prompts and data are from different runs; re-run generate-prompts."
        )
    without = sorted(set(range(num_classes)) - set(frame["class_index"].tolist()))
    if without:
        log.warning("%d class(es) have no description (first: %s); they get none in text.safetensors", len(without), without[:5])
    return frame.reset_index(drop=True)


# extraction ------------------------------------------------------------------------------------


class Extractor:
    """Encodes one run's splits and texts through the cache and writes the features/ files."""

    def __init__(self, backbone: Backbone, layout: Layout, params: Params) -> None:
        self.backbone, self.layout, self.params = backbone, layout, params
        self.report = ExtractionReport()
        self.base_meta = {"format": FORMAT, "identity": backbone.identity, "random_init": backbone.random_init, "embed_dim": backbone.embed_dim}
        self.baselines = baseline_templates(params.features, params.data.dataset)

    def run(self) -> ExtractionReport:
        classes = ClassesManifest.read(self.layout.classes_file)
        classnames: list[str] = list(classes.classnames)
        image_root = Path(classes.image_root)
        if not image_root.is_dir():
            raise FeatureError(
                f"image_root {image_root} from {self.layout.classes_file} is not a folder (run from the project root, "
                f"or check data.root and re-run `aape prepare-data`)."
            )
        index_file(self.layout).unlink(missing_ok=True)  # an interrupted run must not look finished
        self._images("test", None, image_root, len(classnames))
        for seed in self.params.run.seeds:
            self._images("train", seed, image_root, len(classnames))
            self._images("val", seed, image_root, len(classnames))
        self._texts(classnames)
        atomic_write_json(skipped_file(self.layout), self.report.skipped)
        self.report.outputs.append(skipped_file(self.layout))
        atomic_write_json(index_file(self.layout), self._index(classes, classnames))
        self.report.outputs.append(index_file(self.layout))
        return self.report

    def _manifest_path(self, split: str, seed: int | None) -> Path:
        return self.layout.split_manifest("test") if split == "test" else self.layout.fewshot_manifest(seed, split)  # type: ignore[arg-type]

    def _images(self, split: str, seed: int | None, image_root: Path, num_classes: int) -> None:
        manifest = self._manifest_path(split, seed)
        frame = read_manifest(manifest, num_classes)
        cfg = self.params.features
        specs = [CLEAN] + (augmented_views(seed, cfg.augmented_views) if split == "train" else [])  # type: ignore[arg-type]
        label = split if seed is None else f"seed{seed}/{split}"
        per_view, rows, skipped, stats = encode_views(
            self.backbone,
            image_root,
            frame["path"].tolist(),
            self.layout.cache,
            specs,
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
            desc=label,
        )
        self.report.add_images(stats)
        if skipped and not self.params.data.skip_unreadable:
            raise_unreadable(skipped, f"{manifest}")
        self._record_skipped(split, seed, skipped)
        labels = torch.tensor(frame["label"].to_numpy(), dtype=torch.int64)[rows]
        if split == "train":
            tensors = {"views": torch.stack([per_view[s] for s in specs[1:]], dim=1), "clean": per_view[CLEAN]}
        else:
            tensors = {"features": per_view[CLEAN]}
        tensors.update(labels=labels, rows=rows)
        path = split_file(self.layout, split, seed)
        meta = {
            **self.base_meta,
            "split": split,
            "seed": seed,
            "manifest": str(manifest),
            "manifest_rows": len(frame),
            "views": len(specs) - 1 if split == "train" else 0,
            "skipped": [s.as_dict() for s in skipped],
        }
        atomic_save_tensors(path, tensors, meta)
        self.report.outputs.append(path)
        self.report.files[str(path.relative_to(self.layout.features))] = {
            "manifest": str(manifest),
            "images": len(rows),
            "skipped": len(skipped),
            "cache_keys": stats["cache_keys"],
        }

    def _record_skipped(self, split: str, seed: int | None, skipped: list[SkippedImage]) -> None:
        for item in skipped:
            log.warning("skipped unreadable image %s (%s): %s", item.path, split, item.reason)
            self.report.skipped.append({"split": split, "seed": seed, **item.as_dict()})

    def _encode_texts(self, texts: list[str], desc: str) -> tuple[torch.Tensor, str]:
        feats, encoded = encode_texts_cached(self.backbone, texts, self.layout.cache, self.params.features.text_batch_size, desc)
        self.report.texts_encoded += encoded
        return feats, text_entry(self.backbone, texts, self.layout.cache).dir.name

    def _texts(self, classnames: list[str]) -> None:
        cfg = self.params.features
        # AAPE's class prompts and the zero-shot baseline's are separate sets: the baseline follows
        # CoOp's per-dataset template, AAPE keeps features.class_template (the cache shares equal texts).
        prompts, prompts_key = self._encode_texts([cfg.class_template.format(c) for c in classnames], "class prompts")
        baselines = self.baselines
        zeroshot, zeroshot_key = self._encode_texts([baselines.zeroshot.format(c) for c in classnames], "zero-shot prompts")
        templates = list(baselines.ensemble)
        ensemble_texts = [t.format(c) for c in classnames for t in templates]
        ensemble_raw, ensemble_key = self._encode_texts(ensemble_texts, "template ensemble")
        ensemble = ensemble_mean(ensemble_raw, len(classnames), len(templates))
        frame = read_descriptions(self.layout.descriptions, len(classnames))
        descriptions, descriptions_key = self._encode_texts(frame["text"].astype(str).tolist(), "descriptions")
        tensors = {
            "class_prompts": prompts,
            "class_zeroshot": zeroshot,
            "class_ensemble": ensemble,
            "descriptions": descriptions,
            "description_class": torch.tensor(frame["class_index"].to_numpy(), dtype=torch.int64),
        }
        meta = {**self.base_meta, "classnames": classnames, "class_template": cfg.class_template, **baselines.metadata()}
        path = text_file(self.layout)
        atomic_save_tensors(path, tensors, meta)
        self.report.outputs.append(path)
        self.report.files[path.name] = {
            "classes": len(classnames),
            "descriptions": len(frame),
            "cache_keys": [prompts_key, zeroshot_key, ensemble_key, descriptions_key],
        }

    def _index(self, classes: ClassesManifest, classnames: list[str]) -> dict[str, Any]:
        backbone, cfg = self.backbone, self.params.features
        index: dict[str, Any] = {
            "format": FORMAT,
            "identity": backbone.identity,
            "random_init": backbone.random_init,
        }
        if backbone.random_init:
            index["notice"] = RANDOM_INIT_NOTICE
            index["weights"] = backbone_key(backbone)["backbone"]
        index.update(
            embed_dim=backbone.embed_dim,
            logit_scale=backbone.logit_scale,
            image_size=backbone.image_size,
            dtype=str(backbone.dtype).removeprefix("torch."),
            device=str(backbone.device),
            dataset=classes.dataset,
            classnames=classnames,
            seeds=list(self.params.run.seeds),
            augmented_views=cfg.augmented_views,
            class_template=cfg.class_template,
            zeroshot_template=self.baselines.zeroshot,
            ensemble_templates_source=self.baselines.ensemble_source,
            skip_unreadable=self.params.data.skip_unreadable,
            skipped=len(self.report.skipped),
            files=self.report.files,
            cache_dir=str(self.layout.cache),
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        return index
