"""The report a person reads and the figures beside it, from synthetic results."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from aape.config import DEFAULT_EVAL_METHODS as EVAL_METHODS
from aape.evaluation import plots
from aape.evaluation.metrics import MeanStd
from aape.evaluation.report import RANDOM_INIT_WARNING, ReportContext, render_report


def _summary(protocol="base2new", dataset="eurosat"):
    summary = {}
    for i, method in enumerate(EVAL_METHODS):
        if protocol == "base2new":
            new = MeanStd(float("nan"), float("nan"), 0) if method == "linear-probe" else MeanStd(60.0 + i, 0.5, 3)
            summary[(protocol, dataset, method)] = {"base_accuracy": MeanStd(70.0 + i, 1.0, 3), "new_accuracy": new,
                                                    "H": MeanStd(65.0 + i, 0.7, 3)}
        else:
            summary[(protocol, dataset, method)] = {"accuracy": MeanStd(50.0 + i, 2.0, 3)}
    return summary


def _context(**overrides):
    values = dict(dataset="eurosat", protocol="base2new", shots=16, seeds=[1, 2, 3], backbone_model="ViT-B-32",
                  pretrained="random-init", identity="ViT-B-32@random-init", random_init=True,
                  methods=list(EVAL_METHODS), summary=_summary(),
                  notes={("base2new", "eurosat", "linear-probe", "new"): "a linear probe has no weights for the 5 class(es) it never saw in training"})
    values.update(overrides)
    return ReportContext(**values)


def test_random_weights_are_announced_in_bold_before_anything_else():
    text = render_report(_context())
    assert text.startswith(RANDOM_INIT_WARNING) and text.startswith("**RANDOM-INIT")
    trained = render_report(_context(random_init=False, pretrained="laion2b_s34b_b79k", identity="x"))
    assert "RANDOM-INIT" not in trained


def test_base_to_new_table_has_every_method_with_base_new_h():
    text = render_report(_context())
    assert "| Method | Base | New | H |" in text
    for title in ("CLIP zero-shot", "template ensemble", "CuPL", "Linear probe", "AAPE without distillation", "| AAPE |"):
        assert title in text
    assert "| AAPE | 75.00 ± 1.00 | 65.00 ± 0.50 | 70.00 ± 0.70 |" in text
    assert "| Linear probe (same shots) | 73.00 ± 1.00 | n/a |" in text
    assert "never saw in training" in text  # why it is n/a


def test_reference_numbers_only_beside_vit_b16_openai():
    other = render_report(_context())
    assert "80.97" not in other and "not shown" in other
    paper = render_report(_context(backbone_model="ViT-B-16", pretrained="openai", random_init=False))
    assert "paper H*" in paper and "80.97" in paper and "71.70" in paper
    aape_row = next(line for line in paper.splitlines() if line.startswith("| AAPE |"))
    assert aape_row.endswith("| > 84 | > 76 | 80.97 |")


def test_fewshot_and_transfer_tables():
    summary = _summary("fewshot")
    summary[("cross-dataset", "dtd", "aape")] = {"accuracy": MeanStd(41.0, 1.5, 3)}
    summary[("cross-dataset", "dtd", "zeroshot")] = {"accuracy": MeanStd(40.0, 0.0, 3)}
    summary[("cross-dataset", "eurosat", "aape")] = {"accuracy": MeanStd(30.0, 1.0, 3)}
    text = render_report(_context(protocol="fewshot", summary=summary, notes={}))
    assert "| Method | Accuracy |" in text and "| AAPE | 55.00 ± 2.00 |" in text
    assert "## Cross-dataset transfer" in text and "| Method | dtd | eurosat |" in text
    assert "| AAPE | 41.00 ± 1.50 | 30.00 ± 1.00 |" in text
    assert "## Domain shift" not in text


def test_plots_are_listed_with_relative_links():
    text = render_report(_context(plots=[("Confusion matrix: AAPE", "plots/confusion_aape_base.png")]))
    assert "![Confusion matrix: AAPE](plots/confusion_aape_base.png)" in text


def _png(path):
    """(width, height) and the RGB pixels of a written figure."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size, np.asarray(image.convert("RGB"), dtype=float)


