"""Evaluation figures as the field reports them: percent accuracy, H, mean ± std over seeds,
and the tables, metric names and metrics.json that MLflow and DVC compare."""

import math

import pytest
import torch

from aape.evaluation.classifiers import NotApplicable, TextClassifier
from aape.evaluation.metrics import (
    MeanStd,
    accuracy,
    confusion_matrix,
    harmonic_mean,
    harmonic_mean_of_means,
    mean_std,
    per_class_accuracy,
)
from aape.evaluation.results import (
    SetOutcome,
    evaluate_set,
    flat_metrics,
    per_class_frame,
    results_frame,
    seed_metrics,
    select_eval_set,
    summarise,
)


def test_accuracy_is_a_percentage_and_undefined_on_an_empty_set():
    assert accuracy(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 2, 0])) == pytest.approx(75.0)
    assert math.isnan(accuracy(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)))


def test_per_class_accuracy_counts_each_class_and_marks_absent_ones():
    preds = torch.tensor([0, 0, 1, 1, 1])
    labels = torch.tensor([0, 1, 1, 1, 0])
    acc, correct, total = per_class_accuracy(preds, labels, num_classes=3)
    assert total.tolist() == [2, 3, 0]
    assert correct.tolist() == [1, 2, 0]
    assert acc[0] == pytest.approx(50.0) and acc[1] == pytest.approx(200 / 3)
    assert math.isnan(acc[2])


def test_confusion_matrix_rows_are_true_classes():
    cm = confusion_matrix(torch.tensor([0, 2, 2, 1]), torch.tensor([0, 0, 2, 1]), num_classes=3)
    assert cm.tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 1]]


def test_harmonic_mean_matches_the_formula_and_edge_cases():
    assert harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140)
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert math.isnan(harmonic_mean(float("nan"), 50.0))


def test_mean_std_is_population_std_and_ignores_undefined_values():
    # aape/evaluation/metrics.py (and docs/architecture.md, the report's footnote) define the spread
    # over seeds as the population std, sqrt(sum((x - mean)^2) / n), as CoOp's tables report it:
    # for 1, 2, 3 that is sqrt(2/3) = 0.816, where the sample std (n - 1) would be 1.0.
    stats = mean_std([1.0, 2.0, 3.0, float("nan")])
    assert stats.mean == pytest.approx(2.0) and stats.std == pytest.approx(math.sqrt(2 / 3)) and stats.n == 3
    assert mean_std([70.0, 72.0]).std == pytest.approx(1.0)  # sample std: 1.414
    assert mean_std([70.0]).std == 0.0
    assert math.isnan(mean_std([float("nan")]).mean)
    assert str(MeanStd(71.234, 0.5, 3)) == "71.23 ± 0.50" and str(MeanStd(71.234, 0.0, 1)) == "71.23"
    assert str(MeanStd(float("nan"), float("nan"), 0)) == "n/a"


def test_table_h_is_of_the_mean_b_and_n_and_its_spread_is_over_seed_h():
    stats = harmonic_mean_of_means([100.0, 50.0], [50.0, 100.0])
    assert stats.mean == pytest.approx(75.0)  # H(75, 75), not the mean of the per-seed H (66.7)
    assert stats.std == pytest.approx(0.0)


