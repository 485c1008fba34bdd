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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from aape.backbone import resolve_device
from aape.config import IMAGE_TEXT_TASKS, VL_TASKS, GeneratorConfig, Params
from aape.data.manifests import ClassesManifest
from aape.layout import Layout
from aape.logs import stage
from aape.atomic import atomic_write_json
from aape.method.inputs import SeedInputs, StageInputError, load_seed_inputs, remove_quietly
from aape.method.model import AAPEModel
from aape.method.objectives import seeded, train_generator
from aape.method.training import FitResult
from aape.tracking import NullTracker, Tracker

log = logging.getLogger(__name__)

NAME = "distill-generator"
NODISTILL_METHOD = "aape-nodistill"


@dataclass
class SeedRun:
    """What every model trained for one seed shares: configuration, prepared data, inputs, where to write."""

    params: Params
    classes: ClassesManifest
    seed: int
    directory: Path  # generator/seed{S}/
    inputs: SeedInputs
    summaries: torch.Tensor | None  # p^a [N, V, d] of the training views (None: no aggregator run)
    val_summaries: torch.Tensor | None  # p^a [Nv, d] of the validation images
    outputs: list  # the stage summary's outputs: every file written is appended

    @property
    def cfg(self) -> GeneratorConfig:
        return self.params.generator

    @property
    def epochs(self) -> int:
        return self.classes.epochs(self.cfg.schedule)

    @property
    def device(self) -> torch.device:
        return resolve_device(self.params.run.device)


@dataclass(frozen=True)
class Variant:
    """One model of a seed: AAPE (λ = generator.lambda_distill) or aape-nodistill (λ = 0)."""

    method: str
    directory: Path
    lam: float

    @property
    def resume(self) -> Path:
        return self.directory / "resume.pt"


def run(params: Params, tracker: Tracker | None = None) -> dict[str, Any]:
    tracker = tracker or NullTracker()
    layout = Layout.from_params(params)
    if params.run.task in IMAGE_TEXT_TASKS:
        from aape.retrieval import pipeline as retrieval

        with stage(NAME) as summary:
            retrieval.train_queries(params, summary, tracker)
            if params.run.task in VL_TASKS:  # then the prefix models on the frozen LM, from that h
                from aape.vl import pipeline as vl

                vl.train_prefix_models(params, summary, tracker)
        return summary
    with stage(NAME) as summary:
        classes = ClassesManifest.read(layout.classes_file)
        per_seed: dict[int, dict[str, Any]] = {}
        for seed in params.run.seeds:
            per_seed[seed] = _train_seed(_seed_run(params, layout, classes, seed, summary["outputs"]), tracker)
        _summarise(summary, per_seed)
    return summary


def _summarise(summary: dict[str, Any], per_seed: dict[int, dict[str, Any]]) -> None:
    summary["per_seed"] = per_seed
    for variant in ("aape", NODISTILL_METHOD):
        accs = [r[variant]["best_val_accuracy"] for r in per_seed.values() if variant in r]
        if accs:
            summary[f"{variant}_val_accuracy_mean"] = sum(accs) / len(accs)
    first = next(iter(per_seed.values()))["aape"]
    summary.update(params_h=first["params"]["h"], params_g=first["params"]["g"], params_total=first["params"]["total"])
    summary["seconds_per_epoch"] = first["seconds_per_epoch"]


def _seed_run(params: Params, layout: Layout, classes: ClassesManifest, seed: int, outputs: list) -> SeedRun:
    inputs = load_seed_inputs(layout, seed, classes)
    summaries, val_summaries = _load_summaries(layout, seed, inputs, required=params.generator.lambda_distill > 0)
    directory = layout.seed_dir(layout.generator, seed)
    return SeedRun(params, classes, seed, directory, inputs, summaries, val_summaries, outputs)


def _variants(run: SeedRun) -> list[Variant]:
    variants = [Variant("aape", run.directory, run.cfg.lambda_distill)]
    if NODISTILL_METHOD in run.params.evaluation.methods:
        variants.append(Variant(NODISTILL_METHOD, run.directory / "nodistill", 0.0))
    return variants


def _train_seed(run: SeedRun, tracker: Tracker) -> dict[str, Any]:
    results = {}
    for variant in _variants(run):
        tags = {"seed": str(run.seed), "method": variant.method, "lambda_distill": str(variant.lam)}
        if run.inputs.bundle.random_init:
            tags["random_init"] = "true"
        with tracker.child(f"{variant.method}/seed{run.seed}", tags=tags) as child:
            results[variant.method] = _train_one(run, variant, child)
    return results


