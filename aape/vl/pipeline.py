"""The pipeline's stages for `run.task: captioning | vqa` (docs/method.md, "Captioning and VQA"): the
retrieval task's stages up to h, then the prefix models and their evaluation.

    prepare-data      the captioned image splits (aape.retrieval.data); VQA adds data/vqa_{split}.parquet
    generate-prompts  \\
    extract-features   } as for retrieval: each image's captions are its prompts, h(x) learns their p^a
    train-aggregator  /  with the CLIP loss (the paper reuses the retrieval h: "zero-shot" AAPE)
    distill-generator/ and then generator/seed{S}/prefix/<method>/prefix.*: each method's prefix maps (the LM
                      stays frozen; here because aape-finetuned trains h, and so DVC's deps hold for every task)
    train-baselines   nothing to train (trained.json lists none)
    evaluate          eval/: captions (greedy and sampled) with CIDEr-D, BLEU-4, ROUGE-L, CLIP-S, RefCLIP-S,
                      or VQA answers with the VQA accuracy; report.md, metrics.json, generations.parquet, a figure

Methods: `prefix` (LiMBeR: image tokens only), `aape` (+ AAPE tokens from the retrieval h, unchanged),
`aape-finetuned` (the same, h trained on λ·distill + the task's LM loss).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from aape.atomic import atomic_write_json, atomic_write_text
from aape.config import Params
from aape.data.captions import CaptionedImage
from aape.data.images import DataError
from aape.features.grid import GridFeatures, encode_grids, read_grid
from aape.layout import Layout
from aape.method.checkpoint import load_weights, read_checkpoint, write_checkpoint
from aape.method.objectives import seeded
from aape.method.training import fit
from aape.methods.context import backbone_loader
from aape.retrieval import data as rdata
from aape.retrieval import pipeline as retrieval
from aape.retrieval.training import RetrievalSet
from aape.tracking import Tracker
from aape.vl import data as vdata
from aape.vl.prefix import Decoding, LanguageModel, PrefixMaps, caption_row, generate, lm_loss, load_language_model, pack, vqa_row

log = logging.getLogger(__name__)

STEM = "prefix"
DEFAULT_EPOCHS = 10  # schedule.epochs: auto (LiMBeR trains 15k steps on CC3M; our splits are far smaller)


# data ------------------------------------------------------------------------------------------------


def load_dataset(name: str, root: str | Path, max_images: int | None, required: tuple[str, ...] = rdata.SPLITS) -> rdata.RetrievalData:
    """The captioned images of a captioning or VQA dataset (VQAv2's images are COCO's, with Karpathy's splits;
    NoCaps has only its validation set, used as a test set)."""
    root = Path(root)
    if name == "nocaps":
        path = root / "nocaps" / vdata.NOCAPS_FILE
        if not path.is_file():
            raise DataError(f"{path} not found: NoCaps needs its validation captions file there and the images in "
                            f"{root / 'nocaps' / 'validation'} (README, 'Captioning and VQA')")
        records = vdata.read_nocaps(path)[:max_images] if max_images else vdata.read_nocaps(path)
        return rdata.RetrievalData("nocaps", root / "nocaps", {"train": [], "val": [], "test": records}, False, str(path))
    data = rdata.load_retrieval_dataset("coco" if name == "vqav2" else name, root, max_images, required)
    data.dataset = name
    return data


def vqa_items(name: str, root: str | Path) -> list[vdata.VQAItem]:
    if name == "easy-vqa":
        return vdata.easy_vqa_questions("train") + vdata.easy_vqa_questions("test")
    items: list[vdata.VQAItem] = []
    folder = Path(root) / "vqav2"
    for subset, (questions_file, answers_file) in vdata.VQAV2_FILES.items():
        items += vdata.read_vqav2(folder / questions_file, folder / answers_file, subset)
    return items


def prepare_data(params: Params, summary: dict[str, Any]) -> None:
    data = load_dataset(params.data.dataset, params.data.root, params.data.max_images)
    retrieval.prepare_data(params, summary, data)
    if params.run.task != "vqa":
        return
    layout = Layout.from_params(params)
    splits = vdata.split_by_images(vqa_items(params.data.dataset, params.data.root), data.splits)
    for split in rdata.SPLITS:
        if not splits[split]:
            raise DataError(f"{params.data.dataset}: no VQA question is about an image of the {split} split")
        summary["outputs"].append(str(vdata.write_vqa_split(layout, split, splits[split])))
    summary["questions"] = {split: len(items) for split, items in splits.items()}


# what each method trains ----------------------------------------------------------------------------


@dataclass
class Examples:
    """A split as the prefix model sees it: items (images, or questions) pointing at image rows."""

    views: torch.Tensor  # [N, V, d] the images' cached views (training) or [N, 1, d]
    image_of: torch.Tensor  # [M] item -> image row
    targets: list[tuple[str, ...]]  # per item: the captions (one drawn per step) or the answer
    questions: list[str] | None = None  # VQA
    items: list[vdata.VQAItem] | None = None  # VQA: the questions as read, ids and all answers
    grid: GridFeatures | None = None  # prefix.image_features: grid: [N, G, C], the evaluation view, memory-mapped

    def inputs(self, images: torch.Tensor, views: torch.Tensor | int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the prefix maps read for these image rows: x [B, d] (view `views`) and the grids [B, G, C] or None."""
        return self.views[images, views], None if self.grid is None else self.grid.take(images)


