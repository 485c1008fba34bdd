"""Per-class description embeddings, padded into one tensor so a batch gathers its classes at once."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aape.errors import AAPEError


class MissingDescriptionsError(AAPEError, ValueError):
    """A training class has no description embedding; the aggregator has nothing to aggregate."""


@dataclass
class DescriptionBank:
    """Description embeddings of some classes, in local class order.

    `embeddings[c, j]` is the j-th description of local class c; `mask[c, j]` is True for a real
    description and False for padding (classes have different numbers of descriptions).
    """

    embeddings: torch.Tensor  # [C, n_max, d]
    mask: torch.Tensor  # [C, n_max] bool
    classes: list[int]  # global label of each local class

    @classmethod
    def from_flat(
        cls,
        descriptions: torch.Tensor,
        description_class: torch.Tensor,
        classes: list[int],
        classnames: list[str] | None = None,
        max_per_class: int | None = None,
    ) -> "DescriptionBank":
        """Group flat rows ([M, d] with a global label each) by class, keeping the rows' order.

        `max_per_class` keeps the first N of each class (row order), so a cap is reproducible.
        """
        if descriptions.ndim != 2 or description_class.shape != descriptions.shape[:1]:
            raise ValueError(
                f"descriptions must be [M, d] with description_class [M]; got {tuple(descriptions.shape)} "
                f"and {tuple(description_class.shape)}"
            )
        owner = description_class.long()
        rows = [torch.nonzero(owner == label).flatten() for label in classes]
        if max_per_class is not None:
            rows = [r[:max_per_class] for r in rows]
        empty = [label for label, r in zip(classes, rows) if len(r) == 0]
        if empty:
            names = [f"{label} ({classnames[label]})" if classnames and label < len(classnames) else str(label) for label in empty]
            raise MissingDescriptionsError(
                f"{len(empty)} training class(es) have no descriptions: {', '.join(names[:20])}"
                f"{' ...' if len(names) > 20 else ''}. Re-run `aape generate-prompts` (check prompts.min_per_class "
                f"and the LLM's replies for these classes), then `aape extract-features`."
            )
        n_max = max(len(r) for r in rows)
        dim = descriptions.shape[1]
        embeddings = descriptions.new_zeros(len(classes), n_max, dim)
        mask = torch.zeros(len(classes), n_max, dtype=torch.bool)
        for c, r in enumerate(rows):
            embeddings[c, : len(r)] = descriptions[r]
            mask[c, : len(r)] = True
        return cls(embeddings, mask, list(classes))

    @classmethod
    def from_lists(cls, per_class: list[torch.Tensor], classes: list[int] | None = None) -> "DescriptionBank":
        """From one [n_c, d] tensor per class (tests, plotting)."""
        flat = torch.cat(per_class)
        owner = torch.cat([torch.full((len(p),), c) for c, p in enumerate(per_class)])
        bank = cls.from_flat(flat, owner, list(range(len(per_class))))
        bank.classes = list(classes) if classes is not None else bank.classes
        return bank

    @property
    def counts(self) -> torch.Tensor:
        return self.mask.sum(1)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[-1])

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def to(self, device: torch.device | str) -> "DescriptionBank":
        return DescriptionBank(self.embeddings.to(device), self.mask.to(device), self.classes)

    def gather(self, local_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Descriptions [B, n_max, d] and mask [B, n_max] of each item's class."""
        return self.embeddings[local_labels], self.mask[local_labels]

    def class_means(self) -> torch.Tensor:
        """p̄ per class, [C, d], re-normalised (the CuPL classifier)."""
        return masked_mean(self.embeddings, self.mask)


def masked_mean(P: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L2-normalised mean of the real rows of P [..., n, d] (mask [..., n])."""
    weights = mask.to(P.dtype).unsqueeze(-1)
    total = (P * weights).sum(-2) / weights.sum(-2).clamp_min(1.0)
    return torch.nn.functional.normalize(total, dim=-1)
