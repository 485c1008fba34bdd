"""Experiment files: validated, expanded into cells, turned into paper-layout tables; one small grid
runs end to end on a 2-worker local Dask cluster through `aape experiment run`, and a rerun reuses it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from aape.cli import main
from aape.config import ConfigError
from aape.experiments import Cell, ExperimentSpec, cells, is_finished, load_experiment, mark_finished, shared_work, table

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_experiment_file_validates_and_expands(path, tmp_path):
    spec = load_experiment(path)
    expanded = cells(spec, REPO / "params.yaml", tmp_path)
    expected = len(spec.seeds)
    for values in spec.grid.values():
        expected *= len(values)
    assert len(expanded) == expected and len({c.output_dir for c in expanded}) == expected


def test_a_bad_grid_value_or_table_axis_is_named_before_any_cell_runs(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ngrid: {aggregator.variant: [attention, transformer]}\nseeds: [1]\n")
    with pytest.raises(ConfigError, match="aggregator.variant"):
        cells(load_experiment(bad), None, tmp_path)
    bad.write_text("name: bad\ngrid: {aggregator.variant: [attention]}\ntable: {rows: shots}\n")
    with pytest.raises(ConfigError, match="table axis 'shots'"):
        load_experiment(bad)


def test_each_cell_owns_its_folder_whatever_the_caller_overrides(tmp_path):
    spec = ExperimentSpec(name="x", grid={"generator.lambda_distill": [0, 5]}, seeds=[1, 2])
    expanded = cells(spec, None, tmp_path, ["run.output_dir=elsewhere", "generator.lambda_distill=9"])
    from aape.experiments import cell_params

    params = [cell_params(c, None) for c in expanded]
    assert [p.run.output_dir for p in params] == [str(tmp_path / "x" / f"lambda_distill={lam}" / f"seed{s}") for lam in (0, 5) for s in (1, 2)]
    assert [p.generator.lambda_distill for p in params] == [0, 0, 5, 5] and [p.run.seeds for p in params] == [[1], [2], [1], [2]]
    # λ does not change the data, prompts or features: one cell does the shared work for all four
    assert len(shared_work(expanded, None)) == 1
    spec = ExperimentSpec(name="y", grid={"data.shots": [2, 4]}, seeds=[1])
    assert len(shared_work(cells(spec, None, tmp_path), None)) == 2


def test_a_finished_cell_is_recognised_only_with_the_same_settings(tmp_path):
    from aape.experiments import cell_params

    spec = ExperimentSpec(name="x", grid={"generator.lambda_distill": [3]}, seeds=[1])
    (cell,) = cells(spec, None, tmp_path)
    params = cell_params(cell, None)
    assert not is_finished(cell, params)
    (Path(cell.output_dir) / "eval").mkdir(parents=True)
    (Path(cell.output_dir) / "eval" / "metrics.json").write_text("{}")
    mark_finished(cell, params, 1.0)
    assert is_finished(cell, params)
    assert not is_finished(cell, params.model_copy(update={"generator": params.generator.model_copy(update={"lambda_distill": 4.0})}))


def test_the_table_is_mean_and_population_std_over_seeds_in_the_papers_layout():
    spec = ExperimentSpec(name="t", grid={"data.dataset": ["eurosat", "dtd"]}, seeds=[1, 2],
                          table={"rows": "method", "columns": "data.dataset", "metric": "H"})
    finished = []
    for dataset, values in (("eurosat", (70.0, 74.0)), ("dtd", (50.0, 50.0))):
        for seed, value in zip((1, 2), values):
            cell = Cell((("data.dataset", dataset),), seed, (), f"/tmp/{dataset}/{seed}")
            finished.append((cell, {"base2new/aape/H_mean": value, "base2new/zeroshot/H_mean": value - 10, "random_init": False}))
    markdown, records = table(spec, finished, ["zeroshot", "aape"])
    lines = markdown.splitlines()
    assert lines[0] == "| method | eurosat (H) | dtd (H) |"
    assert lines[2] == "| zeroshot | 62.00 ± 2.00 (n=2) | 40.00 ± 0.00 (n=2) |"
    assert lines[3] == "| aape | 72.00 ± 2.00 (n=2) | 50.00 ± 0.00 (n=2) |"
    assert len(records) == 8


@pytest.mark.slow
def test_a_grid_runs_on_a_two_worker_dask_cluster_and_a_rerun_reuses_every_cell(tmp_path):
    """demo-lambda on the tiny backbone: 2 λ x 2 seeds as Prefect tasks on a LocalCluster of 2 workers."""
    from aape.data.demo import DEMO_CLASSNAMES

    cupl = tmp_path / "cupl.json"
    cupl.write_text(json.dumps({c: [f"a handwritten {c}.", f"the digit {c} in white."] for c in DEMO_CLASSNAMES}))
    settings = [f"run.output_dir={tmp_path / 'artifacts'}", f"run.cache_dir={tmp_path / 'cache'}", "backbone.model=aape-tiny",
                "data.test_per_class=10", "features.augmented_views=2", "aggregator.heads=2", "prompts.source=cupl-json",
                f"prompts.file={cupl}", "tracking.enabled=false"]
    args = ["experiment", "run", str(REPO / "experiments" / "demo-lambda.yaml"), "--params", str(REPO / "params.yaml"), "--workers", "2"]
    args += [a for s in settings for a in ("-s", s)]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    report = (tmp_path / "experiments" / "demo-lambda" / "report.md").read_text()
    assert report.startswith("**RANDOM-INIT") and "4 of 4 cells finished" in report
    assert "| generator.lambda_distill | zeroshot (H) | aape (H) |" in report
    for lam in (0, 5):
        for seed in (1, 2):
            folder = tmp_path / "experiments" / "demo-lambda" / f"lambda_distill={lam}" / f"seed{seed}"
            assert json.loads((folder / "generator" / f"seed{seed}" / "generator.json").read_text())["lambda_distill"] == lam
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "experiments").rglob("metrics.json")}
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0, second.output
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "experiments").rglob("metrics.json")} == before  # nothing recomputed


@pytest.mark.slow
def test_a_grid_runs_on_an_existing_dask_cluster_given_by_address(tmp_path, prefect_server):
    """A scheduler and a worker started as a user would (`dask scheduler`, `dask worker`), told the Prefect
    API's address; `--address` sends the cells there, and their results are files the driver reads."""
    import os
    import subprocess
    import sys
    import time

    from prefect.settings import PREFECT_API_URL

    from aape.data.demo import DEMO_CLASSNAMES

    cupl = tmp_path / "cupl.json"
    cupl.write_text(json.dumps({c: [f"a handwritten {c}."] for c in DEMO_CLASSNAMES}))
    spec = tmp_path / "two-cells.yaml"
    spec.write_text(json.dumps({"name": "two-cells", "grid": {"generator.lambda_distill": [0, 5]}, "seeds": [1], "methods": ["aape"],
                                "overrides": ["generator.schedule.epochs=1", "aggregator.schedule.epochs=1"]}))
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_LOGGING_TO_API_ENABLED": "false"}
    scheduler_file = tmp_path / "scheduler.json"
    procs = [subprocess.Popen([str(bin_dir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                               "--scheduler-file", str(scheduler_file)], env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for _ in range(120):
            if scheduler_file.is_file() and scheduler_file.read_text().strip():
                break
            time.sleep(0.5)
        address = json.loads(scheduler_file.read_text())["address"]
        procs.append(subprocess.Popen([str(bin_dir / "dask"), "worker", address, "--nthreads", "1", "--nworkers", "1", "--no-dashboard",
                                       "--host", "127.0.0.1"], env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        settings = [f"run.output_dir={tmp_path / 'artifacts'}", f"run.cache_dir={tmp_path / 'cache'}", "backbone.model=aape-tiny",
                    "data.test_per_class=5", "features.augmented_views=2", "aggregator.heads=2", "prompts.source=cupl-json",
                    f"prompts.file={cupl}", "tracking.enabled=false"]
        args = ["experiment", "run", str(spec), "--params", str(REPO / "params.yaml"), "--address", address]
        result = CliRunner().invoke(main, args + [a for s in settings for a in ("-s", s)], env={"PREFECT_API_URL": PREFECT_API_URL.value()})
        assert result.exit_code == 0, result.output
        report = (tmp_path / "experiments" / "two-cells" / "report.md").read_text()
        assert "2 of 2 cells finished" in report
        for lam in (0, 5):  # written by the external worker, read back by the driver
            assert (tmp_path / "experiments" / "two-cells" / f"lambda_distill={lam}" / "seed1" / "eval" / "metrics.json").is_file()
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=30)


def test_the_temporary_prefect_server_of_an_experiment_runs_only_the_services_it_needs(monkeypatch, prefect_server):
    """No UI, deployments or automations on it: their watchers would only take CPU from the cells. It is
    the experiment's own: a temporary server the process already had (here the test harness's) keeps running."""
    import os

    import httpx
    from prefect.settings import PREFECT_API_URL

    from flows.experiment import IDLE_SERVER_SERVICES, _shared_prefect_api

    harness = PREFECT_API_URL.value()
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with _shared_prefect_api():
        ours = os.environ["PREFECT_API_URL"]
        services = httpx.get(f"{ours}/admin/settings", timeout=30).json()["server"]["services"]
    assert ours != harness and not any(services[name]["enabled"] for name in IDLE_SERVER_SERVICES)
    assert services["task_run_recorder"]["enabled"] and services["event_persister"]["enabled"]  # states still recorded
    assert httpx.get(f"{harness}/health", timeout=30).status_code == 200
