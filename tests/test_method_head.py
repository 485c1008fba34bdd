"""The prompt generator h, the head g and AAPEModel: the fast head is the naive formula, computed cheaply."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from aape.method import AAPEModel, ClassifierHead, seeded
from aape.method.model import HEAD_INITS, HEAD_KINDS
from aape.method import model as model_module


pytestmark = pytest.mark.usefixtures("single_torch_thread")
FORMS = [(kind, init) for kind in HEAD_KINDS for init in HEAD_INITS]


def _model(kind: str, dim: int = 48, dtype=torch.float64, init: str = "random", trained: bool = True) -> AAPEModel:
    """A model; `trained` moves the residual form's zero-initialised output off zero, as training does."""
    with seeded(0):
        model = AAPEModel(dim, hidden=16, head=kind, head_hidden=8, logit_scale=50.0, head_init=init).to(dtype)
        if trained and init == "zeroshot":
            with torch.no_grad():
                for name, param in model.head.named_parameters():
                    if name.startswith("expand") or name == "gain":
                        param.copy_(0.3 * torch.randn_like(param))
    return model


def _inputs(batch: int, classes: int, dim: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(1)
    x = F.normalize(torch.randn(batch, dim, generator=gen, dtype=dtype), dim=-1)
    w = F.normalize(torch.randn(classes, dim, generator=gen, dtype=dtype), dim=-1)
    return x, w


@pytest.mark.parametrize("kind, init", FORMS)
def test_fast_head_equals_the_naive_concatenation_in_values_and_gradients(kind, init):
    model = _model(kind, init=init)
    x, w = _inputs(6, 11, 48)
    x.requires_grad_(True)
    fast = model.logits(x, w)
    naive = model.naive_logits(x, w)
    assert fast.shape == (6, 11)
    torch.testing.assert_close(fast, naive, rtol=1e-10, atol=1e-10)
    # same gradients for every parameter and for the input, under an arbitrary downstream loss
    weights = torch.randn(6, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads = []
    for logits in (model.logits(x, w), model.naive_logits(x, w)):
        model.zero_grad()
        x.grad = None
        (logits * weights).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()] + [x.grad.clone()])
    for g_fast, g_naive in zip(*grads):
        torch.testing.assert_close(g_fast, g_naive, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind, init", FORMS)
def test_fast_head_matches_in_float32_too(kind, init):
    model = _model(kind, dim=64, dtype=torch.float32, init=init)
    x, w = _inputs(8, 30, 64, torch.float32)
    torch.testing.assert_close(model.logits(x, w), model.naive_logits(x, w), rtol=1e-4, atol=1e-4)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("kind, init", FORMS)
def test_fast_head_never_builds_a_batch_by_class_by_2d_tensor(kind, init):
    widest = 8 if kind == "bottleneck" else 48
    model = _model(kind, init=init)
    x, w = _inputs(6, 40, 48)
    with _LargestTensor() as fast:
        model.logits(x, w).sum().backward()
    with _LargestTensor() as naive:
        model.naive_logits(x, w).sum().backward()
    pairs = 6 * 40
    assert naive.largest >= pairs * 2 * 48  # the naive head does build it
    # the fast head's widest per-pair tensor is the head's hidden width (k, or d for `full`)
    assert fast.largest <= max(pairs * widest, 48 * 2 * 48)


@pytest.mark.parametrize("init", HEAD_INITS)
def test_bottleneck_head_split_into_many_blocks_equals_the_naive_formula(init, monkeypatch):
    # 256 pairs per block: 130 images x 23 classes run as 2 image blocks x 12 class blocks (last ones ragged)
    monkeypatch.setattr("aape.method.model._BLOCK_PAIRS", 256)
    model = _model("bottleneck", init=init)
    x, w = _inputs(130, 23, 48)
    x.requires_grad_(True)
    fast = model.logits(x, w)
    torch.testing.assert_close(fast, model.naive_logits(x, w), rtol=1e-10, atol=1e-10)
    fast.sum().backward()  # blocks are differentiable: training may take the same path
    fast_grad = x.grad.clone()
    x.grad = None
    model.naive_logits(x, w).sum().backward()
    torch.testing.assert_close(fast_grad, x.grad, rtol=1e-9, atol=1e-10)


def test_parameter_counts_match_the_paper_at_d512():
    counts = AAPEModel(512).parameter_counts()
    # h: 512·32 + 32 + 32·512 + 512 = 33,312 ("33k"); g bottleneck 1024·32 + 32 + 32·512 + 512 = 49,696
    assert counts["h"] == 33_312
    assert counts["g"] == 49_696
    # h + g = 83,008: the paper's "82k" (the paper rounds, or drops a bias: within 1.3%)
    assert 80_000 <= counts["total"] <= 84_000
    full = AAPEModel(512, head="full").parameter_counts()
    assert full["g"] == 1024 * 512 + 512 + 1  # + the residual form's output gain
    assert AAPEModel(512, head="full", head_init="random").parameter_counts()["g"] == 1024 * 512 + 512


def test_class_part_computed_once_gives_the_same_logits_for_every_batch():
    model = _model("bottleneck")
    x, w = _inputs(10, 7, 48)
    part = model.class_part(w)
    assert part.pre.shape == (7, 8)
    together = model.logits(x, w)
    in_pieces = torch.cat([model.logits_from(x[:3], part), model.logits_from(x[3:], part)])
    torch.testing.assert_close(together, in_pieces)


def test_logits_are_scaled_cosines_and_prompt_embedding_is_h():
    model = _model("full")
    x, w = _inputs(4, 5, 48)
    logits = model.logits(x, w)
    assert logits.abs().max() <= 50.0 + 1e-9  # |cos| <= 1 times logit_scale
    first, second = model.generator.net[0], model.generator.net[2]
    by_hand = torch.relu(x @ first.weight.T + first.bias) @ second.weight.T + second.bias  # h = W2·ReLU(W1·x + b1) + b2
    torch.testing.assert_close(model.prompt_embedding(x), by_hand)


def test_head_output_depends_on_the_image_through_h():
    # with the ReLU, h(x) re-weights the classes differently per image (docs/method.md)
    model = _model("bottleneck")
    x, w = _inputs(3, 6, 48)
    logits = model.logits(x, w)
    with torch.no_grad():
        model.generator.net[2].bias.add_(torch.randn(48, dtype=torch.float64))
    shifted = model.logits(x, w)
    assert not torch.allclose(logits - logits.mean(1, keepdim=True), shifted - shifted.mean(1, keepdim=True))


def test_wrong_embedding_size_is_refused_with_a_clear_message():
    model = _model("bottleneck")
    x, w = _inputs(2, 3, 32)
    with pytest.raises(ValueError, match="48-d embeddings"):
        model.logits(x, torch.zeros(3, 48, dtype=torch.float64))
    with pytest.raises(ValueError, match="class_text have size 32"):
        model.class_part(w)


def test_unknown_head_kind_names_the_setting():
    with pytest.raises(ValueError, match="generator.head"):
        ClassifierHead(8, kind="wide")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="generator.head_init 'warm' is unknown"):
        ClassifierHead(8, init="warm")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_untrained_default_model_is_exactly_zero_shot_clip(kind):
    # head_init "zeroshot": w_i(x) = w_i + g(...) with g's output at zero, so logits = scale·cos(x, w_i)
    model = _model(kind, init="zeroshot", trained=False)
    x, w = _inputs(9, 13, 48)
    zero_shot = 50.0 * x @ w.T  # x and w are unit vectors
    torch.testing.assert_close(model.logits(x, w), zero_shot, rtol=0, atol=1e-12)
    torch.testing.assert_close(model.naive_logits(x, w), zero_shot, rtol=0, atol=1e-12)
    # and it stays so for any image prompt h(x): the classifier only moves once g's output layer does
    with torch.no_grad():
        model.generator.net[2].bias.add_(torch.randn(48, dtype=torch.float64))
    torch.testing.assert_close(model.logits(x, w), zero_shot, rtol=0, atol=1e-12)


