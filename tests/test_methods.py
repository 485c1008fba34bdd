"""The prompt learners and adapters AAPE is compared with (aape/methods/): value checks at their
published starting points, training that lowers the loss, checkpoints that round-trip and refuse
another backbone, and the registry that every list of methods comes from."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from test_eval_stage import CLASSNAMES, _params, write_run  # noqa: E402

from aape.config import ConfigError, load_params  # noqa: E402
from aape.data.manifests import ClassesManifest  # noqa: E402
from aape.features import load_bundle  # noqa: E402
from aape.method.checkpoint import CheckpointMismatchError  # noqa: E402
from aape.methods import registry  # noqa: E402
from aape.methods.context import MethodContext  # noqa: E402
from aape.methods.prompt_encoder import PromptEncoder  # noqa: E402
from aape.methods.registry import METHODS, TRAIN_BASELINES, MethodSpec, trained_by  # noqa: E402
from aape.tracking import NullTracker, RecordingTracker  # noqa: E402

TRAINED = trained_by(TRAIN_BASELINES)
SHORT = [f"baselines.{METHODS[m].key}.schedule.epochs=2" for m in TRAINED]

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_backbone):
    """Toy features of the tiny backbone's width, the baselines trained for 2 epochs on seed 1 and 2."""
    from aape.stages import train_baselines

    params = _params(tmp_path_factory.mktemp("methods"), f"evaluation.methods=[zeroshot, {', '.join(TRAINED)}, aape]", *SHORT)
    layout = write_run(params)
    summary = train_baselines.run(params)
    return params, layout, summary


def _context(params, layout, backbone, seed=1) -> MethodContext:
    info = ClassesManifest.read(layout.classes_file)
    return MethodContext(params, layout, info, load_bundle(layout, seed), lambda: backbone)


# -- starting points ---------------------------------------------------------------------------------


def test_coop_started_from_a_photo_of_a_is_the_zero_shot_prompt_token_for_token(tiny_backbone):
    encoder = PromptEncoder(tiny_backbone, CLASSNAMES, n_ctx=4)
    learnt = encoder.encode(encoder.init_context("a photo of a"))
    written = tiny_backbone.encode_texts([f"a photo of a {name}." for name in CLASSNAMES])
    assert torch.allclose(learnt, written, atol=1e-5)
    # and the prompt is cut after the last end-of-text token, not run over 77 positions
    longest = int((tiny_backbone.tokenizer([f"a photo of a {n}." for n in CLASSNAMES]) != 0).sum(dim=1).max())
    assert encoder.length == longest < 77


def test_a_context_init_of_the_wrong_length_is_refused_with_the_count(tiny_backbone):
    from aape.methods.errors import MethodError

    encoder = PromptEncoder(tiny_backbone, CLASSNAMES, n_ctx=3)
    with pytest.raises(MethodError, match="4 tokens but n_ctx is 3"):
        encoder.init_context("a photo of a")


def test_cocoop_untrained_meta_net_output_zero_is_coop(tiny_backbone):
    from aape.methods.cocoop import ConditionalPrompts, MetaNet

    encoder = PromptEncoder(tiny_backbone, CLASSNAMES, n_ctx=4)
    meta_net = MetaNet(64, encoder.width, 16)
    torch.nn.init.zeros_(meta_net.net[2].weight)
    torch.nn.init.zeros_(meta_net.net[2].bias)
    model = ConditionalPrompts(encoder, encoder.init_context("a photo of a"), meta_net, 100.0)
    x = F.normalize(torch.randn(3, 64), dim=-1)
    written = tiny_backbone.encode_texts([f"a photo of a {name}." for name in CLASSNAMES])
    assert torch.allclose(model(x), 100.0 * x @ written.T, atol=1e-3)


def test_clip_adapter_with_ratio_zero_and_tip_adapter_with_cache_weight_zero_are_zero_shot():
    from aape.methods.clip_adapter import AdapterOverClasses, ImageAdapter
    from aape.methods.tip_adapter import CacheModel

    text = F.normalize(torch.randn(5, 64), dim=-1)
    x = F.normalize(torch.randn(7, 64), dim=-1)
    zero_shot = 100.0 * x @ text.T
    adapter = AdapterOverClasses(ImageAdapter(64, 4, ratio=0.0), text, 100.0)
    assert torch.allclose(adapter(x), zero_shot, atol=1e-5)
    keys, values = F.normalize(torch.randn(10, 64), dim=-1), F.one_hot(torch.arange(10) % 5, 5).float()
    assert torch.allclose(CacheModel(keys, values, text, 100.0, alpha=0.0, beta=1.0)(x), zero_shot, atol=1e-5)
    # and with α > 0 the cache adds exp(−β(1 − cos)) of each class's keys
    cached = CacheModel(keys, values, text, 100.0, alpha=2.0, beta=3.0)(x)
    assert torch.allclose(cached, zero_shot + 2.0 * torch.exp(-3.0 * (1 - x @ keys.T)) @ values, atol=1e-5)


