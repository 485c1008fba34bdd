"""run.task: retrieval through the same stages, end to end from the CLI on the offline easy-VQA data."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

pytest.importorskip("easy_vqa")

from aape.cli import main  # noqa: E402
from aape.config import ConfigError, load_params  # noqa: E402
from aape.retrieval.metrics import recall_at_k  # noqa: E402
from aape.stages import STAGES  # noqa: E402


def _overrides(tmp_path, *extra):
    settings = [
        "run.task=retrieval", "data.dataset=easy-vqa", "evaluation.methods=[zeroshot, aape-nodistill, aape]",
        f"run.output_dir={tmp_path / 'artifacts'}", f"run.cache_dir={tmp_path / 'cache'}", "run.seeds=[1, 2]", "run.device=cpu",
        "backbone.model=aape-tiny", "backbone.pretrained=random-init", "data.max_images=120", "features.augmented_views=2",
        "features.num_workers=0", "aggregator.heads=2", "aggregator.schedule.epochs=2", "generator.schedule.epochs=3", *extra,
    ]
    return [arg for s in settings for arg in ("-s", s)]


@pytest.fixture(scope="module")
def retrieval_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("retrieval")
    result = CliRunner().invoke(main, ["run", "--no-track", *_overrides(tmp)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return tmp / "artifacts", result.output


def test_every_stage_runs_for_retrieval_and_the_report_tables_recall_at_k(retrieval_run):
    artifacts, output = retrieval_run
    assert all(f"[{name}] done" in output for name in STAGES)
    report = (artifacts / "eval" / "report.md").read_text()
    assert report.startswith("**RANDOM-INIT") and "**GENERATED CAPTIONS" in report
    assert "| Query | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | RSUM |" in report
    for title in ("CLIP image embedding (zero-shot)", "h without distillation (λ = 0)", "AAPE (h, λ·distill + CLIP loss)"):
        assert f"| {title} |" in report
    metrics = json.loads((artifacts / "eval" / "metrics.json").read_text())
    assert {f"retrieval/easy-vqa/{m}/rsum_mean" for m in ("zeroshot", "aape-nodistill", "aape")} <= set(metrics)
    prompts = pd.read_parquet(artifacts / "prompts" / "descriptions.parquet")
    assert set(prompts["source"]) == {"generated-captions"} and prompts["text"].str.len().min() > 0


def test_the_zero_shot_row_is_recall_of_the_cached_image_and_caption_embeddings(retrieval_run):
    from safetensors.torch import load_file

    artifacts, _ = retrieval_run
    test = load_file(str(artifacts / "features" / "retrieval_test.safetensors"))
    counts = test["counts"]
    mask = torch.arange(test["captions"].shape[1]).unsqueeze(0) < counts.unsqueeze(1)
    captions = test["captions"][mask]
    owners = torch.arange(len(counts)).unsqueeze(1).expand_as(mask)[mask]
    expected = recall_at_k(F.normalize(test["views"][:, 0], dim=-1) @ captions.T, owners)
    results = pd.read_parquet(artifacts / "eval" / "results.parquet")
    row = results[(results["method"] == "zeroshot") & (results["seed"] == 1)].iloc[0]
    assert row["rsum"] == pytest.approx(expected["rsum"]) and row["i2t_R@1"] == pytest.approx(expected["i2t_R@1"])
    # every test image has its own caption set, as easy-VQA's 24 colour-shape combinations require
    records = pd.read_parquet(artifacts / "data" / "captions_test.parquet")
    assert records["captions"].map(tuple).is_unique


def test_retrieval_settings_are_checked_before_anything_runs():
    with pytest.raises(ConfigError, match="not a retrieval dataset"):
        load_params(None, ["run.task=retrieval", "data.dataset=eurosat", "evaluation.methods=[zeroshot]"])
    with pytest.raises(ConfigError, match="do not apply to retrieval"):
        load_params(None, ["run.task=retrieval", "data.dataset=easy-vqa", "evaluation.methods=[zeroshot, coop]"])
    with pytest.raises(ConfigError, match="cross_datasets holds retrieval datasets"):
        load_params(None, ["run.task=retrieval", "data.dataset=easy-vqa", "evaluation.methods=[zeroshot]",
                           "evaluation.cross_datasets=[eurosat]"])


def test_each_query_has_per_seed_and_mean_runs_for_the_tracker(tmp_path):
    from aape.stages import evaluate
    from aape.tracking import RecordingTracker

    params = load_params(None, [a for a in _overrides(tmp_path, "run.seeds=[1]") if a != "-s"])
    for name in ("prepare-data", "generate-prompts", "extract-features", "train-aggregator", "distill-generator"):
        from aape.stages import stage_function

        stage_function(name)(params)
    tracker = RecordingTracker()
    evaluate.run(params, tracker=tracker)
    names = {c.name: c for c in tracker.children}
    assert {f"{m} · easy-vqa retrieval · seed 1" for m in ("zeroshot", "aape-nodistill", "aape")} <= set(names)
    mean = names["aape · easy-vqa retrieval · mean of 1 seeds"]
    logged = {k for k, _, _ in mean.metrics}
    assert {"i2t_R_at_1", "i2t_R_at_1_std", "rsum", "rsum_std"} <= logged and mean.params["query"] == "residual"


def test_a_missing_karpathy_file_is_named_before_any_work(tmp_path):
    result = CliRunner().invoke(main, ["run", "--no-track", *_overrides(tmp_path, "data.dataset=coco", f"data.root={tmp_path / 'data'}")])
    assert result.exit_code == 2 and "dataset_coco.json" in result.output
    assert not (tmp_path / "artifacts").exists()


def test_zero_shot_transfer_tests_the_trained_queries_on_another_datasets_test_split(tmp_path):
    """Trained on easy-VQA, tested on a Flickr30k in Karpathy's format (4 images, 5 captions each)."""
    from PIL import Image

    folder = tmp_path / "data" / "flickr30k"
    (folder / "flickr30k-images").mkdir(parents=True)
    images = []
    for i, colour in enumerate(("red", "green", "blue", "yellow")):
        Image.new("RGB", (40, 40), colour).save(folder / "flickr30k-images" / f"{i}.jpg")
        sentences = [{"raw": f"a {colour} square number {j}.", "tokens": []} for j in range(5)]
        images.append({"filename": f"{i}.jpg", "split": "test", "sentences": sentences, "imgid": i})
    (folder / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    result = CliRunner().invoke(main, ["run", "--no-track", *_overrides(tmp_path, "run.seeds=[1]", f"data.root={tmp_path / 'data'}",
                                                                            "evaluation.cross_datasets=[flickr30k]")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    artifacts = tmp_path / "artifacts"
    report = (artifacts / "eval" / "report.md").read_text()
    assert "## flickr30k test (zero-shot transfer from easy-vqa)" in report and "## easy-vqa test (finetuned" in report
    metrics = json.loads((artifacts / "eval" / "metrics.json").read_text())
    assert "retrieval-transfer/flickr30k/aape/rsum_mean" in metrics
    results = pd.read_parquet(artifacts / "eval" / "results.parquet")
    assert set(results.loc[results["scope"] == "retrieval-transfer", "dataset"]) == {"flickr30k"}


def test_the_prefect_flow_runs_retrieval_with_mlflow_runs_per_query(prefect_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from flows.pipeline import pipeline

    db = tmp_path / "mlflow.db"
    overrides = [a for a in _overrides(tmp_path, "run.seeds=[1]") if a != "-s"]
    overrides += [f"tracking.uri=sqlite:///{db}", f"tracking.artifact_location={tmp_path / 'mlartifacts'}"]
    params_file = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "params.yaml")
    result = pipeline(params_file=params_file, overrides=overrides, record_in_dvc=False)
    assert result["model"]["registered_model"] is None  # the registry holds classification models only, and says so
    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("aape").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    mean = by_name["aape · easy-vqa retrieval · mean of 1 seeds"]
    assert {"rsum", "rsum_std", "i2t_R_at_1"} <= set(mean.data.metrics) and mean.data.params["task"] == "retrieval"
    assert mean.data.tags["mlflow.parentRunId"] in {r.info.run_id for r in runs}
