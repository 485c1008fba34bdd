"""The train-aggregator and distill-generator stages on synthetic feature files in the contract format
(docs/architecture.md, features/), with non-contiguous global labels for the training classes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from aape.atomic import atomic_save_tensors
from aape.config import load_params
from aape.data.manifests import ClassesManifest
from aape.layout import Layout
from aape.method import AAPEModel, MissingDescriptionsError, load_aggregator
from aape.method.inputs import StageInputError
from aape.method.objectives import DistillObjective
from aape.method.synthetic import make_world
from aape.stages import distill_generator, train_aggregator
from aape.tracking import RecordingTracker


pytestmark = pytest.mark.usefixtures("single_torch_thread")


IDENTITY = "aape-tiny@random-init"
CLASSNAMES = ["ant", "bee", "cat", "dog", "eel", "fox"]
TRAIN = [1, 3, 5]  # base classes as global labels: local 0, 1, 2


def write_artifacts(
    root: Path, seeds=(1,), dim: int = 32, drop_descriptions_of: int | None = None, negate_descriptions: bool = False
) -> None:
    """classes.json, a tiny descriptions.parquet and features/ as extract-features writes them."""
    world = make_world(classes=6, dim=dim, shots=4, views=3, val_shots=2, relevant=3, irrelevant=5, seed=7)
    layout = Layout(root, root / "cache")
    layout.data.mkdir(parents=True)
    layout.classes_file.write_text(
        json.dumps(
            {"dataset": "synthetic", "image_root": "x", "classnames": CLASSNAMES, "protocol": "base2new",
             "train_classes": TRAIN, "eval_sets": {"base": TRAIN, "new": [0, 2, 4]}, "split_hash": "0",
             "seeds": list(seeds), "shots": 4}
        )
    )  # fmt: skip
    meta = {"identity": IDENTITY, "random_init": True, "embed_dim": dim}
    global_of = torch.tensor(TRAIN)
    for seed in seeds:
        in_train = torch.isin(world.data.labels, global_of)
        in_val = torch.isin(world.data.val_labels, global_of)
        folder = layout.features / f"seed{seed}"
        atomic_save_tensors(
            folder / "train.safetensors",
            {"views": world.data.views[in_train], "clean": world.clean[in_train],
             "labels": world.data.labels[in_train], "rows": torch.arange(int(in_train.sum()))},
            meta,
        )  # fmt: skip
        atomic_save_tensors(folder / "val.safetensors", {"features": world.data.val_features[in_val], "labels": world.data.val_labels[in_val]}, meta)
    atomic_save_tensors(layout.features / "test.safetensors", {"features": world.data.val_features, "labels": world.data.val_labels}, meta)
    owner = torch.arange(6).repeat_interleave(world.bank.embeddings.shape[1])
    flat = world.bank.embeddings.flatten(0, 1) * (-1 if negate_descriptions else 1)
    if drop_descriptions_of is not None:
        flat, owner = flat[owner != drop_descriptions_of], owner[owner != drop_descriptions_of]
    text = {"class_prompts": world.class_text, "class_ensemble": world.class_text.clone(), "descriptions": flat, "description_class": owner}
    atomic_save_tensors(layout.features / "text.safetensors", text, meta)
    (layout.features / "index.json").write_text(
        json.dumps({**meta, "logit_scale": 14.29, "seeds": list(seeds), "classnames": CLASSNAMES})
    )
    layout.prompts.mkdir(parents=True)
    pd.DataFrame(
        {"dataset": "synthetic", "class_index": owner.tolist(), "class_name": [CLASSNAMES[i] for i in owner.tolist()],
         "text": [f"a {CLASSNAMES[i]} description" for i in owner.tolist()]}
    ).to_parquet(layout.descriptions)  # fmt: skip


def _params(tmp_path: Path, *extra: str):
    return load_params(
        None,
        [
            f"run.output_dir={tmp_path / 'artifacts'}",
            f"run.cache_dir={tmp_path / 'cache'}",
            "run.seeds=[1]",
            "run.device=cpu",
            "backbone.model=aape-tiny",
            "backbone.pretrained=random-init",
            "tracking.enabled=false",
            "data.shots=4",
            "aggregator.heads=4",
            "aggregator.schedule.epochs=4",
            "aggregator.schedule.batch_size=4",
            "generator.schedule.epochs=6",
            "generator.schedule.batch_size=4",
            *extra,
        ],
    )


@pytest.fixture
def artifacts(tmp_path):
    write_artifacts(tmp_path / "artifacts")
    return tmp_path


def test_both_stages_write_their_artifacts_and_the_model_classifies(artifacts):
    params = _params(artifacts)
    layout = Layout.from_params(params)
    tracker = RecordingTracker()
    agg_summary = train_aggregator.run(params, tracker=tracker)
    out = layout.aggregator / "seed1"
    assert {p.name for p in out.iterdir()} == {"aggregator.safetensors", "aggregator.json", "summaries.safetensors", "history.json"}
    assert {Path(p).name for p in agg_summary["outputs"]} >= {"aggregator.json", "summaries.safetensors"}
    meta = json.loads((out / "aggregator.json").read_text())
    assert meta["random_init"] is True and meta["backbone_identity"] == IDENTITY and meta["embed_dim"] == 32
    assert meta["classnames"] == ["bee", "dog", "fox"] and meta["variant"] == "attention"
    assert 1 <= meta["best_epoch"] <= 4 and meta["descriptions_per_class"] == [8, 8, 8]
    saved = load_file(str(out / "summaries.safetensors"))
    assert saved["summaries"].shape == (12, 3, 32) and saved["clean"].shape == (12, 32)
    torch.testing.assert_close(saved["summaries"].norm(dim=-1), torch.ones(12, 3))
    assert set(saved["labels"].tolist()) == set(TRAIN)
    history = json.loads((out / "history.json").read_text())
    assert [r["epoch"] for r in history["history"]] == [1, 2, 3, 4] and "val_reward" in history["history"][0]
    aggregator = load_aggregator(out, expect_identity=IDENTITY)
    assert aggregator.attention_weights(saved["clean"][:2], torch.randn(5, 32)).shape == (2, 5)

    gen_summary = distill_generator.run(params, tracker=tracker)
    out = layout.generator / "seed1"
    assert {p.name for p in out.iterdir()} == {"generator.safetensors", "generator.json", "history.json", "nodistill"}
    meta = json.loads((out / "generator.json").read_text())
    assert meta["lambda_distill"] == 5.0 and meta["random_init"] is True and meta["logit_scale"] == 14.29
    assert meta["train_classnames"] == ["bee", "dog", "fox"] and meta["train_classes"] == TRAIN
    assert meta["class_template"] == "a photo of a {}."
    assert 1 <= meta["best_epoch"] <= 6 and 0 <= meta["best_val_accuracy"] <= 1
    assert json.loads((out / "nodistill" / "generator.json").read_text())["lambda_distill"] == 0.0
    assert gen_summary["params_h"] == 32 * 32 + 32 + 32 * 32 + 32
    model = AAPEModel.load(out, expect_identity=IDENTITY, expect_embed_dim=32)
    test = load_file(str(layout.features / "test.safetensors"))
    text = load_file(str(layout.features / "text.safetensors"))
    logits = model.logits(test["features"], text["class_prompts"])  # any classes, e.g. all six
    assert logits.shape == (len(test["labels"]), 6) and torch.isfinite(logits).all()
    # parameter counts went to the tracker, per-epoch curves too
    child = next(c for c in tracker.children if c.name == "aape/seed1")
    assert child.params["params_h"] == gen_summary["params_h"] and child.tags["random_init"] == "true"
    assert sorted({s for n, _, s in child.metrics if n == "val_accuracy"}) == [0, 1, 2, 3, 4, 5, 6]  # 0: untrained
    assert not (out / "resume.pt").exists()


def test_the_checkpoint_keeps_the_last_epoch_by_default_and_history_has_the_diagnostics(artifacts):
    params = _params(artifacts)
    train_aggregator.run(params)
    distill_generator.run(params)
    layout = Layout.from_params(params)
    out = layout.generator / "seed1"
    record = json.loads((out / "history.json").read_text())
    meta = json.loads((out / "generator.json").read_text())
    assert record["select"] == "last" and meta["best_epoch"] == 6 == record["history"][-1]["epoch"]
    assert meta["best_val_loss"] == pytest.approx(record["history"][-1]["val_loss"])
    # before the first step the default model is zero-shot CLIP: its validation figures are recorded
    assert record["initial"]["epoch"] == 0 and 0.0 <= record["initial"]["val_accuracy"] <= 1.0
    for epoch in (record["initial"], *record["history"]):  # held-out distillation beside the constant predictor
        assert {"val_distill", "val_distill_constant", "distill_ratio"} <= set(epoch)
        assert epoch["distill_ratio"] == pytest.approx(epoch["val_distill"] / epoch["val_distill_constant"])
    aggregator = json.loads((layout.aggregator / "seed1" / "history.json").read_text())
    for epoch in (aggregator["initial"], *aggregator["history"]):
        assert 0.0 < epoch["attention_entropy"] <= 1.0 + 1e-6 and epoch["summary_shift"] >= 0.0
    assert aggregator["initial"]["attention_entropy"] > 0.9  # untrained attention is near uniform


def test_best_on_validation_is_kept_when_asked(artifacts):
    params = _params(artifacts, "generator.schedule.select=best-val")
    train_aggregator.run(params)
    distill_generator.run(params)
    out = Layout.from_params(params).generator / "seed1"
    history = json.loads((out / "history.json").read_text())["history"]
    meta = json.loads((out / "generator.json").read_text())
    best = max(history, key=lambda r: (r["val_accuracy"], -r["val_loss"], r["epoch"]))
    assert meta["best_epoch"] == best["epoch"]
    assert meta["best_val_loss"] == pytest.approx(best["val_loss"])


def test_both_stages_take_shots_and_dataset_from_the_prepared_data_not_params(artifacts):
    """CoOp's epoch count follows the shots the few-shot draws were made with (classes.json), even when
    params.data.shots says otherwise now (say, a `-s data.shots=16` override on a later stage)."""
    params = _params(artifacts, "data.shots=16", "aggregator.schedule.epochs=auto", "generator.schedule.epochs=auto",
                     "evaluation.methods=[aape]")  # fmt: skip
    layout = Layout.from_params(params)
    prepared = ClassesManifest.read(layout.classes_file)
    dataclasses.replace(prepared, shots=1).write(layout.classes_file)  # drawn with 1 shot: CoOp's 50 epochs
    train_aggregator.run(params)
    distill_generator.run(params)
    assert json.loads((layout.aggregator / "seed1" / "aggregator.json").read_text())["epochs"] == 50
    assert json.loads((layout.generator / "seed1" / "generator.json").read_text())["epochs"] == 50


def test_nodistill_is_skipped_when_evaluation_does_not_ask_for_it(artifacts):
    params = _params(artifacts, "evaluation.methods=[aape]")
    train_aggregator.run(params)
    distill_generator.run(params)
    assert not (Layout.from_params(params).generator / "seed1" / "nodistill").exists()


@pytest.mark.parametrize("variant", ["mean", "random", "mlp", "literal"])
def test_every_aggregator_variant_runs_through_both_stages(artifacts, variant):
    params = _params(artifacts, f"aggregator.variant={variant}", "evaluation.methods=[aape]")
    summary = train_aggregator.run(params)
    meta = json.loads((Layout.from_params(params).aggregator / "seed1" / "aggregator.json").read_text())
    assert meta["variant"] == variant
    assert meta["epochs"] == (0 if variant in ("mean", "random") else 4)
    assert summary["val_reward_mean"] > 0
    distilled = distill_generator.run(params)
    generator = json.loads((Layout.from_params(params).generator / "seed1" / "generator.json").read_text())
    assert generator["aggregator_variant"] == variant and generator["lambda_distill"] > 0  # trained on this variant's p^a
    assert 0.0 <= distilled["per_seed"][1]["aape"]["best_val_accuracy"] <= 1.0


def test_distillation_without_aggregator_output_says_which_stage_to_run(artifacts):
    with pytest.raises(StageInputError, match="run `aape train-aggregator`"):
        distill_generator.run(_params(artifacts))


def test_summaries_from_another_backbone_are_refused(artifacts):
    params = _params(artifacts)
    train_aggregator.run(params)
    index = Layout.from_params(params).features / "index.json"
    meta = json.loads(index.read_text())
    for name in ("seed1/train.safetensors", "seed1/val.safetensors", "test.safetensors", "text.safetensors"):
        path = index.parent / name
        atomic_save_tensors(path, load_file(str(path)), {**meta, "identity": "ViT-B-16@tag:openai"})
    index.write_text(json.dumps({**meta, "identity": "ViT-B-16@tag:openai"}))
    with pytest.raises(StageInputError, match="re-run `aape train-aggregator`"):
        distill_generator.run(params)


def test_a_training_class_without_descriptions_is_named(tmp_path):
    write_artifacts(tmp_path / "artifacts", drop_descriptions_of=3)
    with pytest.raises(MissingDescriptionsError, match=r"3 \(dog\)"):
        train_aggregator.run(_params(tmp_path))


def test_a_reward_without_signal_is_reported(tmp_path, caplog):
    # descriptions pointing away from their images: cos(x, p^a) < 0 everywhere, the clamped reward is 0
    write_artifacts(tmp_path / "artifacts", negate_descriptions=True)
    with caplog.at_level("WARNING", logger="aape"):
        summary = train_aggregator.run(_params(tmp_path))
    assert summary["val_reward_mean"] == 0.0
    assert "the CLIP reward was zero" in caplog.text and "expected with a RANDOM-INIT backbone" in caplog.text


def test_an_interrupted_stage_resumes_to_the_same_model(artifacts, tmp_path, monkeypatch):
    params = _params(artifacts, "evaluation.methods=[aape]", "generator.schedule.epochs=5")
    train_aggregator.run(params)
    out = Layout.from_params(params).generator / "seed1"
    distill_generator.run(params)
    reference = load_file(str(out / "generator.safetensors"))
    (out / "generator.safetensors").unlink()
    original, calls = DistillObjective.loss, {"n": 0}

    def crash(self, *args):
        calls["n"] += 1
        if calls["n"] == 3 * 3 + 1:  # 12 images / batch 4 = 3 batches an epoch: first batch of epoch 4
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(DistillObjective, "loss", crash)
    with pytest.raises(KeyboardInterrupt):
        distill_generator.run(params)
    assert (out / "resume.pt").exists() and not (out / "generator.safetensors").exists()
    monkeypatch.setattr(DistillObjective, "loss", original)
    distill_generator.run(params)
    resumed = load_file(str(out / "generator.safetensors"))
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert not (out / "resume.pt").exists()


def test_stages_run_from_the_command_line(artifacts):
    from aape.cli import main

    args = [f"-s{o}" for o in ("run.output_dir=" + str(artifacts / "artifacts"), "run.seeds=[1]", "run.device=cpu",
            "tracking.enabled=false", "aggregator.heads=4", "aggregator.schedule.epochs=2",
            "generator.schedule.epochs=2", "evaluation.methods=[aape]")]  # fmt: skip
    params_file = Path(__file__).resolve().parents[1] / "params.yaml"
    runner = CliRunner()
    for command in ("train-aggregator", "distill-generator"):
        result = runner.invoke(main, [command, "--params", str(params_file), *args])
        assert result.exit_code == 0, result.output
        assert f"[{command}] done" in result.output
    assert (artifacts / "artifacts" / "generator" / "seed1" / "generator.safetensors").exists()
