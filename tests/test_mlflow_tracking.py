"""MLflow behind the Tracker interface: nested runs, batched params, tags that flag random weights."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from aape.config import load_params
from aape.integrations.mlflow_tracking import pipeline_run, resolve_tracking_uri
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
