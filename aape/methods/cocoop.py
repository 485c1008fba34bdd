"""CoCoOp (Zhou et al., CVPR 2022): CoOp's context plus a per-image shift π(x) from a small
meta-net, Linear(d, d/16) → ReLU → Linear(d/16, width), added to every context vector
(CoOp's trainers/cocoop.py; configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml: 4 vectors
from "a photo of a", SGD 0.002, batch 1, 10 epochs).

The cost is the method's: every image has its own prompts, so a step runs the text encoder on
batch × classes prompts, and scoring does too. Before training, the activation memory of a step is
estimated and compared with what the device has free; if it does not fit, training stops at once
and says which batch size does. Scoring splits the images into chunks that fit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from aape.method.checkpoint import load_weights
from aape.method.objectives import seeded
from aape.methods.artifact import read_baseline
from aape.methods.context import ClassText, MethodContext
from aape.methods.errors import MethodError
from aape.methods.prompt_encoder import PromptEncoder
from aape.methods.training import train_classifier
from aape.tracking import Tracker

log = logging.getLogger(__name__)

MEMORY_SHARE = 0.8  # of the free memory the text-encoder activations may take
VALIDATION_PROMPTS = 50_000  # per-epoch validation: at most this many (image, class) prompts


class MetaNet(nn.Module):
    def __init__(self, dim: int, width: int, reduction: int) -> None:
        super().__init__()
        hidden = max(1, dim // reduction)
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConditionalPrompts(nn.Module):
    def __init__(self, encoder: PromptEncoder, context: torch.Tensor, meta_net: MetaNet, logit_scale: float) -> None:
        super().__init__()
        self.context = nn.Parameter(context.clone())
        self.meta_net = meta_net
        self.__dict__["encoder"] = encoder
        self.logit_scale = logit_scale

    def contexts(self, features: torch.Tensor) -> torch.Tensor:
        """[B, n_ctx, w]: the shared context shifted by each image's π(x)."""
        return self.context.unsqueeze(0) + self.meta_net(features).unsqueeze(1)

    def forward(self, features: torch.Tensor, classes: Sequence[int] | None = None) -> torch.Tensor:
        text = self.encoder.encode_per_image(self.contexts(features), classes)  # [B, C, d]
        return self.logit_scale * torch.einsum("bd,bcd->bc", features.to(text.dtype), text)


def free_memory_bytes(device: torch.device) -> int:
    """What the device reports free: CUDA's mem_get_info, else the OS's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30  # unknown: assume 8 GiB


def memory_budget(settings, device: torch.device) -> int:
    return int(settings.memory_gb * (1 << 30)) if settings.memory_gb else int(MEMORY_SHARE * free_memory_bytes(device))


def check_training_fits(encoder: PromptEncoder, batch_size: int, budget: int) -> None:
    """Stop before training when a step's activations exceed the budget, naming the batch size that fits."""
    classes = len(encoder.classnames)
    needed = encoder.activation_bytes(batch_size * classes)
    if needed <= budget:
        return
    per_image = encoder.activation_bytes(classes)
    fits = budget // max(per_image, 1)
    advice = (f"set baselines.cocoop.schedule.batch_size: {fits} (or fewer)" if fits >= 1 else
              "not even one image fits: use fewer training classes, a GPU with more memory, or drop cocoop")
    raise MethodError(
        f"CoCoOp needs ~{needed / (1 << 30):.1f} GiB of text-encoder activations per step (batch {batch_size} × {classes} "
        f"classes × {encoder.length} tokens) but {budget / (1 << 30):.1f} GiB are available; {advice}. "
        f"baselines.cocoop.memory_gb sets the budget explicitly."
    )


def images_per_chunk(encoder: PromptEncoder, classes: int, budget: int) -> int:
    """Images scored per text-encoder pass (no gradients: a forward keeps about a sixth of training's)."""
    per_image = max(encoder.activation_bytes(classes) // 6, 1)
    return max(1, min(1024, budget // per_image))


def make_model(ctx: MethodContext, method: str) -> ConditionalPrompts:
    from aape.methods.coop import initial_context

    settings = ctx.settings(method)
    inputs = ctx.inputs
    backbone = ctx.backbone()
    encoder = PromptEncoder(backbone, inputs.classnames, settings.n_ctx)
    check_training_fits(encoder, settings.schedule.batch_size, memory_budget(settings, backbone.device))
    context = initial_context(encoder, settings, len(inputs.classnames), ctx.seed)
    meta_net = MetaNet(ctx.bundle.embed_dim, encoder.width, settings.meta_reduction)
    return ConditionalPrompts(encoder, context, meta_net, ctx.bundle.logit_scale).to(backbone.device)


def train(ctx: MethodContext, method: str, directory: Path, tracker: Tracker) -> dict[str, Any]:
    with seeded(ctx.seed):
        model = make_model(ctx, method)
    meta = {"prompt_tokens": model.encoder.length}
    # every validation image costs a text-encoder pass per class: at 500 classes the per-epoch figure
    # uses 100 validation images spread over the classes (the kept weights are the last epoch's unless select: best-val)
    val_images = max(1, VALIDATION_PROMPTS // len(model.encoder.classnames))
    return train_classifier(ctx, method, model, directory, tracker, meta, device=ctx.backbone().device, val_images=val_images)


@dataclass
class CoCoOpClassifier:
    """Scores images with their own prompts, in chunks of images that fit the memory budget."""

    name: str
    model: ConditionalPrompts
    budget: int
    backbone: Any
    n_ctx: int

    def logits(self, features: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
        classes = list(classes)
        chunk = images_per_chunk(self.model.encoder, len(classes), self.budget)
        device = self.model.context.device
        with torch.no_grad():
            parts = [self.model(features[i : i + chunk].to(device), classes).cpu() for i in range(0, len(features), chunk)]
        return torch.cat(parts) if parts else torch.empty(0, len(classes))

    def retarget(self, text: ClassText) -> "CoCoOpClassifier":
        encoder = PromptEncoder(self.backbone, text.names, self.n_ctx)
        model = ConditionalPrompts(encoder, self.model.context.detach(), self.model.meta_net, self.model.logit_scale)
        return CoCoOpClassifier(self.name, model.to(self.model.context.device), self.budget, self.backbone, self.n_ctx)


def build(ctx: MethodContext, method: str) -> CoCoOpClassifier:
    tensors, meta = read_baseline(ctx.directory(method), method, ctx.bundle, ctx.info)
    settings = ctx.settings(method)
    saved = meta["settings"]
    backbone = ctx.backbone()
    encoder = PromptEncoder(backbone, ctx.info.classnames, int(saved["n_ctx"]))
    meta_net = MetaNet(ctx.bundle.embed_dim, encoder.width, int(saved["meta_reduction"]))
    model = ConditionalPrompts(encoder, tensors["context"], meta_net, ctx.bundle.logit_scale)
    load_weights(model, tensors, ctx.directory(method))
    model.to(backbone.device).eval()
    return CoCoOpClassifier(method, model, memory_budget(settings, backbone.device), backbone, int(saved["n_ctx"]))
