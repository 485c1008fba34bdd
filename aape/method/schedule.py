"""CoOp's optimisation schedule (docs/method.md, "Protocols"), as a pure function of the epoch.

The optimiser comes from a preset (aape/config.py OPTIMISER_PRESETS: CoOp's SGD 0.002 as `coop`); `warmup_epochs` at the constant `warmup_lr`, then
cosine decay over `epochs` epochs, the learning rate fixed within an epoch. This is Dassl's
ConstantWarmupScheduler around CosineAnnealingLR(T_max=epochs): the cosine starts counting when the
warm-up ends. Being a function of the epoch number, it resumes exactly after an interruption.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from aape.config import ScheduleConfig


def lr_at(epoch: int, schedule: ScheduleConfig, epochs: int) -> float:
    """Learning rate of 0-based `epoch` of a run of `epochs` epochs."""
    if epoch < schedule.warmup_epochs:
        return schedule.warmup_lr
    return 0.5 * schedule.lr * (1 + math.cos(math.pi * (epoch - schedule.warmup_epochs) / epochs))


def make_optimizer(params: Iterable[torch.nn.Parameter] | Iterable[dict], schedule: ScheduleConfig) -> torch.optim.Optimizer:
    """The schedule's optimiser over `params`: parameters, or groups {"params": [...], "lr_scale": s}
    whose learning rate is s times the schedule's at every epoch (set_lr)."""
    items = list(params)
    groups = items if items and isinstance(items[0], dict) else [{"params": items}]
    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
    groups = [g for g in groups if g["params"]]
    if schedule.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=schedule.lr, momentum=schedule.momentum, weight_decay=schedule.weight_decay)
    if schedule.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=schedule.lr, weight_decay=schedule.weight_decay)
    raise ValueError(f"schedule.optimizer '{schedule.optimizer}' is unknown; choose 'sgd' or 'adamw'")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
