"""The prompt aggregator (docs/method.md, "The aggregator"): many descriptions of a class -> one summary p^a.

Variants (`aggregator.variant`):
- `attention` (default, image-conditioned): one attention block whose query is built from the
  summary token and the image embedding x, with keys and values the descriptions P. The summary is
  anchored to the descriptions: values are P, the residual goes onto p̄, and the output is
  re-normalised. x enters only through the attention weights, so the reward cannot be met by
  copying x.
- `literal`: self-attention over [p̄, P] without x, as the paper's equation is written (one summary
  per class, the same for every image).
- `mean`: p^a = p̄ (CuPL). `mlp`: p^a = α·f(p̄) + (1-α)·p̄ with α learnt, as in the paper.
  `random`: one random description.

The summary token is "a learnable token initialised to p̄": since p̄ differs by class, it is
p̄ + δ with one shared learnable δ initialised to 0; it seeds the query. Untrained, the attention is
near uniform and p^a is close to p̄ (the CuPL summary); training moves it only by re-weighting the
descriptions.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from aape.errors import AAPEError
from aape.method.checkpoint import CheckpointError, load_weights, read_checkpoint, write_checkpoint
from aape.method.descriptions import DescriptionBank, masked_mean

VARIANTS = ("attention", "literal", "mean", "mlp", "random")
CHECKPOINT_STEM = "aggregator"


class NoAttentionError(AAPEError, ValueError):
    """Asked for attention weights of an aggregator variant that has none."""


class Aggregator(nn.Module):
    """Common interface: forward(x [B,d], P [B,n,d], mask [B,n]) -> p^a [B,d], L2-normalised."""

    variant: str = ""
    has_attention: bool = False
    trainable: bool = True

    def summarize(self, x: torch.Tensor, bank: DescriptionBank, local_labels: torch.Tensor) -> torch.Tensor:
        """p^a for images x of the given local classes, descriptions taken from the bank."""
        P, mask = bank.gather(local_labels)
        return self(x, P, mask)

    def attention_weights(self, x: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
        """Attention of each image over one class's descriptions: x [B,d], P [n,d] -> [B,n]."""
        raise NoAttentionError(
            f"aggregator variant '{self.variant}' has no attention weights; only 'attention' and 'literal' do"
        )


