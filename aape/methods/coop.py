"""CoOp (Zhou et al., IJCV 2022) and KgCoOp (Yao et al., CVPR 2023): learnt context vectors in
front of the class name, trained through CLIP's frozen text encoder with cross-entropy on cached
image features (docs/method.md, "Baselines").

KgCoOp adds W·(1 − mean_i cos(w_i, w_i^clip)) over the training classes, w^clip the hand-written
prompt's embedding (KgCoOp's trainers/kgcoop.py: W = 8; the paper writes it as a squared distance,
which for unit vectors is twice this). With W = 0 it is CoOp.

Started from "a photo of a", the untrained prompt equals the zero-shot template "a photo of a {}."
token for token. After training, every class of a label space is encoded once (the context is
shared), so scoring costs what zero-shot does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from aape.evaluation.classifiers import TextClassifier
from aape.method.objectives import seeded
from aape.methods.artifact import read_baseline
from aape.methods.context import ClassText, MethodContext
from aape.methods.errors import MethodError
from aape.methods.prompt_encoder import PromptEncoder
from aape.methods.training import train_classifier
from aape.tracking import Tracker

ENCODE_BATCH = 256  # prompts per text-encoder pass when a whole label space is encoded


class ContextPrompts(nn.Module):
    """The learnt context ([n_ctx, w], or [C, n_ctx, w] class-specific) and the classifier it defines
    over the training classes; the frozen encoder is held outside the module's state."""

    def __init__(self, encoder: PromptEncoder, context: torch.Tensor, logit_scale: float,
                 anchor: torch.Tensor | None = None, kg_weight: float = 0.0) -> None:
        super().__init__()
        self.context = nn.Parameter(context.clone())
        self.__dict__["encoder"] = encoder  # not a submodule: its weights are frozen and not ours to save
        self.logit_scale = logit_scale
        self.kg_weight = kg_weight
        self.register_buffer("anchor", anchor, persistent=False)  # [C_train, d] hand-written prompts (KgCoOp)
        self._text: torch.Tensor | None = None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        self._text = self.encoder.encode(self.context)  # the training classes' text features, this step
        return self.logit_scale * features.to(self._text.dtype) @ self._text.T

    def regulariser(self) -> torch.Tensor:
        if not self.kg_weight or self.anchor is None or self._text is None:
            return torch.zeros((), device=self.context.device)
        cos = F.cosine_similarity(self._text, self.anchor.to(self._text.device), dim=-1)
        return self.kg_weight * (1.0 - cos.mean())


@dataclass
class LearntPromptClassifier(TextClassifier):
    """A label space's classes encoded once with the learnt context; scores other label spaces by
    encoding their class names with the same context."""

    context: torch.Tensor  # [n_ctx, width] the learnt context
    encoder_for: Callable[[Sequence[str]], PromptEncoder]  # a label space's class names -> its prompt encoder

    def retarget(self, text: ClassText) -> "LearntPromptClassifier":
        weights = encode_label_space(self.encoder_for(text.names), self.context)
        return LearntPromptClassifier(self.name, weights, self.logit_scale, self.context, self.encoder_for)


def encode_label_space(encoder: PromptEncoder, context: torch.Tensor, batch: int = ENCODE_BATCH) -> torch.Tensor:
    """[C, d] text features of every class of `encoder`, in batches, without gradients."""
    with torch.no_grad():
        rows = range(len(encoder.classnames))
        chunks = [encoder.encode(context if context.dim() == 2 else context[i : i + batch], list(rows[i : i + batch]))
                  for i in range(0, len(rows), batch)]
    return torch.cat(chunks).cpu()


def initial_context(encoder: PromptEncoder, settings, classes: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    context = encoder.init_context(settings.ctx_init, generator)
    return context.unsqueeze(0).repeat(classes, 1, 1) if getattr(settings, "class_specific", False) else context


def make_model(ctx: MethodContext, method: str) -> ContextPrompts:
    """The untrained learner of `method` (coop or kgcoop) over the training classes."""
    settings = ctx.settings(method)
    inputs = ctx.inputs
    encoder = PromptEncoder(ctx.backbone(), inputs.classnames, settings.n_ctx)
    context = initial_context(encoder, settings, len(inputs.classnames), ctx.seed)
    kg_weight = float(getattr(settings, "kg_weight", 0.0))
    anchor = F.normalize(ctx.text.hand_written()[inputs.train_classes], dim=-1) if kg_weight else None
    return ContextPrompts(encoder, context, ctx.bundle.logit_scale, anchor, kg_weight).to(ctx.backbone().device)


def train(ctx: MethodContext, method: str, directory: Path, tracker: Tracker) -> dict[str, Any]:
    with seeded(ctx.seed):
        model = make_model(ctx, method)
    meta = {"n_ctx": ctx.settings(method).n_ctx, "prompt_tokens": model.encoder.length}
    return train_classifier(ctx, method, model, directory, tracker, meta, device=ctx.backbone().device)


def build(ctx: MethodContext, method: str) -> LearntPromptClassifier:
    tensors, meta = read_baseline(ctx.directory(method), method, ctx.bundle, ctx.info)
    context = tensors["context"]
    settings = meta["settings"]
    if context.dim() == 3 and context.shape[0] != len(ctx.info.train_classnames):
        raise MethodError(f"{method}: class-specific context for {context.shape[0]} classes, but {len(ctx.info.train_classnames)} train classes")
    backbone = ctx.backbone()

    def encoder_for(classnames: Sequence[str]) -> PromptEncoder:
        return PromptEncoder(backbone, classnames, int(settings["n_ctx"]))

    if context.dim() == 3:  # class-specific: only the training classes have a context
        return ClassSpecificClassifier(method, context, encoder_for, ctx.info.train_classes, ctx.info.classnames, ctx.bundle.logit_scale)
    weights = encode_label_space(encoder_for(ctx.info.classnames), context)
    return LearntPromptClassifier(method, weights, ctx.bundle.logit_scale, context, encoder_for)


@dataclass
class ClassSpecificClassifier:
    """CoOp's class-specific context (CSC): one learnt context per training class, none for others."""

    name: str
    context: torch.Tensor  # [C_train, n_ctx, w]
    encoder_for: Any
    train_classes: list[int]
    classnames: list[str]
    logit_scale: float

    def __post_init__(self) -> None:
        names = [self.classnames[c] for c in self.train_classes]
        self._weights = encode_label_space(self.encoder_for(names), self.context)

    def logits(self, features: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
        from aape.evaluation.classifiers import NotApplicable
        from aape.labels import local_positions

        rows = local_positions(list(classes), self.train_classes)
        if bool((rows < 0).any()):
            raise NotApplicable(f"class-specific contexts exist only for the {len(self.train_classes)} training classes")
        return self.logit_scale * features @ self._weights[rows].T
