"""The preflight: `aape config check` and `aape run` name every problem before any stage runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from aape.cli import main
from aape.config import ConfigError, load_params
from aape.preflight import preflight, preflight_problems

REPO = Path(__file__).resolve().parents[1]
PARAMS = ["--params", str(REPO / "params.yaml")]


def check(*overrides: str):
    return CliRunner().invoke(main, ["config", "check", *PARAMS, *(a for o in overrides for a in ("-s", o))])


def problem_lines(stderr: str) -> list[str]:
    return [line[4:] for line in stderr.splitlines() if line.startswith("  - ")]


def test_the_demo_defaults_pass():
    result = check()
    assert result.exit_code == 0, result.stderr
    assert "params.yaml: valid (run 'demo', dataset 'demo-mnist', backbone ViT-B-32/random-init)" in result.output


@pytest.mark.parametrize(
    "override, culprit",
    [("data.dataset=eurosta", "unknown dataset 'eurosta' (data.dataset). Did you mean 'eurosat'?"),
     ("backbone.pretrained=opneai", "backbone.pretrained: 'opneai' is not a known open_clip tag for 'ViT-B-32'"),
     ("backbone.pretrained=/no/such/ckpt.pt", "backbone.pretrained: checkpoint file '/no/such/ckpt.pt' does not exist")],
)  # fmt: skip
def test_config_check_names_the_culprit(override, culprit):
    result = check(override)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {REPO / 'params.yaml'} cannot run (1 problem(s) found before starting):")
    [problem] = problem_lines(result.stderr)
    assert problem.startswith(culprit)


def test_every_problem_is_named_one_per_line(tmp_path: Path):
    result = check("data.dataset=eurosta", f"data.root={tmp_path}", "backbone.model=ViT-Q-99", "prompts.source=cupl-json",
                   f"prompts.file={tmp_path / 'missing.json'}", "evaluation.cross_datasets=[dtd, nope]")  # fmt: skip
    assert result.exit_code == 2
    problems = problem_lines(result.stderr)
    assert len(problems) == 5 and "(5 problem(s)" in result.stderr
    assert problems[0].startswith("unknown dataset 'eurosta'")
    assert problems[1] == f"prompts.file: CuPL description file {tmp_path / 'missing.json'} not found (prompts.file); give the path of a {{class: [sentences]}} JSON file"
    assert problems[2].startswith("backbone.model: 'ViT-Q-99' is not an open_clip architecture")
    assert problems[3].startswith(f"evaluation.cross_datasets: dataset 'dtd' not found: expected the folder {tmp_path / 'dtd'}")
    assert problems[4].startswith("evaluation.cross_datasets: unknown dataset 'nope'")


def test_a_known_dataset_must_be_under_data_root_unless_downloaded(tmp_path: Path):
    eurosat = ["data.dataset=EuroSAT", f"data.root={tmp_path}"]
    [problem] = preflight_problems(load_params(None, eurosat), ["prepare-data"])
    assert problem.startswith(f"data.dataset: dataset 'EuroSAT' not found: expected the folder {tmp_path / 'eurosat'}")
    assert preflight_problems(load_params(None, [*eurosat, "data.download=true"]), ["prepare-data"]) == []
    (tmp_path / "eurosat").mkdir()
    assert preflight_problems(load_params(None, eurosat), ["prepare-data"]) == []
    assert preflight_problems(load_params(None, ["data.dataset=demo-mnist", f"data.root={tmp_path / 'new'}"]), ["prepare-data"]) == []


def test_run_with_a_missing_checkpoint_fails_before_any_stage(tmp_path: Path, monkeypatch):
    ran: list[str] = []
    monkeypatch.setattr("aape.cli.stage_function", lambda name: ran.append(name))
    result = CliRunner().invoke(main, ["run", *PARAMS, "--no-track", "-s", f"backbone.pretrained={tmp_path / 'gone.pt'}",
                                       "-s", f"run.output_dir={tmp_path / 'out'}", "-s", f"run.cache_dir={tmp_path / 'cache'}",
                                       "-s", f"data.root={tmp_path / 'data'}"])  # fmt: skip
    assert result.exit_code == 2 and f"checkpoint file '{tmp_path / 'gone.pt'}' does not exist" in result.stderr
    assert ran == [] and sorted(p.name for p in tmp_path.iterdir()) == []  # no data, outputs or cache made


def test_only_the_stages_that_run_are_checked():
    params = load_params(None, ["data.dataset=eurosta", "backbone.pretrained=opneai"])
    assert preflight_problems(params, ["train-aggregator", "distill-generator"]) == []
    dataset, backbone = preflight_problems(params, ["prepare-data", "extract-features"])
    assert dataset.startswith("unknown dataset 'eurosta'") and backbone.startswith("backbone.pretrained: 'opneai'")
    assert len(preflight_problems(params, ["evaluate"])) == 1  # evaluate builds the backbone again


def test_custom_datasets_need_their_path(tmp_path: Path):
    assert preflight_problems(load_params(None, ["data.dataset=folder"]), ["prepare-data"]) == [
        "data.dataset is 'folder' but data.path is not set: give the folder of class folders"]
    missing = tmp_path / "images"
    assert preflight_problems(load_params(None, ["data.dataset=folder", f"data.path={missing}"]), ["prepare-data"]) == [
        f"data.path: {missing} is not an existing folder of class folders (data.dataset: folder)"]
    missing.mkdir()
    assert preflight_problems(load_params(None, ["data.dataset=folder", f"data.path={missing}"]), ["prepare-data"]) == []
    assert preflight_problems(load_params(None, ["data.dataset=manifest", f"data.path={missing}"]), ["prepare-data"]) == [
        f"data.path: {missing} is not an existing CSV or Parquet manifest file (data.dataset: manifest)"]


def test_existing_files_pass(tmp_path: Path):
    cupl, weights = tmp_path / "cupl.json", tmp_path / "w.pt"
    cupl.write_text(json.dumps({"Forest": ["Tall trees."]}))
    weights.write_bytes(b"weights")
    (tmp_path / "r4.parquet").write_bytes(b"")
    params = load_params(None, ["prompts.source=cupl-json", f"prompts.file={cupl}", f"backbone.pretrained={weights}",
                                f"evaluation.shots_results=[{tmp_path}/r*.parquet]"])  # fmt: skip
    assert preflight_problems(params) == []
    preflight(params)  # raises nothing
    (tmp_path / "r4.parquet").unlink()  # the same settings with one file gone: now a problem is named
    assert preflight_problems(params) == [f"evaluation.shots_results: no file matches '{tmp_path}/r*.parquet'"]


def test_openai_endpoint_settings(monkeypatch):
    monkeypatch.delenv("AAPE_TEST_KEY", raising=False)
    no_key = load_params(None, ["prompts.source=openai", "prompts.openai.api_key_env=AAPE_TEST_KEY"])
    [problem] = preflight_problems(no_key, ["generate-prompts"])
    assert "AAPE_TEST_KEY (prompts.openai.api_key_env) is not set" in problem
    monkeypatch.setenv("AAPE_TEST_KEY", "sk-test")
    assert preflight_problems(no_key, ["generate-prompts"]) == []
    own_server = ["prompts.source=openai", "prompts.openai.api_key_env=UNSET_AAPE_VAR"]
    assert preflight_problems(load_params(None, [*own_server, "prompts.openai.base_url=http://127.0.0.1:9/v1"]), ["generate-prompts"]) == []
    [bad_url] = preflight_problems(load_params(None, [*own_server, "prompts.openai.base_url=localhost:8000"]), ["generate-prompts"])
    assert bad_url.startswith("prompts.openai.base_url: 'localhost:8000' is not an http(s) URL")


def test_preflight_raises_a_config_error_listing_the_problems():
    with pytest.raises(ConfigError) as err:
        preflight(load_params(None, ["data.dataset=eurosta"]), source="params.yaml")
    assert err.value.exit_code == 2 and str(err.value).splitlines()[1].startswith("  - unknown dataset 'eurosta'")
