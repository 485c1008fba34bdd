"""CLIP-Adapter (Gao et al., IJCV 2023): a residual bottleneck on the image features,
x' = α·A(x) + (1 − α)·x with A = ReLU∘Linear(d/4 → d)∘ReLU∘Linear(d → d/4) (no biases), scored
against the hand-written prompts' text features (the released clip_adapter.py: α = 0.2, reduction 4).
With α = 0 it is zero-shot CLIP with those prompts; the text side is never trained, so it scores
unseen classes from their names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from aape.method.checkpoint import load_weights
from aape.method.objectives import seeded
from aape.methods.artifact import read_baseline
from aape.methods.context import ClassText, MethodContext
from aape.methods.training import train_classifier
from aape.tracking import Tracker


class ImageAdapter(nn.Module):
    def __init__(self, dim: int, reduction: int, ratio: float) -> None:
        super().__init__()
        hidden = max(1, dim // reduction)
        self.adapter = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.ReLU(inplace=True),
                                     nn.Linear(hidden, dim, bias=False), nn.ReLU(inplace=True))
        self.ratio = ratio

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Adapted, re-normalised image features."""
        if self.ratio == 0:
            return F.normalize(features, dim=-1)
        return F.normalize(self.ratio * self.adapter(features) + (1 - self.ratio) * features, dim=-1)


class AdapterOverClasses(nn.Module):
    """The adapter and a fixed text classifier over the training classes (what training optimises)."""

    def __init__(self, adapter: ImageAdapter, class_text: torch.Tensor, logit_scale: float) -> None:
        super().__init__()
        self.image_adapter = adapter
        self.register_buffer("class_text", F.normalize(class_text, dim=-1), persistent=False)
        self.logit_scale = logit_scale

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * self.image_adapter(features) @ self.class_text.T


def train(ctx: MethodContext, method: str, directory: Path, tracker: Tracker) -> dict[str, Any]:
    settings = ctx.settings(method)
    with seeded(ctx.seed):
        adapter = ImageAdapter(ctx.bundle.embed_dim, settings.reduction, settings.ratio)
    text = ctx.text.hand_written()[ctx.train_classes]
    model = AdapterOverClasses(adapter, text, ctx.bundle.logit_scale)
    return train_classifier(ctx, method, model, directory, tracker)


@dataclass
class AdapterClassifier:
    name: str
    adapter: ImageAdapter
    class_text: torch.Tensor  # [C, d] hand-written prompts, every class of the label space
    logit_scale: float

    def logits(self, features: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
        weights = F.normalize(self.class_text[torch.as_tensor(list(classes), dtype=torch.long)], dim=-1)
        with torch.no_grad():
            return self.logit_scale * self.adapter(features) @ weights.T

    def retarget(self, text: ClassText) -> "AdapterClassifier":
        return AdapterClassifier(self.name, self.adapter, text.hand_written(), self.logit_scale)


def build(ctx: MethodContext, method: str) -> AdapterClassifier:
    tensors, meta = read_baseline(ctx.directory(method), method, ctx.bundle, ctx.info)
    saved = meta["settings"]
    adapter = ImageAdapter(ctx.bundle.embed_dim, int(saved["reduction"]), float(saved["ratio"]))
    load_weights(adapter, {k.removeprefix("image_adapter."): v for k, v in tensors.items()}, ctx.directory(method))
    return AdapterClassifier(method, adapter.eval(), ctx.text.hand_written(), ctx.bundle.logit_scale)
