"""The AAPE pipeline as a Prefect flow: prepare data, generate prompts, extract features, train the
aggregator, distil the generator, evaluate; tracked in MLflow, recorded in DVC.

    python -m flows.pipeline                      # run once, locally, with params.yaml
    prefect deployment run 'aape-pipeline/local'  # through a served deployment (flows/serve.py)
"""

from __future__ import annotations

import os

# Show the library's own log lines (stage banners, progress, outputs) in the Prefect UI.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "aape")

import json  # noqa: E402
import logging  # noqa: E402
from typing import Any  # noqa: E402

from prefect import flow, get_run_logger  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402

from aape.config import Params, load_params  # noqa: E402
from aape.errors import report_errors  # noqa: E402
from aape.integrations.mlflow_tracking import tracked_pipeline  # noqa: E402
from aape.layout import Layout  # noqa: E402
from aape.preflight import preflight  # noqa: E402
from aape.stages import STAGES  # noqa: E402
from tasks.dvc_sync import record_outputs_task  # noqa: E402
from tasks.registry import register_model_task  # noqa: E402
from tasks.stages import STAGE_TASKS  # noqa: E402


def build_overrides(
    overrides: list[str] | None = None,
    dataset: str | None = None,
    shots: int | None = None,
    seeds: list[int] | None = None,
    backbone: str | None = None,
    pretrained: str | None = None,
    llm_source: str | None = None,
) -> list[str]:
    """The flow's named parameters are shorthands for params.yaml overrides."""
    named = {
        "data.dataset": dataset,
        "data.shots": shots,
        "run.seeds": json.dumps(seeds) if seeds is not None else None,
        "backbone.model": backbone,
        "backbone.pretrained": pretrained,
        "prompts.source": llm_source,
    }
    return [f"{k}={v}" for k, v in named.items() if v is not None] + list(overrides or [])


def results_markdown(params: Params) -> str:
    report = Layout.from_params(params).eval / "report.md"
    if report.exists():
        return report.read_text()
    return "_The evaluation stage wrote no report._"


@flow(name="aape-pipeline", log_prints=True)
def pipeline(
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
    dataset: str | None = None,
    shots: int | None = None,
    seeds: list[int] | None = None,
    backbone: str | None = None,
    pretrained: str | None = None,
    llm_source: str | None = None,
    track: bool | None = None,
    register_model: bool = True,
    record_in_dvc: bool = True,
) -> dict[str, Any]:
    """Run every stage in order. Any params.yaml key can be set with `overrides` ("key=value")."""
    # Prefect's handlers carry the library's lines (PREFECT_LOGGING_EXTRA_LOGGERS=aape) to the
    # console and the UI; a handler of our own would print each line twice.
    logging.getLogger("aape").setLevel(logging.INFO)
    logger = get_run_logger()
    params = load_params(params_file, build_overrides(overrides, dataset, shots, seeds, backbone, pretrained, llm_source))
    preflight(params, source=params_file)  # before any stage spends time or LLM calls
    if params.backbone.random_init:
        logger.warning("RANDOM-INIT BACKBONE: results of this run say nothing about CLIP or AAPE")
    summaries: dict[str, Any] = {}
    with tracked_pipeline(params, track, "pipeline", orchestrator="prefect") as tracker:
        for name in STAGES:
            summaries[name] = STAGE_TASKS[name](name, params, tracker)
        markdown = results_markdown(params)
        if tracker is not None:
            tracker.log_artifact(Layout.from_params(params).eval, "eval")
            if register_model:
                summaries["model"] = register_model_task(params, tracker)
        summaries["mlflow_run_id"] = getattr(tracker, "run_id", None)
    create_markdown_artifact(key="aape-results", markdown=markdown, description=f"AAPE results: {params.data.dataset}")
    if record_in_dvc:
        summaries["dvc"] = record_outputs_task(params, params_file)
    report = Layout.from_params(params).eval / "report.md"
    logger.info("report: %s", report.resolve())
    return _jsonable(summaries)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def main() -> None:
    # Prefect has logged the failed task with its traceback already; the last lines say what to fix.
    with report_errors():
        pipeline()


if __name__ == "__main__":
    from aape.allocator import exit_with

    exit_with(main)
