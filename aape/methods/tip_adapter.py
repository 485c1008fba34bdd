"""Tip-Adapter-F (Zhang et al., ECCV 2022): a cache model of the few-shot training set added to
zero-shot CLIP, logits = s·x·W_c + α·exp(−β(1 − x·Kᵀ))·L, with keys K the training images'
features averaged over augmented views (Tip-Adapter averages 10 augmented passes; here the cached
views) and L their one-hot labels. "-F": K is fine-tuned with cross-entropy (AdamW 1e-3, eps 1e-4,
20 epochs, batch 256, α and β fixed at their initial values), then α and β are searched on the
validation split over Tip-Adapter's grid (search_scale / search_step of its configs).

Differences from the released main.py, on purpose: the weights of the last epoch are kept and the
search runs on validation; main.py keeps the epoch with the best *test* accuracy (and searches on
test for ImageNet). The cache holds the training classes only, so it cannot score unseen classes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from aape.evaluation.classifiers import NotApplicable
from aape.labels import local_positions
from aape.method.checkpoint import load_weights
from aape.methods.artifact import read_baseline, write_baseline
from aape.methods.context import MethodContext
from aape.methods.training import train_classifier
from aape.tracking import Tracker

log = logging.getLogger(__name__)

# Tip-Adapter's configs/<dataset>.yaml: init_alpha and search_scale [β_max, α_max] (init_beta is 1 everywhere).
DATASET_DEFAULTS: dict[str, tuple[float, float, float]] = {
    "imagenet": (1.17, 7, 3), "oxford_pets": (1.17, 7, 3), "ucf101": (3, 7, 3), "caltech101": (3, 12, 5),
    "dtd": (2, 13, 13), "eurosat": (2, 12, 10), "fgvc_aircraft": (5, 30, 30), "food101": (1.17, 10, 10),
    "oxford_flowers": (10, 50, 50), "stanford_cars": (3, 20, 10), "sun397": (1.17, 12, 10),
}
FALLBACK = (1.17, 7, 3)  # imagenet's, for datasets Tip-Adapter has no config for


def dataset_defaults(settings, dataset: str) -> tuple[float, float, float]:
    """(init α, β_max, α_max): the settings, or Tip-Adapter's values for the dataset where they are null."""
    alpha, beta_max, alpha_max = DATASET_DEFAULTS.get(dataset, FALLBACK)
    pick = lambda value, default: float(default if value is None else value)  # noqa: E731
    return pick(settings.init_alpha, alpha), pick(settings.search_beta_max, beta_max), pick(settings.search_alpha_max, alpha_max)


class CacheModel(nn.Module):
    """Zero-shot logits plus the cache's; `keys` are learnt, everything else is fixed."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, class_text: torch.Tensor, logit_scale: float,
                 alpha: float, beta: float) -> None:
        super().__init__()
        self.keys = nn.Parameter(keys.clone())
        self.register_buffer("values", values, persistent=False)  # [N, C_train] one-hot
        self.register_buffer("class_text", F.normalize(class_text, dim=-1), persistent=False)  # [C_train, d]
        self.logit_scale, self.alpha, self.beta = logit_scale, alpha, beta

    def cache_logits(self, features: torch.Tensor, beta: float | None = None) -> torch.Tensor:
        beta = self.beta if beta is None else beta
        affinity = features @ self.keys.T
        return torch.exp(-beta * (1 - affinity)) @ self.values

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        clip = self.logit_scale * features @ self.class_text.T
        return clip if self.alpha == 0 else clip + self.alpha * self.cache_logits(features)


def cache_from(ctx: MethodContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys: each training image's views averaged, re-normalised; values: one-hot labels over the training classes."""
    data = ctx.inputs.data
    keys = F.normalize(data.views.mean(dim=1), dim=-1)
    values = F.one_hot(data.labels, num_classes=len(ctx.train_classes)).float()
    return keys, values


