"""The prompt generator h, the classifier head g and the model used at test time (METHOD.md 2.2-2.5).

    h(x)       = W2·ReLU(W1·x + b1) + b2                      d -> hidden -> d (33k params at d=512)
    w_i(x)     = g([w_i ; h(x)])                              g: R^2d -> R^d
    logit_i(x) = logit_scale · cos(x, w_i(x))

The fast head. g's first layer acts on the concatenation, so W·[w_i; h] = A·w_i + B·h with A, B the
two halves of W: `A·w_i + b` is computed once per class ("class part"), `B·h(x)` once per image, and
the per-(image, class) work is an add, a ReLU and a dot product:
- `full` (g = ReLU(W·[w;h] + b)): z = ReLU(a_i + b_x) in R^d; logit ∝ x·z / |z|.
- `bottleneck` (g = V·ReLU(W·[w;h] + b) + c, hidden k): with r = ReLU(a_i + b_x) in R^k,
  x·w = (Vᵀx)·r + x·c and |w|² = rᵀ(VᵀV)r + 2(Vᵀc)·r + |c|², so everything per pair stays k-wide.
No (batch × classes × 2d) tensor is ever built; `naive_logits` builds it, for tests and benchmarks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from aape.method.checkpoint import CheckpointError, load_weights, read_checkpoint, write_checkpoint

HeadKind = Literal["bottleneck", "full"]
CHECKPOINT_STEM = "generator"
_EPS = 1e-8  # as torch.nn.functional.cosine_similarity


class PromptGenerator(nn.Module):
    """h: two fully connected layers with a ReLU between them."""

    def __init__(self, dim: int, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ClassifierHead(nn.Module):
    """g([w; h]) in its naive and its fast form (same parameters, same values, same gradients)."""

    def __init__(self, dim: int, kind: HeadKind = "bottleneck", hidden: int = 32) -> None:
        super().__init__()
        if kind not in ("bottleneck", "full"):
            raise ValueError(f"generator.head '{kind}' is unknown; choose 'bottleneck' or 'full'")
        self.dim, self.kind = dim, kind
        width = hidden if kind == "bottleneck" else dim
        self.mix = nn.Linear(2 * dim, width)  # acts on [w_i ; h(x)]
        self.expand = nn.Linear(hidden, dim) if kind == "bottleneck" else None

    # naive: literally g([w_i; h(x)]) for every pair ----------------------------------------------
    def naive(self, class_text: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """w_i(x) for every pair: [B, C, d], via a [B, C, 2d] concatenation."""
        B, C = prompt.shape[0], class_text.shape[0]
        pairs = torch.cat([class_text.unsqueeze(0).expand(B, C, -1), prompt.unsqueeze(1).expand(B, C, -1)], dim=-1)
        hidden = F.relu(self.mix(pairs))
        return hidden if self.expand is None else self.expand(hidden)

    # fast: per-class and per-image parts ----------------------------------------------------------
    def class_part(self, class_text: torch.Tensor) -> torch.Tensor:
        """A·w_i + b for every class: [C, k]."""
        return F.linear(class_text, self.mix.weight[:, : self.dim], self.mix.bias)

    def image_part(self, prompt: torch.Tensor) -> torch.Tensor:
        """B·h(x) for every image: [B, k]."""
        return F.linear(prompt, self.mix.weight[:, self.dim :])

    def cosine(self, x: torch.Tensor, class_part: torch.Tensor, image_part: torch.Tensor) -> torch.Tensor:
        """cos(x, g([w_i; h(x)])) for every pair, [B, C], from the two parts."""
        act = torch.relu_(class_part.unsqueeze(0) + image_part.unsqueeze(1))  # [B, C, k], the only per-pair tensor
        x_norm = x.norm(dim=-1, keepdim=True).clamp_min(_EPS)
        if self.expand is None:
            dots = torch.bmm(act, x.unsqueeze(-1)).squeeze(-1)
            sq_norms = act.pow(2).sum(-1)
        else:
            V, c = self.expand.weight, self.expand.bias  # [d, k], [d]
            dots = torch.bmm(act, (x @ V).unsqueeze(-1)).squeeze(-1) + (x @ c).unsqueeze(1)
            # |V r + c|² = r·(VᵀV r + 2Vᵀc) + |c|²
            quad = (act @ (V.T @ V)).add_(2 * (V.T @ c))
            sq_norms = (act * quad).sum(-1) + c @ c
        # |w| from the quadratic form can dip a hair below 0 by rounding: clamp before the root
        w_norm = sq_norms.clamp_min(_EPS**2).sqrt()
        return dots / (x_norm * w_norm)


class AAPEModel(nn.Module):
    """h and g together, with the backbone facts a checkpoint must agree with.

    `logits(x, class_text)` classifies L2-normalised image features among any classes given by
    their "a photo of a {}." text embeddings; `class_part` + `logits_from` reuse the class part
    across batches (it depends only on the classes).
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 32,
        head: HeadKind = "bottleneck",
        head_hidden: int = 32,
        logit_scale: float = 100.0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.generator = PromptGenerator(dim, hidden)
        self.head = ClassifierHead(dim, head, head_hidden)
        self.logit_scale = float(logit_scale)
        self.meta: dict = {}  # filled by checkpoint loading: identity, classnames, config, ...

    @classmethod
    def from_config(cls, cfg, dim: int, logit_scale: float) -> "AAPEModel":
        """From a `GeneratorConfig`."""
        return cls(dim, cfg.hidden, cfg.head, cfg.head_hidden, logit_scale)

    # checkpoints ---------------------------------------------------------------------------------
    def save(self, directory: Path, meta: dict[str, Any]) -> list[Path]:
        """generator.safetensors + generator.json (architecture, embed_dim, logit_scale, plus `meta`)."""
        info = {
            "kind": "aape-generator",
            **meta,
            "architecture": self.architecture(),
            "embed_dim": self.dim,
            "logit_scale": self.logit_scale,
            "param_counts": self.parameter_counts(),
        }
        self.meta = info
        return write_checkpoint(Path(directory), CHECKPOINT_STEM, self.state_dict(), info)

    @classmethod
    def load(
        cls,
        directory: str | Path,
        expect_identity: str | None = None,
        expect_embed_dim: int | None = None,
        device: str | torch.device = "cpu",
    ) -> "AAPEModel":
        """A trained model in eval mode; refuses one trained on another backbone or embedding size."""
        directory = Path(directory)
        tensors, meta = read_checkpoint(directory, CHECKPOINT_STEM, expect_identity, expect_embed_dim)
        try:
            arch = meta["architecture"]
            model = cls(arch["dim"], arch["hidden"], arch["head"], arch["head_hidden"] or 32, arch["logit_scale"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{directory / (CHECKPOINT_STEM + '.json')} lacks a valid architecture ({exc}); retrain") from None
        load_weights(model, tensors, directory / f"{CHECKPOINT_STEM}.safetensors")
        model.meta = meta
        return model.to(device).eval()

    def architecture(self) -> dict:
        return {
            "dim": self.dim,
            "hidden": self.generator.net[0].out_features,
            "head": self.head.kind,
            "head_hidden": self.head.mix.out_features if self.head.kind == "bottleneck" else None,
            "logit_scale": self.logit_scale,
        }

    def parameter_counts(self) -> dict[str, int]:
        h = sum(p.numel() for p in self.generator.parameters())
        g = sum(p.numel() for p in self.head.parameters())
        return {"h": h, "g": g, "total": h + g}

    def prompt_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """h(x): the image's AAPE, a vector in the joint space."""
        return self.generator(x)

    def class_part(self, class_text: torch.Tensor) -> torch.Tensor:
        self._check_dim(class_text, "class_text")
        return self.head.class_part(class_text)

    def logits_from(self, x: torch.Tensor, class_part: torch.Tensor) -> torch.Tensor:
        return self.logits_and_prompt(x, class_part)[0]

    def logits_and_prompt(self, x: torch.Tensor, class_part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, C] and h(x) [B, d] (training needs both)."""
        self._check_dim(x, "image features")
        prompt = self.generator(x)
        cos = self.head.cosine(x, class_part, self.head.image_part(prompt))
        return self.logit_scale * cos, prompt

    def logits(self, x: torch.Tensor, class_text: torch.Tensor) -> torch.Tensor:
        """Fast head: [B, d] images, [C, d] class texts -> [B, C] logits."""
        return self.logits_from(x, self.class_part(class_text))

    forward = logits

    def naive_logits(self, x: torch.Tensor, class_text: torch.Tensor) -> torch.Tensor:
        """The literal formula (builds [B, C, 2d]); for checking the fast head, not for use."""
        weights = self.head.naive(class_text, self.generator(x))
        return self.logit_scale * F.cosine_similarity(x.unsqueeze(1), weights, dim=-1, eps=_EPS)

    def _check_dim(self, t: torch.Tensor, what: str) -> None:
        if t.shape[-1] != self.dim:
            raise ValueError(
                f"{what} have size {t.shape[-1]} but this model was trained on {self.dim}-d embeddings "
                f"(backbone {self.meta.get('backbone_identity', '?')}): encode them with the same backbone"
            )