def examples(layout: Layout, task: str, split: str, grid: bool = False) -> Examples:
    features, meta = retrieval.load_split(layout, split)
    records = rdata.read_split(layout, split)
    grids = read_grid(layout, split, meta["identity"]) if grid else None
    if task == "captioning":
        return Examples(features.views, torch.arange(len(records)), [r.captions for r in records], grid=grids)
    row_of = {r.image_id: i for i, r in enumerate(records)}
    items = vdata.read_vqa_split(layout, split)
    return Examples(features.views, torch.tensor([row_of[q.image_id] for q in items]), [q.answers for q in items],
                    [q.question for q in items], items, grids)


class PrefixObjective:
    """The Objective (aape.method.training) of the prefix maps: the LM loss on the targets, plus
    λ·‖h(x) − p^a‖² when h trains (aape-finetuned)."""

    def __init__(self, lm: LanguageModel, train: Examples, val: Examples, summaries: torch.Tensor | None,
                 lambda_distill: float, max_target_tokens: int, seed: int) -> None:
        self.lm, self.train, self.val, self.summaries, self.lam = lm, train, val, summaries, lambda_distill
        self.max_tokens = max_target_tokens
        self.generator = torch.Generator().manual_seed(seed)

    def _rows(self, split: Examples, items: torch.Tensor, prefixes: torch.Tensor, draw: bool) -> list:
        rows = []
        for prefix, item in zip(prefixes, items.tolist()):
            options = split.targets[item]
            pick = int(torch.randint(len(options), (1,), generator=self.generator)) if draw else 0
            target = self._cut(options[pick])
            rows.append(caption_row(self.lm, prefix, target) if split.questions is None
                        else vqa_row(self.lm, prefix, split.questions[item], target))
        return rows

    def _cut(self, text: str) -> str:
        ids = self.lm.encode(" " + text.strip())
        return text if len(ids) <= self.max_tokens else self.lm.decode(ids[: self.max_tokens])

    def loss(self, maps: PrefixMaps, items: torch.Tensor, views: torch.Tensor):
        images = self.train.image_of[items]
        x, grid = self.train.inputs(images, views)
        prompt = maps.prompt(x)
        loss = lm_loss(self.lm, pack(self.lm, self._rows(self.train, items, maps(x, prompt, grid), draw=True), left_pad=False))
        figures = {"lm_loss": loss.detach()}
        if self.lam and prompt is not None and prompt.requires_grad:
            distill = ((prompt - self.summaries[images, views]) ** 2).sum(-1).mean()
            figures["distill"] = distill.detach()
            loss = loss + self.lam * distill
        return loss, figures

    @torch.no_grad()
    def validate(self, maps: PrefixMaps) -> dict[str, float]:
        """Teacher-forced LM loss on the validation split (first caption or answer of each item)."""
        total, count, batch = 0.0, 0, 32
        for start in range(0, len(self.val.image_of), batch):
            items = torch.arange(start, min(start + batch, len(self.val.image_of)))
            x, grid = self.val.inputs(self.val.image_of[items])
            total += float(lm_loss(self.lm, pack(self.lm, self._rows(self.val, items, maps(x, grid=grid), draw=False), left_pad=False))) * len(items)
            count += len(items)
        return {"val_lm_loss": total / max(count, 1)}

    def selection_key(self, figures: dict[str, float]) -> tuple[float, ...]:
        return (-figures.get("val_lm_loss", float("inf")),)

    def diagnostics(self, maps: PrefixMaps) -> dict[str, float]:
        return {}


