"""The prompt generator h, the classifier head g and the model used at test time (docs/method.md).

    h(x)       = W2·ReLU(W1·x + b1) + b2                      d -> hidden -> d (33k params at d=512)
    w_i(x)     = w_i + g([w_i ; h(x)])    head_init "zeroshot" (default): g's output starts at zero
    w_i(x)     = g([w_i ; h(x)])          head_init "random": the paper's literal form, random g
    logit_i(x) = logit_scale · cos(x, w_i(x))

Why the residual default: a random g starts the classifier at chance and makes it learn a class map
from the base classes only, and new classes collapse; with w_i + g and g's last layer at zero the
untrained model IS zero-shot CLIP, and training can only add to CLIP's prior (as CoOp starts from a
hand-written prompt). docs/method.md, "The classifier head", has the evidence.

The fast head. g's first layer acts on the concatenation, so W·[w_i; h] = A·w_i + B·h with A, B the
two halves of W: `A·w_i + b` is computed once per class ("class part"), `B·h(x)` once per image, and
the per-(image, class) work is an add, a ReLU and a few dot products:
- `full` (g = γ·ReLU(W·[w;h] + b), γ a learnt gain; γ = 1 fixed in the literal form): z = ReLU(a_i + b_x).
- `bottleneck` (g = V·ReLU(W·[w;h] + b) + c, hidden k): with r = ReLU(a_i + b_x) in R^k,
  x·(Vr + c) = (Vᵀx)·r + x·c and |Vr + c|² = rᵀ(VᵀV)r + 2(Vᵀc)·r + |c|², so everything per pair
  stays k-wide; the residual adds x·w_i, 2·(Vᵀw_i)·r + 2·w_i·c and |w_i|², again k-wide per pair.
No (batch × classes × 2d) tensor is ever built; `naive_logits` builds it, for tests and benchmarks.

Why the bottleneck path works in blocks: its per-pair work is one k × k quadratic form rᵀ(VᵀV)r
(k² = 1024 multiply-adds at k = 32, twice zero-shot's d = 512) plus a few k-wide passes. On a CPU the
k-wide passes are memory-bound when the [B, C, k] tensor spills out of cache; blocks of
`_BLOCK_PAIRS` (image, class) pairs keep it in L2. Without autograd (evaluation), float32 on the CPU,
the whole per-pair work runs as one compiled loop (aape.method.fused_head: 2.3x these blocks in
bench_inference); where it cannot be built the blocks are laid out k-major ([images, k, classes]:
the quadratic form one batched GEMM, the sums over k vectorised across classes instead of over a
32-wide last axis; 1.2-1.4x the [pairs, k] loop side by side), reuse two buffers and update in place. benchmarks/bench_inference.py prints the head beside one [B, C, k]
tensor and beside the quadratic form's GEMM alone, which by itself runs at about 0.5x zero-shot's
rate on cached features (0.46-0.66x measured): the bound for any exact float32 form of this head.
Everything class-only (VᵀV, 2Vᵀ(t_i + c), |t_i + c|²) is computed once in `class_part`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from aape.method import fused_head
from aape.method.checkpoint import CheckpointError, load_weights, read_checkpoint, write_checkpoint

HeadKind = Literal["bottleneck", "full"]
HeadInit = Literal["zeroshot", "random"]
HEAD_KINDS = ("bottleneck", "full")
HEAD_INITS = ("zeroshot", "random")
CHECKPOINT_STEM = "generator"
_EPS = 1e-8  # as torch.nn.functional.cosine_similarity
_BLOCK_PAIRS = 8192  # (image, class) pairs per block: a [pairs, 32] float32 tensor is 1 MiB, one core's L2
_BLOCK_IMAGES = 128  # at most this many images per block, so a block spans many classes
_BLOCK_CLASSES = 1024  # classes per block without autograd (k-major: [images, k, classes])


class PromptGenerator(nn.Module):
    """h: two fully connected layers with a ReLU between them."""

    def __init__(self, dim: int, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class ClassPart:
    """What the head needs of the classes, computed once per class set."""

    pre: torch.Tensor  # [C, k] A·w_i + b
    text: torch.Tensor  # [C, d] w_i (the residual adds it back)
    # bottleneck only: |w_i(x)|² = const_i + r·(gram·r + linear_i), x·w_i(x) = x·offset_i + (Vᵀx)·r
    gram: torch.Tensor | None = None  # [k, k] VᵀV
    linear: torch.Tensor | None = None  # [C, k] 2Vᵀ(c + t_i), t_i = w_i in the residual form, 0 otherwise
    const: torch.Tensor | None = None  # [C] |c + t_i|²
    _fused: tuple[torch.Tensor, ...] | None = field(default=None, repr=False)

    def fused_inputs(self) -> tuple[torch.Tensor, ...]:
        """The fused loop's class-major copies (aape.method.fused_head): pre and linear as [k, C], VᵀV's
        upper triangle with its off-diagonal doubled, the constants; made once per class part."""
        if self._fused is None:
            upper = torch.triu(self.gram, 1) * 2 + torch.diag(torch.diagonal(self.gram))
            self._fused = (self.pre.T.contiguous(), self.linear.T.contiguous(), upper.contiguous(), self.const.contiguous())
        return self._fused


class ClassifierHead(nn.Module):
    """g([w; h]) in its naive and its fast form (same parameters, same values, same gradients)."""

    def __init__(self, dim: int, kind: HeadKind = "bottleneck", hidden: int = 32, init: HeadInit = "zeroshot") -> None:
        super().__init__()
        if kind not in HEAD_KINDS:
            raise ValueError(f"generator.head '{kind}' is unknown; choose one of {', '.join(HEAD_KINDS)}")
        if init not in HEAD_INITS:
            raise ValueError(f"generator.head_init '{init}' is unknown; choose one of {', '.join(HEAD_INITS)}")
        self.dim, self.kind, self.init = dim, kind, init
        self.residual = init == "zeroshot"
        width = hidden if kind == "bottleneck" else dim
        self.mix = nn.Linear(2 * dim, width)  # acts on [w_i ; h(x)]
        self.expand = nn.Linear(hidden, dim) if kind == "bottleneck" else None
        # The residual form starts g's output at exactly zero: the untrained model is zero-shot CLIP.
        self.gain = nn.Parameter(torch.zeros(())) if self.residual and kind == "full" else None
        if self.residual and self.expand is not None:
            nn.init.zeros_(self.expand.weight)
            nn.init.zeros_(self.expand.bias)

    # naive: literally g([w_i; h(x)]) for every pair ----------------------------------------------
    def naive(self, class_text: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """w_i(x) for every pair: [B, C, d], via a [B, C, 2d] concatenation."""
        B, C = prompt.shape[0], class_text.shape[0]
        pairs = torch.cat([class_text.unsqueeze(0).expand(B, C, -1), prompt.unsqueeze(1).expand(B, C, -1)], dim=-1)
        hidden = F.relu(self.mix(pairs))
        out = hidden if self.expand is None else self.expand(hidden)
        if not self.residual:
            return out
        if self.gain is not None:
            out = self.gain * out
        return class_text.unsqueeze(0) + out

    # fast: per-class and per-image parts ----------------------------------------------------------
    def class_part(self, class_text: torch.Tensor) -> ClassPart:
        """A·w_i + b for every class ([C, k]), plus the class-only terms of w_i(x)'s norm."""
        pre = F.linear(class_text, self.mix.weight[:, : self.dim], self.mix.bias)
        if self.expand is None:
            return ClassPart(pre, class_text)
        V, c = self.expand.weight, self.expand.bias  # [d, k], [d]
        offset = class_text + c if self.residual else c.expand_as(class_text)
        return ClassPart(pre, class_text, V.T @ V, 2 * (offset @ V), offset.pow(2).sum(-1))

    def image_part(self, prompt: torch.Tensor) -> torch.Tensor:
        """B·h(x) for every image: [B, k]."""
        return F.linear(prompt, self.mix.weight[:, self.dim :])

    def cosine(self, x: torch.Tensor, part: ClassPart, image_part: torch.Tensor) -> torch.Tensor:
        """cos(x, w_i(x)) for every pair, [B, C], from the two parts."""
        x_norm = x.norm(dim=-1, keepdim=True).clamp_min(_EPS)
        if self.expand is not None:
            return self._bottleneck_cosine(x, part, image_part, x_norm)
        act = torch.relu_(part.pre.unsqueeze(0) + image_part.unsqueeze(1))  # [B, C, d], the only per-pair tensor
        dots = torch.bmm(act, x.unsqueeze(-1)).squeeze(-1)  # x·z
        sq_norms = act.pow(2).sum(-1)  # |z|²
        if self.residual:  # w = t + γz: x·w = x·t + γ x·z, |w|² = |t|² + 2γ t·z + γ²|z|²
            gain = self.gain
            cross = (act * part.text.unsqueeze(0)).sum(-1)
            dots = x @ part.text.T + gain * dots
            sq_norms = part.text.pow(2).sum(-1) + 2 * gain * cross + gain * gain * sq_norms
        # |w| from the quadratic form can dip a hair below 0 by rounding: clamp before the root
        w_norm = sq_norms.clamp_min(_EPS**2).sqrt()
        return dots / (x_norm * w_norm)

    def _bottleneck_cosine(self, x: torch.Tensor, part: ClassPart, image_part: torch.Tensor, x_norm: torch.Tensor) -> torch.Tensor:
        """cos(x, w_i(x)) = x·w_i(x) / (|w_i(x)| |x|) for every pair, in blocks of pairs that stay in cache.

        w_i(x) = o_i + V·r with o_i = c + t_i and r = ReLU(pre_i + image_part): x·w = x·o_i + (Vᵀx)·r
        and |w|² = |o_i|² + r·(VᵀV·r + 2Vᵀo_i).
        """
        B, C = x.shape[0], part.pre.shape[0]
        x_bias = (x @ self.expand.bias).unsqueeze(1)  # x·c
        dots_all = torch.addmm(x_bias, x, part.text.T) if self.residual else x_bias.expand(B, C).clone()
        x_expand = x @ self.expand.weight  # [B, k] Vᵀx
        tracked = torch.is_grad_enabled() and any(
            t.requires_grad for t in (x, image_part, part.pre, part.gram, part.linear, part.const)
        )
        if fused_head.usable(part, x, tracked):
            return fused_head.cosine(part, x_expand, image_part, dots_all, x_norm)
        blocks = _blocks_differentiable if tracked else _blocks_in_place
        return blocks(dots_all, x_expand, image_part, part, *block_shape(B, C, tracked)) / x_norm


