"""Global class labels -> positions in a class subset (classes.json's contract): the one mapping
that training, evaluation and the linear probe use, e.g. the new classes relabelled from 0."""

from __future__ import annotations

from typing import Sequence

import torch

from aape.errors import AAPEError


class LabelMismatchError(AAPEError, ValueError):
    """Labels hold classes outside the subset they are mapped into (features and classes.json disagree)."""


def local_positions(labels: torch.Tensor | Sequence[int], classes: Sequence[int]) -> torch.Tensor:
    """Each label's position in `classes`, -1 for a label that is not among them."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    classes_t = torch.as_tensor(list(classes), dtype=torch.long, device=labels.device)
    size = 1 + max(int(classes_t.max()) if classes_t.numel() else -1, int(labels.max()) if labels.numel() else -1)
    lookup = torch.full((max(size, 1),), -1, dtype=torch.long, device=labels.device)
    lookup[classes_t] = torch.arange(len(classes_t), device=labels.device)
    # a negative label would index the table from its end
    return torch.where(labels >= 0, lookup[labels.clamp_min(0)], -1)


def to_local(labels: torch.Tensor | Sequence[int], classes: Sequence[int], what: str = "labels") -> torch.Tensor:
    """Global labels -> positions in `classes`; a label outside them is an error naming it."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    local = local_positions(labels, classes)
    unknown = sorted(set(labels[local < 0].tolist()))
    if unknown:
        classes = list(classes)
        raise LabelMismatchError(
            f"{what} hold global label(s) {unknown[:10]} that are not among the classes {classes[:10]}"
            f"{'...' if len(classes) > 10 else ''}: the features and data/classes.json disagree. "
            f"Re-run `aape prepare-data` and `aape extract-features`."
        )
    return local
