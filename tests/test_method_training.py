"""Training h and g: the CoOp schedule, reproducibility, resuming, selection on validation, the
distillation term, and checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.nn import functional as F

from aape.config import ScheduleConfig
from aape.method import (
    AAPEModel,
    CheckpointError,
    CheckpointMismatchError,
    NonFiniteLossError,
    build_aggregator,
    compute_summaries,
    epoch_draw,
    fit,
    seeded,
    train_aggregator,
    train_generator,
)
from aape.method.objectives import DistillObjective
from aape.method.schedule import lr_at
from aape.method.synthetic import make_world
from aape.method.training import batches_of
from aape.tracking import RecordingTracker


pytestmark = pytest.mark.usefixtures("single_torch_thread")


SCHEDULE = ScheduleConfig(epochs=30, batch_size=8)  # CoOp's SGD 0.002, warm-up, cosine


@pytest.fixture(scope="module")
def world():
    return make_world(seed=0)


@pytest.fixture(scope="module")
def summaries(world):
    with seeded(1):
        aggregator = build_aggregator("attention", 64, heads=4)
    train_aggregator(aggregator, world.data, world.bank, ScheduleConfig(lr=0.1, epochs=10, batch_size=8), 10, seed=1)
    views, _ = compute_summaries(aggregator, world.data.views, world.clean, world.data.labels, world.bank)
    return views


def _train(world, targets, lam, seed=1, schedule=SCHEDULE, **kw):
    with seeded(seed):
        model = AAPEModel(64, logit_scale=100.0)
    result = train_generator(model, world.data, world.class_text, targets, lam, schedule, schedule.epochs, seed, **kw)
    return model, result


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# schedule and draws -----------------------------------------------------------------------------


def test_coop_schedule_warmup_then_cosine():
    s = ScheduleConfig()  # defaults: SGD, lr 0.002, 1 warm-up epoch at 1e-5, batch 32
    assert (s.optimizer, s.lr, s.warmup_epochs, s.warmup_lr, s.batch_size) == ("sgd", 0.002, 1, 1e-5, 32)
    assert lr_at(0, s, 200) == 1e-5
    assert lr_at(1, s, 200) == pytest.approx(0.002)
    assert lr_at(101, s, 200) == pytest.approx(0.001)
    assert lr_at(199, s, 200) == pytest.approx(0.001 * (1 + math.cos(math.pi * 198 / 200)))
    rates = [lr_at(e, s, 200) for e in range(1, 200)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    assert (s.resolved_epochs(16, "eurosat"), s.resolved_epochs(4, "dtd"), s.resolved_epochs(1, "dtd"), s.resolved_epochs(16, "imagenet")) == (200, 100, 50, 50)


def test_each_epoch_draws_a_fresh_but_reproducible_order_and_view():
    order, views = epoch_draw(seed=1, epoch=3, n_items=50, n_views=4)
    again = epoch_draw(seed=1, epoch=3, n_items=50, n_views=4)
    assert torch.equal(order, again[0]) and torch.equal(views, again[1])
    assert sorted(order.tolist()) == list(range(50)) and set(views.tolist()) <= {0, 1, 2, 3}
    nxt = epoch_draw(seed=1, epoch=4, n_items=50, n_views=4)
    other_seed = epoch_draw(seed=2, epoch=3, n_items=50, n_views=4)
    assert not torch.equal(views, nxt[1]) and not torch.equal(order, nxt[0])
    assert not torch.equal(order, other_seed[0])


def test_batches_drop_an_incomplete_last_batch_like_dassl():
    assert [len(b) for b in batches_of(torch.arange(70), 32)] == [32, 32]
    assert [len(b) for b in batches_of(torch.arange(64), 32)] == [32, 32]
    assert [len(b) for b in batches_of(torch.arange(20), 32)] == [20]  # fewer than a batch: keep it


# reproducibility and resuming ------------------------------------------------------------------


def test_same_seed_gives_identical_weights_and_another_seed_does_not(world, summaries):
    a, _ = _train(world, summaries, 5.0, seed=1)
    b, _ = _train(world, summaries, 5.0, seed=1)
    c, _ = _train(world, summaries, 5.0, seed=2)
    assert _same_weights(a, b)
    assert not _same_weights(a, c)


class _Interrupt(Exception):
    pass


def test_interrupted_training_resumes_to_identical_weights(tmp_path, world, summaries, monkeypatch):
    straight, straight_result = _train(world, summaries, 5.0)
    resume = tmp_path / "resume.pt"
    calls = {"n": 0}
    original = DistillObjective.loss

    def crash_in_epoch_5(self, model, items, views):
        calls["n"] += 1
        if calls["n"] == 4 * 5 + 2:  # 5 batches an epoch: second batch of epoch 5
            raise _Interrupt
        return original(self, model, items, views)

    monkeypatch.setattr(DistillObjective, "loss", crash_in_epoch_5)
    with pytest.raises(_Interrupt):
        _train(world, summaries, 5.0, resume_path=resume, fingerprint="run-a")
    assert torch.load(resume, weights_only=True)["epochs_done"] == 4
    monkeypatch.setattr(DistillObjective, "loss", original)
    resumed, result = _train(world, summaries, 5.0, resume_path=resume, fingerprint="run-a")
    assert result.resumed_from == 4
    assert _same_weights(straight, resumed)
    assert result.best_epoch == straight_result.best_epoch
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(result.history) == strip(straight_result.history)


def test_an_interrupted_best_val_run_resumes_to_the_same_selection(tmp_path, world, summaries, monkeypatch):
    """The resume state carries the selection too: the kept epoch, its weights and figures, and the
    untrained model's figures come out as in a straight run."""
    schedule = ScheduleConfig(epochs=12, batch_size=8, select="best-val")
    straight, straight_result = _train(world, summaries, 5.0, schedule=schedule)
    resume, calls, original = tmp_path / "resume.pt", {"n": 0}, DistillObjective.loss

    def crash_in_epoch_8(self, model, items, views):
        calls["n"] += 1
        if calls["n"] == 7 * 5 + 3:
            raise _Interrupt
        return original(self, model, items, views)

    monkeypatch.setattr(DistillObjective, "loss", crash_in_epoch_8)
    with pytest.raises(_Interrupt):
        _train(world, summaries, 5.0, schedule=schedule, resume_path=resume, fingerprint="best")
    monkeypatch.setattr(DistillObjective, "loss", original)
    resumed, result = _train(world, summaries, 5.0, schedule=schedule, resume_path=resume, fingerprint="best")
    assert result.resumed_from == 7 and _same_weights(straight, resumed)
    assert (result.best_epoch, result.best_figures, result.initial) == (straight_result.best_epoch, straight_result.best_figures, straight_result.initial)
    assert all(torch.equal(straight_result.best_state[k], v) for k, v in result.best_state.items())


