"""The pipeline's stages for `run.task: retrieval` (docs/method.md, "Retrieval"): the same stage
names, entry points and output folders as classification, each stage module handing over here.

    prepare-data      data/retrieval.json, captions_{train,val,test}.parquet (aape.retrieval.data)
    generate-prompts  prompts/descriptions.parquet: every image's own captions (no LLM)
    extract-features  features/retrieval_{split}.safetensors: image views or features, caption embeddings
    train-aggregator  aggregator/seed{S}/: the aggregator over each image's captions, summaries p^a
    distill-generator generator/seed{S}/[nodistill/]: h as the retrieval query (λ·distill + CLIP loss)
    train-baselines   nothing to train for retrieval (trained.json lists none)
    evaluate          eval/: Recall@1/5/10 both ways, per method and seed, report.md, metrics.json, a figure
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from aape.atomic import atomic_save_tensors, atomic_write_json, atomic_write_text
from aape.config import Params
from aape.layout import Layout
from aape.method.checkpoint import load_weights, read_checkpoint, write_checkpoint
from aape.method.objectives import TrainingSet, seeded, summarize_images, train_aggregator
from aape.method.training import fit
from aape.retrieval import METHODS
from aape.retrieval import data as rdata
from aape.retrieval.training import RetrievalObjective, RetrievalQuery, RetrievalSet, caption_bank, caption_mask, retrieval_recall
from aape.tracking import Tracker

log = logging.getLogger(__name__)

TASK = "retrieval"
TRANSFER = "retrieval-transfer"  # the scope of evaluation.cross_datasets' test splits
QUERY_STEM = "retrieval_query"
# AAPE's Table 1 (image-to-text R@1/5/10, ViT-L/14, OpenAI weights, finetuned), as quoted by a later paper
PAPER_I2T = {"coco": (76.7, 94.5, 97.4), "flickr30k": (94.9, 99.3, 99.7)}
PAPER_BACKBONE = ("ViT-L-14", "openai")
QUERY_TITLES = {"zeroshot": "CLIP image embedding (zero-shot)", "aape-nodistill": "h without distillation (λ = 0)", "aape": "AAPE (h, λ·distill + CLIP loss)"}


def features_file(layout: Layout, split: str) -> Path:
    return layout.features / f"retrieval_{split}.safetensors"


# prepare-data, generate-prompts --------------------------------------------------------------------


def prepare_data(params: Params, summary: dict[str, Any], data: rdata.RetrievalData | None = None) -> None:
    """Write the captioned image splits (`data`: already loaded by a task that adds its own files, as VQA does)."""
    task = params.run.task
    layout = Layout.from_params(params)
    data = data or rdata.load_retrieval_dataset(params.data.dataset, params.data.root, params.data.max_images)
    missing = [r.image for r in (*data.splits["val"], *data.splits["test"]) if not (data.image_root / r.image).is_file()]
    if missing:
        raise rdata.DataError(f"{len(missing)} {data.dataset} image(s) are missing under {data.image_root}, e.g. {missing[0]}")
    summary["outputs"].extend(str(p) for p in rdata.write_retrieval_data(layout, data, task))
    summary.update(dataset=data.dataset, images={s: len(v) for s, v in data.splits.items()}, generated_captions=data.generated)
    if data.generated:
        log.warning(rdata.GENERATED_CAPTIONS_NOTICE)


def write_caption_prompts(params: Params, summary: dict[str, Any]) -> None:
    """descriptions.parquet with every image's captions: class_index = the image's index over train, val, test."""
    from aape.prompts.table import write_descriptions

    layout = Layout.from_params(params)
    manifest = rdata.read_manifest(layout)
    now, rows, index = datetime.now(timezone.utc), [], 0
    source = "generated-captions" if manifest["generated_captions"] else "captions"
    for split in rdata.SPLITS:
        for record in rdata.read_split(layout, split):
            for j, caption in enumerate(record.captions):
                rows.append({"dataset": manifest["dataset"], "class_index": index, "class_name": record.image_id,
                             "template": f"caption ({split})", "text": caption, "raw_text": caption, "source": source,
                             "temperature": None, "sample_index": j, "request_id": None, "prompt_tokens": None,
                             "completion_tokens": None, "created_at": now})
            index += 1
    layout.prompts.mkdir(parents=True, exist_ok=True)
    write_descriptions(rows, layout.descriptions)
    atomic_write_json(layout.prompts / "summary.json", {"task": TASK, "source": source, "images": index, "captions": len(rows)})
    summary["outputs"].extend([str(layout.descriptions), str(layout.prompts / "summary.json")])
    summary.update(captions=len(rows), images=index, source=source)


# extract-features ------------------------------------------------------------------------------


def extract_features(params: Params, summary: dict[str, Any]):
    """Every split's features; returns the backbone it loaded (extract_grids reuses it)."""
    from aape.features.extract import build_backbone

    layout = Layout.from_params(params)
    manifest = rdata.read_manifest(layout)
    backbone = build_backbone(params)
    root = Path(manifest["image_root"])
    meta = {"identity": backbone.identity, "random_init": backbone.random_init, "embed_dim": backbone.embed_dim,
            "logit_scale": backbone.logit_scale, "task": TASK}
    for split in rdata.SPLITS:
        views = params.features.augmented_views if split == "train" else 0
        encoded = encode_split(backbone, root, rdata.read_split(layout, split), views, layout, params, f"retrieval {split}")
        path = features_file(layout, split)
        atomic_save_tensors(path, {"views": encoded.views, "captions": encoded.captions, "counts": encoded.counts}, {**meta, "split": split})
        summary["outputs"].append(str(path))
    atomic_write_json(layout.features / "index.json", {**meta, "seeds": list(params.run.seeds)})
    summary["outputs"].append(str(layout.features / "index.json"))
    summary.update(random_init=backbone.random_init, identity=backbone.identity)
    return backbone


