"""One CLI for every stage; help on every command; configuration errors name the key; the library's
errors print as a short message, with the traceback only at --log-level DEBUG."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from aape.cli import main
from aape.stages import STAGES

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_every_stage_and_tool_command():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    # the first word of each line under "Commands:", in order: not a substring anywhere in the text
    listed = result.output.split("Commands:\n", 1)[1].splitlines()
    assert [line.split()[0] for line in listed if line.strip()] == [*STAGES, "run", "repro", "plots", "predict", "experiment", "methods", "config"]
    assert "  run                Run the stages in order in this process" in result.output


@pytest.mark.parametrize("command", [[name] for name in STAGES] + [["run"], ["repro"], ["predict"], ["config", "show"], ["config", "check"]])
def test_every_command_has_help(command):
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "--params" in result.output


def test_methods_lists_every_registered_method_with_what_it_needs():
    from aape.methods.registry import METHODS

    result = CliRunner().invoke(main, ["methods"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.output.splitlines()[1:] if line and not line.startswith(" ")}
    assert list(rows) == list(METHODS)
    assert rows["coop"][1:4] == ["train-baselines", "yes", "yes"] and rows["tip-adapter-f"][1:4] == ["train-baselines", "no", "no"]
    assert "82.69 / 63.22 / 71.66" in result.output  # CoOp's published base-to-new average


def test_plots_help_says_what_it_adds_to_dvc():  # DVC reads params.yaml itself: no --params here
    result = CliRunner().invoke(main, ["plots", "--help"])
    assert result.exit_code == 0 and "renders offline" in result.output and "{show|diff}" in result.output


def test_config_check_names_bad_key(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("backbone:\n  modle: ViT-B-16\n")
    result = CliRunner().invoke(main, ["config", "check", "--params", str(bad)])
    assert result.exit_code == 2
    assert "unknown key 'backbone.modle'. Allowed keys here: model, pretrained, precision" in result.output


def test_config_show_applies_overrides():
    result = CliRunner().invoke(main, ["config", "show", "--params", str(REPO / "params.yaml"), "--json", "-s", "data.shots=2"])
    assert result.exit_code == 0
    shown = json.loads(result.output)
    assert shown["data.shots"] == 2 and shown["data.dataset"] == "demo-mnist"  # the override, and params.yaml beneath it


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "aape"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("Usage: aape [OPTIONS] COMMAND [ARGS]...")
    assert "  prepare-data       Run the 'prepare-data' stage" in out.stdout


BAD_VALUE = ["--params", str(REPO / "params.yaml"), "-s", "data.shots=0"]


@pytest.fixture
def aape_log_level():
    """--log-level sets the 'aape' logger for the whole process: put it back for the other tests."""
    logger = logging.getLogger("aape")
    before = logger.level
    yield
    logger.setLevel(before)


def test_a_library_error_is_a_short_message_and_exit_2_for_configuration(aape_log_level):
    result = CliRunner().invoke(main, ["config", "check", *BAD_VALUE])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) <= 3, result.stderr
    assert lines[0].startswith("error: ") and "'data.shots': 0" in result.stderr and "Traceback" not in result.stderr


def test_debug_log_level_adds_the_traceback(aape_log_level):
    result = CliRunner().invoke(main, ["--log-level", "DEBUG", "config", "check", *BAD_VALUE])
    assert result.exit_code == 2
    assert result.stderr.startswith("Traceback") and "ConfigError" in result.stderr
    assert result.stderr.strip().splitlines()[-2].startswith("error: invalid configuration")  # the message still ends it


def test_an_unexpected_error_keeps_its_traceback(monkeypatch, aape_log_level):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("aape.cli.load_params", broken)
    result = CliRunner().invoke(main, ["config", "check"])
    assert isinstance(result.exception, ZeroDivisionError)  # not turned into a message and an exit status


def test_a_stage_as_dvc_runs_it_reports_a_short_error(tmp_path):
    exe = Path(sys.executable).parent / "aape"  # dvc.yaml: cmd: aape <stage>
    out = subprocess.run([str(exe), "prepare-data", *BAD_VALUE], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) <= 3 and "'data.shots': 0" in out.stderr


# aape run --from/--to ----------------------------------------------------------------------------
@pytest.fixture
def recorded_stages(monkeypatch):
    """Stand-in stage functions that record the order they ran in; preflight records its stages."""
    calls: list[str] = []
    checked: list[list[str]] = []

    def stage(name):
        def run(params, tracker=None):
            calls.append(name)
            return {"outputs": [], "seconds": 0.0}

        return run

    monkeypatch.setattr("aape.cli.stage_function", stage)
    monkeypatch.setattr("aape.cli.preflight", lambda params, names, source: checked.append(list(names)))
    return calls, checked


@pytest.mark.parametrize(
    "options, expected",
    [([], list(STAGES)), (["--from", "extract-features", "--to", "distill-generator"], list(STAGES)[2:5]),
     (["--from", "evaluate"], ["evaluate"]), (["--to", "generate-prompts"], list(STAGES)[:2]),
     (["--from", "train-aggregator", "--to", "train-aggregator"], ["train-aggregator"])],
    ids=["all", "middle", "from-last", "to-second", "one"],
)  # fmt: skip
def test_run_runs_exactly_the_chosen_range_in_order(recorded_stages, options, expected):
    calls, checked = recorded_stages
    result = CliRunner().invoke(main, ["run", "--params", str(REPO / "params.yaml"), "--no-track", *options])
    assert result.exit_code == 0, result.output
    assert calls == expected and checked == [expected]  # preflight checks the same stages, before any runs
    assert [line for line in result.output.splitlines() if line.endswith("done in 0.0s")] == [f"[{n}] done in 0.0s" for n in expected]


def test_run_with_from_after_to_runs_nothing(recorded_stages):
    calls, checked = recorded_stages
    result = CliRunner().invoke(main, ["run", "--params", str(REPO / "params.yaml"), "--no-track", "--from", "evaluate", "--to", "prepare-data"])
    assert result.exit_code == 1 and "--from comes after --to: nothing to run" in result.output
    assert calls == [] and checked == []


def test_run_with_tracking_gives_each_stage_of_the_range_its_child_run(recorded_stages, monkeypatch):
    from contextlib import nullcontext

    from aape.tracking import RecordingTracker

    calls, _ = recorded_stages
    root = RecordingTracker()
    opened: list[str] = []

    def tracker_context(params, track, what):
        opened.append(what)
        return nullcontext(root)

    monkeypatch.setattr("aape.cli._tracker_context", tracker_context)
    args = ["run", "--params", str(REPO / "params.yaml"), "--track", "--from", "train-aggregator", "--to", "distill-generator"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert opened == ["train-aggregator+distill-generator"]  # one parent run for the whole range
    assert [(c.name, c.tags) for c in root.children] == [(n, {"stage": n}) for n in ("train-aggregator", "distill-generator")]
    assert calls == ["train-aggregator", "distill-generator"]