def test_kgcoop_with_weight_zero_trains_exactly_as_coop(tmp_path, tiny_backbone):
    from aape.methods import coop

    params = _params(tmp_path, "run.seeds=[1]", "evaluation.methods=[coop, kgcoop]", "baselines.coop.schedule.epochs=2",
                     "baselines.kgcoop.schedule.epochs=2", "baselines.kgcoop.kg_weight=0", "baselines.kgcoop.schedule.batch_size=32")
    layout = write_run(params)
    ctx = _context(params, layout, tiny_backbone)
    coop.train(ctx, "coop", tmp_path / "coop", NullTracker())
    coop.train(ctx, "kgcoop", tmp_path / "kgcoop", NullTracker())
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "coop" / "model.safetensors")), load_file(str(tmp_path / "kgcoop" / "model.safetensors"))
    assert torch.equal(a["context"], b["context"])


def test_kgcoop_term_is_its_weight_times_one_minus_the_mean_cosine_to_the_hand_written_prompts(tiny_backbone):
    from aape.methods.coop import ContextPrompts

    encoder = PromptEncoder(tiny_backbone, CLASSNAMES[:3], n_ctx=4)
    anchor = F.normalize(torch.randn(3, 64), dim=-1)
    model = ContextPrompts(encoder, encoder.init_context("a photo of a"), 100.0, anchor, kg_weight=8.0)
    model(F.normalize(torch.randn(2, 64), dim=-1))
    text = tiny_backbone.encode_texts([f"a photo of a {n}." for n in CLASSNAMES[:3]])
    expected = 8.0 * (1 - (text * anchor).sum(-1).mean())
    assert model.regulariser().item() == pytest.approx(expected.item(), abs=1e-4)


# -- training ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", TRAINED)
def test_training_lowers_the_loss_and_records_a_history(run_dir, method):
    import json

    params, layout, summary = run_dir
    history = json.loads((layout.baseline_dir(method, 1) / "history.json").read_text())
    assert [r["epoch"] for r in history["history"]] == [1, 2]
    assert "val_accuracy" in history["initial"]
    assert summary["per_method"][method][1]["epochs"] == 2
    # a few more steps at a useful learning rate lower the training loss
    from aape.method.training import fit
    from aape.methods.training import FeatureClassification
    from aape.methods.context import backbone_loader

    ctx = MethodContext(params, layout, ClassesManifest.read(layout.classes_file), load_bundle(layout, 1), backbone_loader(params))
    model = _untrained(ctx, method)
    # labels shifted by one class, so the zero-shot start is wrong and there is something to learn
    from aape.method.objectives import TrainingSet

    data = ctx.inputs.data
    data = TrainingSet(data.views, (data.labels + 1) % len(ctx.train_classes), data.val_features, data.val_labels)
    objective = FeatureClassification(data, torch.device("cpu"))
    items, views = torch.arange(len(data.labels)), torch.zeros(len(data.labels), dtype=torch.long)
    before = objective.loss(model, items, views)[0].item()
    schedule = ctx.settings(method).schedule.model_copy(update={"lr": 0.05 if method != "tip-adapter-f" else 0.01,
                                                                "warmup_epochs": 0, "optimizer": "adamw", "weight_decay": 0.0})
    fit(model, objective, n_items=len(data.labels), n_views=1, schedule=schedule, epochs=5, seed=1)
    after = objective.loss(model, items, views)[0].item()
    # Tip-Adapter learns only its keys, against the fixed zero-shot logits: a smaller but real drop
    assert after < (0.995 if method == "tip-adapter-f" else 0.9) * before


def _untrained(ctx, method):
    from aape.methods import clip_adapter, cocoop, coop, tip_adapter

    if method in ("coop", "kgcoop"):
        return coop.make_model(ctx, method)
    if method == "cocoop":
        return cocoop.make_model(ctx, method)
    if method == "clip-adapter":
        adapter = clip_adapter.ImageAdapter(64, 4, 0.2)
        return clip_adapter.AdapterOverClasses(adapter, ctx.text.hand_written()[ctx.train_classes], 100.0)
    return tip_adapter.make_model(ctx, method)