def _train_one(run: SeedRun, variant: Variant, tracker: Tracker) -> dict[str, Any]:
    """Train, save and report one variant of one seed."""
    bundle = run.inputs.bundle
    with seeded(run.seed):
        model = AAPEModel.from_config(run.cfg, bundle.embed_dim, bundle.logit_scale)
    counts = model.parameter_counts()
    _announce(run, variant, counts, tracker)
    result = _fit(run, variant, model, tracker)
    meta = _model_meta(run, variant, result)
    paths = model.cpu().save(variant.directory, meta)
    history_path = _write_history(run, variant, meta, result)
    remove_quietly(variant.resume)
    run.outputs.extend([*paths, history_path])
    log.info(
        "seed %d, %s: kept epoch %d (%s), validation accuracy %.4f (untrained %.4f)", run.seed, variant.method,
        result.best_epoch, run.cfg.schedule.select, meta["best_val_accuracy"], result.initial.get("val_accuracy", float("nan")),
    )  # fmt: skip
    seconds = [r["seconds"] for r in result.history]
    return {
        "best_epoch": result.best_epoch,
        "best_val_accuracy": meta["best_val_accuracy"],
        "params": counts,
        "seconds_per_epoch": sum(seconds) / len(seconds) if seconds else 0.0,
    }


def _announce(run: SeedRun, variant: Variant, counts: dict[str, int], tracker: Tracker) -> None:
    """The model's size and the work ahead, to the log and the tracker."""
    data, epochs = run.inputs.data, run.epochs
    log.info(
        "seed %d, %s (λ=%g): h has %d parameters, g (%s) %d, total %d; %d images x %d views, %d classes, %d epochs",
        run.seed, variant.method, variant.lam, counts["h"], run.cfg.head, counts["g"], counts["total"],
        data.num_items, data.num_views, len(run.inputs.train_classes), epochs,
    )  # fmt: skip
    tracker.log_params({"params_h": counts["h"], "params_g": counts["g"], "params_total": counts["total"],
                        "lambda_distill": variant.lam, "epochs": epochs, "seed": run.seed})  # fmt: skip
    tracker.log_metrics({f"params_{k}": float(v) for k, v in counts.items()})


def _fit(run: SeedRun, variant: Variant, model: AAPEModel, tracker: Tracker) -> FitResult:
    """train_generator on this seed's data, resumable from the variant's resume.pt."""
    cfg, device, inputs = run.cfg, run.device, run.inputs
    fingerprint = inputs.fingerprint(variant.method, cfg.model_dump(mode="json"), variant.lam, run.seed, run.epochs,
                                     _summary_digest(run.summaries))  # fmt: skip
    return train_generator(
        model.to(device),
        inputs.data.to(device),
        inputs.class_text.to(device),
        _on(run.summaries, device),
        variant.lam,
        cfg.schedule,
        run.epochs,
        run.seed,
        resume_path=variant.resume,
        fingerprint=fingerprint,
        tracker=tracker,
        name=f"{variant.method} seed{run.seed}",
        val_summaries=_on(run.val_summaries, device),
    )


def _on(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return tensor.to(device) if tensor is not None else None


def _model_meta(run: SeedRun, variant: Variant, result: FitResult) -> dict[str, Any]:
    """What generator.json records beside the architecture."""
    cfg, inputs = run.cfg, run.inputs
    return {
        **inputs.backbone_facts(),
        "method": variant.method,
        "seed": run.seed,
        "lambda_distill": variant.lam,
        "config": cfg.model_dump(mode="json"),
        "aggregator_variant": run.params.aggregator.variant if variant.lam > 0 else None,
        "train_classnames": inputs.classnames,
        "train_classes": inputs.train_classes,
        # the template the class texts w_i were encoded with: prediction must encode new names the same way
        "class_template": inputs.bundle.index.get("class_template", run.params.features.class_template),
        "epochs": run.epochs,
        "best_epoch": result.best_epoch,
        "best_val_accuracy": result.best_figures["val_accuracy"],
        "best_val_loss": result.best_figures["val_loss"],
    }


def _write_history(run: SeedRun, variant: Variant, meta: dict[str, Any], result: FitResult) -> Path:
    path = variant.directory / "history.json"
    atomic_write_json(
        path,
        {**{k: meta[k] for k in ("method", "seed", "lambda_distill", "random_init", "epochs", "best_epoch")},
         "select": run.cfg.schedule.select, "initial": result.initial, "best": result.best_figures, "history": result.history},
    )  # fmt: skip
    return path


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