def test_a_resume_state_of_another_configuration_is_ignored(tmp_path, world, summaries):
    resume = tmp_path / "resume.pt"
    _train(world, summaries, 5.0, resume_path=resume, fingerprint="lambda-5")
    fresh, result = _train(world, summaries, 1.0, resume_path=resume, fingerprint="lambda-1")
    assert result.resumed_from == 0
    reference, _ = _train(world, summaries, 1.0)
    assert _same_weights(fresh, reference)


def test_non_finite_loss_stops_naming_epoch_and_batch_and_keeps_finished_epochs(tmp_path, world, summaries, monkeypatch):
    original = DistillObjective.loss
    calls = {"n": 0}

    def nan_in_epoch_3_batch_2(self, model, items, views):
        calls["n"] += 1
        loss, figures = original(self, model, items, views)
        return (loss * float("nan") if calls["n"] == 2 * 5 + 2 else loss), figures

    monkeypatch.setattr(DistillObjective, "loss", nan_in_epoch_3_batch_2)
    resume = tmp_path / "resume.pt"
    with pytest.raises(NonFiniteLossError, match=r"nan at epoch 3 of 30, batch 2 of 5") as err:
        _train(world, summaries, 5.0, resume_path=resume, fingerprint="f")
    assert "schedule.lr" in str(err.value) and str(resume) in str(err.value)
    assert torch.load(resume, weights_only=True)["epochs_done"] == 2


# selection on validation -----------------------------------------------------------------------


class _ScriptedObjective:
    """A real loss on a tiny linear model, with validation figures read from a script (the first
    entry is the untrained model's, validated before the first step)."""

    def __init__(self, accuracies):
        self.accuracies = list(accuracies)
        self.epoch = 0

    def loss(self, model, items, views):
        out = model(torch.ones(len(items), 2))
        return out.pow(2).mean(), {}

    def validate(self, model):
        acc = self.accuracies[self.epoch]
        self.epoch += 1
        return {"val_accuracy": acc, "val_loss": 1.0}

    def selection_key(self, figures):
        return (figures["val_accuracy"], -figures["val_loss"])

    def diagnostics(self, model):
        return {"weight_norm": float(model.weight.norm())}


