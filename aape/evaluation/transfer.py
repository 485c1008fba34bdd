"""Transfer targets: the test sets of other datasets (cross-dataset) and of ImageNet's variants
(domain shift), encoded by the run's backbone through the feature cache.

Every configured dataset is located first, before any encoding, so a missing one stops the stage
at once with its name and the path where it was expected (never a silent skip).
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from aape.config import Params
from aape.evaluation.classifiers import EvaluationError
from aape.data.manifests import ClassesManifest
from aape.evaluation.protocols import TransferTarget
from aape.evaluation.results import CROSS_DATASET, DOMAIN_SHIFT
from aape.features import FeatureBundle
from aape.layout import Layout

log = logging.getLogger(__name__)


def class_mapping(target_names: Sequence[str], parent_labels: Sequence[int] | None, info: ClassesManifest, target: str) -> list[int]:
    """Each target class's label in the training dataset, checked by name (domain shift needs the
    target's classes to be the training dataset's, e.g. ImageNet-A's 200 among ImageNet's 1000)."""
    if parent_labels is not None:
        mapping = [int(p) for p in parent_labels]
        wrong = [(n, p) for n, p in zip(target_names, mapping) if not (0 <= p < len(info.classnames)) or info.classnames[p] != n]
        if not wrong:
            return mapping
    position = {name: i for i, name in enumerate(info.classnames)}
    missing = [n for n in target_names if n not in position]
    if missing:
        raise EvaluationError(
            f"evaluation.domain_shift: {target}'s classes are not classes of the training dataset {info.dataset!r} "
            f"(e.g. {', '.join(map(repr, missing[:3]))}). Domain shift evaluates a model trained on imagenet on its "
            f"variants; for other datasets use evaluation.cross_datasets."
        )
    return [position[n] for n in target_names]


def load_transfer_targets(params: Params, layout: Layout, info: ClassesManifest, bundle: FeatureBundle) -> list[TransferTarget]:
    """Locate, then encode, every dataset of evaluation.cross_datasets and evaluation.domain_shift."""
    from aape.data import cap_per_class, load_dataset

    wanted = [(CROSS_DATASET, name) for name in params.evaluation.cross_datasets]
    wanted += [(DOMAIN_SHIFT, name) for name in params.evaluation.domain_shift]
    if not wanted:
        return []
    located = []
    for scope, name in wanted:  # all located before anything is encoded: fail fast, naming the path
        key = "evaluation.cross_datasets" if scope == CROSS_DATASET else "evaluation.domain_shift"
        try:
            splits = load_dataset(name, params.data.root, download=params.data.download)
        except ValueError as exc:  # aape.data's errors name the dataset and the expected path
            raise EvaluationError(f"{key} lists {name!r}, which cannot be loaded: {exc}") from exc
        if not splits.test:
            raise EvaluationError(f"{key}: dataset {name!r} has no test images ({splits.split_source})")
        located.append((scope, name, splits))
    backbone = _backbone(params, bundle)
    targets = []
    for scope, name, splits in located:
        records = cap_per_class(splits.test, params.data.test_per_class)
        targets.append(_encode_target(scope, name, splits, records, backbone, params, layout, info))
    return targets


def _backbone(params: Params, bundle: FeatureBundle):
    from aape.backbone import load_backbone
    from aape.features.image_encoder import backbone_key

    backbone = load_backbone(params.backbone, params.run.device, image_size=params.data.image_size)
    if backbone.identity != bundle.identity:
        raise EvaluationError(
            f"backbone {backbone.identity!r} (params.backbone) is not the one the features were extracted with "
            f"({bundle.identity!r}); set backbone.model/pretrained back, or re-run the pipeline from extract-features"
        )
    if backbone.random_init and backbone_key(backbone)["backbone"] != bundle.index.get("weights"):
        backbone.rebuilt_random = True  # type: ignore[attr-defined]
    return backbone


def _encode_target(scope: str, name: str, splits, records, backbone, params: Params, layout: Layout,
                   info: ClassesManifest) -> TransferTarget:
    from aape.features import class_template_features, image_features, text_features
    from aape.features.baseline_templates import baseline_templates

    encoded = image_features(backbone, splits.image_root, [r.path for r in records], layout.cache,
                             skip_unreadable=params.data.skip_unreadable, batch_size=params.features.batch_size,
                             num_workers=params.features.num_workers, desc=f"{name} test")
    labels = torch.as_tensor([records[int(i)].label for i in encoded.rows], dtype=torch.long)
    target = TransferTarget(scope, splits.name or name, list(splits.classnames), encoded.features, labels)
    if encoded.skipped:
        target.notes.append(f"{name}: {len(encoded.skipped)} unreadable test image(s) skipped (data.skip_unreadable).")
    if getattr(backbone, "rebuilt_random", False):
        target.notes.append(
            f"{name}: RANDOM-INIT backbone rebuilt with other random weights than the run's features; its figures "
            f"compare different embedding spaces and mean nothing."
        )
    if scope == DOMAIN_SHIFT:
        target.parent_labels = class_mapping(target.classnames, splits.parent_labels, info, name)
    else:
        # AAPE reads the target's classes through features.class_template; the zero-shot baselines use
        # the target dataset's own baseline templates (CoOp's / CLIP's for it), as in the papers.
        template = params.features.class_template
        target.class_prompts = text_features(backbone, [template.format(c) for c in target.classnames], layout.cache)
        target.templates = baseline_templates(params.features, name)
        target.class_zeroshot = text_features(backbone, [target.templates.zeroshot.format(c) for c in target.classnames],
                                              layout.cache)
        target.class_ensemble = class_template_features(backbone, target.classnames, target.templates.ensemble, layout.cache)
    log.info("%s target %s: %d test images, %d classes", scope, target.name, len(labels), len(target.classnames))
    return target