def test_tip_adapter_searches_alpha_and_beta_on_tip_adapters_grid(run_dir):
    import json

    _, layout, summary = run_dir
    meta = json.loads((layout.baseline_dir("tip-adapter-f", 1) / "model.json").read_text())
    # toy is not a dataset Tip-Adapter has a config for: imagenet's init_alpha 1.17 and search scale [7, 3]
    assert meta["init_alpha"] == 1.17 and meta["search"] == {"beta_max": 7.0, "alpha_max": 3.0, "beta_steps": 200, "alpha_steps": 20}
    betas = [0.1 + i * (7.0 - 0.1) / 200 for i in range(200)]
    alphas = [0.1 + j * (3.0 - 0.1) / 20 for j in range(20)]
    assert min(abs(meta["beta"] - b) for b in betas) < 1e-9 and min(abs(meta["alpha"] - a) for a in alphas) < 1e-9
    assert summary["per_method"]["tip-adapter-f"][1]["searched_val_accuracy"] == meta["searched_val_accuracy"]


# -- checkpoints and evaluation ----------------------------------------------------------------------


@pytest.mark.parametrize("method", TRAINED)
def test_a_checkpoint_scores_as_the_trained_model_and_refuses_another_backbone(run_dir, tiny_backbone, method):
    import json

    params, layout, _ = run_dir
    ctx = _context(params, layout, tiny_backbone)
    classifier = METHODS[method].builder()(ctx, method)
    x = ctx.bundle.val_features
    logits = classifier.logits(x, ctx.train_classes)
    assert logits.shape == (len(x), len(ctx.train_classes)) and torch.isfinite(logits).all()
    val_accuracy = json.loads((layout.baseline_dir(method, 1) / "model.json").read_text())["val_accuracy"]
    local = ctx.inputs.data.val_labels
    if method != "tip-adapter-f":  # Tip-Adapter's α, β are searched after training, so its val figure is the search's
        assert 100.0 * float((logits.argmax(1) == local).float().mean()) == pytest.approx(val_accuracy, abs=1e-4)
    meta_path = layout.baseline_dir(method, 1) / "model.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "backbone_identity": "ViT-B-16@tag:openai"}))
    try:
        with pytest.raises(CheckpointMismatchError, match="ViT-B-16@tag:openai"):
            METHODS[method].builder()(ctx, method)
    finally:
        meta_path.write_text(json.dumps(meta))


def test_evaluation_puts_every_trained_baseline_in_the_report_metrics_and_tracker(run_dir):
    from aape.stages import evaluate

    params, layout, _ = run_dir
    tracker = RecordingTracker()
    evaluate.run(params, tracker=tracker)
    report = (layout.eval / "report.md").read_text()
    import json

    metrics = json.loads(layout.metrics.read_text())
    for method in TRAINED:
        assert f"| {METHODS[method].title} |" in report
        assert f"base2new/{method}/base_accuracy_mean" in metrics
        names = [c.name for c in tracker.children]
        assert f"{method} · toy · mean of 2 seeds" in names
    # Tip-Adapter cannot score new classes; the CoOp family and CLIP-Adapter can
    assert "base2new/tip-adapter-f/new_accuracy_mean" not in metrics or metrics["base2new/tip-adapter-f/new_accuracy_mean"] != metrics["base2new/tip-adapter-f/new_accuracy_mean"]
    assert all(f"base2new/{m}/new_accuracy_mean" in metrics for m in ("coop", "cocoop", "kgcoop", "clip-adapter"))
    assert "Tip-Adapter's cache holds only the training classes" in report


def test_evaluation_names_a_baseline_that_was_not_trained_before_any_work(tmp_path):
    from aape.evaluation.classifiers import EvaluationError
    from aape.stages import evaluate

    params = _params(tmp_path, "evaluation.methods=[zeroshot, coop]")
    write_run(params)
    with pytest.raises(EvaluationError, match=r"'coop', seed 1.*aape train-baselines"):
        evaluate.run(params)