def test_default_head_init_is_zeroshot_and_the_literal_form_starts_elsewhere():
    assert AAPEModel(16).head.init == "zeroshot"
    literal = _model("bottleneck", init="random")
    x, w = _inputs(9, 13, 48)
    assert not torch.allclose(literal.logits(x, w), 50.0 * x @ w.T, atol=1e-3)


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_zero_shot_start_still_receives_gradients_into_g(kind):
    model = _model(kind, init="zeroshot", trained=False)
    x, w = _inputs(5, 7, 48)
    torch.nn.functional.cross_entropy(model.logits(x, w), torch.arange(5)).backward()
    output_layer = model.head.gain if kind == "full" else model.head.expand.weight
    assert output_layer.grad is not None and output_layer.grad.abs().sum() > 0


@pytest.mark.parametrize("init", HEAD_INITS)
def test_bottleneck_head_without_autograd_takes_the_in_place_blocks_and_gives_the_same_logits(init, monkeypatch):
    # evaluation runs the buffered, in-place, k-major loop; 130 images x 23 classes in blocks of 25 images x
    # 10 classes leave ragged last blocks both ways
    monkeypatch.setattr("aape.method.model._BLOCK_PAIRS", 256)
    monkeypatch.setattr("aape.method.model._BLOCK_CLASSES", 10)
    model = _model("bottleneck", init=init)
    x, w = _inputs(130, 23, 48)
    calls = []
    original = model_module._blocks_in_place
    monkeypatch.setattr(model_module, "_blocks_in_place", lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        fast = model.logits(x, w)
    assert calls, "the no-grad call did not take the in-place path"
    torch.testing.assert_close(fast, model.naive_logits(x, w).detach(), rtol=1e-10, atol=1e-10)
