"""Baselines computed from cached feature tensors, checked on synthetic embeddings with a known
structure: class centroids, images near their centroid, text near (or far from) the centroid."""

import math

import pytest
import torch
import torch.nn.functional as F

from aape.evaluation.classifiers import (
    CSearch,
    EvaluationError,
    ModelClassifier,
    NotApplicable,
    cupl,
    cupl_class_embeddings,
    _fit_logistic,
    log_scale_search,
    predict_in_batches,
    train_linear_probe,
    zeroshot,
    zeroshot_ensemble,
)
from aape.evaluation.metrics import accuracy

D, C = 32, 6


def _world(seed=0, per_class=20, noise=0.35):
    g = torch.Generator().manual_seed(seed)
    centroids = F.normalize(torch.randn(C, D, generator=g), dim=-1)
    labels = torch.arange(C).repeat_interleave(per_class)
    images = F.normalize(centroids[labels] + noise / D**0.5 * torch.randn(len(labels), D, generator=g), dim=-1)
    return g, centroids, images, labels


def test_zeroshot_is_scaled_cosine_and_follows_the_class_text():
    g, centroids, images, labels = _world()
    prompts = F.normalize(centroids + 0.1 * torch.randn(C, D, generator=g), dim=-1)
    clf = zeroshot(prompts, logit_scale=100.0)
    logits = clf.logits(images[:3], [0, 1, 2, 3, 4, 5])
    assert torch.allclose(logits, 100.0 * images[:3] @ prompts.T, atol=1e-5)
    assert accuracy(predict_in_batches(clf, images, range(C), 7), labels) > 95.0
    # swapping two classes' text swaps their predictions: the classifier only knows what the text says
    swapped = prompts[[1, 0, 2, 3, 4, 5]]
    preds = predict_in_batches(zeroshot(swapped, 100.0), images, range(C), 64)
    assert (preds[labels == 0] == 1).float().mean() > 0.9


def test_ensemble_rows_are_renormalised():
    clf = zeroshot_ensemble(3.0 * torch.eye(4), logit_scale=1.0)
    assert torch.allclose(clf.class_weights.norm(dim=-1), torch.ones(4))


def test_cupl_is_the_renormalised_mean_of_each_class_descriptions():
    g, centroids, images, labels = _world()
    desc_class = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 5])
    desc = F.normalize(torch.randn(len(desc_class), D, generator=g), dim=-1)
    weights = cupl_class_embeddings(desc, desc_class, C)
    expected = F.normalize(desc[desc_class == 2].mean(0), dim=0)
    assert torch.allclose(weights[2], expected, atol=1e-6)
    perm = torch.randperm(len(desc_class), generator=g)
    assert torch.allclose(cupl_class_embeddings(desc[perm], desc_class[perm], C), weights, atol=1e-6)


def test_cupl_beats_a_single_noisy_description_when_descriptions_are_relevant():
    g, centroids, images, labels = _world(noise=1.0)
    per_class = 12
    desc_class = torch.arange(C).repeat_interleave(per_class)
    desc = F.normalize(centroids[desc_class] + 3.0 / D**0.5 * torch.randn(len(desc_class), D, generator=g), dim=-1)
    mean_acc = accuracy(predict_in_batches(cupl(desc, desc_class, C, 100.0), images, range(C), 64), labels)
    first = zeroshot(desc[::per_class], 100.0)
    single_acc = accuracy(predict_in_batches(first, images, range(C), 64), labels)
    assert mean_acc > single_acc + 10.0, (mean_acc, single_acc)


def test_cupl_names_classes_without_descriptions():
    desc_class = torch.tensor([0, 2])
    with pytest.raises(EvaluationError, match="none exist for: dog"):
        cupl_class_embeddings(torch.eye(2, D), desc_class, 3, classnames=["cat", "dog", "bird"])