def test_cocoop_that_cannot_fit_in_memory_stops_before_training_and_names_the_batch_that_fits(tmp_path, tiny_backbone):
    from aape.methods import cocoop
    from aape.methods.errors import MethodError

    encoder = PromptEncoder(tiny_backbone, CLASSNAMES[:3], n_ctx=4)
    per_image = encoder.activation_bytes(3)
    with pytest.raises(MethodError, match=r"batch_size: 2 \(or fewer\)"):
        cocoop.check_training_fits(encoder, batch_size=8, budget=2 * per_image + 1)
    cocoop.check_training_fits(encoder, batch_size=2, budget=2 * per_image + 1)  # fits: no error
    # through the stage, with the budget set in params.yaml
    params = _params(tmp_path, "run.seeds=[1]", "evaluation.methods=[cocoop]", "baselines.cocoop.memory_gb=0.000001",
                     "baselines.cocoop.schedule.batch_size=64")
    layout = write_run(params)
    with pytest.raises(MethodError, match="CoCoOp needs"):
        cocoop.make_model(_context(params, layout, tiny_backbone), "cocoop")


def test_activation_estimate_follows_korthikanti_et_al(tiny_backbone):
    encoder = PromptEncoder(tiny_backbone, CLASSNAMES, n_ctx=4)
    s, w, a, layers = encoder.length, 64, 2, 2
    assert encoder.activation_bytes(10) == (34 * s * w + 5 * a * s * s) * 4 // 2 * layers * 10


# -- the registry -------------------------------------------------------------------------------------


def test_config_accepts_every_registered_method_and_names_the_choices_for_an_unknown_one():
    assert load_params(None, [f"evaluation.methods=[{', '.join(METHODS)}]"]).evaluation.methods == list(METHODS)
    with pytest.raises(ConfigError) as err:
        load_params(None, ["evaluation.methods=[zeroshot, maple]"])
    assert "'maple'" in str(err.value) and all(name in str(err.value) for name in METHODS)


def test_each_trained_baseline_has_a_params_section_with_its_published_defaults():
    params = load_params(None, [])
    assert params.baselines.coop.n_ctx == 4 and params.baselines.coop.ctx_init == "a photo of a"
    assert params.baselines.coop.schedule.lr == 0.002 and params.baselines.coop.schedule.batch_size == 32
    assert params.baselines.cocoop.schedule.batch_size == 1 and params.baselines.cocoop.schedule.epochs == 10
    assert params.baselines.kgcoop.kg_weight == 8.0 and params.baselines.kgcoop.schedule.batch_size == 128
    assert params.baselines.clip_adapter.ratio == 0.2
    tip = params.baselines.tip_adapter_f.schedule
    assert (tip.optimizer, tip.lr, tip.epochs, tip.batch_size) == ("adamw", 1e-3, 20, 256)
    assert {spec.key for spec in METHODS.values() if spec.trainer == TRAIN_BASELINES} == set(type(params.baselines).model_fields)


def test_a_method_added_to_the_registry_reaches_config_report_and_tracker(tmp_path, monkeypatch):
    """One entry (pointing at a module with `build`) and nothing else: here a zero-shot on AAPE's prompts."""
    from aape.stages import evaluate

    spec = MethodSpec("photo-zeroshot", "Zero-shot on 'a photo of a {}.'", "#123456", f"{__name__}:build_photo_zeroshot")
    with pytest.raises(ConfigError, match="'photo-zeroshot'"):
        load_params(None, ["evaluation.methods=[photo-zeroshot]"])
    monkeypatch.setitem(registry.METHODS, spec.name, spec)
    assert load_params(None, ["evaluation.methods=[photo-zeroshot]"]).evaluation.methods == ["photo-zeroshot"]
    params = _params(tmp_path, "evaluation.methods=[zeroshot, photo-zeroshot]")
    write_run(params, nodistill=False)
    tracker = RecordingTracker()
    evaluate.run(params, tracker=tracker)
    assert "| Zero-shot on 'a photo of a {}.' |" in (tmp_path / "artifacts" / "eval" / "report.md").read_text()
    assert "photo-zeroshot · toy · mean of 2 seeds" in [c.name for c in tracker.children]
    from aape.evaluation.plots import method_colour

    assert method_colour("photo-zeroshot") == "#123456"


def build_photo_zeroshot(ctx, method):
    from aape.evaluation.classifiers import TextClassifier

    return TextClassifier(method, F.normalize(ctx.bundle.class_prompts, dim=-1), ctx.bundle.logit_scale)


