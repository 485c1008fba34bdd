"""The two training problems on cached features, independent of files and stages.

- `train_aggregator`: maximise the CLIP reward s·max(cos(x, p^a), 0) over the training images'
  views. `compute_summaries` then gives p^a for every training image and view.
- `train_generator`: minimise λ·‖h(x) − p^a‖² + CE(logit_scale·cos(x, w_i(x)), y) with p^a fixed
  (stop-gradient). λ = 0 drops the first term entirely, i.e. plain task training that never looks
  at p^a.
Both keep the last epoch unless schedule.select is best-val (validation reward, validation accuracy),
and both report diagnostics on the validation images (docs/method.md, "Diagnostics"):
- aggregator: `attention_entropy` (entropy of the attention over a class's descriptions as a share
  of its maximum log n: 1 = uniform, i.e. CuPL's mean) and `summary_shift` (mean ‖p^a − p̄‖);
- generator: `val_distill` (‖h(x) − p^a‖² on held-out images) beside `val_distill_constant` (the
  same for the best constant predictor, the mean training p^a) and their ratio `distill_ratio`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch.nn import functional as F

from aape.config import ScheduleConfig
from aape.logs import progress
from aape.method.aggregator import Aggregator, clip_reward
from aape.method.descriptions import DescriptionBank, masked_mean
from aape.method.model import AAPEModel
from aape.method.training import FitResult, fit
from aape.tracking import Tracker

CHUNK = 512  # images per forward pass outside training (bounds the [chunk, n, d] description gather)


@dataclass
class TrainingSet:
    """Cached features of one seed, labels already local (positions in the training classes)."""

    views: torch.Tensor  # [N, V, d]
    labels: torch.Tensor  # [N] local
    val_features: torch.Tensor  # [Nv, d]
    val_labels: torch.Tensor  # [Nv] local

    def to(self, device: torch.device | str) -> "TrainingSet":
        return TrainingSet(*(t.to(device) for t in (self.views, self.labels, self.val_features, self.val_labels)))

    @property
    def num_items(self) -> int:
        return int(self.views.shape[0])

    @property
    def num_views(self) -> int:
        return int(self.views.shape[1])


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draw parameter initialisations from `seed` without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _chunks(n: int) -> list[slice]:
    return [slice(i, min(i + CHUNK, n)) for i in range(0, n, CHUNK)]


# aggregator ------------------------------------------------------------------------------------


class RewardObjective:
    def __init__(self, data: TrainingSet, bank: DescriptionBank, scale: float) -> None:
        self.data, self.bank, self.scale = data, bank, scale

    def loss(self, model: Aggregator, items: torch.Tensor, views: torch.Tensor):
        items, views = items.to(self.data.views.device), views.to(self.data.views.device)
        x = self.data.views[items, views]
        summary = model.summarize(x, self.bank, self.data.labels[items])
        reward = clip_reward(x, summary, self.scale)
        cos = F.cosine_similarity(x, summary, dim=-1)
        # "active": share of images with cos > 0, the only ones the clamped reward sends a gradient from
        figures = {"reward": reward.mean().detach(), "cos": cos.mean().detach(), "active": (cos > 0).float().mean()}
        return -reward.mean(), figures

    def validate(self, model: Aggregator) -> dict[str, float]:
        x, labels = self.data.val_features, self.data.val_labels
        if len(x) == 0:
            return {"val_reward": float("nan"), "val_cos": float("nan")}
        reward_sum = cos_sum = 0.0
        for part in _chunks(len(x)):
            summary = model.summarize(x[part], self.bank, labels[part])
            reward_sum += float(clip_reward(x[part], summary, self.scale).sum())
            cos_sum += float(F.cosine_similarity(x[part], summary, dim=-1).sum())
        return {"val_reward": reward_sum / len(x), "val_cos": cos_sum / len(x)}

    def selection_key(self, figures: dict[str, float]) -> tuple[float, ...]:
        value = figures["val_reward"]
        return (value if value == value else 0.0,)  # NaN (no validation images): all tie, the last epoch wins

    def diagnostics(self, model: Aggregator) -> dict[str, float]:
        x, labels = self.data.val_features, self.data.val_labels
        if len(x) == 0:
            return {}
        return summary_diagnostics(model, x, labels, self.bank)


@torch.no_grad()
def summary_diagnostics(model: Aggregator, x: torch.Tensor, labels: torch.Tensor, bank: DescriptionBank) -> dict[str, float]:
    """Mean ‖p^a − p̄‖ and, for attention variants, the attention entropy as a share of its maximum."""
    shift = entropy = 0.0
    counted = 0
    for part in _chunks(len(x)):
        P, mask = bank.gather(labels[part])
        summary = model(x[part], P, mask)
        shift += float((summary - masked_mean(P, mask)).norm(dim=-1).sum())
        if model.has_attention:
            weights = model.description_weights(x[part], P, mask)
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)  # literal: drop the token's share
            plogp = torch.where(weights > 0, weights * weights.clamp_min(1e-12).log(), torch.zeros_like(weights))
            n = mask.sum(-1).clamp_min(2).to(x.dtype)
            entropy += float((-plogp.sum(-1) / n.log()).sum())
        counted += len(x[part])
    figures = {"summary_shift": shift / counted}
    if model.has_attention:
        figures["attention_entropy"] = entropy / counted
    return figures


def train_aggregator(
    aggregator: Aggregator,
    data: TrainingSet,
    bank: DescriptionBank,
    schedule: ScheduleConfig,
    epochs: int,
    seed: int,
    reward_scale: float = 2.5,
    resume_path: Path | None = None,
    fingerprint: str = "",
    tracker: Tracker | None = None,
) -> FitResult:
    """Train with the CLIP reward; the aggregator ends holding the kept weights (schedule.select)."""
    result = fit(
        aggregator,
        RewardObjective(data, bank, reward_scale),
        n_items=data.num_items,
        n_views=data.num_views,
        schedule=schedule,
        epochs=epochs,
        seed=seed,
        name="aggregator",
        resume_path=resume_path,
        fingerprint=fingerprint,
        tracker=tracker,
    )
    aggregator.load_state_dict(result.best_state)
    return result


@torch.no_grad()
def compute_summaries(
    aggregator: Aggregator, views: torch.Tensor, clean: torch.Tensor, labels: torch.Tensor, bank: DescriptionBank
) -> tuple[torch.Tensor, torch.Tensor]:
    """p^a for every training image and view [N, V, d], and for the clean view [N, d]."""
    N, V, d = views.shape
    flat_x = torch.cat([views.reshape(N * V, d), clean])
    flat_labels = torch.cat([labels.repeat_interleave(V), labels])
    out = summarize_images(aggregator, flat_x, flat_labels, bank)
    return out[: N * V].reshape(N, V, d), out[N * V :]


@torch.no_grad()
def summarize_images(aggregator: Aggregator, x: torch.Tensor, labels: torch.Tensor, bank: DescriptionBank) -> torch.Tensor:
    """p^a [M, d] of images x [M, d] of local classes `labels`, in chunks."""
    aggregator.eval()
    out = torch.empty_like(x)
    for part in progress(_chunks(len(x)), desc="summaries", unit="chunk"):
        out[part] = aggregator.summarize(x[part], bank, labels[part])
    return out


# generator -------------------------------------------------------------------------------------


class DistillObjective:
    def __init__(
        self,
        data: TrainingSet,
        class_text: torch.Tensor,
        summaries: torch.Tensor | None,
        lambda_distill: float,
        val_summaries: torch.Tensor | None = None,
    ) -> None:
        if lambda_distill > 0 and summaries is None:
            raise ValueError("generator.lambda_distill > 0 needs the aggregator's summaries; run `aape train-aggregator` first")
        if summaries is not None and summaries.shape != data.views.shape:
            raise ValueError(
                f"summaries have shape {tuple(summaries.shape)} but the training views {tuple(data.views.shape)}: "
                f"they come from different feature runs. Re-run `aape train-aggregator`."
            )
        if val_summaries is not None and val_summaries.shape != data.val_features.shape:
            raise ValueError(
                f"validation summaries have shape {tuple(val_summaries.shape)} but the validation features "
                f"{tuple(data.val_features.shape)}: re-run `aape train-aggregator`."
            )
        self.data, self.class_text, self.summaries, self.lam = data, class_text, summaries, lambda_distill
        self.val_summaries = val_summaries
        self.constant = best_constant(summaries) if summaries is not None else None

    def loss(self, model: AAPEModel, items: torch.Tensor, views: torch.Tensor):
        items, views = items.to(self.data.views.device), views.to(self.data.views.device)
        x, y = self.data.views[items, views], self.data.labels[items]
        logits, prompt = model.logits_and_prompt(x, model.class_part(self.class_text))
        ce = F.cross_entropy(logits, y)
        figures = {"ce": ce.detach(), "accuracy": (logits.argmax(-1) == y).float().mean()}
        loss = ce
        if self.summaries is not None:
            distance = (prompt - self.summaries[items, views].detach()).pow(2).sum(-1).mean()
            figures["distill"] = distance.detach()
            if self.lam > 0:  # λ = 0 is plain task training: the term is not even added
                loss = ce + self.lam * distance
        return loss, figures

    def validate(self, model: AAPEModel) -> dict[str, float]:
        x, y = self.data.val_features, self.data.val_labels
        if len(x) == 0:
            return {"val_accuracy": float("nan"), "val_loss": float("nan")}
        class_part = model.class_part(self.class_text)
        correct = loss_sum = 0.0
        for part in _chunks(len(x)):
            logits = model.logits_from(x[part], class_part)
            correct += float((logits.argmax(-1) == y[part]).sum())
            loss_sum += float(F.cross_entropy(logits, y[part], reduction="sum"))
        return {"val_accuracy": correct / len(x), "val_loss": loss_sum / len(x)}

    def selection_key(self, figures: dict[str, float]) -> tuple[float, ...]:
        acc, loss = figures["val_accuracy"], figures["val_loss"]
        if acc != acc:  # no validation images: all tie, the last epoch wins
            return (0.0, 0.0)
        return (acc, -loss)

    def diagnostics(self, model: AAPEModel) -> dict[str, float]:
        if self.val_summaries is None or self.constant is None or len(self.val_summaries) == 0:
            return {}
        return distill_diagnostics(model, self.data.val_features, self.val_summaries, self.constant)


def best_constant(summaries: torch.Tensor) -> torch.Tensor:
    """The best constant predictor of p^a under squared error: the mean training summary, [d]."""
    return summaries.reshape(-1, summaries.shape[-1]).mean(0)


@torch.no_grad()
def distill_diagnostics(model: AAPEModel, x: torch.Tensor, targets: torch.Tensor, constant: torch.Tensor) -> dict[str, float]:
    """‖h(x) − p^a‖² on held-out images beside the best constant predictor's (its ratio: < 1 learns)."""
    distance = float((model.prompt_embedding(x) - targets).pow(2).sum(-1).mean())
    baseline = float((targets - constant).pow(2).sum(-1).mean())
    return {"val_distill": distance, "val_distill_constant": baseline, "distill_ratio": distance / max(baseline, 1e-12)}


def train_generator(
    model: AAPEModel,
    data: TrainingSet,
    class_text: torch.Tensor,
    summaries: torch.Tensor | None,
    lambda_distill: float,
    schedule: ScheduleConfig,
    epochs: int,
    seed: int,
    resume_path: Path | None = None,
    fingerprint: str = "",
    tracker: Tracker | None = None,
    name: str = "generator",
    val_summaries: torch.Tensor | None = None,
) -> FitResult:
    """Train h and g; the model ends holding the kept weights (schedule.select).

    h learns at `schedule.h_lr_scale` times the learning rate, g at the learning rate itself
    (docs/method.md, "Optimisation")."""
    result = fit(
        model,
        DistillObjective(data, class_text, summaries, lambda_distill, val_summaries),
        n_items=data.num_items,
        n_views=data.num_views,
        schedule=schedule,
        epochs=epochs,
        seed=seed,
        name=name,
        resume_path=resume_path,
        fingerprint=fingerprint,
        tracker=tracker,
        param_groups=model.param_groups(getattr(schedule, "h_lr_scale", 1.0)),
    )
    model.load_state_dict(result.best_state)
    return result