def build_maps(method: str, params: Params, clip_dim: int, lm: LanguageModel, layout: Layout, seed: int, identity: str,
               grid: GridFeatures | None = None) -> PrefixMaps:
    cfg = params.prefix
    aape = method != "prefix"
    tokens, channels = (grid.shape[1], grid.shape[2]) if grid is not None else (cfg.tokens, None)
    maps = PrefixMaps(clip_dim, lm.width, tokens, cfg.aape_tokens if aape else 0, params.generator.hidden,
                      train_h=method == "aape-finetuned", grid_channels=channels, dropout=cfg.dropout)
    if aape:  # start from the retrieval stage's h (distill-generator)
        query = retrieval.load_query(layout.seed_dir(layout.generator, seed), identity, clip_dim)
        maps.h.load_state_dict(query.h.state_dict())
    return maps


def train_prefix_models(params: Params, summary: dict[str, Any], tracker: Tracker) -> None:
    layout = Layout.from_params(params)
    task, cfg = params.run.task, params.prefix
    lm = load_language_model(cfg.lm)
    grid = cfg.image_features == "grid"
    train, val = examples(layout, task, "train", grid), examples(layout, task, "val", grid)
    _, meta = retrieval.load_split(layout, "train")
    clip_dim = int(meta["embed_dim"])
    epochs = cfg.schedule.epochs if cfg.schedule.epochs != "auto" else DEFAULT_EPOCHS
    for seed in params.run.seeds:
        summaries = retrieval.read_tensors_or_none(layout.seed_dir(layout.aggregator, seed) / "summaries.safetensors")
        for method in params.evaluation.methods:
            with seeded(seed):
                maps = build_maps(method, params, clip_dim, lm, layout, seed, meta["identity"], train.grid)
            lam = params.generator.lambda_distill if method == "aape-finetuned" else 0.0
            objective = PrefixObjective(lm, train, val, summaries, lam, cfg.max_target_tokens, seed)
            tags = {"seed": str(seed), "method": method, "task": task, "random_init": str(meta["random_init"]).lower()}
            with tracker.child(f"{method} prefix/seed{seed}", tags=tags) as child:
                child.log_params({"lm": lm.name, "image_features": cfg.image_features, "prefix_tokens": maps.tokens, "aape_tokens": maps.aape_tokens,
                                  "trainable_parameters": maps.trainable_parameters(), "lambda_distill": lam})
                result = fit(maps, objective, n_items=len(train.image_of), n_views=train.views.shape[1], schedule=cfg.schedule,
                             epochs=epochs, seed=seed, name=f"{method} prefix seed {seed}", tracker=child)
            maps.load_state_dict(result.best_state)
            directory = prefix_dir(layout, method, seed)
            facts = {"task": task, "method": method, "lm": lm.name, "lm_width": lm.width, "backbone_identity": meta["identity"],
                     "embed_dim": clip_dim, "random_init": meta["random_init"], "seed": seed, "tokens": maps.tokens,
                     "image_features": cfg.image_features, "grid_channels": maps.grid_channels, "dropout": cfg.dropout,
                     "aape_tokens": maps.aape_tokens, "hidden": params.generator.hidden, "lambda_distill": lam, "epochs": epochs,
                     "trainable_parameters": maps.trainable_parameters(), "val_lm_loss": result.best_figures.get("val_lm_loss")}
            paths = write_checkpoint(directory, STEM, dict(maps.state_dict()), facts)
            atomic_write_json(directory / "history.json", {"initial": result.initial, "history": result.history})
            summary["outputs"].extend([*map(str, paths), str(directory / "history.json")])
            summary[f"{method}_seed{seed}_val_lm_loss"] = facts["val_lm_loss"]


