"""The prompt aggregator on synthetic embeddings with a known structure (aape.method.synthetic):
each class has 4 descriptions near its centroid and 12 in random directions, shuffled."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from aape.config import ScheduleConfig
from aape.method import (
    DescriptionBank,
    MissingDescriptionsError,
    NoAttentionError,
    build_aggregator,
    load_aggregator,
    save_aggregator,
    seeded,
    train_aggregator,
)
from aape.method.synthetic import make_world


pytestmark = pytest.mark.usefixtures("single_torch_thread")


# CoOp's schedule with a larger step: the test world has 40 images (5 batches an epoch), so 20
# epochs are 100 steps; at lr 0.002 the attention only starts to move in that budget.
FAST = ScheduleConfig(lr=0.1, epochs=20, batch_size=8)


@pytest.fixture(scope="module")
def world():
    return make_world(seed=0)


@pytest.fixture(scope="module")
def trained(world):
    with seeded(1):
        aggregator = build_aggregator("attention", 64, heads=4)
    result = train_aggregator(aggregator, world.data, world.bank, FAST, FAST.epochs, seed=1)
    return aggregator, result


def _relevant_mass(aggregator, world) -> torch.Tensor:
    """Attention mass on the relevant descriptions, per validation image."""
    masses = []
    for c in range(len(world.bank)):
        x = world.data.val_features[world.data.val_labels == c]
        weights = aggregator.attention_weights(x, world.bank.embeddings[c])
        masses.append(weights[:, world.relevant_mask[c]].sum(-1))
    return torch.cat(masses)


def test_trained_attention_concentrates_on_the_relevant_descriptions(world, trained):
    aggregator, _ = trained
    mass = _relevant_mass(aggregator, world)
    chance = world.relevant_mask.float().mean().item()  # 4 of 16 = 0.25 under uniform attention
    assert chance == 0.25
    # Threshold 0.75 = three times chance, i.e. "most of the attention": the relevant descriptions are
    # the only ones with a positive expected cosine to the image, so the reward's optimum puts all the
    # mass there; 0.75 leaves margin for the short training while failing any uniform-ish attention.
    assert mass.mean() > 0.75
    assert (mass > 0.5).float().mean() >= 0.9  # and it holds image by image, not only on average


def test_untrained_attention_is_spread_out(world):
    with seeded(1):
        aggregator = build_aggregator("attention", 64, heads=4)
    mass = _relevant_mass(aggregator, world)
    assert 0.1 < mass.mean() < 0.45  # near chance (0.25): the concentration above is learnt


def test_summary_is_closer_to_the_class_centroid_than_the_plain_mean(world, trained):
    aggregator, result = trained
    x, labels = world.data.val_features, world.data.val_labels
    summary = aggregator.summarize(x, world.bank, labels)
    mean = world.bank.class_means()[labels]
    centroid = world.centroids[labels]
    cos_summary = F.cosine_similarity(summary, centroid).mean()
    cos_mean = F.cosine_similarity(mean, centroid).mean()
    assert cos_summary > cos_mean + 0.1
    # and the reward it was trained for went up on validation
    assert result.history[-1]["val_reward"] > result.history[0]["val_reward"] + 0.1


def test_output_does_not_depend_on_description_order(world, trained):
    aggregator, _ = trained
    x, labels = world.data.val_features[:8], world.data.val_labels[:8]
    P, mask = world.bank.gather(labels)
    perm = torch.randperm(P.shape[1], generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(aggregator(x, P, mask), aggregator(x, P[:, perm], mask[:, perm]))
    weights = aggregator.attention_weights(x[:2], world.bank.embeddings[0])
    permuted = aggregator.attention_weights(x[:2], world.bank.embeddings[0][perm])
    torch.testing.assert_close(weights[:, perm], permuted)


@pytest.mark.parametrize("variant", ["attention", "literal", "mean", "mlp"])
def test_padding_never_changes_the_summary(world, variant):
    with seeded(2):
        aggregator = build_aggregator(variant, 64, heads=4)
    x, P = world.data.val_features[:3], world.bank.embeddings[:3]
    mask = torch.ones(P.shape[:2], dtype=torch.bool)
    padded = torch.cat([P, torch.randn(3, 5, 64)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(3, 5, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(aggregator(x, P, mask), aggregator(x, padded, padded_mask))


def test_attention_weights_follow_the_multi_head_formula(world):
    with seeded(4):
        aggregator = build_aggregator("attention", 64, heads=4)
        torch.nn.init.normal_(aggregator.ff[2].weight, std=0.05)  # exercise the feed-forward too
    x, P = world.data.val_features[:3], world.bank.embeddings[2]
    a = aggregator
    mean = F.normalize(P.mean(0), dim=-1)
    u = mean + a.summary_offset + x
    u = u + a.ff(a.norm_ff(u))
    q = a.query(a.norm_query(u)).view(3, 4, 16)
    k = a.key(a.norm_context(P)).view(-1, 4, 16)  # the textbook way: project every description
    expected = torch.softmax(torch.einsum("bhe,nhe->bhn", q, k) / math.sqrt(16), dim=-1).mean(1)
    torch.testing.assert_close(a.attention_weights(x, P), expected)
    summary = F.normalize(mean + a.log_gain.exp() * expected @ P, dim=-1)
    torch.testing.assert_close(a(x, P.expand(3, -1, -1)), summary)


def test_image_conditioning_matters_and_literal_ignores_the_image(world):
    x, labels = world.data.val_features[:4], torch.zeros(4, dtype=torch.long)  # 4 images, one class
    with seeded(5):
        conditioned = build_aggregator("attention", 64, heads=4)
        literal = build_aggregator("literal", 64, heads=4)
    per_image = conditioned.summarize(x, world.bank, labels)
    assert (per_image - per_image[0]).abs().max() > 1e-4
    same = literal.summarize(x, world.bank, labels)
    torch.testing.assert_close(same, same[:1].expand(4, -1))
    weights = literal.attention_weights(x, world.bank.embeddings[0])
    assert weights.shape == (4, 16) and bool((weights.sum(-1) < 1).all())  # the token's own share is left out


def test_summary_stays_a_combination_of_the_descriptions(world, trained):
    # anchored: p^a lies in the span of the class's descriptions whatever the image
    aggregator, _ = trained
    x = F.normalize(torch.randn(5, 64, generator=torch.Generator().manual_seed(6)), dim=-1)
    P = world.bank.embeddings[1]
    summary = aggregator(x, P.expand(5, -1, -1))
    coeffs = torch.linalg.lstsq(P.T, summary.T).solution
    torch.testing.assert_close(P.T @ coeffs, summary.T, atol=1e-4, rtol=1e-4)


def test_mean_is_cupl_and_has_no_attention(world):
    aggregator = build_aggregator("mean", 64)
    labels = world.data.val_labels
    torch.testing.assert_close(aggregator.summarize(world.data.val_features, world.bank, labels), world.bank.class_means()[labels])
    assert not aggregator.trainable
    with pytest.raises(NoAttentionError, match="'mean' has no attention"):
        aggregator.attention_weights(world.data.val_features[:1], world.bank.embeddings[0])


def test_mlp_mixes_a_learnt_map_of_the_mean_with_the_mean(world):
    with seeded(0):
        aggregator = build_aggregator("mlp", 64, mlp_hidden=8, mlp_alpha=0.2)
    P = world.bank.embeddings[:2]
    mean = F.normalize(P.mean(1), dim=-1)
    expected = F.normalize(0.2 * aggregator.f(mean) + 0.8 * mean, dim=-1)
    torch.testing.assert_close(aggregator(world.data.val_features[:2], P), expected)
    assert sum(p.numel() for p in aggregator.parameters()) == 64 * 8 + 8 + 8 * 64 + 64 + 1  # f, and α


def test_mlp_alpha_is_learnt_as_in_the_paper(world):
    with seeded(0):
        aggregator = build_aggregator("mlp", 64, mlp_hidden=8, mlp_alpha=0.2)
    assert float(aggregator.alpha.detach()) == pytest.approx(0.2)
    P = world.bank.embeddings[:4]
    x = world.data.val_features[:4]
    aggregator(x, P).sum().backward()
    assert aggregator.alpha_logit.grad is not None and aggregator.alpha_logit.grad.abs() > 0
    with pytest.raises(ValueError, match="mlp_alpha=1.0 must lie strictly between 0 and 1"):
        build_aggregator("mlp", 64, mlp_alpha=1.0)


def test_random_picks_one_real_description_reproducibly(world):
    P = torch.cat([world.bank.embeddings[:2, :3], torch.full((2, 4, 64), 7.0)], dim=1)  # 3 real + padding
    mask = torch.tensor([[True] * 3 + [False] * 4] * 2)
    x = world.data.val_features[:2]
    first = build_aggregator("random", 64, seed=9)(x.repeat(50, 1), P.repeat(50, 1, 1), mask.repeat(50, 1))
    again = build_aggregator("random", 64, seed=9)(x.repeat(50, 1), P.repeat(50, 1, 1), mask.repeat(50, 1))
    torch.testing.assert_close(first, again)
    real = F.normalize(P[:, :3], dim=-1).repeat(50, 1, 1)
    matches = ((first.unsqueeze(1) - real).abs().amax(-1) < 1e-6).sum(-1)
    assert bool((matches == 1).all())  # every pick is exactly one real description, never padding


def test_bank_groups_flat_descriptions_in_row_order_with_a_cap():
    flat = torch.arange(6 * 2, dtype=torch.float32).view(6, 2)
    owner = torch.tensor([7, 3, 7, 7, 3, 7])
    bank = DescriptionBank.from_flat(flat, owner, classes=[3, 7], max_per_class=3)
    assert bank.counts.tolist() == [2, 3]
    torch.testing.assert_close(bank.embeddings[0, :2], flat[[1, 4]])
    torch.testing.assert_close(bank.embeddings[1], flat[[0, 2, 3]])
    assert bank.mask.tolist() == [[True, True, False], [True, True, True]]


def test_a_class_without_descriptions_is_named():
    with pytest.raises(MissingDescriptionsError, match=r"2 \(cat\).*generate-prompts"):
        DescriptionBank.from_flat(torch.zeros(2, 4), torch.tensor([0, 1]), [0, 1, 2], ["ant", "bee", "cat"])


def test_heads_must_divide_the_embedding_size():
    with pytest.raises(ValueError, match="aggregator.heads=5"):
        build_aggregator("attention", 64, heads=5)


@pytest.mark.parametrize("variant", ["attention", "literal", "mlp", "mean", "random"])
def test_checkpoint_round_trip_gives_the_same_summaries(tmp_path, world, variant):
    with seeded(3):
        aggregator = build_aggregator(variant, 64, heads=4, mlp_hidden=8, seed=5)
        for p in aggregator.parameters():
            p.data.add_(0.01 * torch.randn_like(p))
    save_aggregator(aggregator, tmp_path, {"backbone_identity": "tiny@x", "embed_dim": 64, "seed": 5})
    loaded = load_aggregator(tmp_path, expect_identity="tiny@x", expect_embed_dim=64)
    assert loaded.variant == variant and loaded.meta["param_count"] == sum(p.numel() for p in aggregator.parameters())
    x, labels = world.data.val_features[:6], world.data.val_labels[:6]
    if variant == "random":  # same seed, same draws
        aggregator = build_aggregator("random", 64, seed=5)
    torch.testing.assert_close(loaded.summarize(x, world.bank, labels), aggregator.summarize(x, world.bank, labels))