def extract_grids(params: Params, summary: dict[str, Any], backbone) -> None:
    """Captioning / VQA with prefix.image_features: grid (LiMBeR's prefix): every split's grids into the
    feature cache, and features/grid_{split}.json pointing at them; after the pooled features, which h reads."""
    from aape.features.grid import encode_grids, write_pointer

    layout = Layout.from_params(params)
    manifest = rdata.read_manifest(layout)
    cfg = params.features
    for split in rdata.SPLITS:
        records = rdata.read_split(layout, split)
        grids = encode_grids(backbone, manifest["image_root"], [r.image for r in records], layout.cache,
                             batch_size=cfg.batch_size, num_workers=cfg.num_workers, desc=f"{split} grid")
        summary["outputs"].append(str(write_pointer(layout, split, grids, {"identity": backbone.identity})))
        summary[f"grid_{split}"] = list(grids.shape)


def encode_split(backbone, root: Path, records, views: int, layout: Layout, params: Params, desc: str) -> RetrievalSet:
    """Image features ([N, V, d] augmented views, or [N, 1, d] the evaluation view) and caption embeddings."""
    from aape.features.image_encoder import image_features
    from aape.features.text_encoder import text_features

    cfg = params.features
    encoded = image_features(backbone, root, [r.image for r in records], layout.cache, views, aug_seed=0,
                             batch_size=cfg.batch_size, num_workers=cfg.num_workers, desc=desc)
    counts = torch.tensor([len(r.captions) for r in records])
    flat = text_features(backbone, [c for r in records for c in r.captions], layout.cache, cfg.text_batch_size)
    captions = torch.zeros(len(records), int(counts.max()), backbone.embed_dim)
    captions[caption_mask(counts, captions.shape[1])] = flat
    return RetrievalSet(encoded.features if views else encoded.features.unsqueeze(1), captions, counts)


def load_split(layout: Layout, split: str) -> tuple[RetrievalSet, dict[str, Any]]:
    from aape.features.bundle import read_metadata, read_tensors

    path = features_file(layout, split)
    tensors = read_tensors(path, ("views", "captions", "counts"))
    return RetrievalSet(tensors["views"], tensors["captions"], tensors["counts"]), read_metadata(path)


# train-aggregator ------------------------------------------------------------------------------


def train_aggregators(params: Params, summary: dict[str, Any], tracker: Tracker) -> None:
    from aape.method.aggregator import aggregator_from_config, save_aggregator

    layout = Layout.from_params(params)
    train, meta = load_split(layout, "train")
    val, _ = load_split(layout, "val")
    n = len(train.counts)
    bank = caption_bank(_pad_cat(train.captions, val.captions), torch.cat([train.counts, val.counts]))
    data = TrainingSet(train.views, torch.arange(n), val.views[:, 0], torch.arange(n, n + len(val.counts)))
    schedule = params.aggregator.schedule
    epochs = schedule.epochs if schedule.epochs != "auto" else 50
    for seed in params.run.seeds:
        directory = layout.seed_dir(layout.aggregator, seed)
        with seeded(seed):
            aggregator = aggregator_from_config(params.aggregator, train.views.shape[-1], seed)
        with tracker.child(f"aggregator/seed{seed}", tags={"seed": str(seed), "task": TASK}) as child:
            result = train_aggregator(aggregator, data, bank, schedule, epochs, seed, params.aggregator.reward_scale, tracker=child)
        facts = {"task": TASK, "backbone_identity": meta["identity"], "embed_dim": meta["embed_dim"], "random_init": meta["random_init"],
                 "seed": seed, "epochs": epochs}
        paths = save_aggregator(aggregator, directory, facts)
        N, V, d = train.views.shape
        summaries = summarize_images(aggregator, train.views.reshape(N * V, d), torch.arange(n).repeat_interleave(V), bank)
        atomic_save_tensors(directory / "summaries.safetensors", {"train": summaries.reshape(N, V, d)}, {"task": TASK})
        atomic_write_json(directory / "history.json", {"initial": result.initial, "history": result.history})
        summary["outputs"].extend([*map(str, paths), str(directory / "summaries.safetensors"), str(directory / "history.json")])
        summary[f"seed{seed}_val_reward"] = result.best_figures.get("val_reward")


