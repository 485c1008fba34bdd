"""The baselines that need no training beyond seconds: CLIP zero-shot (one template, or CLIP's
ensemble), CuPL's description mean, and the linear probe (aape.evaluation.classifiers)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn import functional as F

from aape.evaluation.classifiers import CSearch, EvaluationError, TextClassifier, Unavailable, cupl, train_linear_probe
from aape.methods.context import ClassText, MethodContext

log = logging.getLogger(__name__)


@dataclass
class TemplateClassifier(TextClassifier):
    """A text classifier whose class embeddings come from one field of a label space's ClassText, so it
    scores another dataset's classes from that dataset's own cached prompts."""

    pick: Callable[[ClassText], torch.Tensor | None]  # which cached prompts: the zero-shot template, the ensemble

    def retarget(self, text: ClassText):
        weights = self.pick(text)
        if weights is None:
            return Unavailable(self.name, f"no {self.name} prompts were encoded for {text.dataset}'s classes")
        return TemplateClassifier(self.name, F.normalize(weights, dim=-1), self.logit_scale, self.pick)


def _zeroshot_prompts(text: ClassText) -> torch.Tensor | None:
    return text.zeroshot


def _ensemble_prompts(text: ClassText) -> torch.Tensor | None:
    return text.ensemble


def build_zeroshot(ctx: MethodContext, method: str = "zeroshot") -> TemplateClassifier:
    return TemplateClassifier("zeroshot", ctx.bundle.zeroshot_prompts, ctx.bundle.logit_scale, _zeroshot_prompts).retarget(ctx.text)


def build_ensemble(ctx: MethodContext, method: str = "zeroshot-ensemble") -> TemplateClassifier:
    return TemplateClassifier("zeroshot-ensemble", ctx.bundle.class_ensemble, ctx.bundle.logit_scale, _ensemble_prompts).retarget(ctx.text)


@dataclass
class CuplClassifier(TextClassifier):
    def retarget(self, text: ClassText):
        return Unavailable(self.name, f"no descriptions of {text.dataset}'s classes were generated (only of the training dataset's)")


def build_cupl(ctx: MethodContext, method: str = "cupl"):
    b, info = ctx.bundle, ctx.info
    try:
        built = cupl(b.descriptions, b.description_class, len(info.classnames), b.logit_scale, info.classnames)
    except EvaluationError as exc:
        log.warning("CuPL is not applicable: %s", exc)
        return Unavailable("cupl", str(exc).split(". ")[0])
    return CuplClassifier(built.name, built.class_weights, built.logit_scale)


def build_linear_probe(ctx: MethodContext, method: str = "linear-probe"):
    b = ctx.bundle
    keep = torch.isin(b.train_labels, torch.as_tensor(ctx.train_classes))
    return train_linear_probe(b.train_clean[keep], b.train_labels[keep], b.val_features, b.val_labels,
                              CSearch.from_config(ctx.params.evaluation))
