"""Keep DVC's lock file in step with pipeline runs that did not go through `dvc repro`."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

from prefect import task

from aape.config import Params, load_params

log = logging.getLogger("aape.dvc")


def matches_params_file(params: Params, params_file: str | Path) -> bool:
    """True when the run used exactly params.yaml, i.e. what dvc.yaml's stages declare."""
    try:
        return load_params(params_file) == params
    except Exception:  # an unreadable params file cannot be what DVC tracks
        return False


def _dvc(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("dvc") or str(Path(__import__("sys").executable).parent / "dvc")
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def record_outputs(params: Params, params_file: str | Path = "params.yaml", repo: Path | None = None) -> str:
    """`dvc commit` the stage outputs so `dvc status` is clean and dvc.lock describes them.

    Skipped (and said so) when the run used overrides: dvc.lock must only ever describe outputs
    made from params.yaml as it stands.
    """
    repo = Path(repo or Path.cwd())
    if not (repo / "dvc.yaml").exists() or not (repo / ".dvc").is_dir():
        return "skipped: no DVC project here"
    if not matches_params_file(params, repo / params_file):
        log.warning("outputs NOT recorded in dvc.lock: this run's parameters differ from %s", params_file)
        return "skipped: parameters differ from params.yaml"
    done = _dvc(["commit", "--force", "--quiet"], repo)
    if done.returncode != 0:
        raise RuntimeError(f"dvc commit failed:\n{done.stdout}\n{done.stderr}")
    status = _dvc(["status", "--quiet"], repo)
    if status.returncode != 0:
        raise RuntimeError(f"dvc status is not clean after dvc commit:\n{status.stdout}\n{status.stderr}")
    log.info("stage outputs recorded in dvc.lock; dvc status is clean")
    return "recorded"


record_outputs_task = task(record_outputs, name="dvc-commit", task_run_name="dvc-commit")