def test_transfer_protocols_score_the_learners_from_the_target_class_names(tmp_path, tiny_backbone):
    """Cross-dataset: the CoOp family and CLIP-Adapter re-encode the target's names, Tip-Adapter is n/a;
    domain shift: all of them score the training dataset's classes through the mapping."""
    import math

    import pandas as pd
    from safetensors.torch import load_file

    from aape.evaluation.transfer import load_transfer_targets
    from aape.stages import evaluate, train_baselines
    from test_eval_stage import write_transfer_datasets

    write_transfer_datasets(tmp_path / "data")
    methods = "[zeroshot, coop, cocoop, clip-adapter, tip-adapter-f]"
    params = _params(tmp_path, "run.seeds=[1]", f"evaluation.methods={methods}", "evaluation.cross_datasets=[cifar10]",
                     "evaluation.domain_shift=[imagenet_sketch]", *SHORT)
    layout = write_run(params, nodistill=False)
    train_baselines.run(params)
    evaluate.run(params)
    results = pd.read_parquet(layout.eval / "results.parquet")
    cross = results[results["scope"] == "cross-dataset"].set_index("method")["accuracy"]
    shift = results[results["scope"] == "domain-shift"].set_index("method")["accuracy"]
    assert all(not math.isnan(cross[m]) for m in ("coop", "cocoop", "clip-adapter")) and math.isnan(cross["tip-adapter-f"])
    assert all(not math.isnan(shift[m]) for m in ("coop", "cocoop", "clip-adapter"))
    # CoOp's cross-dataset figure is its learnt context in front of the target's own class names
    info = ClassesManifest.read(layout.classes_file)
    (target,) = [t for t in load_transfer_targets(params, layout, info, load_bundle(layout, 1)) if t.name.lower().startswith("cifar")]
    context = load_file(str(layout.baseline_dir("coop", 1) / "model.safetensors"))["context"]
    text = PromptEncoder(tiny_backbone, target.classnames, 4).encode(context)
    expected = 100.0 * float(((target.features @ text.T).argmax(1) == target.labels).float().mean())
    assert cross["coop"] == pytest.approx(expected, abs=1e-6)


def test_a_validation_budget_keeps_every_class_represented():
    from aape.method.objectives import TrainingSet
    from aape.methods.training import FeatureClassification

    labels = torch.arange(50).repeat_interleave(4)  # the split's order: class by class
    data = TrainingSet(torch.zeros(1, 1, 8), torch.zeros(1, dtype=torch.long), torch.zeros(200, 8), labels)
    rows = FeatureClassification(data, torch.device("cpu"), val_images=50).val_rows
    assert len(rows) == 50 and set(labels[rows].tolist()) == set(range(50))
    assert len(FeatureClassification(data, torch.device("cpu")).val_rows) == 200


def test_the_few_shot_protocol_trains_and_scores_every_learner_on_all_classes(tmp_path):
    import json

    from aape.stages import evaluate, train_baselines

    params = _params(tmp_path, "run.seeds=[1]", f"evaluation.methods=[zeroshot, {', '.join(TRAINED)}]", *SHORT)
    layout = write_run(params, protocol="fewshot", nodistill=False)
    train_baselines.run(params)
    evaluate.run(params)
    metrics = json.loads(layout.metrics.read_text())
    assert all(f"fewshot/{m}/accuracy_mean" in metrics for m in TRAINED)  # Tip-Adapter too: its cache holds every class
    meta = json.loads((layout.baseline_dir("tip-adapter-f", 1) / "model.json").read_text())
    assert meta["train_classnames"] == CLASSNAMES


def test_the_report_puts_published_numbers_beside_each_baseline_when_the_backbone_matches():
    from aape.evaluation.metrics import MeanStd
    from aape.evaluation.report import ReportContext, render_report

    methods = ["zeroshot", "coop", "cocoop", "kgcoop", "clip-adapter", "tip-adapter-f", "aape"]
    summary = {("base2new", "eurosat", m): {"base_accuracy": MeanStd(80.0, 1.0, 3), "new_accuracy": MeanStd(70.0, 1.0, 3),
                                            "H": MeanStd(74.7, 1.0, 3)} for m in methods}
    text = render_report(ReportContext(dataset="eurosat", protocol="base2new", shots=16, seeds=[1, 2, 3], backbone_model="ViT-B-16",
                                       pretrained="openai", identity="ViT-B-16@tag:openai", random_init=False, methods=methods,
                                       summary=summary))
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert rows["CoOp (learnt context)"].endswith("| 82.69 | 63.22 | 71.66 |")
    assert rows["CoCoOp (image-conditioned context)"].endswith("| 80.47 | 71.69 | 75.83 |")
    assert rows["KgCoOp (knowledge-guided CoOp)"].endswith("| 80.73 | 73.60 | 77.00 |")
    assert rows["CLIP-Adapter (residual image adapter)"].endswith("|  |  |  |")  # nothing published for this protocol
