"""AAPE for image-text retrieval: each image's own captions are its prompts, the aggregator
summarises them into a per-image p^a, and h learns to predict p^a from the image, trained with
λ·‖h(x) − p^a‖² plus the CLIP loss (the symmetric contrastive loss between image-side queries and
caption embeddings). g is not used: h alone is the 33k parameters of the paper's retrieval model.

The query. `query: residual` (default) scores captions with normalize(x + h(x)), h's output layer
starting at zero, so the untrained model is zero-shot CLIP's image embedding (the same reasoning as
`generator.head_init: zeroshot` for classification, docs/method.md). `query: prompt` uses
normalize(h(x)) alone, the paper's literal "AAPE as the query", which starts at random.

Per-image aggregation needs no code of its own: a DescriptionBank whose "classes" are images
(`caption_bank`) and labels that are image indices make the classification aggregator summarise
an image's own captions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from aape.method.descriptions import DescriptionBank
from aape.method.model import PromptGenerator
from aape.retrieval.metrics import recall_at_k

QueryKind = Literal["residual", "prompt"]


def caption_mask(counts: torch.Tensor, n_max: int) -> torch.Tensor:
    """[N, n_max] True where image i has a j-th caption (captions are packed at the front of each row)."""
    return torch.arange(n_max).unsqueeze(0) < counts.unsqueeze(1)


def caption_bank(captions: torch.Tensor, counts: torch.Tensor | None = None) -> DescriptionBank:
    """captions [N, n_max, d] (each image's caption embeddings, padded) -> a bank with one "class" per image."""
    N, n_max, _ = captions.shape
    counts = counts if counts is not None else torch.full((N,), n_max)
    return DescriptionBank(captions, caption_mask(counts, n_max), list(range(N)))


class RetrievalQuery(nn.Module):
    def __init__(self, dim: int, hidden: int = 32, query: QueryKind = "residual") -> None:
        super().__init__()
        self.h = PromptGenerator(dim, hidden)
        self.query_kind = query
        if query == "residual":  # untrained = zero-shot CLIP's image embedding
            nn.init.zeros_(self.h.net[2].weight)
            nn.init.zeros_(self.h.net[2].bias)

    def prompt(self, x: torch.Tensor) -> torch.Tensor:
        """h(x), what distillation pulls towards p^a."""
        return self.h(x)

    def query(self, x: torch.Tensor, prompt: torch.Tensor | None = None) -> torch.Tensor:
        prompt = self.h(x) if prompt is None else prompt
        return F.normalize(x + prompt if self.query_kind == "residual" else prompt, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.query(x)


def clip_loss(queries: torch.Tensor, captions: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over a batch of matched (query, caption) rows."""
    logits = logit_scale * queries @ captions.T
    target = torch.arange(len(queries), device=queries.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


@dataclass
class RetrievalSet:
    """Cached features of a retrieval split: views of the images, their captions and summaries."""

    views: torch.Tensor  # [N, V, d] training views (or [N, 1, d])
    captions: torch.Tensor  # [N, n_max, d] caption embeddings, padded
    counts: torch.Tensor  # [N] captions per image
    summaries: torch.Tensor | None = None  # p^a [N, V, d] (None: no distillation)

    def flat_captions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([M, d] every real caption, [M] its image index), for Recall@K."""
        mask = caption_mask(self.counts, self.captions.shape[1])
        image = torch.arange(len(self.counts)).unsqueeze(1).expand_as(mask)
        return self.captions[mask], image[mask]


class RetrievalObjective:
    """The Objective (aape.method.training) of h: λ·distill + CLIP loss, one caption drawn per image and step."""

    def __init__(self, train: RetrievalSet, val: RetrievalSet, lambda_distill: float, logit_scale: float, seed: int) -> None:
        if lambda_distill > 0 and train.summaries is None:
            raise ValueError("lambda_distill > 0 needs the aggregator's summaries p^a of the training views")
        self.train, self.val, self.lam, self.scale = train, val, lambda_distill, logit_scale
        self.generator = torch.Generator().manual_seed(seed)

    def loss(self, model: RetrievalQuery, items: torch.Tensor, views: torch.Tensor):
        x = self.train.views[items, views]
        pick = (torch.rand(len(items), generator=self.generator) * self.train.counts[items]).long()
        caption = self.train.captions[items, pick]
        prompt = model.prompt(x)
        contrastive = clip_loss(model.query(x, prompt), caption, self.scale)
        figures = {"clip_loss": contrastive.detach()}
        if not self.lam:
            return contrastive, figures
        distill = ((prompt - self.train.summaries[items, views]) ** 2).sum(-1).mean()
        figures["distill"] = distill.detach()
        return contrastive + self.lam * distill, figures

    def validate(self, model: RetrievalQuery) -> dict[str, float]:
        # '@' is not allowed in an MLflow metric name: i2t_R@1 is logged as val_i2t_R_at_1
        return {f"val_{k.replace('@', '_at_')}": v for k, v in retrieval_recall(model, self.val).items()}

    def selection_key(self, figures: dict[str, float]) -> tuple[float, ...]:
        return (figures.get("val_rsum", 0.0),)

    def diagnostics(self, model: RetrievalQuery) -> dict[str, float]:
        return {}


@torch.no_grad()
def retrieval_recall(model: RetrievalQuery | None, split: RetrievalSet) -> dict[str, float]:
    """Recall@1/5/10 both ways of a split: image queries from `model` (None: zero-shot CLIP's x)."""
    x = split.views[:, 0]
    queries = F.normalize(x, dim=-1) if model is None else model.query(x)
    captions, image_of_caption = split.flat_captions()
    return recall_at_k(queries @ captions.T, image_of_caption)
