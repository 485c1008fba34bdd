"""Retrieval with AAPE (aape/retrieval/training.py): per-image aggregation of an image's own
captions, h trained with the CLIP loss (+ distillation), the untrained query equal to zero-shot CLIP."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aape.config import ScheduleConfig
from aape.method.aggregator import AttentionAggregator
from aape.method.objectives import TrainingSet, train_aggregator
from aape.method.training import fit
from aape.retrieval.training import (
    RetrievalObjective,
    RetrievalQuery,
    RetrievalSet,
    caption_bank,
    clip_loss,
    retrieval_recall,
)

D = 64
pytestmark = pytest.mark.usefixtures("single_torch_thread")


def world(n: int, seed: int, captions: int = 5, irrelevant: bool = False) -> RetrievalSet:
    """Images and their captions in two cones (the modality gap), the caption side a partly rotated
    copy of the image content (what a learnt query can correct); optionally the last caption of each
    image is boilerplate shared by all ("a photo of something")."""
    fixed, g = torch.Generator().manual_seed(0), torch.Generator().manual_seed(seed)
    mu_image, mu_text, boiler = (F.normalize(torch.randn(D, generator=fixed), dim=0) for _ in range(3))
    rotation = torch.linalg.qr(torch.randn(D, D, generator=fixed))[0]
    content = F.normalize(torch.randn(n, D, generator=g), dim=-1)

    def embed(mu, v):
        return F.normalize(0.6 * mu + 0.8 * F.normalize(v, dim=-1), dim=-1)

    views = torch.stack([embed(mu_image, content + 0.5 * torch.randn(n, D, generator=g) / D**0.5) for _ in range(2)], 1)
    text = 0.6 * content + 0.4 * content @ rotation.T
    caps = embed(mu_text, text.unsqueeze(1) + 0.9 * torch.randn(n, captions, D, generator=g) / D**0.5)
    if irrelevant:
        caps[:, -1] = embed(mu_text, boiler + 0.3 * torch.randn(n, D, generator=g) / D**0.5)
    return RetrievalSet(views, caps, torch.full((n,), captions))


def schedule(epochs: int) -> ScheduleConfig:
    return ScheduleConfig(optimizer="adamw", lr=1e-3, weight_decay=1e-4, epochs=epochs, warmup_epochs=0, batch_size=32)


def test_the_untrained_residual_query_is_zero_shot_clip():
    test = world(50, 3)
    model = RetrievalQuery(D)
    x = test.views[:, 0]
    assert torch.equal(model.query(x), F.normalize(x, dim=-1))
    assert retrieval_recall(model, test) == retrieval_recall(None, test)


def test_clip_loss_is_symmetric_cross_entropy_over_the_batch():
    q = F.normalize(torch.randn(4, D), dim=-1)
    c = F.normalize(torch.randn(4, D), dim=-1)
    logits = 100 * q @ c.T
    expected = 0.5 * (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4)))
    assert clip_loss(q, c, 100.0).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("lam", [0.0, 5.0])
def test_training_the_query_raises_recall_above_zero_shot(lam):
    train, val, test = world(600, 1), world(100, 2), world(200, 3)
    if lam:  # the image's caption mean as its summary: what a uniform aggregator gives
        train.summaries = F.normalize(train.captions.mean(1), dim=-1).unsqueeze(1).expand(-1, 2, -1).contiguous()
    model = RetrievalQuery(D)
    before = retrieval_recall(model, test)
    result = fit(model, RetrievalObjective(train, val, lam, 100.0, seed=1), n_items=600, n_views=2, schedule=schedule(20),
                 epochs=20, seed=1)
    after = retrieval_recall(model, test)
    assert after["rsum"] > before["rsum"] + 30 and after["i2t_R@1"] > before["i2t_R@1"] + 10
    assert result.history[-1]["val_rsum"] > result.initial["val_rsum"]
    if lam:
        assert result.history[-1]["train_distill"] < result.history[0]["train_distill"]


def test_distillation_needs_summaries():
    with pytest.raises(ValueError, match="summaries"):
        RetrievalObjective(world(10, 1), world(5, 2), 5.0, 100.0, seed=1)


def test_the_per_image_aggregator_gives_an_irrelevant_caption_less_weight():
    """The classification aggregator on a bank whose "classes" are images summarises each image's own captions."""
    train, val = world(300, 1, irrelevant=True), world(60, 2, irrelevant=True)
    n_train = len(train.counts)
    bank = caption_bank(torch.cat([train.captions, val.captions]), torch.cat([train.counts, val.counts]))
    data = TrainingSet(train.views, torch.arange(n_train), val.views[:, 0], torch.arange(n_train, n_train + len(val.counts)))
    torch.manual_seed(0)
    aggregator = AttentionAggregator(D, heads=2)
    P, mask = bank.gather(data.val_labels)

    def mean_weights() -> tuple[float, float]:
        with torch.no_grad():
            weights = aggregator.description_weights(data.val_features, P, mask)
        return weights[:, :-1].mean().item(), weights[:, -1].mean().item()

    relevant, boilerplate = mean_weights()
    assert boilerplate == pytest.approx(relevant, abs=0.02)  # untrained: near uniform over the 5 captions
    train_aggregator(aggregator, data, bank, schedule(15), epochs=15, seed=1)
    relevant, boilerplate = mean_weights()
    assert boilerplate < 0.1 * relevant  # measured: 0.0017 vs 0.25
