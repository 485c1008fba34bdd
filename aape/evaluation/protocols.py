"""The evaluation protocols of docs/method.md, "Protocols", run for every method and seed.

- the training dataset's own protocol, from data/classes.json: `base2new` (base test images among
  the base classes, new test images among the new classes) or `fewshot` (all classes);
- cross-dataset transfer (evaluation.cross_datasets): other datasets with their own class names;
- domain shift (evaluation.domain_shift): ImageNet variants whose classes are (a subset of) the
  training dataset's, mapped through `parent_labels`.

Methods: any of aape/methods/registry.py's, in evaluation.methods' order.
A method that cannot score a set (a linear probe on classes it never saw, CuPL without
descriptions of a transfer dataset's classes) yields an n/a outcome with the reason, not a number.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from aape.config import Params
from aape.data.manifests import ClassesManifest
from aape.evaluation.classifiers import Classifier, EvaluationError, Unavailable
from aape.evaluation.results import SetOutcome, evaluate_set
from aape.features import FeatureBundle
from aape.features.baseline_templates import BaselineTemplates
from aape.layout import Layout
from aape.methods.context import ClassText, MethodContext, backbone_loader
from aape.methods.registry import method_spec

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
                      params: Params, load_backbone: Callable[[], Any] | None = None) -> dict[str, Classifier]:
    """Every configured method for one seed, in the training dataset's global label space, each built as
    its registry entry says (aape/methods/registry.py)."""
    ctx = MethodContext(params, layout, info, bundle, load_backbone or backbone_loader(params))
    built: dict[str, Classifier] = {}
    for method in methods:
        try:
            spec = method_spec(method)
        except KeyError as exc:
            raise EvaluationError(f"evaluation.methods: {exc.args[0]}") from None
        built[method] = spec.builder()(ctx, method)
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


def target_text(target: TransferTarget) -> ClassText:
    return ClassText(list(target.classnames), target.class_prompts, target.class_zeroshot, target.class_ensemble, target.name)


def transfer_classifier(method: str, source: Classifier, target: TransferTarget) -> Classifier:
    """How each method scores a transfer target: through the class mapping when the target's
    classes are the training dataset's (domain shift), else from the target's own class names, which
    only methods that can score classes they never saw do (the registry's `unseen` says why not)."""
    if target.parent_labels is not None:
        return Remapped(source, target.parent_labels)
    if isinstance(source, Unavailable):
        return source
    retarget = getattr(source, "retarget", None)
    if retarget is None:
        reason = method_spec(method).unseen or f"{method} cannot score another dataset's classes"
        return Unavailable(method, f"{reason} ({target.name}'s classes)")
    return retarget(target_text(target))


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
