"""The report's figures, drawn with matplotlib's object API (Agg canvas, no pyplot global state).

Each function writes one PNG and returns its path. They take plain arrays and tables, so they are
testable without a trained model."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from aape.evaluation.report import METHOD_TITLES

_DPI = 110


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    return path


def accuracy_vs_shots(curve: pd.DataFrame, metric_label: str, path: Path, title: str) -> tuple[Path, str]:
    """`curve` columns: method, shots, mean, std (one row per method × shot count).

    With a single shot count there is no curve to draw: the points are shown as they are and the
    returned remark says so, rather than pretending to a trend."""
    shot_counts = sorted(curve["shots"].unique())
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    methods = list(dict.fromkeys(curve["method"]))
    for i, (method, group) in enumerate(curve.groupby("method", sort=False)):
        group = group.sort_values("shots")
        dodge = 2.0 ** (0.05 * (i - (len(methods) - 1) / 2))  # side by side, so equal figures stay visible
        ax.errorbar(group["shots"] * dodge, group["mean"], yerr=group["std"], marker="o", capsize=3,
                    linestyle="-" if len(group) > 1 else "none", label=METHOD_TITLES.get(method, method))
    ax.set_xscale("log", base=2)
    ax.set_xticks(shot_counts, [str(s) for s in shot_counts])
    ax.set_xlabel("shots per class")
    ax.set_ylabel(metric_label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if len(shot_counts) == 1:
        remark = (f"Accuracy against shots: only {shot_counts[0]} shots were evaluated, so the plot shows single "
                  f"points, not a curve. Evaluate runs with other data.shots and list their results.parquet in "
                  f"evaluation.shots_results to draw one.")
        ax.set_title(f"{title}\n(only {shot_counts[0]} shots evaluated: no curve)", fontsize=9)
    else:
        remark = f"Accuracy against shots from {len(shot_counts)} shot counts: {', '.join(map(str, shot_counts))}."
        ax.set_title(title, fontsize=9)
    return _save(fig, path), remark


def per_class_bars(per_class: pd.DataFrame, methods: Sequence[str], path: Path, title: str) -> Path:
    """Horizontal bars of per-class accuracy (mean over seeds), one bar per method, classes sorted
    by the last method's accuracy so its strong and weak classes stand out."""
    table = (per_class[per_class["method"].isin(methods)]
             .groupby(["class_name", "method"], sort=False)["accuracy"].mean().unstack("method"))
    methods = [m for m in methods if m in table.columns]
    table = table[methods].sort_values(methods[-1])
    n_classes, n_methods = len(table), len(methods)
    fig = Figure(figsize=(7.0, max(2.5, 0.22 * n_classes * max(1, n_methods / 2) + 1.0)))
    ax = fig.add_subplot()
    height = 0.8 / n_methods
    y = np.arange(n_classes)
    for i, method in enumerate(methods):
        ax.barh(y + i * height, table[method].to_numpy(), height=height, label=METHOD_TITLES.get(method, method))
    ax.set_yticks(y + 0.4 - height / 2, [textwrap.shorten(str(c), 30) for c in table.index], fontsize=7)
    ax.set_xlim(0, 100)
    ax.set_xlabel("accuracy (%)")
    ax.set_title(title, fontsize=9)
    handles, labels = ax.get_legend_handles_labels()  # top-down in the legend as in each bar group
    ax.legend(handles[::-1], labels[::-1], fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def confusion(matrix: np.ndarray, classnames: Sequence[str], path: Path, title: str, max_classes: int) -> tuple[Path, str]:
    """Row-normalised confusion matrix. With more than `max_classes` classes, the `max_classes`
    classes with the most errors are shown (rows and columns), and the title says so."""
    remark = ""
    if len(classnames) > max_classes:
        errors = matrix.sum(axis=1) - np.diag(matrix)
        keep = np.sort(np.argsort(-errors, kind="stable")[:max_classes])
        matrix = matrix[np.ix_(keep, keep)]
        classnames = [classnames[i] for i in keep]
        remark = f" (the {max_classes} most-confused of {len(errors)} classes)"
    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    n = len(classnames)
    size = min(14.0, max(4.0, 0.28 * n + 2.0))
    fig = Figure(figsize=(size + 1.0, size))
    ax = fig.add_subplot()
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    labels = [textwrap.shorten(str(c), 24) for c in classnames]
    fontsize = 7 if n <= 30 else 5
    ax.set_xticks(range(n), labels, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(n), labels, fontsize=fontsize)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=6,
                            color="white" if normalised[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title + remark, fontsize=9)
    return _save(fig, path), remark


def attention_over_descriptions(weights: np.ndarray, descriptions: Sequence[str], image_labels: Sequence[str],
                                path: Path, title: str) -> Path:
    """The paper's figure 7: how much each description of one class contributes to each image's
    summary prompt (rows: images, columns: descriptions)."""
    n_images, n_desc = weights.shape
    if (n_images, n_desc) != (len(image_labels), len(descriptions)):
        raise ValueError(f"attention weights are {n_images}x{n_desc} but there are {len(image_labels)} image labels "
                         f"and {len(descriptions)} descriptions")
    fig = Figure(figsize=(min(16.0, 2.0 + 0.45 * n_desc), 1.5 + 0.5 * n_images + 0.09 * min(n_desc, 60)))
    ax = fig.add_subplot()
    image = ax.imshow(weights, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="attention weight")
    ax.set_yticks(range(n_images), [textwrap.shorten(str(s), 40) for s in image_labels], fontsize=7)
    ax.set_xticks(range(n_desc), [textwrap.shorten(str(d), 48) for d in descriptions], rotation=90, fontsize=6)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)