def _pad_cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    width = max(a.shape[1], b.shape[1])
    pad = lambda t: F.pad(t, (0, 0, 0, width - t.shape[1]))  # noqa: E731
    return torch.cat([pad(a), pad(b)])


# distill-generator -----------------------------------------------------------------------------


def train_queries(params: Params, summary: dict[str, Any], tracker: Tracker) -> None:
    layout = Layout.from_params(params)
    train, meta = load_split(layout, "train")
    val, _ = load_split(layout, "val")
    cfg = params.generator
    epochs = cfg.schedule.epochs if cfg.schedule.epochs != "auto" else 50
    variants = [("aape", "", cfg.lambda_distill)]
    if "aape-nodistill" in params.evaluation.methods:
        variants.append(("aape-nodistill", "nodistill", 0.0))
    for seed in params.run.seeds:
        summaries = read_tensors_or_none(layout.seed_dir(layout.aggregator, seed) / "summaries.safetensors")
        for method, sub, lam in variants:
            directory = layout.seed_dir(layout.generator, seed) / sub
            train.summaries = summaries
            with seeded(seed):
                model = RetrievalQuery(train.views.shape[-1], cfg.hidden, cfg.query)
            objective = RetrievalObjective(train, val, lam, float(meta["logit_scale"]), seed)
            with tracker.child(f"{method}/seed{seed}", tags={"seed": str(seed), "method": method, "task": TASK}) as child:
                result = fit(model, objective, n_items=len(train.counts), n_views=train.views.shape[1], schedule=cfg.schedule,
                             epochs=epochs, seed=seed, name=f"{method} query seed {seed}", tracker=child)
            model.load_state_dict(result.best_state)
            facts = {"task": TASK, "method": method, "backbone_identity": meta["identity"], "embed_dim": meta["embed_dim"],
                     "random_init": meta["random_init"], "seed": seed, "lambda_distill": lam, "hidden": cfg.hidden,
                     "query": cfg.query, "epochs": epochs, "val_rsum": result.best_figures.get("val_rsum")}
            paths = write_checkpoint(directory, QUERY_STEM, dict(model.state_dict()), facts)
            atomic_write_json(directory / "history.json", {"initial": result.initial, "history": result.history})
            summary["outputs"].extend([*map(str, paths), str(directory / "history.json")])
            summary[f"{method}_seed{seed}_val_rsum"] = facts["val_rsum"]


def read_tensors_or_none(path: Path) -> torch.Tensor | None:
    from aape.features.bundle import read_tensors

    return read_tensors(path, ("train",))["train"] if path.is_file() else None


def load_query(directory: Path, identity: str, dim: int) -> RetrievalQuery:
    tensors, meta = read_checkpoint(directory, QUERY_STEM, expect_identity=identity, expect_embed_dim=dim)
    model = RetrievalQuery(dim, int(meta["hidden"]), meta["query"])
    load_weights(model, tensors, directory)
    return model.eval()


# evaluate --------------------------------------------------------------------------------------


