"""Evaluation outcomes as tables: one row per dataset × method × seed × eval set, per-class rows,
per-seed metric dicts (what each nested tracker run logs) and the flat metrics.json for DVC.

Metric names are the same for every method, so MLflow's compare view and `dvc metrics diff` line
them up: `accuracy` (one eval set, e.g. few-shot or a transfer target), or `base_accuracy`,
`new_accuracy` and `H` (base-to-new).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from aape.evaluation.classifiers import Classifier, NotApplicable, predict_in_batches
from aape.evaluation.metrics import MeanStd, accuracy, harmonic_mean_of_means, mean_std, per_class_accuracy
from aape.labels import local_positions

# scopes: the training dataset's own protocol, and the transfer protocols
BASE2NEW, FEWSHOT, CROSS_DATASET, DOMAIN_SHIFT = "base2new", "fewshot", "cross-dataset", "domain-shift"
TRANSFER_SCOPES = (CROSS_DATASET, DOMAIN_SHIFT)

RESULT_COLUMNS = [
    "scope", "dataset", "method", "seed", "eval_set", "accuracy", "correct", "total", "num_classes",
    "shots", "backbone", "random_init", "note",
]
PER_CLASS_COLUMNS = [
    "scope", "dataset", "method", "seed", "eval_set", "class_index", "class_name", "accuracy", "correct", "total",
]


@dataclass
class SetOutcome:
    """One method × seed on one eval set (classes evaluated among themselves)."""

    scope: str
    dataset: str
    method: str
    seed: int
    eval_set: str
    classes: list[int]  # global labels, in the order of local indices
    classnames: list[str]
    accuracy: float
    predictions: torch.Tensor | None = None  # local indices
    labels: torch.Tensor | None = None  # local indices
    note: str = ""
    per_class: tuple[np.ndarray, np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    @property
    def applicable(self) -> bool:
        return not math.isnan(self.accuracy)

    @property
    def total(self) -> int:
        return 0 if self.labels is None else int(self.labels.numel())

    @property
    def correct(self) -> int:
        if self.labels is None or self.predictions is None:
            return 0
        return int((self.labels == self.predictions).sum())


def select_eval_set(features: torch.Tensor, labels: torch.Tensor, classes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose global label is in `classes`, with labels mapped to local indices (positions)."""
    local = local_positions(labels, classes)
    keep = local >= 0
    return features[keep], local[keep]


def evaluate_set(
    classifier: Classifier,
    features: torch.Tensor,
    labels: torch.Tensor,
    classes: Sequence[int],
    classnames: Sequence[str],
    *,
    scope: str,
    dataset: str,
    seed: int,
    eval_set: str,
    batch_size: int,
) -> SetOutcome:
    """Classify the eval set's images among its classes; a method that cannot yields an n/a outcome."""
    classes = list(classes)
    names = [classnames[c] for c in classes]
    base = dict(scope=scope, dataset=dataset, method=classifier.name, seed=seed, eval_set=eval_set, classes=classes, classnames=names)
    chosen, local = select_eval_set(features, labels, classes)
    try:
        predictions = predict_in_batches(classifier, chosen, classes, batch_size)
    except NotApplicable as exc:
        return SetOutcome(**base, accuracy=float("nan"), note=str(exc))
    return SetOutcome(
        **base,
        accuracy=accuracy(predictions, local),
        predictions=predictions,
        labels=local,
        per_class=per_class_accuracy(predictions, local, len(classes)),
    )


def seed_metrics(outcomes: Iterable[SetOutcome]) -> dict[str, float]:
    """What one method × seed logs: `accuracy`, or `base_accuracy`, `new_accuracy` and `H`."""
    by_set = {o.eval_set: o.accuracy for o in outcomes if o.applicable}
    metrics: dict[str, float] = {}
    for name, value in by_set.items():
        metrics["accuracy" if name == "all" else f"{name}_accuracy"] = value
    if "base" in by_set and "new" in by_set:
        metrics["H"] = harmonic_mean_of_means([by_set["base"]], [by_set["new"]]).mean
    return metrics


