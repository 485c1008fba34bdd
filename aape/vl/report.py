"""What evaluate writes for captioning and VQA: metrics.json, the MLflow runs per method, the figure and
report.md (mean ± population std over seeds, the evaluation's one convention)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from aape.config import Params
from aape.evaluation.metrics import mean_std
from aape.tracking import Tracker
from aape.vl import TITLES

METRICS = {"captioning": ("cider_d", "bleu4", "rouge_l", "clip_s", "ref_clip_s"), "vqa": ("vqa_accuracy",)}
HEADERS = {"meteor": "METEOR", "cider_d": "CIDEr-D", "bleu4": "BLEU-4", "rouge_l": "ROUGE-L", "clip_s": "CLIP-S", "ref_clip_s": "RefCLIP-S",
           "vqa_accuracy": "VQA accuracy"}
HEADLINE = {"captioning": "cider_d", "vqa": "vqa_accuracy"}
GROUP = ["scope", "dataset", "method", "decoding"]


def metric_names(frame: pd.DataFrame, task: str) -> tuple[str, ...]:
    """The task's metrics, with METEOR when it ran (Java present and prefix.java_metrics on)."""
    ran = task == "captioning" and "meteor" in frame and len(frame) and frame["meteor"].notna().all()
    return METRICS[task] + (("meteor",) if ran else ())


def metrics(frame: pd.DataFrame, task: str, random_init: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"random_init": random_init}
    for (scope, dataset, method, decoding), group in frame.groupby(GROUP, sort=False):
        for name in metric_names(frame, task):
            stats = mean_std(group[name].astype(float).tolist())
            key = f"{scope}/{dataset}/{method}/{decoding}/{name}"
            out[f"{key}_mean"], out[f"{key}_std"] = round(stats.mean, 4), round(stats.std, 4)
    return out


def log_runs(tracker: Tracker, frame: pd.DataFrame, task: str, manifest: dict[str, Any], params: Params, meta: dict[str, Any]) -> None:
    """One MLflow run per method, test set and decoding over all seeds (`<metric>` the mean, `<metric>_std`)."""
    for (scope, dataset, method, decoding), group in frame.groupby(GROUP, sort=False):
        where = dataset if scope == task else f"{manifest['dataset']} -> {dataset}"
        tags = {"method": method, "task": task, "scope": scope, "dataset": dataset, "aggregate": "mean over seeds",
                "random_init": str(meta["random_init"]).lower()}
        with tracker.peer(f"{method} · {where} {task} · {decoding} · mean of {len(group)} seeds", tags=tags) as child:
            child.log_params({"method": method, "task": task, "dataset": dataset, "train_dataset": manifest["dataset"],
                              "decoding": decoding, "lm": params.prefix.lm, "image_features": params.prefix.image_features,
                              "prefix_tokens": meta.get("image_tokens", params.prefix.tokens),
                              "aape_tokens": params.prefix.aape_tokens if method != "prefix" else 0,
                              "backbone": params.backbone.model, "weights": params.backbone.pretrained,
                              "lambda_distill": str(params.generator.lambda_distill) if method == "aape-finetuned" else "n/a"})
            values = {}
            for name in metric_names(frame, task):
                stats = mean_std(group[name].astype(float).tolist())
                values[name], values[f"{name}_std"] = stats.mean, stats.std
            child.log_metrics(values)


