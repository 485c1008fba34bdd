"""One CLI for every stage; help on every command; configuration errors name the key; the library's
errors print as a short message, with the traceback only at --log-level DEBUG."""

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
    for name in [*STAGES, "run", "predict", "config"]:
        assert name in result.output


@pytest.mark.parametrize("command", [[name] for name in STAGES] + [["run"], ["predict"], ["config", "show"], ["config", "check"]])
def test_every_command_has_help(command):
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "--params" in result.output


def test_config_check_names_bad_key(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("backbone:\n  modle: ViT-B-16\n")
    result = CliRunner().invoke(main, ["config", "check", "--params", str(bad)])
    assert result.exit_code != 0
    assert "backbone.modle" in result.output and "model" in result.output


def test_config_show_applies_overrides():
    result = CliRunner().invoke(main, ["config", "show", "--params", str(REPO / "params.yaml"), "--json", "-s", "data.shots=2"])
    assert result.exit_code == 0
    assert '"data.shots": 2' in result.output


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "aape"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "prepare-data" in out.stdout


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