def test_select_eval_set_maps_global_labels_to_positions_and_drops_others():
    feats = torch.arange(6, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor([5, 6, 7, 5, 8, 9])
    chosen, local = select_eval_set(feats, labels, [7, 5])
    assert chosen.flatten().tolist() == [0.0, 2.0, 3.0]
    assert local.tolist() == [1, 0, 1]


def _outcome(method, seed, eval_set, acc, scope="base2new", dataset="toy"):
    return SetOutcome(scope, dataset, method, seed, eval_set, [0, 1], ["a", "b"], acc)


def test_seed_metrics_use_the_same_names_for_every_method():
    b2n = seed_metrics([_outcome("aape", 1, "base", 80.0), _outcome("aape", 1, "new", 60.0)])
    assert b2n == pytest.approx({"base_accuracy": 80.0, "new_accuracy": 60.0, "H": 2 * 80 * 60 / 140})
    probe = seed_metrics([_outcome("linear-probe", 1, "base", 90.0), _outcome("linear-probe", 1, "new", float("nan"))])
    assert probe == {"base_accuracy": 90.0}
    assert seed_metrics([_outcome("zeroshot", 1, "all", 42.0, scope="fewshot")]) == {"accuracy": 42.0}


def test_summary_and_metrics_json_keys():
    outcomes = [
        _outcome("aape", 1, "base", 80.0), _outcome("aape", 1, "new", 60.0),
        _outcome("aape", 2, "base", 90.0), _outcome("aape", 2, "new", 70.0),
        _outcome("linear-probe", 1, "base", 85.0), _outcome("linear-probe", 1, "new", float("nan")),
        _outcome("aape", 1, "all", 33.0, scope="cross-dataset", dataset="dtd"),
    ]
    frame = results_frame(outcomes, shots=16, backbone="x@random-init", random_init=True)
    summary = summarise(frame)
    aape = summary[("base2new", "toy", "aape")]
    assert aape["base_accuracy"].mean == pytest.approx(85.0) and aape["base_accuracy"].std == pytest.approx(5.0)
    assert aape["H"].mean == pytest.approx(harmonic_mean(85.0, 65.0))
    flat = flat_metrics(summary)
    assert flat["base2new/aape/H_mean"] == pytest.approx(round(harmonic_mean(85.0, 65.0), 4))
    assert flat["base2new/aape/new_accuracy_std"] == pytest.approx(5.0)
    assert flat["base2new/linear-probe/base_accuracy_mean"] == 85.0
    assert "base2new/linear-probe/new_accuracy_mean" not in flat and "base2new/linear-probe/H_mean" not in flat
    assert flat["cross-dataset/dtd/aape/accuracy_mean"] == 33.0


def test_evaluate_set_scores_among_the_sets_classes_and_records_per_class_rows():
    # three classes along the axes; images of class 2 look like class 0 (a confusable class)
    weights = torch.eye(3)
    classifier = TextClassifier("zeroshot", weights, logit_scale=100.0)
    feats = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0.9, 0, 0.1], [0.1, 0, 0.9]])
    labels = torch.tensor([0, 1, 2, 2])
    both = evaluate_set(classifier, feats, labels, [0, 2], ["zero", "one", "two"], scope="base2new", dataset="toy",
                        seed=1, eval_set="base", batch_size=2)
    assert both.accuracy == pytest.approx(100 * 2 / 3) and both.total == 3 and both.correct == 2
    alone = evaluate_set(classifier, feats, labels, [2], ["zero", "one", "two"], scope="base2new", dataset="toy",
                         seed=1, eval_set="new", batch_size=2)
    assert alone.accuracy == 100.0  # among itself, class 2 cannot be confused with class 0
    rows = per_class_frame([both])
    assert rows.set_index("class_name")["accuracy"].to_dict() == pytest.approx({"zero": 100.0, "two": 50.0})
    assert rows["class_index"].tolist() == [0, 2]


def test_a_method_that_cannot_score_a_set_is_reported_not_applicable():
    class Refuses:
        name = "linear-probe"

        def logits(self, features, classes):
            raise NotApplicable("never saw these classes")

    outcome = evaluate_set(Refuses(), torch.eye(2), torch.tensor([0, 1]), [0, 1], ["a", "b"], scope="base2new",
                           dataset="toy", seed=1, eval_set="new", batch_size=4)
    assert not outcome.applicable and "never saw" in outcome.note
    frame = results_frame([outcome], shots=4, backbone="b", random_init=False)
    assert math.isnan(frame.loc[0, "accuracy"]) and frame.loc[0, "note"] == "never saw these classes"
    assert per_class_frame([outcome]).empty
    row = frame.loc[0, ["scope", "dataset", "method", "seed", "eval_set", "correct", "total", "num_classes", "shots", "backbone", "random_init"]]
    assert row.tolist() == ["base2new", "toy", "linear-probe", 1, "new", 0, 0, 2, 4, "b", False]  # nothing scored, not zeros guessed
