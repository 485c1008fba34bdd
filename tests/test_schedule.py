"""The optimiser a schedule builds (aape/method/schedule.py make_optimizer)."""

from __future__ import annotations

import pytest
import torch

from aape.config import OPTIMISER_PRESETS, ScheduleConfig, load_params
from aape.method.schedule import make_optimizer


def _parameters():
    trained, frozen = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2), requires_grad=False)
    return trained, frozen


def test_adamw_gets_the_configured_lr_and_weight_decay_and_only_trainable_parameters():
    schedule = ScheduleConfig(optimizer="adamw", lr=0.003, weight_decay=0.25)
    trained, frozen = _parameters()
    optimizer = make_optimizer([trained, frozen], schedule)
    assert type(optimizer) is torch.optim.AdamW
    [group] = optimizer.param_groups
    assert (group["lr"], group["weight_decay"]) == (0.003, 0.25)
    assert len(group["params"]) == 1 and group["params"][0] is trained  # a frozen parameter is not optimised


def test_adamw_decay_is_decoupled_from_the_gradient():
    """AdamW, not Adam with L2: with a zero gradient a step shrinks the weights by the factor
    1 - lr * wd (4 -> 3.8); Adam would add wd * w to the gradient and step by lr (4 -> 3.9)."""
    trained = torch.nn.Parameter(torch.full((2,), 4.0))
    optimizer = make_optimizer([trained], ScheduleConfig(optimizer="adamw", lr=0.1, weight_decay=0.5))
    trained.grad = torch.zeros(2)
    optimizer.step()
    torch.testing.assert_close(trained.detach(), torch.full((2,), 4.0 * (1 - 0.1 * 0.5)))


@pytest.mark.parametrize("section", ["aggregator", "generator"])
def test_the_stage_presets_build_adamw_with_their_settings(section):
    schedule = getattr(load_params(None, []), section).schedule
    preset = OPTIMISER_PRESETS[f"aape-{section}"]
    optimizer = make_optimizer([torch.nn.Parameter(torch.ones(1))], schedule)
    assert type(optimizer) is torch.optim.AdamW
    assert (optimizer.defaults["lr"], optimizer.defaults["weight_decay"]) == (preset["lr"], preset["weight_decay"])


def test_sgd_keeps_momentum_and_an_unknown_optimizer_is_refused():
    trained, _ = _parameters()
    sgd = make_optimizer([trained], ScheduleConfig(optimizer="sgd", lr=0.002, momentum=0.9, weight_decay=5e-4))
    assert type(sgd) is torch.optim.SGD and (sgd.defaults["lr"], sgd.defaults["momentum"], sgd.defaults["weight_decay"]) == (0.002, 0.9, 5e-4)
    unknown = ScheduleConfig.model_construct(optimizer="adam", lr=0.1, weight_decay=0.0)
    with pytest.raises(ValueError, match="schedule.optimizer 'adam' is unknown"):
        make_optimizer([trained], unknown)
