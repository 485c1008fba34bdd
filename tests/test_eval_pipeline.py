"""End to end on a CoOp-layout dataset: the real stages from prepare-data to evaluate, from the
command line, then `aape predict` on the run's model agreeing with the evaluation's own figure."""

from __future__ import annotations

import csv
import json

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from aape.config import dump_params, load_params
from aape.methods.registry import METHODS, TRAIN_BASELINES

# a four-class EuroSAT in CoOp's layout: eurosat/2750/<Folder>/*.jpg + eurosat/split_zhou_EuroSAT.json
FOLDERS = {"AnnualCrop": "Annual Crop Land", "Forest": "Forest", "River": "River", "SeaLake": "Sea or Lake"}
COLOURS = [(200, 180, 60), (20, 110, 30), (40, 90, 200), (10, 40, 150)]


def _coop_eurosat(root):
    split = {"train": [], "val": [], "test": []}
    g = torch.Generator().manual_seed(0)
    for label, ((folder, name), colour) in enumerate(zip(FOLDERS.items(), COLOURS)):
        directory = root / "eurosat" / "2750" / folder
        directory.mkdir(parents=True)
        for i in range(12):
            noise = (torch.rand(32, 32, 3, generator=g) * 60).to(torch.uint8).numpy()
            pixels = (torch.tensor(colour, dtype=torch.uint8).expand(32, 32, 3).numpy() // 2 + noise)
            Image.fromarray(pixels).save(directory / f"{folder}_{i}.jpg")
            part = "train" if i < 6 else "val" if i < 8 else "test"
            split[part].append([f"{folder}/{folder}_{i}.jpg", label, name])
    (root / "eurosat" / "split_zhou_EuroSAT.json").write_text(json.dumps(split))
    cupl = {name.lower(): [f"a satellite photo of {name.lower()}", f"{name.lower()} seen from above", "an aerial view"]
            for name in FOLDERS.values()}
    (root / "cupl.json").write_text(json.dumps(cupl))


@pytest.mark.slow
def test_coop_layout_run_from_the_command_line_then_predict(tmp_path, tiny_backbone):
    from aape.cli import main

    _coop_eurosat(tmp_path / "data")
    weights = tmp_path / "tiny.pt"  # a weights file: every stage and predict build the very same backbone
    torch.save(tiny_backbone.model.state_dict(), weights)
    params = load_params(None, [
        f"run.output_dir={tmp_path / 'artifacts'}", f"run.cache_dir={tmp_path / 'cache'}", "run.seeds=[1]",
        "run.device=cpu", "run.num_threads=2", "data.dataset=eurosat", f"data.root={tmp_path / 'data'}", "data.shots=2",
        "backbone.model=aape-tiny", f"backbone.pretrained={weights}", "prompts.source=cupl-json",
        f"prompts.file={tmp_path / 'data' / 'cupl.json'}", "features.augmented_views=2", "features.num_workers=0",
        "aggregator.heads=2", "aggregator.schedule.epochs=2", "generator.schedule.epochs=3", "tracking.enabled=false",
        "evaluation.linear_probe_c_range=[1.0, 100.0]", "evaluation.linear_probe_c_coarse_points=2", "evaluation.linear_probe_c_refine_steps=0",
        f"evaluation.methods=[{', '.join(METHODS)}]", *(f"baselines.{spec.key}.schedule.epochs=2" for spec in METHODS.values()
                                                          if spec.trainer == TRAIN_BASELINES),
    ])
    params_file = tmp_path / "params.yaml"
    dump_params(params, params_file)
    result = CliRunner().invoke(main, ["run", "--params", str(params_file), "--no-track"])
    assert result.exit_code == 0, result.output + repr(result.exception)

    out = tmp_path / "artifacts" / "eval"
    results = pd.read_parquet(out / "results.parquet")
    assert set(results["method"]) == set(METHODS) and set(results["eval_set"]) == {"base", "new"}
    report = (out / "report.md").read_text()
    assert "## Base-to-new generalisation on eurosat" in report and "| AAPE |" in report
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["random_init"] is False and "base2new/aape/H_mean" in metrics

    # `aape predict` on the base test images among the base classes gives the evaluation's accuracy
    classes = json.loads((tmp_path / "artifacts" / "data" / "classes.json").read_text())
    base_names = [classes["classnames"][c] for c in classes["eval_sets"]["base"]]
    image_root = tmp_path / "data" / "eurosat" / "2750"
    test = pd.read_parquet(tmp_path / "artifacts" / "data" / "split_test.parquet")
    base_test = test[test["label"].isin(classes["eval_sets"]["base"])]
    csv_file = tmp_path / "predictions.csv"
    predicted = CliRunner().invoke(main, [
        "predict", *[str(image_root / p) for p in base_test["path"]], "--model", str(tmp_path / "artifacts" / "generator" / "seed1"),
        "--classes", ",".join(base_names), "--top-k", "1", "--output", str(csv_file), "--params", str(params_file),
    ])
    assert predicted.exit_code == 0, predicted.output + repr(predicted.exception)
    top1 = {row["path"]: row["class_name"] for row in csv.DictReader(csv_file.open())}
    truth = {str(image_root / p): name for p, name in zip(base_test["path"], base_test["classname"])}
    agreement = 100.0 * sum(top1[p] == truth[p] for p in truth) / len(truth)
    figure = results.set_index(["method", "seed", "eval_set"]).loc[("aape", 1, "base"), "accuracy"]
    assert agreement == pytest.approx(figure)
