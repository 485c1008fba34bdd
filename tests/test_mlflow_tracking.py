"""MLflow behind the Tracker interface: nested runs, batched params, tags that flag random weights."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from aape.config import load_params
from aape.integrations.mlflow_tracking import open_experiment, pipeline_run, resolve_tracking_uri
from tasks.registry import headline_metric


@pytest.fixture
def tracked_params(tmp_path):
    return load_params(
        None,
        [
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"tracking.artifact_location={tmp_path / 'art'}",
            "backbone.pretrained=random-init",
            "data.dataset=eurosat",
        ],
    )


def test_the_experiment_is_a_training_experiment_so_the_ui_opens_on_its_runs(tracked_params):
    client, experiment_id = open_experiment(tracked_params)
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    # an experiment made before the tag existed (or by hand) gets it on the next run
    client.delete_experiment_tag(experiment_id, "mlflow.experimentKind")
    assert "mlflow.experimentKind" not in client.get_experiment(experiment_id).tags
    again, same_id = open_experiment(tracked_params)
    assert same_id == experiment_id
    assert again.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_parent_and_nested_runs_with_params_metrics_tags_and_artifacts(tracked_params, tmp_path):
    note = tmp_path / "report.md"
    note.write_text("# report\n")
    with pipeline_run(tracked_params, "demo") as parent:
        with parent.child("aape/seed1", tags={"method": "aape", "seed": "1"}) as child:
            child.log_metrics({"accuracy": 0.5}, step=0)
            child.log_metrics({"accuracy": 0.75, "nan_is_dropped": float("nan")}, step=1)
            child.log_artifact(note, "eval")
    client = MlflowClient(tracked_params.tracking.uri)
    runs = {r.info.run_name: r for r in client.search_runs([parent.experiment_id])}
    assert set(runs) == {"demo", "aape/seed1"}
    top, nested = runs["demo"], runs["aape/seed1"]
    assert nested.data.tags["mlflow.parentRunId"] == top.info.run_id
    assert top.data.params["data.dataset"] == "eurosat"
    assert len(top.data.params) == len(tracked_params.flat())  # more than one 100-param batch
    assert top.data.tags["random_init"] == "true" and "RANDOM-INIT" in top.data.tags["mlflow.note.content"]
    assert nested.data.tags["random_init"] == "true" and nested.data.tags["method"] == "aape"
    history = client.get_metric_history(nested.info.run_id, "accuracy")
    assert [(m.step, m.value) for m in history] == [(0, 0.5), (1, 0.75)]
    assert "nan_is_dropped" not in nested.data.metrics
    assert [a.path for a in client.list_artifacts(nested.info.run_id, "eval")] == ["eval/report.md"]


def test_failure_inside_a_run_marks_it_failed(tracked_params):
    with pytest.raises(ValueError):
        with pipeline_run(tracked_params, "broken") as parent:
            raise ValueError("boom")
    client = MlflowClient(tracked_params.tracking.uri)
    assert client.get_run(parent.run_id).info.status == "FAILED"


def test_relative_sqlite_uri_is_made_absolute(tmp_path):
    assert resolve_tracking_uri("sqlite:///mlflow.db", tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert resolve_tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    assert resolve_tracking_uri("http://host:5000") == "http://host:5000"


def test_headline_metric_prefers_H_then_accuracy():
    assert headline_metric({"base2new/zeroshot/H_mean": 1.0, "base2new/aape/H_mean": 70.0}) == ("base2new/aape/H_mean", 70.0)
    assert headline_metric({"fewshot/aape/accuracy_mean": 55.0}) == ("fewshot/aape/accuracy_mean", 55.0)
    assert headline_metric({"fewshot/cupl/accuracy_mean": 55.0}) is None


def test_a_nested_run_ends_finished_or_failed_like_its_parent(tracked_params):
    with pytest.raises(RuntimeError):
        with pipeline_run(tracked_params, "parent") as parent:
            with parent.child("ok") as ok:
                ok.log_metrics({"accuracy": 1.0})
            with parent.child("broken") as broken:
                raise RuntimeError("stage failed")
    client = MlflowClient(tracked_params.tracking.uri)
    status = {run_id: client.get_run(run_id).info.status for run_id in (ok.run_id, broken.run_id, parent.run_id)}
    assert status == {ok.run_id: "FINISHED", broken.run_id: "FAILED", parent.run_id: "FAILED"}


# the parent-run variable ----------------------------------------------------------------------------
def test_runs_given_a_parent_id_attach_to_it_instead_of_opening_their_own(tracked_params, monkeypatch):
    """AAPE_MLFLOW_PARENT_RUN_ID: separate processes (here two pipeline_run calls) log their stages
    under the orchestrator's run, open no parent of their own, and leave ending it to its owner."""
    client, experiment_id = open_experiment(tracked_params)
    parent = client.create_run(experiment_id, run_name="orchestrator").info.run_id
    monkeypatch.setenv("AAPE_MLFLOW_PARENT_RUN_ID", parent)
    for stage in ("prepare-data", "evaluate"):
        with pipeline_run(tracked_params, f"process-{stage}") as tracker:
            assert tracker.run_id == parent
            with tracker.child(stage, tags={"stage": stage}) as child:
                child.log_metrics({"done": 1.0})
    runs = {r.info.run_name: r for r in client.search_runs([experiment_id])}
    assert set(runs) == {"orchestrator", "prepare-data", "evaluate"}
    assert runs["prepare-data"].data.tags["mlflow.parentRunId"] == runs["evaluate"].data.tags["mlflow.parentRunId"] == parent
    assert client.get_run(parent).info.status == "RUNNING"
    monkeypatch.delenv("AAPE_MLFLOW_PARENT_RUN_ID")
    with pipeline_run(tracked_params, "standalone") as own:
        assert own.run_id != parent  # without the variable a run opens its own parent
    assert "mlflow.parentRunId" not in client.get_run(own.run_id).data.tags