def block_shape(images: int, classes: int, tracked: bool) -> tuple[int, int]:
    """(images, classes) per block: about `_BLOCK_PAIRS` pairs; without autograd the k-major blocks are
    wide in classes, the axis their sums run along."""
    if tracked:
        per_block = min(classes, max(1, _BLOCK_PAIRS // max(1, min(images, _BLOCK_IMAGES))))
    else:
        per_block = min(classes, _BLOCK_CLASSES)
    return min(images, max(1, _BLOCK_PAIRS // per_block)), per_block


def _blocks_differentiable(dots_all, x_expand, image_part, part: ClassPart, images: int, classes: int) -> torch.Tensor:
    """The block loop for training: out-of-place ops that autograd can follow."""
    B, C = dots_all.shape
    rows = []
    for i in range(0, B, images):
        img, x_exp = image_part[i : i + images], x_expand[i : i + images]
        cols = []
        for j in range(0, C, classes):
            act = torch.relu_(part.pre[j : j + classes].unsqueeze(0) + img.unsqueeze(1))  # [b, c, k]
            dots = dots_all[i : i + images, j : j + classes] + torch.linalg.vecdot(act, x_exp.unsqueeze(1))
            quad = torch.linalg.vecdot(act @ part.gram + part.linear[j : j + classes], act)
            # |w|² from the quadratic form can dip a hair below 0 by rounding: clamp before the root
            cols.append(dots / (quad + part.const[j : j + classes]).clamp_min(_EPS**2).sqrt())
        rows.append(torch.cat(cols, dim=1) if len(cols) > 1 else cols[0])
    return torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]


def _blocks_in_place(dots_all, x_expand, image_part, part: ClassPart, images: int, classes: int) -> torch.Tensor:
    """The same values without autograd (evaluation, inference), laid out k-major: each image's block is
    [k, classes], so the quadratic form is one batched GEMM G·R and both per-pair sums over k run along
    the middle axis (vectorised across classes) or as a batched GEMV, where the [pairs, k] layout above
    reduces over a 32-wide last axis, which PyTorch's CPU kernels do slowly. Two block buffers are reused
    for every block and updated in place; results go straight into `dots_all`."""
    B, C = dots_all.shape
    k = part.pre.shape[1]
    pre_t, linear_t = part.pre.T, part.linear.T  # [k, C]
    act_buffer = part.pre.new_empty(images * classes * k)
    quad_buffer = part.pre.new_empty(images * classes * k)
    sums = part.pre.new_empty(images * classes)
    dots = part.pre.new_empty(images * classes)
    for j in range(0, C, classes):
        c = min(classes, C - j)
        pre_block, linear_block = pre_t[:, j : j + c].contiguous(), linear_t[:, j : j + c].contiguous()
        const_block = part.const[j : j + c]
        for i in range(0, B, images):
            b = min(images, B - i)
            act = act_buffer[: b * k * c].view(b, k, c)
            torch.add(pre_block, image_part[i : i + b].unsqueeze(-1), out=act).relu_()  # r = ReLU(pre_i + e_x)
            quad = quad_buffer[: b * k * c].view(b, k, c)
            torch.matmul(part.gram, act, out=quad)  # VᵀV·r (VᵀV is symmetric)
            norms = torch.sum(quad.add_(linear_block).mul_(act), dim=1, out=sums[: b * c].view(b, c))
            cross = torch.bmm(x_expand[i : i + b].unsqueeze(1), act, out=dots[: b * c].view(b, 1, c)).squeeze(1)  # (Vᵀx)·r
            out = dots_all[i : i + b, j : j + c]
            out.add_(cross).div_(norms.add_(const_block).clamp_min_(_EPS**2).sqrt_())
    return dots_all


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
        head_init: HeadInit = "zeroshot",
    ) -> None:
        super().__init__()
        self.dim = dim
        self.generator = PromptGenerator(dim, hidden)
        self.head = ClassifierHead(dim, head, head_hidden, head_init)
        self.logit_scale = float(logit_scale)
        self.meta: dict = {}  # filled by checkpoint loading: identity, classnames, config, ...

    @classmethod
    def from_config(cls, cfg, dim: int, logit_scale: float) -> "AAPEModel":
        """From a `GeneratorConfig`."""
        return cls(dim, cfg.hidden, cfg.head, cfg.head_hidden, logit_scale, cfg.head_init)

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
            # checkpoints written before head_init existed hold the literal, randomly initialised g
            model = cls(arch["dim"], arch["hidden"], arch["head"], arch["head_hidden"] or 32, arch["logit_scale"], arch.get("head_init", "random"))
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
            "head_init": self.head.init,
            "logit_scale": self.logit_scale,
        }

    def parameter_counts(self) -> dict[str, int]:
        h = sum(p.numel() for p in self.generator.parameters())
        g = sum(p.numel() for p in self.head.parameters())
        return {"h": h, "g": g, "total": h + g}

    def param_groups(self, h_lr_scale: float = 1.0) -> list[dict]:
        """Optimiser groups: h at `h_lr_scale` times the learning rate, g at the rate itself."""
        return [{"params": list(self.generator.parameters()), "lr_scale": float(h_lr_scale)},
                {"params": list(self.head.parameters()), "lr_scale": 1.0}]

    def prompt_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """h(x): the image's AAPE, a vector in the joint space."""
        return self.generator(x)

    def class_part(self, class_text: torch.Tensor) -> ClassPart:
        self._check_dim(class_text, "class_text")
        return self.head.class_part(class_text)

    def logits_from(self, x: torch.Tensor, class_part: ClassPart) -> torch.Tensor:
        return self.logits_and_prompt(x, class_part)[0]

    def logits_and_prompt(self, x: torch.Tensor, class_part: ClassPart) -> tuple[torch.Tensor, torch.Tensor]:
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