def evaluate(params: Params, summary: dict[str, Any], tracker: Tracker) -> None:
    """The test split of the training dataset (finetuned) and of every evaluation.cross_datasets entry
    (zero-shot transfer: trained on one dataset, tested on another, e.g. COCO -> Flickr30k)."""
    layout = Layout.from_params(params)
    manifest = rdata.read_manifest(layout)
    test, meta = load_split(layout, "test")
    targets = [(TASK, manifest["dataset"], test)] + _transfer_targets(params, layout, meta)
    methods = [m for m in params.evaluation.methods if m in METHODS]
    rows = []
    for seed in params.run.seeds:
        for method in methods:
            model = None if method == "zeroshot" else load_query(
                layout.seed_dir(layout.generator, seed) / ("nodistill" if method == "aape-nodistill" else ""),
                meta["identity"], int(meta["embed_dim"]))
            for scope, dataset, split in targets:
                recall = retrieval_recall(model, split)
                rows.append({"scope": scope, "dataset": dataset, "method": method, "seed": seed, **recall})
                where = dataset if scope == TASK else f"{manifest['dataset']} -> {dataset}"
                with tracker.child(f"{method} · {where} retrieval · seed {seed}",
                                   tags={"method": method, "task": TASK, "scope": scope, "dataset": dataset, "seed": str(seed),
                                         "random_init": str(meta["random_init"]).lower()}) as child:
                    child.log_metrics({tracked_name(k): v for k, v in recall.items()})
    frame = pd.DataFrame(rows)
    _log_means(tracker, frame, manifest["dataset"], params, meta)
    layout.eval.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(layout.eval / "results.parquet")
    pd.DataFrame(columns=["scope", "dataset", "method", "seed", "class_index"]).to_parquet(layout.eval / "per_class.parquet")
    metrics = _metrics(frame, bool(meta["random_init"]))
    atomic_write_json(layout.metrics, metrics)
    tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, float)})
    plots = layout.eval / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    figure = _recall_figure(frame, plots / "recall_at_k.png", manifest, bool(meta["random_init"]))
    report = layout.eval / "report.md"
    atomic_write_text(report, render_report(frame, manifest, meta, params, figure.relative_to(layout.eval)))
    summary["outputs"].extend(str(p) for p in (layout.eval / "results.parquet", layout.eval / "per_class.parquet", layout.metrics, figure, report))
    summary["headline"] = {k: v for k, v in metrics.items() if k.startswith(f"{TASK}/") and "/aape/" in k and k.endswith("rsum_mean")}
    summary.update(random_init=bool(meta["random_init"]), report=str(report))
    for path in (report, layout.metrics, layout.eval / "results.parquet", plots):
        tracker.log_artifact(path, "eval/plots" if path.is_dir() else "eval")


def _over_seeds(group: pd.DataFrame, metric: str):
    """Mean and population std of one metric over a group's seeds (the evaluation's own mean_std)."""
    from aape.evaluation.metrics import mean_std

    return mean_std(group[metric].astype(float).tolist())


def tracked_name(metric: str) -> str:
    """'i2t_R@1' -> 'i2t_R_at_1': MLflow refuses '@' in a metric name (metrics.json uses the same names)."""
    return metric.replace("@", "_at_")


METRICS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum")


def _log_means(tracker: Tracker, frame: pd.DataFrame, trained_on: str, params: Params, meta: dict[str, Any]) -> None:
    """One MLflow run per query and test set over all seeds (`<metric>` the mean, `<metric>_std`), so the
    runs table lines the methods up; params say what tells them apart."""
    for (scope, dataset, method), group in frame.groupby(["scope", "dataset", "method"], sort=False):
        where = dataset if scope == TASK else f"{trained_on} -> {dataset}"
        tags = {"method": method, "task": TASK, "scope": scope, "dataset": dataset, "aggregate": "mean over seeds",
                "random_init": str(meta["random_init"]).lower()}
        with tracker.peer(f"{method} · {where} retrieval · mean of {len(group)} seeds", tags=tags) as child:
            child.log_params({"method": method, "task": TASK, "dataset": dataset, "train_dataset": trained_on,
                              "backbone": params.backbone.model, "weights": params.backbone.pretrained,
                              "lambda_distill": {"aape": str(params.generator.lambda_distill), "aape-nodistill": "0.0"}.get(method, "n/a"),
                              "query": params.generator.query if method != "zeroshot" else "n/a"})
            values = {}
            for name in METRICS:
                stats = _over_seeds(group, name)
                values[tracked_name(name)] = stats.mean
                values[f"{tracked_name(name)}_std"] = stats.std
            child.log_metrics(values)


def _transfer_targets(params: Params, layout: Layout, meta: dict[str, Any]) -> list[tuple[str, str, RetrievalSet]]:
    from aape.features.extract import build_backbone

    if not params.evaluation.cross_datasets:
        return []
    located = [rdata.load_retrieval_dataset(name, params.data.root, params.data.max_images, required=("test",))
               for name in params.evaluation.cross_datasets]
    backbone = build_backbone(params)
    if backbone.identity != meta["identity"]:
        raise rdata.DataError(f"backbone {backbone.identity!r} is not the one the features were extracted with ({meta['identity']!r})")
    return [(TRANSFER, data.dataset, encode_split(backbone, data.image_root, data.splits["test"], 0, layout, params, f"{data.dataset} test"))
            for data in located]


