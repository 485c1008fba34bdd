"""What the two training stages read of one seed: its cached features, as local tensors (classes.json is
`aape.data.manifests.ClassesManifest`)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aape.backbone import RANDOM_INIT_NOTICE
from aape.data.manifests import ClassesManifest
from aape.errors import AAPEError
from aape.features import FeatureBundle, load_bundle
from aape.labels import to_local
from aape.layout import Layout
from aape.method.descriptions import DescriptionBank
from aape.method.objectives import TrainingSet

log = logging.getLogger(__name__)


class StageInputError(AAPEError, RuntimeError):
    """An upstream artifact is missing or inconsistent; the message names it and the stage to rerun."""


@dataclass
class SeedInputs:
    bundle: FeatureBundle
    train_classes: list[int]  # global labels, local order
    classnames: list[str]  # names of the training classes, local order
    data: TrainingSet  # local labels
    clean: torch.Tensor  # [N, d] un-augmented training features
    class_text: torch.Tensor  # [C_train, d] "a photo of a {}." of the training classes

    def backbone_facts(self) -> dict[str, Any]:
        """What every checkpoint and summary of this stage records about the backbone."""
        b = self.bundle
        return {"backbone_identity": b.identity, "random_init": b.random_init, "embed_dim": b.embed_dim, "logit_scale": b.logit_scale}

    def fingerprint(self, *parts: Any) -> str:
        """Identifies this data (cheaply) plus `parts` (configuration): resume states must match it."""
        views = self.data.views
        digest = {
            "identity": self.bundle.identity,
            "shape": list(views.shape),
            "views_sum": float(views.double().sum()),
            "labels": hashlib.sha256(self.data.labels.numpy().tobytes()).hexdigest(),
            "val": float(self.data.val_features.double().sum()),
            "text": float(self.class_text.double().sum()),
            "parts": parts,
        }
        return hashlib.sha256(json.dumps(digest, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_seed_inputs(layout: Layout, seed: int, classes: ClassesManifest) -> SeedInputs:
    return seed_inputs(load_bundle(layout, seed), classes)


def seed_inputs(bundle: FeatureBundle, classes: ClassesManifest) -> SeedInputs:
    """The bundle's training set in the local labels of classes.json's training classes."""
    seed, train_classes, names = bundle.seed, list(classes.train_classes), classes.classnames
    if bundle.class_prompts.shape[0] != len(names):
        raise StageInputError(
            f"features/text.safetensors has {bundle.class_prompts.shape[0]} class prompts but {classes.path} "
            f"lists {len(names)} classes: the features are stale. Re-run `aape extract-features`."
        )
    if bundle.random_init:
        log.warning("%s (features of %s)", RANDOM_INIT_NOTICE, bundle.identity)
    data = TrainingSet(
        views=bundle.train_views,
        labels=to_local(bundle.train_labels, train_classes, f"features/seed{seed}/train labels"),
        val_features=bundle.val_features,
        val_labels=to_local(bundle.val_labels, train_classes, f"features/seed{seed}/val labels"),
    )
    return SeedInputs(
        bundle=bundle,
        train_classes=train_classes,
        classnames=[names[c] for c in train_classes],
        data=data,
        clean=bundle.train_clean,
        class_text=bundle.class_prompts[train_classes],
    )


def description_bank(inputs: SeedInputs, all_classnames: list[str], max_per_class: int | None) -> DescriptionBank:
    b = inputs.bundle
    return DescriptionBank.from_flat(b.descriptions, b.description_class, inputs.train_classes, all_classnames, max_per_class)


def remove_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:  # leftover resume state is harmless; never fail a finished run for it
        log.warning("could not remove %s: %s", path, exc)
