"""Stage `train-baselines`: train every method of evaluation.methods that the registry assigns to
this stage (CoOp, CoCoOp, KgCoOp, CLIP-Adapter, Tip-Adapter-F), per seed, on the cached features,
with the hyperparameters of params.yaml's `baselines` section.

Per method and seed, into baselines/<method>/seed{S}/: model.safetensors + model.json, history.json
(an interrupted training resumes from its last epoch). baselines/trained.json lists what this run
trained, so the folder exists (for DVC) when no such method is configured.
"""

from __future__ import annotations

import logging
from typing import Any

from aape.atomic import atomic_write_json
from aape.config import VL_TASKS, Params, flatten
from aape.data.manifests import ClassesManifest
from aape.features import load_bundle
from aape.layout import Layout
from aape.logs import stage
from aape.methods.context import MethodContext, backbone_loader
from aape.methods.registry import TRAIN_BASELINES, method_spec
from aape.tracking import NullTracker, Tracker

log = logging.getLogger(__name__)

NAME = "train-baselines"


def methods_to_train(params: Params) -> list[str]:
    return [m for m in params.evaluation.methods if method_spec(m).trainer == TRAIN_BASELINES]


def run(params: Params, tracker: Tracker | None = None) -> dict[str, Any]:
    tracker = tracker or NullTracker()
    layout = Layout.from_params(params)
    with stage(NAME) as summary:
        # captioning/VQA: the prefix models train in distill-generator (aape-finetuned trains h)
        methods = methods_to_train(params) if params.run.task not in VL_TASKS else []
        classes = ClassesManifest.read(layout.classes_file) if methods else None
        layout.baselines.mkdir(parents=True, exist_ok=True)
        per_method: dict[str, dict[int, Any]] = {m: {} for m in methods}
        load = backbone_loader(params)
        for seed in params.run.seeds:
            if not methods:
                break
            ctx = MethodContext(params, layout, classes, load_bundle(layout, seed), load)
            for method in methods:
                per_method[method][seed] = _train_one(ctx, method, tracker)
                summary["outputs"].extend(per_method[method][seed].pop("outputs", []))
        trained = layout.baselines / "trained.json"
        dataset = classes.dataset if classes else params.data.dataset
        atomic_write_json(trained, {"methods": methods, "seeds": list(params.run.seeds), "dataset": dataset, "task": params.run.task})
        summary["outputs"].append(str(trained))
        summary["per_method"] = per_method
        for method, seeds in per_method.items():
            accs = [r["val_accuracy"] for r in seeds.values() if r.get("val_accuracy") is not None]
            if accs:
                summary[f"{method}_val_accuracy_mean"] = sum(accs) / len(accs)
            summary[f"{method}_seconds_per_epoch"] = sum(r["seconds_per_epoch"] for r in seeds.values()) / max(len(seeds), 1)
        if not methods:
            log.info("no method of evaluation.methods is trained by this stage; nothing to do")
    return summary


def _train_one(ctx: MethodContext, method: str, tracker: Tracker) -> dict[str, Any]:
    spec = method_spec(method)
    directory = ctx.directory(method)
    directory.mkdir(parents=True, exist_ok=True)
    tags = {"seed": str(ctx.seed), "method": method}
    if ctx.bundle.random_init:
        tags["random_init"] = "true"
    with tracker.child(f"{method}/seed{ctx.seed}", tags=tags) as child:
        settings = ctx.settings(method)
        child.log_params(flatten(settings.model_dump(mode="json"), f"baselines.{spec.key}."))
        result = spec.trainer_function()(ctx, method, directory, child)
        child.log_metrics({k: float(v) for k, v in result.items() if isinstance(v, (int, float)) and v is not None})
    return result

