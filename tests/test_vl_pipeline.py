"""run.task: captioning and vqa through the same stages, end to end from the CLI on the offline easy-VQA
data, with a tiny random GPT-2 as the frozen language model."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("easy_vqa")
pytest.importorskip("pycocoevalcap")

from aape.cli import main  # noqa: E402
from aape.config import ConfigError, load_params  # noqa: E402
from aape.stages import STAGES  # noqa: E402

pytestmark = pytest.mark.slow
METHODS = ("prefix", "aape", "aape-finetuned")


def _overrides(tmp, task, lm, *extra):
    settings = [
        f"run.task={task}", "data.dataset=easy-vqa", "evaluation.methods=[prefix, aape, aape-finetuned]",
        f"run.output_dir={tmp / 'artifacts'}", f"run.cache_dir={tmp / 'cache'}", "run.seeds=[1, 2]", "run.device=cpu",
        "backbone.model=aape-tiny", "backbone.pretrained=random-init", "data.max_images=40", "features.augmented_views=2",
        "features.num_workers=0", "aggregator.heads=2", "aggregator.schedule.epochs=2", "generator.schedule.epochs=2",
        f"prefix.lm={lm}", "prefix.schedule.epochs=2", "prefix.java_metrics=false", "prefix.max_new_tokens=6", *extra,
    ]
    return [arg for s in settings for arg in ("-s", s)]


def _run(tmp, task, lm, *extra):
    result = CliRunner().invoke(main, ["run", "--no-track", *_overrides(tmp, task, lm, *extra)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return tmp / "artifacts", result.output


@pytest.fixture(scope="module")
def captioning_run(tmp_path_factory, tiny_lm_path):
    return _run(tmp_path_factory.mktemp("captioning"), "captioning", tiny_lm_path)


@pytest.fixture(scope="module")
def vqa_run(tmp_path_factory, tiny_lm_path):
    return _run(tmp_path_factory.mktemp("vqa"), "vqa", tiny_lm_path, "prefix.vqa_shots=2")


def test_captioning_runs_every_stage_and_reports_each_model_and_decoding(captioning_run):
    artifacts, output = captioning_run
    assert all(f"[{name}] done" in output for name in STAGES)
    report = (artifacts / "eval" / "report.md").read_text()
    assert report.startswith("**RANDOM-INIT") and "**GENERATED CAPTIONS" in report
    assert "| Model | Decoding | CIDEr-D | BLEU-4 | ROUGE-L | CLIP-S | RefCLIP-S |" in report
    assert "Not computed: METEOR: turned off" in report and "![test/0](examples/0.png)" in report
    assert (artifacts / "eval" / "examples" / "0.png").is_file()
    metrics = json.loads((artifacts / "eval" / "metrics.json").read_text())
    for method in METHODS:
        for decoding in ("greedy", "sample"):
            assert f"captioning/easy-vqa/{method}/{decoding}/cider_d_mean" in metrics


def test_captioning_scores_are_the_metrics_of_the_saved_generations(captioning_run, tiny_backbone):
    from aape.vl.metrics import caption_scores

    artifacts, _ = captioning_run
    generations = pd.read_parquet(artifacts / "eval" / "generations.parquet")
    results = pd.read_parquet(artifacts / "eval" / "results.parquet")
    part = generations[(generations["method"] == "aape") & (generations["seed"] == 2) & (generations["decoding"] == "sample")]
    scores = caption_scores(dict(zip(part["image_id"], part["output"])),
                            {i: list(r) for i, r in zip(part["image_id"], part["references"])}, use_java=False)
    row = results[(results["method"] == "aape") & (results["seed"] == 2) & (results["decoding"] == "sample")].iloc[0]
    assert row["cider_d"] == pytest.approx(100 * scores.cider_d) and row["rouge_l"] == pytest.approx(100 * scores.rouge_l)
    # greedy decoding depends on nothing random: both of a seed's greedy captions come from its own maps only
    assert len(part) == len(pd.read_parquet(artifacts / "data" / "captions_test.parquet"))


def test_the_three_models_hold_what_they_should(captioning_run):
    from safetensors.torch import load_file

    artifacts, _ = captioning_run
    zero_shot_h = load_file(str(artifacts / "generator" / "seed1" / "retrieval_query.safetensors"))
    prefix = load_file(str(artifacts / "generator" / "seed1" / "prefix" / "prefix" / "prefix.safetensors"))
    aape = load_file(str(artifacts / "generator" / "seed1" / "prefix" / "aape" / "prefix.safetensors"))
    finetuned = load_file(str(artifacts / "generator" / "seed1" / "prefix" / "aape-finetuned" / "prefix.safetensors"))
    assert not any(k.startswith(("h.", "aape_map.")) for k in prefix)
    # zero-shot AAPE keeps the retrieval h unchanged; the finetuned one moved it
    assert torch.equal(aape["h.net.0.weight"], zero_shot_h["h.net.0.weight"])
    assert not torch.equal(finetuned["h.net.0.weight"], zero_shot_h["h.net.0.weight"])
    info = json.loads((artifacts / "generator" / "seed1" / "prefix" / "aape-finetuned" / "prefix.json").read_text())
    assert info["lambda_distill"] == 5.0 and info["aape_tokens"] == 1 and info["lm_width"] == 32


def test_vqa_answers_are_scored_with_the_vqa_accuracy_and_the_shots_are_recorded(vqa_run):
    from aape.vl.metrics import vqa_accuracy

    artifacts, output = vqa_run
    assert all(f"[{name}] done" in output for name in STAGES)
    results = pd.read_parquet(artifacts / "eval" / "results.parquet")
    generations = pd.read_parquet(artifacts / "eval" / "generations.parquet")
    for (method, seed), part in generations.groupby(["method", "seed"]):
        expected = 100 * sum(vqa_accuracy(o, list(r)) for o, r in zip(part["output"], part["references"])) / len(part)
        row = results[(results["method"] == method) & (results["seed"] == seed)].iloc[0]
        assert row["vqa_accuracy"] == pytest.approx(expected) and row["shots"] == 2
    shots = results.groupby("seed")["shot_questions"].first()
    assert shots[1] != shots[2] and len(shots[1].split(",")) == 2  # drawn by seed
    questions = pd.read_parquet(artifacts / "data" / "vqa_test.parquet")
    assert len(generations) == len(questions) * len(METHODS) * 2
    report = (artifacts / "eval" / "report.md").read_text()
    assert "| Model | Decoding | VQA accuracy |" in report and "2 in-context example(s)" in report


@pytest.mark.parametrize("task", ["captioning", "vqa"])
def test_limbers_grid_prefix_reads_one_token_per_grid_vector_end_to_end(tmp_path, tiny_lm_path, task):
    """prefix.image_features: grid on a ResNet (aape-tiny-rn: a 2 x 2 grid of 512-wide vectors)."""
    from safetensors.torch import load_file

    artifacts, output = _run(tmp_path, task, tiny_lm_path, "backbone.model=aape-tiny-rn", "prefix.image_features=grid",
                             "prefix.dropout=0.1", "run.seeds=[1]", "prefix.vqa_shots=1")
    assert all(f"[{name}] done" in output for name in STAGES)
    images = len(pd.read_parquet(artifacts / "data" / "captions_train.parquet"))
    pointer = json.loads((artifacts / "features" / "grid_train.json").read_text())
    assert pointer["shape"] == [images, 4, 512] and pointer["dtype"] == "float16"
    for method in METHODS:
        folder = artifacts / "generator" / "seed1" / "prefix" / method
        info = json.loads((folder / "prefix.json").read_text())
        assert (info["image_features"], info["tokens"], info["grid_channels"], info["dropout"]) == ("grid", 4, 512, 0.1)
        assert load_file(str(folder / "prefix.safetensors"))["image_map.weight"].shape == (32, 512)  # shared by the 4 tokens
    report = (artifacts / "eval" / "report.md").read_text()
    assert "4 image tokens, one per grid vector of the image encoder (512 wide)" in report
    # maps trained on grids are refused for pooled features, with what to do
    result = CliRunner().invoke(main, ["evaluate", "--no-track", *_overrides(tmp_path, task, tiny_lm_path, "backbone.model=aape-tiny-rn",
                                                                             "run.seeds=[1]", "prefix.vqa_shots=1")])
    assert result.exit_code == 1 and "maps grid image features, prefix.image_features is pooled: re-run distill-generator" in result.output


def test_generation_task_settings_are_checked_before_anything_runs():
    with pytest.raises(ConfigError, match="not a captioning dataset"):
        load_params(None, ["run.task=captioning", "data.dataset=flickr30k", "evaluation.methods=[prefix]"])
    with pytest.raises(ConfigError, match="do not apply to vqa"):
        load_params(None, ["run.task=vqa", "data.dataset=easy-vqa", "evaluation.methods=[prefix, coop]"])
    with pytest.raises(ConfigError, match="are captioning/VQA models"):
        load_params(None, ["evaluation.methods=[zeroshot, aape-finetuned]"])
    with pytest.raises(ConfigError, match="cross_datasets holds captioning test sets"):
        load_params(None, ["run.task=captioning", "data.dataset=coco", "evaluation.methods=[prefix]", "evaluation.cross_datasets=[eurosat]"])


def test_dvc_repro_runs_the_image_text_tasks_and_reruns_only_what_a_changed_setting_feeds(tmp_path, tiny_lm_path):
    """dvc.yaml serves every task: captioning from scratch through every stage (generate-prompts reads
    the captions, not classes.json), and a decoding setting reruns only evaluate."""
    import shutil

    import yaml

    from aape.config import dump_params
    from tests.test_orchestration_e2e import REPO, _ran_stages, _sh

    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    shutil.copytree(REPO / "aape", project / "aape", ignore=shutil.ignore_patterns("__pycache__"))
    overrides = [a for a in _overrides(tmp_path, "captioning", tiny_lm_path, "run.seeds=[1]", "tracking.enabled=false",
                                       "evaluation.methods=[prefix, aape-finetuned]", "prefix.decoding=[greedy]") if a != "-s"]
    params = load_params(None, [o for o in overrides if not o.startswith("run.output_dir=")] + ["run.output_dir=artifacts"])
    dump_params(params, project / "params.yaml")
    for args in (["git", "init", "-q"], ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "i"],
                 ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"]):
        _sh(args, project)
    assert _ran_stages(_sh(["dvc", "repro"], project).stdout) == list(STAGES)
    metrics = json.loads((project / "artifacts" / "eval" / "metrics.json").read_text())
    assert "captioning/easy-vqa/aape-finetuned/greedy/cider_d_mean" in metrics and metrics["random_init"] is True
    assert "up to date" in _sh(["dvc", "status"], project).stdout

    tree = yaml.safe_load((project / "params.yaml").read_text())
    tree["prefix"]["top_p"] = 0.5  # decoding only
    (project / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    assert _ran_stages(_sh(["dvc", "repro"], project).stdout) == ["evaluate"]



def test_the_prefect_flow_runs_vqa_with_an_mlflow_run_per_model(prefect_server, tmp_path, tiny_lm_path):
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from flows.pipeline import pipeline

    db = tmp_path / "mlflow.db"
    overrides = [a for a in _overrides(tmp_path, "vqa", tiny_lm_path, "run.seeds=[1]", "prefix.schedule.epochs=1") if a != "-s"]
    overrides += [f"tracking.uri=sqlite:///{db}", f"tracking.artifact_location={tmp_path / 'mlartifacts'}"]
    params_file = str(Path(__file__).resolve().parents[1] / "params.yaml")
    result = pipeline(params_file=params_file, overrides=overrides, record_in_dvc=False)
    assert result["model"]["registered_model"] is None
    client = MlflowClient(f"sqlite:///{db}")
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("aape").experiment_id])}
    for method in METHODS:
        mean = runs[f"{method} · easy-vqa vqa · greedy · mean of 1 seeds"]
        assert {"vqa_accuracy", "vqa_accuracy_std"} <= set(mean.data.metrics)
        assert mean.data.params["method"] == method and mean.data.params["lm"] == str(tiny_lm_path)
    assert runs["aape-finetuned · easy-vqa vqa · greedy · mean of 1 seeds"].data.params["lambda_distill"] == "5.0"
    assert "aape-finetuned prefix/seed1" in runs  # the training run, with its curves


COLOURS = ("red", "green", "blue", "yellow", "black", "gray", "teal", "brown", "red", "blue", "green", "yellow")


def _coco_vqav2_nocaps(root):
    """A tiny COCO (Karpathy's split file, train2014/ and val2014/ images), VQAv2's question and
    annotation files for both subsets, and a NoCaps validation set, in the layouts the datasets ship."""
    from PIL import Image

    def dump(path, data):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))

    karpathy, questions, annotations = [], {"train": [], "val": []}, {"train": [], "val": []}
    for i, colour in enumerate(COLOURS):
        subset, split = ("train", "train") if i < 6 else ("val", "val" if i < 9 else "test")
        name = f"COCO_{subset}2014_{i + 1:012d}.jpg"
        (root / "coco" / f"{subset}2014").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), colour).save(root / "coco" / f"{subset}2014" / name)
        karpathy.append({"filepath": f"{subset}2014", "filename": name, "cocoid": i + 1, "split": split, "imgid": i,
                         "sentences": [{"raw": f"a {colour} shape {w}.", "tokens": []} for w in ("image", "picture", "there", "this", "small")]})
        for q, (question, answer) in enumerate((("what color is the shape?", colour), ("is there a shape?", "yes"))):
            qid = (i + 1) * 10 + q
            questions[subset].append({"image_id": i + 1, "question": question, "question_id": qid})
            answers = [{"answer": answer, "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)]
            annotations[subset].append({"question_id": qid, "image_id": i + 1, "answers": answers, "multiple_choice_answer": answer})
    dump(root / "coco" / "dataset_coco.json", {"images": karpathy, "dataset": "coco"})
    for subset in ("train", "val"):
        dump(root / "vqav2" / f"v2_OpenEnded_mscoco_{subset}2014_questions.json", {"data_subtype": f"{subset}2014", "questions": questions[subset]})
        dump(root / "vqav2" / f"v2_mscoco_{subset}2014_annotations.json", {"data_subtype": f"{subset}2014", "annotations": annotations[subset]})
    images, captions = [], []
    for i, colour in enumerate(("teal", "gray", "black")):
        (root / "nocaps" / "validation").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), colour).save(root / "nocaps" / "validation" / f"{i}.jpg")
        images.append({"id": i, "file_name": f"{i}.jpg", "open_images_id": f"{i:016x}", "domain": "out-domain"})
        captions += [{"image_id": i, "caption": f"a {colour} shape number {k}.", "id": i * 10 + k} for k in range(10)]
    dump(root / "nocaps" / "nocaps_val_4500_captions.json", {"images": images, "annotations": captions})


@pytest.fixture(scope="module")
def real_layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    _coco_vqav2_nocaps(root)
    return root


def test_captioning_on_coco_is_also_tested_on_nocaps_validation(real_layouts, tmp_path, tiny_lm_path):
    artifacts, _ = _run(tmp_path, "captioning", tiny_lm_path, "data.dataset=coco", f"data.root={real_layouts}", "run.seeds=[1]",
                        "evaluation.cross_datasets=[nocaps]", "prefix.decoding=[greedy]")
    results = pd.read_parquet(artifacts / "eval" / "results.parquet")
    assert set(zip(results["scope"], results["dataset"])) == {("captioning", "coco"), ("captioning-transfer", "nocaps")}
    generations = pd.read_parquet(artifacts / "eval" / "generations.parquet")
    assert len(generations[generations["dataset"] == "coco"]) == 3 * len(METHODS)  # Karpathy's test split: 3 images
    assert len(generations[generations["dataset"] == "nocaps"]) == 3 * len(METHODS)
    assert "## nocaps (zero-shot transfer from coco)" in (artifacts / "eval" / "report.md").read_text()


def test_vqa_on_vqav2_asks_the_questions_of_karpathys_test_images_with_ten_answers(real_layouts, tmp_path, tiny_lm_path):
    artifacts, _ = _run(tmp_path, "vqa", tiny_lm_path, "data.dataset=vqav2", f"data.root={real_layouts}", "run.seeds=[1]")
    test = pd.read_parquet(artifacts / "data" / "vqa_test.parquet")
    assert sorted(test["image_id"].unique()) == ["10", "11", "12"] and test["answers"].map(len).eq(10).all()
    assert len(pd.read_parquet(artifacts / "data" / "vqa_train.parquet")) == 12  # 6 train images x 2 questions
    results = pd.read_parquet(artifacts / "eval" / "results.parquet")
    assert set(results["dataset"]) == {"vqav2"} and results["vqa_accuracy"].between(0, 100).all()