def _metrics(frame: pd.DataFrame, random_init: bool) -> dict[str, Any]:
    metrics: dict[str, Any] = {"random_init": random_init}
    for (scope, dataset, method), group in frame.groupby(["scope", "dataset", "method"], sort=False):
        for name in METRICS:
            stats = _over_seeds(group, name)
            key = f"{scope}/{dataset}/{method}/{tracked_name(name)}"
            metrics[f"{key}_mean"] = round(stats.mean, 4)
            metrics[f"{key}_std"] = round(stats.std, 4)
    return metrics


def _recall_figure(frame: pd.DataFrame, path: Path, manifest: dict[str, Any], random_init: bool) -> Path:
    from aape.backbone import RANDOM_INIT_NOTICE
    from aape.evaluation.plots import method_colour, stamp_notice
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 3.2), dpi=110)
    ax = figure.subplots()
    means = frame[frame["scope"] == TASK].groupby("method", sort=False)[list(METRICS[:-1])].mean()
    width = 0.8 / max(len(means), 1)
    for i, (method, row) in enumerate(means.iterrows()):
        ax.bar([k + i * width for k in range(6)], row.values, width, color=method_colour(method), label=QUERY_TITLES.get(method, method))
    ax.set_xticks([k + 0.4 - width / 2 for k in range(6)], [m.replace("_", " ") for m in METRICS[:-1]], fontsize=8)
    ax.set_ylabel("recall (%)", fontsize=8)
    ax.set_title(f"{manifest['dataset']} test: Recall@K (mean over seeds)", fontsize=10)
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    for notice, on in ((RANDOM_INIT_NOTICE, random_init), (rdata.GENERATED_CAPTIONS_NOTICE, manifest["generated_captions"])):
        if on:
            stamp_notice(path, notice)
    return path


def render_report(frame: pd.DataFrame, manifest: dict[str, Any], meta: dict[str, Any], params: Params, figure: Path) -> str:
    from aape.backbone import RANDOM_INIT_NOTICE
    from aape.evaluation.report import RANDOM_INIT_WARNING

    lines = [RANDOM_INIT_WARNING, ""] if meta["random_init"] else []
    if manifest["generated_captions"]:
        lines += [f"**{rdata.GENERATED_CAPTIONS_NOTICE}.**", ""]
    dataset, images = manifest["dataset"], manifest["images"]
    lines += [f"# AAPE evaluation: image-text retrieval on {dataset}", "",
              f"- Backbone: identity `{meta['identity']}`{' (' + RANDOM_INIT_NOTICE + ')' if meta['random_init'] else ''}",
              f"- Test split: {images['test']} images, {manifest['captions']['test']} captions; trained on {images['train']} "
              f"images ({manifest['source']}); seeds {', '.join(map(str, params.run.seeds))}",
              "- Recall@K in %, mean ± population std over seeds. Image-to-text: an image is right when any of its captions is "
              "in the top K; text-to-image: a caption is right when its image is. Ties count against the query.", ""]
    for (scope, target), part in frame.groupby(["scope", "dataset"], sort=False):
        title = f"## {target} test (finetuned: trained on {dataset})" if scope == TASK else f"## {target} test (zero-shot transfer from {dataset})"
        lines += [title, "", "| Query | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | RSUM |", "|---|---|---|---|---|---|---|---|"]
        for method, group in part.groupby("method", sort=False):
            cells = [f"{stats.mean:.2f} ± {stats.std:.2f}" for stats in (_over_seeds(group, m) for m in METRICS)]
            lines.append(f"| {QUERY_TITLES.get(method, method)} | " + " | ".join(cells) + " |")
        lines.append("")
    model, _, weights = str(meta["identity"]).partition("@")
    if (model, weights.removeprefix("tag:")) == PAPER_BACKBONE and dataset in PAPER_I2T:
        r1, r5, r10 = PAPER_I2T[dataset]
        lines += [f"The paper (Table 1, ViT-L/14, finetuned), image-to-text on {dataset}: R@1 {r1}, R@5 {r5}, R@10 {r10}."]
    else:
        lines += [f"_The paper's retrieval figures are for ViT-L-14 with OpenAI weights on COCO and Flickr30k; they are not shown "
                      f"for `{meta['identity']}` on {dataset}._"]
    lines += ["", "## Plots", "", f"![Recall@K]({figure.as_posix()})", ""]
    return "\n".join(lines)
