"""The fused C++ evaluation loop of the bottleneck head: the same logits as the literal formula and the
PyTorch path, taken only where it applies, and a clear word when it cannot be built."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from aape.method import AAPEModel, fused_head
from aape.method.fused_head import FUSED_WIDTHS, FusedHeadError


@pytest.fixture(scope="module")
def built():
    if fused_head._compiled() is None:  # no compiler or ninja here: the PyTorch path is tested elsewhere
        pytest.skip(f"the fused head did not build: {fused_head._state['failure']}")


def _model(k: int, init: str, dim: int = 64) -> AAPEModel:
    torch.manual_seed(k)
    model = AAPEModel(dim, hidden=8, head_hidden=k, head_init=init).eval()
    with torch.no_grad():  # a trained-looking g: the zero-shot start has V = 0
        for p in model.head.expand.parameters():
            p.normal_(std=0.1)
    return model


def _inputs(images: int, classes: int, dim: int = 64):
    g = torch.Generator().manual_seed(7)
    return F.normalize(torch.randn(images, dim, generator=g), dim=-1), F.normalize(torch.randn(classes, dim, generator=g), dim=-1)


def _count_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = fused_head.cosine
    monkeypatch.setattr(fused_head, "cosine", lambda *a: calls.append(1) or original(*a))
    return calls


@pytest.mark.parametrize("init", ["zeroshot", "random"])
@pytest.mark.parametrize("k", FUSED_WIDTHS)
def test_the_fused_loop_gives_the_literal_formulas_logits(built, monkeypatch, k, init):
    model = _model(k, init)
    x, w = _inputs(37, 53)  # 53 classes: three full lane groups of 16 and a ragged one
    calls = _count_calls(monkeypatch)
    with torch.no_grad():
        fused = model.logits(x, w)
        naive = model.naive_logits(x, w)
        monkeypatch.setenv("AAPE_FUSED_HEAD", "off")
        blocked = model.logits(x, w)
    assert len(calls) == 1 and fused.shape == (37, 53)
    torch.testing.assert_close(fused, naive, rtol=0, atol=5e-5)  # logits of scale 100, float32
    torch.testing.assert_close(fused, blocked, rtol=0, atol=5e-5)
    assert torch.equal(fused.argmax(-1), naive.argmax(-1))


def test_training_and_other_dtypes_keep_the_pytorch_path(built, monkeypatch):
    model = _model(32, "zeroshot")
    x, w = _inputs(5, 20)
    calls = _count_calls(monkeypatch)
    F.cross_entropy(model.logits(x, w), torch.arange(5)).backward()  # autograd: the differentiable blocks
    with torch.no_grad():
        model.double().logits(x.double(), w.double())  # float64 (the exactness tests run in it)
    assert calls == [] and model.head.expand.weight.grad is not None


def test_on_refuses_what_the_loop_cannot_run_and_bad_values_are_named(monkeypatch):
    model = _model(24, "zeroshot")
    x, w = _inputs(3, 4)
    monkeypatch.setenv("AAPE_FUSED_HEAD", "on")
    with pytest.raises(FusedHeadError, match="k in \\(16, 32, 64\\).*k = 24\\); unset it"), torch.no_grad():
        model.logits(x, w)
    monkeypatch.setenv("AAPE_FUSED_HEAD", "fast")
    with pytest.raises(FusedHeadError, match="AAPE_FUSED_HEAD='fast' is not one of auto, off, on"), torch.no_grad():
        model.logits(x, w)


def test_a_failed_build_is_said_once_and_the_pytorch_path_gives_the_same_logits(monkeypatch, caplog):
    monkeypatch.setattr(fused_head, "_state", {"module": None, "failure": "CalledProcessError: no c++ compiler", "warned": False})
    model = _model(32, "random")
    x, w = _inputs(6, 40)
    with caplog.at_level(logging.WARNING, logger="aape.method.fused_head"), torch.no_grad():
        first, second = model.logits(x, w), model.logits(x, w)
    warnings = [r.getMessage() for r in caplog.records if "fused AAPE head did not build" in r.getMessage()]
    assert len(warnings) == 1 and "no c++ compiler" in warnings[0] and "AAPE_FUSED_HEAD=off" in warnings[0]
    torch.testing.assert_close(first, model.naive_logits(x, w).detach(), rtol=0, atol=5e-5)
    assert torch.equal(first, second)
    monkeypatch.setenv("AAPE_FUSED_HEAD", "on")
    with pytest.raises(FusedHeadError, match="did not build \\(CalledProcessError: no c\\+\\+ compiler\\); install a C\\+\\+ compiler"):
        with torch.no_grad():
            model.logits(x, w)


def test_prebuild_builds_once_and_respects_the_switch(built, monkeypatch):
    assert fused_head.prebuild() is True and fused_head._state["module"] is not None
    monkeypatch.setenv("AAPE_FUSED_HEAD", "off")
    assert fused_head.prebuild() is False
    monkeypatch.setattr(fused_head, "_state", {"module": None, "failure": "CalledProcessError: no c++ compiler", "warned": False})
    monkeypatch.setenv("AAPE_FUSED_HEAD", "auto")
    assert fused_head.prebuild() is False
