"""Writing the eval/ artifacts: tables (Parquet), metrics.json, the figures and what they need
(the accuracy-against-shots series, the aggregator's attention over one class's descriptions)."""

from __future__ import annotations

import glob
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from aape.atomic import atomic_write
from aape.evaluation import plots
from aape.evaluation.classifiers import EvaluationError
from aape.evaluation.metrics import confusion_matrix, harmonic_mean_of_means, mean_std
from aape.evaluation.report import method_title
from aape.evaluation.results import BASE2NEW, SetOutcome
from aape.features import FeatureBundle
from aape.layout import Layout

log = logging.getLogger(__name__)

MAX_DESCRIPTIONS_SHOWN = 40


def write_parquet(frame: pd.DataFrame, path: Path) -> Path:
    """Write to a temporary file and rename: a reader never sees half a table."""
    return atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))


# accuracy against shots ------------------------------------------------------------------------


def shots_result_files(patterns: Sequence[str]) -> list[Path]:
    """evaluation.shots_results resolved; a pattern that matches nothing is a configuration error."""
    files: list[Path] = []
    for pattern in patterns:
        matched = sorted(Path(p) for p in glob.glob(pattern))
        if not matched:
            raise EvaluationError(
                f"evaluation.shots_results: no file matches {pattern!r}; give results.parquet files of runs with "
                f"other data.shots (e.g. artifacts-4shot/eval/results.parquet) or remove the entry"
            )
        files.extend(matched)
    return files


def per_seed_sets(results: pd.DataFrame, scope: str, dataset: str) -> pd.DataFrame:
    """(method, shots, seed) -> one column of accuracy per eval set, for one scope and dataset."""
    rows = results[(results["scope"] == scope) & (results["dataset"] == dataset)]
    table = rows.pivot_table(index=["method", "shots", "seed"], columns="eval_set", values="accuracy",
                             aggfunc="first", dropna=False)
    return table.reset_index()


def shots_curve(current: pd.DataFrame, others: Sequence[Path], scope: str, dataset: str, methods: Sequence[str]) -> pd.DataFrame:
    """Mean ± std over seeds per method and shot count, as the report tables them (base-to-new: H
    of the mean B and N); this run's figures win over a file's for the same method, shots and seed."""
    frames = [per_seed_sets(current, scope, dataset)]
    frames += [per_seed_sets(pd.read_parquet(path), scope, dataset) for path in others]
    per_seed = pd.concat(frames).drop_duplicates(["method", "shots", "seed"], keep="first")
    rows = []
    for (method, shots), group in per_seed[per_seed["method"].isin(methods)].groupby(["method", "shots"], sort=False):
        if scope == BASE2NEW:
            both = group[["base", "new"]].dropna() if {"base", "new"} <= set(group.columns) else group.iloc[:0]
            stats = harmonic_mean_of_means(both["base"].tolist(), both["new"].tolist()) if len(both) else None
        else:
            stats = mean_std(group["all"].tolist()) if "all" in group.columns else None
        if stats is not None and stats.n:
            rows.append({"method": method, "shots": int(shots), "mean": stats.mean, "std": stats.std})
    rank = {m: i for i, m in enumerate(methods)}
    rows.sort(key=lambda r: (rank[r["method"]], r["shots"]))
    return pd.DataFrame(rows, columns=["method", "shots", "mean", "std"])


# figure 7 --------------------------------------------------------------------------------------