def _assert_drawn(path, height_in: float):
    """A real figure: about `height_in` inches tall at the plots' DPI (the tight bounding box trims
    or adds a little), and not blank: its pixels vary and some of them carry ink."""
    (width, height), pixels = _png(path)
    assert abs(height - height_in * plots._DPI) <= 0.15 * height_in * plots._DPI, (width, height)
    assert width > 2 * plots._DPI
    assert pixels.std() > 10, "a blank (one-colour) image"
    assert (pixels < 200).any(axis=-1).mean() > 0.005, "nothing drawn on the canvas"
    return pixels


def test_accuracy_vs_shots_says_when_there_is_no_curve(tmp_path):
    single = pd.DataFrame({"method": ["aape", "zeroshot"], "shots": [16, 16], "mean": [70.0, 60.0], "std": [1.0, 0.0]})
    path, remark = plots.accuracy_vs_shots(single, "H (%)", tmp_path / "shots.png", "eurosat")
    _assert_drawn(path, height_in=4.2)
    assert "only 16 shots" in remark
    curve = pd.DataFrame({"method": ["aape"] * 3, "shots": [1, 4, 16], "mean": [50.0, 60.0, 70.0], "std": [1.0] * 3})
    _, remark = plots.accuracy_vs_shots(curve, "H (%)", tmp_path / "curve.png", "eurosat")
    assert "3 shot counts: 1, 4, 16" in remark


def test_per_class_bars_and_confusion(tmp_path):
    per_class = pd.DataFrame({
        "method": ["zeroshot", "aape"] * 3, "class_name": ["a", "a", "b", "b", "c", "c"],
        "accuracy": [10.0, 90.0, 50.0, 60.0, 70.0, 20.0],
    })
    _assert_drawn(plots.per_class_bars(per_class, ["zeroshot", "aape"], tmp_path / "bars.png", "t"), height_in=2.5)
    many = pd.DataFrame({"method": ["zeroshot", "aape"] * 30, "class_name": [f"class {i // 2}" for i in range(60)],
                         "accuracy": np.linspace(0.0, 100.0, 60)})  # fmt: skip
    bars_3, bars_30 = _png(tmp_path / "bars.png")[0], _png(plots.per_class_bars(many, ["zeroshot", "aape"], tmp_path / "bars30.png", "t"))[0]
    assert bars_30[1] > 2 * bars_3[1], "the bar chart grows with the number of classes"

    matrix = np.diag([5, 4, 3]) + np.array([[0, 1, 0], [0, 0, 2], [0, 0, 0]])
    path, remark = plots.confusion(matrix, ["a", "b", "c"], tmp_path / "cm.png", "t", max_classes=50)
    assert remark == ""
    drawn = _assert_drawn(path, height_in=4.0)
    # the figure shows the matrix: other counts, same classes and size, give other pixels
    swapped, _ = plots.confusion(matrix[::-1].copy(), ["a", "b", "c"], tmp_path / "cm_swapped.png", "t", max_classes=50)
    other = _assert_drawn(swapped, height_in=4.0)
    assert other.shape == drawn.shape and np.abs(other - drawn).mean() > 1.0
    again, _ = plots.confusion(matrix, ["a", "b", "c"], tmp_path / "cm_again.png", "t", max_classes=50)
    assert np.array_equal(_png(again)[1], drawn)  # and the same counts the same pixels
    big = np.eye(60, dtype=int) * 5
    big[3, 4] = big[10, 2] = 7
    _, remark = plots.confusion(big, [f"c{i}" for i in range(60)], tmp_path / "cm_big.png", "t", max_classes=10)
    assert "10 most-confused of 60" in remark


def test_attention_figure(tmp_path):
    weights = np.random.default_rng(0).dirichlet(np.ones(7), size=3)
    path = plots.attention_over_descriptions(weights, [f"description {i}" for i in range(7)], ["img a", "img b", "img c"],
                                             tmp_path / "att.png", "attention")
    drawn = _assert_drawn(path, height_in=1.5 + 0.5 * 3 + 0.09 * 7)
    reordered = plots.attention_over_descriptions(weights[:, ::-1].copy(), [f"description {i}" for i in range(7)],
                                                  ["img a", "img b", "img c"], tmp_path / "reordered.png", "attention")  # fmt: skip
    other = _png(reordered)[1]
    assert other.shape == drawn.shape and np.abs(other - drawn).mean() > 1.0, "the heat map shows the weights"
    with pytest.raises(ValueError, match="3x7 but there are 1 image labels and 1 descriptions"):
        plots.attention_over_descriptions(weights, ["too few"], ["img"], tmp_path / "bad.png", "attention")