def test_linear_probe_learns_from_the_shots_even_when_text_is_useless():
    g, centroids, images, labels = _world(seed=1, per_class=30, noise=0.6)
    train = torch.arange(len(labels)) % 30 < 16
    val = (torch.arange(len(labels)) % 30 >= 16) & (torch.arange(len(labels)) % 30 < 20)
    test = torch.arange(len(labels)) % 30 >= 20
    probe = train_linear_probe(images[train], labels[train], images[val], labels[val], CSearch(0.01, 100.0, 3, 0))
    assert probe.trained_classes == list(range(C)) and probe.regularisation_c in (0.01, 1.0, 100.0)
    assert probe.fits == 3 and [c for c, _, _ in probe.trials] == [0.01, 1.0, 100.0]
    test_acc = accuracy(predict_in_batches(probe, images[test], range(C), 64), labels[test])
    useless_text = F.normalize(torch.randn(C, D, generator=g), dim=-1)
    text_acc = accuracy(predict_in_batches(zeroshot(useless_text, 100.0), images[test], range(C), 64), labels[test])
    assert test_acc > 80.0 and test_acc > text_acc + 30.0
    # the validation accuracy it reports is that of the probe it returns
    val_acc = accuracy(predict_in_batches(probe, images[val], range(C), 64), labels[val])
    assert val_acc == pytest.approx(probe.val_accuracy)


def test_linear_probe_is_deterministic_and_scores_subsets_in_order():
    _, _, images, labels = _world(seed=2)
    search = CSearch(1e-2, 1e2, 5, 2)  # warm-started fits along the search: still the same every time
    a = train_linear_probe(images, labels, images[:12], labels[:12], search)
    b = train_linear_probe(images, labels, images[:12], labels[:12], search)
    assert torch.equal(a.weights, b.weights) and torch.equal(a.bias, b.bias)
    assert a.regularisation_c == b.regularisation_c and a.trials == b.trials
    full = a.logits(images[:4], list(range(C)))
    subset = a.logits(images[:4], [4, 1])
    assert torch.allclose(subset, full[:, [4, 1]])


def test_linear_probe_refuses_classes_it_never_saw():
    _, _, images, labels = _world(seed=3)
    base = labels < 3
    probe = train_linear_probe(images[base], labels[base], images[base][:6], labels[base][:6], CSearch(0.1, 10.0, 2, 0))
    with pytest.raises(NotApplicable, match="never saw"):
        probe.logits(images[:2], [3, 4, 5])


def test_linear_probe_handles_two_classes():
    _, _, images, labels = _world(seed=4)
    two = labels < 2
    probe = train_linear_probe(images[two], labels[two], images[two], labels[two], CSearch(1.0, 100.0, 2, 1))
    assert probe.weights.shape == (2, D)
    assert accuracy(predict_in_batches(probe, images[two], [0, 1], 8), labels[two]) > 90.0


def test_model_classifier_hands_the_model_the_text_of_the_requested_classes_in_order():
    seen = {}

    class Model:
        def logits(self, image_feats, class_text):
            seen["text"] = class_text
            return image_feats @ class_text.T

    text = torch.eye(4)
    clf = ModelClassifier("aape", Model(), text)
    out = clf.logits(torch.tensor([[0.0, 0.0, 1.0, 0.0]]), [3, 2])
    assert torch.equal(seen["text"], text[[3, 2]]) and out.argmax().item() == 1


def test_linear_probe_minimises_the_same_objective_as_sklearn():
    from sklearn.linear_model import LogisticRegression

    _, _, images, labels = _world(seed=5, noise=1.0)
    probe = train_linear_probe(images, labels, images[:0], labels[:0], CSearch(1.0, 100.0, 3, 4))  # no val: middle C
    assert probe.regularisation_c == pytest.approx(10.0) and probe.fits == 1 and math.isnan(probe.val_accuracy)
    reference = LogisticRegression(C=10.0, max_iter=5000, tol=1e-10).fit(images.double().numpy(), labels.numpy())
    expected = torch.from_numpy(reference.predict_proba(images.double().numpy())).float()
    ours = probe.logits(images, list(range(C))).softmax(-1)
    assert torch.allclose(ours, expected, atol=2e-3)
    assert torch.allclose(probe.weights, torch.from_numpy(reference.coef_).float(), atol=2e-2)


# the linear probe's C search -------------------------------------------------------------------