class AttentionAggregator(Aggregator):
    """Multi-head attention + feed-forward + LayerNorm on a summary token, anchored to the descriptions.

        u      = t + x                      (`attention`; `literal`: u = t, keys also include t)
        u      = u + FF(LN(u))              the feed-forward refines the query
        α_h    = softmax_j((W_q^h LN(u)) · (W_k^h LN(p_j)) / √e)     per head h
        a      = mean_h Σ_j α_hj p_j        values are the descriptions themselves
        p^a    = normalize(p̄ + γ·a)         residual onto p̄, learnable gain γ > 0 (starts at 1)

    The output is a positive combination of the class's descriptions whatever the weights: neither x
    nor a per-class memorised vector can reach it except by choosing descriptions. (A value/output
    projection or a feed-forward on the output would let the block map each class's p̄ to the mean
    of its images and leave the attention uniform: the reward would be met without aggregating.)
    """

    has_attention = True

    def __init__(self, dim: int, heads: int = 8, ff_mult: int = 4, image_conditioned: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"aggregator.heads={heads} must divide the embedding size {dim}; choose e.g. 1, 2, 4 or 8")
        self.variant = "attention" if image_conditioned else "literal"
        self.image_conditioned = image_conditioned
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.summary_offset = nn.Parameter(torch.zeros(dim))
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim))
        self.norm_query = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.query = nn.Linear(dim, dim)
        # A key bias adds the same amount to every score of a query, which softmax ignores: none.
        self.key = nn.Linear(dim, dim, bias=False)
        self.log_gain = nn.Parameter(torch.zeros(()))
        nn.init.zeros_(self.ff[2].weight)  # the query starts as LN(t + x) itself
        nn.init.zeros_(self.ff[2].bias)

    def _sequence(self, x: torch.Tensor, P: torch.Tensor, mask: torch.Tensor):
        """p̄, the query input, the keys' inputs with their mask, and the values."""
        mean = masked_mean(P, mask)
        token = mean + self.summary_offset
        query_in = token + x if self.image_conditioned else token
        query_in = query_in + self.ff(self.norm_ff(query_in))
        if self.image_conditioned:
            return mean, query_in, P, mask, P
        keys = torch.cat([token.unsqueeze(1), P], dim=1)
        values = torch.cat([mean.unsqueeze(1), P], dim=1)
        return mean, query_in, keys, torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1), values

    def _weights(self, query_in: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention weights [B, H, n] of one query per item over its keys.

        Same as projecting every key with W_k, but W_k is moved onto the single query (W_kᵀq):
        O(B·d²) instead of O(B·n·d²), nothing per description is projected.
        """
        B, H, e = query_in.shape[0], self.heads, self.head_dim
        q = self.query(self.norm_query(query_in)).view(B, H, e) / math.sqrt(e)
        q_in_key_space = torch.einsum("bhe,hed->bhd", q, self.key.weight.view(H, e, self.dim))
        scores = torch.einsum("bhd,bnd->bhn", q_in_key_space, self.norm_context(keys))
        return scores.masked_fill(~mask.unsqueeze(1), float("-inf")).softmax(dim=-1)

    def forward(self, x: torch.Tensor, P: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            mask = torch.ones(P.shape[:2], dtype=torch.bool, device=P.device)
        mean, query_in, keys, key_mask, values = self._sequence(x, P, mask)
        weights = self._weights(query_in, keys, key_mask).mean(dim=1)  # heads averaged: [B, n]
        attended = torch.einsum("bn,bnd->bd", weights, values)
        return F.normalize(mean + self.log_gain.exp() * attended, dim=-1)

    def description_weights(self, x: torch.Tensor, P: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Each item's attention over its own descriptions, heads averaged: [B, n] (0 on padding).

        For `literal` the summary token's own share is left out, so rows sum to less than one."""
        _, query_in, keys, key_mask, _ = self._sequence(x, P, mask)
        weights = self._weights(query_in, keys, key_mask).mean(dim=1)
        return weights if self.image_conditioned else weights[:, 1:]

    @torch.no_grad()
    def attention_weights(self, x: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
        """x [B,d], one class's descriptions P [n,d] -> [B,n], averaged over heads.

        For `literal` the summary token's own share is left out, so rows sum to less than one.
        """
        P = P.unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.description_weights(x, P, torch.ones(P.shape[:2], dtype=torch.bool, device=P.device))


class MeanAggregator(Aggregator):
    """p^a = p̄: the CuPL description ensemble, for every image of the class."""

    variant = "mean"
    trainable = False

    def forward(self, x: torch.Tensor, P: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            mask = torch.ones(P.shape[:2], dtype=torch.bool, device=P.device)
        return masked_mean(P, mask)


class MLPAggregator(Aggregator):
    """p^a = normalize(α·f(p̄) + (1-α)·p̄) with f a 2-layer bottleneck MLP (no attention, no x).

    α is learnt, as in the paper, through a logit so that it stays in (0, 1); `alpha` is its start."""

    variant = "mlp"

    def __init__(self, dim: int, hidden: int = 32, alpha: float = 0.2) -> None:
        super().__init__()
        if not 0 < alpha < 1:
            raise ValueError(f"aggregator.mlp_alpha={alpha} must lie strictly between 0 and 1 (it is learnt through a logit)")
        self.initial_alpha = alpha
        self.alpha_logit = nn.Parameter(torch.logit(torch.tensor(float(alpha))))
        self.f = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    @property
    def alpha(self) -> torch.Tensor:
        return torch.sigmoid(self.alpha_logit)

    def forward(self, x: torch.Tensor, P: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            mask = torch.ones(P.shape[:2], dtype=torch.bool, device=P.device)
        mean = masked_mean(P, mask)
        alpha = self.alpha
        return F.normalize(alpha * self.f(mean) + (1 - alpha) * mean, dim=-1)


class RandomAggregator(Aggregator):
    """p^a = one description of the class drawn at random (from `generator`, for reproducibility)."""

    variant = "random"
    trainable = False

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x: torch.Tensor, P: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            mask = torch.ones(P.shape[:2], dtype=torch.bool, device=P.device)
        counts = mask.sum(1).cpu()
        # descriptions are packed at the front of each row (DescriptionBank), so index < count is real
        picks = (torch.rand(len(counts), generator=self.generator) * counts).long().clamp_max(counts - 1)
        return F.normalize(P[torch.arange(len(picks)), picks.to(P.device)], dim=-1)


def build_aggregator(
    variant: str, dim: int, heads: int = 8, ff_mult: int = 4, mlp_hidden: int = 32, mlp_alpha: float = 0.2, seed: int = 0
) -> Aggregator:
    """The aggregator of a variant; parameters drawn from torch's RNG state at the call."""
    if variant in ("attention", "literal"):
        return AttentionAggregator(dim, heads, ff_mult, image_conditioned=variant == "attention")
    if variant == "mean":
        return MeanAggregator()
    if variant == "mlp":
        return MLPAggregator(dim, mlp_hidden, mlp_alpha)
    if variant == "random":
        return RandomAggregator(seed)
    raise ValueError(f"aggregator.variant '{variant}' is unknown; choose one of {', '.join(VARIANTS)}")


def aggregator_from_config(cfg, dim: int, seed: int = 0) -> Aggregator:
    """From an `AggregatorConfig`."""
    return build_aggregator(cfg.variant, dim, cfg.heads, cfg.ff_mult, cfg.mlp_hidden, cfg.mlp_alpha, seed)


def clip_reward(x: torch.Tensor, summary: torch.Tensor, scale: float = 2.5) -> torch.Tensor:
    """CLIPScore-style reward per image: s·max(cos(x, p^a), 0)."""
    return scale * F.cosine_similarity(x, summary, dim=-1).clamp_min(0)


def architecture_of(aggregator: Aggregator) -> dict[str, Any]:
    """What `build_aggregator` needs to rebuild this aggregator."""
    arch: dict[str, Any] = {"variant": aggregator.variant}
    if isinstance(aggregator, AttentionAggregator):
        arch.update(dim=aggregator.dim, heads=aggregator.heads, ff_mult=aggregator.ff[0].out_features // aggregator.dim)
    elif isinstance(aggregator, MLPAggregator):
        arch.update(dim=aggregator.f[0].in_features, mlp_hidden=aggregator.f[0].out_features, mlp_alpha=aggregator.initial_alpha)
    return arch


def save_aggregator(aggregator: Aggregator, directory: Path, meta: dict[str, Any]) -> list[Path]:
    """aggregator.safetensors + aggregator.json (architecture, plus `meta`: config, backbone, classes)."""
    info = {
        "kind": "aape-aggregator",
        **meta,
        "architecture": architecture_of(aggregator),
        "param_count": sum(p.numel() for p in aggregator.parameters()),
    }
    return write_checkpoint(Path(directory), CHECKPOINT_STEM, aggregator.state_dict(), info)


def load_aggregator(
    directory: str | Path, expect_identity: str | None = None, expect_embed_dim: int | None = None
) -> Aggregator:
    """A trained aggregator in eval mode (e.g. to plot `attention_weights`); `.meta` holds its JSON."""
    directory = Path(directory)
    tensors, meta = read_checkpoint(directory, CHECKPOINT_STEM, expect_identity, expect_embed_dim)
    try:
        arch = dict(meta["architecture"])
        variant = arch.pop("variant")
        dim = arch.pop("dim", meta.get("embed_dim", 1))
        aggregator = build_aggregator(variant, dim, seed=meta.get("seed", 0), **arch)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{directory / (CHECKPOINT_STEM + '.json')} lacks a valid architecture ({exc}); retrain") from None
    load_weights(aggregator, tensors, directory / f"{CHECKPOINT_STEM}.safetensors")
    aggregator.meta = meta
    return aggregator.eval()