def figure(frame: pd.DataFrame, task: str, path: Path, manifest: dict[str, Any], random_init: bool) -> Path:
    from matplotlib.figure import Figure

    from aape.backbone import RANDOM_INIT_NOTICE
    from aape.data.captions import GENERATED_CAPTIONS_NOTICE
    from aape.evaluation.plots import method_colour, stamp_notice

    metric = HEADLINE[task]
    means = frame[frame["decoding"] == "greedy"].groupby(["dataset", "method"], sort=False)[metric].agg(["mean", "std"]).reset_index()
    datasets = list(dict.fromkeys(means["dataset"]))
    methods = list(dict.fromkeys(means["method"]))
    fig = Figure(figsize=(6.4, 3.4), dpi=110)
    ax = fig.subplots()
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        part = means[means["method"] == method].set_index("dataset").reindex(datasets)
        positions = [d + i * width for d in range(len(datasets))]
        bars = ax.bar(positions, part["mean"].fillna(0), width, yerr=part["std"].fillna(0), color=method_colour(method),
                      label=TITLES.get(method, method), edgecolor="black", linewidth=0.6)  # an edge: a 0 bar still shows
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks([d + 0.4 - width / 2 for d in range(len(datasets))], datasets, fontsize=9)
    ax.set_ylabel(f"{HEADERS[metric]} (greedy)", fontsize=9)
    ax.set_title(f"{task}: trained on {manifest['dataset']} (mean ± std over seeds)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    for notice, on in ((RANDOM_INIT_NOTICE, random_init), (GENERATED_CAPTIONS_NOTICE, manifest["generated_captions"])):
        if on:
            stamp_notice(path, notice)
    return path


def _image_tokens(cfg, meta: dict[str, Any]) -> str:
    if cfg.image_features == "grid":
        return (f"{meta['image_tokens']} image tokens, one per grid vector of the image encoder ({meta['grid_channels']} wide) "
                "through one shared linear map (LiMBeR)")
    return f"{cfg.tokens} image token(s) from CLIP's pooled embedding"


def render(frame: pd.DataFrame, generated: pd.DataFrame, shown: list[tuple[str, str]], task: str, manifest: dict[str, Any],
           meta: dict[str, Any], params: Params, lm_name: str, figure_path: Path) -> str:
    from aape.backbone import RANDOM_INIT_NOTICE
    from aape.data.captions import GENERATED_CAPTIONS_NOTICE
    from aape.evaluation.report import RANDOM_INIT_WARNING

    lines = [RANDOM_INIT_WARNING, ""] if meta["random_init"] else []
    if manifest["generated_captions"]:
        lines += [f"**{GENERATED_CAPTIONS_NOTICE}.**", ""]
    cfg = params.prefix
    lines += [f"# AAPE evaluation: {'image captioning' if task == 'captioning' else 'visual question answering'} on {manifest['dataset']}", "",
              f"- Backbone: identity `{meta['identity']}`{' (' + RANDOM_INIT_NOTICE + ')' if meta['random_init'] else ''}",
              f"- Language model (frozen): `{lm_name}`; prefix: {_image_tokens(cfg, meta)}, "
              f"+ {cfg.aape_tokens} AAPE token(s) from h(x) after them; seeds {', '.join(map(str, params.run.seeds))}",
              "- Mean ± population std over seeds, in %."]
    if task == "captioning":
        lines += [f"- Decoding: greedy; sampled with temperature {cfg.temperature}, top-p {cfg.top_p} (LiMBeR's); "
                  f"at most {cfg.max_new_tokens} tokens. CLIP-S and RefCLIP-S (Hessel et al. 2021: w = 2.5, prefix "
                  "\"A photo depicts\") use this run's backbone, not the ViT-B/32 of the published scores."]
        lines += _metric_notes(frame)
    else:
        shots = frame["shots"].iloc[0] if len(frame) else 0
        lines += [f"- Prompt \"[image] Q: {{question}} A:\", greedy, cut at the first newline and to the longest ground-truth "
                  f"answer's word count; {shots} in-context example(s) per question drawn from the training split by seed "
                  "(their question ids are in results.parquet). Accuracy: the official VQA formula with 10 human answers; "
                  "exact match after its answer normalisation when a question has one answer (easy-VQA)."]
    lines.append("")
    names = metric_names(frame, task)
    for (scope, target), part in frame.groupby(["scope", "dataset"], sort=False):
        where = f"{target} test" if scope == task else f"{target} (zero-shot transfer from {manifest['dataset']})"
        lines += [f"## {where}", "", "| Model | Decoding | " + " | ".join(HEADERS[m] for m in names) + " |",
                  "|---|---|" + "---|" * len(names)]
        for (method, decoding), group in part.groupby(["method", "decoding"], sort=False):
            cells = [f"{s.mean:.2f} ± {s.std:.2f}" for s in (mean_std(group[m].astype(float).tolist()) for m in names)]
            lines.append(f"| {TITLES.get(method, method)} | {decoding} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["_The paper's captioning and VQA figures (LiMBeR's RN50x16 with GPT-J, MAGMA's few-shot VQA) are not shown: "
              "this run's backbone and language model differ._", "", "## Plots", "", f"![{task}]({figure_path.as_posix()})", ""]
    lines += _examples(generated, shown, task)
    return "\n".join(lines)


def _metric_notes(frame: pd.DataFrame) -> list[str]:
    if frame.empty:
        return []
    notes = [f"- Tokenizer for CIDEr-D, BLEU-4, ROUGE-L: `{frame['tokenizer'].iloc[0]}`."]
    skipped = frame["skipped"].iloc[0]
    if skipped:
        notes.append(f"- Not computed: {skipped}.")
    return notes


def _examples(generated: pd.DataFrame, shown: list[tuple[str, str]], task: str) -> list[str]:
    if not shown:
        return []
    first = generated[(generated["seed"] == generated["seed"].min()) & (generated["decoding"] == "greedy")]
    lines = ["## Examples (seed %d, greedy)" % int(generated["seed"].min()), ""]
    for image_id, path in shown:
        rows = first[first["image_id"] == image_id]
        lines += [f"![{image_id}]({path})", ""]
        if task == "vqa":
            rows = rows[rows["prompt"] == rows["prompt"].iloc[0]]
            lines.append(f"Q: {rows['prompt'].iloc[0]}")
        lines.append(f"- references: {'; '.join(rows['references'].iloc[0])}")
        for row in rows.itertuples():
            lines.append(f"- {TITLES.get(row.method, row.method)}: {' '.join(row.output.split()) or '(empty)'}")
        lines.append("")
    return lines
