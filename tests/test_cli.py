"""One CLI for every stage; help on every command; configuration errors name the key."""

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