def prefix_dir(layout: Layout, method: str, seed: int) -> Path:
    return layout.seed_dir(layout.generator, seed) / STEM / method


def load_maps(layout: Layout, method: str, seed: int, identity: str, clip_dim: int, lm: LanguageModel,
              image_features: str = "pooled") -> PrefixMaps:
    directory = prefix_dir(layout, method, seed)
    tensors, meta = read_checkpoint(directory, STEM, expect_identity=identity, expect_embed_dim=clip_dim)
    if int(meta["lm_width"]) != lm.width:
        raise DataError(f"{directory} was trained for a language model of width {meta['lm_width']} ({meta['lm']}), "
                        f"not {lm.name}'s {lm.width}: re-run distill-generator with this prefix.lm")
    if meta.get("image_features", "pooled") != image_features:
        raise DataError(f"{directory} maps {meta.get('image_features', 'pooled')} image features, prefix.image_features is "
                        f"{image_features}: re-run distill-generator with this params.yaml")
    channels = meta.get("grid_channels")
    maps = PrefixMaps(clip_dim, lm.width, int(meta["tokens"]), int(meta["aape_tokens"]), int(meta["hidden"]),
                      grid_channels=int(channels) if channels else None)
    load_weights(maps, tensors, directory)
    return maps.eval()


# evaluate ----------------------------------------------------------------------------------------------


def evaluate(params: Params, summary: dict[str, Any], tracker: Tracker) -> None:
    from aape.vl import report

    layout = Layout.from_params(params)
    task = params.run.task
    manifest = rdata.read_manifest(layout)
    lm = load_language_model(params.prefix.lm)
    test, meta = retrieval.load_split(layout, "test")
    identity, clip_dim = meta["identity"], int(meta["embed_dim"])
    image_features = params.prefix.image_features
    grid = image_features == "grid"
    load_backbone = backbone_loader(params)  # loaded once, on first use: CLIP-S's text side, transfer sets
    targets = [(task, manifest["dataset"], test, rdata.read_split(layout, "test"), read_grid(layout, "test", identity) if grid else None)]
    targets += _transfer_targets(params, layout, meta, load_backbone)
    # what does not depend on the model: the references' CLIP-S embeddings, the VQA splits
    references = {target[1]: _reference_embeddings(params, layout, load_backbone, target[3]) for target in targets} \
        if task == "captioning" else {}
    vqa = (examples(layout, task, "test", grid), examples(layout, task, "train", grid)) if task == "vqa" else None
    rows, generations = [], []
    for seed in params.run.seeds:
        for method in params.evaluation.methods:
            maps = load_maps(layout, method, seed, identity, clip_dim, lm, image_features)
            for scope, dataset, features, records, grids in targets:
                if task == "captioning":
                    scored, generated = _caption_scores(params, layout, lm, maps, features, grids, records, seed, load_backbone,
                                                        references[dataset])
                else:
                    scored, generated = _vqa_scores(params, lm, maps, *vqa, seed)
                for row in scored:
                    rows.append({"scope": scope, "dataset": dataset, "method": method, "seed": seed, **row})
                generations += [{"scope": scope, "dataset": dataset, "method": method, "seed": seed, **g} for g in generated]
    frame, generated = pd.DataFrame(rows), pd.DataFrame(generations)
    layout.eval.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(layout.eval / "results.parquet")
    generated.to_parquet(layout.eval / "generations.parquet")
    pd.DataFrame(columns=["scope", "dataset", "method", "seed", "class_index"]).to_parquet(layout.eval / "per_class.parquet")
    if grid:  # the report and the MLflow runs say how many image tokens the grid gave
        meta = {**meta, "image_tokens": targets[0][4].shape[1], "grid_channels": targets[0][4].shape[2]}
    metrics = report.metrics(frame, task, bool(meta["random_init"]))
    atomic_write_json(layout.metrics, metrics)
    report.log_runs(tracker, frame, task, manifest, params, meta)
    tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, float)})
    plots = layout.eval / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    figure = report.figure(frame, task, plots / f"{task}.png", manifest, bool(meta["random_init"]))
    shown = _copy_examples(layout, manifest, generated, params.prefix.examples)
    page = layout.eval / "report.md"
    atomic_write_text(page, report.render(frame, generated, shown, task, manifest, meta, params, lm.name, figure.relative_to(layout.eval)))
    outputs = (layout.eval / "results.parquet", layout.eval / "generations.parquet", layout.eval / "per_class.parquet", layout.metrics, figure, page)
    summary["outputs"].extend(map(str, outputs))
    summary["headline"] = {k: v for k, v in metrics.items() if "/aape" in k and k.endswith("_mean")}
    summary.update(random_init=bool(meta["random_init"]), report=str(page))
    for path in (page, layout.metrics, layout.eval / "results.parquet", layout.eval / "generations.parquet", plots):
        tracker.log_artifact(path, "eval/plots" if path.is_dir() else "eval")


