"""Stage `train-aggregator`: train the prompt aggregator with the CLIP reward on cached features and
write p^a for every training image and view (docs/method.md, "Components").

Per seed, into aggregator/seed{S}/: aggregator.safetensors + aggregator.json, summaries.safetensors
(`summaries` [N, V, d], `clean` [N, d], `labels` [N] global, `val` [Nv, d] for the validation
images, which the generator stage uses to measure distillation on held-out images), history.json
(per-epoch figures and diagnostics, plus `initial`: the untrained aggregator's). The last epoch is
kept unless aggregator.schedule.select is best-val (validation reward; never test data).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aape.backbone import resolve_device
from aape.config import IMAGE_TEXT_TASKS, AggregatorConfig, Params
from aape.data.manifests import ClassesManifest
from aape.layout import Layout
from aape.logs import stage
from aape.method.aggregator import Aggregator, aggregator_from_config, save_aggregator
from aape.atomic import atomic_save_tensors, atomic_write_json
from aape.method.descriptions import DescriptionBank
from aape.method.inputs import SeedInputs, description_bank, load_seed_inputs, remove_quietly
from aape.method.objectives import RewardObjective, TrainingSet, compute_summaries, seeded, summarize_images, train_aggregator
from aape.tracking import NullTracker, Tracker

log = logging.getLogger(__name__)

NAME = "train-aggregator"


@dataclass
class SeedRun:
    """One seed's aggregator training: configuration, prepared data, inputs, where to write."""

    params: Params
    classes: ClassesManifest
    seed: int
    directory: Path  # aggregator/seed{S}/
    inputs: SeedInputs
    outputs: list  # the stage summary's outputs: every file written is appended

    @property
    def cfg(self) -> AggregatorConfig:
        return self.params.aggregator

    @property
    def epochs(self) -> int:
        return self.classes.epochs(self.cfg.schedule)


@dataclass
class Trained:
    """What training (or, for mean / random, only validating) the aggregator gave."""

    history: list[dict[str, Any]]
    best_epoch: int
    best: dict[str, float]  # the kept epoch's validation figures
    initial: dict[str, Any]  # the untrained aggregator's


def run(params: Params, tracker: Tracker | None = None) -> dict[str, Any]:
    tracker = tracker or NullTracker()
    layout = Layout.from_params(params)
    if params.run.task in IMAGE_TEXT_TASKS:
        from aape.retrieval import pipeline as retrieval

        with stage(NAME) as summary:
            retrieval.train_aggregators(params, summary, tracker)
        return summary
    with stage(NAME) as summary:
        classes = ClassesManifest.read(layout.classes_file)
        per_seed = {}
        for seed in params.run.seeds:
            with tracker.child(f"aggregator/seed{seed}", tags={"seed": str(seed), "variant": params.aggregator.variant}) as child:
                seed_run = SeedRun(params, classes, seed, layout.seed_dir(layout.aggregator, seed),
                                   load_seed_inputs(layout, seed, classes), summary["outputs"])  # fmt: skip
                per_seed[seed] = _train_seed(seed_run, child)
        rewards = [r["best_val_reward"] for r in per_seed.values()]
        summary.update(
            variant=params.aggregator.variant,
            per_seed=per_seed,
            val_reward_mean=sum(rewards) / len(rewards),
            random_init=any(r["random_init"] for r in per_seed.values()),
        )
    return summary


def _train_seed(run: SeedRun, tracker: Tracker) -> dict[str, Any]:
    cfg, inputs, device = run.cfg, run.inputs, resolve_device(run.params.run.device)
    facts = inputs.backbone_facts()
    if facts["random_init"]:
        tracker.set_tags({"random_init": "true"})
    bank = description_bank(inputs, run.classes.classnames, cfg.max_descriptions)
    with seeded(run.seed):
        aggregator = aggregator_from_config(cfg, inputs.bundle.embed_dim, run.seed)
    _announce(run, aggregator, bank, tracker)
    data, bank_dev = inputs.data.to(device), bank.to(device)
    aggregator.to(device)
    trained = _train(run, aggregator, data, bank_dev, tracker)
    meta = {
        **facts,
        "seed": run.seed,
        "variant": cfg.variant,
        "config": cfg.model_dump(mode="json"),
        "classnames": inputs.classnames,
        "train_classes": inputs.train_classes,
        "descriptions_per_class": bank.counts.tolist(),
        "epochs": run.epochs if aggregator.trainable else 0,
        "best_epoch": trained.best_epoch,
        "best_val_reward": trained.best["val_reward"],
    }
    _write(run, aggregator, _summaries(run, aggregator, data, bank_dev), meta, trained)
    log.info("seed %d: kept epoch %d (%s), validation reward %.4f", run.seed, trained.best_epoch, cfg.schedule.select, trained.best["val_reward"])
    return {"best_epoch": trained.best_epoch, "best_val_reward": trained.best["val_reward"], "params": _n_params(aggregator),
            "random_init": facts["random_init"]}  # fmt: skip