def attention_figure(layout: Layout, bundle: FeatureBundle, train_classes: Sequence[int], classnames: Sequence[str],
                     examples: int, path: Path) -> tuple[Path | None, str]:
    """The aggregator's attention over one training class's descriptions for a few of its training
    images. Returns (figure or None, a remark saying what was drawn or why nothing was)."""
    from aape.method import load_aggregator

    directory = layout.seed_dir(layout.aggregator, bundle.seed)
    if examples == 0:
        return None, "Attention figure: evaluation.attention_examples is 0, so it was not drawn."
    if not (directory / "aggregator.json").is_file():
        return None, f"Attention figure: no aggregator checkpoint in {directory}, so it was not drawn."
    aggregator = load_aggregator(directory, expect_identity=bundle.identity, expect_embed_dim=bundle.embed_dim)
    if not getattr(aggregator, "has_attention", False):
        return None, f"Attention figure: aggregator variant '{aggregator.variant}' has no attention weights, so it was not drawn."
    counts = torch.bincount(bundle.description_class.long(), minlength=len(classnames))
    candidates = [c for c in train_classes if counts[c] > 1 and bool((bundle.train_labels == c).any())]
    if not candidates:
        return None, "Attention figure: no training class has two or more descriptions, so it was not drawn."
    chosen = max(candidates, key=lambda c: (int(counts[c]), -c))  # the most descriptions: the most to choose from
    image_idx = torch.nonzero(bundle.train_labels == chosen).flatten()[:examples]
    desc_idx = torch.nonzero(bundle.description_class == chosen).flatten()
    with torch.no_grad():
        weights = aggregator.attention_weights(bundle.train_clean[image_idx], bundle.descriptions[desc_idx]).cpu().numpy()
    texts = _description_texts(layout, desc_idx)
    images = _image_names(layout, bundle, image_idx)
    remark = (f"Attention figure: aggregator of seed {bundle.seed}, class '{classnames[chosen]}' ({len(desc_idx)} "
              f"descriptions), {len(image_idx)} training image(s).")
    if weights.shape[1] > MAX_DESCRIPTIONS_SHOWN:
        top = np.sort(np.argsort(-weights.mean(axis=0), kind="stable")[:MAX_DESCRIPTIONS_SHOWN])
        weights, texts = weights[:, top], [texts[i] for i in top]
        remark += f" Shown: the {MAX_DESCRIPTIONS_SHOWN} descriptions with the highest mean attention."
    title = f"Aggregator attention over the descriptions of '{classnames[chosen]}' (seed {bundle.seed})"
    return plots.attention_over_descriptions(weights, texts, images, path, title), remark


def _description_texts(layout: Layout, desc_idx: torch.Tensor) -> list[str]:
    """Texts of the given description rows (text.safetensors follows descriptions.parquet's row order)."""
    try:
        frame = pd.read_parquet(layout.descriptions, columns=["text"])
        return [str(t) for t in frame["text"].iloc[desc_idx.tolist()]]
    except (OSError, KeyError, IndexError, ValueError) as exc:
        log.warning("cannot read description texts from %s (%s); labelling them by row", layout.descriptions, exc)
        return [f"description row {i}" for i in desc_idx.tolist()]


def _image_names(layout: Layout, bundle: FeatureBundle, image_idx: torch.Tensor) -> list[str]:
    rows = bundle.train_rows[image_idx] if bundle.train_rows is not None else image_idx
    try:
        frame = pd.read_parquet(layout.fewshot_manifest(bundle.seed, "train"), columns=["path"])
        return [Path(str(p)).name for p in frame["path"].iloc[rows.tolist()]]
    except (OSError, KeyError, IndexError, ValueError):
        return [f"training image {int(i)}" for i in image_idx]


# the other figures -----------------------------------------------------------------------------


def confusion_figures(outcomes: Sequence[SetOutcome], method: str, seed: int, scope: str, plots_dir: Path,
                      max_classes: int) -> list[tuple[str, Path, str]]:
    """(caption, path, remark) of one confusion matrix per eval set of `method`, `seed`."""
    made = []
    for o in outcomes:
        if o.method != method or o.seed != seed or o.scope != scope or not o.applicable or o.predictions is None:
            continue
        matrix = confusion_matrix(o.predictions, o.labels, len(o.classes))
        caption = f"Confusion matrix: {method_title(method)}, {o.eval_set} classes, seed {seed}"
        path, remark = plots.confusion(matrix, o.classnames, plots_dir / f"confusion_{method}_{o.eval_set}.png", caption, max_classes)
        made.append((caption, path, remark))
    return made


def per_class_figures(per_class: pd.DataFrame, methods: Sequence[str], scope: str, dataset: str,
                      plots_dir: Path) -> list[tuple[str, Path]]:
    """Per-class accuracy bars (mean over seeds) per eval set; every method for up to 20 classes,
    else zero-shot against AAPE so the bars stay readable."""
    made = []
    rows = per_class[(per_class["scope"] == scope) & (per_class["dataset"] == dataset)]
    for eval_set, group in rows.groupby("eval_set", sort=False):
        shown = list(methods)
        if group["class_index"].nunique() > 20:
            shown = [m for m in ("zeroshot", "aape") if m in methods] or list(methods)[-2:]
        shown = [m for m in shown if m in set(group["method"])]
        if not shown:
            continue
        caption = f"Per-class accuracy, {eval_set} classes (mean over seeds)"
        made.append((caption, plots.per_class_bars(group, shown, plots_dir / f"per_class_{eval_set}.png", caption)))
    return made