def _prefixes(maps: PrefixMaps, x: torch.Tensor, grid: GridFeatures | None, images: torch.Tensor) -> torch.Tensor:
    """The prefix embeddings of these image rows (x [N, d] all rows; grids read for these rows only)."""
    with torch.no_grad():
        return maps(x[images], grid=None if grid is None else grid.take(images))


def _caption_scores(params: Params, layout: Layout, lm: LanguageModel, maps: PrefixMaps, features: RetrievalSet,
                    grid: GridFeatures | None, records: list[CaptionedImage], seed: int, load_backbone,
                    references: tuple[torch.Tensor, torch.Tensor]):
    from aape.vl.metrics import caption_scores, clip_s, ref_clip_s, with_prefix

    cfg = params.prefix
    x = features.views[:, 0]
    # a caption is one line: a newline ends it, as it ends a VQA answer
    decodings = {mode: Decoding(mode, cfg.temperature, cfg.top_p, cfg.max_new_tokens, stop_at_newline=True) for mode in cfg.decoding}
    captions_by_mode: dict[str, list[str]] = {mode: [] for mode in cfg.decoding}
    for start in range(0, len(records), cfg.eval_batch_size):
        # each batch's prefixes (its grids read from disk) once, for every decoding
        batch = _prefixes(maps, x, grid, torch.arange(start, min(start + cfg.eval_batch_size, len(records))))
        for mode, decoding in decodings.items():
            captions_by_mode[mode] += generate(lm, [caption_row(lm, p) for p in batch], decoding, seed=seed * 1000 + start)
    rows, generated = [], []
    for mode, captions in captions_by_mode.items():
        keys = [r.image_id for r in records]
        scores = caption_scores(dict(zip(keys, captions)), {r.image_id: list(r.captions) for r in records}, cfg.java_metrics)
        candidate = _text_embeddings(params, layout, load_backbone, with_prefix(captions))
        padded, counts = references
        rows.append({"decoding": mode, "cider_d": 100 * scores.cider_d, "bleu4": 100 * scores.bleu4, "rouge_l": 100 * scores.rouge_l,
                     "meteor": None if scores.meteor is None else 100 * scores.meteor,
                     "clip_s": 100 * float(clip_s(x, candidate).mean()), "ref_clip_s": 100 * float(ref_clip_s(x, candidate, padded, counts).mean()),
                     "tokenizer": scores.tokenizer, "skipped": "; ".join(f"{k}: {v}" for k, v in scores.skipped.items())})
        generated += [{"decoding": mode, "image": r.image, "image_id": r.image_id, "prompt": "", "output": c,
                       "references": list(r.captions)} for r, c in zip(records, captions)]
    return rows, generated


def _vqa_scores(params: Params, lm: LanguageModel, maps: PrefixMaps, test: Examples, train: Examples, seed: int):
    from aape.vl.metrics import truncate_answer, vqa_accuracy

    cfg = params.prefix
    shots = _shots(train, maps, cfg.vqa_shots, seed)
    answers: list[str] = []
    decoding = Decoding("greedy", max_new_tokens=cfg.max_new_tokens, stop_at_newline=True)
    for start in range(0, len(test.image_of), cfg.eval_batch_size):
        items = range(start, min(start + cfg.eval_batch_size, len(test.image_of)))
        prefixes = _prefixes(maps, test.views[:, 0], test.grid, test.image_of[list(items)])
        rows = [vqa_row(lm, p, test.questions[i], shots=[s[1:] for s in shots]) for i, p in zip(items, prefixes)]
        answers += generate(lm, rows, decoding)
    items = test.items
    truncated = [truncate_answer(a, item.answers) for a, item in zip(answers, items)]
    accuracy = [vqa_accuracy(a, item.answers) for a, item in zip(truncated, items)]
    shot_ids = ",".join(s[0] for s in shots)
    rows = [{"decoding": "greedy", "vqa_accuracy": 100 * sum(accuracy) / len(accuracy), "shots": len(shots), "shot_questions": shot_ids}]
    generated = [{"decoding": "greedy", "image": item.image, "image_id": item.image_id, "prompt": item.question, "output": t,
                  "raw_output": a, "references": list(item.answers), "accuracy": acc}
                 for item, a, t, acc in zip(items, answers, truncated, accuracy)]
    return rows, generated


