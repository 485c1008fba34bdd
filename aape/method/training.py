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


@dataclass
class _Run:
    """One call of `fit`: the model, what it optimises and how, and where its state is saved."""

    model: torch.nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    schedule: ScheduleConfig
    epochs: int
    seed: int
    n_items: int
    n_views: int
    name: str
    resume_path: Path | None
    fingerprint: str
    tracker: Tracker

    @property
    def report_every(self) -> int:
        return max(1, self.epochs // 20)


@dataclass
class _State:
    """Where a run stands after its completed epochs: what a resume state holds."""

    history: list[dict[str, Any]]
    best: dict[str, Any]  # epoch (1-based; 0 = untrained), key (selection), figures, state (weights)
    epochs_done: int = 0
    initial: dict[str, Any] | None = None


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
    param_groups: list[dict] | None = None,
) -> FitResult:
    """Train `model` on `objective` for `epochs` epochs; return the history and the kept weights.

    `param_groups` ({"params", "lr_scale"}) give parts of the model their own multiple of the
    schedule's learning rate; by default every parameter follows the schedule.

    `schedule.select`: "last" keeps the last epoch (CoOp/Dassl), "best-val" the epoch with the best
    `objective.selection_key` on validation (ties go to the later epoch).

    With `resume_path`, the state after every epoch is saved there atomically, and a run that finds
    a state with the same `fingerprint` continues after its last completed epoch.
    """
    optimizer = make_optimizer(param_groups or model.parameters(), schedule)
    run = _Run(model, objective, optimizer, schedule, epochs, seed, n_items, n_views, name, resume_path, fingerprint,
               tracker or NullTracker())  # fmt: skip
    fresh = _State(history=[], best={"epoch": 0, "key": None, "figures": {}, "state": _state_copy(model)})
    state = _resume(run) or fresh
    start_epoch, started = state.epochs_done, time.perf_counter()
    if start_epoch == 0 or state.initial is None:
        state.initial = _initial_record(model, objective, run.tracker)
        log.info("%s before training: %s", name, _describe(state.initial))
    for epoch in range(start_epoch, epochs):
        _run_epoch(run, state, epoch)
    best = state.best
    return FitResult(state.history, best["epoch"], best["figures"], best["state"], start_epoch, time.perf_counter() - started, state.initial)


def _resume(run: _Run) -> _State | None:
    """The state saved at run.resume_path for this fingerprint, loaded into the model and optimiser; None if none."""
    if run.resume_path is None:
        return None
    saved = load_resume_state(run.resume_path, run.fingerprint, RESUME_FORMAT)
    if saved is None:
        return None
    run.model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    key = saved["best"]["key"]
    best = {**saved["best"], "key": tuple(key) if key is not None else None}
    state = _State(saved["history"], best, int(saved["epochs_done"]), saved.get("initial"))
    log.info("%s: resuming after epoch %d of %d from %s", run.name, state.epochs_done, run.epochs, run.resume_path)
    return state


def _run_epoch(run: _Run, state: _State, epoch: int) -> None:
    """Train one epoch (0-based), validate, record, select and save the resume state."""
    epoch_start = time.perf_counter()
    lr = lr_at(epoch, run.schedule, run.epochs)
    set_lr(run.optimizer, lr)
    train_figures = _train_steps(run, epoch, lr)
    run.model.eval()
    with torch.no_grad():
        val = run.objective.validate(run.model)
        diagnostics = run.objective.diagnostics(run.model)
    record: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, **train_figures, **val, **diagnostics}
    record["seconds"] = time.perf_counter() - epoch_start
    state.history.append(record)
    run.tracker.log_metrics({k: float(v) for k, v in record.items() if k != "epoch" and _is_number(v)}, step=epoch + 1)
    key = run.objective.selection_key(val) if run.schedule.select == "best-val" else (float(epoch),)
    if state.best["key"] is None or key >= state.best["key"]:  # exact ties go to the later, more trained epoch
        state.best = {"epoch": epoch + 1, "key": key, "figures": dict(val), "state": _state_copy(run.model)}
    if epoch + 1 in (1, run.epochs) or (epoch + 1) % run.report_every == 0:
        log.info("%s %s", run.name, _describe(record))
    state.epochs_done = epoch + 1
    _save_resume_state(run, state)


def _train_steps(run: _Run, epoch: int, lr: float) -> dict[str, float]:
    """One pass over the epoch's batches; the per-item means of the loss and the objective's figures."""
    order, views = epoch_draw(run.seed, epoch, run.n_items, run.n_views)
    batches = batches_of(order, run.schedule.batch_size)
    run.model.train()
    sums: dict[str, float] = {}
    seen = 0
    for b, items in enumerate(progress(batches, desc=f"{run.name} epoch {epoch + 1}/{run.epochs}", unit="batch")):
        loss, figures = run.objective.loss(run.model, items, views[items])
        if not torch.isfinite(loss):
            raise _non_finite(run, loss, epoch, f"epoch {epoch + 1} of {run.epochs}, batch {b + 1} of {len(batches)}", lr)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        n = len(items)
        seen += n
        for key, value in {"loss": loss.detach(), **figures}.items():
            sums[key] = sums.get(key, 0.0) + float(value) * n
    return {f"train_{k}": v / max(seen, 1) for k, v in sums.items()}


def _non_finite(run: _Run, loss: torch.Tensor, epoch: int, where: str, lr: float) -> NonFiniteLossError:
    saved = f"epochs 1..{epoch} are saved in {run.resume_path}" if run.resume_path and epoch else "no epoch was completed"
    return NonFiniteLossError(
        f"{run.name}: the loss is {loss.item()} at {where} (lr {lr:g}); {saved}. Lower the learning rate "
        f"(schedule.lr) or check the features for NaN/inf values; an unchanged configuration resumes."
    )


def _save_resume_state(run: _Run, state: _State) -> None:
    if run.resume_path is None:
        return
    atomic_torch_save(
        run.resume_path,
        {
            "format": RESUME_FORMAT,
            "fingerprint": run.fingerprint,
            "epochs_done": state.epochs_done,
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "history": state.history,
            "initial": state.initial,
            "best": {**state.best, "key": list(state.best["key"])},
        },
    )


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