def _n_params(aggregator: Aggregator) -> int:
    return sum(p.numel() for p in aggregator.parameters())


def _announce(run: SeedRun, aggregator: Aggregator, bank: DescriptionBank, tracker: Tracker) -> None:
    cfg, data, n_params = run.cfg, run.inputs.data, _n_params(aggregator)
    log.info(
        "seed %d: aggregator '%s' (%d parameters) on %d images x %d views, %d classes, %d-%d descriptions per class",
        run.seed, cfg.variant, n_params, data.num_items, data.num_views, len(bank),
        int(bank.counts.min()), int(bank.counts.max()),
    )  # fmt: skip
    tracker.log_params({"aggregator_params": n_params, "epochs": run.epochs, "seed": run.seed, "variant": cfg.variant})
    tracker.log_metrics({"aggregator_params": n_params})


def _train(run: SeedRun, aggregator: Aggregator, data: TrainingSet, bank: DescriptionBank, tracker: Tracker) -> Trained:
    """train_aggregator, resumable from resume.pt; a variant without parameters is only validated."""
    cfg = run.cfg
    if aggregator.trainable:
        fingerprint = run.inputs.fingerprint("aggregator", cfg.model_dump(mode="json"), run.seed, run.epochs, bank.mask.sum().item())
        result = train_aggregator(
            aggregator, data, bank, cfg.schedule, run.epochs, run.seed, cfg.reward_scale, run.directory / "resume.pt", fingerprint, tracker
        )
        _warn_if_no_signal(result.history, run.inputs.bundle.random_init)
        return Trained(result.history, result.best_epoch, result.best_figures, result.initial)
    # mean / random: nothing to learn, but report the same validation figures
    log.info("aggregator '%s' has no parameters: no training", cfg.variant)
    objective = RewardObjective(data, bank, cfg.reward_scale)
    best = {**objective.validate(aggregator), **objective.diagnostics(aggregator)}
    tracker.log_metrics({k: v for k, v in best.items() if v == v}, step=0)
    return Trained([], 0, best, best)


def _summaries(run: SeedRun, aggregator: Aggregator, data: TrainingSet, bank: DescriptionBank) -> dict[str, torch.Tensor]:
    """p^a of every training view and clean image, and of the validation images: what distillation learns from."""
    device = resolve_device(run.params.run.device)
    summaries, clean = compute_summaries(aggregator, data.views, run.inputs.clean.to(device), data.labels, bank)
    val_summaries = summarize_images(aggregator, data.val_features, data.val_labels, bank)
    bundle = run.inputs.bundle
    return {"summaries": summaries, "clean": clean, "labels": bundle.train_labels, "rows": bundle.train_rows} | (
        {"val": val_summaries} if len(val_summaries) else {}
    )


def _write(run: SeedRun, aggregator: Aggregator, tensors: dict[str, torch.Tensor], meta: dict[str, Any], trained: Trained) -> None:
    """aggregator.safetensors + .json, summaries.safetensors and history.json; the resume state goes."""
    out = run.directory
    paths = save_aggregator(aggregator.cpu(), out, meta)
    summaries_path = out / "summaries.safetensors"
    atomic_save_tensors(summaries_path, tensors, {k: meta[k] for k in ("backbone_identity", "random_init", "embed_dim", "seed", "variant")})
    history_path = out / "history.json"
    atomic_write_json(
        history_path,
        {**{k: meta[k] for k in ("seed", "variant", "random_init", "epochs", "best_epoch")}, "select": run.cfg.schedule.select,
         "initial": trained.initial, "best": trained.best, "history": trained.history},
    )  # fmt: skip
    remove_quietly(out / "resume.pt")
    run.outputs.extend([*paths, summaries_path, history_path])


def _warn_if_no_signal(history: list[dict[str, Any]], random_init: bool) -> None:
    """The reward s·max(cos, 0) gives no gradient where cos(x, p^a) <= 0: say so when that was everywhere."""
    active = max((r.get("train_active", 0.0) for r in history), default=0.0)
    if active < 0.01:
        cause = (
            "expected with a RANDOM-INIT backbone, whose image and text embeddings are unrelated"
            if random_init
            else "check that the descriptions and images belong together and that the backbone is the intended one"
        )
        log.warning(
            "the CLIP reward was zero for (almost) every training image (cos(x, p^a) <= 0), so the aggregator got no "
            "gradient and its summaries stay close to the description mean: %s",
            cause,
        )