# the model registry's `best` alias ------------------------------------------------------------------
@pytest.fixture
def registry_params(tracked_params, tmp_path, monkeypatch):
    """Two trained seeds (seed 2 better on validation) and a stand-in for logging the pyfunc model
    that registers a version of it, as MLflow's log_model(registered_model_name=...) does."""
    import mlflow

    params = tracked_params.model_copy(deep=True)
    params.run.output_dir, params.run.seeds = str(tmp_path / "artifacts"), [1, 2]
    for seed, val in ((1, 50.0), (2, 60.0)):
        folder = tmp_path / "artifacts" / "generator" / f"seed{seed}"
        folder.mkdir(parents=True)
        (folder / "generator.json").write_text(json.dumps({"best_val_accuracy": val}))
    logged: list[Path] = []

    def log_model(model_dir, params, artifact_path, registered_model_name=None):
        client = MlflowClient(params.tracking.uri)
        if not client.search_registered_models(f"name='{registered_model_name}'"):
            client.create_registered_model(registered_model_name)
        logged.append(Path(model_dir))
        version = client.create_model_version(registered_model_name, str(model_dir), run_id=mlflow.active_run().info.run_id)
        return SimpleNamespace(registered_model_version=version.version)

    monkeypatch.setattr("aape.integrations.pyfunc.log_aape_model", log_model)
    uris = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    yield params, logged
    mlflow.set_tracking_uri(uris[0])  # register_model sets MLflow's process-wide URIs
    mlflow.set_registry_uri(uris[1])


def _register(params, score: float) -> dict:
    from tasks.registry import register_model

    metrics = Path(params.run.output_dir) / "eval" / "metrics.json"
    metrics.parent.mkdir(parents=True, exist_ok=True)
    metrics.write_text(json.dumps({"base2new/zeroshot/H_mean": 99.0, "base2new/aape/H_mean": score}))
    with pipeline_run(params, f"run-{score}") as tracker:
        return register_model(params, tracker)


