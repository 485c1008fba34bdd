"""A small synthetic world with a known structure, for unit tests of the method (no CLIP needed). The
CLIP-like world of the proxy benchmark, with the modality gap and calibrated presets, is aape.synthetic.

Each class c has a unit centroid μ_c. Images and class texts are μ_c plus Gaussian noise,
re-normalised. Each class has `relevant` descriptions near μ_c and `irrelevant` ones pointing in
random directions, shuffled together; `relevant_mask` says which are which.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from aape.method.descriptions import DescriptionBank
from aape.method.objectives import TrainingSet


@dataclass
class SyntheticWorld:
    centroids: torch.Tensor  # [C, d]
    data: TrainingSet  # views [N, V, d], labels, val features/labels
    clean: torch.Tensor  # [N, d]
    class_text: torch.Tensor  # [C, d]
    bank: DescriptionBank  # [C, relevant + irrelevant, d]
    relevant_mask: torch.Tensor  # [C, n] bool


def _near(center: torch.Tensor, noise: float, gen: torch.Generator, *shape: int) -> torch.Tensor:
    d = center.shape[-1]
    eps = torch.randn(*shape, d, generator=gen) / d**0.5  # |eps| ≈ 1
    return F.normalize(center + noise * eps, dim=-1)


def make_world(
    classes: int = 5,
    dim: int = 64,
    shots: int = 8,
    views: int = 2,
    val_shots: int = 4,
    relevant: int = 4,
    irrelevant: int = 12,
    image_noise: float = 0.6,
    description_noise: float = 0.5,
    seed: int = 0,
) -> SyntheticWorld:
    gen = torch.Generator().manual_seed(seed)
    centroids = F.normalize(torch.randn(classes, dim, generator=gen), dim=-1)
    labels = torch.arange(classes).repeat_interleave(shots)
    clean = _near(centroids[labels], image_noise, gen, len(labels))
    train_views = _near(clean.unsqueeze(1), image_noise / 2, gen, len(labels), views)
    val_labels = torch.arange(classes).repeat_interleave(val_shots)
    val = _near(centroids[val_labels], image_noise, gen, len(val_labels))
    class_text = _near(centroids, description_noise, gen, classes)
    good = _near(centroids.unsqueeze(1), description_noise, gen, classes, relevant)
    bad = F.normalize(torch.randn(classes, irrelevant, dim, generator=gen), dim=-1)
    descriptions = torch.cat([good, bad], dim=1)
    is_relevant = torch.cat([torch.ones(classes, relevant), torch.zeros(classes, irrelevant)], dim=1).bool()
    order = torch.stack([torch.randperm(relevant + irrelevant, generator=gen) for _ in range(classes)])
    descriptions = torch.gather(descriptions, 1, order.unsqueeze(-1).expand(-1, -1, dim))
    is_relevant = torch.gather(is_relevant, 1, order)
    bank = DescriptionBank(descriptions, torch.ones_like(is_relevant), list(range(classes)))
    return SyntheticWorld(
        centroids, TrainingSet(train_views, labels, val, val_labels), clean, class_text, bank, is_relevant
    )
