"""The evaluation protocols of docs/method.md, "Protocols", run for every method and seed.

- the training dataset's own protocol, from data/classes.json: `base2new` (base test images among
  the base classes, new test images among the new classes) or `fewshot` (all classes);
- cross-dataset transfer (evaluation.cross_datasets): other datasets with their own class names;
- domain shift (evaluation.domain_shift): ImageNet variants whose classes are (a subset of) the
  training dataset's, mapped through `parent_labels`.

Methods: zeroshot, zeroshot-ensemble, cupl, linear-probe, aape-nodistill, aape (config order).
A method that cannot score a set (a linear probe on classes it never saw, CuPL without
descriptions of a transfer dataset's classes) yields an n/a outcome with the reason, not a number.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from aape.config import Params
from aape.data.manifests import ClassesManifest
from aape.evaluation.classifiers import (
    Classifier,
    CSearch,
    EvaluationError,
    ModelClassifier,
    NotApplicable,
    cupl,
    train_linear_probe,
    zeroshot,
    zeroshot_ensemble,
)
from aape.evaluation.results import SetOutcome, evaluate_set
from aape.features import FeatureBundle
from aape.features.baseline_templates import BaselineTemplates
from aape.layout import Layout

log = logging.getLogger(__name__)

NODISTILL_DIR = "nodistill"


class ClassMismatchError(EvaluationError):
    """A trained model's classes are not the ones the protocol requires."""


def model_dir(layout: Layout, method: str, seed: int) -> Path:
    base = layout.seed_dir(layout.generator, seed)
    return base / NODISTILL_DIR if method == "aape-nodistill" else base


def check_model_classes(meta: dict[str, Any], info: ClassesManifest, directory: Path) -> None:
    """The protocol requires the model to have been trained on exactly classes.json's train classes
    (base-to-new: otherwise 'new' classes were seen in training)."""
    trained = meta.get("train_classnames")
    if trained is None:
        trained = meta.get("classnames")
    if trained is None:
        raise ClassMismatchError(f"{directory}/generator.json records no train_classnames; retrain with `aape distill-generator`")
    expected = info.train_classnames
    if list(trained) != expected:
        missing = [c for c in expected if c not in trained]
        extra = [c for c in trained if c not in expected]
        detail = []
        if missing:
            detail.append(f"not trained on {', '.join(map(repr, missing[:5]))}{' ...' if len(missing) > 5 else ''}")
        if extra:
            detail.append(f"trained on classes outside the protocol's training set: {', '.join(map(repr, extra[:5]))}")
        if not detail:
            detail.append("same classes in another order")
        raise ClassMismatchError(
            f"model {directory} was trained on {len(trained)} classes that do not match the {len(expected)} training "
            f"classes of {info.path} ({info.protocol}): {'; '.join(detail)}. Re-run `aape distill-generator` on this "
            f"data (or restore the data the model was trained on)."
        )


def load_aape(layout: Layout, method: str, seed: int, bundle: FeatureBundle, info: ClassesManifest):
    from aape.method import AAPEModel

    directory = model_dir(layout, method, seed)
    if not (directory / "generator.json").is_file():
        hint = " (it is trained when 'aape-nodistill' is in evaluation.methods)" if method == "aape-nodistill" else ""
        raise EvaluationError(
            f"no trained model for method '{method}', seed {seed}: {directory} is missing{hint}. Run "
            f"`aape distill-generator`, or remove '{method}' from evaluation.methods."
        )
    model = AAPEModel.load(directory, expect_identity=bundle.identity, expect_embed_dim=bundle.embed_dim)
    check_model_classes(model.meta, info, directory)
    return model