def test_best_alias_stays_on_the_version_with_the_highest_headline_metric(registry_params):
    params, logged = registry_params
    first = _register(params, 70.0)
    worse = _register(params, 60.0)
    better = _register(params, 80.0)
    assert [(r["version"], r["alias"]) for r in (first, worse, better)] == [("1", "best"), ("2", None), ("3", "best")]
    assert logged == [Path(params.run.output_dir) / "generator" / "seed2"] * 3  # the seed best on validation
    client = MlflowClient(params.tracking.uri)
    best = client.get_model_version_by_alias(params.tracking.registered_model, "best")
    assert str(best.version) == "3" and sorted(best.aliases) == ["best", "best-eurosat-16shot-base2new-vit-b-16-random-init"] and best.tags["headline_metric"] == "base2new/aape/H_mean" and best.tags["headline_value"] == "80.0"
    assert client.get_model_version(params.tracking.registered_model, "2").tags["headline_value"] == "60.0"


def test_scores_are_compared_only_within_one_dataset_shots_protocol_and_backbone(registry_params):
    params, _ = registry_params
    sixteen = _register(params, 70.0)  # eurosat, 16 shots
    one_shot = params.model_copy(deep=True)
    one_shot.data.shots = 1
    first_one_shot = _register(one_shot, 50.0)  # lower, but not comparable: it is its setting's best
    worse_sixteen = _register(params, 60.0)
    aliases = (sixteen["setting_alias"], first_one_shot["setting_alias"])
    assert aliases == ("best-eurosat-16shot-base2new-vit-b-16-random-init", "best-eurosat-1shot-base2new-vit-b-16-random-init")
    assert [(r["version"], r["alias"]) for r in (sixteen, first_one_shot, worse_sixteen)] == [("1", "best"), ("2", "best"), ("3", None)]
    client = MlflowClient(params.tracking.uri)
    name = params.tracking.registered_model
    assert str(client.get_model_version_by_alias(name, aliases[0]).version) == "1"  # 60 did not beat 70 of its own setting
    assert str(client.get_model_version_by_alias(name, aliases[1]).version) == "2"
    assert str(client.get_model_version_by_alias(name, "best").version) == "2"
    tags = client.get_model_version(name, "2").tags
    assert (tags["setting.dataset"], tags["setting.shots"], tags["setting.protocol"]) == ("eurosat", "1", "base2new")


@pytest.mark.parametrize("dvc_status, run_status", [(0, "FINISHED"), (3, "FAILED")])
def test_aape_repro_opens_one_parent_that_every_dvc_stage_joins(tracked_params, tmp_path, monkeypatch, dvc_status, run_status):
    from click.testing import CliRunner

    from aape.cli import main

    seen = {}

    def fake_dvc(command, env):
        # what a DVC stage process does: its own pipeline_run attaches to the parent it is handed
        seen["command"], seen["parent"] = command, env["AAPE_MLFLOW_PARENT_RUN_ID"]
        monkeypatch.setenv("AAPE_MLFLOW_PARENT_RUN_ID", env["AAPE_MLFLOW_PARENT_RUN_ID"])
        for stage in ("prepare-data", "evaluate"):
            with pipeline_run(tracked_params, stage) as attached, attached.child(stage):
                pass
        monkeypatch.delenv("AAPE_MLFLOW_PARENT_RUN_ID")
        return dvc_status

    monkeypatch.setattr("aape.cli._run_command", fake_dvc)
    sets = [f"-s tracking.uri={tracked_params.tracking.uri}", f"-s tracking.artifact_location={tracked_params.tracking.artifact_location}"]
    args = ["repro", *" ".join(sets).split(), "--track", "--force", "evaluate"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == dvc_status, result.output
    assert seen["command"][-4:] == ["dvc", "repro", "--force", "evaluate"]  # dvc's own options pass through
    client = MlflowClient(tracked_params.tracking.uri)
    experiment = client.get_experiment_by_name(tracked_params.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.run_id for p in parents] == [seen["parent"]]  # one parent, not one per stage
    assert parents[0].data.tags["orchestrator"] == "dvc" and parents[0].info.status == run_status
    stages = {r.info.run_name: r.data.tags["mlflow.parentRunId"] for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert stages == {"prepare-data": seen["parent"], "evaluate": seen["parent"]}
