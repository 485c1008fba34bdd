"""Training the baselines on cached image features: cross-entropy over the training classes, one
cached augmented view per image and epoch, through the same epoch loop, schedule and resume logic
as AAPE's stages (aape.method.training.fit), so every learner gets the same treatment."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from aape.atomic import atomic_write_json
from aape.method.inputs import remove_quietly
from aape.method.objectives import TrainingSet, seeded
from aape.method.training import fit
from aape.methods.artifact import write_baseline
from aape.methods.context import MethodContext
from aape.tracking import Tracker

log = logging.getLogger(__name__)


class FeatureClassification:
    """The Objective (aape.method.training) of a classifier of cached features over the training classes.

    The model maps features [B, d] to logits [B, C_train]; an optional `regulariser()` (KgCoOp's
    term) is added to the loss."""

    def __init__(self, data: TrainingSet, device: torch.device, val_batch: int = 256, val_images: int | None = None) -> None:
        self.data, self.device, self.val_batch = data, device, val_batch
        n = len(data.val_labels)
        # at most `val_images` validation images, evenly spaced so every class keeps its share (the split is
        # ordered by class); CoCoOp needs it: a text-encoder pass per image and class
        step = max(1, n // val_images) if val_images else 1
        self.val_rows = torch.arange(0, n, step)[: val_images or n]

    def loss(self, model: nn.Module, items: torch.Tensor, views: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = self.data.views[items, views].to(self.device)
        labels = self.data.labels[items].to(self.device)
        logits = model(x)
        ce = F.cross_entropy(logits, labels)
        figures = {"ce": ce.detach(), "accuracy": (logits.argmax(1) == labels).float().mean()}
        regulariser = getattr(model, "regulariser", None)
        if regulariser is None:
            return ce, figures
        extra = regulariser()
        figures["regulariser"] = extra.detach()
        return ce + extra, figures

    def validate(self, model: nn.Module) -> dict[str, float]:
        x, y = self.data.val_features[self.val_rows], self.data.val_labels[self.val_rows]
        if not len(y):
            return {}
        logits = torch.cat([model(x[i : i + self.val_batch].to(self.device)).cpu() for i in range(0, len(x), self.val_batch)])
        return {"val_accuracy": 100.0 * float((logits.argmax(1) == y).float().mean()), "val_loss": float(F.cross_entropy(logits, y))}

    def selection_key(self, figures: dict[str, float]) -> tuple[float, ...]:
        return (figures.get("val_accuracy", 0.0), -figures.get("val_loss", 0.0))

    def diagnostics(self, model: nn.Module) -> dict[str, float]:
        return {}


def train_classifier(ctx: MethodContext, method: str, model: nn.Module, directory: Path, tracker: Tracker,
                     meta: dict[str, Any] | None = None, device: torch.device | None = None,
                     val_images: int | None = None) -> dict[str, Any]:
    """Fit `model` with the method's schedule, save its learnt tensors and history; the stage summary."""
    settings = ctx.settings(method)
    inputs = ctx.inputs
    epochs = ctx.info.epochs(settings.schedule)
    device = device or torch.device("cpu")
    objective = FeatureClassification(inputs.data, device, val_images=val_images)
    resume = directory / "resume.pt"
    with seeded(ctx.seed):
        result = fit(
            model, objective, n_items=len(inputs.data.labels), n_views=inputs.data.views.shape[1], schedule=settings.schedule,
            epochs=epochs, seed=ctx.seed, name=f"{method} seed {ctx.seed}", resume_path=resume,
            fingerprint=inputs.fingerprint(method, settings.model_dump(mode="json")), tracker=tracker,
        )
    model.load_state_dict(result.best_state)
    info = {
        **inputs.backbone_facts(), "seed": ctx.seed, "settings": settings.model_dump(mode="json"), "epochs": epochs,
        "kept_epoch": result.best_epoch, "select": settings.schedule.select, "train_classnames": inputs.classnames,
        "val_accuracy": result.best_figures.get("val_accuracy"), "initial": result.initial,
        "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "val_images": min(val_images or len(inputs.data.val_labels), len(inputs.data.val_labels)), **(meta or {}),
    }
    paths = write_baseline(directory, method, dict(model.state_dict()), info)
    history = directory / "history.json"
    atomic_write_json(history, {"method": method, "seed": ctx.seed, "initial": result.initial, "history": result.history})
    remove_quietly(resume)
    per_epoch = [r["seconds"] for r in result.history]
    summary = {"val_accuracy": info["val_accuracy"], "epochs": epochs, "kept_epoch": result.best_epoch,
               "seconds": result.seconds, "seconds_per_epoch": sum(per_epoch) / len(per_epoch) if per_epoch else 0.0,
               "parameters": info["parameters"], "outputs": [str(p) for p in (*paths, history)]}
    log.info("%s seed %d: val accuracy %.2f after %d epochs (%.2f s/epoch)", method, ctx.seed, summary["val_accuracy"] or float("nan"),
             epochs, summary["seconds_per_epoch"])
    return summary


def read_history(directory: Path) -> dict[str, Any]:
    path = Path(directory) / "history.json"
    return json.loads(path.read_text()) if path.is_file() else {}
