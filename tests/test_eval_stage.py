"""The evaluate stage on a run's artifacts written in the contract's formats (synthetic embeddings
with class structure), then end to end on real stages in test_eval_pipeline.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from aape.atomic import atomic_save_tensors, atomic_write_json
from aape.config import DEFAULT_EVAL_METHODS as EVAL_METHODS, load_params
from aape.evaluation.classifiers import EvaluationError
from aape.evaluation.metrics import accuracy, harmonic_mean
from aape.features.baseline_templates import baseline_templates
from aape.layout import Layout
from aape.tracking import RecordingTracker

D = 64  # the tiny backbone's width, so transfer targets encoded by it fit the same models
IDENTITY = "aape-tiny@random-init"
CLASSNAMES = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]
WNIDS = [f"n0000000{i}" for i in range(1, 7)]


def _params(tmp_path, *extra):
    return load_params(None, [
        f"run.output_dir={tmp_path / 'artifacts'}", f"run.cache_dir={tmp_path / 'cache'}", "run.seeds=[1, 2]",
        "run.device=cpu", "backbone.model=aape-tiny", "backbone.pretrained=random-init", "tracking.enabled=false",
        "features.num_workers=0", "data.shots=4", f"data.root={tmp_path / 'data'}", "evaluation.batch_size=16",
        "evaluation.linear_probe_c_range=[1.0, 100.0]", "evaluation.linear_probe_c_coarse_points=2",
        "evaluation.linear_probe_c_refine_steps=0", *extra,
    ])


def write_run(params, protocol="base2new", model_classes=None, nodistill=True):
    """Every upstream artifact evaluate reads, in the formats of docs/architecture.md."""
    from aape.method import AAPEModel, build_aggregator, save_aggregator

    layout = Layout.from_params(params)
    g = torch.Generator().manual_seed(0)
    centroids = F.normalize(torch.randn(6, D, generator=g), dim=-1)

    def near(labels, noise):
        return F.normalize(centroids[labels] + noise * torch.randn(len(labels), D, generator=g) / D**0.5, dim=-1)

    train_classes = [0, 1, 2] if protocol == "base2new" else list(range(6))
    eval_sets = {"base": [0, 1, 2], "new": [3, 4, 5]} if protocol == "base2new" else {"all": list(range(6))}
    classes = {"dataset": "toy", "image_root": "unused", "classnames": CLASSNAMES, "protocol": protocol,
               "train_classes": train_classes, "eval_sets": eval_sets, "split_hash": "x", "seeds": [1, 2], "shots": 4}
    layout.data.mkdir(parents=True)
    layout.classes_file.write_text(json.dumps(classes))
    meta = {"identity": IDENTITY, "random_init": True, "embed_dim": D}
    test_labels = torch.arange(6).repeat_interleave(10)
    atomic_save_tensors(layout.features / "test.safetensors",
                        {"features": near(test_labels, 1.2), "labels": test_labels, "rows": torch.arange(60)}, meta)
    desc_class = torch.arange(6).repeat_interleave(5)
    # the zero-shot baseline's prompts are not AAPE's class prompts: here they swap classes 3 and 4,
    # so a baseline that used class_prompts would be caught
    text = {"class_prompts": near(torch.arange(6), 0.5), "class_zeroshot": near(torch.tensor([0, 1, 2, 4, 3, 5]), 0.6),
            "class_ensemble": near(torch.arange(6), 0.4), "descriptions": near(desc_class, 1.0), "description_class": desc_class}
    templates = baseline_templates(params.features, params.data.dataset)
    atomic_save_tensors(layout.features / "text.safetensors", text,
                        {**meta, "class_template": params.features.class_template, **templates.metadata()})
    atomic_write_json(layout.features / "index.json", {"identity": IDENTITY, "random_init": True, "embed_dim": D,
                                                      "logit_scale": 100.0, "classnames": CLASSNAMES, "seeds": [1, 2]})
    layout.prompts.mkdir(parents=True)
    pd.DataFrame({"class_index": desc_class.tolist(),
                  "text": [f"{CLASSNAMES[c]} description {i}" for i, c in enumerate(desc_class.tolist())]}).to_parquet(layout.descriptions)
    for seed in (1, 2):
        labels = torch.as_tensor(train_classes).repeat_interleave(4)
        views = torch.stack([near(labels, 1.0), near(labels, 1.0)], dim=1)
        atomic_save_tensors(layout.features / f"seed{seed}" / "train.safetensors",
                            {"views": views, "clean": near(labels, 0.8), "labels": labels, "rows": torch.arange(len(labels))}, meta)
        val_labels = torch.as_tensor(train_classes).repeat_interleave(2)
        atomic_save_tensors(layout.features / f"seed{seed}" / "val.safetensors",
                            {"features": near(val_labels, 1.0), "labels": val_labels, "rows": torch.arange(len(val_labels))}, meta)
        manifest = layout.fewshot_manifest(seed, "train")
        manifest.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"path": [f"img_{i}.png" for i in range(len(labels))], "label": labels.tolist(),
                      "classname": [CLASSNAMES[c] for c in labels.tolist()]}).to_parquet(manifest)
        facts = {"backbone_identity": IDENTITY, "random_init": True, "embed_dim": D, "logit_scale": 100.0,
                 "train_classnames": model_classes or [CLASSNAMES[c] for c in train_classes], "train_classes": train_classes}
        for sub in (["", "nodistill"] if nodistill else [""]):
            torch.manual_seed(seed)
            AAPEModel(D, 8, "bottleneck", 8, 100.0).save(layout.generator / f"seed{seed}" / sub, facts)
        torch.manual_seed(seed)
        save_aggregator(build_aggregator("attention", D, heads=2), layout.aggregator / f"seed{seed}", facts)
    return layout


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    from aape.stages.evaluate import run

    params = _params(tmp_path_factory.mktemp("evaluated"))
    layout = write_run(params)
    tracker = RecordingTracker()
    summary = run(params, tracker=tracker)
    return params, layout, tracker, summary


def test_every_method_and_seed_is_evaluated_with_the_same_metric_names(evaluated):
    params, layout, tracker, summary = evaluated
    results = pd.read_parquet(layout.eval / "results.parquet")
    assert len(results) == len(EVAL_METHODS) * len(params.run.seeds) * 2  # methods x seeds x {base, new}
    assert set(results["method"]) == set(EVAL_METHODS) and set(results["eval_set"]) == {"base", "new"}
    assert (results["random_init"]).all() and (results["shots"] == 4).all()
    assert results.loc[results["eval_set"] == "base", "total"].eq(30).all()
    children = {child.name: child for child in tracker.children if "aggregate" not in child.tags}
    assert set(children) == {f"{m} · toy · seed {s}" for m in EVAL_METHODS for s in (1, 2)}
    for name, child in children.items():
        names = {k for k, _, _ in child.metrics}
        expected = {"base_accuracy"} if name.startswith("linear-probe") else {"base_accuracy", "new_accuracy", "H"}
        assert names == expected, name
        assert child.tags["random_init"] == "true" and child.tags["seed"] == name[-1] == child.params["seed"]
    metrics = json.loads(layout.metrics.read_text())
    assert metrics["random_init"] is True
    for method in EVAL_METHODS:
        assert f"base2new/{method}/base_accuracy_mean" in metrics
    assert "base2new/aape/H_mean" in metrics and "base2new/linear-probe/H_mean" not in metrics
    assert summary["headline"]["base2new/aape/H_mean"] == metrics["base2new/aape/H_mean"]


def test_figures_match_an_independent_computation(evaluated):
    from aape.features import load_bundle
    from aape.method import AAPEModel

    params, layout, tracker, summary = evaluated
    results = pd.read_parquet(layout.eval / "results.parquet").set_index(["method", "seed", "eval_set"])["accuracy"]
    bundle = load_bundle(layout, 1)
    new = bundle.test_labels >= 3
    zs = (bundle.test_features[new] @ bundle.class_zeroshot[3:].T).argmax(-1)
    assert results[("zeroshot", 1, "new")] == pytest.approx(accuracy(zs, bundle.test_labels[new] - 3))
    with_aape_prompts = (bundle.test_features[new] @ bundle.class_prompts[3:].T).argmax(-1)
    assert accuracy(with_aape_prompts, bundle.test_labels[new] - 3) > results[("zeroshot", 1, "new")] + 30.0
    model = AAPEModel.load(layout.generator / "seed2")
    with torch.inference_mode():
        pred = model.logits(bundle.test_features[~new], bundle.class_prompts[:3]).argmax(-1)
    assert results[("aape", 2, "base")] == pytest.approx(accuracy(pred, bundle.test_labels[~new]))
    # seed-independent baselines give the same figure for every seed; the probe's shots differ per seed
    assert results[("cupl", 1, "base")] == results[("cupl", 2, "base")]
    assert math.isnan(results[("linear-probe", 1, "new")])
    metrics = json.loads(layout.metrics.read_text())
    base = [results[("aape", s, "base")] for s in (1, 2)]
    new_acc = [results[("aape", s, "new")] for s in (1, 2)]
    expected_h = harmonic_mean(sum(base) / 2, sum(new_acc) / 2)
    assert metrics["base2new/aape/H_mean"] == pytest.approx(expected_h, abs=1e-3)
    per_class = pd.read_parquet(layout.eval / "per_class.parquet")
    rows = per_class[(per_class["method"] == "aape") & (per_class["seed"] == 2) & (per_class["eval_set"] == "base")]
    assert rows["correct"].sum() / rows["total"].sum() * 100 == pytest.approx(results[("aape", 2, "base")])


def test_report_plots_and_tracked_artifacts(evaluated):
    params, layout, tracker, summary = evaluated
    report = (layout.eval / "report.md").read_text()
    assert report.startswith("**RANDOM-INIT")
    assert "| Method | Base | New | H |" in report and report.count("\n| ") >= 7
    assert "never saw in training" in report
    plots = sorted(p.name for p in (layout.eval / "plots").iterdir())
    assert plots == ["accuracy_vs_shots.png", "attention_descriptions.png", "confusion_aape_base.png",
                     "confusion_aape_new.png", "per_class_base.png", "per_class_new.png"]
    for name in plots:
        assert f"(plots/{name})" in report
    assert "only 4 shots were evaluated" in report
    assert "class 'alpha' (5 descriptions)" in report
    logged = {path.split("/")[-1]: where for path, where in tracker.artifacts}
    assert {"report.md", "metrics.json", "results.parquet", "per_class.parquet", "plots"} <= set(logged)
    assert logged["plots"] == "eval/plots" and logged["report.md"] == "eval"


def test_accuracy_against_shots_uses_results_of_other_runs(tmp_path):
    from aape.stages.evaluate import run

    quick = "evaluation.methods=[zeroshot, aape]"
    params = _params(tmp_path, quick)
    layout = write_run(params)
    run(params)
    other = pd.read_parquet(layout.eval / "results.parquet")
    other["shots"] = 1
    other["accuracy"] = other["accuracy"] / 2
    other_file = tmp_path / "one-shot" / "results.parquet"
    other_file.parent.mkdir()
    other.to_parquet(other_file)
    params = _params(tmp_path, quick, f"evaluation.shots_results=['{tmp_path}/one-*/results.parquet']")
    run(params)
    report = (layout.eval / "report.md").read_text()
    assert "2 shot counts: 1, 4" in report
    params = _params(tmp_path, quick, f"evaluation.shots_results=['{tmp_path}/nothing-here/*.parquet']")
    with pytest.raises(EvaluationError, match="no file matches"):
        run(params)


def test_fewshot_protocol_reports_accuracy(tmp_path):
    from aape.stages.evaluate import run

    params = _params(tmp_path, "evaluation.methods=[zeroshot, linear-probe, aape]", "run.seeds=[1]")
    layout = write_run(params, protocol="fewshot", nodistill=False)
    tracker = RecordingTracker()
    run(params, tracker=tracker)
    metrics = json.loads(layout.metrics.read_text())
    assert {k for k in metrics if k.endswith("_mean")} == {f"fewshot/{m}/accuracy_mean" for m in ("zeroshot", "linear-probe", "aape")}
    assert all({k for k, _, _ in c.metrics} == {"accuracy"} for c in tracker.children if "aggregate" not in c.tags)
    assert all({k for k, _, _ in c.metrics} == {"accuracy", "accuracy_std"} for c in tracker.children if "aggregate" in c.tags)
    report = (layout.eval / "report.md").read_text()
    assert "| Method | Accuracy |" in report and "| AAPE |" in report


def test_a_model_trained_on_other_classes_is_refused(tmp_path):
    from aape.evaluation.protocols import ClassMismatchError
    from aape.stages.evaluate import run

    params = _params(tmp_path)
    write_run(params, model_classes=["alpha", "bravo", "delta"])
    with pytest.raises(ClassMismatchError, match=r"not trained on 'charlie'.*outside the protocol's training set: 'delta'"):
        run(params)


def test_a_missing_model_is_named_before_any_work_is_done(tmp_path):
    import shutil

    from aape.stages.evaluate import run

    params = _params(tmp_path)
    layout = write_run(params)
    shutil.rmtree(layout.generator / "seed2" / "nodistill")  # seed 1 could be evaluated, seed 2 could not
    with pytest.raises(EvaluationError, match=r"'aape-nodistill', seed 2: .*seed2[/\\]nodistill is missing"):
        run(params)
    assert not layout.eval.exists()


def test_a_model_from_another_backbone_is_refused(tmp_path):
    from aape.method.checkpoint import CheckpointMismatchError
    from aape.stages.evaluate import run

    params = _params(tmp_path)
    layout = write_run(params)
    info = layout.generator / "seed1" / "generator.json"
    meta = json.loads(info.read_text())
    meta["backbone_identity"] = "ViT-B-16@tag:openai"
    info.write_text(json.dumps(meta))
    with pytest.raises(CheckpointMismatchError, match="ViT-B-16@tag:openai"):
        run(params)


def _images(folder, n=2, size=32):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (size, size), ((37 * i + len(folder.name) * 20) % 255, 90, 160)).save(folder / f"{i}.png")


def write_transfer_datasets(data):
    """A 3-class CIFAR-10 in torchvision's folder layout and an ImageNet-Sketch of the toy's six classes."""
    for split, n in (("train", 3), ("test", 2)):
        for name in ("cat", "dog", "ship"):
            _images(data / "cifar10" / split / name, n)
    sketch = data / "imagenet-sketch"
    sketch.mkdir(parents=True)
    (sketch / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in zip(WNIDS, CLASSNAMES)))
    for wnid in WNIDS:
        _images(sketch / "images" / wnid)


def test_transfer_protocols_on_datasets_in_their_own_layouts(tmp_path):
    from aape.stages.evaluate import run

    write_transfer_datasets(tmp_path / "data")
    params = _params(tmp_path, "evaluation.cross_datasets=[cifar10]", "evaluation.domain_shift=[imagenet_sketch]",
                     "evaluation.methods=[zeroshot, cupl, linear-probe, aape]")
    layout = write_run(params, nodistill=False)
    tracker = RecordingTracker()
    run(params, tracker=tracker)
    results = pd.read_parquet(layout.eval / "results.parquet")
    cross = results[results["scope"] == "cross-dataset"].set_index(["method", "seed"])
    assert set(cross["dataset"]) == {"cifar10"} and cross["total"].max() == 6 and cross["num_classes"].max() == 3
    assert not math.isnan(cross.loc[("aape", 1), "accuracy"]) and not math.isnan(cross.loc[("zeroshot", 1), "accuracy"])
    assert math.isnan(cross.loc[("cupl", 1), "accuracy"]) and math.isnan(cross.loc[("linear-probe", 1), "accuracy"])
    shift = results[results["scope"] == "domain-shift"].set_index(["method", "seed"])
    assert shift["total"].max() == 12 and shift["num_classes"].max() == 6
    # the probe knows the base classes only, so it cannot score all six classes of the variant
    assert not math.isnan(shift.loc[("cupl", 1), "accuracy"]) and math.isnan(shift.loc[("linear-probe", 1), "accuracy"])
    metrics = json.loads(layout.metrics.read_text())
    assert "cross-dataset/cifar10/aape/accuracy_mean" in metrics and "domain-shift/imagenet_sketch/aape/accuracy_mean" in metrics
    assert "aape · toy -> cifar10 (cross-dataset) · seed 1" in {c.name for c in tracker.children}
    assert "aape · toy -> cifar10 (cross-dataset) · mean of 2 seeds" in {c.name for c in tracker.children}
    report = (layout.eval / "report.md").read_text()
    assert "## Cross-dataset transfer" in report and "## Domain shift" in report and "| Method | imagenet_sketch |" in report


def test_a_missing_transfer_dataset_is_named_with_its_path(tmp_path):
    from aape.stages.evaluate import run

    params = _params(tmp_path, "evaluation.cross_datasets=[eurosat]")
    write_run(params)
    with pytest.raises(EvaluationError, match=r"evaluation.cross_datasets lists 'eurosat'.*eurosat"):
        run(params)
    assert not (Layout.from_params(params).eval / "results.parquet").exists()  # failed before any work


def test_report_metrics_and_tags_say_how_each_baseline_was_built(evaluated):
    params, layout, tracker, summary = evaluated
    report = (layout.eval / "report.md").read_text()
    # demo-mnist: CoOp has no template of its own, CLIP's MNIST set has one
    assert "## Baselines" in report
    assert "CLIP zero-shot on toy: template 'a photo of a {}.' (CoOp has no template for demo-mnist: its generic one)." in report
    assert "template ensemble on toy: CLIP data/prompts.md, MNIST (1 template)." in report
    assert "Linear probe: C chosen on validation by accuracy, then cross-entropy (2 log-spaced C over [1, 100], 0 refinement steps" in report
    metrics = json.loads(layout.metrics.read_text())
    assert metrics["baselines/zeroshot/template"] == "a photo of a {}."
    assert metrics["baselines/zeroshot-ensemble/templates"] == "CLIP data/prompts.md, MNIST (1 template)"
    for seed in (1, 2):
        assert metrics[f"baselines/linear-probe/seed{seed}/C"] in (1.0, 100.0)
        assert metrics[f"baselines/linear-probe/seed{seed}/fits"] == 2
        assert f"seed {seed}: C={metrics[f'baselines/linear-probe/seed{seed}/C']:.4g} (2 fits)" in report
    children = {child.name: child for child in tracker.children}
    assert children["zeroshot · toy · seed 1"].tags["template"] == "a photo of a {}."
    assert children["linear-probe · toy · seed 2"].tags["C"] == f"{metrics['baselines/linear-probe/seed2/C']:.6g}"
    assert children["linear-probe · toy · seed 2"].tags["fits"] == "2"


def test_method_runs_carry_the_params_that_tell_them_apart_and_one_run_per_method_holds_the_seed_mean(evaluated):
    params, layout, tracker, summary = evaluated
    children = {child.name: child for child in tracker.children}
    aape, nodistill, zeroshot = (children[f"{m} · toy · seed 1"].params for m in ("aape", "aape-nodistill", "zeroshot"))
    # the same keys for every method, so MLflow's compare view can plot them side by side
    assert set(aape) == set(zeroshot) >= {"method", "dataset", "protocol", "shots", "backbone", "weights", "lambda_distill", "aggregator", "seed"}
    assert (aape["lambda_distill"], nodistill["lambda_distill"], zeroshot["lambda_distill"]) == ("5.0", "0.0", "n/a")
    assert (aape["aggregator"], aape["shots"], aape["backbone"], aape["weights"]) == ("attention", "4", "aape-tiny", "random-init")
    # one aggregate run per method: the mean over seeds equals metrics.json's, with its std beside it
    metrics = json.loads(layout.metrics.read_text())
    for method in EVAL_METHODS:
        mean_run = children[f"{method} · toy · mean of 2 seeds"]
        logged = {k: v for k, v, _ in mean_run.metrics}
        assert logged["base_accuracy"] == pytest.approx(metrics[f"base2new/{method}/base_accuracy_mean"])
        assert logged["base_accuracy_std"] == pytest.approx(metrics[f"base2new/{method}/base_accuracy_std"])
        assert ("H" in logged) == (method != "linear-probe")  # the probe has no new-class accuracy, so no H
        assert mean_run.params["seed"] == "mean of 1,2" and mean_run.tags["aggregate"] == "mean over seeds"


def test_baseline_features_of_other_templates_are_refused_as_stale(tmp_path):
    from aape.stages.evaluate import run

    params = _params(tmp_path, "evaluation.methods=[zeroshot, aape]", "run.seeds=[1]")
    write_run(params, nodistill=False)
    stale = _params(tmp_path, "evaluation.methods=[zeroshot, aape]", "run.seeds=[1]", "features.zeroshot_template='itap of a {}.'")
    with pytest.raises(EvaluationError, match=r"zeroshot_template 'a photo of a \{\}.'.*'itap of a \{\}.'.*Re-run `aape extract-features`"):
        run(stale)


def test_text_features_without_the_zeroshot_prompts_ask_for_a_re_extraction(tmp_path):
    from safetensors.torch import load_file

    from aape.features import FeatureError
    from aape.stages.evaluate import run

    params = _params(tmp_path, "evaluation.methods=[zeroshot, aape]", "run.seeds=[1]")
    layout = write_run(params, nodistill=False)
    path = layout.features / "text.safetensors"
    older = {k: v for k, v in load_file(str(path)).items() if k != "class_zeroshot"}
    atomic_save_tensors(path, older, {"identity": IDENTITY, "random_init": True, "embed_dim": D})
    with pytest.raises(FeatureError, match=r"no class_zeroshot.*Re-run `aape extract-features`"):
        run(params)
    run(_params(tmp_path, "evaluation.methods=[cupl, aape]", "run.seeds=[1]"))  # methods that do not need it still run


def test_cross_dataset_baselines_use_the_target_dataset_templates(tmp_path):
    from aape.data.manifests import ClassesManifest
    from aape.evaluation.transfer import load_transfer_targets
    from aape.features import load_bundle, text_features
    from aape.features.text_encoder import class_template_features

    from aape.backbone import load_backbone

    for split, n in (("train", 3), ("test", 2)):
        for name in ("cat", "dog", "ship"):
            _images(tmp_path / "data" / "cifar10" / split / name, n)
    params = _params(tmp_path, "evaluation.cross_datasets=[cifar10]", "features.zeroshot_template='itap of a {}.'")
    layout = write_run(params)
    (target,) = load_transfer_targets(params, layout, ClassesManifest.read(layout.classes_file), load_bundle(layout, 1))
    backbone = load_backbone(params.backbone, "cpu")
    names = target.classnames
    assert torch.allclose(target.class_zeroshot, text_features(backbone, [f"itap of a {c}." for c in names], tmp_path / "c"), atol=1e-5)
    assert torch.allclose(target.class_prompts, text_features(backbone, [f"a photo of a {c}." for c in names], tmp_path / "c"), atol=1e-5)
    assert (target.class_zeroshot - target.class_prompts).norm(dim=-1).min() > 1e-3
    assert len(target.templates.ensemble) == 18  # CLIP's CIFAR10 set, the target's own
    expected = class_template_features(backbone, names, target.templates.ensemble, tmp_path / "c")
    assert torch.allclose(target.class_ensemble, expected, atol=1e-5)


def test_every_figure_of_a_random_init_run_says_so_in_its_own_pixels(evaluated):
    params, layout, tracker, summary = evaluated
    pngs = sorted((layout.eval / "plots").glob("*.png"))
    assert len(pngs) >= 3
    for png in pngs:
        with Image.open(png) as image:
            top = np.asarray(image.convert("RGB"))[:10].reshape(-1, 3).astype(int)
        red = (np.abs(top - [0xB0, 0x00, 0x20]).sum(axis=1) < 30).mean()
        assert red > 0.8, f"{png.name} has no RANDOM-INIT banner"
