"""What the MLflow UI shows, read back through a real MLflow server's REST API after a tracked run:
the experiment's kind, the pipeline parent with its headline figures, and one run per method over
the seeds beside the stage runs, with the params that tell the methods apart and mean ± std metrics."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from aape.cli import main

pytestmark = pytest.mark.slow
METHODS = ("zeroshot", "aape-nodistill", "aape")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 with a SQLite store, stopped after the module."""
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen([str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--default-artifact-root", str(tmp / "art")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "MLFLOW_TRACKING_URI": ""})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                pytest.fail("mlflow server exited at start")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def tracked_run(mlflow_server, tmp_path_factory):
    from aape.data.demo import DEMO_CLASSNAMES

    tmp = tmp_path_factory.mktemp("tracked")
    cupl = tmp / "cupl.json"
    cupl.write_text(json.dumps({c: [f"a handwritten {c}.", f"the digit {c} in white."] for c in DEMO_CLASSNAMES}))
    settings = [f"run.output_dir={tmp / 'artifacts'}", f"run.cache_dir={tmp / 'cache'}", "run.seeds=[1, 2]", "backbone.model=aape-tiny",
                "data.test_per_class=5", "features.augmented_views=2", "features.num_workers=0", "aggregator.heads=2",
                "aggregator.schedule.epochs=1", "generator.schedule.epochs=1", "prompts.source=cupl-json", f"prompts.file={cupl}",
                f"evaluation.methods=[{', '.join(METHODS)}]", f"tracking.uri={mlflow_server}", f"tracking.artifact_location={tmp / 'art'}"]
    result = CliRunner().invoke(main, ["run", *[a for s in settings for a in ("-s", s)]])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return mlflow_server, json.loads((tmp / "artifacts" / "eval" / "metrics.json").read_text())


def _api(url: str, path: str, body: dict | None = None) -> dict:
    response = httpx.post(f"{url}/api/2.0/mlflow/{path}", json=body) if body is not None else httpx.get(f"{url}/api/2.0/mlflow/{path}")
    response.raise_for_status()
    return response.json()


def _runs(url: str, experiment_id: str, where: str = "") -> list[dict]:
    return _api(url, "runs/search", {"experiment_ids": [experiment_id], "filter": where, "max_results": 1000})["runs"]


def _flat(run: dict, part: str) -> dict:
    return {item["key"]: item["value"] for item in run["data"].get(part, [])}


def test_the_rest_api_shows_one_run_per_method_beside_the_stages_with_means_and_stds(tracked_run):
    url, metrics = tracked_run
    experiment = _api(url, "experiments/get-by-name?experiment_name=aape")["experiment"]
    assert {t["key"]: t["value"] for t in experiment["tags"]}["mlflow.experimentKind"] == "custom_model_development"
    means = _runs(url, experiment["experiment_id"], "tags.aggregate = 'mean over seeds'")
    by_method = {_flat(r, "params")["method"]: r for r in means}
    assert sorted(by_method) == sorted(METHODS)
    stages = {_flat(r, "tags")["stage"]: r for r in _runs(url, experiment["experiment_id"], "tags.stage != ''")}
    parent_id = _flat(stages["evaluate"], "tags")["mlflow.parentRunId"]
    for method, run in by_method.items():
        tags, params, values = _flat(run, "tags"), _flat(run, "params"), _flat(run, "metrics")
        assert tags["mlflow.parentRunId"] == parent_id  # beside the stage runs, not under evaluate
        assert run["info"]["run_name"] == f"{method} · demo-mnist · mean of 2 seeds"
        assert params["seed"] == "mean of 1,2" and params["dataset"] == "demo-mnist" and params["backbone"] == "aape-tiny"
        assert values["H"] == pytest.approx(metrics[f"base2new/{method}/H_mean"], abs=1e-3)
        assert values["H_std"] == pytest.approx(metrics[f"base2new/{method}/H_std"], abs=1e-3)
    assert _flat(by_method["aape"], "params")["lambda_distill"] != _flat(by_method["aape-nodistill"], "params")["lambda_distill"]
    parent = _api(url, f"runs/get?run_id={parent_id}")["run"]
    assert _flat(parent, "metrics")["base2new/aape/H_mean"] == pytest.approx(metrics["base2new/aape/H_mean"], abs=1e-3)
    assert _flat(parent, "tags")["random_init"] == "true"