def _scripted_fit(select: str):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    snapshots = []
    objective = _ScriptedObjective([0.95, 0.2, 0.9, 0.5, 0.9, 0.1])
    original_validate = objective.validate

    def validate_and_snapshot(m):
        snapshots.append({k: v.clone() for k, v in m.state_dict().items()})
        return original_validate(m)

    objective.validate = validate_and_snapshot
    tracker = RecordingTracker()
    schedule = ScheduleConfig(lr=0.1, epochs=5, batch_size=4, select=select)
    result = fit(model, objective, n_items=16, n_views=1, schedule=schedule, epochs=5, seed=0, tracker=tracker)
    return model, result, snapshots, tracker


def test_the_last_epoch_is_kept_by_default_as_coop_does():
    assert ScheduleConfig().select == "last"
    model, result, snapshots, _ = _scripted_fit("last")
    assert result.best_epoch == 5 and result.best_figures["val_accuracy"] == 0.1  # the worst epoch, kept anyway
    assert all(torch.equal(result.best_state[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(result.best_state[k], snapshots[5][k]) for k in snapshots[5])


def test_best_on_validation_is_an_option_and_keeps_that_epochs_weights():
    model, result, snapshots, tracker = _scripted_fit("best-val")
    assert result.best_epoch == 4  # 0.9 twice: the later, more trained epoch; the untrained 0.95 is not a candidate
    assert all(torch.equal(result.best_state[k], snapshots[4][k]) for k in snapshots[4])
    assert not torch.equal(result.best_state["weight"], model.weight)  # the model trained on past it
    steps = sorted({step for name, _, step in tracker.metrics if name == "val_accuracy"})
    assert steps == [0, 1, 2, 3, 4, 5]  # the untrained model at step 0, then one point per epoch


def test_figures_before_the_first_step_are_recorded_separately_from_the_epochs():
    _, result, snapshots, tracker = _scripted_fit("last")
    assert result.initial == {"epoch": 0, "val_accuracy": 0.95, "val_loss": 1.0, "weight_norm": pytest.approx(float(snapshots[0]["weight"].norm()))}
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4, 5]
    assert all("weight_norm" in r for r in result.history)  # diagnostics every epoch
    assert ("weight_norm", pytest.approx(result.initial["weight_norm"]), 0) in tracker.metrics


def test_generator_training_reports_validation_accuracy_every_epoch(world, summaries):
    tracker = RecordingTracker()
    model, result = _train(world, summaries, 5.0, tracker=tracker)
    assert [r["epoch"] for r in result.history] == list(range(1, 31))
    for record in result.history:
        assert {"val_accuracy", "val_loss", "train_ce", "train_distill", "train_accuracy", "lr"} <= set(record)
    names = {name for name, _, _ in tracker.metrics}
    assert {"val_accuracy", "train_loss", "train_distill", "lr"} <= names
    # the model returned holds the last epoch's weights
    assert result.best_epoch == 30 and result.best_figures == {k: result.history[-1][k] for k in result.best_figures}
    objective = DistillObjective(world.data, world.class_text, summaries, 5.0)
    with torch.no_grad():
        assert objective.validate(model)["val_accuracy"] == pytest.approx(result.history[-1]["val_accuracy"])


# what the loss does ----------------------------------------------------------------------------


def test_distillation_pulls_h_towards_the_summaries(world, summaries):
    _, result = _train(world, summaries, 5.0)
    first, last = result.history[0]["train_distill"], result.history[-1]["train_distill"]
    assert last < 0.2 * first


def test_lambda_zero_is_plain_task_training_that_never_sees_the_summaries(world, summaries):
    shuffled = summaries[torch.randperm(len(summaries), generator=torch.Generator().manual_seed(0))]
    plain, plain_result = _train(world, summaries, 0.0)
    other, _ = _train(world, shuffled, 0.0)
    without, _ = _train(world, None, 0.0)
    assert _same_weights(plain, other) and _same_weights(plain, without)
    distilled, distilled_result = _train(world, summaries, 5.0)
    distilled_other, _ = _train(world, shuffled, 5.0)
    assert not _same_weights(distilled, distilled_other)
    # λ > 0 brings h(x) close to p^a; λ = 0 leaves it wherever the task puts it
    x, targets = world.data.views[:, 0], summaries[:, 0]
    with torch.no_grad():
        d_plain = (plain.prompt_embedding(x) - targets).pow(2).sum(-1).mean()
        d_distilled = (distilled.prompt_embedding(x) - targets).pow(2).sum(-1).mean()
    assert d_distilled < 0.25 * d_plain
    assert plain_result.history[-1]["train_distill"] > 4 * distilled_result.history[-1]["train_distill"]


def test_the_full_model_fits_a_small_training_set_it_cannot_classify_zero_shot():
    # class texts unrelated to the image centroids: only training can make the head work
    world = make_world(classes=6, shots=6, views=2, seed=3)
    world.class_text = F.normalize(torch.randn(6, 64, generator=torch.Generator().manual_seed(9)), dim=-1)
    x, y = world.data.views.flatten(0, 1), world.data.labels.repeat_interleave(2)
    zero_shot = ((x @ world.class_text.T).argmax(-1) == y).float().mean()
    with seeded(1):
        model = AAPEModel(64, logit_scale=100.0)
    with torch.no_grad():
        before = (model.logits(x, world.class_text).argmax(-1) == y).float().mean()
    schedule = ScheduleConfig(lr=0.02, epochs=60, batch_size=8)
    train_generator(model, world.data, world.class_text, None, 0.0, schedule, 60, seed=1)
    with torch.no_grad():
        after = (model.logits(x, world.class_text).argmax(-1) == y).float().mean()
    assert zero_shot < 0.5 and before < 0.5
    assert after == 1.0


def test_lambda_needs_summaries():
    world = make_world(seed=0)
    with pytest.raises(ValueError, match="train-aggregator"):
        DistillObjective(world.data, world.class_text, None, 5.0)


# checkpoints -----------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["bottleneck", "full"])
def test_checkpoint_round_trip_and_backbone_checks(tmp_path, world, head):
    with seeded(0):
        model = AAPEModel(64, head=head, logit_scale=42.0)
    paths = model.save(tmp_path, {"backbone_identity": "aape-tiny@random-init", "random_init": True, "train_classnames": ["a", "b"]})
    assert [p.name for p in paths] == ["generator.safetensors", "generator.json"]
    meta = json.loads((tmp_path / "generator.json").read_text())
    assert meta["embed_dim"] == 64 and meta["logit_scale"] == 42.0 and meta["random_init"] is True
    assert meta["param_counts"] == model.parameter_counts()
    loaded = AAPEModel.load(tmp_path, expect_identity="aape-tiny@random-init", expect_embed_dim=64)
    x = world.data.val_features
    torch.testing.assert_close(loaded.logits(x, world.class_text), model.logits(x, world.class_text))
    assert loaded.meta["train_classnames"] == ["a", "b"] and not loaded.training
    with pytest.raises(CheckpointMismatchError, match=r"'aape-tiny@random-init', not 'ViT-B-16@tag:openai'"):
        AAPEModel.load(tmp_path, expect_identity="ViT-B-16@tag:openai")
    with pytest.raises(CheckpointMismatchError, match="expects 64-d embeddings but the features in use are 512-d"):
        AAPEModel.load(tmp_path, expect_embed_dim=512)


def test_broken_checkpoints_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="generator.safetensors is missing"):
        AAPEModel.load(tmp_path)
    AAPEModel(8).save(tmp_path, {"backbone_identity": "x"})
    (tmp_path / "generator.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="generator.json is not valid JSON"):
        AAPEModel.load(tmp_path)
    AAPEModel(8).save(tmp_path, {"backbone_identity": "x"})
    meta = json.loads((tmp_path / "generator.json").read_text())
    meta["architecture"]["hidden"] = 16  # weights no longer fit
    (tmp_path / "generator.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not fit the architecture"):
        AAPEModel.load(tmp_path)


def test_h_learns_at_h_lr_scale_times_the_learning_rate_and_g_at_the_rate_itself():
    from aape.config import GeneratorSchedule
    from aape.method.schedule import make_optimizer, set_lr

    schedule = GeneratorSchedule()
    assert schedule.h_lr_scale == 3.0  # the default chosen on the proxy benchmark (docs/method.md)
    model = AAPEModel(16, hidden=4, head_hidden=4, logit_scale=10.0)
    optimizer = make_optimizer(model.param_groups(schedule.h_lr_scale), schedule)
    set_lr(optimizer, 0.01)
    h_group, g_group = optimizer.param_groups
    assert {id(p) for p in h_group["params"]} == {id(p) for p in model.generator.parameters()}
    assert {id(p) for p in g_group["params"]} == {id(p) for p in model.head.parameters()}
    assert h_group["lr"] == pytest.approx(0.03) and g_group["lr"] == pytest.approx(0.01)
    # plain parameters (every other stage) keep one rate
    plain = make_optimizer(model.parameters(), schedule)
    set_lr(plain, 0.01)
    assert [g["lr"] for g in plain.param_groups] == [0.01]