def _shots(train: Examples, maps: PrefixMaps, k: int, seed: int) -> list[tuple[str, torch.Tensor, str, str]]:
    """K in-context examples (question_id, prefix, question, answer) drawn from the training split by seed."""
    if not k:
        return []
    items = train.items
    picks = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:k].tolist()
    prefixes = _prefixes(maps, train.views[:, 0], train.grid, train.image_of[picks])
    return [(items[i].question_id, p, items[i].question, items[i].answers[0]) for i, p in zip(picks, prefixes)]


def _text_embeddings(params: Params, layout: Layout, load_backbone, texts: list[str]) -> torch.Tensor:
    from aape.features.text_encoder import text_features

    return text_features(load_backbone(), texts, layout.cache, params.features.text_batch_size)


def _reference_embeddings(params: Params, layout: Layout, load_backbone, records: list[CaptionedImage]) -> tuple[torch.Tensor, torch.Tensor]:
    """RefCLIP-S's references: [N, n_max, d] embeddings of "A photo depicts <caption>" (padded) and [N] counts."""
    from aape.retrieval.training import caption_mask
    from aape.vl.metrics import with_prefix

    flat = _text_embeddings(params, layout, load_backbone, with_prefix([c for r in records for c in r.captions]))
    counts = torch.tensor([len(r.captions) for r in records])
    padded = flat.new_zeros(len(records), int(counts.max()), flat.shape[-1])
    padded[caption_mask(counts, padded.shape[1])] = flat
    return padded, counts


def _transfer_targets(params: Params, layout: Layout, meta: dict[str, Any], load_backbone
                      ) -> list[tuple[str, str, RetrievalSet, list[CaptionedImage], GridFeatures | None]]:
    """Captioning test sets of other datasets (e.g. NoCaps val for a COCO-trained model), with their grids
    when the prefix maps read grids."""
    if not params.evaluation.cross_datasets:
        return []
    backbone = load_backbone()
    if backbone.identity != meta["identity"]:
        raise DataError(f"backbone {backbone.identity!r} is not the one the features were extracted with ({meta['identity']!r})")
    targets = []
    for name in params.evaluation.cross_datasets:
        data = load_dataset(name, params.data.root, params.data.max_images, required=("test",))
        records = data.splits["test"]
        features = retrieval.encode_split(backbone, data.image_root, records, 0, layout, params, f"{name} test")
        grids = encode_grids(backbone, data.image_root, [r.image for r in records], layout.cache, batch_size=params.features.batch_size,
                             num_workers=params.features.num_workers, desc=f"{name} test grid") \
            if params.prefix.image_features == "grid" else None
        targets.append((f"{params.run.task}-transfer", name, features, records, grids))
    return targets


def _copy_examples(layout: Layout, manifest: dict[str, Any], generated: pd.DataFrame, n: int) -> list[tuple[str, str]]:
    """The first n test images of the training dataset, copied beside the report: (image_id, relative path)."""
    if generated.empty or not n:
        return []
    own = generated[~generated["scope"].str.endswith("-transfer")].drop_duplicates("image_id").head(n)
    folder = layout.eval / "examples"
    folder.mkdir(parents=True, exist_ok=True)
    shown = []
    for i, row in enumerate(own.itertuples()):
        source = Path(manifest["image_root"]) / row.image
        if source.is_file():
            target = folder / f"{i}{source.suffix}"
            shutil.copyfile(source, target)
            shown.append((row.image_id, target.relative_to(layout.eval).as_posix()))
    return shown
