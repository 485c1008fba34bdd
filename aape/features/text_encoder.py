"""Encode strings once: one cache entry per list of texts (class prompts, template ensemble, descriptions)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from aape.backbone import Backbone
from aape.features.cache import CachedResult, CacheEntry, canonical_json, load_or_compute, sha256_hex
from aape.features.image_encoder import backbone_key
from aape.logs import progress

log = logging.getLogger(__name__)


def text_entry(backbone: Backbone, texts: Sequence[str], cache_dir: Path | str) -> CacheEntry:
    key = {**backbone_key(backbone), "texts_sha256": sha256_hex(canonical_json(list(texts))), "texts": len(texts)}
    return CacheEntry(cache_dir, "texts", key)


def encode_texts_cached(
    backbone: Backbone, texts: Sequence[str], cache_dir: Path | str, batch_size: int = 256, desc: str = "texts"
) -> tuple[torch.Tensor, int]:
    """(features [len(texts), d], how many texts were encoded now: 0 on a cache hit)."""
    texts = [str(t) for t in texts]
    if not texts:
        return torch.empty(0, backbone.embed_dim), 0
    def encode() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"features": _encode(backbone, texts, batch_size, desc)}, {"texts": len(texts), "first_text": texts[0]}

    def usable(cached: CachedResult) -> bool:
        return cached.tensors["features"].shape == (len(texts), backbone.embed_dim)

    result, computed = load_or_compute(text_entry(backbone, texts, cache_dir), encode, usable)
    return result.tensors["features"], len(texts) if computed else 0


def _encode(backbone: Backbone, texts: list[str], batch_size: int, desc: str) -> torch.Tensor:
    features = torch.empty(len(texts), backbone.embed_dim)
    # Batches of similar length: each batch is cut to its longest text (Backbone.encode_texts), so
    # sorting keeps one long description from making a whole batch pay for 77 positions.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    starts = range(0, len(texts), batch_size)
    start_time = time.perf_counter()
    for start in progress(starts, f"encode {desc}", total=len(starts), unit="batch"):
        rows = order[start : start + batch_size]
        features[rows] = backbone.encode_texts([texts[i] for i in rows]).cpu()
    seconds = time.perf_counter() - start_time
    log.info("encoded %d %s in %.1fs (%.0f texts/s)", len(texts), desc, seconds, len(texts) / max(seconds, 1e-9))
    return features


def text_features(backbone: Backbone, texts: Sequence[str], cache_dir: Path | str, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text features [len(texts), d] through the cache (encoded only on a miss)."""
    return encode_texts_cached(backbone, texts, cache_dir, batch_size)[0]


def class_template_features(
    backbone: Backbone, classnames: Sequence[str], templates: Sequence[str], cache_dir: Path | str, batch_size: int = 256
) -> torch.Tensor:
    """CLIP's prompt ensemble: per class the mean of its normalised template embeddings, re-normalised. [C, d]."""
    texts = [template.format(name) for name in classnames for template in templates]
    return ensemble_mean(text_features(backbone, texts, cache_dir, batch_size), len(classnames), len(templates))


def ensemble_mean(features: torch.Tensor, num_classes: int, num_templates: int) -> torch.Tensor:
    """[C*T, d] class-major template features -> [C, d] normalised means."""
    return torch.nn.functional.normalize(features.view(num_classes, num_templates, -1).mean(dim=1), dim=-1)
