"""The Prefect flows chain the same stage functions as the CLI, in order, with tracking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

prefect = pytest.importorskip("prefect")

from aape.stages import STAGES  # noqa: E402


def _fake_stages(monkeypatch, calls: list[str]):
    """Stand-ins that record the call order and write the one file the flow reads (the report)."""
    import tasks.stages as stage_tasks

    def make(name):
        def run(params, tracker=None):
            calls.append(name)
            if tracker is not None:
                tracker.log_metrics({f"{name}_ok": 1.0})
            if name == "evaluate":
                out = Path(params.run.output_dir) / "eval"
                out.mkdir(parents=True, exist_ok=True)
                (out / "report.md").write_text("| method | H |\n|---|---|\n| aape | 1.0 |\n")
                (out / "metrics.json").write_text(json.dumps({"base2new/aape/H_mean": 1.0}))
            return {"outputs": [], "stage": name}

        return run

    monkeypatch.setattr(stage_tasks, "stage_function", make)


def test_named_parameters_become_overrides():
    from flows.pipeline import build_overrides

    assert build_overrides(["a.b=1"], dataset="eurosat", shots=4, seeds=[1, 2], pretrained="random-init") == [
        "data.dataset=eurosat",
        "data.shots=4",
        "run.seeds=[1, 2]",
        "backbone.pretrained=random-init",
        "a.b=1",
    ]


def test_pipeline_flow_runs_every_stage_in_order_under_one_mlflow_parent(prefect_server, monkeypatch, tmp_path):
    from mlflow.tracking import MlflowClient

    from flows.pipeline import pipeline

    calls: list[str] = []
    _fake_stages(monkeypatch, calls)
    db = tmp_path / "mlflow.db"
    result = pipeline(
        params_file=str(Path(__file__).resolve().parents[1] / "params.yaml"),
        overrides=[
            f"run.output_dir={tmp_path / 'artifacts'}",
            f"tracking.uri=sqlite:///{db}",
            f"tracking.artifact_location={tmp_path / 'mlartifacts'}",
        ],
        register_model=False,
        record_in_dvc=False,
    )
    assert calls == list(STAGES)
    assert [result[name]["stage"] for name in STAGES] == list(STAGES)
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("aape")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.run_id == result["mlflow_run_id"]
    assert sorted(r.info.run_name for r in children) == sorted(STAGES)
    assert all(r.data.tags["mlflow.parentRunId"] == result["mlflow_run_id"] for r in children)
    assert parents[0].data.tags["random_init"] == "true"  # params.yaml's demo uses random weights
    assert parents[0].data.params["data.dataset"] == "demo-mnist"
    # the parent's name says what ran on which setting, not just the run's name
    assert parents[0].info.run_name == "demo · pipeline · demo-mnist 16-shot base2new · ViT-B-32 · attention λ=5"
    assert all(r.info.status == "FINISHED" for r in runs)


def test_failed_stage_fails_the_flow_and_marks_the_run_failed(prefect_server, monkeypatch, tmp_path):
    from mlflow.tracking import MlflowClient

    import tasks.stages as stage_tasks
    from flows.pipeline import pipeline

    def broken(name):
        def run(params, tracker=None):
            if name == "extract-features":
                raise RuntimeError("corrupt image data/x.png")
            return {"outputs": []}

        return run

    monkeypatch.setattr(stage_tasks, "stage_function", broken)
    db = tmp_path / "mlflow.db"
    with pytest.raises(RuntimeError, match="corrupt image"):
        pipeline(
            overrides=[f"run.output_dir={tmp_path / 'a'}", f"tracking.uri=sqlite:///{db}", f"tracking.artifact_location={tmp_path / 'm'}"],
            params_file=str(Path(__file__).resolve().parents[1] / "params.yaml"),
            register_model=False,
            record_in_dvc=False,
        )
    runs = MlflowClient(f"sqlite:///{db}").search_runs([MlflowClient(f"sqlite:///{db}").get_experiment_by_name("aape").experiment_id])
    status = {r.info.run_name: r.info.status for r in runs}
    assert status["extract-features"] == "FAILED"
    assert "train-aggregator" not in status


def test_sweep_summary_table_has_mean_and_population_std():
    """The sweep's ± is the evaluation's: the population std over seeds (docs/architecture.md), so
    70 and 72 give 1.00, not the sample std's 1.41; a metric a cell lacks leaves its cell empty."""
    from flows.sweep import summarise

    cells = [
        {"dataset": "eurosat", "variant": "attention", "seed": s, "metrics": {"H": h}} for s, h in [(1, 70.0), (2, 72.0)]
    ] + [{"dataset": "dtd", "variant": "mean", "seed": 1, "metrics": {"accuracy": 40.0}}]
    assert summarise(cells).splitlines() == [
        "| dataset | aggregator | seeds | H | accuracy |",
        "|---|---|---|---|---|",
        "| dtd | mean | 1 |  | 40.00 ± 0.00 |",
        "| eurosat | attention | 2 | 71.00 ± 1.00 |  |",
    ]


def test_flow_preflight_fails_before_any_stage(prefect_server, monkeypatch, tmp_path):
    from aape.config import ConfigError
    from flows.pipeline import pipeline

    calls: list[str] = []
    _fake_stages(monkeypatch, calls)
    with pytest.raises(ConfigError, match="checkpoint file '.*gone.pt' does not exist"):
        pipeline(
            params_file=str(Path(__file__).resolve().parents[1] / "params.yaml"),
            pretrained=str(tmp_path / "gone.pt"),
            overrides=[f"run.output_dir={tmp_path / 'a'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"],
            register_model=False,
            record_in_dvc=False,
        )
    assert calls == [] and list(tmp_path.iterdir()) == []  # no stage, no outputs, no tracking database


def test_sweep_preflights_every_cell_before_the_first(prefect_server, monkeypatch, tmp_path):
    from aape.config import ConfigError
    from flows.sweep import sweep

    calls: list[str] = []
    _fake_stages(monkeypatch, calls)
    with pytest.raises(ConfigError, match="unknown dataset 'eurosta'"):
        sweep(datasets=["demo-mnist", "eurosta"], seeds=[1], params_file=str(Path(__file__).resolve().parents[1] / "params.yaml"),
              overrides=[f"run.cache_dir={tmp_path / 'cache'}"], track=False)  # fmt: skip
    assert calls == []  # the good first cell did not run either