@dataclass
class Unavailable:
    """A method that cannot run on this data; every set it is asked about is reported n/a."""

    name: str
    reason: str

    def logits(self, features: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
        raise NotApplicable(self.reason)


@dataclass
class Remapped:
    """Scores a target dataset's classes with a classifier of the training dataset's classes,
    through `parent` (target label -> training-dataset label)."""

    inner: Classifier
    parent: Sequence[int]

    @property
    def name(self) -> str:
        return self.inner.name

    def logits(self, features: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
        return self.inner.logits(features, [self.parent[c] for c in classes])


def build_classifiers(methods: Sequence[str], bundle: FeatureBundle, info: ClassesManifest, layout: Layout,
                      params: Params) -> dict[str, Classifier]:
    """Every configured method for one seed, in the training dataset's global label space."""
    built: dict[str, Classifier] = {}
    for method in methods:
        if method == "zeroshot":
            built[method] = zeroshot(bundle.zeroshot_prompts, bundle.logit_scale)
        elif method == "zeroshot-ensemble":
            built[method] = zeroshot_ensemble(bundle.class_ensemble, bundle.logit_scale)
        elif method == "cupl":
            try:
                built[method] = cupl(bundle.descriptions, bundle.description_class, len(info.classnames),
                                     bundle.logit_scale, info.classnames)
            except EvaluationError as exc:
                log.warning("CuPL is not applicable: %s", exc)
                built[method] = Unavailable(method, str(exc).split(". ")[0])
        elif method == "linear-probe":
            keep = torch.isin(bundle.train_labels, torch.as_tensor(info.train_classes))
            built[method] = train_linear_probe(bundle.train_clean[keep], bundle.train_labels[keep], bundle.val_features,
                                               bundle.val_labels, CSearch.from_config(params.evaluation))
        elif method in ("aape", "aape-nodistill"):
            built[method] = ModelClassifier(method, load_aape(layout, method, bundle.seed, bundle, info), bundle.class_prompts)
        else:
            raise EvaluationError(f"evaluation.methods: unknown method '{method}'")
    return built


@dataclass
class TransferTarget:
    """A test set of another dataset, with features from the same backbone."""

    scope: str  # cross-dataset | domain-shift
    name: str
    classnames: list[str]
    features: torch.Tensor  # [N, d]
    labels: torch.Tensor  # [N] the target's own labels
    parent_labels: list[int] | None = None  # target label -> training-dataset label (domain shift)
    class_prompts: torch.Tensor | None = None  # [C_t, d] features.class_template, needed when parent_labels is None
    class_zeroshot: torch.Tensor | None = None  # [C_t, d] the zero-shot baseline's template for the target
    class_ensemble: torch.Tensor | None = None
    templates: BaselineTemplates | None = None  # the target's baseline templates (cross-dataset only)
    notes: list[str] = field(default_factory=list)


def transfer_classifier(method: str, source: Classifier, target: TransferTarget) -> Classifier:
    """How each method scores a transfer target: through the class mapping when the target's
    classes are the training dataset's (domain shift), else from the target's own class names."""
    if target.parent_labels is not None:
        return Remapped(source, target.parent_labels)
    if method == "zeroshot":
        return zeroshot(target.class_zeroshot, source.logit_scale)  # type: ignore[attr-defined]
    if method == "zeroshot-ensemble":
        return zeroshot_ensemble(target.class_ensemble, source.logit_scale)  # type: ignore[attr-defined]
    if isinstance(source, ModelClassifier):
        return ModelClassifier(source.name, source.model, target.class_prompts)
    if method == "cupl":
        return Unavailable(method, f"no descriptions of {target.name}'s classes were generated (only of the training dataset's)")
    if method == "linear-probe":
        return Unavailable(method, f"a linear probe has no weights for {target.name}'s classes")
    return Unavailable(method, str(getattr(source, "reason", "not applicable")))


def evaluate_seed(
    classifiers: dict[str, Classifier],
    bundle: FeatureBundle,
    info: ClassesManifest,
    targets: Sequence[TransferTarget],
    batch_size: int,
) -> list[SetOutcome]:
    """Every method of one seed on the training dataset's eval sets and on every transfer target."""
    outcomes: list[SetOutcome] = []
    for method, classifier in classifiers.items():
        for set_name, classes in info.eval_sets.items():
            outcomes.append(evaluate_set(classifier, bundle.test_features, bundle.test_labels, classes, info.classnames,
                                         scope=info.protocol, dataset=info.dataset, seed=bundle.seed,
                                         eval_set=set_name, batch_size=batch_size))
        for target in targets:
            scorer = transfer_classifier(method, classifier, target)
            outcomes.append(evaluate_set(scorer, target.features, target.labels, range(len(target.classnames)),
                                         target.classnames, scope=target.scope, dataset=target.name,
                                         seed=bundle.seed, eval_set="all", batch_size=batch_size))
    return outcomes