def make_model(ctx: MethodContext, method: str) -> CacheModel:
    settings = ctx.settings(method)
    keys, values = cache_from(ctx)
    alpha, _, _ = dataset_defaults(settings, ctx.info.dataset)
    text = ctx.text.hand_written()[ctx.train_classes]
    return CacheModel(keys, values, text, ctx.bundle.logit_scale, alpha, settings.init_beta)


def search_alpha_beta(model: CacheModel, features: torch.Tensor, labels: torch.Tensor, beta_max: float, alpha_max: float,
                      beta_steps: int, alpha_steps: int) -> tuple[float, float, float]:
    """(α, β, validation accuracy) maximising validation accuracy over Tip-Adapter's grid
    β = 0.1 + i·(β_max − 0.1)/steps, α likewise (ties keep the first, as its loop does)."""
    with torch.no_grad():
        clip = model.logit_scale * features @ model.class_text.T
        best = (model.alpha, model.beta, -1.0)
        for i in range(beta_steps):
            beta = 0.1 + i * (beta_max - 0.1) / beta_steps
            cache = model.cache_logits(features, beta)
            for j in range(alpha_steps):
                alpha = 0.1 + j * (alpha_max - 0.1) / alpha_steps
                acc = 100.0 * float(((clip + alpha * cache).argmax(1) == labels).float().mean())
                if acc > best[2]:
                    best = (alpha, beta, acc)
    return best


def train(ctx: MethodContext, method: str, directory: Path, tracker: Tracker) -> dict[str, Any]:
    settings = ctx.settings(method)
    model = make_model(ctx, method)
    summary = train_classifier(ctx, method, model, directory, tracker)
    data = ctx.inputs.data
    _, beta_max, alpha_max = dataset_defaults(settings, ctx.info.dataset)
    alpha, beta, val = search_alpha_beta(model, data.val_features, data.val_labels, beta_max, alpha_max,
                                         settings.search_beta_steps, settings.search_alpha_steps)
    tensors, meta = read_baseline(directory, method, ctx.bundle, ctx.info)
    meta.update(alpha=alpha, beta=beta, searched_val_accuracy=val, init_alpha=model.alpha, init_beta=model.beta,
                search={"beta_max": beta_max, "alpha_max": alpha_max, "beta_steps": settings.search_beta_steps,
                        "alpha_steps": settings.search_alpha_steps})
    write_baseline(directory, method, {**tensors, "values": model.values}, {k: v for k, v in meta.items() if k not in ("format", "kind", "method")})
    log.info("%s seed %d: α=%.3g β=%.3g chosen on validation (%.2f%%)", method, ctx.seed, alpha, beta, val)
    return {**summary, "alpha": alpha, "beta": beta, "searched_val_accuracy": val}


@dataclass
class TipAdapterClassifier:
    name: str
    model: CacheModel
    class_text: torch.Tensor  # [C, d] hand-written prompts of every class
    train_classes: list[int]

    def logits(self, features: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
        rows = local_positions(list(classes), self.train_classes)
        unseen = int((rows < 0).sum())
        if unseen:
            raise NotApplicable(f"Tip-Adapter's cache holds only the training classes; {unseen} class(es) were never seen")
        with torch.no_grad():
            clip = self.model.logit_scale * features @ F.normalize(self.class_text[list(classes)], dim=-1).T
            return clip + self.model.alpha * self.model.cache_logits(features)[:, rows]


def build(ctx: MethodContext, method: str) -> TipAdapterClassifier:
    tensors, meta = read_baseline(ctx.directory(method), method, ctx.bundle, ctx.info)
    text = ctx.text.hand_written()
    model = CacheModel(tensors["keys"], tensors["values"], text[ctx.train_classes], ctx.bundle.logit_scale,
                       float(meta["alpha"]), float(meta["beta"]))
    load_weights(model, {"keys": tensors["keys"]}, ctx.directory(method))
    return TipAdapterClassifier(method, model.eval(), text, ctx.train_classes)
