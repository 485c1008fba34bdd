"""An experiment file's grid, fanned out on a Dask cluster (prefect-dask's DaskTaskRunner).

    aape experiment run experiments/table6-lambda.yaml [--workers 2 | --address tcp://host:8786]
    prefect deployment run 'aape-experiment/local' -p file=experiments/table6-lambda.yaml

Phases: every cell is validated (a bad value stops the run before any work); the shared work (data,
descriptions, features: one cell per distinct data setting) runs first, so the cells find it in the
content-keyed cache; then every unfinished cell runs as one Prefect task on the cluster, in its own
output folder. Results are files (each cell's eval/metrics.json), never objects in worker memory; a
task whose worker dies is retried, and finished cells are skipped on a rerun (cell.json).

Inside a Dask worker (a daemonic process) a DataLoader cannot start worker processes, so cells
decode images in-process (features.num_workers=0) and use one torch thread each (run.num_threads=1),
one cell per worker thread. The cells' log lines go to the workers' stderr, not to the Prefect API
(AAPE_CELL_LOGS_TO_PREFECT=1 sends them: it costs CPU beside the cells). With `gpus_per_cell`, each cell asks Dask for that many "GPU" resources
and workers are started with the resources of the machine's GPUs (or the given cluster's).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "aape")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from aape import experiments as ex  # noqa: E402
from aape.atomic import atomic_write_text  # noqa: E402

CELL_OVERRIDES = ["features.num_workers=0", "run.num_threads=1", "tracking.enabled=false"]
FIRST_STAGES = ("prepare-data", "generate-prompts", "extract-features")


def _run_stages(params, names) -> None:
    import torch

    from aape.stages import STAGES, stage_function

    torch.set_num_threads(max(1, params.run.num_threads or 1))
    for name in names or STAGES:
        stage_function(name)(params)


@task(name="shared-work", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def shared_work_task(cell: ex.Cell, params_file: str | None) -> str:
    from aape.backbone import resolve_device
    from aape.method import fused_head

    params = ex.cell_params(cell, params_file)
    _run_stages(params, FIRST_STAGES)
    if resolve_device(params.run.device).type == "cpu":
        # On a fresh machine the first CPU evaluation builds the fused head (a minute on 2 cores), and every
        # worker's first cell would wait on that build; once here, the workers load it from torch's disk cache.
        fused_head.prebuild()
    return cell.key


@task(name="cell", task_run_name="cell {cell.key}", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def cell_task(cell: ex.Cell, params_file: str | None) -> dict[str, Any]:
    """Run one cell's pipeline (or nothing, if it is finished); its metrics are read back from its files."""
    params = ex.cell_params(cell, params_file)
    if ex.is_finished(cell, params):
        return {"cell": cell.key, "reused": True, "seconds": 0.0}
    started = time.perf_counter()
    _run_stages(params, None)
    seconds = time.perf_counter() - started
    ex.mark_finished(cell, params, seconds)
    return {"cell": cell.key, "reused": False, "seconds": seconds}


# Dask's defaults suit millisecond tasks: an event-loop tick every 20 ms, a statistical profiler sampling
# each worker thread every 10 ms, memory and system monitors every 0.1-0.5 s, work stealing every 0.1 s.
# A cell runs for minutes; on 2 cores those timers held 5% of a core in the driver (scheduler and nannies)
# beside the cells. Coarser timers for a local cluster (a cluster given by address keeps its own config).
QUIET_DASK = {
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "5s",
    "distributed.worker.profile.enabled": False,
    "distributed.worker.memory.monitor-interval": "1s",
    "distributed.scheduler.work-stealing-interval": "1s",
}


def _dask_env(config: dict[str, Any]) -> dict[str, str]:
    """Dask config as the DASK_* environment variables a spawned worker process reads at import."""
    return {"DASK_" + key.upper().replace(".", "__").replace("-", "_"): str(value) for key, value in config.items()}


