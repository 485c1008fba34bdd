"""Stage `distill-generator`: train the prompt generator h and the head g on cached features with
λ·‖h(x) − p^a‖² + cross-entropy, the aggregator's summaries p^a fixed (docs/method.md, "Components").

Per seed, into generator/seed{S}/: generator.safetensors + generator.json, history.json. When
`aape-nodistill` is among evaluation.methods, the same model trained with λ = 0 (plain task
training, same seed and schedule) goes to generator/seed{S}/nodistill/. The last epoch is kept
unless generator.schedule.select is best-val (validation accuracy; never test data). history.json
holds per-epoch figures and diagnostics, and `initial`: the untrained model's (with the default
head_init that is zero-shot CLIP's validation accuracy).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from aape.backbone import resolve_device
from aape.config import Params
from aape.layout import Layout
from aape.logs import stage
from aape.atomic import atomic_write_json
from aape.method.inputs import SeedInputs, StageInputError, load_seed_inputs, read_classes, remove_quietly
from aape.method.model import AAPEModel
from aape.method.objectives import seeded, train_generator
from aape.tracking import NullTracker, Tracker

log = logging.getLogger(__name__)

NAME = "distill-generator"
NODISTILL_METHOD = "aape-nodistill"


def run(params: Params, tracker: Tracker | None = None) -> dict[str, Any]:
    tracker = tracker or NullTracker()
    layout = Layout.from_params(params)
    with stage(NAME) as summary:
        classes = read_classes(layout)
        per_seed: dict[int, dict[str, Any]] = {}
        for seed in params.run.seeds:
            per_seed[seed] = _train_seed(params, layout, classes, seed, tracker, summary["outputs"])
        summary["per_seed"] = per_seed
        for variant in ("aape", NODISTILL_METHOD):
            accs = [r[variant]["best_val_accuracy"] for r in per_seed.values() if variant in r]
            if accs:
                summary[f"{variant}_val_accuracy_mean"] = sum(accs) / len(accs)
        first = next(iter(per_seed.values()))["aape"]
        summary.update(params_h=first["params"]["h"], params_g=first["params"]["g"], params_total=first["params"]["total"])
        summary["seconds_per_epoch"] = first["seconds_per_epoch"]
    return summary


def _train_seed(params: Params, layout: Layout, classes: dict, seed: int, tracker: Tracker, outputs: list) -> dict[str, Any]:
    cfg = params.generator
    out = layout.seed_dir(layout.generator, seed)
    inputs = load_seed_inputs(layout, seed, classes)
    summaries, val_summaries = _load_summaries(layout, seed, inputs, required=cfg.lambda_distill > 0)
    runs = {"aape": (out, cfg.lambda_distill, summaries)}
    if NODISTILL_METHOD in params.evaluation.methods:
        runs[NODISTILL_METHOD] = (out / "nodistill", 0.0, summaries)
    results = {}
    for variant, (directory, lam, targets) in runs.items():
        tags = {"seed": str(seed), "method": variant, "lambda_distill": str(lam)}
        if inputs.bundle.random_init:
            tags["random_init"] = "true"
        with tracker.child(f"{variant}/seed{seed}", tags=tags) as child:
            results[variant] = _train_one(params, inputs, seed, directory, lam, targets, val_summaries, child, outputs, variant, classes["dataset"])
    return results


def _train_one(
    params: Params,
    inputs: SeedInputs,
    seed: int,
    directory: Path,
    lam: float,
    summaries: torch.Tensor | None,
    val_summaries: torch.Tensor | None,
    tracker: Tracker,
    outputs: list,
    variant: str,
    dataset: str,
) -> dict[str, Any]:
    cfg = params.generator
    device = resolve_device(params.run.device)
    bundle = inputs.bundle
    with seeded(seed):
        model = AAPEModel.from_config(cfg, bundle.embed_dim, bundle.logit_scale)
    counts = model.parameter_counts()
    epochs = cfg.schedule.resolved_epochs(params.data.shots, dataset)
    log.info(
        "seed %d, %s (λ=%g): h has %d parameters, g (%s) %d, total %d; %d images x %d views, %d classes, %d epochs",
        seed, variant, lam, counts["h"], cfg.head, counts["g"], counts["total"],
        inputs.data.num_items, inputs.data.num_views, len(inputs.train_classes), epochs,
    )  # fmt: skip
    tracker.log_params({"params_h": counts["h"], "params_g": counts["g"], "params_total": counts["total"], "lambda_distill": lam, "epochs": epochs, "seed": seed})
    tracker.log_metrics({f"params_{k}": float(v) for k, v in counts.items()})
    resume = directory / "resume.pt"
    fingerprint = inputs.fingerprint(variant, cfg.model_dump(mode="json"), lam, seed, epochs, _summary_digest(summaries))
    result = train_generator(
        model.to(device),
        inputs.data.to(device),
        inputs.class_text.to(device),
        summaries.to(device) if summaries is not None else None,
        lam,
        cfg.schedule,
        epochs,
        seed,
        resume_path=resume,
        fingerprint=fingerprint,
        tracker=tracker,
        name=f"{variant} seed{seed}",
        val_summaries=val_summaries.to(device) if val_summaries is not None else None,
    )
    seconds = [r["seconds"] for r in result.history]
    meta = {
        **inputs.backbone_facts(),
        "method": variant,
        "seed": seed,
        "lambda_distill": lam,
        "config": cfg.model_dump(mode="json"),
        "aggregator_variant": params.aggregator.variant if lam > 0 else None,
        "train_classnames": inputs.classnames,
        "train_classes": inputs.train_classes,
        # the template the class texts w_i were encoded with: prediction must encode new names the same way
        "class_template": bundle.index.get("class_template", params.features.class_template),
        "epochs": epochs,
        "best_epoch": result.best_epoch,
        "best_val_accuracy": result.best_figures["val_accuracy"],
        "best_val_loss": result.best_figures["val_loss"],
    }
    paths = model.cpu().save(directory, meta)
    history_path = directory / "history.json"
    atomic_write_json(
        history_path,
        {**{k: meta[k] for k in ("method", "seed", "lambda_distill", "random_init", "epochs", "best_epoch")}, "select": cfg.schedule.select,
         "initial": result.initial, "best": result.best_figures, "history": result.history},  # fmt: skip
    )
    remove_quietly(resume)
    outputs.extend([*paths, history_path])
    log.info(
        "seed %d, %s: kept epoch %d (%s), validation accuracy %.4f (untrained %.4f)", seed, variant, result.best_epoch,
        cfg.schedule.select, meta["best_val_accuracy"], result.initial.get("val_accuracy", float("nan")),
    )  # fmt: skip
    return {
        "best_epoch": result.best_epoch,
        "best_val_accuracy": meta["best_val_accuracy"],
        "params": counts,
        "seconds_per_epoch": sum(seconds) / len(seconds) if seconds else 0.0,
    }


def _load_summaries(layout: Layout, seed: int, inputs: SeedInputs, required: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """p^a [N, V, d] of this seed's training views and [Nv, d] of its validation images (None when the
    file predates them), checked against the features in use."""
    path = layout.seed_dir(layout.aggregator, seed) / "summaries.safetensors"
    if not path.is_file():
        if required:
            raise StageInputError(f"{path} is missing: run `aape train-aggregator` before `aape distill-generator`")
        return None, None
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as fh:
            identity = json.loads((fh.metadata() or {}).get("backbone_identity", "null"))
    except (SafetensorError, OSError, json.JSONDecodeError) as exc:
        raise StageInputError(f"{path} is unreadable ({exc}); re-run `aape train-aggregator`") from None
    summaries = tensors.get("summaries")
    stale = (
        summaries is None
        or summaries.shape != inputs.data.views.shape
        or identity != inputs.bundle.identity
        or ("labels" in tensors and not torch.equal(tensors["labels"], inputs.bundle.train_labels))
    )
    if stale:
        raise StageInputError(
            f"{path} does not belong to the current features (backbone {identity!r} vs {inputs.bundle.identity!r}, "
            f"shape {None if summaries is None else tuple(summaries.shape)} vs {tuple(inputs.data.views.shape)}): "
            f"re-run `aape train-aggregator`."
        )
    val = tensors.get("val")
    if val is not None and val.shape != inputs.data.val_features.shape:
        raise StageInputError(f"{path} holds validation summaries of another validation set: re-run `aape train-aggregator`.")
    return summaries, val


def _summary_digest(summaries: torch.Tensor | None) -> float | None:
    return None if summaries is None else float(summaries.double().sum())
