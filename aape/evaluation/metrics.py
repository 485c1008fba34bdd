"""Accuracy figures as the field reports them: percentages, H = 2BN/(B+N), mean ± std over seeds.

Conventions (stated once, used everywhere):
- accuracies are percentages in [0, 100];
- the spread over seeds is the population standard deviation (numpy's default, as CoOp's
  parse_test_res.py reports it), so one seed gives std 0;
- a table's H is the harmonic mean of the table's mean B and mean N (CoCoOp's tables); the spread
  of H is the std of the per-seed H values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class MeanStd:
    mean: float
    std: float
    n: int

    def __str__(self) -> str:
        if math.isnan(self.mean):
            return "n/a"
        return f"{self.mean:.2f} ± {self.std:.2f}" if self.n > 1 else f"{self.mean:.2f}"


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent; an empty set has no accuracy (NaN), not 0."""
    if labels.numel() == 0:
        return float("nan")
    return 100.0 * (predictions == labels).float().mean().item()


def per_class_accuracy(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(accuracy %, correct, total) for every local class 0..num_classes-1; NaN where a class has no image."""
    labels = labels.long().cpu()
    correct_mask = (predictions.long().cpu() == labels).long()
    total = torch.bincount(labels, minlength=num_classes).numpy()
    correct = torch.bincount(labels, weights=correct_mask.double(), minlength=num_classes).numpy().astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(total > 0, 100.0 * correct / np.maximum(total, 1), np.nan)
    return acc, correct, total


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """Counts [true, predicted] over local class indices."""
    index = labels.long().cpu() * num_classes + predictions.long().cpu()
    counts = torch.bincount(index, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).numpy()


def harmonic_mean(base: float, new: float) -> float:
    """H = 2BN/(B+N); 0 when both are 0; NaN when either is undefined."""
    if math.isnan(base) or math.isnan(new):
        return float("nan")
    if base + new == 0:
        return 0.0
    return 2.0 * base * new / (base + new)


def mean_std(values: Iterable[float]) -> MeanStd:
    """Mean and population std over seeds, ignoring undefined (NaN) values."""
    finite = [float(v) for v in values if not math.isnan(float(v))]
    if not finite:
        return MeanStd(float("nan"), float("nan"), 0)
    array = np.asarray(finite, dtype=np.float64)
    return MeanStd(float(array.mean()), float(array.std()), len(finite))


def harmonic_mean_of_means(base: Sequence[float], new: Sequence[float]) -> MeanStd:
    """H as the paper tables it (of the mean B and N) with the spread of the per-seed H values."""
    per_seed = [harmonic_mean(b, n) for b, n in zip(base, new)]
    spread = mean_std(per_seed)
    h = harmonic_mean(mean_std(base).mean, mean_std(new).mean)
    return MeanStd(h, spread.std, spread.n)
