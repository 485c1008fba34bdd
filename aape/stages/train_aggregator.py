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
from typing import Any

from aape.backbone import resolve_device
from aape.config import Params
from aape.layout import Layout
from aape.logs import stage
from aape.method.aggregator import aggregator_from_config, save_aggregator
from aape.atomic import atomic_save_tensors, atomic_write_json
from aape.method.inputs import description_bank, load_seed_inputs, read_classes, remove_quietly
from aape.method.objectives import RewardObjective, compute_summaries, seeded, summarize_images, train_aggregator
from aape.tracking import NullTracker, Tracker

log = logging.getLogger(__name__)

NAME = "train-aggregator"


def run(params: Params, tracker: Tracker | None = None) -> dict[str, Any]:
    tracker = tracker or NullTracker()
    layout = Layout.from_params(params)
    with stage(NAME) as summary:
        classes = read_classes(layout)
        per_seed = {}
        for seed in params.run.seeds:
            with tracker.child(f"aggregator/seed{seed}", tags={"seed": str(seed), "variant": params.aggregator.variant}) as child:
                per_seed[seed] = _train_seed(params, layout, classes, seed, child, summary["outputs"])
        rewards = [r["best_val_reward"] for r in per_seed.values()]
        summary.update(
            variant=params.aggregator.variant,
            per_seed=per_seed,
            val_reward_mean=sum(rewards) / len(rewards),
            random_init=any(r["random_init"] for r in per_seed.values()),
        )
    return summary


def _train_seed(params: Params, layout: Layout, classes: dict, seed: int, tracker: Tracker, outputs: list) -> dict[str, Any]:
    cfg = params.aggregator
    out = layout.seed_dir(layout.aggregator, seed)
    device = resolve_device(params.run.device)
    inputs = load_seed_inputs(layout, seed, classes)
    facts = inputs.backbone_facts()
    if facts["random_init"]:
        tracker.set_tags({"random_init": "true"})
    bank = description_bank(inputs, classes["classnames"], cfg.max_descriptions)
    with seeded(seed):
        aggregator = aggregator_from_config(cfg, inputs.bundle.embed_dim, seed)
    n_params = sum(p.numel() for p in aggregator.parameters())
    epochs = cfg.schedule.resolved_epochs(params.data.shots, classes["dataset"])
    log.info(
        "seed %d: aggregator '%s' (%d parameters) on %d images x %d views, %d classes, %d-%d descriptions per class",
        seed, cfg.variant, n_params, inputs.data.num_items, inputs.data.num_views, len(bank),
        int(bank.counts.min()), int(bank.counts.max()),
    )  # fmt: skip
    tracker.log_params({"aggregator_params": n_params, "epochs": epochs, "seed": seed, "variant": cfg.variant})
    tracker.log_metrics({"aggregator_params": n_params})
    data, bank_dev = inputs.data.to(device), bank.to(device)
    aggregator.to(device)
    resume = out / "resume.pt"
    if aggregator.trainable:
        fingerprint = inputs.fingerprint("aggregator", cfg.model_dump(mode="json"), seed, epochs, bank.mask.sum().item())
        result = train_aggregator(
            aggregator, data, bank_dev, cfg.schedule, epochs, seed, cfg.reward_scale, resume, fingerprint, tracker
        )
        history, best_epoch, best, initial = result.history, result.best_epoch, result.best_figures, result.initial
        _warn_if_no_signal(history, facts["random_init"])
    else:  # mean / random: nothing to learn, but report the same validation figures
        log.info("aggregator '%s' has no parameters: no training", cfg.variant)
        history, best_epoch = [], 0
        objective = RewardObjective(data, bank_dev, cfg.reward_scale)
        best = initial = {**objective.validate(aggregator), **objective.diagnostics(aggregator)}
        tracker.log_metrics({k: v for k, v in best.items() if v == v}, step=0)
    summaries, clean = compute_summaries(aggregator, data.views, inputs.clean.to(device), data.labels, bank_dev)
    val_summaries = summarize_images(aggregator, data.val_features, data.val_labels, bank_dev)
    meta = {
        **facts,
        "seed": seed,
        "variant": cfg.variant,
        "config": cfg.model_dump(mode="json"),
        "classnames": inputs.classnames,
        "train_classes": inputs.train_classes,
        "descriptions_per_class": bank.counts.tolist(),
        "epochs": epochs if aggregator.trainable else 0,
        "best_epoch": best_epoch,
        "best_val_reward": best["val_reward"],
    }
    paths = save_aggregator(aggregator.cpu(), out, meta)
    summaries_path = out / "summaries.safetensors"
    atomic_save_tensors(
        summaries_path,
        {"summaries": summaries, "clean": clean, "labels": inputs.bundle.train_labels, "rows": inputs.bundle.train_rows}
        | ({"val": val_summaries} if len(val_summaries) else {}),
        {k: meta[k] for k in ("backbone_identity", "random_init", "embed_dim", "seed", "variant")},
    )
    history_path = out / "history.json"
    atomic_write_json(
        history_path,
        {**{k: meta[k] for k in ("seed", "variant", "random_init", "epochs", "best_epoch")}, "select": cfg.schedule.select,
         "initial": initial, "best": best, "history": history},
    )  # fmt: skip
    remove_quietly(resume)
    outputs.extend([*paths, summaries_path, history_path])
    log.info("seed %d: kept epoch %d (%s), validation reward %.4f", seed, best_epoch, cfg.schedule.select, best["val_reward"])
    return {"best_epoch": best_epoch, "best_val_reward": best["val_reward"], "params": n_params, "random_init": facts["random_init"]}


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
