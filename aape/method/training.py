"""The epoch loop both training stages share: CoOp schedule, seeded draws, the last epoch kept (or
the best on validation, `schedule.select`), resumable after an interruption, and a clear stop on a
non-finite loss. Validation figures and diagnostics are recorded before the first step (`initial`,
MLflow step 0) and after every epoch (`history`).

Every random choice of an epoch (the order of the items and which cached augmented view each item
uses) comes from a generator seeded with (seed, epoch), so an epoch is the same whether the run
went straight through or was resumed, and the same seed gives the same weights.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from aape.config import ScheduleConfig
from aape.errors import AAPEError
from aape.logs import progress
from aape.method.checkpoint import atomic_torch_save, load_resume_state
from aape.method.schedule import lr_at, make_optimizer, set_lr
from aape.tracking import NullTracker, Tracker

log = logging.getLogger(__name__)

RESUME_FORMAT = "aape-resume/1"


class NonFiniteLossError(AAPEError, RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and the batch."""


class Objective(Protocol):
    """What a training run optimises and how it is validated."""

    def loss(self, model: torch.nn.Module, items: torch.Tensor, views: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss on a batch (item indices, and the cached view each uses) plus figures to average."""
        ...

    def validate(self, model: torch.nn.Module) -> dict[str, float]:
        """Validation figures (never test data)."""
        ...

    def selection_key(self, figures: dict[str, float]) -> tuple[float, ...]:
        """Larger is better: the best epoch maximises this on validation figures (ties: the later)."""
        ...

    def diagnostics(self, model: torch.nn.Module) -> dict[str, float]:
        """Figures that tell whether training does what the method needs (docs/method.md, "Diagnostics")."""
        ...


@dataclass
class FitResult:
    history: list[dict[str, Any]]
    best_epoch: int  # 1-based: the epoch whose weights were kept (the last one unless select is best-val)
    best_figures: dict[str, float]
    best_state: dict[str, torch.Tensor] = field(repr=False)
    resumed_from: int = 0  # epochs already done when this call started
    seconds: float = 0.0
    initial: dict[str, Any] = field(default_factory=dict)  # validation figures and diagnostics before the first step


def epoch_draw(seed: int, epoch: int, n_items: int, n_views: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Item order and one view per item for an epoch, a pure function of (seed, epoch)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_items, generator=gen)
    views = torch.randint(n_views, (n_items,), generator=gen)
    return order, views


def batches_of(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Dassl's loader: drop the last incomplete batch when there is at least one full batch."""
    chunks = list(order.split(batch_size))
    if len(chunks) > 1 and len(chunks[-1]) < batch_size:
        chunks.pop()
    return chunks


def _state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fit(
    model: torch.nn.Module,
    objective: Objective,
    *,
    n_items: int,
    n_views: int,
    schedule: ScheduleConfig,
    epochs: int,
    seed: int,
    name: str = "train",
    resume_path: Path | None = None,
    fingerprint: str = "",
    tracker: Tracker | None = None,
) -> FitResult:
    """Train `model` on `objective` for `epochs` epochs; return the history and the kept weights.

    `schedule.select`: "last" keeps the last epoch (CoOp/Dassl), "best-val" the epoch with the best
    `objective.selection_key` on validation (ties go to the later epoch).

    With `resume_path`, the state after every epoch is saved there atomically, and a run that finds
    a state with the same `fingerprint` continues after its last completed epoch.
    """
    tracker = tracker or NullTracker()
    optimizer = make_optimizer(model.parameters(), schedule)
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": 0, "key": None, "figures": {}, "state": _state_copy(model)}
    start_epoch = 0
    initial: dict[str, Any] | None = None
    if resume_path is not None:
        state = load_resume_state(resume_path, fingerprint, RESUME_FORMAT)
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            history, start_epoch = state["history"], int(state["epochs_done"])
            initial = state.get("initial")
            best = {**state["best"], "key": tuple(state["best"]["key"]) if state["best"]["key"] is not None else None}
            log.info("%s: resuming after epoch %d of %d from %s", name, start_epoch, epochs, resume_path)
    started = time.perf_counter()
    report_every = max(1, epochs // 20)
    if start_epoch == 0 or initial is None:
        initial = _initial_record(model, objective, tracker)
        log.info("%s before training: %s", name, _describe(initial))
    for epoch in range(start_epoch, epochs):
        epoch_start = time.perf_counter()
        lr = lr_at(epoch, schedule, epochs)
        set_lr(optimizer, lr)
        order, views = epoch_draw(seed, epoch, n_items, n_views)
        batches = batches_of(order, schedule.batch_size)
        model.train()
        sums: dict[str, float] = {}
        seen = 0
        for b, items in enumerate(progress(batches, desc=f"{name} epoch {epoch + 1}/{epochs}", unit="batch")):
            loss, figures = objective.loss(model, items, views[items])
            if not torch.isfinite(loss):
                where = f"epoch {epoch + 1} of {epochs}, batch {b + 1} of {len(batches)}"
                saved = f"epochs 1..{epoch} are saved in {resume_path}" if resume_path and epoch else "no epoch was completed"
                raise NonFiniteLossError(
                    f"{name}: the loss is {loss.item()} at {where} (lr {lr:g}); {saved}. Lower the learning rate "
                    f"(schedule.lr) or check the features for NaN/inf values; an unchanged configuration resumes."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            n = len(items)
            seen += n
            for key, value in {"loss": loss.detach(), **figures}.items():
                sums[key] = sums.get(key, 0.0) + float(value) * n
        model.eval()
        with torch.no_grad():
            val = objective.validate(model)
            diagnostics = objective.diagnostics(model)
        record: dict[str, Any] = {"epoch": epoch + 1, "lr": lr}
        record.update({f"train_{k}": v / max(seen, 1) for k, v in sums.items()})
        record.update(val)
        record.update(diagnostics)
        record["seconds"] = time.perf_counter() - epoch_start
        history.append(record)
        tracker.log_metrics({k: float(v) for k, v in record.items() if k != "epoch" and _is_number(v)}, step=epoch + 1)
        key = objective.selection_key(val) if schedule.select == "best-val" else (float(epoch),)
        if best["key"] is None or key >= best["key"]:  # exact ties go to the later, more trained epoch
            best = {"epoch": epoch + 1, "key": key, "figures": dict(val), "state": _state_copy(model)}
        if epoch + 1 in (1, epochs) or (epoch + 1) % report_every == 0:
            log.info("%s %s", name, _describe(record))
        if resume_path is not None:
            atomic_torch_save(
                resume_path,
                {
                    "format": RESUME_FORMAT,
                    "fingerprint": fingerprint,
                    "epochs_done": epoch + 1,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "history": history,
                    "initial": initial,
                    "best": {**best, "key": list(best["key"])},
                },
            )
    return FitResult(history, best["epoch"], best["figures"], best["state"], start_epoch, time.perf_counter() - started, initial)


def _initial_record(model: torch.nn.Module, objective: Objective, tracker: Tracker) -> dict[str, Any]:
    """Validation figures and diagnostics of the untrained model (epoch 0, logged at step 0)."""
    model.eval()
    with torch.no_grad():
        record: dict[str, Any] = {"epoch": 0, **objective.validate(model), **objective.diagnostics(model)}
    tracker.log_metrics({k: float(v) for k, v in record.items() if k != "epoch" and _is_number(v)}, step=0)
    return record


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(float(v))


def _describe(record: dict[str, Any]) -> str:
    parts = [f"epoch {record['epoch']}"]
    for key, value in record.items():
        if key != "epoch" and isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
    return " ".join(parts)
