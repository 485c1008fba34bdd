"""A pipeline run outside `dvc repro` records its outputs in dvc.lock only when it used params.yaml
exactly: dvc.lock must never describe outputs made from other parameters."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

pytest.importorskip("prefect")

from aape.config import dump_params, load_params  # noqa: E402
from tasks import dvc_sync  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def dvc_project(tmp_path, monkeypatch):
    """A folder DVC would call a project, its params.yaml, and the dvc commands it is sent (none run)."""
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / ".dvc").mkdir()
    dump_params(load_params(REPO / "params.yaml"), tmp_path / "params.yaml")
    sent: list[list[str]] = []

    def fake_dvc(args, cwd):
        sent.append(list(args))
        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr(dvc_sync, "_dvc", fake_dvc)
    return tmp_path, sent


def test_a_run_with_other_parameters_is_not_recorded(dvc_project, caplog):
    project, sent = dvc_project
    caplog.set_level("WARNING", logger="aape.dvc")
    overridden = load_params(project / "params.yaml", ["data.shots=4"])
    assert dvc_sync.record_outputs(overridden, "params.yaml", repo=project) == "skipped: parameters differ from params.yaml"
    assert sent == []  # no dvc commit
    assert "outputs NOT recorded in dvc.lock: this run's parameters differ from params.yaml" in caplog.text


def test_a_run_with_the_files_parameters_is_committed_then_checked(dvc_project):
    project, sent = dvc_project
    assert dvc_sync.record_outputs(load_params(project / "params.yaml"), "params.yaml", repo=project) == "recorded"
    assert sent == [["commit", "--force", "--quiet"], ["status", "--quiet"]]


def test_an_unreadable_params_file_counts_as_different(dvc_project):
    project, sent = dvc_project
    (project / "params.yaml").write_text("data: [not, a, mapping\n")
    assert dvc_sync.record_outputs(load_params(REPO / "params.yaml"), "params.yaml", repo=project) == "skipped: parameters differ from params.yaml"
    assert sent == []
