"""MLflow behind the library's `Tracker` interface.

One parent run per pipeline run; `tracker.child(name)` opens a nested run (a stage, or a method ×
seed in evaluation). Everything goes through `MlflowClient` with explicit run ids rather than
MLflow's thread-local "active run", so it works unchanged from Prefect's worker threads.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

from aape.config import Params

log = logging.getLogger(__name__)

_PARAM_VALUE_LIMIT = 6000  # MLflow's limit on a parameter value's length
# MLflow 3's UI opens an experiment by its kind: without this tag it shows the GenAI overview
# ("Traces 0") instead of the runs table
EXPERIMENT_KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"


def resolve_tracking_uri(uri: str, base: Path | None = None) -> str:
    """Make a relative `sqlite:///file.db` absolute so runs land in one database whatever the cwd."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path = (base or Path.cwd()) / uri[len(prefix) :]
        return prefix + str(path.resolve())
    return uri


def git_commit(cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=cwd)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5, cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def run_tags(params: Params) -> dict[str, str]:
    """Tags every run of a pipeline carries, so the UI can filter and nobody mistakes random weights."""
    random_init = params.backbone.random_init
    tags = {
        "git_commit": git_commit(),
        "dataset": params.data.dataset,
        "protocol": params.data.protocol,
        "shots": str(params.data.shots),
        "backbone": params.backbone.model,
        "weights": params.backbone.pretrained,
        "random_init": str(random_init).lower(),
        "aggregator": params.aggregator.variant,
    }
    if random_init:
        tags["mlflow.note.content"] = (
            "RANDOM-INIT BACKBONE: this run used randomly initialised CLIP weights; "
            "its accuracies say nothing about CLIP or AAPE."
        )
    return tags


def tracked_pipeline(params: Params, track: bool | None, what: str, orchestrator: str) -> AbstractContextManager:
    """The parent run of one pipeline run (`what` ran, started by `orchestrator`), or a context that
    yields None when tracking is off; `track` overrides tracking.enabled. The CLI and the flows use it."""
    if not (params.tracking.enabled if track is None else track):
        return nullcontext(None)
    return pipeline_run(params, run_name=parent_run_name(params, what), extra_tags={"orchestrator": orchestrator})


def parent_run_name(params: Params, what: str) -> str:
    """A pipeline run's name in the runs table: what was run, on which setting (what sweeps vary)."""
    g = params.generator
    return (f"{params.run.name} · {what} · {params.data.dataset} {params.data.shots}-shot {params.data.protocol} · "
            f"{params.backbone.model} · {params.aggregator.variant} λ={g.lambda_distill:g}")


class MlflowTracker:
    """A `Tracker` writing to one MLflow run."""

    def __init__(self, client: Any, run_id: str, experiment_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self.experiment_id = experiment_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), str(v)[:_PARAM_VALUE_LIMIT]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow's batch limit is 100 params
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        items = [
            Metric(str(k), float(v), now, step or 0)
            for k, v in metrics.items()
            if v is not None and math.isfinite(float(v))
        ]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start : start + 1000])

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)
        else:
            log.warning("not logging missing artifact %s", path)

    @contextmanager
    def child(self, name: str, tags: dict[str, str] | None = None) -> Iterator["MlflowTracker"]:
        """A nested run; its status follows the block (FAILED on exception)."""
        parent_tags = self.client.get_run(self.run_id).data.tags
        inherited = {k: v for k, v in parent_tags.items() if not k.startswith("mlflow.") or k == "mlflow.note.content"}
        with open_run(self.client, self.experiment_id, name, {**inherited, **(tags or {}), "mlflow.parentRunId": self.run_id}) as child:
            yield child

    @contextmanager
    def peer(self, name: str, tags: dict[str, str] | None = None) -> Iterator["MlflowTracker"]:
        """A run under this run's parent (this run's child when it is a top-level run)."""
        parent_id = self.client.get_run(self.run_id).data.tags.get("mlflow.parentRunId")
        with MlflowTracker(self.client, parent_id or self.run_id, self.experiment_id).child(name, tags) as run:
            yield run


@contextmanager
def open_run(client: Any, experiment_id: str, name: str, tags: dict[str, str]) -> Iterator[MlflowTracker]:
    """The one way this module opens a run (parent or nested): FINISHED after the block, FAILED when it raises."""
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    tracker = MlflowTracker(client, run.info.run_id, experiment_id)
    try:
        yield tracker
    except BaseException:
        client.set_terminated(tracker.run_id, status="FAILED")
        raise
    client.set_terminated(tracker.run_id, status="FINISHED")


def open_experiment(params: Params) -> tuple[Any, str]:
    """Client and experiment id for params.tracking (creating the experiment when new)."""
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(params.tracking.uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    if experiment is not None:
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != TRAINING_KIND:  # made before the tag existed
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
        return client, experiment.experiment_id
    location = params.tracking.artifact_location
    if "://" not in location:
        location = Path(location).resolve().as_uri()
    return client, client.create_experiment(params.tracking.experiment, artifact_location=location, tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})


@contextmanager
def pipeline_run(params: Params, run_name: str, extra_tags: dict[str, str] | None = None) -> Iterator[MlflowTracker]:
    """The parent run of one pipeline run: flattened params, identifying tags, status on exit.

    With AAPE_MLFLOW_PARENT_RUN_ID set (e.g. by an orchestrator), attach to that run instead of
    creating one, so separate processes log under one parent.
    """
    client, experiment_id = open_experiment(params)
    attach_to = os.environ.get("AAPE_MLFLOW_PARENT_RUN_ID")
    if attach_to:
        yield MlflowTracker(client, attach_to, experiment_id)
        return
    with open_run(client, experiment_id, run_name, {**run_tags(params), **(extra_tags or {})}) as tracker:
        tracker.log_params(params.flat())
        if params.backbone.random_init:
            log.warning("MLflow run %s is tagged random_init=true", tracker.run_id)
        log.info("MLflow run %s (%s) in %s", tracker.run_id, run_name, resolve_tracking_uri(params.tracking.uri))
        yield tracker
