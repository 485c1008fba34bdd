"""CLIP's frozen text encoder with learnt context vectors in place of a prompt's first words: the
core of CoOp, CoCoOp and KgCoOp (docs/method.md, "Baselines").

A prompt is `[SOS] v_1 ... v_M <class name> . [EOS]`. The token embeddings of the class names (and
of SOS, the full stop, EOS) never change, so they are computed once per label space and only the
M context rows are replaced on every forward pass. Started from the word embeddings of
"a photo of a", the prompt is token for token "a photo of a <class>.", so an untrained CoOp
scores exactly as zero-shot CLIP with that template (a test checks it).

The transformer is causal and the embedding is read at EOS, so positions after the label space's
last EOS are cut off (as aape.backbone.encode_text_trimmed does for plain strings).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.nn import functional as F

from aape.methods.errors import MethodError

log = logging.getLogger(__name__)

PLACEHOLDER = "X"


@dataclass
class _Tokens:
    ids: torch.Tensor  # [C, L] token ids, cut after the last EOS
    embeddings: torch.Tensor  # [C, L, width] their frozen token embeddings


class PromptEncoder:
    """Encodes "<context> <class name>." for a list of class names with the context as vectors."""

    def __init__(self, backbone, classnames: Sequence[str], n_ctx: int) -> None:
        model = backbone.model
        _check_supported(model, backbone.name)
        self.model, self.device, self.n_ctx = model, backbone.device, n_ctx
        self.classnames = list(classnames)
        self.width = int(model.token_embedding.weight.shape[1])
        self.heads = int(getattr(model.transformer.resblocks[0].attn, "num_heads", 8))
        self.layers = len(model.transformer.resblocks)
        prefix = " ".join([PLACEHOLDER] * n_ctx)
        ids = backbone.tokenizer([f"{prefix} {name}." for name in self.classnames]).to(self.device)
        length = int(_pooled_positions(model, ids).max()) + 1
        if length > ids.shape[1] or n_ctx + 3 > ids.shape[1]:
            raise MethodError(f"{n_ctx} context vectors plus a class name do not fit CLIP's {ids.shape[1]} tokens; lower n_ctx")
        ids = ids[:, :length]
        with torch.no_grad():
            embeddings = model.token_embedding(ids)
        self._tokens = _Tokens(ids, embeddings)
        self._tokenizer = backbone.tokenizer

    @property
    def length(self) -> int:
        """Tokens per prompt after cutting (what a forward pass costs)."""
        return int(self._tokens.ids.shape[1])

    def init_context(self, words: str, generator: torch.Generator | None = None) -> torch.Tensor:
        """[n_ctx, width]: the word embeddings of `words` (which must be n_ctx tokens), or N(0, 0.02) as CoOp
        draws a random start when `words` is empty."""
        if not words:
            return torch.randn(self.n_ctx, self.width, generator=generator) * 0.02
        ids = self._tokenizer([words]).to(self.device)
        count = int(_pooled_positions(self.model, ids)[0]) - 1  # tokens between SOS and EOS
        if count != self.n_ctx:
            raise MethodError(f"ctx_init {words!r} is {count} tokens but n_ctx is {self.n_ctx}; set n_ctx: {count} or change ctx_init")
        with torch.no_grad():
            return self.model.token_embedding(ids[0, 1 : 1 + count]).float().cpu()

    def encode(self, context: torch.Tensor, classes: Sequence[int] | None = None) -> torch.Tensor:
        """L2-normalised text features of the prompts.

        context [n_ctx, w] (one context for all classes) -> [C, d]; [C, n_ctx, w] (one per class, CoOp's
        class-specific variant) -> [C, d]; [B, n_ctx, w] with `per_image=True` semantics is `encode_per_image`."""
        tokens = self._select(classes)
        C = tokens.ids.shape[0]
        if context.dim() == 2:
            context = context.unsqueeze(0).expand(C, -1, -1)
        return self._forward(tokens, context)

    def encode_per_image(self, contexts: torch.Tensor, classes: Sequence[int] | None = None) -> torch.Tensor:
        """contexts [B, n_ctx, w] (one per image, CoCoOp) -> [B, C, d]: every class's prompt for every image."""
        tokens = self._select(classes)
        B, C = contexts.shape[0], tokens.ids.shape[0]
        flat = contexts.unsqueeze(1).expand(B, C, -1, -1).reshape(B * C, self.n_ctx, -1)
        tiled = _Tokens(tokens.ids.repeat(B, 1), tokens.embeddings.repeat(B, 1, 1))
        return self._forward(tiled, flat).view(B, C, -1)

    def activation_bytes(self, prompts: int) -> int:
        """Activation memory a forward+backward pass over `prompts` prompts keeps, by the per-layer
        estimate of Korthikanti et al. 2022 (34·s·w + 5·a·s² bytes per sequence in 16-bit; doubled for
        32-bit): s tokens, w width, a heads."""
        s, w, a = self.length, self.width, self.heads
        element = torch.finfo(self._dtype()).bits // 8
        per_layer = (34 * s * w + 5 * a * s * s) * element / 2
        return int(math.ceil(per_layer * self.layers * prompts))

    def _dtype(self) -> torch.dtype:
        return self.model.token_embedding.weight.dtype

    def _select(self, classes: Sequence[int] | None) -> _Tokens:
        if classes is None:
            return self._tokens
        rows = torch.as_tensor(list(classes), dtype=torch.long, device=self._tokens.ids.device)
        return _Tokens(self._tokens.ids[rows], self._tokens.embeddings[rows])

    def _forward(self, tokens: _Tokens, context: torch.Tensor) -> torch.Tensor:
        model, L = self.model, tokens.ids.shape[1]
        cast = model.transformer.get_cast_dtype()
        context = context.to(self.device, cast)
        x = torch.cat([tokens.embeddings[:, :1].to(cast), context, tokens.embeddings[:, 1 + self.n_ctx :].to(cast)], dim=1)
        x = x + model.positional_embedding[:L].to(cast)
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:L, :L]))
        x = x[torch.arange(x.shape[0], device=x.device), _pooled_positions(model, tokens.ids)]
        projection = model.text_projection
        if projection is not None:
            x = projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
        return F.normalize(x.float(), dim=-1)


def _pooled_positions(model, ids: torch.Tensor) -> torch.Tensor:
    if model.text_pool_type == "argmax":
        return ids.argmax(dim=-1)
    return (ids == model.text_eos_id).int().argmax(dim=-1)


def _check_supported(model, name: str) -> None:
    import open_clip

    pool = getattr(model, "text_pool_type", None)
    if type(model) is not open_clip.CLIP or getattr(model, "attn_mask", None) is None or pool not in ("argmax", "eos"):
        raise MethodError(
            f"CoOp-style prompt learning needs an open_clip CLIP with its own causal text transformer pooled at the "
            f"end-of-text token; {name} ({type(model).__name__}, pooling {pool!r}) is not one. Remove coop, cocoop and "
            f"kgcoop from evaluation.methods for this backbone."
        )
    if pool == "eos" and getattr(model, "text_eos_id", None) is None:
        raise MethodError(f"{name}: text pooling at 'eos' but the model records no end-of-text id")
