"""Prefect and DVC run the same stage code on the same files, and DVC knows what Prefect made.

In a temporary git repository holding the project's dvc.yaml: the Prefect flow runs the real
pipeline and records its outputs in dvc.lock; `dvc repro` then has nothing to do; changing one
parameter reruns only the stages that depend on it; and a forced `dvc repro` of everything
reproduces the flow's metrics exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from aape.config import dump_params, load_params
from tests.test_eval_pipeline import _coop_eurosat

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _sh(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done


def _project(tmp: Path, tiny_backbone) -> Path:
    """A git repository with the project's pipeline files and a tiny, fast params.yaml."""
    project = tmp / "project"
    project.mkdir()
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    shutil.copytree(REPO / "aape", project / "aape", ignore=shutil.ignore_patterns("__pycache__"))
    _coop_eurosat(tmp / "data")
    weights = tmp / "tiny.pt"
    torch.save(tiny_backbone.model.state_dict(), weights)
    params = load_params(None, [
        "run.output_dir=artifacts", f"run.cache_dir={tmp / 'cache'}", "run.seeds=[1]", "run.device=cpu",
        "data.dataset=eurosat", f"data.root={tmp / 'data'}", "data.shots=2", "backbone.model=aape-tiny",
        f"backbone.pretrained={weights}", "prompts.source=cupl-json", f"prompts.file={tmp / 'data' / 'cupl.json'}",
        "features.augmented_views=2", "features.num_workers=0", "aggregator.heads=2", "aggregator.schedule.epochs=2",
        "generator.schedule.epochs=3", "tracking.enabled=false", "evaluation.linear_probe_c_range=[1.0, 100.0]",
        "evaluation.linear_probe_c_coarse_points=2", "evaluation.linear_probe_c_refine_steps=0",
        # one prompt learner through the train-baselines stage beside AAPE
        "evaluation.methods=[zeroshot, cupl, linear-probe, coop, aape-nodistill, aape]", "baselines.coop.schedule.epochs=2",
    ])
    dump_params(params, project / "params.yaml")
    _sh(["git", "init", "-q"], project)
    _sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "init"], project)
    _sh(["dvc", "init", "-q"], project)
    _sh(["dvc", "config", "core.analytics", "false"], project)
    return project


def _ran_stages(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


def test_prefect_run_is_recorded_in_dvc_and_repro_reuses_it(tmp_path, tiny_backbone, monkeypatch, prefect_server):
    from flows.pipeline import pipeline

    project = _project(tmp_path, tiny_backbone)
    monkeypatch.chdir(project)
    result = pipeline(params_file="params.yaml", track=False, register_model=False)
    assert result["dvc"] == "recorded"
    metrics_from_prefect = json.loads((project / "artifacts/eval/metrics.json").read_text())
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"prepare-data", "generate-prompts", "extract-features", "train-aggregator", "distill-generator",
                                   "train-baselines", "evaluate"}
    assert "base2new/coop/H_mean" in metrics_from_prefect

    status = _sh(["dvc", "status"], project)
    assert "up to date" in status.stdout
    assert _ran_stages(_sh(["dvc", "repro"], project).stdout) == []

    # one parameter changed: only the stages that read it (and their dependants) run again
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["generator"]["lambda_distill"] = 3.0
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran_stages(_sh(["dvc", "repro"], project).stdout) == ["distill-generator", "evaluate"]
    assert _ran_stages(_sh(["dvc", "repro"], project).stdout) == []

    # a sweep point as a DVC experiment, compared with the committed baseline
    _sh(["git", "add", "-A"], project)
    _sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "lambda 3"], project)
    experiment = _sh(["dvc", "exp", "run", "-S", "generator.lambda_distill=1"], project).stdout
    assert _ran_stages(experiment) == ["distill-generator", "evaluate"]
    diff = json.loads(_sh(["dvc", "metrics", "diff", "--all", "--json"], project).stdout)
    assert any("aape" in name for metrics in diff.values() for name in metrics)
    assert "generator.lambda_distill" in _sh(["dvc", "params", "diff"], project).stdout

    # the same stage code through DVC, from scratch, reproduces the flow's figures
    params["generator"]["lambda_distill"] = 5.0
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ran = _ran_stages(_sh(["dvc", "repro", "--force"], project).stdout)
    assert ran == ["prepare-data", "generate-prompts", "extract-features", "train-aggregator", "distill-generator",
                   "train-baselines", "evaluate"]
    assert json.loads((project / "artifacts/eval/metrics.json").read_text()) == metrics_from_prefect
    assert "up to date" in _sh(["dvc", "status"], project).stdout


def test_sweep_flow_runs_each_cell_into_its_own_folder(tmp_path, tiny_backbone, monkeypatch, prefect_server):
    from flows.sweep import sweep

    project = _project(tmp_path, tiny_backbone)
    monkeypatch.chdir(project)
    cells = sweep(datasets=["eurosat"], seeds=[1], variants=["attention", "mean"], track=False)
    assert [(c["variant"], c["seed"]) for c in cells] == [("attention", 1), ("mean", 1)]
    for cell in cells:
        out = project / cell["output_dir"]
        assert out.parent.parent.parent.name == "sweeps" and (out / "eval" / "report.md").exists()
        assert json.loads((out / "aggregator" / "seed1" / "aggregator.json").read_text())["variant"] == cell["variant"]
        assert "base2new/aape/H_mean" in cell["metrics"]
    assert not (project / "dvc.lock").exists(), "sweep cells are not DVC's outputs"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_teammate_restores_every_output_from_the_shared_remote(tmp_path, tiny_backbone):
    # the README's team flow: run; commit dvc.lock and the metrics; dvc push; a teammate clones and pulls
    project = _project(tmp_path, tiny_backbone)
    _sh(["dvc", "remote", "add", "-d", "team", str(tmp_path / "team-remote")], project)
    _sh(["dvc", "repro"], project)
    _sh(["git", "add", "-A"], project)
    committed = _sh(["git", "diff", "--cached", "--name-only"], project).stdout.split()
    assert "dvc.lock" in committed and "artifacts/eval/metrics.json" in committed  # DVC does not cache the metrics
    assert not any(name.startswith("artifacts/features/") for name in committed)  # cached outputs stay out of git
    _sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "run"], project)
    _sh(["dvc", "push"], project)

    teammate = tmp_path / "teammate"
    _sh(["git", "clone", "-q", str(project), str(teammate)], tmp_path)
    assert not (teammate / "artifacts" / "generator").exists()
    _sh(["dvc", "pull"], teammate)
    assert "up to date" in _sh(["dvc", "status"], teammate).stdout
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    outs = sorted({out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])})
    assert len(outs) >= 6
    for out in outs:  # byte for byte what the first machine made
        mine, theirs = project / out, teammate / out
        assert (_files(mine) == _files(theirs)) if mine.is_dir() else (mine.read_bytes() == theirs.read_bytes()), out
    assert _ran_stages(_sh(["dvc", "repro"], teammate).stdout) == []  # nothing to recompute