def results_frame(outcomes: Sequence[SetOutcome], *, shots: int, backbone: str, random_init: bool) -> pd.DataFrame:
    rows = [
        {
            "scope": o.scope, "dataset": o.dataset, "method": o.method, "seed": o.seed, "eval_set": o.eval_set,
            "accuracy": o.accuracy, "correct": o.correct, "total": o.total, "num_classes": len(o.classes),
            "shots": shots, "backbone": backbone, "random_init": random_init, "note": o.note,
        }
        for o in outcomes
    ]
    return pd.DataFrame(rows, columns=RESULT_COLUMNS).astype({"seed": "int64", "correct": "int64", "total": "int64"})


def per_class_frame(outcomes: Sequence[SetOutcome]) -> pd.DataFrame:
    rows = []
    for o in outcomes:
        if o.per_class is None:
            continue
        acc, correct, total = o.per_class
        for i, (cls, name) in enumerate(zip(o.classes, o.classnames)):
            rows.append({
                "scope": o.scope, "dataset": o.dataset, "method": o.method, "seed": o.seed, "eval_set": o.eval_set,
                "class_index": cls, "class_name": name, "accuracy": float(acc[i]), "correct": int(correct[i]),
                "total": int(total[i]),
            })
    return pd.DataFrame(rows, columns=PER_CLASS_COLUMNS)


def summarise(results: pd.DataFrame) -> dict[tuple[str, str, str], dict[str, MeanStd]]:
    """(scope, dataset, method) -> metric -> mean ± std over seeds (H of the mean B and N)."""
    summary: dict[tuple[str, str, str], dict[str, MeanStd]] = {}
    for (scope, dataset, method), group in results.groupby(["scope", "dataset", "method"], sort=False):
        pivot = group.pivot_table(index="seed", columns="eval_set", values="accuracy", aggfunc="first", dropna=False)
        metrics: dict[str, MeanStd] = {}
        for eval_set in pivot.columns:
            name = "accuracy" if eval_set == "all" else f"{eval_set}_accuracy"
            metrics[name] = mean_std(pivot[eval_set].tolist())
        if "base" in pivot.columns and "new" in pivot.columns:
            both = pivot[["base", "new"]].dropna()
            if len(both):
                metrics["H"] = harmonic_mean_of_means(both["base"].tolist(), both["new"].tolist())
            else:
                metrics["H"] = MeanStd(float("nan"), float("nan"), 0)
        summary[(scope, dataset, method)] = metrics
    return summary


def metric_key(scope: str, dataset: str, method: str, metric: str) -> str:
    """`base2new/aape/H`, or with the target dataset for transfer: `cross-dataset/dtd/aape/accuracy`."""
    if scope in TRANSFER_SCOPES:
        return f"{scope}/{dataset}/{method}/{metric}"
    return f"{scope}/{method}/{metric}"


def flat_metrics(summary: dict[tuple[str, str, str], dict[str, MeanStd]]) -> dict[str, float]:
    """metrics.json for DVC: `<key>_mean` and `<key>_std`; undefined values are left out, not zeroed."""
    flat: dict[str, float] = {}
    for (scope, dataset, method), metrics in summary.items():
        for metric, value in metrics.items():
            if math.isnan(value.mean):
                continue
            key = metric_key(scope, dataset, method, metric)
            flat[f"{key}_mean"] = round(value.mean, 4)
            flat[f"{key}_std"] = round(value.std, 4)
    return flat


def notes_by_method(outcomes: Iterable[SetOutcome]) -> dict[tuple[str, str, str, str], str]:
    """(scope, dataset, method, eval_set) -> why that method was not applicable there."""
    return {(o.scope, o.dataset, o.method, o.eval_set): o.note for o in outcomes if not o.applicable and o.note}