def task_runner(workers: int, address: str | None, gpus_per_cell: int = 0):
    import dask
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    dask.config.set(QUIET_DASK)  # the scheduler and the nannies run in this process
    kwargs: dict[str, Any] = {"n_workers": workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None,
                              "preload": ["flows.dask_worker_setup"], "env": _dask_env(QUIET_DASK)}
    if os.environ.get("AAPE_CELL_LOGS_TO_PREFECT") != "1":
        # shipping every worker's log lines to the Prefect API cost a quarter of a core per busy worker here
        # (2 cores: cells ran 30% slower side by side); the cells' states still reach the UI, their log
        # lines go to the workers' stderr (the terminal). AAPE_CELL_LOGS_TO_PREFECT=1 ships them.
        kwargs["env"]["PREFECT_LOGGING_TO_API_ENABLED"] = "false"
    if gpus_per_cell:
        import torch

        kwargs["resources"] = {"GPU": max(1, torch.cuda.device_count() // max(workers, 1))}
    return DaskTaskRunner(cluster_kwargs=kwargs)


@flow(name="aape-experiment", log_prints=True,
      # the deployment's default: a local cluster of 2 single-threaded workers, or AAPE_DASK_ADDRESS's cluster
      task_runner=task_runner(int(os.environ.get("AAPE_DASK_WORKERS", "2")), os.environ.get("AAPE_DASK_ADDRESS")))
def experiment(file: str, params_file: str = "params.yaml", overrides: list[str] | None = None, gpus_per_cell: int = 0,
               root: str | None = None) -> dict[str, Any]:
    """Run an experiment file's grid on this flow's task runner; write its report; return the summary."""
    logger = get_run_logger()
    spec = ex.load_experiment(file)
    base = ex.load_params(params_file, list(overrides or []))
    root = root or str(Path(base.run.output_dir).parent / "experiments")
    extra = [*CELL_OVERRIDES, *(overrides or [])]
    all_cells = ex.cells(spec, params_file, root, extra)  # validated before any work
    logger.info("experiment %s (%s): %d cells in %s", spec.name, spec.paper or "no paper table", len(all_cells), root)
    started = time.perf_counter()
    annotations = _gpu_annotation(gpus_per_cell)
    with annotations:
        pending = [c for c in all_cells if not ex.is_finished(c, ex.cell_params(c, params_file))]
        shared = [shared_work_task.submit(c, params_file) for c in ex.shared_work(pending, params_file)] if pending else []
        for future in shared:
            future.result()
        shared_s = time.perf_counter() - started
        futures = [cell_task.submit(c, params_file) for c in all_cells]
        outcomes = [f.result() for f in futures]
    wall = time.perf_counter() - started
    summary = write_report(spec, all_cells, Path(root) / spec.name, base.evaluation.methods if spec.methods is None else spec.methods)
    summary.update(cells=len(all_cells), reused=sum(o["reused"] for o in outcomes), wall_s=wall, shared_s=shared_s,
                   cell_s=sum(o["seconds"] for o in outcomes))
    create_markdown_artifact(key=f"experiment-{_key(spec.name)}", markdown=summary["markdown"], description=spec.description or spec.name)
    _track(base, spec, summary)
    logger.info("experiment %s: %d cells (%d reused) in %.0f s; report %s", spec.name, len(all_cells), summary["reused"], wall, summary["report"])
    return {k: v for k, v in summary.items() if k not in ("markdown", "records")}


def _key(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower())


def _gpu_annotation(gpus: int):
    import contextlib

    if not gpus:
        return contextlib.nullcontext()
    import dask

    return dask.annotate(resources={"GPU": gpus})


def write_report(spec: ex.ExperimentSpec, all_cells: list[ex.Cell], folder: Path, methods: list[str]) -> dict[str, Any]:
    import pandas as pd

    from aape.backbone import RANDOM_INIT_NOTICE

    finished = [(c, ex.cell_metrics(c)) for c in all_cells if (Path(c.output_dir) / "eval" / "metrics.json").is_file()]
    markdown, records = ex.table(spec, finished, methods)
    random_init = any(r["random_init"] for r in records)
    lines = [f"**{RANDOM_INIT_NOTICE}**", ""] if random_init else []
    lines += [f"# Experiment {spec.name}" + (f" ({spec.paper})" if spec.paper else ""), "", spec.description, "",
              f"{len(finished)} of {len(all_cells)} cells finished; mean ± population std over seeds (n = seeds with a value).", "",
              markdown, ""]
    folder.mkdir(parents=True, exist_ok=True)
    report = folder / "report.md"
    atomic_write_text(report, "\n".join(lines))
    pd.DataFrame(records).to_parquet(folder / "results.parquet")
    (folder / "experiment.json").write_text(json.dumps(spec.model_dump(mode="json"), indent=2))
    return {"report": str(report), "markdown": "\n".join(lines), "random_init": random_init, "finished": len(finished), "records": records}


def _track(params, spec: ex.ExperimentSpec, summary: dict[str, Any]) -> None:
    """One MLflow parent run per experiment with the report, when tracking is on."""
    if not params.tracking.enabled:
        return
    from aape.integrations.mlflow_tracking import tracked_pipeline

    with tracked_pipeline(params, None, f"experiment {spec.name}", orchestrator="prefect") as tracker:
        if tracker is None:
            return
        tracker.set_tags({"experiment": spec.name, "paper": spec.paper, "random_init": str(summary["random_init"]).lower()})
        tracker.log_metrics({"cells": float(summary["cells"]), "wall_s": summary["wall_s"]})
        tracker.log_artifact(summary["report"], "experiment")
        for record in summary["records"]:  # one run per cell and method: the grid in MLflow's runs table
            point = {k: v for k, v in record.items() if k not in ("value", "metric", "random_init", "seed", ex.METHOD_AXIS)}
            name = " · ".join([record[ex.METHOD_AXIS], *(f"{k}={v}" for k, v in point.items()), f"seed {record['seed']}"])
            with tracker.child(name, tags={"experiment": spec.name, "method": record[ex.METHOD_AXIS]}) as child:
                child.log_params({**point, "method": record[ex.METHOD_AXIS], "seed": str(record["seed"])})
                child.log_metrics({record["metric"]: record["value"]})


def run_experiment(file: str, params_file: str = "params.yaml", overrides: list[str] | None = None, workers: int = 2,
                   address: str | None = None, gpus_per_cell: int = 0, root: str | None = None) -> dict[str, Any]:
    """The CLI's entry: the flow with a Dask task runner (a local cluster of `workers`, or `address`)."""
    runner = task_runner(workers, address, gpus_per_cell)
    with _shared_prefect_api():
        return experiment.with_options(task_runner=runner)(file=file, params_file=params_file, overrides=overrides,
                                                           gpus_per_cell=gpus_per_cell, root=root)


# A temporary server has no UI and no deployments, schedules, work pools or automations: the services
# that watch for those only cost CPU beside the cells (measured during bench_experiments: the server
# process used 14.9 CPU-s with them, 7.4 without). State and event recording stay on.
IDLE_SERVER_SERVICES = ("cancellation_cleanup", "db_vacuum", "event_logger", "foreman", "late_runs", "scheduler",
                        "pause_expirations", "repossessor", "cleanup_reconciler", "triggers")


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _shared_prefect_api():
    """Without PREFECT_API_URL, every process would start its own temporary Prefect server (each Dask
    worker one, ~10 s of CPU each, and the cells' states would land in servers nobody sees): start one
    here and hand its address to the workers through the environment they inherit."""
    import contextlib

    if os.environ.get("PREFECT_API_URL"):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def serve():
        import prefect.settings
        from prefect.server.api.server import SubprocessASGIServer
        from prefect.settings import PREFECT_API_URL, temporary_settings

        # Prefect keeps one server object per port, and `SubprocessASGIServer()` is the process's shared
        # one (a test harness's, an ephemeral run's): ours gets its own port, so stopping it stops only ours
        server = SubprocessASGIServer(port=_free_port())
        # explicitly set settings are what the server process is started with (above its environment)
        idle = {getattr(prefect.settings, f"PREFECT_SERVER_SERVICES_{name.upper()}_ENABLED"): False for name in IDLE_SERVER_SERVICES}
        with temporary_settings(idle):
            server.start()
        os.environ["PREFECT_API_URL"] = server.api_url
        try:
            with temporary_settings({PREFECT_API_URL: server.api_url}):
                yield
        finally:
            os.environ.pop("PREFECT_API_URL", None)
            server.stop()

    return serve()


def main(argv: list[str] | None = None) -> int:
    import argparse

    from aape.errors import report_errors

    parser = argparse.ArgumentParser(prog="python -m flows.experiment", description="Run an experiment file's grid on Dask.")
    parser.add_argument("file")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", "-s", dest="overrides", action="append", default=[], help="key.path=value for every cell")
    parser.add_argument("--workers", type=int, default=2, help="workers of the local Dask cluster (one cell each)")
    parser.add_argument("--address", default=None, help="an existing Dask scheduler (tcp://host:8786) instead of a local cluster")
    parser.add_argument("--gpus-per-cell", type=int, default=0)
    parser.add_argument("--root", default=None, help="where the cells' folders go (default: experiments/ beside run.output_dir)")
    args = parser.parse_args(argv)
    with report_errors():
        summary = run_experiment(args.file, args.params, args.overrides, args.workers, args.address, args.gpus_per_cell, args.root)
        print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    from aape.allocator import exit_with

    exit_with(main)