def test_c_search_defaults_follow_clip_and_coop():
    search = CSearch()
    assert (search.low, search.high, search.coarse_points, search.refine_steps) == (1e-6, 1e6, 13, 4)
    assert search.spacing == pytest.approx(1.0)  # every power of ten (CoOp's lpclip: every second one)
    assert search.resolution == pytest.approx(10 ** (1 / 16)) and search.middle == pytest.approx(1.0)


# fits: 13 coarse + 2 per refinement step, fewer while the best sits at the end of the range (5.9)
@pytest.mark.parametrize(("peak_exponent", "fits"), [(2.37, 21), (-3.81, 21), (0.5, 21), (5.9, 18)])
def test_c_search_finds_a_single_peak_within_the_resolution(peak_exponent, fits):
    search = CSearch()
    tried = []

    def score(c):
        tried.append(c)
        return (-(math.log10(c) - peak_exponent) ** 2,)

    best, scores = log_scale_search(score, search)
    assert abs(math.log10(best) - peak_exponent) <= math.log10(search.resolution) + 1e-9
    assert list(scores) == tried and len(set(tried)) == len(tried)  # every C scored once, in order
    assert tried[:13] == pytest.approx([10.0**e for e in range(-6, 7)])  # the coarse pass: powers of ten
    assert len(tried) == fits


def test_c_search_ties_go_to_the_smaller_c_and_stay_in_the_range():
    best, scores = log_scale_search(lambda c: (1.0,), CSearch(1e-2, 1e2, 5, 3))
    assert best == pytest.approx(1e-2)
    assert min(scores) == pytest.approx(1e-2) and max(scores) == pytest.approx(1e2)
    assert len(scores) == 5 + 3  # at the low end only the C above it can be tried
    # a tie between accuracies is broken by the next element of the score (the probe's -cross-entropy)
    best, _ = log_scale_search(lambda c: (50.0, -abs(math.log10(c) - 1.2)), CSearch(1e-2, 1e2, 5, 3))
    assert abs(math.log10(best) - 1.2) <= 1 / 8 + 1e-9


def test_c_search_refuses_a_bad_range():
    with pytest.raises(EvaluationError, match="0 < low < high"):
        CSearch(1.0, 1.0)
    with pytest.raises(EvaluationError, match=">= 2 coarse points"):
        CSearch(1e-3, 1e3, 1, 2)


def test_linear_probe_search_matches_a_dense_sweep_when_the_best_c_is_inside_the_range(caplog):
    """Few noisy shots: a large C over-fits, a tiny one under-fits, so the best C on validation lies
    inside the range; a dense sweep (CLIP's paper swept 96 values) locates it independently."""
    images, labels = _world(seed=1, per_class=40, noise=1.5)[2:]
    train = torch.arange(len(labels)) % 40 < 4
    search = CSearch(1e-4, 1e2, 7, 4)
    with caplog.at_level("INFO", logger="aape.evaluation.classifiers"):
        probe = train_linear_probe(images[train], labels[train], images[~train], labels[~train], search)
    x, y = images[train].double(), labels[train]
    xv, yv = images[~train].double(), labels[~train]
    dense = []
    for i in range(61):  # every 0.1 decade, each fitted from zero
        c = 10 ** (-4 + 6 * i / 60)
        w, b = _fit_logistic(x, y, C, c, 300)
        logits = xv @ w.T + b
        dense.append((100.0 * (logits.argmax(-1) == yv).double().mean().item(), -F.cross_entropy(logits, yv).item(), c))
    best_acc, _, best_c = max(dense, key=lambda t: (t[0], t[1], -t[2]))
    assert 1e-4 < best_c < 1e2 and best_acc > max(d[0] for d in dense if d[2] in (dense[0][2], dense[-1][2]))
    assert probe.val_accuracy == pytest.approx(best_acc)
    assert abs(math.log10(probe.regularisation_c / best_c)) <= math.log10(search.resolution) + 0.05
    assert probe.fits == 7 + 2 * 4 == len(probe.trials)
    chosen = [t for t in probe.trials if t[0] == probe.regularisation_c]
    assert chosen == [(probe.regularisation_c, probe.val_accuracy, probe.val_loss)]
    assert f"C={probe.regularisation_c:.4g} chosen on validation" in caplog.text and "after 15 fits" in caplog.text