def _colour_pixels(pixels: np.ndarray, hex_colour: str) -> int:
    rgb = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)], dtype=float)
    return int((np.abs(pixels - rgb).sum(axis=-1) < 30).sum())


def test_a_method_has_one_colour_in_every_figure(tmp_path):
    aape, zeroshot = plots.method_colour("aape"), plots.method_colour("zeroshot")
    assert aape != zeroshot and plots.method_colour("some-new-method") == plots.method_colour("some-new-method")
    curve = pd.DataFrame({"method": ["aape"] * 2 + ["zeroshot"] * 2, "shots": [1, 16] * 2, "mean": [50.0, 70.0, 40.0, 45.0], "std": [1.0] * 4})
    per_class = pd.DataFrame({"method": ["zeroshot", "aape"] * 2, "class_name": ["a", "a", "b", "b"], "accuracy": [30.0, 80.0, 40.0, 90.0]})
    only_zeroshot = pd.DataFrame({"method": ["zeroshot"] * 2, "class_name": ["a", "b"], "accuracy": [30.0, 40.0]})
    for path in (plots.accuracy_vs_shots(curve, "H (%)", tmp_path / "shots.png", "t")[0],
                 plots.per_class_bars(per_class, ["zeroshot", "aape"], tmp_path / "bars.png", "t")):
        pixels = _png(path)[1]
        assert _colour_pixels(pixels, aape) > 50 and _colour_pixels(pixels, zeroshot) > 50, path.name
    pixels = _png(plots.per_class_bars(only_zeroshot, ["zeroshot"], tmp_path / "zs.png", "t"))[1]
    assert _colour_pixels(pixels, aape) == 0  # the colour is the method's, not the position's


def test_a_zero_bar_is_drawn(tmp_path):
    def aape_ink(classes: int) -> int:
        table = pd.DataFrame({"method": ["zeroshot", "aape"] * classes, "class_name": [f"c{i // 2}" for i in range(2 * classes)],
                              "accuracy": [50.0, 0.0] * classes})
        return _colour_pixels(_png(plots.per_class_bars(table, ["zeroshot", "aape"], tmp_path / f"z{classes}.png", "t"))[1], plots.method_colour("aape"))

    # AAPE at 0% on every class: without a mark its colour would appear in the legend only, whatever
    # the class count; with one, each zero class adds a stub and its "0" label in AAPE's colour
    assert aape_ink(12) > aape_ink(2) + 10 * 5


def test_a_single_shot_count_is_drawn_as_labelled_points_not_a_shots_axis(tmp_path):
    single = pd.DataFrame({"method": ["aape", "zeroshot", "cupl"], "shots": [16] * 3, "mean": [70.0, 60.0, 65.0], "std": [1.0, 0.0, 2.0]})
    path, remark = plots.accuracy_vs_shots(single, "H (%)", tmp_path / "single.png", "eurosat")
    pixels = _png(path)[1]
    for method in ("aape", "zeroshot", "cupl"):
        assert _colour_pixels(pixels, plots.method_colour(method)) > 20, method
    assert "only 16 shots" in remark


def test_a_stamped_figure_carries_the_notice_in_its_pixels(tmp_path):
    per_class = pd.DataFrame({"method": ["aape"] * 2, "class_name": ["a", "b"], "accuracy": [30.0, 40.0]})
    path = plots.per_class_bars(per_class, ["aape"], tmp_path / "bars.png", "t")
    (width, height), before = _png(path)
    plots.stamp_notice(path, "RANDOM-INIT BACKBONE: weights are random, accuracies mean nothing about CLIP")
    (width_after, height_after), after = _png(path)
    assert width_after == width and height_after > height + 10
    band = after[: height_after - height]
    assert _colour_pixels(band, "#b00020") > 0.5 * band.shape[0] * band.shape[1]  # a red banner...
    assert (band.min(axis=-1) > 200).sum() > 50  # ...with white text on it
    assert np.array_equal(after[height_after - height :], before)  # the figure itself is untouched
