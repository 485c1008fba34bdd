"""The report's figures, drawn with matplotlib's object API (Agg canvas, no pyplot global state).

Each function writes one PNG and returns its path. They take plain arrays and tables, so they are
testable without a trained model."""

from __future__ import annotations

import textwrap
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from aape.evaluation.report import method_title
from aape.methods.registry import METHODS

_DPI = 110
_SMALL, _TITLE = 8, 10  # font sizes (points): readable at the width the report shows a figure

# One colour per method in every figure (matplotlib's tab10), so a method is recognised at a glance
_SPARE_COLOURS = ("#2ca02c", "#d62728", "#9467bd", "#e377c2")


def method_colour(method: str) -> str:
    """The method's registry colour; a method without one gets a spare colour chosen by its name (stable across runs)."""
    spec = METHODS.get(method)
    return spec.colour if spec is not None and spec.colour else _SPARE_COLOURS[zlib.crc32(method.encode()) % len(_SPARE_COLOURS)]


def stamp_notice(path: Path, notice: str) -> Path:
    """Add a red banner with `notice` above the figure in the PNG itself, so the image says what it
    is (RANDOM-INIT, SYNTHETIC) wherever it is seen alone: MLflow, DVC, a slide."""
    with Image.open(path) as image:
        figure = image.convert("RGB")
    font = ImageFont.load_default(size=14)
    lines = textwrap.wrap(notice, width=max(20, figure.width // 8))
    band = 8 + 18 * len(lines)
    stamped = Image.new("RGB", (figure.width, figure.height + band), "white")
    stamped.paste(figure, (0, band))
    draw = ImageDraw.Draw(stamped)
    draw.rectangle([0, 0, figure.width - 1, band - 2], fill="#b00020")
    for i, line in enumerate(lines):
        draw.text((6, 4 + 18 * i), line, fill="white", font=font)
    stamped.save(path)
    return path


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    return path


def accuracy_vs_shots(curve: pd.DataFrame, metric_label: str, path: Path, title: str) -> tuple[Path, str]:
    """`curve` columns: method, shots, mean, std (one row per method × shot count).

    With a single shot count there is no curve: the methods are drawn as labelled points, one row
    each, and the returned remark says so, rather than spreading them along a shots axis."""
    shot_counts = sorted(curve["shots"].unique())
    if len(shot_counts) == 1:
        return _single_shot_points(curve, metric_label, path, title, int(shot_counts[0]))
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    methods = list(dict.fromkeys(curve["method"]))
    for i, (method, group) in enumerate(curve.groupby("method", sort=False)):
        group = group.sort_values("shots")
        dodge = 2.0 ** (0.05 * (i - (len(methods) - 1) / 2))  # side by side, so equal figures stay visible
        ax.errorbar(group["shots"] * dodge, group["mean"], yerr=group["std"], marker="o", capsize=3, color=method_colour(method),
                    linestyle="-" if len(group) > 1 else "none", label=method_title(method))
    ax.set_xscale("log", base=2)
    ax.set_xticks(shot_counts, [str(s) for s in shot_counts])
    ax.tick_params(labelsize=_SMALL)
    ax.set_xlabel("shots per class", fontsize=_SMALL)
    ax.set_ylabel(metric_label, fontsize=_SMALL)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=_SMALL, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title, fontsize=_TITLE)
    remark = f"Accuracy against shots from {len(shot_counts)} shot counts: {', '.join(map(str, shot_counts))}."
    return _save(fig, path), remark


def _single_shot_points(curve: pd.DataFrame, metric_label: str, path: Path, title: str, shots: int) -> tuple[Path, str]:
    rows = curve.drop_duplicates("method").reset_index(drop=True)
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    y = np.arange(len(rows))[::-1]
    for yi, row in zip(y, rows.itertuples()):
        ax.errorbar([row.mean], [yi], xerr=[row.std], marker="o", capsize=3, linestyle="none", color=method_colour(row.method))
        ax.annotate(f"{row.mean:.1f} ± {row.std:.1f}", (row.mean, yi), textcoords="offset points", xytext=(0, 7),
                    ha="center", fontsize=_SMALL)
    ax.set_yticks(y, [method_title(m) for m in rows["method"]], fontsize=_SMALL)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.margins(x=0.15)  # room for the end points' labels
    ax.tick_params(axis="x", labelsize=_SMALL)
    ax.set_xlabel(f"{metric_label} at {shots} shots", fontsize=_SMALL)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"{title}\n(only {shots} shots evaluated: points, not a curve)", fontsize=_TITLE)
    remark = (f"Accuracy against shots: only {shots} shots were evaluated, so the plot shows single "
              f"points, not a curve. Evaluate runs with other data.shots and list their results.parquet in "
              f"evaluation.shots_results to draw one.")
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
        values, colour = table[method].to_numpy(), method_colour(method)
        ax.barh(y + i * height, values, height=height, color=colour, label=method_title(method))
        zero = np.flatnonzero(values == 0)  # a bar of length 0 draws nothing: mark it, or 0% looks like missing
        if len(zero):
            ax.barh(y[zero] + i * height, 0.8, height=height, color=colour)  # a stub 0.8 points wide, labelled "0"
            for z in zero:
                ax.annotate("0", (0.8, y[z] + i * height), textcoords="offset points", xytext=(3, -3), fontsize=_SMALL - 1, color=colour)
    ax.set_yticks(y + 0.4 - height / 2, [textwrap.shorten(str(c), 30) for c in table.index], fontsize=_SMALL)
    ax.set_xlim(0, 100)
    ax.tick_params(axis="x", labelsize=_SMALL)
    ax.set_xlabel("accuracy (%)", fontsize=_SMALL)
    ax.set_title(title, fontsize=_TITLE)
    handles, labels = ax.get_legend_handles_labels()  # top-down in the legend as in each bar group
    ax.legend(handles[::-1], labels[::-1], fontsize=_SMALL, loc="upper left", bbox_to_anchor=(1.01, 1.0))
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
    fontsize = _SMALL if n <= 30 else 6
    ax.set_xticks(range(n), labels, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(n), labels, fontsize=fontsize)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=_SMALL - 1,
                            color="white" if normalised[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title + remark, fontsize=_TITLE)
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
    ax.set_yticks(range(n_images), [textwrap.shorten(str(s), 40) for s in image_labels], fontsize=_SMALL)
    ax.set_xticks(range(n_desc), [textwrap.shorten(str(d), 48) for d in descriptions], rotation=90, fontsize=_SMALL - 1)
    ax.set_title(title, fontsize=_TITLE)
    return _save(fig, path)
